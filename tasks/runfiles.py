"""The run's files and progress: rich progress bars, the files every run writes (config.json, metrics.jsonl,
ledger.jsonl, heldout_examples.json, loss.png, the model in Hugging Face format), written atomically, and the
command-line wrapper that turns a user's mistake into one line.

    progress = tasks.Progress(rounds=(total, done), clients=n, ...)   # rich bars on a terminal; none elsewhere
    progress.reset(name, total, description); progress.advance(name); progress.log(text); progress.close()

    files = tasks.RunFiles(folder, active=transport.is_server)   # active=False: every method does nothing
    files.start(config, resumed_round)   # config.json; metrics.jsonl/ledger.jsonl emptied, or cut after a resume
    files.metric(row); files.ledger(lines); files.plot(title, turns)
    row = tasks.round_row(rnd, t0, turns, evaluation); progress.log(tasks.round_line(row))   # a round's metrics

    tasks.export_model(model, tokenizer, folder); tasks.write_atomic(path, text); tasks.save_atomic(path, write)
    tasks.run_cli("fedkseed", fn, *args)   # ConfigError/DataError/ModelError -> one line, exit 2; GroupError -> 3
"""
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import ConfigError, DataError, GroupError, ModelError
from .sources import read_jsonl


# ----------------------------------------------------------------------------------------------------
# progress: rich bars on a terminal; nothing but the log lines elsewhere
# ----------------------------------------------------------------------------------------------------
class Progress:
    """Named progress bars with ETA on a terminal (Progress(rounds=(total, done), steps=total)); where stdout is
    not a terminal (a log file, a non-zero rank) the bars do nothing and `log` prints plain lines."""

    def __init__(self, **bars):
        self.bar, self.ids = None, {}
        if not sys.stdout.isatty():
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bars, TextColumn, TimeRemainingColumn
        self.bar = Bars(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TextColumn("eta"),
                        TimeRemainingColumn())
        self.bar.start()
        for name, total in bars.items():
            total, done = total if isinstance(total, tuple) else (total, 0)
            self.ids[name] = self.bar.add_task(name, total=total, completed=done)

    def reset(self, name, total=None, description=None):
        if self.bar:
            self.bar.reset(self.ids[name], total=total, description=description or name)

    def advance(self, name, n=1):
        if self.bar:
            self.bar.advance(self.ids[name], n)

    def start(self, name, total):
        """Show bar `name` for a piece of long work (an evaluation): added the first time, restarted after. Without
        a terminal, one line says the work started (so a slow evaluation cannot be taken for a hang)."""
        if not self.bar:
            print(f"{name}: {total} examples ...", flush=True)
        else:
            if name in self.ids:
                self.bar.reset(self.ids[name], total=total, visible=True)
            else:
                self.ids[name] = self.bar.add_task(name, total=total)

    def done(self, name):
        """Hide the bar `start` showed, until its next start."""
        if self.bar and name in self.ids:
            self.bar.update(self.ids[name], visible=False)

    def log(self, text):
        if self.bar:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar:
            self.bar.stop()


# ----------------------------------------------------------------------------------------------------
# the run's files: written by the server's process only, each replaced atomically or appended a line at a time
# ----------------------------------------------------------------------------------------------------
def export_model(model, tokenizer, folder):
    """Write `model` and `tokenizer` with save_pretrained (config, safetensors weights, tokenizer files) to
    `folder`, atomically: a temporary folder beside it is renamed over the old one only once complete, so a
    crash mid-write leaves the previous export (or none), never half of one."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def write_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_atomic(path, write):
    """write(temporary path), then rename it over `path`: a crash mid-write leaves the previous file intact."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000


def read_run_jsonl(path):
    """A run's metrics.jsonl or ledger.jsonl -> its rows ([] before the file exists); a bad line names file:line."""
    return [row for _, row in read_jsonl(path)] if Path(path).exists() else []


class RunFiles:
    """config.json, metrics.jsonl (one line per round, round 0 = before training), ledger.jsonl (the bytes of
    every message) and loss.png in `folder`. With active=False (a rank that is not the server) nothing is
    written; `metrics` still holds what was logged."""

    def __init__(self, folder, active=True):
        self.folder, self.active = Path(folder), active
        self.metrics_path, self.ledger_path = self.folder / "metrics.jsonl", self.folder / "ledger.jsonl"
        self.metrics, self.turns = [], []

    def start(self, config, resumed_round=None):
        """Write config.json; empty metrics.jsonl and ledger.jsonl, or after a resume from round R keep their lines
        of rounds <= R (what a crash left after the checkpoint runs again, bit for bit)."""
        keep = (lambda rows: [r for r in rows if r["round"] <= resumed_round]) if resumed_round is not None else (
            lambda rows: [])
        self.metrics = keep(read_run_jsonl(self.metrics_path))
        ledger = keep(read_run_jsonl(self.ledger_path))
        self.turns = [e for e in ledger if "loss" in e and "turn" in e]
        if not self.active:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "config.json", json.dumps(config, indent=2))
        write_atomic(self.metrics_path, "".join(json.dumps(m) + "\n" for m in self.metrics))
        write_atomic(self.ledger_path, "".join(json.dumps(e) + "\n" for e in ledger))

    def metric(self, row):
        self.metrics.append(row)
        if self.active:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def ledger(self, lines):
        self.turns += [e for e in lines if "loss" in e and "turn" in e]
        if self.active:
            with open(self.ledger_path, "a") as f:
                f.writelines(json.dumps(e) + "\n" for e in lines)

    def heldout_examples(self, rnd, values):
        """Keep the per-example held-out values (tasks.evaluate's per_example) of round 0 and of the latest evaluation
        in heldout_examples.json, so the end of a run (a resumed one too) can say whether its change is larger than
        the evaluation's noise (`change_line`)."""
        if not self.active or not values:
            return
        path = self.folder / "heldout_examples.json"
        kept = json.loads(path.read_text()) if path.is_file() and rnd > 0 else {}
        kept["first" if rnd == 0 else "last"] = {"round": rnd, **values}
        write_atomic(path, json.dumps(kept))

    def change_line(self):
        """'held-out loss 2.3468 -> 2.3412: change -0.0056, 95% paired bootstrap interval [-0.0070, -0.0042] over 48
        examples (beyond the evaluation's noise)', from heldout_examples.json; None without both ends."""
        from .bootstrap import accuracy_of, paired_interval, token_weighted_loss
        path = self.folder / "heldout_examples.json"
        kept = json.loads(path.read_text()) if self.active and path.is_file() else {}
        if "first" not in kept or "last" not in kept:
            return None
        first, last = kept["first"], kept["last"]
        name, stat = ("held-out loss", token_weighted_loss) if "loss_sum" in first else ("accuracy", accuracy_of)
        keys = ("loss_sum", "tokens") if "loss_sum" in first else ("correct",)
        first, last = ({k: d[k] for k in keys} for d in (first, last))
        delta, lo, hi = paired_interval(first, last, stat)
        every = list(range(len(first[keys[0]])))
        noise = "beyond the evaluation's noise" if lo > 0 or hi < 0 else "within the evaluation's noise"
        return (f"{name}: round {kept['first']['round']} {stat(first, every):.4f} -> round {kept['last']['round']} "
                f"{stat(last, every):.4f}: change {delta:+.4f}, 95% paired bootstrap interval [{lo:+.4f}, {hi:+.4f}] "
                f"over {len(every)} examples ({noise})")

    def wire_summary(self):
        """Lines on the bytes of the ledger: under torchrun what each rank's collectives moved per round, and the mean
        message per client per round of the clients that answered."""
        entries, lines = read_run_jsonl(self.ledger_path) if self.active else [], []
        for r in sorted({e["rank"] for e in entries if "rank" in e}):
            mine = [e for e in entries if e.get("rank") == r]
            lines.append(f"collectives, rank {r}: mean per round {sum(e['sent'] for e in mine) / len(mine):,.0f} B "
                         f"sent, {sum(e['received'] for e in mine) / len(mine):,.0f} B received")
        answered = [e for e in entries if "client" in e and "dropped" not in e and "upload_bytes" in e]
        if answered:
            up, down = (sum(e[k] for e in answered) / len(answered) for k in ("upload_bytes", "download_bytes"))
            lines.append(f"communication: mean per client per round {up:,.0f} B up + {down:,.0f} B down = "
                         f"{up + down:,.0f} B")
        return lines

    def plot(self, title):
        """loss.png: train loss (per round, or per client turn where the ledger has turns) and held-out loss, in
        two panels with their own scales (ZO moves the held-out loss far less than clients differ). -> the path,
        or None without matplotlib, on a non-server rank, or when the plot fails (one line says why: a plot never
        decides whether a run succeeds; the scripts export the model before they plot)."""
        if not self.active:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
        except ImportError:
            return None
        try:
            return self._plot(title)
        except Exception as e:  # noqa: BLE001  a value no axis can hold, a full disk: the run itself is done
            print(f"loss.png not written: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            return None

    def _plot(self, title):
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        if self.turns:
            axes[0].plot([(t["turn"] + 1) / t["turns_per_round"] for t in self.turns], [t["loss"] for t in self.turns],
                         ".", ms=3, alpha=0.6, color="C0")
            axes[0].set_title("train loss (client turns)", fontsize=10)
        else:
            points = [(r["round"], r["train_loss"]) for r in self.metrics if r.get("train_loss") is not None]
            if points:
                axes[0].plot(*zip(*points), "o-", color="C0")
            axes[0].set_title("train loss (the round's clients)", fontsize=10)
        points = [(r["round"], r["eval_loss"]) for r in self.metrics if r.get("eval_loss") is not None]
        if points:
            axes[1].plot(*zip(*points), "s-", color="C1")
        axes[1].set_title("held-out loss (global model)", fontsize=10)
        for ax in axes:
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("loss")
        fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        path = self.folder / "loss.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def round_row(rnd, t0, turns, evaluation):
    """metrics.jsonl's row of round `rnd`, keys in this order: round; train_loss, the mean loss of the clients whose
    upload the server took; the evaluation's metrics (none in a round without one); upload_bytes and download_bytes,
    means per client turn (a client left out, marked "dropped", counts its download and 0 bytes up), and their
    _totals; seconds since t0; peak_memory_bytes, the max over the clients taken; client_seconds, summed and popped
    from the turns (the ledger lines carry no timings); dropped, the clients left out; train_loss leaves out a client
    whose loss is not finite (a ZO client whose every step failed). turns: the round's ledger lines
    of its clients ("loss", "upload_bytes", "download_bytes", "peak_memory_bytes", "client_seconds"). Round 0 (no
    turns): the evaluation before training, with train_loss, the bytes and the memory None."""
    if rnd == 0:
        return {"round": 0, "train_loss": None, **evaluation, "upload_bytes": None, "download_bytes": None,
                "seconds": round(time.time() - t0, 2), "peak_memory_bytes": None}
    taken = [t for t in turns if "dropped" not in t]
    losses = [t["loss"] for t in taken if math.isfinite(t["loss"])]  # a client whose every step failed: no loss
    up, down = [t["upload_bytes"] for t in turns], [t["download_bytes"] for t in turns]
    return {"round": rnd, "train_loss": sum(losses) / len(losses) if losses else None, **evaluation,
            "upload_bytes": sum(up) / len(turns), "download_bytes": sum(down) / len(turns),
            "upload_bytes_total": sum(up), "download_bytes_total": sum(down), "seconds": round(time.time() - t0, 2),
            "peak_memory_bytes": max((t["peak_memory_bytes"] for t in taken), default=None),
            "client_seconds": round(sum(t.pop("client_seconds") for t in turns), 2),
            "dropped": [t["client"] for t in turns if "dropped" in t]}


def round_line(row):
    """A round_row as one console line: its float metrics, then the bytes per client turn and the seconds."""
    values = " ".join(f"{k} {v:.4f}" for k, v in row.items()
                      if isinstance(v, float) and k != "seconds" and "bytes" not in k)
    if row["round"] == 0:
        return f"round 0 {values} (evaluation {row['seconds']:.0f}s)"
    return (f"round {row['round']} {values} up {fmt_bytes(row['upload_bytes'])} down "
            f"{fmt_bytes(row['download_bytes'])} {row['seconds']:.0f}s")


# ----------------------------------------------------------------------------------------------------
# the command line: every user error is one line
# ----------------------------------------------------------------------------------------------------
def run_cli(name, fn, *args):
    """fn(*args) as a command. A user's mistake (ConfigError, DataError, ModelError) -> `error: ...` on stderr,
    exit 2; a lost rank (GroupError) -> one line, exit 3 at once (tearing down a process group that lost a rank
    can block); Ctrl-C -> how to resume, exit 130."""
    try:
        return fn(*args)
    except (ConfigError, DataError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except GroupError as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)
        os._exit(3)
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last complete round", file=sys.stderr)
        sys.exit(130)
