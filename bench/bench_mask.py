"""What --mask saves per step and per replay: a masked pass, a masked ZO step and a masked replay against the dense
ones at 0.1%, 1% and 10% of each tensor, on the default model, in one run (the machine drifts).

    python bench/bench_mask.py                          # smollm2-135m, bfloat16 forwards, 2 threads, median of 5
    python bench/bench_mask.py --repeats 3 --seeds 64 --batch 16 --tokens 128

The weights are float32 with the forwards' bfloat16 copy (the SST-2 quick start's --compute_dtype), so a pass
writes both. Rows (seconds, the median of --repeats; ratio = dense / masked):
  pass      one perturb over the weights (`perturb`: z at the mask only, the dense bits there)
  step      one FZOO step, 4 directions (the quick start's: 5 forwards, 5 passes) on a --batch x --tokens batch
  replay    `sync_model` with --seeds seeds touched (a client's replay of A; it grows with the seeds, up to K)
The mask's rule does not change these costs, only its density: the masks here are the random rule's.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fedkseed as fk  # noqa: E402
import seedops  # noqa: E402
import tasks  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--densities", default="0.001,0.01,0.1")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=5)
parser.add_argument("--seeds", type=int, default=64, help="seeds touched in the replay")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--tokens", type=int, default=128)
args = parser.parse_args()
if not seedops.HAVE_COMPILED_OPS:
    raise SystemExit(f"fedfull_ops is not built ({seedops.COMPILED_OPS_ERROR}): pip install --no-build-isolation -e .")
torch.set_num_threads(args.threads)

model, tok = tasks.load_model(args.model, "sft")
model.eval()
w = fk.weights_of(model, seedops.RADEMACHER)
w0 = [p.clone() for p in w.tensors]
w.tensors = [p.clone() for p in w.tensors]  # float32 weights apart; the model's parameters become the bf16 copy
model.to(torch.bfloat16)
w.copies = fk.weights_of(model).tensors
for c, p in zip(w.copies, w.tensors):
    c.copy_(p)
total = sum(p.numel() for p in w0)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, len(tok), (args.batch, args.tokens), generator=g)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
seeds = fk.candidate_seeds(42, args.seeds)
A = np.random.default_rng(0).normal(0, 1e-4, args.seeds).astype(np.float32)


def timed(fn):
    fn()  # warm-up
    out = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def costs(masks):
    w.masks = masks
    step_seeds = seeds[:4]
    return {"pass": timed(lambda: fk.perturb(w, seeds[0], 1e-3)),
            "step": timed(lambda: fk.one_sided_step(model, w, batch, step_seeds, 1e-3, 1e-6, normalise=True)),
            "replay": timed(lambda: fk.sync_model(w, w0, seeds, A))}


print(f"{args.model}: {total / 1e6:.1f}M params float32 + bfloat16 forwards, batch {args.batch} x {args.tokens} "
      f"tokens, {args.threads} threads, median of {args.repeats}; replay of {args.seeds} seeds")
dense = costs(None)
print(f"  {'':>14} {'pass':>9} {'step':>9} {'replay':>9}   dense / masked: pass, step, replay")
print(f"  {'dense':>14} {dense['pass']:8.3f}s {dense['step']:8.3f}s {dense['replay']:8.3f}s")
for d in (float(x) for x in args.densities.split(",")):
    masked = costs(tasks.masks.own_mask("random", w0, 42, d))
    print(f"  {f'mask {d:.1%}':>14} {masked['pass']:8.3f}s {masked['step']:8.3f}s {masked['replay']:8.3f}s   "
          + ", ".join(f"{dense[k] / masked[k]:.1f}x" for k in ("pass", "step", "replay")))
