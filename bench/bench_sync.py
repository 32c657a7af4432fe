"""Replay (a FedKSeed client's sync) on the default model: the project's one-pass replay vs the official style.

    python bench/bench_sync.py                     # SmolLM2-135M, float32, S = 64, 1024, 4096 seeds, both kinds
    python bench/bench_sync.py --full              # time every S in full (hours for the official style at 4096)

A sync rebuilds the global model from the pretrained weights w0 and the cumulative per-seed coefficients A:
w = w0 + sum_k A_k z_k over the S seeds with A_k != 0.
  project:  `fedkseed.sync_model`: copy w0, then one `apply_seeds_` pass per parameter over all S seeds (the
            noise of every seed generated on the fly, summed in float32, rounded once).
  official: per seed, `torch.manual_seed(seed)`, then per parameter `z = torch.normal(...)` and an out-of-place
            `p.data = p.data + a * z` (Rademacher: `torch.randint(0, 2, ...) * 2 - 1` in place of normal).
Both paths cost a fixed part (the copy of w0) plus time proportional to S. By default the project's path is timed
in full at every S up to --full_max (1024), the official style at two small seed counts (--measure), and a time not
measured in full is read off the straight line through a path's two largest timed S; the table says which.
Medians of --repeats runs, the two paths interleaved. With --full every S is timed in full, both paths.
The script ends with the line `sync speedup at S=1024: N.NNx` (Gaussian).
"""
import argparse
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fedkseed as fk
import seedops  # noqa: E402
import tasks  # noqa: E402
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


def fit_line(points):
    """Least-squares t = a + b S through (S, t) points: a is the fixed cost (the copy of w0), b the cost per seed."""
    S = np.array([p[0] for p in points], dtype=float)
    t = np.array([p[1] for p in points], dtype=float)
    b, a = np.polyfit(S, t, 1)
    return a, b


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=fk.DEFAULT_MODEL)
    ap.add_argument("--seeds", default="64,1024,4096", help="the S to report, comma-separated")
    ap.add_argument("--measure", default="8,32",
                    help="the two seed counts the official style is timed at; its time at S is the line through them")
    ap.add_argument("--full_max", type=int, default=1024,
                    help="the project's path is timed in full at every S up to this; larger S from the line through "
                         "its two largest timed S")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--full", action="store_true", help="time every S in full, both paths (hours at S = 4096)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not seedops.HAVE_COMPILED_OPS:
        sys.exit("bench_sync: the compiled ops are not built (pip install --no-build-isolation -e .)")
    model, _ = tasks.load_model(args.model, "sft")
    weights = fk.weights_of(model)
    params, offsets = weights.tensors, weights.offsets
    w0 = [p.clone() for p in params]
    n = sum(p.numel() for p in params)
    sizes = sorted(int(x) for x in args.seeds.split(","))
    measure = sorted(int(x) for x in args.measure.split(","))
    full_max = max(sizes) if args.full else args.full_max
    project_sizes = [S for S in sizes if S <= full_max] or sizes[:1]
    official_sizes = sizes if args.full else measure
    rng = np.random.default_rng(0)
    all_seeds = fk.candidate_seeds(0, max(sizes + measure))
    print(f"{args.model}: {n / 1e6:.1f}M float32 weights, {torch.get_num_threads()} threads, "
          f"SIMD level {torch.ops.fedfull.simd_level()}, medians of {args.repeats}")

    def project(S, kind):
        A = np.zeros(len(all_seeds), dtype=np.float32)
        A[:S] = rng.normal(size=S).astype(np.float32) * 1e-6
        return lambda: fk.sync_model(fk.SimpleNamespace(tensors=params, offsets=offsets, kind=kind, copies=None, masks=None), w0,
                                     all_seeds, A)

    def official(S, kind):
        coefs = [float(x) for x in rng.normal(size=S).astype(np.float32) * 1e-6]
        return lambda: official_style_sync(params, w0, all_seeds[:S], coefs, kind)

    speedup = {}
    for kind, name in ((fk.GAUSSIAN, "gaussian"), (fk.RADEMACHER, "rademacher")):
        times = {("project", S): [] for S in project_sizes} | {("official", S): [] for S in official_sizes}
        for _ in range(args.repeats):  # interleaved, so drift hits both paths alike
            for S in project_sizes:
                times[("project", S)].append(timed(project(S, kind)))
            for S in official_sizes:
                times[("official", S)].append(timed(official(S, kind)))
        med = {k: statistics.median(v) for k, v in times.items()}
        line = {path: fit_line([(S, t) for (p, S), t in med.items() if p == path][-2:])
                for path in ("project", "official")}
        print(f"\n{name}: timed medians " + ", ".join(f"{p} S={S}: {t:.2f} s" for (p, S), t in med.items()))
        for path, (a, b) in line.items():
            print(f"  {path}: {b * 1e3:.1f} ms per seed ({n / b / 1e9:.2f} G weights/s) + {a:.2f} s fixed")
        print(f"{'S':>6} {'project s':>10} {'official s':>11} {'speedup':>8}  how")
        for S in sizes:
            how = []
            t = {}
            for path in ("project", "official"):
                if (path, S) in med:
                    t[path] = med[(path, S)]
                    how.append(f"{path} timed")
                else:
                    a, b = line[path]
                    t[path] = a + b * S
                    how.append(f"{path} from its line")
            speedup[(name, S)] = t["official"] / t["project"]
            print(f"{S:>6} {t['project']:>10.2f} {t['official']:>11.2f} {speedup[(name, S)]:>7.2f}x  {', '.join(how)}")
    if ("rademacher", 1024) in speedup:
        print(f"\nrademacher sync speedup at S=1024: {speedup[('rademacher', 1024)]:.2f}x")
    if ("gaussian", 1024) in speedup:
        print(f"sync speedup at S=1024: {speedup[('gaussian', 1024)]:.2f}x")


if __name__ == "__main__":
    main()
