"""CUDA: the seed ops in GB/s next to the device's own copy bandwidth, and one pass over a model's parameters.

    python bench/bench_cuda.py                      # cuda:0, 2^28 elements (1 GiB of float32), medians of 20
    python bench/bench_cuda.py --n 67108864 --repeats 50

Prints, per dtype and kind, the bandwidth of `perturb_` (each element read and written once: 2 x n x itemsize
bytes per pass) and of `apply_seeds_` with 16 seeds, as a fraction of a device-to-device copy of the same bytes
(`Tensor.copy_`, the achievable memory bandwidth), at offset 0 (the vector path: every weights_of() offset of a model
whose sizes are multiples of 4 is one) and at offset 3 (the element-by-element fallback); then one pass over the
default model's parameters with one `perturb_multi_` call against one `perturb_` call per parameter, at the
model's own offsets and with every offset shifted by 2 (a model with a 2-element parameter first, e.g. a 2-label
classifier bias). Each row says which path its tensors take: the kernels use one 4-element vector access where
the element's index in its tensor and its global index agree mod 4 and the pointer is aligned (csrc add4).
Target on an H100: float32 perturb_ >= 80% of the copy bandwidth. Times come from CUDA events, after a warm-up.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fedkseed as fk
import seedops  # noqa: E402
import tasks  # noqa: E402


def cuda_time(fn, repeats):
    """Median seconds of fn() over `repeats` calls, by CUDA events (one warm-up call first)."""
    fn()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return statistics.median(out)


def vector_path(p, offset):
    """Whether the CUDA kernels take the vector path for tensor p at global offset `offset` (the rule of add4):
    the counter's first element 4 * (offset // 4) must fall on a 4-element boundary of an aligned pointer."""
    elements, rest = divmod(p.data_ptr(), p.element_size())
    return rest == 0 and (elements - offset) % 4 == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2**28, help="elements of the test tensor")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default=fk.DEFAULT_MODEL, help="model whose parameters the multi-tensor pass covers")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not seedops.HAVE_COMPILED_OPS:
        sys.exit("bench_cuda: needs a CUDA device and the compiled ops built with CUDA")
    ops, dev = torch.ops.fedfull, torch.device(args.device)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, n = {args.n:,}, medians of {args.repeats}")
    seeds, scales = list(range(100, 116)), [1e-3 * (-1) ** k for k in range(16)]
    print(f"{'dtype':9} {'pass':44} {'ms':>8} {'GB/s':>8} {'of copy':>8}")
    for dtype in (torch.float32, torch.bfloat16):
        p = torch.randn(args.n, device=dev).to(dtype)
        q = torch.empty_like(p)
        nbytes = 2 * p.numel() * p.element_size()  # read + write
        copy = cuda_time(lambda: q.copy_(p), args.repeats)
        rows = [("copy_ (memory bandwidth)", copy)]
        for off in (0, 3):
            path = "vector" if vector_path(p, off) else "scalar"
            for kind, kname in ((fk.GAUSSIAN, "gaussian"), (fk.RADEMACHER, "rademacher")):
                rows.append((f"perturb_ {kname}, offset {off} ({path})",
                             cuda_time(lambda: ops.perturb_(p, 7, off, 1e-3, kind), args.repeats)))
                rows.append((f"apply_seeds_ {kname} x16, offset {off} ({path})", cuda_time(
                    lambda: ops.apply_seeds_(p, seeds, scales, off, kind), args.repeats)))
        for name, t in rows:
            print(f"{str(dtype).split('.')[1]:9} {name:44} {t * 1e3:8.3f} {nbytes / t / 1e9:8.1f} {copy / t:7.0%}")
        p = q = None  # free the device memory before the next dtype
    model, _ = tasks.load_model(args.model, "sft", device=str(dev))
    weights = fk.weights_of(model)
    params, offsets = weights.tensors, weights.offsets
    total = sum(x.numel() for x in params)
    for shift, what in ((0, "its own offsets"), (2, "offsets shifted by 2")):
        offs = [o + shift for o in offsets]
        vec = sum(x.numel() for x, o in zip(params, offs) if vector_path(x, o))
        print(f"{args.model} at {what}: {sum(vector_path(x, o) for x, o in zip(params, offs))} of {len(params)} "
              f"tensors ({vec / total:.0%} of the weights) on the vector path")
        for kind, kname in ((fk.GAUSSIAN, "gaussian"), (fk.RADEMACHER, "rademacher")):
            one = cuda_time(lambda: ops.perturb_multi_(params, 7, offs, 1e-3, kind), args.repeats)
            each = cuda_time(lambda: [ops.perturb_(x, 7, o, 1e-3, kind) for x, o in zip(params, offs)], args.repeats)
            print(f"  {len(params)} tensors, {total / 1e6:.1f}M weights, {kname}: one perturb_multi_ {one * 1e3:.3f} ms "
                  f"({2 * total * 4 / one / 1e9:.0f} GB/s) vs {len(params)} perturb_ calls {each * 1e3:.3f} ms "
                  f"({each / one:.2f}x)")


if __name__ == "__main__":
    main()
