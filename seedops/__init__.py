"""seedops: the seed-based perturbation ops, compiled (csrc/, `fedfull_ops`) when built, else their Python reference.

    from seedops import GAUSSIAN, RADEMACHER, noise, perturb_multi_, apply_seeds_multi_
    z = noise(seed, offset, n, kind)                        # float32 z(seed, i) for i in [offset, offset + n)
    perturb_(p, seed, offset, scale, kind)                  # p.view(-1)[j] += scale * z(seed, offset + j)
    apply_seeds_(p, seeds, scales, offset, kind)            # p.view(-1)[j] += sum_s scales[s] * z(seeds[s], offset + j)
    perturb_multi_(params, seed, offsets, scale, kind)      # perturb_ on each tensor at its global offset: one pass
    apply_seeds_multi_(params, seeds, scales, offsets, kind)
    perturb_copy_multi_(params, copies, seed, offsets, scale, kind)   # ... and each copy <- its tensor, rounded
    apply_seeds_copy_multi_(params, copies, seeds, scales, offsets, kind)

Every op computes in float32 and rounds once to the tensor's dtype (float32, bfloat16 or float16); sums over seeds
are taken in seed order. kind: GAUSSIAN (0) or RADEMACHER (1). The definition of z, and the reference of every op,
is seedops/reference.py; the compiled ops give the same bits (tests/test_kernels.py). Without a build the
references are used: the same bits, much slower; `HAVE_COMPILED_OPS` says which, `COMPILED_OPS_NOTE` in one line.
"""
import torch

from .reference import (GAUSSIAN, RADEMACHER, apply_seeds_copy_multi_reference_, apply_seeds_multi_reference_,
                        apply_seeds_reference_, perturb_copy_multi_reference_, perturb_multi_reference_,
                        perturb_reference_, philox4x32_10, z_reference)

try:
    import fedfull_ops  # noqa: F401  (its import registers torch.ops.fedfull.*; built by `pip install -e .`)

    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = True, None
    noise, perturb_, apply_seeds_ = torch.ops.fedfull.noise, torch.ops.fedfull.perturb_, torch.ops.fedfull.apply_seeds_
    perturb_multi_, apply_seeds_multi_ = torch.ops.fedfull.perturb_multi_, torch.ops.fedfull.apply_seeds_multi_
    perturb_copy_multi_ = torch.ops.fedfull.perturb_copy_multi_
    apply_seeds_copy_multi_ = torch.ops.fedfull.apply_seeds_copy_multi_
except ImportError as err:
    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = False, str(err)
    noise, perturb_, apply_seeds_ = z_reference, perturb_reference_, apply_seeds_reference_
    perturb_multi_, apply_seeds_multi_ = perturb_multi_reference_, apply_seeds_multi_reference_
    perturb_copy_multi_, apply_seeds_copy_multi_ = perturb_copy_multi_reference_, apply_seeds_copy_multi_reference_



def perturb_weights_(params, copies, seed, offsets, scale, kind):
    """One pass over a model's tensors: w += scale * z(seed) (`perturb_multi_`: one call, one launch on CUDA). With
    `copies` (tensors of the same shapes in bfloat16/float16: the model's own parameters, which the forwards read,
    while `params` are float32 weights apart from it) the same pass writes w rounded into them: fedkseed's
    --compute_dtype. The float32 result is the same bits either way."""
    if copies is None:
        perturb_multi_(params, seed, offsets, scale, kind)
    else:
        perturb_copy_multi_(params, copies, seed, offsets, scale, kind)


def apply_weights_(params, copies, seeds, scales, offsets, kind):
    """One pass over a model's tensors: w += sum_s scales[s] * z(seeds[s]) (float32 sum, one rounding), copies as
    in `perturb_weights_`."""
    if copies is None:
        apply_seeds_multi_(params, seeds, scales, offsets, kind)
    else:
        apply_seeds_copy_multi_(params, copies, seeds, scales, offsets, kind)


COMPILED_OPS_NOTE = None if HAVE_COMPILED_OPS else (
    "note: compiled ops not found (pip install --no-build-isolation -e .): using the slow Python reference of z")

__all__ = ["GAUSSIAN", "RADEMACHER", "HAVE_COMPILED_OPS", "COMPILED_OPS_ERROR", "COMPILED_OPS_NOTE", "noise",
           "perturb_", "apply_seeds_", "perturb_multi_", "apply_seeds_multi_", "perturb_copy_multi_",
           "apply_seeds_copy_multi_", "z_reference", "perturb_reference_", "apply_seeds_reference_",
           "perturb_multi_reference_", "apply_seeds_multi_reference_", "perturb_copy_multi_reference_",
           "apply_seeds_copy_multi_reference_", "philox4x32_10", "perturb_weights_", "apply_weights_"]
