"""seedops: the seed-based perturbation ops, compiled (csrc/, `fedfull_ops`) when built, else their Python reference.

    from seedops import GAUSSIAN, RADEMACHER, noise, perturb_multi_, apply_seeds_multi_
    z = noise(seed, offset, n, kind)                        # float32 z(seed, i) for i in [offset, offset + n)
    perturb_(p, seed, offset, scale, kind)                  # p.view(-1)[j] += scale * z(seed, offset + j)
    apply_seeds_(p, seeds, scales, offset, kind)            # p.view(-1)[j] += sum_s scales[s] * z(seeds[s], offset + j)
    perturb_multi_(params, seed, offsets, scale, kind)      # perturb_ on each tensor at its global offset: one pass
    apply_seeds_multi_(params, seeds, scales, offsets, kind)
    perturb_copy_multi_(params, copies, seed, offsets, scale, kind)   # ... and each copy <- its tensor, rounded
    apply_seeds_copy_multi_(params, copies, seeds, scales, offsets, kind)
    z = noise_masked(seed, offset, idx, kind)               # z(seed, offset + idx[k]): the dense z at those indices
    perturb_masked_multi_(params, copies, masks, seed, offsets, scale, kind)   # the same, only at each tensor's mask
    apply_seeds_masked_multi_(params, copies, masks, seeds, scales, offsets, kind)   # (masks: int64 index tensors)
    masks = mask_of(scores, density)                        # the indices of each tensor's top fraction of a score

Every op computes in float32 and rounds once to the tensor's dtype (float32, bfloat16 or float16); sums over seeds
are taken in seed order. kind: GAUSSIAN (0) or RADEMACHER (1). The definition of z, and the reference of every op,
is seedops/reference.py; the compiled ops give the same bits (tests/test_kernels.py). Without a build the
references are used: the same bits, much slower; `HAVE_COMPILED_OPS` says which, `COMPILED_OPS_NOTE` in one line.
"""
import torch

from .reference import (GAUSSIAN, RADEMACHER, apply_seeds_copy_multi_reference_, apply_seeds_masked_multi_reference_,
                        apply_seeds_multi_reference_, apply_seeds_reference_, perturb_copy_multi_reference_,
                        perturb_masked_multi_reference_, perturb_multi_reference_, perturb_reference_, philox4x32_10,
                        z_masked_reference, z_reference)

try:
    import fedfull_ops  # noqa: F401  (its import registers torch.ops.fedfull.*; built by `pip install -e .`)

    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = True, None
    noise, perturb_, apply_seeds_ = torch.ops.fedfull.noise, torch.ops.fedfull.perturb_, torch.ops.fedfull.apply_seeds_
    perturb_multi_, apply_seeds_multi_ = torch.ops.fedfull.perturb_multi_, torch.ops.fedfull.apply_seeds_multi_
    perturb_copy_multi_ = torch.ops.fedfull.perturb_copy_multi_
    apply_seeds_copy_multi_ = torch.ops.fedfull.apply_seeds_copy_multi_
    perturb_masked_multi_ = torch.ops.fedfull.perturb_masked_multi_
    apply_seeds_masked_multi_ = torch.ops.fedfull.apply_seeds_masked_multi_

    def noise_masked(seed, offset, idx, kind):
        out = torch.empty(idx.numel(), dtype=torch.float32, device=idx.device)
        torch.ops.fedfull.noise_masked_fill_(out, idx, seed, offset, kind)
        return out
except ImportError as err:
    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = False, str(err)
    noise, perturb_, apply_seeds_ = z_reference, perturb_reference_, apply_seeds_reference_
    perturb_multi_, apply_seeds_multi_ = perturb_multi_reference_, apply_seeds_multi_reference_
    perturb_copy_multi_, apply_seeds_copy_multi_ = perturb_copy_multi_reference_, apply_seeds_copy_multi_reference_
    perturb_masked_multi_, apply_seeds_masked_multi_ = perturb_masked_multi_reference_, apply_seeds_masked_multi_reference_
    noise_masked = z_masked_reference



def perturb_weights_(params, copies, seed, offsets, scale, kind, masks=None):
    """One pass over a model's tensors: w += scale * z(seed) (`perturb_multi_`: one call, one launch on CUDA). With
    `copies` (tensors of the same shapes in bfloat16/float16: the model's own parameters, which the forwards read,
    while `params` are float32 weights apart from it) the same pass writes w rounded into them: fedkseed's
    --compute_dtype. The float32 result is the same bits either way. With `masks` (one int64 index tensor per
    tensor: fedkseed's --mask) only the masked elements change, with the same bits as the dense pass there."""
    if masks is not None:
        perturb_masked_multi_(params, copies or [], masks, seed, offsets, scale, kind)
    elif copies is None:
        perturb_multi_(params, seed, offsets, scale, kind)
    else:
        perturb_copy_multi_(params, copies, seed, offsets, scale, kind)


def apply_weights_(params, copies, seeds, scales, offsets, kind, masks=None):
    """One pass over a model's tensors: w += sum_s scales[s] * z(seeds[s]) (float32 sum, one rounding), copies and
    masks as in `perturb_weights_`."""
    if masks is not None:
        apply_seeds_masked_multi_(params, copies or [], masks, seeds, scales, offsets, kind)
    elif copies is None:
        apply_seeds_multi_(params, seeds, scales, offsets, kind)
    else:
        apply_seeds_copy_multi_(params, copies, seeds, scales, offsets, kind)


def mask_count(numel, density):
    """How many of a tensor's `numel` elements a mask of `density` keeps: ceil(density * numel), at least 1."""
    import math
    return min(numel, max(1, math.ceil(density * numel)))


def mask_of(scores, density):
    """Each tensor's top `density` fraction by its score tensor (the same shapes) -> [int64 index tensor per tensor],
    sorted: `mask_count` indices, the largest scores, ties broken by the lower index (a stable sort, so every party
    that computes the scores' same bits gets the same mask on any device)."""
    masks = []
    for sc in scores:
        flat = sc.detach().reshape(-1).float()
        k = mask_count(flat.numel(), density)
        order = torch.sort(-flat, stable=True).indices[:k]
        masks.append(torch.sort(order).values.to(torch.int64).contiguous())
    return masks


COMPILED_OPS_NOTE = None if HAVE_COMPILED_OPS else (
    "note: compiled ops not found (pip install --no-build-isolation -e .): using the slow Python reference of z")

__all__ = ["GAUSSIAN", "RADEMACHER", "HAVE_COMPILED_OPS", "COMPILED_OPS_ERROR", "COMPILED_OPS_NOTE", "noise",
           "noise_masked", "perturb_masked_multi_", "apply_seeds_masked_multi_", "mask_of", "z_masked_reference",
           "perturb_masked_multi_reference_", "apply_seeds_masked_multi_reference_",
           "perturb_", "apply_seeds_", "perturb_multi_", "apply_seeds_multi_", "perturb_copy_multi_",
           "apply_seeds_copy_multi_", "z_reference", "perturb_reference_", "apply_seeds_reference_",
           "perturb_multi_reference_", "apply_seeds_multi_reference_", "perturb_copy_multi_reference_",
           "apply_seeds_copy_multi_reference_", "philox4x32_10", "perturb_weights_", "apply_weights_"]
