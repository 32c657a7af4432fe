"""One Byzantine FedKSeed client of four on the default model: what `--clip_norm` leaves of its attack.

    python bench/byzantine.py                 # 3 runs in out/byzantine: about 30 minutes alone on 2 CPU cores

The Dolly quick start's flags (README), with 4 of the 10 clients sampled a round (`-m 0.4`, so the round's median
client norm is an honest one) and 50 steps each (the quick start's 400 steps in all), and `--clip_norm 2`:
- `honest`: every client honest;
- `attacked`: in every round the first sampled client uploads g = 1e30 on each of its assigned seeds (a finite
  float32 on exactly the draws the protocol gives it, so `check_upload` accepts it: only the norm clip bounds it);
- `unclipped`: the same attack without `--clip_norm`, one round of 5 steps (what the clip prevents).
Every run evaluates the same 48 held-out examples, so the attacked run's change is compared with the honest run's
95% paired bootstrap interval over the same examples. It prints, per round, the clients' norms and the bound.
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
    """One process; the first client sampled in each round replaces its scalars by g = 1e30 (same seeds, same size)."""

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        got = super().exchange(fn, run, rnd, sent, clients, widths, keys, tags)
        bad = clients[0]
        n, idx, g = fk.decode_upload(got[bad][0], run.args.K)
        got[bad] = (fk.encode_upload(n, idx, np.full(len(g), 1e30), run.args.K), got[bad][1])
        print(f"round {rnd}: client {bad} uploads g = 1e30 on its {len(idx)} assigned seeds", flush=True)
        return got


def watch_clip():
    """Print each round's client norms and bound as clip_client_norms sees them."""
    clip = fk.clip_client_norms

    def watched(decoded, K, c):
        norms = [float(np.linalg.norm(np.bincount(i, weights=g.astype(np.float64), minlength=K)))
                 for _, i, g in decoded]
        bound = c * float(np.median(norms))
        print(f"clip_norm: client norms {', '.join(f'{x:.4g}' for x in norms)}; bound {bound:.4g}; scaled "
              f"{sum(x > bound for x in norms)} of {len(norms)}", flush=True)
        return clip(decoded, K, c)
    fk.clip_client_norms = watched


def change(out):
    """-> (delta, lo, hi, last per-example dict) of a run's held-out loss, round 0 to its last round."""
    kept = json.loads((out / "heldout_examples.json").read_text())
    first, last = ({k: kept[e][k] for k in ("loss_sum", "tokens")} for e in ("first", "last"))
    return (*tasks.paired_interval(first, last, tasks.token_weighted_loss), last)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "out" / "byzantine"))
    p.add_argument("--clip_norm", type=float, default=2.0)
    a = p.parse_args()
    out = Path(a.out)
    watch_clip()
    runs = {"honest": (FLAGS + ["--clip_norm", str(a.clip_norm)], None),
            "attacked": (FLAGS + ["--clip_norm", str(a.clip_norm)], Byzantine()),
            "unclipped": (FLAGS + ["--rounds", "1", "--local_steps", "5"], Byzantine())}
    for name, (flags, transport) in runs.items():
        if not (out / name / "heldout_examples.json").is_file() or not (out / name / "model").is_dir():
            print(f"== {name}: {' '.join(flags)}", flush=True)
            fk.train(fk.parse_args(flags + ["--output_dir", str(out / name)]), transport)
    res = {name: change(out / name) for name in runs}
    d, lo, hi, honest_last = res["honest"]
    print(f"honest  (clip_norm {a.clip_norm:g}): change {d:+.4f}, 95% paired interval [{lo:+.4f}, {hi:+.4f}]")
    d2, lo2, hi2, attacked_last = res["attacked"]
    inside = lo <= d2 <= hi
    print(f"attacked (clip_norm {a.clip_norm:g}): change {d2:+.4f} [{lo2:+.4f}, {hi2:+.4f}]: "
          f"{'inside' if inside else 'outside'} the honest run's interval")
    gap = tasks.paired_interval(honest_last, attacked_last, tasks.token_weighted_loss)
    print(f"attacked - honest at the end: {gap[0]:+.4f}, 95% paired interval [{gap[1]:+.4f}, {gap[2]:+.4f}]")
    d3 = res["unclipped"][0]
    print(f"attacked without the clip (1 round, 5 steps): change {d3:+.4f}")
    return 0 if inside else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
