"""FedKSeed and FedKSeed-Pro (DRAFT: sections are being filled in)."""
import torch

# ----------------------------------------------------------------------------------------------------
# z: the perturbation, one definition everywhere  (owned by the kernels issue; placeholder below)
# ----------------------------------------------------------------------------------------------------
GAUSSIAN, RADEMACHER = 0, 1
HAVE_COMPILED_OPS = False


def z_reference(seed: int, offset: int, n: int, kind: int) -> torch.Tensor:
    """PLACEHOLDER: float32 z[offset : offset + n] for `seed`. Replaced by the Philox reference."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(offset + n, generator=g)[offset:] if kind == GAUSSIAN else (
        torch.randint(0, 2, (offset + n,), generator=g)[offset:].float() * 2 - 1)
    return z


def perturb_reference_(p: torch.Tensor, seed: int, offset: int, scale: float, kind: int) -> None:
    flat = p.view(-1)
    flat.copy_((flat.float() + scale * z_reference(seed, offset, flat.numel(), kind)).to(p.dtype))


def apply_seeds_reference_(p, seeds, scales, offset, kind) -> None:
    flat = p.view(-1)
    acc = torch.zeros(flat.numel(), dtype=torch.float32)
    for s, c in zip(seeds, scales):
        acc += c * z_reference(s, offset, flat.numel(), kind)
    flat.copy_((flat.float() + acc).to(p.dtype))


# the names the algorithm below uses: compiled ops when built, else the reference
noise, perturb_, apply_seeds_ = z_reference, perturb_reference_, apply_seeds_reference_
# ---------------------------------------------------------------------------------------------------- end of z
