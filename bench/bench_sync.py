"""Replay (a FedKSeed client's sync) on the default model: the project's one-pass replay vs the official style.

    python bench/bench_sync.py                     # SmolLM2-135M, float32, S = 64, 1024, 4096 seeds, both kinds
    python bench/bench_sync.py --full              # time every S in full (hours for the official style at 4096)

A sync rebuilds the global model from the pretrained weights w0 and the cumulative per-seed coefficients A:
w = w0 + sum_k A_k z_k over the S seeds with A_k != 0.
  project:  `fedkseed.sync_model`: copy w0, then one `apply_seeds_` pass per parameter over all S seeds (the
            noise of every seed generated on the fly, summed in float32, rounded once).
  official: per seed, `torch.manual_seed(seed)`, then per parameter `z = torch.normal(...)` and an out-of-place
            `p.data = p.data + a * z` (Rademacher: `torch.randint(0, 2, ...) * 2 - 1` in place of normal).
Both paths cost time proportional to S (each seed's noise is generated for every weight), so by default each is
timed on a measured number of seeds (--measure, medians of --repeats runs, the two paths interleaved) and the
time per seed is scaled to S; the table says which. With --full every S is timed in full.
The script ends with the line `sync speedup at S=1024: N.NNx` (Gaussian).
"""
import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fedkseed as fk  # noqa: E402
from bench_zo_step import timed  # noqa: E402


@torch.no_grad()
def official_style_sync(params, w0, seeds, coefs, kind):
    """The official code's way to apply seeds: global RNG per seed, a fresh noise tensor per parameter, out of place."""
    for p, p0 in zip(params, w0):
        p.data = p0.clone()
    for seed, a in zip(seeds, coefs):
        torch.manual_seed(seed)
        for p in params:
            if kind == fk.GAUSSIAN:
                z = torch.normal(mean=0, std=1, size=p.data.size(), dtype=p.data.dtype)
            else:
                z = torch.randint(0, 2, p.data.size(), dtype=p.data.dtype) * 2 - 1
            p.data = p.data + a * z


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=fk.DEFAULT_MODEL)
    ap.add_argument("--seeds", default="64,1024,4096", help="the S to report, comma-separated")
    ap.add_argument("--measure", type=int, default=32,
                    help="seeds each path is timed on (scaled to S); the project's path is also timed in full at "
                         "the smallest S when that is no more than 4x this")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--full", action="store_true", help="time every S in full instead of scaling")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fk.HAVE_COMPILED_OPS:
        sys.exit("bench_sync: the compiled ops are not built (pip install --no-build-isolation -e .)")
    model, _ = fk.load_model(args.model, "float32", "cpu")
    params, offsets = fk.trainable(model)
    w0 = [p.clone() for p in params]
    n = sum(p.numel() for p in params)
    sizes = [int(x) for x in args.seeds.split(",")]
    rng = np.random.default_rng(0)
    all_seeds = fk.candidate_seeds(0, max(sizes))
    print(f"{args.model}: {n / 1e6:.1f}M float32 weights, {torch.get_num_threads()} threads, "
          f"SIMD level {torch.ops.fedfull.simd_level()}, medians of {args.repeats}")

    def project(S, kind):
        A = np.zeros(max(sizes), dtype=np.float32)
        A[:S] = rng.normal(size=S).astype(np.float32) * 1e-6
        return lambda: fk.sync_model(params, w0, offsets, all_seeds, A, kind)

    def official(S, kind):
        coefs = [float(x) for x in rng.normal(size=S).astype(np.float32) * 1e-6]
        return lambda: official_style_sync(params, w0, all_seeds[:S], coefs, kind)

    speedup = {}
    for kind, name in ((fk.GAUSSIAN, "gaussian"), (fk.RADEMACHER, "rademacher")):
        m = min(args.measure, min(sizes))
        per_seed = {"project": [], "official": []}
        if not args.full:
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                per_seed["project"].append(timed(project(m, kind)) / m)
                per_seed["official"].append(timed(official(m, kind)) / m)
            med = {k: statistics.median(v) for k, v in per_seed.items()}
        print(f"\n{name}: per seed {'(timed on %d seeds)' % m if not args.full else ''}"
              + (f" project {med['project'] * 1e3:.1f} ms ({n / med['project'] / 1e9:.2f} G weights/s), "
                 f"official {med['official'] * 1e3:.1f} ms ({n / med['official'] / 1e9:.2f} G weights/s)"
                 if not args.full else ""))
        print(f"{'S':>6} {'project s':>10} {'official s':>11} {'speedup':>8}  how")
        for S in sizes:
            if args.full:
                tp = statistics.median(timed(project(S, kind)) for _ in range(args.repeats))
                to = statistics.median(timed(official(S, kind)) for _ in range(args.repeats))
                how = "timed in full"
            else:
                tp, to = med["project"] * S, med["official"] * S
                how = f"per-seed medians x {S}"
                if S == min(sizes) and S <= 4 * m:  # check the scaling on the project's path at the smallest S
                    full = statistics.median(timed(project(S, kind)) for _ in range(args.repeats))
                    how += f" (project timed in full at S={S}: {full:.2f} s)"
            speedup[(name, S)] = to / tp
            print(f"{S:>6} {tp:>10.2f} {to:>11.2f} {to / tp:>7.2f}x  {how}")
    if ("rademacher", 1024) in speedup:
        print(f"\nrademacher sync speedup at S=1024: {speedup[('rademacher', 1024)]:.2f}x")
    if ("gaussian", 1024) in speedup:
        print(f"sync speedup at S=1024: {speedup[('gaussian', 1024)]:.2f}x")

if __name__ == "__main__":
    main()
