"""Speed of the z kernels against the baselines they replace, measured in one run (the machine drifts).

    python bench/bench_kernels.py                 # float32, 32M elements, 2 threads, median of 5
    python bench/bench_kernels.py --n 8000000 --repeats 3 --threads 1

Prints G elements/s per pass and the ratios the kernels issue targets:
  gaussian perturb_   >= 5x the MeZO-style pass (stretch 9x)
  rademacher perturb_ >= 80% of the in-place add (the memory floor)
  apply_seeds_ 16 seeds faster than 16 perturb_ calls
"""
import argparse
import statistics
import time

import torch

import seedops as F

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=32 * 2**20, help="elements (float32)")
parser.add_argument("--threads", type=int, default=2, help="torch threads")
parser.add_argument("--repeats", type=int, default=5, help="timed repeats per pass; the median is reported")
args = parser.parse_args()
if not F.HAVE_COMPILED_OPS:
    raise SystemExit(f"fedfull_ops is not built ({F.COMPILED_OPS_ERROR}): pip install --no-build-isolation -e .")
torch.set_num_threads(args.threads)
ops = torch.ops.fedfull
n = args.n
p = torch.randn(n)
other = torch.randn(n)


def mezo_pass():   # MeZO's perturb_parameters: seed the global RNG, torch.normal, out-of-place add
    torch.manual_seed(1234)
    z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
    p.data = p.data + 1e-3 * z


def at_level(level, fn):   # run fn on one CPU path (0 scalar, 1 AVX2, 2 AVX-512)
    def run():
        ops.simd_level(level)
        fn()
    return run


seeds = list(range(100, 116))
scales = [1e-3 * (-1) ** k for k in range(16)]
names = ["scalar", "AVX2", "AVX-512"]
best_level = ops.simd_level(-1)
best = names[best_level]
# name -> (function, passes it makes over the array)
benches = {"in-place add_ (memory floor)": (lambda: p.add_(other), 1), "MeZO-style pass": (mezo_pass, 1)}
for level in range(best_level, -1, -1):
    benches[f"perturb_ gaussian ({names[level]})"] = (at_level(level, lambda: ops.perturb_(p, 7, 0, 1e-3, F.GAUSSIAN)), 1)
    benches[f"perturb_ rademacher ({names[level]})"] = (at_level(level, lambda: ops.perturb_(p, 7, 0, 1e-3, F.RADEMACHER)), 1)
for kind, kname in ((F.GAUSSIAN, "gaussian"), (F.RADEMACHER, "rademacher")):
    benches[f"apply_seeds_ {kname}, 16 seeds (per seed)"] = (
        at_level(best_level, lambda kind=kind: ops.apply_seeds_(p, seeds, scales, 0, kind)), 16)
    benches[f"16 x perturb_ {kname} (per call)"] = (
        at_level(best_level, lambda kind=kind: [ops.perturb_(p, s, 0, c, kind) for s, c in zip(seeds, scales)]), 16)

# Round robin: every repeat times each pass once, so a change of load on the shared machine hits all passes
# alike and the ratios stay meaningful. Medians per pass; one untimed warm-up round first.
times = {name: [] for name in benches}
for r in range(args.repeats + 1):
    for name, (fn, passes) in benches.items():
        t0 = time.perf_counter()
        fn()
        if r:
            times[name].append((time.perf_counter() - t0) / passes)
ops.simd_level(-1)
results = {name: statistics.median(t) for name, t in times.items()}

floor, mezo = results["in-place add_ (memory floor)"], results["MeZO-style pass"]
print(f"float32, {n / 2**20:.0f}M elements, {args.threads} threads, median of {args.repeats}; "
      f"best CPU path: {best}; torch {torch.__version__}")
print(f"{'pass':44s} {'G elem/s':>9s} {'vs MeZO':>8s} {'vs add_':>8s}")
for name, sec in results.items():
    print(f"{name:44s} {n / sec / 1e9:9.3f} {mezo / sec:7.2f}x {floor / sec:7.2f}x")

gauss = mezo / results[f"perturb_ gaussian ({best})"]
rad = floor / results[f"perturb_ rademacher ({best})"]
print("\ntargets:")
print(f"  gaussian perturb_ vs MeZO-style pass: {gauss:.1f}x (target >= 5x, stretch 9x): "
      f"{'met' if gauss >= 5 else 'NOT met'}{', stretch met' if gauss >= 9 else ''}")
print(f"  rademacher perturb_ vs in-place add:  {rad:.0%} (target >= 80%): {'met' if rad >= 0.8 else 'NOT met'}")
for kname in ("gaussian", "rademacher"):
    a, b = results[f"apply_seeds_ {kname}, 16 seeds (per seed)"], results[f"16 x perturb_ {kname} (per call)"]
    print(f"  apply_seeds_ 16 {kname} seeds vs 16 perturb_ calls: {b / a:.2f}x faster "
          f"({16 * a * 1e3:.0f} ms vs {16 * b * 1e3:.0f} ms): {'met' if a < b else 'NOT met'}")
