"""Choose FedKSeed's knobs on validation data: run fedkseed.py over a grid and score every point on --val_samples.

    python bench/sweep_fedkseed.py --grid lr=5e-6,1e-5,2e-5 --grid zo_eps=1e-3 --out runs/sweep -- \
        --num_clients 10 -m 0.1 --rounds 3 --local_steps 100 -K 1024 --max_length 256 --val_samples 100 \
        --eval_samples 8 --rouge_samples 0 --eval_every 1 --compute_dtype bfloat16

Every point is one `fedkseed.py` run (its own process, its own folder under --out) with the flags after `--` plus
that point's values. A point is scored by its last round's validation accuracy (classification: `val_accuracy`),
else its validation loss (`val_loss`): metrics.jsonl's figures on examples carved from the training data, never
the held-out set. Each is printed with its validation curve, its forward passes (per client step: 2 for the
two-point estimator, n + 1 for `--estimator one_sided|fzoo --directions n`) and its minutes. A point whose folder
already holds a finished run is read, not rerun, so a sweep can grow.
The held-out loss is never printed here: choosing on it would make the reported held-out figures optimistic.
The table goes to stdout and to <out>/sweep.json.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def forwards_per_step(flags):
    """Forward passes one client step costs under these fedkseed flags."""
    def value(name, default):
        return flags[flags.index(name) + 1] if name in flags else default
    if value("--estimator", "two_point") in ("one_sided", "fzoo"):  # n directions share one forward at w
        return int(value("--directions", "1")) + 1
    return 2  # the two-point estimator takes one direction a step


def run_point(flags, folder):
    metrics = folder / "metrics.jsonl"
    done = folder / "model" / "config.json"  # finish() exports the model last: its presence means the run ended
    t = None
    if not done.exists():
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "fedkseed.py"), *flags, "--output_dir", str(folder)], check=True,
                       stdout=open(folder.parent / f"{folder.name}.log", "w"), stderr=subprocess.STDOUT)
        t = (time.time() - t0) / 60
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    key = "val_accuracy" if any(r.get("val_accuracy") is not None for r in rows) else "val_loss"
    curve = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    if not curve:
        raise SystemExit(f"{folder}: no val_loss in metrics.jsonl (add --val_samples N to the base flags)")
    return key, curve, t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2",
                    help="a fedkseed flag (without --) and its values; repeat for a product grid")
    ap.add_argument("--out", default="runs/sweep", help="one folder per point, and sweep.json")
    ap.add_argument("base", nargs=argparse.REMAINDER, help="-- then the fedkseed flags every point shares")
    a = ap.parse_args()
    base = a.base[1:] if a.base[:1] == ["--"] else a.base
    bad = [g for g in a.grid if "=" not in g or not g.split("=", 1)[1]]
    if bad:
        ap.error(f"--grid {bad[0]}: expected FLAG=V1,V2 (e.g. lr=1e-6,2e-6)")
    axes = [(k, v.split(",")) for k, v in (g.split("=", 1) for g in a.grid)]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for values in itertools.product(*[v for _, v in axes]):
        point = dict(zip([k for k, _ in axes], values))
        name = "_".join(f"{k}{v}" for k, v in point.items()) or "base"
        flags = base + [x for k, v in point.items() for x in (f"--{k}", v)]
        folder = out / name
        folder.mkdir(exist_ok=True)
        key, curve, minutes = run_point(flags, folder)
        cfg = json.loads((folder / "config.json").read_text())
        fw = forwards_per_step(flags) * cfg["local_steps"] * cfg["sampled_per_round"] * cfg["rounds"]
        row = {"point": point, "score": key, key: curve[-1][1], "val_curve": curve, "forwards": fw, "minutes": minutes}
        table.append(row)
        print(f"{name:40s} {key} {curve[0][1]:.4f} -> {curve[-1][1]:.4f} (change {curve[-1][1] - curve[0][1]:+.4f}); "
              f"{fw:,} forwards" + (f"; {minutes:.1f} min" if minutes else " (read)"), flush=True)
    sign = -1 if table[0]["score"] == "val_accuracy" else 1  # the highest accuracy, the lowest loss
    best = min(table, key=lambda r: sign * r[r["score"]])
    print(f"best on validation: {best['point']} ({best['score']} {best[best['score']]:.4f})")
    (out / "sweep.json").write_text(json.dumps({"base": base, "points": table, "best": best["point"]}, indent=1))


if __name__ == "__main__":
    main()
