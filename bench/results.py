"""Regenerate docs/RESULTS.md from committed run data: every method tuned the same way on validation, three seeds a
row (SST-2 and MRPC), beside its baselines, with bytes, memory, client seconds and paired intervals.

    python bench/results.py --jobs 2                       # run what results/ lacks, then write the page
    python bench/results.py --phase grid --jobs 2          # only the lr grids (seed 42)
    python bench/results.py --phase seeds --seeds 43 --jobs 2   # the other seeds at the chosen lrs
    python bench/results.py --phase seeds --seeds 44 --jobs 1   # ... one at a time: the client seconds quoted
    python bench/results.py --collect                      # no training: the page from results/ alone
    python bench/results.py --quick --sft_model M --glue_model G --dolly F --mrpc D --sst2 S --runs R --data R2 --page P

The protocol, the same for every row:
  1. its learning rate is chosen on the validation split (--val_samples, carved from the training data with the
     master seed) from a grid of three values a decade wide around the script's default (x1/3, x1, x3), at the
     table's budget, seed 42: the one with the best validation metric after the last round (accuracy, then the lower
     loss; Dolly: the lower loss). ZO's eps stays 1e-3 (the finite difference's scale, not a step size);
  2. the chosen lr runs again under seeds 43 and 44 (the seed moves the partition, the sampling, the z draws, a new
     head's init): a row is the mean and standard deviation over the three seeds, each seed paired with its own round
     0 (SST-2, Dolly) or with the majority class (MRPC) on the same held-out examples;
  3. every run's config.json, metrics.jsonl, ledger.jsonl, heldout_examples.json (its per-example held-out values)
     and wall.json are copied to --data (results/, committed; the weights stay in --runs), and the page is written
     from those files alone, so --collect regenerates it on a fresh clone.
"""
import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tasks  # noqa: E402

RESAMPLES = 2000
GRID = (1 / 3, 1.0, 3.0)  # a decade around each default
KEPT = ("config.json", "metrics.jsonl", "ledger.jsonl", "heldout_examples.json", "wall.json")  # committed per run


# ----------------------------------------------------------------------------------------------------
# the rows: (table, key, label, script, flags without --lr and --seed, the script's default lr)
# ----------------------------------------------------------------------------------------------------
def rows_of(a):
    q = a.quick
    sst = ["--dataset", "sst2", "--data_path", a.sst2, "--model", a.sft_model, "--max_length", "32" if q else "128",
           "--val_samples", "8" if q else "200", "--eval_samples", "8" if q else "0", "--batch_size", "2" if q else "16",
           "--iid", "iid", "--num_clients", "4" if q else "10", "-m", "0.5" if q else "0.2",
           "--rounds", "2" if q else "3", "--eval_every", "2" if q else "3"]
    steps = "1" if q else "16"
    zo = ["-K", "64" if q else "1024", "--zo_eps", "1e-3", "--compute_dtype", "bfloat16", "--local_steps", steps]
    central = ["--num_clients", "1", "-m", "1", "--local_steps", str(int(steps) * 2)]  # the round's two clients' steps
    two_point = ["--estimator", "two_point", "--directions", "1"]  # named: --dataset sst2's own default is FZOO
    rows = [
        ("sst2", "fedkseed", "FedKSeed (two-point)", "fedkseed.py", sst + zo + two_point, 1e-5),
        ("sst2", "fedkseed-fzoo", "FedKSeed (FZOO, n = 4)", "fedkseed.py",
         sst + zo + ["--estimator", "fzoo", "--directions", "4"], 1e-3),
        ("sst2", "fedkseed-pro", "FedKSeed-Pro (two-point)", "fedkseed.py", sst + zo + two_point + ["--bias_sampling"],
         1e-5),
        ("sst2", "fedit", "FedIT (LoRA)", "fedavg.py", ["--task", "prompt", "--method", "lora"] + sst
         + ["--local_steps", steps], 3e-4),
        ("sst2", "fedavg", "FedAvg (full)", "fedavg.py", ["--task", "prompt"] + sst + ["--local_steps", steps], 1e-5),
        ("sst2", "centralized", "centralized fine-tuning", "fedavg.py", ["--task", "prompt"] + sst + central, 1e-5),
    ]
    glue = ["--task", "glue", "--dataset", "mrpc", "--data_path", a.mrpc, "--model", a.glue_model,
            "--max_length", "64" if q else "128", "--eval_samples", "0", "--val_samples", "8" if q else "200",
            "--rounds", "1" if q else "3"]
    avg = ["--batch_size", "4" if q else "16"]
    rows += [  # 9,216 examples each: FedCyBGD's GLUE regime (24 clients x 2 steps of 64 a round), FedAvg's 6 x 32 x 16
        ("mrpc", "fedcybgd", "FedCyBGD (its GLUE regime)", "fedcybgd.py",
         glue + ["--num_clients", "2" if q else "24", "--batch_size", "4" if q else "64",
                 "--local_steps", "1" if q else "2"], 4e-4),
        ("mrpc", "fedavg", "FedAvg (full)", "fedavg.py", glue + avg + ["--iid", "iid", "--num_clients",
                                                                      "2" if q else "6", "-m", "1",
                                                                      "--local_steps", "1" if q else "32"], 2e-4),
        ("mrpc", "centralized", "centralized fine-tuning", "fedavg.py",
         glue + avg + ["--num_clients", "1", "-m", "1", "--local_steps", "2" if q else "192"], 2e-4),
    ]
    dolly = ["--data_path", a.dolly, "--model", a.sft_model, "--max_length", "48" if q else "256", "--eval_samples",
             "4" if q else "48", "--max_new_tokens", "4" if q else "64", "--val_samples", "8" if q else "48"]
    fed = ["--num_clients", "4" if q else "200", "-m", "0.5" if q else "0.02", "--rounds", "2" if q else "4"]
    zo = ["--zo_eps", "1e-3", "-K", "64" if q else "4096", "--eval_every", "1", "--rouge_at_start"]
    zo_steps, sgd_steps = ("2", "1") if q else ("16", "8")  # 16 examples per client per round
    sgd = ["--local_steps", sgd_steps, "--batch_size", "2", "--eval_every", "2"]
    rows += [
        ("dolly", "fedkseed", "FedKSeed", "fedkseed.py", dolly + fed + zo + ["--local_steps", zo_steps], 2e-6),
        ("dolly", "fedkseed-pro", "FedKSeed-Pro", "fedkseed.py",
         dolly + fed + zo + ["--local_steps", zo_steps, "--bias_sampling"], 2e-6),
        ("dolly", "mezo", "centralized MeZO (one client)", "fedkseed.py",
         dolly + zo + ["--num_clients", "1", "-m", "1", "--rounds", "2" if q else "4",
                       "--local_steps", str(int(zo_steps) * (2 if q else 4))], 2e-6),
        ("dolly", "fedcybgd", "FedCyBGD", "fedcybgd.py",
         ["--task", "sft"] + dolly + ["--num_clients", "2" if q else "4", "--rounds", "2" if q else "4"] + sgd, 1e-4),
        ("dolly", "fedavg", "FedAvg (full)", "fedavg.py", ["--task", "sft"] + dolly + fed + sgd, 1e-4),
        ("dolly", "fedit", "FedIT (LoRA)", "fedavg.py", ["--task", "sft", "--method", "lora"] + dolly + fed + sgd, 3e-4),
    ]
    return rows


def grid_of(default, points):
    return [float(f"{default * f:.3g}") for f in (GRID if points == 3 else (1.0,))]


def run_name(key, lr=None, seed=None):
    return f"{key}-lr{lr:g}" if seed is None else f"{key}-s{seed}"


# ----------------------------------------------------------------------------------------------------
# running: one script to the end, its small files copied to --data
# ----------------------------------------------------------------------------------------------------
def flag(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def say(line, lock=threading.Lock()):
    with lock:
        print(line, flush=True)


def finished(folder, argv):
    rows = tasks.read_run_jsonl(folder / "metrics.jsonl")
    return bool(rows) and rows[-1]["round"] == int(flag(argv, "--rounds")) and (folder / "wall.json").is_file()


def train(table, name, script, argv, a, env):
    """Run one script to the end (resuming a run cut off) into <runs>/<table>/<name>, then copy its small files to
    <data>/<table>/<name>. A run whose data is already there is not run again."""
    kept = Path(a.data) / table / name
    if finished(kept, argv):
        return None
    folder = Path(a.runs) / table / name
    folder.mkdir(parents=True, exist_ok=True)
    if not finished(folder, argv):
        resume = ["--resume"] if (folder / "checkpoint.safetensors").is_file() else []
        cmd = [sys.executable, str(ROOT / script), *argv, "--output_dir", str(folder), *resume]
        say(f"{table}/{name}: {shlex.join(cmd[1:])}")
        t = time.time()
        with open(folder / "stdout.log", "a") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
        if rc != 0:
            return f"{table}/{name} failed (exit {rc}); see {folder / 'stdout.log'}"
        wall = json.loads((folder / "wall.json").read_text())["seconds"] if (folder / "wall.json").is_file() else 0.0
        tasks.write_atomic(folder / "wall.json", json.dumps({"seconds": wall + time.time() - t, "jobs": a.jobs,
                                                             "date": datetime.date.today().isoformat(),
                                                             "threads": env.get("OMP_NUM_THREADS"),
                                                             "command": shlex.join(["python", script, *portable(argv)])}))
        say(f"{table}/{name}: {time.time() - t:.0f} s")
    kept.mkdir(parents=True, exist_ok=True)
    for f in KEPT:
        if (folder / f).is_file():
            shutil.copyfile(folder / f, kept / f)
    return None


def portable(argv):
    """Paths of this machine as the page shows them: relative to the repository where they lie inside it, else
    <NAME>: the page never names another machine's folders."""
    out = []
    for x in argv:
        if os.path.isabs(x):
            p = Path(os.path.normpath(x))  # not resolved: data/ may be a link to a copy elsewhere
            x = str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else f"<{p.name.upper()}>"
        out.append(x)
    return out


def val_score(rows):
    """A run's validation figure after its last round: (accuracy, -loss) for classification, (-loss,) otherwise."""
    last = [r for r in rows if r.get("val_loss") is not None][-1]
    return (last["val_accuracy"], -last["val_loss"]) if last.get("val_accuracy") is not None else (-last["val_loss"],)


def chosen_lr(a, table, key, default):
    """The grid's lr with the best validation score (ties: the grid's order), from the runs' committed data."""
    scored = []
    for lr in grid_of(default, a.grid_points):
        rows = tasks.read_run_jsonl(Path(a.data) / table / run_name(key, lr) / "metrics.jsonl")
        if not rows:
            return None
        scored.append((val_score(rows), lr))
    return max(scored, key=lambda s: s[0])[1]


def run_phase(a, rows, phase, seeds, env):
    jobs = []
    for table, key, _, script, argv, default in rows:
        if phase == "grid":
            jobs += [(table, run_name(key, lr), script, argv + ["--lr", repr(lr), "--seed", "42"])
                     for lr in grid_of(default, a.grid_points)]
        else:
            lr = chosen_lr(a, table, key, default)
            if lr is None:
                sys.exit(f"results: {table}/{key}: its lr grid is not complete in {a.data}: run --phase grid first")
            for seed in seeds:
                if table == "dolly" and str(seed) not in a.dolly_seeds.split(","):
                    continue
                jobs.append((table, run_name(key, seed=seed), script, argv + ["--lr", repr(lr), "--seed", str(seed)]))
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:  # each worker waits on its own subprocess
        failed = [f.result() for f in [pool.submit(train, *job, a, env) for job in jobs]]
    if any(failed):
        sys.exit("results: " + "; ".join(f for f in failed if f))


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
def boot(n, seed=0):
    return np.random.default_rng(seed).integers(0, n, size=(RESAMPLES, n))


def acc(d, idx):
    return np.mean(np.asarray(d["correct"])[idx], -1)


def loss(d, idx):
    return np.sum(np.asarray(d["loss_sum"])[idx], -1) / np.sum(np.asarray(d["tokens"])[idx], -1)


def rouge(d, idx):
    return np.mean(np.asarray(d["rouge"])[idx], -1)


def f1(d, idx):
    p, y = np.asarray(d["pred"])[idx] == 1, np.asarray(d["label"])[idx] == 1
    return 100 * 2 * np.sum(p & y, -1) / np.maximum(np.sum(p, -1) + np.sum(y, -1), 1)


def paired(stat, a, b):
    """stat(a) - stat(b) over the same examples: (value, 95% bootstrap interval)."""
    n = len(next(iter(a.values())))
    idx, every = boot(n), np.arange(n)
    d = stat(a, idx) - stat(b, idx)
    return float(stat(a, every) - stat(b, every)), tuple(np.percentile(d, [2.5, 97.5]).tolist())


def pooled(stat, runs_a, runs_b):
    """The mean over seeds of stat(a_s) - stat(b_s), seed s of each row paired, the examples resampled together (the
    same resample for every seed): (value, 95% interval over the examples)."""
    n = len(next(iter(runs_a[0].values())))
    idx, every = boot(n), np.arange(n)
    d = np.mean([stat(x, idx) - stat(y, idx) for x, y in zip(runs_a, runs_b)], 0)
    v = float(np.mean([stat(x, every) - stat(y, every) for x, y in zip(runs_a, runs_b)]))
    return v, tuple(np.percentile(d, [2.5, 97.5]).tolist())


def fmt_d(v, lo_hi, digits, scale=1.0):
    mark = "" if lo_hi[0] <= 0 <= lo_hi[1] else " *"
    return f"{scale * v:+.{digits}f} [{scale * lo_hi[0]:+.{digits}f}, {scale * lo_hi[1]:+.{digits}f}]{mark}"


def fmt_b(n):
    return "–" if n is None or (isinstance(n, float) and math.isnan(n)) else tasks.fmt_bytes(n)


def mean_std(values, digits, scale=1.0):
    v = [scale * x for x in values]
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}" if len(v) > 1 else f"{v[0]:.{digits}f}"


# ----------------------------------------------------------------------------------------------------
# one row's runs, read from --data
# ----------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, folder):
        self.folder, self.name = folder, folder.name
        self.metrics = tasks.read_run_jsonl(folder / "metrics.jsonl")
        self.ledger = tasks.read_run_jsonl(folder / "ledger.jsonl")
        self.config = json.loads((folder / "config.json").read_text())
        self.wall = json.loads((folder / "wall.json").read_text())
        ex = json.loads((folder / "heldout_examples.json").read_text())
        if ex["last"]["round"] != self.metrics[-1]["round"] or ex["first"]["round"] != 0:
            sys.exit(f"results: {folder}: the per-example values are of rounds {ex['first']['round']} and "
                     f"{ex['last']['round']}, not 0 and the last")
        self.first, self.last = ({k: v for k, v in ex[w].items() if k != "round"} for w in ("first", "last"))
        for key, stat, need in (("accuracy", acc, "correct"), ("eval_loss", loss, "loss_sum")):
            logged = self.metrics[-1].get(key)  # the per-example values must give the logged figures
            if logged is not None and need in self.last:
                got = float(stat(self.last, np.arange(len(self.last[need]))))
                if abs(got - logged) > 2e-4 * max(1.0, abs(logged)):
                    sys.exit(f"results: {folder}: its per-example {key} gives {got}, metrics.jsonl says {logged}")

    def budget(self):
        train = [r for r in self.metrics if r["round"] > 0]
        mean = lambda k: float(np.mean([r[k] for r in train if r.get(k) is not None] or [float("nan")]))  # noqa
        memory = [r["peak_memory_bytes"] for r in train if r.get("peak_memory_bytes") is not None]
        clients = [e for e in self.ledger if "loss" in e]
        per_client = len(clients) / max(1, len(train))
        return {"up": mean("upload_bytes"), "down": mean("download_bytes"), "memory": max(memory) if memory else None,
                "client_s": mean("client_seconds") / max(1.0, per_client), "minutes": sum(r["seconds"] for r in
                                                                                            self.metrics) / 60}

    def examples_seen(self):
        c = self.config
        per = c["local_steps"] * c.get("batch_size", 1) * (c.get("sampled_per_round") or
                                                           max(1, int(c["num_clients"] * c.get("m", 1))))
        return per * c["rounds"]


def row_runs(a, table, key, default, seeds):
    lr = chosen_lr(a, table, key, default)
    names = [run_name(key, lr)] + [run_name(key, seed=s) for s in seeds if s != 42]
    runs = [Run(Path(a.data) / table / n) for n in names if (Path(a.data) / table / n / "wall.json").is_file()]
    grid = {g: Run(Path(a.data) / table / run_name(key, g)) for g in grid_of(default, a.grid_points)}
    return lr, runs, grid


# ----------------------------------------------------------------------------------------------------
# the page
# ----------------------------------------------------------------------------------------------------
def grid_cell(grid, lr, classification):
    """The lr grid with each value's validation figure, the chosen one in bold."""
    def fig(r):
        s = val_score(r.metrics)
        return f"{100 * s[0]:.1f}%" if classification else f"{-s[0]:.4f}"
    return " / ".join((f"**{g:g}: {fig(r)}**" if g == lr else f"{g:g}: {fig(r)}") for g, r in grid.items())


def alone(runs):
    """The run of a row measured alone (wall.json's jobs 1), for its client seconds; else None."""
    return next((r for r in runs if r.wall.get("jobs") == 1), None)


def classification_table(a, table, rows_here, seeds, zero_label, base_of):
    """SST-2 and MRPC: per row the lr grid, mean ± std over seeds, each seed's paired Δ, bytes, client s, memory."""
    L = ["| method | lr grid: validation accuracy (chosen in bold) | dev accuracy, mean ± std | per seed: Δ vs "
         f"{zero_label} [95%] | up B/client/round | client s / round | peak memory | minutes |",
         "|---|---|---:|---|---:|---:|---:|---:|"]
    got = {}
    for _, key, label, _, _, default in rows_here:
        lr, runs, grid = row_runs(a, table, key, default, seeds)
        got[key] = runs
        deltas = [paired(acc, r.last, base_of(r)) for r in runs]
        b = [r.budget() for r in runs]
        solo = alone(runs)
        client_s = f"{solo.budget()['client_s']:.0f} (alone)" if solo else f"{np.mean([x['client_s'] for x in b]):.0f}"
        L.append(f"| {label} | {grid_cell(grid, lr, True)} | "
                 f"{mean_std([float(acc(r.last, np.arange(len(r.last['correct'])))) for r in runs], 2, 100)} | "
                 + "; ".join(f"s{r.config['seed']} {fmt_d(d[0], d[1], 1, 100)}" for r, d in zip(runs, deltas))
                 + f" | {fmt_b(np.mean([x['up'] for x in b]))} | {client_s} | {fmt_b(max(x['memory'] or 0 for x in b))} | "
                 f"{np.mean([x['minutes'] for x in b]):.1f} |")
    return L, got


def write_page(a, rows, page, argv_main):
    docs = page.parent
    docs.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in a.seeds.split(",")]
    walls = [json.loads(p.read_text()) for p in sorted(Path(a.data).glob("*/*/wall.json"))]
    dates = sorted({w["date"] for w in walls})
    cmd = shlex.join(["python", "bench/results.py", *portable(argv_main)])
    shared = sorted({(w.get("jobs", 1), w.get("threads")) for w in walls if w.get("jobs", 1) > 1})
    L = ["# Results" + (" (quick smoke run: tiny random models, not results)" if a.quick else ""), "",
         f"Generated by `{cmd}` on {datetime.date.today().isoformat()} from runs made on {', '.join(dates)}: "
         f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, no GPU. Every figure comes from "
         f"the runs' files under `{portable([str(Path(a.data))])[0]}/<table>/<run>/` (committed: config.json, "
         "metrics.jsonl, ledger.jsonl, heldout_examples.json with the per-example held-out values, wall.json), so "
         "`python bench/results.py --collect` writes this page again from a fresh clone; the per-example values are "
         "checked against metrics.jsonl first.", "",
         "**The protocol, the same for every row.** Each method's learning rate was chosen on the validation split "
         "(`--val_samples`, carved from the training data by the master seed; the held-out sets never chose "
         "anything) from three values a decade wide around the script's default (x1/3, x1, x3), at the table's "
         "budget and seed 42: the best validation accuracy after the last round (ties: the lower validation loss; "
         "Dolly: the lower validation loss). ZO's eps stays 1e-3. The chosen lr then ran under seeds 43 and 44 (the "
         "seed moves the partition, the client sampling, the z draws, a new head's initialisation); a row is the "
         "mean ± standard deviation over the three seeds, and each seed's Δ is paired with its own baseline on the "
         "same held-out examples (95% percentile bootstrap, 2,000 resamples; `*`: the interval excludes 0).", "",
         "**Costs.** Bytes are means per participating client per round. *Peak memory* is one definition in the three "
         "scripts (tasks/memory.py): the tensors a client holds (the model's weights, and per method w0, a compute "
         "copy, fp32 masters) plus the peak of the tensors its first local step allocates and keeps alive at once "
         "(activations and logits; for an optimizer step also gradients and optimizer state), as tensor bytes. "
         "*Client s* is a client's compute per round (its sync and local steps), from the seed-44 run, which ran "
         "alone on the machine; *minutes* are the rounds' wall time (evaluation included) under the load the runs "
         + ("shared: " + "; ".join(f"{j} at a time with {t} thread(s) each" for j, t in shared) if shared else
            "ran under") + ", so they compare only within a table.", ""]
    by = {}
    for r in rows:
        by.setdefault(r[0], []).append(r)

    # SST-2
    if "sst2" in by:
        first = Run(Path(a.data) / "sst2" / run_name("fedkseed", chosen_lr(a, "sst2", "fedkseed", 1e-5)))
        n = len(first.last["correct"])
        L += [f"## SST-2, prompt-based (dev.tsv, {n} sentences, `{a.sft_model}` scoring label words)", "",
              f"Matched budget: every method sees {first.examples_seen():,} training examples (3 rounds; 10 iid "
              "clients, 2 a round, 16 steps of 16; the centralized run takes the round's 32 steps itself). The "
              "template is chosen on the validation sentences (`--template auto`); round 0 is zero-shot with it. "
              "FedKSeed's forwards run in bfloat16 over float32 weights (`--compute_dtype bfloat16`), the AdamW "
              "runs in float32: each run's Δ is paired with its own round 0 (zero-shot in its dtype).", ""]
        table, got = classification_table(a, "sst2", by["sst2"], seeds, "its round 0", lambda r: r.first)
        zero = {dt: [float(acc(r.first, np.arange(n))) for r in got[k]] for dt, k in (("bfloat16", "fedkseed"),
                                                                                      ("float32", "fedavg"))}
        L += [table[0], table[1]] + [f"| zero-shot, {dt} forwards | – | {mean_std(v, 2, 100)} | – | – | – | – | – |"
                                     for dt, v in zero.items()] + table[2:]
        zo = [k for _, k, _, script, _, _ in by["sst2"] if script == "fedkseed.py"]
        best = max(zo, key=lambda k: np.mean([float(acc(r.last, np.arange(n))) for r in got[k]]))
        label = next(lab for _, k, lab, _, _, _ in by["sst2"] if k == best)
        d = pooled(acc, [r.last for r in got[best]], [r.last for r in got["fedit"]])
        L += ["", f"The best FedKSeed row, {label}, against FedIT, paired over the same sentences and pooled over the "
              f"{len(got[best])} seeds (seed s against seed s): {fmt_d(d[0], d[1], 2, 100)} points of dev accuracy.",
              ""]
        L += sst2_plots(a, got, docs)

    # MRPC
    if "mrpc" in by:
        some = Run(Path(a.data) / "mrpc" / run_name("fedcybgd", chosen_lr(a, "mrpc", "fedcybgd", 4e-4)))
        labels = some.last["label"]
        majority = int(np.mean(labels) >= 0.5)  # the dev set's majority class
        base = {"correct": [int(y == majority) for y in labels]}
        L += [f"## MRPC (GLUE dev, {len(labels)} pairs, `{a.glue_model}` + a new classifier head)", "",
              f"Matched budget: every method sees {some.examples_seen():,} training examples. FedCyBGD runs the "
              "official GLUE regime ([fedcybgd](fedcybgd.md): 24 clients, each turn the next 2 batches of 64 of one "
              "stream over the training set, 4 of the encoder's 6 layers a turn, linear decay); FedAvg 6 iid clients, "
              "all every round, AdamW steps of 16; centralized one client, the same steps. Δ is paired with always "
              f"predicting dev's majority class ({'positive' if majority else 'negative'}: "
              f"{100 * np.mean(base['correct']):.1f}% of dev).", ""]
        table, got = classification_table(a, "mrpc", by["mrpc"], seeds, "the majority class", lambda r: base)
        L += table
        d = pooled(acc, [r.last for r in got["fedcybgd"]], [r.last for r in got["fedavg"]])
        f = [float(f1(r.last, np.arange(len(labels)))) for r in got["fedcybgd"]]
        L += ["", f"FedCyBGD against FedAvg, paired over the same pairs and pooled over the {len(seeds)} seeds: "
              f"{fmt_d(d[0], d[1], 2, 100)} points of dev accuracy (FedCyBGD's F1 {mean_std(f, 1)}).", ""]
        series = [(lab, [(r["round"], 100 * np.mean([run.metrics[i]["accuracy"] for run in got[k]]))
                         for i, r in enumerate(got[k][0].metrics) if r.get("accuracy") is not None])
                  for _, k, lab, _, _, _ in by["mrpc"]]
        svg_chart(series, "round", "dev accuracy (%, mean over seeds)", "MRPC: dev accuracy per round",
                  docs / "results_mrpc.svg")
        L += ["![MRPC dev accuracy per round](results_mrpc.svg)", ""]

    # Dolly
    if "dolly" in by:
        L += dolly_section(a, by["dolly"], [int(s) for s in a.dolly_seeds.split(",")], docs)

    L += ["## The runs", "", f"Every run's command is in its `wall.json` under `{portable([str(Path(a.data))])[0]}/`; a "
          "row's runs are `<key>-lr<lr>` (the grid, seed 42) and `<key>-s<seed>` (the chosen lr).", ""]
    for table, key, label, script, argv, default in rows:
        L.append(f"- {table} `{key}` ({label}): `python {script} {shlex.join(portable(argv))} --lr LR --seed SEED`")
    tasks.write_atomic(page, "\n".join(L) + "\n")


def sst2_plots(a, got, docs):
    series = {"examples": [], "bytes": [], "seconds": []}
    for key, runs in got.items():
        label = {"fedkseed": "FedKSeed", "fedkseed-fzoo": "FedKSeed FZOO", "fedkseed-pro": "FedKSeed-Pro",
                 "fedit": "FedIT", "fedavg": "FedAvg", "centralized": "centralized"}.get(key, key)
        r0 = runs[0]
        per = r0.examples_seen() // r0.config["rounds"]
        pts = {"examples": [], "bytes": [], "seconds": []}
        nbytes = secs = 0.0
        for i, r in enumerate(r0.metrics):
            if r["round"] > 0:
                nbytes += np.mean([(run.metrics[i]["upload_bytes"] or 0) + (run.metrics[i]["download_bytes"] or 0)
                                   for run in runs])
                secs += np.mean([run.metrics[i]["client_seconds"] for run in runs])
            if r.get("accuracy") is not None:
                v = 100 * np.mean([run.metrics[i]["accuracy"] for run in runs])
                pts["examples"].append((r["round"] * per, v))
                pts["bytes"].append((nbytes, v))
                pts["seconds"].append((secs, v))
        for k in series:
            series[k].append((label, pts[k]))
    svg_chart(series["examples"], "training examples seen", "dev accuracy (%, mean over seeds)",
              "SST-2: accuracy against examples", docs / "results_sst2_examples.svg")
    svg_chart(series["bytes"], "bytes up + down per participating client (log)", "dev accuracy (%)",
              "SST-2: accuracy against communication", docs / "results_sst2_bytes.svg", logx=True)
    svg_chart(series["seconds"], "client compute, all clients (s)", "dev accuracy (%)",
              "SST-2: accuracy against client compute", docs / "results_sst2_seconds.svg")
    return ["![SST-2 accuracy against examples seen](results_sst2_examples.svg)", "",
            "![SST-2 accuracy against bytes](results_sst2_bytes.svg)", "",
            "![SST-2 accuracy against client seconds](results_sst2_seconds.svg)", ""]


def dolly_section(a, rows_here, seeds, docs):
    L = ["## Dolly-15K, held-out category `summarization` (loss and Rouge-L)", "",
         "Matched budget: every method sees the same number of training examples (FedKSeed ZO steps of one example, "
         "the AdamW methods steps of two; FedCyBGD's clients each train one layer a turn). Δ is paired with the "
         "zero-shot model (each run's round 0) on the same held-out examples; Rouge-L: greedy, 64 new tokens, "
         f"`rouge-score`. Seeds: {', '.join(map(str, seeds))}.", "",
         "| method | lr grid: validation loss (chosen in bold) | held-out loss | Δ loss vs zero-shot [95%] | Rouge-L | "
         "Δ Rouge-L [95%] | up B/client/round | peak memory | minutes |", "|---|---|---:|---|---:|---|---:|---:|---:|"]
    series, zero = [], None
    for _, key, label, _, _, default in rows_here:
        lr, runs, grid = row_runs(a, "dolly", key, default, seeds)
        if zero is None and "rouge" in runs[0].first:
            zero = runs[0].first
        n = len(runs[0].last["tokens"])
        dl = [paired(loss, r.last, r.first) for r in runs]
        rg = [paired(rouge, r.last, zero) for r in runs if "rouge" in r.last and zero is not None]
        b = [r.budget() for r in runs]
        L.append(f"| {label} | {grid_cell(grid, lr, False)} | "
                 f"{mean_std([float(loss(r.last, np.arange(n))) for r in runs], 4)} | "
                 + "; ".join(fmt_d(v, lh, 4) for v, lh in dl) + " | "
                 + (mean_std([float(rouge(r.last, np.arange(n))) for r in runs], 4) if rg else "–") + " | "
                 + ("; ".join(fmt_d(v, lh, 4) for v, lh in rg) if rg else "–")
                 + f" | {fmt_b(np.mean([x['up'] for x in b]))} | {fmt_b(max(x['memory'] or 0 for x in b))} | "
                 f"{np.mean([x['minutes'] for x in b]):.1f} |")
        per = runs[0].examples_seen() // runs[0].config["rounds"]
        series.append((label, [(m["round"] * per, m["eval_loss"]) for m in runs[0].metrics
                               if m.get("eval_loss") is not None]))
    if zero is not None:
        L.insert(6, f"| zero-shot (pretrained) | – | {float(loss(zero, np.arange(len(zero['tokens'])))):.4f} | – | "
                    f"{float(rouge(zero, np.arange(len(zero['rouge'])))):.4f} | – | – | – | – |")
    svg_chart(series, "training examples seen", "held-out loss", "Dolly: held-out loss", docs / "results_dolly.svg")
    return L + ["", "![Dolly held-out loss against examples seen](results_dolly.svg)", ""]


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the whole pipeline")
    p.add_argument("--collect", action="store_true", help="train nothing: the page from --data alone")
    p.add_argument("--phase", choices=("all", "grid", "seeds"), default="all", help="grid: the lr grids only; seeds: "
                   "the --seeds at the chosen lrs only; all: both, then the page")
    p.add_argument("--seeds", default="42,43,44", help="the seeds of a row (42: the grid's run at the chosen lr)")
    p.add_argument("--dolly_seeds", default="42", help="Dolly's seeds (its runs are the longest)")
    p.add_argument("--tables", default="sst2,mrpc,dolly", help="the tables to run and write")
    p.add_argument("--grid_points", type=int, choices=(1, 3), default=3, help="3: x1/3, x1, x3 around each default")
    p.add_argument("--runs", default=str(ROOT / "runs" / "results"), help="the runs' folders (weights: not committed)")
    p.add_argument("--data", default=str(ROOT / "results"), help="the runs' small files, committed")
    p.add_argument("--page", default=str(ROOT / "docs" / "RESULTS.md"), help="the page to write; plots beside it")
    p.add_argument("--dolly", default=str(ROOT / "data" / "dolly" / "databricks-dolly-15k.jsonl"))
    p.add_argument("--mrpc", default=str(ROOT / "data" / "glue" / "MRPC"))
    p.add_argument("--sst2", default=str(ROOT / "data" / "glue" / "SST-2"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time, each with OMP_NUM_THREADS = cores / jobs")
    p.add_argument("--sft_model", default="smollm2-135m")
    p.add_argument("--glue_model", default="minilm-l6")
    a = p.parse_args(argv)
    if a.jobs < 1:
        sys.exit(f"results: --jobs {a.jobs}: at least 1")
    rows = [r for r in rows_of(a) if r[0] in a.tables.split(",")]
    if not a.collect:
        for path in (a.dolly, a.mrpc, a.sst2):
            if not Path(path).exists():
                sys.exit(f"results: {path} not found (see docs/data.md, or pass --dolly / --mrpc / --sst2)")
        threads = max(1, (os.cpu_count() or 1) // a.jobs) if a.jobs > 1 else None
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        if a.phase in ("all", "grid"):
            run_phase(a, rows, "grid", None, env)
        if a.phase in ("all", "seeds"):
            run_phase(a, rows, "seeds", [int(s) for s in a.seeds.split(",") if s != "42"], env)
        if a.phase != "all":
            return
    write_page(a, rows, Path(a.page), argv if argv is not None else sys.argv[1:])
    print(f"wrote {a.page}")


if __name__ == "__main__":
    main()
