"""Run plumbing the three scripts share, none of it the algorithm: one-process vs torchrun (a transport), the
progress display, the run's files (config, metrics, ledger, plot, atomic writes), and the command-line wrapper.

    transport = tasks.transport_from_env(device)    # Transport() in one process; Ranks under torchrun
    transport.join(timeout)                          # torchrun: form the process group (after loading the model)
    transport.is_server, transport.mine(clients)     # rank 0 is the server; client c lives on rank c % world
    transport.on_server(fn, *a)                      # fn(*a) on the server's process, None elsewhere
    transport.scatter(messages, clients, width)      # server's {client: bytes} -> each client's rank
    transport.gather(items, clients, width, keys)    # every rank's {client: (bytes, stats)} -> the server, in order
    transport.broadcast(message, stats, client, keys)  # client's rank -> every rank
    transport.exchange(fn, run, rnd, sent, clients, widths, keys, tags)  # every client's fn(run, rnd, c, sent[c])
                                                     # where it lives -> {c: (upload, stats)} of those that answered
    transport.from_client(client, keys, fn, run, rnd, download, tag)  # one client's fn, its result on every rank
    transport.wire_ledger(round, clients)            # ledger lines: bytes each rank's collectives moved this round

A round loop calls these without asking which transport it has: in one process `scatter`/`gather`/`broadcast`
hand the messages through, `on_server` calls, and `wire_ledger` is empty. Under torchrun every message crosses
as a uint8 tensor of exactly the bytes the ledger counts. On Flower (tasks/flower.py) the server's process runs
the loop and every client lives on a SuperNode: `exchange` and `from_client` send each node its clients'
downloads and return the replies that came back in time; a client that is offline, late or failing is left out
(`dropped`), and the loop goes on without it.

What a client does with one message is one function of the script, fn(run, rnd, client, download) -> (upload
bytes, stats dict), and every transport calls that same function: here in this process, under torchrun on the
client's rank, on Flower in the ClientApp of the client's node.

    progress = tasks.Progress(rounds=(total, done), clients=n, ...)   # rich bars on a terminal; none elsewhere
    progress.reset(name, total, description); progress.advance(name); progress.log(text); progress.close()

    files = tasks.RunFiles(folder, active=transport.is_server)   # active=False: every method does nothing
    files.start(config, resumed_round)   # config.json; metrics.jsonl/ledger.jsonl emptied, or cut after a resume
    files.metric(row); files.ledger(lines); files.plot(title, turns)

    tasks.run_cli("fedkseed", fn, *args)   # ConfigError/DataError/ModelError -> one line, exit 2; GroupError -> 3
"""
import datetime
import json
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .models import ModelError
from .outputs import read_jsonl, write_atomic
from .sources import DataError


class ConfigError(Exception):
    """A user-caused problem with a flag, the model or a checkpoint: printed as one line, exit code 2."""


class GroupError(Exception):
    """A rank exited or hangs: the run stops with one line (exit code 3); --resume restarts the group."""


# ----------------------------------------------------------------------------------------------------
# flags: the checks every script makes, with the same words
# ----------------------------------------------------------------------------------------------------
def fill_task_defaults(args, defaults, datasets):
    """Flags left at None take the --task's defaults; a --dataset of another task is a ConfigError."""
    for k, v in defaults[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dataset not in datasets[args.task]:
        raise ConfigError(f"--dataset {args.dataset} is not a {args.task} dataset: choose one of "
                          f"{', '.join(datasets[args.task])}")


def check_at_least(args, names, low):
    for name in names:
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be at least {low}")


def check_finite(args, names, low=0.0, strict=True, note=""):
    """Each flag finite and > low (>= low with strict=False). nan fails every comparison and inf passes '> 0',
    so finiteness is tested first."""
    for name in names:
        v = getattr(args, name)
        if not (math.isfinite(v) and (v > low if strict else v >= low)):
            raise ConfigError(f"--{name} {v}: must be a finite number {'>' if strict else '>='} {low:g}{note}")


def check_sampling(m, num_clients, data_path=None):
    if not 0.0 < m <= 1.0:
        raise ConfigError(f"-m {m}: the client sampling ratio must be in (0, 1]")
    if sampled_per_round(num_clients, m) < 1:
        raise ConfigError(f"-m {m} x --num_clients {num_clients} samples no client per round: "
                          f"use -m >= {1 / num_clients:g}")
    if data_path and not Path(data_path).exists():
        raise ConfigError(f"--data_path {data_path} not found")


def sampled_per_round(num_clients, m):
    return int(num_clients * m + 1e-9)  # int(N*m) as the official codes, without 200*0.29 -> 57.99 -> 57


def sample_clients(seed, rnd, num_clients, n_sampled):
    """The round's clients, sorted: a function of (seed, round) only, so resume and every rank agree."""
    return np.sort(np.random.default_rng([seed, 1, rnd]).choice(num_clients, n_sampled, replace=False)).tolist()


# ----------------------------------------------------------------------------------------------------
# transport: one process, or torchrun ranks
# ----------------------------------------------------------------------------------------------------
class Transport:
    """One process: every client lives here and nothing crosses a process boundary."""
    rank, world = 0, 1
    keeps_client_state = False  # Flower: each client's state lives on its node, which checks it (tags)

    def __init__(self, device="cpu"):
        self.device = device  # each rank's compute device
        self.dropped = {}  # the last exchange's clients that did not answer -> why (Flower only)

    def describe(self):
        """What the start-up line says of the transport ("" here)."""
        return ""

    @property
    def is_server(self):
        return self.rank == 0

    def join(self, timeout):
        pass

    def close(self):
        pass

    def mine(self, clients):
        """The clients that live on this process: client c on rank c % world, every round, so whatever a client
        keeps between rounds stays on one rank."""
        return [c for c in clients if c % self.world == self.rank]

    def on_server(self, fn, *args, **kwargs):
        """The server's work: fn(*args) on rank 0 -> its result; None on the other ranks."""
        return fn(*args, **kwargs) if self.is_server else None

    def scatter(self, messages, clients, width):
        return {c: messages[c] for c in self.mine(clients)}

    def gather(self, items, clients, width, keys):
        return [items[c] for c in clients]

    def broadcast(self, message, stats, client, keys):
        return message, stats

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        """Round `rnd`'s client work, each client where it lives: fn(run, rnd, c, download) -> (upload, stats) for
        every c in `clients` -> {c: (upload, stats)} on the server (None elsewhere), for the clients that answered,
        in `clients` order: in one process and under torchrun every client answers (a lost rank is a GroupError).
        sent: the server's {client: download} (None off the server); widths: (longest download, longest upload);
        keys: the stats that travel with an upload; tags: Flower's record of client state (ignored here)."""
        downloads = self.scatter(sent, clients, widths[0])
        results = {c: fn(run, rnd, c, downloads[c]) for c in self.mine(clients)}
        gathered = self.gather(results, clients, widths[1], keys)
        return dict(zip(clients, gathered)) if self.is_server else None

    def from_client(self, client, keys, fn, run, rnd, download, tag=None):
        """Client `client`'s work: fn(run, rnd, client, download) -> (message, stats) on the rank where the client
        lives, then its message and the stats named by `keys` on every rank (`broadcast`). Flower returns
        (None, {"dropped": why}) for a client that did not answer."""
        message, stats = fn(run, rnd, client, download) if client % self.world == self.rank else (b"", None)
        return self.broadcast(message, stats, client, keys)

    def wire_ledger(self, rnd, clients):
        return []

    def lost_rank(self, error, rnd, last_round, timeout):
        """A GroupError -> the one line that says what happened and how to go on. last_round: the round of the
        server's last checkpoint, None when there is none."""
        why = (f"a rank did not answer within {timeout:g} s" if str(error) == "timeout"
               else str(error) if "launcher" in str(error) else "a rank exited")
        if not self.is_server:
            last = "rank 0 keeps the last complete round in its checkpoint: rerun every rank with --resume"
        elif last_round is None:
            last = "no round was completed: rerun"
        else:
            last = f"the last complete checkpoint is round {last_round}: rerun every rank with --resume"
        return GroupError(f"rank {self.rank}: {why} in round {rnd}; {last}")


class Ranks(Transport):
    """torchrun: rank 0 is the server; client c lives on rank c % world. Messages cross as uint8 tensors, and
    each collective adds what it moved to a per-rank count that `wire_ledger` reports and resets: tensor
    payloads, padding included; the transport's own framing (gloo/NCCL headers, TCP) is not counted."""

    def __init__(self, rank, world, device):
        super().__init__(device)
        self.rank, self.world = rank, world
        self.wire = torch.device(device if device.startswith("cuda") else "cpu")  # where collectives run
        self.moved = [[0, 0] for _ in range(world)]  # per rank: [sent, received] this round

    def join(self, timeout):
        """Form the process group: gloo on CPU, NCCL on CUDA. Call it only once the model and tokenizer are
        loaded: loading them with transformers while a group exists keeps a reference to it, so that
        `destroy_process_group()` at the end cannot free gloo's worker threads, and tearing them down during
        interpreter exit could abort the process ("terminate called without an active exception")."""
        import torch.distributed as dist
        backend = "gloo"
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
            backend = "nccl"
        # every collective gives up after `timeout` seconds instead of waiting forever for a lost rank
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except RuntimeError:
            raise GroupError(f"rank {self.rank}: the process group did not form within {timeout:g} s (check the "
                             "launch command on every machine)") from None

        def stopped_by_launcher(signum, frame):  # torchrun sends SIGTERM to the others when one rank fails
            raise GroupError("stopped by the launcher: a rank exited (or the launcher itself was stopped)")

        signal.signal(signal.SIGTERM, stopped_by_launcher)

    def close(self):
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

    @staticmethod
    def _collective(fn, *a, **kw):
        """One torch.distributed call; a lost rank (timeout or closed connection) becomes a GroupError."""
        try:
            return fn(*a, **kw)
        except RuntimeError as e:  # torch.distributed.DistError and gloo/NCCL errors are RuntimeErrors
            raise GroupError("timeout" if "timed out" in str(e).lower() or "timeout" in str(e).lower()
                             else "a rank left the group") from None

    def _rows(self, clients):
        """Rows of each rank's scatter/gather tensor: collectives need equal shapes, so the largest rank's count."""
        return max(sum(c % self.world == r for c in clients) for r in range(self.world))

    def scatter(self, messages, clients, width):
        """Rank 0's {client: message} -> each client's own rank. One `dist.scatter` of uint8 tensors
        [rows, 4 + width]: row i = the rank's i-th client (uint32 length + message, zero padded to `width`, the
        longest possible message). Each rank receives only its own clients' messages."""
        import torch.distributed as dist
        rows, row = self._rows(clients), 4 + width
        parts = None
        if self.is_server:
            parts = []
            for r in range(self.world):
                buf = np.zeros((rows, row), dtype=np.uint8)
                for i, c in enumerate(c for c in clients if c % self.world == r):
                    buf[i, :4] = np.frombuffer(np.uint32(len(messages[c])).tobytes(), np.uint8)
                    buf[i, 4:4 + len(messages[c])] = np.frombuffer(messages[c], np.uint8)
                parts.append(torch.from_numpy(buf).to(self.wire))
        mine = torch.empty((rows, row), dtype=torch.uint8, device=self.wire)
        self._collective(dist.scatter, mine, parts, src=0)
        self._count(0, rows * row, receivers=range(1, self.world))
        got = mine.cpu().numpy()
        return {c: got[i, 4:4 + int(got[i, :4].view(np.uint32)[0])].tobytes() for i, c in enumerate(self.mine(clients))}

    def gather(self, items, clients, width, keys):
        """Every rank's {client: (message, stats dict)} -> rank 0, as a list in `clients` order (None elsewhere).
        One `dist.gather` of uint8 [rows, 4 + 8 len(keys) + width] from each rank: row i holds the rank's i-th
        client (uint32 message length, the stats named by `keys` as float64 -- for the metrics only --, the
        message, zeros up to `width`); a rank with fewer clients sends rows of zeros."""
        import torch.distributed as dist
        rows, head = self._rows(clients), 4 + 8 * len(keys)
        buf = np.zeros((rows, head + width), dtype=np.uint8)
        for i, c in enumerate(self.mine(clients)):
            msg, stats = items[c]
            buf[i, :head] = np.frombuffer(np.uint32(len(msg)).tobytes()
                                          + np.array([stats[k] for k in keys], np.float64).tobytes(), np.uint8)
            buf[i, head:head + len(msg)] = np.frombuffer(msg, np.uint8)
        mine = torch.from_numpy(buf).to(self.wire)
        parts = [torch.empty_like(mine) for _ in range(self.world)] if self.is_server else None
        self._collective(dist.gather, mine, parts, dst=0)
        for r in range(1, self.world):
            self._count(r, buf.nbytes, receivers=[0])
        if not self.is_server:
            return None
        got = {}
        for r, part in enumerate(parts):
            part = part.cpu().numpy()
            for i, c in enumerate(c for c in clients if c % self.world == r):
                n = int(part[i, :4].view(np.uint32)[0])
                values = part[i, 4:head].view(np.float64).tolist()
                got[c] = (part[i, head:head + n].tobytes(), dict(zip(keys, values)))
        return [got[c] for c in clients]

    def broadcast(self, message, stats, client, keys):
        """Client `client`'s message and stats -> every rank. Two `dist.broadcast`s from its rank: a float64
        header [length, *stats[keys]] (stats for the metrics only; float64 holds them exactly), then the message
        as uint8[length]. -> (message, stats) on every rank."""
        import torch.distributed as dist
        src = client % self.world
        values = [len(message), *(stats[k] for k in keys)] if self.rank == src else [0.0] * (1 + len(keys))
        head = torch.tensor(values, dtype=torch.float64, device=self.wire)
        self._collective(dist.broadcast, head, src=src)
        n, *values = head.tolist()
        if self.rank == src:
            buf = torch.frombuffer(bytearray(message), dtype=torch.uint8).to(self.wire)
        else:
            buf = torch.empty(int(n), dtype=torch.uint8, device=self.wire)
        self._collective(dist.broadcast, buf, src=src)
        self._count(src, head.numel() * 8 + int(n), receivers=[r for r in range(self.world) if r != src])
        return (message if self.rank == src else buf.cpu().numpy().tobytes()), dict(zip(keys, values))

    def _count(self, sender, nbytes, receivers):
        for r in receivers:
            self.moved[sender][0] += nbytes
            self.moved[r][1] += nbytes

    def wire_ledger(self, rnd, clients):
        """The ledger.jsonl lines (with "rank") of round `rnd`: what each rank's collectives sent and received."""
        lines = [{"round": rnd, "rank": r, "clients": [c for c in clients if c % self.world == r],
                  "sent": self.moved[r][0], "received": self.moved[r][1]} for r in range(self.world)]
        self.moved = [[0, 0] for _ in range(self.world)]
        return lines


def transport_from_env(device):
    """-> the run's transport, from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): with a plain 'cuda',
    each rank takes GPU LOCAL_RANK. Nothing is joined yet: see `Ranks.join`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Transport(device)
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return Ranks(int(os.environ.get("RANK", "0")), world, device)


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
# the run's files: written by the server's process only
# ----------------------------------------------------------------------------------------------------
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
        self.metrics = keep(read_jsonl(self.metrics_path))
        ledger = keep(read_jsonl(self.ledger_path))
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
        from .lm import accuracy_of, paired_interval, token_weighted_loss
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

    def plot(self, title):
        """loss.png: train loss (per round, or per client turn where the ledger has turns) and held-out loss, in
        two panels with their own scales (ZO moves the held-out loss far less than clients differ). -> the path,
        or None without matplotlib (or on a non-server rank)."""
        if not self.active:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            return None
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


def save_atomic(path, write):
    """write(temporary path), then rename it over `path`: a crash mid-write leaves the previous file intact."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


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
