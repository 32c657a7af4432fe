"""Byzantine FedKSeed clients against the default robust aggregation (`--g_bound 10 --g_window 10`): what it costs an
honest run and what 1 or 2 hostile clients of a round's 4 can do to the held-out loss, on the default model.

    python bench/byzantine.py                 # 5 runs in out/byzantine: about 45 minutes alone on 2 CPU cores
    python bench/byzantine.py --runs honest,huge1   # some of them

The Dolly quick start's flags (docs/fedkseed.md), with 4 of the 10 clients sampled a round (`-m 0.4`) and 50 steps
each, 2 rounds; every run evaluates the same 48 held-out examples, so each attacked run is compared with the honest
run by a 95% paired bootstrap interval over the same examples. The hostile clients are the first 1 or 2 sampled in
each round (equal data sizes here, so 1 or 2 of 4 is a quarter or a half of the round's weight); their uploads are
well-formed and on exactly the draws the protocol assigns them, so `check_upload` accepts them:
- `honest`: every client honest (the defaults);
- `huge1`, `huge2`: 1 or 2 clients upload g = 1e30 on each of their seeds;
- `zero2`: 2 clients upload g = 0 (they pull the median |g|, and so the bound, down on the honest clients);
- `unbounded1`: `huge1` with `--g_bound 0` (what the bound prevents), 1 round of 5 steps.
Each run's metrics rows carry `scalars_clipped`, printed per round.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fedkseed as fk  # noqa: E402
import tasks  # noqa: E402

FLAGS = ("--dataset dolly --num_clients 10 -m 0.4 --rounds 2 --local_steps 50 --lr 2e-6 --zo_eps 1e-3 -K 1024 "
         "--max_length 256 --eval_samples 48 --eval_every 1 --rouge_samples 0").split()


class Byzantine(tasks.Transport):
    """One process; the first `count` clients sampled in each round replace their scalars by `value` (same seeds,
    same size)."""

    def __init__(self, count, value, device="cpu"):
        super().__init__(device)
        self.count, self.value = count, value

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        got = super().exchange(fn, run, rnd, sent, clients, widths, keys, tags)
        for bad in clients[:self.count]:
            n, idx, g = fk.decode_upload(got[bad][0], run.args.K)
            got[bad] = (fk.encode_upload(n, idx, np.full(len(g), self.value), run.args.K), got[bad][1])
            print(f"round {rnd}: client {bad} uploads g = {self.value:g} on its {len(idx)} assigned seeds", flush=True)
        return got


RUNS = {"honest": ([], None), "huge1": ([], (1, 1e30)), "huge2": ([], (2, 1e30)), "zero2": ([], (2, 0.0)),
        "unbounded1": (["--g_bound", "0", "--rounds", "1", "--local_steps", "5"], (1, 1e30))}


def change(out):
    """-> (delta, lo, hi, last per-example dict) of a run's held-out loss, round 0 to its last round."""
    kept = json.loads((out / "heldout_examples.json").read_text())
    first, last = ({k: kept[e][k] for k in ("loss_sum", "tokens")} for e in ("first", "last"))
    return (*tasks.paired_interval(first, last, tasks.token_weighted_loss), last)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "byzantine"))
    p.add_argument("--runs", default=",".join(RUNS))
    a = p.parse_args()
    out, names = Path(a.out), a.runs.split(",")
    for name in names:
        flags, attack = RUNS[name]
        if not (out / name / "heldout_examples.json").is_file() or not (out / name / "model").is_dir():
            print(f"== {name}: {' '.join(FLAGS + flags)}", flush=True)
            args = fk.parse_args(FLAGS + flags + ["--output_dir", str(out / name)])
            fk.train(args, Byzantine(*attack, args.device) if attack else None)
    res = {name: change(out / name) for name in names}
    print("| run | held-out change | 95% paired interval | scalars clipped (per round) | minus honest (paired) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        d, lo, hi, last = res[name]
        clipped = [r.get("scalars_clipped") for r in tasks.read_run_jsonl(out / name / "metrics.jsonl")][1:]
        gap = ("–" if name == "honest" or "honest" not in res else
               "{:+.4f} [{:+.4f}, {:+.4f}]".format(*tasks.paired_interval(res["honest"][3], last,
                                                                         tasks.token_weighted_loss)))
        print(f"| {name} | {d:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {', '.join(map(str, clipped))} | {gap} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
