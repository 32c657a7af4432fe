"""Regenerate docs/RESULTS.md from real runs: every method next to its baselines, with bytes, memory, time and spreads.

    python bench/results.py --jobs 2         # the full CPU set, two runs at a time on 1 core each, then the page
    python bench/results.py --collect        # no training: the page from the runs already in --runs
    python bench/results.py --quick --sft_model M --glue_model G --dolly F --mrpc D --runs R --page P   # smoke

Each run is one of the three scripts, called with fixed flags (printed in the page) into `--runs/<name>/`; a run
whose metrics.jsonl already reaches its last round is collected, not run again. Then each run's exported model
(`<run>/model/`) is evaluated again here, example by example, with the scripts' own metric functions; the
re-evaluation must reproduce the number the run logged (checked, within 2e-4), which makes every figure in the
page traceable to a metrics.jsonl, and gives the per-example values the spreads need:

- spread: a 95% percentile bootstrap interval over the evaluation examples (2,000 resamples, one seed per run),
  and for a method, the interval of its difference from the baseline on the same resampled examples (paired):
  zero-shot for Dolly, the majority class for MRPC. Runs are single-seed: the interval says how much the
  evaluation sample could move a number, not how much another training seed would.
- budgets are matched by training examples seen: every Dolly method sees 256 examples (FedKSeed: 256 ZO steps of
  one example; the AdamW methods: 128 steps of two), every MRPC method 9,216 (FedCyBGD: 144 steps of 64 at its
  GLUE defaults; FedAvg: 576 of 16), every SST-2 method 1,536 (96 steps of 16; a ZO step costs forwards only, so
  the SST-2 table shows each run's client seconds too).
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

RESAMPLES = 2000
# SST-2's budget and knobs (strings: they go on command lines). The lrs were chosen on validation accuracy
# (docs/fedkseed.md, "Prompt-based classification"); the rounds are the README quick start's.
SST_ROUNDS, SST_STEPS, SST_FZOO_N = "3", "16", "4"
SST_LR_2P, SST_LR_FZOO = "1e-5", "1e-3"
# the longest FedKSeed SST-2 run that fits in 60 minutes: the README quick start's flags over more rounds (its rounds
# from the quick start's measured minutes a round; the page shows the minutes it took)
SST_LONG_ROUNDS, SST_LONG_EVERY, SST_LONG_FLAGS = "30", "10", ["--lr_scheduler", "cosine"]
DECOMFL = "DeComFL (OPT-125m, its published results: 57 / 71 / 81 / 83-85% SST-2 test accuracy after 24 / 99 / 299 / 650+ rounds)"
# bench/dolly_long.py writes its section between these markers; write_page keeps that section as it is
LONG_BEGIN, LONG_END = "<!-- dolly_long: written by bench/dolly_long.py -->", "<!-- /dolly_long -->"


# ----------------------------------------------------------------------------------------------------
# the run set: (name, table, label, script, flags)
# ----------------------------------------------------------------------------------------------------
def run_set(a):
    """The fixed runs. Dolly: 200 clients (label-Dirichlet 0.5 over the 7 training categories), 4 per round, 4 rounds;
    MRPC: 6 clients, 3 rounds, under each split. --quick shrinks every budget to seconds on a tiny model."""
    q = a.quick
    dolly = ["--data_path", a.dolly, "--model", a.sft_model, "--max_length", "48" if q else "256",
             "--eval_samples", str(a.eval_samples), "--max_new_tokens", "4" if q else "64", "--seed", "42"]
    fed = ["--num_clients", "4" if q else "200", "-m", "0.5" if q else "0.02", "--rounds", "2" if q else "4"]
    zo = ["--lr", "2e-6", "--zo_eps", "1e-3", "-K", "64" if q else "4096", "--eval_every", "1",
          "--rouge_at_start"]  # the zero-shot row's Rouge-L is the FedKSeed run's round 0
    zo_steps, sgd_steps = ("2", "1") if q else ("16", "8")  # examples per client per round: 16 (2 in --quick)
    runs = [
        ("fedkseed", "dolly", "FedKSeed", "fedkseed.py", dolly + fed + zo + ["--local_steps", zo_steps]),
        ("fedkseed-pro", "dolly", "FedKSeed-Pro", "fedkseed.py", dolly + fed + zo + ["--local_steps", zo_steps,
                                                                                    "--bias_sampling"]),
        ("mezo", "dolly", "centralized MeZO (FedKSeed, one client with all data)", "fedkseed.py",
         dolly + zo + ["--num_clients", "1", "-m", "1", "--rounds", "2" if q else "4",
                       "--local_steps", str(int(zo_steps) * (2 if q else 4))]),  # the federation's steps per round
        ("fedcybgd", "dolly", "FedCyBGD", "fedcybgd.py",
         ["--task", "sft"] + dolly + ["--num_clients", "2" if q else "4", "--rounds", "2" if q else "4",
                                      "--local_steps", sgd_steps, "--batch_size", "2", "--eval_every", "2"]),
        ("fedavg", "dolly", "FedAvg (full)", "fedavg.py",
         ["--task", "sft"] + dolly + fed + ["--local_steps", sgd_steps, "--batch_size", "2", "--eval_every", "2"]),
        ("fedit", "dolly", "FedIT (LoRA)", "fedavg.py",
         ["--task", "sft", "--method", "lora"] + dolly + fed + ["--local_steps", sgd_steps, "--batch_size", "2",
                                                               "--eval_every", "2"]),
    ]
    # MRPC: FedCyBGD at its GLUE defaults (the official regime: 24 clients, batch 64, 2 steps a turn = one client's
    # share of the data, lr 4e-4 linear to 0, spelled out below so the page shows them); FedAvg and the centralized run
    # see the same 9,216 examples in steps of 16
    glue = ["--task", "glue", "--dataset", "mrpc", "--data_path", a.mrpc, "--model", a.glue_model, "--seed", "42",
            "--max_length", "64" if q else "128", "--eval_samples", "0", "--rounds", "1" if q else "3"]
    cybgd = ["--num_clients", "2" if q else "24", "--batch_size", "4" if q else "64", "--local_steps", "1" if q else "2"]
    avg_steps = "1" if q else "32"  # 6 clients x 32 steps x 16 = 24 x 2 x 64 examples a round
    for split in ("iid",):  # label skew (dir0.5) has its own page, docs/label-skew.md
        runs += [(f"mrpc-{split}-fedcybgd", f"mrpc-{split}", "FedCyBGD (its default stream)", "fedcybgd.py",
                  glue + cybgd),
                 (f"mrpc-{split}-fedavg", f"mrpc-{split}", "FedAvg (full)", "fedavg.py",
                  glue + ["--iid", split, "--num_clients", "2" if q else "6", "-m", "1", "--batch_size",
                          "4" if q else "16", "--local_steps", avg_steps])]
    runs.append(("mrpc-centralized", "mrpc", "centralized fine-tuning (fedavg.py, one client)", "fedavg.py",
                 glue + ["--num_clients", "1", "-m", "1", "--batch_size", "4" if q else "16",
                         "--local_steps", str(int(avg_steps) * (2 if q else 6))]))
    # SST-2, prompt-based (tasks/prompts.py): the README's quick start federation (10 iid clients, 2 a round, batch
    # 16), every method seeing the same examples: SST_STEPS steps of 16 per client and round. The ZO runs' forwards
    # differ (two-point 2 a step, FZOO n + 1): the table shows each run's client seconds beside its examples.
    sst = ["--dataset", "sst2", "--data_path", a.sst2, "--model", a.sft_model, "--seed", "42", "--max_length",
           "32" if q else "128", "--val_samples", "8" if q else "200", "--eval_samples", "8" if q else "0",
           "--batch_size", "2" if q else "16", "--eval_every", "2" if q else SST_ROUNDS, "--iid", "iid"]
    sst_fed = ["--num_clients", "4" if q else "10", "-m", "0.5" if q else "0.2", "--rounds", "2" if q else SST_ROUNDS]
    steps = "1" if q else SST_STEPS
    zo = ["-K", "64" if q else "1024", "--zo_eps", "1e-3", "--compute_dtype", "bfloat16", "--local_steps", steps]
    runs += [
        ("sst2-fedkseed", "sst2", "FedKSeed (two-point)", "fedkseed.py", sst + sst_fed + zo + ["--lr", SST_LR_2P]),
        ("sst2-fedkseed-fzoo", "sst2", f"FedKSeed (FZOO, n = {SST_FZOO_N})", "fedkseed.py",
         sst + sst_fed + zo + ["--estimator", "fzoo", "--directions", SST_FZOO_N, "--lr", SST_LR_FZOO]),
        ("sst2-fedkseed-pro", "sst2", "FedKSeed-Pro (two-point)", "fedkseed.py",
         sst + sst_fed + zo + ["--lr", SST_LR_2P, "--bias_sampling"]),
        ("sst2-fedit", "sst2", "FedIT (LoRA)", "fedavg.py",
         ["--task", "prompt", "--method", "lora"] + sst + sst_fed + ["--local_steps", steps]),
        ("sst2-fedavg", "sst2", "FedAvg (full)", "fedavg.py", ["--task", "prompt"] + sst + sst_fed +
         ["--local_steps", steps]),
        ("sst2-centralized", "sst2", "centralized fine-tuning (fedavg.py, one client)", "fedavg.py",
         ["--task", "prompt"] + sst + ["--num_clients", "1", "-m", "1", "--rounds", "2" if q else SST_ROUNDS,
                                       "--local_steps", str(int(steps) * 2)]),  # the 2 clients' steps
    ]
    runs.append(("sst2-fedkseed-long", "long", "FedKSeed (FZOO) for as long as 60 minutes allow", "fedkseed.py",
                 without(sst + sst_fed + zo, "--eval_every", "--rounds")
                 + ["--rounds", "2" if q else SST_LONG_ROUNDS, "--eval_every", "1" if q else SST_LONG_EVERY,
                    "--estimator", "fzoo", "--directions", SST_FZOO_N, "--lr", SST_LR_FZOO, *SST_LONG_FLAGS]))
    return runs


def without(argv, *names):
    """argv less the flags `names` and their values."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in names:
            skip = True
        else:
            out.append(x)
    return out


def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def read_metrics(folder):
    path = folder / "metrics.jsonl"
    return tasks.read_run_jsonl(path)


def finished(folder, argv):
    rows = read_metrics(folder)
    return bool(rows) and rows[-1]["round"] == int(flag(argv, "--rounds")) and (folder / "model" / "config.json").is_file()


def say(line, lock=threading.Lock()):
    """One whole line at a time: with --jobs the runs report from several threads."""
    with lock:
        print(line, flush=True)


def train(name, script, argv, runs_dir, env, jobs=1):
    """Run one script to the end (resuming a run that was cut off), its output into <runs>/<name>/stdout.log."""
    folder = runs_dir / name
    if finished(folder, argv):
        say(f"{name}: finished earlier, collected")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if read_metrics(folder) else []
    cmd = [sys.executable, str(ROOT / script), *argv, "--output_dir", str(folder), *resume]
    say(f"{name}: {shlex.join(cmd[1:])}")
    t = time.time()
    with open(folder / "stdout.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        return f"{name} failed (exit {rc}); see {folder / 'stdout.log'}"
    # the wall time of the whole command (model loading included), kept for a page written later by --collect
    wall = (json.loads((folder / "wall.json").read_text())["seconds"] if (folder / "wall.json").is_file() else 0.0)
    tasks.write_atomic(folder / "wall.json", json.dumps({"seconds": wall + time.time() - t,
                                                         "date": datetime.date.today().isoformat(), "jobs": jobs,
                                                         "threads": env.get("OMP_NUM_THREADS")}))
    say(f"{name}: {time.time() - t:.0f} s")
    return None


# ----------------------------------------------------------------------------------------------------
# evaluation, example by example, with the scripts' own functions
# ----------------------------------------------------------------------------------------------------
def dolly_examples(a):
    data = tasks.load_instruction_data("dolly", a.dolly, num_clients=1, iid="iid", seed=42)
    return tasks.subsample(data.test, a.eval_samples, 42)  # the scripts' eval subset (tasks.subsample, same seed)


def eval_dolly(model_name, examples, argv):
    """-> {"loss_sum": [...], "tokens": [...], "rouge": [...]}, one entry per example."""
    model, tok = tasks.load_model(model_name, "sft")
    model.eval()
    tokenized = tasks.tokenize_examples(tok, examples, int(flag(argv, "--max_length")), log=None)
    sums, counts = tasks.heldout_token_losses(model, tokenized, tok.pad_token_id)
    texts = tasks.heldout_generations(model, tok, tokenized, int(flag(argv, "--max_new_tokens")))
    return {"loss_sum": sums, "tokens": counts, "rouge": tasks.rouge_l_scores(texts, [e["target"] for e in examples])}


def eval_mrpc(model_name, a, argv):
    """-> {"pred": [...], "label": [...]} over the whole dev set."""
    model, tok = tasks.load_model(model_name, "glue", num_labels=2)
    model.eval()
    flags = SimpleNamespace(task="glue", dataset="mrpc", data_path=a.mrpc, iid="iid", seed=int(flag(argv, "--seed")),
                            max_length=int(flag(argv, "--max_length")), eval_samples=int(flag(argv, "--eval_samples")),
                            val_samples=0)
    _, _, dev = tasks.load_task_data(flags, tok, 1)  # the dev set as the scripts encode it
    preds, _ = tasks.glue_predictions(model, tok, dev, "cpu")
    return {"pred": [int(p) for p in preds], "label": [e["labels"] for e in dev]}


def run_examples(folder, which, row):
    """A run's own per-example held-out values (heldout_examples.json: "first" is round 0, "last" the last
    evaluation), checked to be of row's round and to give row's accuracy."""
    kept = json.loads((folder / "heldout_examples.json").read_text())[which]
    if kept["round"] != row["round"]:
        sys.exit(f"results: {folder.name}: heldout_examples.json's {which} is round {kept['round']}, not {row['round']}")
    check(f"{folder.name} round {row['round']}", "accuracy", float(np.mean(kept["correct"])), row["accuracy"])
    return {"correct": kept["correct"]}


def portable(arg):
    """A path of this machine as the page shows it: relative to the repository where it lies inside, else a
    placeholder (<DIR>, for the folder's name) -- the page must not name another machine's folders."""
    if not os.path.isabs(arg):
        return arg
    path = Path(arg).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else f"<{path.name.upper()}>"


def cached(path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    tasks.write_atomic(path, json.dumps(value))
    return value


# ----------------------------------------------------------------------------------------------------
# statistics: values, intervals, traces
# ----------------------------------------------------------------------------------------------------
token_loss = tasks.token_weighted_loss  # sum of target-token losses / target tokens, over examples idx


def mean_rouge(e, idx):
    return np.mean(np.asarray(e["rouge"])[idx], -1)


def accuracy(e, idx):
    return np.mean(np.asarray(e["pred"])[idx] == np.asarray(e["label"])[idx], -1)


def share_correct(e, idx):
    return np.mean(np.asarray(e["correct"])[idx], -1)


def f1(e, idx):
    p, y = np.asarray(e["pred"])[idx] == 1, np.asarray(e["label"])[idx] == 1
    tp = np.sum(p & y, -1)
    return 100 * 2 * tp / np.maximum(np.sum(p, -1) + np.sum(y, -1), 1)


def interval(stat, e, base=None):
    """-> (value, (lo, hi) of the stat, (lo, hi) of stat - stat(base) on the same resampled examples or None)."""
    n = len(next(iter(e.values())))
    idx = np.random.default_rng(0).integers(0, n, size=(RESAMPLES, n))
    every = np.arange(n)
    boot = stat(e, idx)
    out = (float(stat(e, every)), tuple(np.percentile(boot, [2.5, 97.5]).tolist()), None)
    if base is not None:
        out = out[:2] + (tuple(np.percentile(boot - stat(base, idx), [2.5, 97.5]).tolist()),)
    return out


def check(name, what, ours, logged, tol=2e-4):
    """The re-evaluation must give the number the run logged: otherwise the page would describe another model."""
    if logged is None or abs(ours - logged) > tol * max(1.0, abs(logged)):
        sys.exit(f"results: {name}: {what} re-evaluated from model/ is {ours}, the run logged {logged}")


def budget_row(rows):
    """Bytes per client per round (mean over training rounds), peak counted memory (max), wall time (sum)."""
    train = [r for r in rows if r["round"] > 0]
    mean = lambda k: float(np.mean([r[k] for r in train if r.get(k) is not None] or [float("nan")]))  # noqa: E731
    memory = [r["peak_memory_bytes"] for r in train if r.get("peak_memory_bytes") is not None]
    return {"up": mean("upload_bytes"), "down": mean("download_bytes"), "memory": max(memory) if memory else None,
            "seconds": sum(r.get("seconds") or 0 for r in rows)}


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------
def fmt_b(n):
    return "–" if n is None or (isinstance(n, float) and math.isnan(n)) else tasks.fmt_bytes(n)


def fmt_i(v, lo_hi, digits):
    return f"{v:.{digits}f} [{lo_hi[0]:.{digits}f}, {lo_hi[1]:.{digits}f}]"


def fmt_d(lo_hi, digits):
    if lo_hi is None:
        return "–"
    verdict = "" if lo_hi[0] <= 0 <= lo_hi[1] else " *"
    return f"[{lo_hi[0]:+.{digits}f}, {lo_hi[1]:+.{digits}f}]{verdict}"


def svg_chart(series, xlabel, ylabel, title, path, logx=False):
    """A small line chart as SVG text (no plotting dependency): series = [(label, [(x, y), ...]), ...]. logx: the x
    axis in log10 (points at x <= 0 are left out), ticks at powers of ten."""
    W, H, L, R, T, B = 560, 300, 64, 170, 28, 44
    if logx:
        series = [(label, [(math.log10(x), y) for x, y in s if x > 0]) for label, s in series]
    pts = [p for _, s in series for p in s]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    pad = (y1 - y0) * 0.08 or abs(y0) * 0.01 or 1.0
    y0, y1, x1 = y0 - pad, y1 + pad, (x1 if x1 > x0 else x0 + 1)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)  # noqa: E731
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="16" font-size="12">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>',
           f'<text x="14" y="{(T + H - B) / 2}" transform="rotate(-90 14 {(T + H - B) / 2})" '
           f'text-anchor="middle">{ylabel}</text>']
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        out += [f'<text x="{L - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>',
                f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>']
    xticks = ([(e, f"1e{e}") for e in range(math.ceil(x0), math.floor(x1) + 1)] if logx else
              [(x0 + (x1 - x0) * k / 4, f"{x0 + (x1 - x0) * k / 4:.4g}") for k in range(5)])
    out += [f'<text x="{sx(x):.1f}" y="{H - B + 14}" text-anchor="middle">{text}</text>' for x, text in xticks]
    for i, (label, s) in enumerate(series):
        c = colors[i % len(colors)]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.8" points="'
                   + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s) + '"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{c}"/>' for x, y in s]
        out += [f'<rect x="{W - R + 10}" y="{T + 16 * i}" width="10" height="10" fill="{c}"/>',
                f'<text x="{W - R + 24}" y="{T + 16 * i + 9}">{label}</text>']
    path.write_text("\n".join(out + ["</svg>"]) + "\n")


def examples_per_round(argv):
    """Training examples the whole federation sees in one round (for the x axis)."""
    steps, batch = int(flag(argv, "--local_steps")), int(flag(argv, "--batch_size", "1"))
    clients = int(int(flag(argv, "--num_clients")) * float(flag(argv, "-m", "1")))  # fedcybgd: every client a round
    return steps * batch * clients


def examples_seen(runs, table):
    """Training examples each run of a table sees in all (the matched budget): one number, or a ValueError."""
    seen = {examples_per_round(argv) * int(flag(argv, "--rounds")) for _, t, _, _, argv in runs if t.startswith(table)}
    if len(seen) != 1:
        raise ValueError(f"the {table} runs see different numbers of examples: {sorted(seen)}")
    return seen.pop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the whole pipeline")
    p.add_argument("--collect", action="store_true", help="train nothing: use the runs already in --runs")
    p.add_argument("--runs", default=str(ROOT / "runs" / "results"), help="one folder per run (default: runs/results)")
    p.add_argument("--page", default=str(ROOT / "docs" / "RESULTS.md"), help="the page to write; plots beside it")
    p.add_argument("--dolly", default=str(ROOT / "data" / "dolly" / "databricks-dolly-15k.jsonl"))
    p.add_argument("--mrpc", default=str(ROOT / "data" / "glue" / "MRPC"))
    p.add_argument("--sst2", default=str(ROOT / "data" / "glue" / "SST-2"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with OMP_NUM_THREADS = cores / jobs "
                   "(or --threads); the page says so, since it changes every time column")
    p.add_argument("--sft_model", default="smollm2-135m")
    p.add_argument("--glue_model", default="minilm-l6")
    p.add_argument("--eval_samples", type=int, default=None, help="Dolly held-out examples (default 48; 4 quick)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the runs (default: all cores)")
    a = p.parse_args(argv)
    a.eval_samples = a.eval_samples or (4 if a.quick else 48)
    for path in (a.dolly, a.mrpc, a.sst2):
        if not Path(path).exists():
            sys.exit(f"results: {path} not found (see docs/data.md, or pass --dolly / --mrpc / --sst2)")
    if a.jobs < 1:
        sys.exit(f"results: --jobs {a.jobs}: at least 1")
    a.threads = a.threads or (max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None)
    runs_dir, page = Path(a.runs), Path(a.page)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {}))
    runs = run_set(a)
    if not a.collect:
        with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:  # each job waits on its own subprocess
            failed = [f.result() for f in [pool.submit(train, name, script, argv_, runs_dir, env, a.jobs)
                                           for name, _, _, script, argv_ in runs]]
        if any(failed):
            sys.exit("results: " + "; ".join(f for f in failed if f))
    missing = [name for name, _, _, _, argv_ in runs if not finished(runs_dir / name, argv_)]
    if missing:
        sys.exit(f"results: no finished run for {', '.join(missing)} in {runs_dir}")
    if a.threads:
        torch.set_num_threads(a.threads)
    write_page(a, runs, runs_dir, page, argv if argv is not None else sys.argv[1:])
    print(f"wrote {page}")


def write_page(a, runs, runs_dir, page, argv_main):
    t_eval = time.time()
    examples = dolly_examples(a)
    some_dolly = next(argv for _, table, _, _, argv in runs if table == "dolly")
    zero = cached(runs_dir / "zero-shot.examples.json", lambda: eval_dolly(a.sft_model, examples, some_dolly))
    rows = {name: read_metrics(runs_dir / name) for name, *_ in runs}
    first = rows["fedkseed"][0]  # every run's round 0 is the pretrained model; fedkseed's is the zero-shot row
    check("zero-shot", "eval_loss", token_loss(zero, np.arange(len(examples))), first["eval_loss"])
    check("zero-shot", "rougeL", mean_rouge(zero, np.arange(len(examples))), first["rougeL"])
    ev = {}
    for name, table, _, _, argv in runs:
        last = rows[name][-1]
        folder = str(runs_dir / name / "model")
        if table == "dolly":
            ev[name] = cached(runs_dir / name / "examples.json", lambda: eval_dolly(folder, examples, argv))
            check(name, "eval_loss", token_loss(ev[name], np.arange(len(examples))), last["eval_loss"])
            check(name, "rougeL", mean_rouge(ev[name], np.arange(len(examples))), last["rougeL"])
        elif table in ("sst2", "long"):  # the run's own per-example values (see sst2_section)
            ev[name] = run_examples(runs_dir / name, "last", last)
        else:
            ev[name] = cached(runs_dir / name / "examples.json", lambda: eval_mrpc(folder, a, argv))
            n = len(ev[name]["pred"])
            check(name, "accuracy", float(accuracy(ev[name], np.arange(n))), last["accuracy"])
            check(name, "f1", float(f1(ev[name], np.arange(n))) / 100, last["f1"])
    eval_seconds = time.time() - t_eval
    docs = page.parent
    docs.mkdir(parents=True, exist_ok=True)
    by = {name: (table, label, script, argv) for name, table, label, script, argv in runs}
    L = []
    cmd = shlex.join(["python", "bench/results.py", *map(portable, argv_main)])
    walls = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/wall.json"))]
    made = sorted({w["date"] for w in walls}) or [datetime.date.today().isoformat()]
    L += ["# Results" + (" (quick smoke run: tiny random models, not results)" if a.quick else ""), "",
          f"Generated by `{cmd}` on {datetime.date.today().isoformat()} from runs made on {' and '.join(made)}: "
          f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, no GPU. The runs took "
          f"{sum(w['seconds'] for w in walls) / 60:.1f} minutes of wall time in all (the commands, model loading "
          + (f"included), the re-evaluation {eval_seconds / 60:.1f} minutes. " if eval_seconds > 6 else
             "included); the per-example re-evaluation was cached from an earlier page. ") + "Every number comes from a "
          f"run's `metrics.jsonl` in `{runs_dir.name}/<run>/` (the `--runs` folder, not in the repository: it holds "
          "model weights); the per-example re-evaluation of each exported "
          "model reproduced the logged value before the page was written (the check is in `bench/results.py`)."
          + concurrency(walls), "",
          f"What this shows and what it does not: CPU-scale runs of `{a.sft_model}` (by default the 135M SmolLM2 on "
          f"its 4-bit grid, see the README's default models) and `{a.glue_model}` (a 22M encoder), {examples_seen(runs, 'dolly'):,} "
          "training examples per Dolly method, one seed. They compare the methods at one small matched budget; they "
          "say nothing about the papers' scale (billions of parameters, hundreds of rounds).", "",
          "Intervals: 95% percentile bootstrap over the evaluation examples (2,000 resamples). *Δ* is the paired "
          "interval of a method's difference from the baseline row on the same resampled examples; `*` marks an "
          "interval that excludes 0. Bytes are means per participating client per round (`upload_bytes`, "
          "`download_bytes`), memory the largest `peak_memory_bytes` of the run (weights held + gradients + "
          "optimizer state + saved activations, as the scripts count it), time the sum of the rounds' `seconds` "
          "(evaluation included, model loading not).", "",
          "Knobs: the AdamW methods run at the scripts' default learning rates (full fine-tuning 1e-4 for Dolly, "
          "2e-4 for MRPC and 1e-5 for SST-2, LoRA 3e-4; FedCyBGD's MRPC lr 4e-4 is its GLUE default, chosen on "
          "validation, see fedcybgd.md), chosen on nothing here but where said. FedKSeed's `--lr 2e-6 --zo_eps 1e-3` come from short "
          "probes made before the validation split existed, which read the held-out category's loss; they were not "
          "chosen again on validation data (`--val_samples`) for this page, so FedKSeed's rows may be slightly "
          "optimistic.", ""]

    # Dolly
    zl = interval(token_loss, zero)
    zr = interval(mean_rouge, zero)
    n = len(examples)
    L += [f"## Dolly-15K, held-out category `summarization` ({n} examples, loss and Rouge-L)", "",
          f"Matched budget: every method sees {examples_seen(runs, 'dolly'):,} training examples (the same examples "
          "seen, not the same wall time; the flags are at the end): FedKSeed takes ZO steps of one example, the "
          "AdamW methods steps of two; FedCyBGD's clients each train one layer per turn. Rouge-L: greedy, "
          f"{flag(some_dolly, '--max_new_tokens')} new tokens, `rouge-score` (see [data](data.md)).", "",
          "| method | held-out loss [95%] | Δ loss vs zero-shot | Rouge-L [95%] | Δ Rouge-L | up B/client/round | "
          "down B/client/round | peak memory | time |", "|---|---|---|---|---|---:|---:|---:|---:|",
          f"| zero-shot (pretrained) | {fmt_i(zl[0], zl[1], 4)} | – | {fmt_i(zr[0], zr[1], 4)} | – | – | – | – | – |"]
    series = []
    for name, (table, label, script, argv) in by.items():
        if table != "dolly":
            continue
        lo, ro = interval(token_loss, ev[name], zero), interval(mean_rouge, ev[name], zero)
        b = budget_row(rows[name])
        L.append(f"| {label} | {fmt_i(lo[0], lo[1], 4)} | {fmt_d(lo[2], 4)} | {fmt_i(ro[0], ro[1], 4)} | "
                 f"{fmt_d(ro[2], 4)} | {fmt_b(b['up'])} | {fmt_b(b['down'])} | {fmt_b(b['memory'])} | "
                 f"{b['seconds'] / 60:.1f} min |")
        per = examples_per_round(argv)
        series.append((label.split(" (")[0], [(r["round"] * per, r["eval_loss"]) for r in rows[name]
                                              if r.get("eval_loss") is not None]))
    svg_chart(series, "training examples seen", "held-out loss", "Dolly: held-out loss", docs / "results_dolly.svg")
    L += ["", "![Dolly held-out loss against examples seen](results_dolly.svg)", ""]
    L += fedkseed_trend(rows["fedkseed"], ev["fedkseed"], zero, examples_per_round(by["fedkseed"][3]))

    # MRPC
    labels = ev["mrpc-centralized"]["label"]
    L += [f"## MRPC (GLUE dev, {len(labels)} pairs, `--glue_model {a.glue_model}` + a new classifier head)", "",
          f"Matched budget: every method sees {examples_seen(runs, 'mrpc'):,} training examples. FedCyBGD runs at its "
          "GLUE defaults, the official regime ([fedcybgd](fedcybgd.md): 24 clients, steps of 64, 4 of the encoder's "
          "6 layers a turn, lr 4e-4 decaying linearly, each turn the next 2 batches of one stream over the training "
          "set: the README's quick start); FedAvg: 6 iid clients, every one a round, AdamW steps of 16; centralized: "
          "one client, the same steps. Δ: paired with the majority-class predictor (the majority of the training labels). Label "
          "skew (`--iid dir0.5`) has its own page, [label-skew](label-skew.md).", ""]
    majority = int(np.mean([e["label"] for e in tasks.glue.load("mrpc", a.mrpc)[0]]) >= 0.5)
    base = {"pred": [majority] * len(labels), "label": labels}
    allpos = {"pred": [1] * len(labels), "label": labels}
    ma, mf = interval(accuracy, base), interval(f1, allpos)
    mrpc_series = []
    for split in ("iid",):
        L += [f"### FedAvg over `--iid {split}` clients", "",
              "| method | accuracy [95%] | Δ accuracy vs majority | F1 [95%] | up B/client/round | "
              "down B/client/round | peak memory | time |", "|---|---|---|---|---:|---:|---:|---:|",
              f"| majority class ({'positive' if majority else 'negative'}) | {fmt_i(100 * ma[0], [100 * x for x in ma[1]], 1)} "
              f"| – | {interval(f1, base)[0]:.1f} | – | – | – | – |",
              f"| always positive | {100 * interval(accuracy, allpos)[0]:.1f} | – | {fmt_i(mf[0], mf[1], 1)} | – | – | – | – |"]
        for name in (f"mrpc-{split}-fedcybgd", f"mrpc-{split}-fedavg", "mrpc-centralized"):
            table, label, script, argv = by[name]
            acc, f = interval(accuracy, ev[name], base), interval(f1, ev[name])
            b = budget_row(rows[name])
            L.append(f"| {label} | {fmt_i(100 * acc[0], [100 * x for x in acc[1]], 1)} | "
                     f"{fmt_d([100 * x for x in acc[2]], 1)} | {fmt_i(f[0], f[1], 1)} | {fmt_b(b['up'])} | "
                     f"{fmt_b(b['down'])} | {fmt_b(b['memory'])} | {b['seconds'] / 60:.1f} min |")
            if name != "mrpc-centralized" or split == "iid":
                mrpc_series.append((label.split(" (")[0],
                                    [(r["round"], 100 * r["accuracy"]) for r in rows[name]]))
        L.append("")
    svg_chart(mrpc_series, "round", "dev accuracy (%)", "MRPC: dev accuracy per round", docs / "results_mrpc.svg")
    L += ["![MRPC dev accuracy per round](results_mrpc.svg)", ""]
    L += sst2_section(a, runs, rows, ev, runs_dir, docs)
    L += ["## The runs", "",
          "Each run's flags (`--output_dir` is `<runs>/<name>`); `examples.json` beside each run (SST-2: the "
          "run's own `heldout_examples.json`) holds the per-example values the intervals come from.", ""]
    rel = lambda arg: os.path.relpath(arg, ROOT) if arg.startswith(str(ROOT)) else arg  # noqa: E731  data/..., not /home/...
    L += [f"- `{name}`: `python {script} {shlex.join(map(rel, argv))}`" for name, (_, _, script, argv) in by.items()]
    text, old = "\n".join(L) + "\n", page.read_text() if page.is_file() else ""
    if LONG_BEGIN in old and LONG_END in old and "## MRPC" in text:
        text = text.replace("## MRPC", old[old.index(LONG_BEGIN):old.index(LONG_END) + len(LONG_END)] + "\n\n## MRPC",
                            1)
    tasks.write_atomic(page, text)


def concurrency(walls):
    """The page's word on how the runs shared the machine (bench/results.py --jobs), from their wall.json."""
    shared = sorted({(w.get("jobs", 1), w.get("threads")) for w in walls if w.get("jobs", 1) > 1})
    alone = sum(w.get("jobs", 1) == 1 for w in walls)
    if not shared:
        return ""
    return (" The runs shared the cores: " + "; ".join(f"{jobs} at a time with {threads} thread(s) each" for jobs, threads
                                                       in shared) + " (`--jobs`)" + (f", {alone} run(s) alone" if alone
                                                                                     else "")
            + ", so a time column is a time under that load, comparable within the page, not a time alone.")


def sst2_section(a, runs, rows, ev, runs_dir, docs):
    """SST-2 (prompt-based): every method at matched examples, Δ paired with the zero-shot model in the run's own
    dtype (its round 0, re-evaluated here), and accuracy against examples, bytes and client seconds."""
    sst = [(name, label, argv) for name, table, label, _, argv in runs if table == "sst2"]
    zero = {name: run_examples(runs_dir / name, "first", rows[name][0]) for name, _, _ in sst}  # each run's round 0
    n, seen = len(zero["sst2-fedavg"]["correct"]), examples_seen(runs, "sst2")
    some = sst[0][2]
    L = [f"## SST-2, prompt-based (GLUE dev, {n} sentences, `{a.sft_model}` scoring label words)", "",
         f"Matched budget: every method sees {seen:,} training examples ({flag(some, '--rounds')} rounds; "
         f"{flag(some, '--num_clients')} iid clients, {examples_per_round(some) // int(flag(some, '--local_steps')) // int(flag(some, '--batch_size'))} "
         f"a round, steps of {flag(some, '--batch_size')}; the centralized run takes the round's steps itself). The "
         f"template is chosen on {flag(some, '--val_samples')} validation sentences carved from train.tsv (`--template auto`, see "
         "[fedkseed](fedkseed.md)); round 0 is zero-shot with it. FedKSeed's forwards run in bfloat16 over float32 "
         "weights (`--compute_dtype bfloat16`), the AdamW runs in float32, so each run's Δ is paired with its own round "
         "0 (the zero-shot model in its dtype). The per-example values are the runs' own (`heldout_examples.json`, "
         "written as each run evaluated; their mean is checked against `metrics.jsonl`), not a re-evaluation of the "
         "exported model as for Dolly and MRPC. A ZO step costs forwards only (two-point: 2, FZOO: n + 1), an AdamW step a "
         "forward and a backward: *client s* is the mean seconds of compute per client and round (`client_seconds`), "
         f"the cost the examples do not show. FedKSeed's lrs were chosen on validation accuracy ({SST_LR_2P} "
         f"two-point, {SST_LR_FZOO} FZOO); the AdamW methods run at fedavg.py's prompt defaults.", "",
         "| method | dev accuracy [95%] | Δ vs zero-shot | up B/client/round | down B/client/round | client s | "
         "peak memory | time |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for dtype, name, where in (("bfloat16", "sst2-fedkseed", "FedKSeed's round 0"),
                               ("float32", "sst2-fedavg", "the AdamW runs' round 0")):
        v = interval(share_correct, zero[name])
        L.append(f"| zero-shot, {dtype} forwards ({where}) | {fmt_i(100 * v[0], [100 * x for x in v[1]], 2)} | – | "
                 "– | – | – | – | – |")
    series = {"examples": [], "bytes": [], "seconds": []}
    for name, label, argv in sst:
        v = interval(share_correct, ev[name], zero[name])
        b = budget_row(rows[name])
        train = [r for r in rows[name] if r["round"] > 0]
        clients = max(1, int(int(flag(argv, "--num_clients")) * float(flag(argv, "-m", "1"))))
        client_s = float(np.mean([r["client_seconds"] / clients for r in train]))
        L.append(f"| {label} | {fmt_i(100 * v[0], [100 * x for x in v[1]], 2)} | "
                 f"{fmt_d([100 * x for x in v[2]], 2)} | {fmt_b(b['up'])} | {fmt_b(b['down'])} | {client_s:.0f} s | "
                 f"{fmt_b(b['memory'])} | {b['seconds'] / 60:.1f} min |")
        per, nbytes, secs = examples_per_round(argv), 0.0, 0.0
        pts = {"examples": [], "bytes": [], "seconds": []}
        for r in rows[name]:
            if r["round"] > 0:
                nbytes += (r["upload_bytes"] or 0) + (r["download_bytes"] or 0)
                secs += r["client_seconds"]
            if r.get("accuracy") is not None:
                pts["examples"].append((r["round"] * per, 100 * r["accuracy"]))
                pts["bytes"].append((nbytes, 100 * r["accuracy"]))
                pts["seconds"].append((secs, 100 * r["accuracy"]))
        for k in series:
            series[k].append((label.split(" (fedavg")[0].replace("centralized fine-tuning", "centralized"), pts[k]))
    svg_chart(series["examples"], "training examples seen", "dev accuracy (%)", "SST-2: accuracy against examples",
              docs / "results_sst2_examples.svg")
    svg_chart(series["bytes"], "bytes up + down per participating client (log)", "dev accuracy (%)",
              "SST-2: accuracy against communication", docs / "results_sst2_bytes.svg", logx=True)
    svg_chart(series["seconds"], "client compute, all clients (s)", "dev accuracy (%)",
              "SST-2: accuracy against client compute", docs / "results_sst2_seconds.svg")
    L += ["", "One seed per run and a short budget: each row says what these runs did, not how the methods rank in "
          "general. Not on this page yet: a second seed."]
    L += long_section(runs, rows, ev, runs_dir, v_full={
        label: interval(share_correct, ev[name])[0] for name, label, _ in sst if name in ("sst2-fedavg",
                                                                                          "sst2-centralized")})
    return L + ["", "![SST-2 accuracy against examples seen](results_sst2_examples.svg)", "",
                "![SST-2 accuracy against bytes](results_sst2_bytes.svg)", "",
                "![SST-2 accuracy against client seconds](results_sst2_seconds.svg)", ""]


def long_section(runs, rows, ev, runs_dir, v_full):
    """The longest FedKSeed SST-2 run that fits in 60 minutes, beside DeComFL's published figure and full
    fine-tuning's (the matched table's FedAvg and centralized rows)."""
    name, _, label, _, argv = next(r for r in runs if r[1] == "long")
    folder, run_rows = runs_dir / name, rows[name]
    wall = json.loads((folder / "wall.json").read_text()) if (folder / "wall.json").is_file() else {}
    first = run_examples(folder, "first", run_rows[0])
    v = interval(share_correct, ev[name], first)
    per, minutes = examples_per_round(argv), 0.0
    L = ["", f"### {label}", "",
         f"`{name}`: the matched table's FedKSeed FZOO federation and step ({flag(argv, '--num_clients')} iid "
         f"clients, {examples_per_round(argv) // int(flag(argv, '--local_steps')) // int(flag(argv, '--batch_size'))} a "
         f"round, {flag(argv, '--local_steps')} steps of {flag(argv, '--batch_size')}, n = {flag(argv, '--directions')}, lr "
         f"{flag(argv, '--lr')}" + (f", `--lr_scheduler {flag(argv, '--lr_scheduler')}` over the run's rounds"
                                    if flag(argv, "--lr_scheduler", "constant") != "constant" else "")
         + f") for {flag(argv, '--rounds')} rounds: {wall.get('seconds', float('nan')) / 60:.1f} minutes of wall time "
         f"(the command, model loading included, {wall.get('jobs', 1)} run at a time). Accuracy on the same "
         f"{len(first['correct'])} dev sentences; minutes are the rounds' own (evaluation included). Its knobs are the "
         "3-round runs' (lr chosen on validation there); the decay was not chosen at this horizon.", "",
         "| round | examples seen | minutes | dev accuracy |", "|---:|---:|---:|---|"]
    for r in run_rows:
        minutes += r["seconds"] / 60 if r["round"] > 0 else 0.0
        if r.get("accuracy") is None:
            continue
        acc = interval(share_correct, first) if r["round"] == 0 else v if r is run_rows[-1] else None
        shown = fmt_i(100 * acc[0], [100 * x for x in acc[1]], 2) if acc else f"{100 * r['accuracy']:.2f}"
        L.append(f"| {r['round']} | {r['round'] * per:,} | {minutes:.1f} | {shown} |")
    gain = 100 * (v[0] - interval(share_correct, first)[0])
    L += ["", f"Δ after round {run_rows[-1]['round']} against its round 0 (zero-shot, bfloat16 forwards): "
          f"{gain:+.2f} points {fmt_d([100 * x for x in v[2]], 2)}, paired over the same sentences. For comparison, "
          f"not rerun here: {DECOMFL}; another model, template and split, so only the rounds compare, not the "
          f"levels. Full fine-tuning from the table above, after {examples_seen(runs, 'sst2'):,} examples: "
          + ", ".join(f"{k.split(' (')[0]} {100 * x:.2f}%" for k, x in v_full.items()) + "."]
    return L


def fedkseed_trend(rows, final, zero, per_round):
    """Is FedKSeed's held-out improvement outside its own interval? If not, at what budget would it be, on the
    measured trend (a least-squares line through the held-out loss at every round)."""
    pts = [(r["round"] * per_round, r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    (v, _, d) = interval(token_loss, final, zero)
    delta = v - pts[0][1]
    slope = np.polyfit([x for x, _ in pts], [y for _, y in pts], 1)[0] if len(pts) > 1 else 0.0
    half = (d[1] - d[0]) / 2
    out = [f"**FedKSeed at this budget.** Held-out loss {pts[0][1]:.4f} -> {v:.4f} (Δ {delta:+.4f}); the paired "
           f"interval of the difference is [{d[0]:+.4f}, {d[1]:+.4f}]. "]
    if d[1] < 0:
        out[0] += "The improvement lies outside its interval."
    else:
        out[0] += "The improvement is **not** distinguishable from evaluation noise at this budget."
        if slope < 0:
            need = half / -slope
            out[0] += (f" The measured trend (least squares over the {len(pts)} evaluated rounds) is "
                       f"{slope * 1000:+.5f} per 1,000 examples; at that rate the change would exceed the interval's "
                       f"half-width ({half:.4f}) after about {need:,.0f} examples ({need / pts[-1][0]:.0f}x this "
                       "budget), a linear extrapolation of a short trend, not a measurement.")
        else:
            out[0] += " The measured trend over the evaluated rounds is not downward, so no budget can be read off it."
    minutes = sum(r["seconds"] for r in rows if r["round"] > 0) / 60
    if slope < 0:  # how far the run is from a 90-minute target of Δ -0.045, at its own measured trend
        need = -0.045 / slope
        m = minutes * need / pts[-1][0]
        out[0] += (f" Δ -0.045 at this trend would take about {need:,.0f} examples, about {m:,.0f} minutes of this "
                   f"run's rounds: {'out of reach of' if m > 90 else 'within'} a 90-minute run (a linear "
                   "extrapolation; the longer runs in [fedkseed](fedkseed.md) measured -0.0038 after 1,400 steps, 23 "
                   "minutes, within noise).")
    return out + [""]


if __name__ == "__main__":
    main()
