"""Transports: where each client lives and how the messages reach it. One process, torchrun ranks; Flower's is
flower/fedfull_flower/transport.py.

    transport = tasks.transport_from_env(device)    # Transport() in one process; Ranks under torchrun
    transport.join(timeout)                          # torchrun: form the process group (after loading the model)
    transport.is_server, transport.mine(clients)     # rank 0 is the server; client c lives on rank c % world
    transport.on_server(fn, *a)                      # fn(*a) on the server's process, None elsewhere
    transport.scatter(messages, clients, width)      # server's {client: bytes} -> each client's rank
    transport.gather(items, clients, width, keys)    # every rank's {client: (bytes, stats)} -> the server, in order
    transport.broadcast(message, stats, client, keys)  # client's rank -> every rank
    transport.exchange(fn, run, rnd, sent, clients, widths, keys, tags)  # every client's fn(run, rnd, c, sent[c])
                                                     # where it lives -> {c: (upload, stats)} of those that answered
    transport.from_client(client, keys, fn, run, rnd, download, tag, longest)  # one client's fn, its result on
                                                     # every rank
    transport.wire_ledger(round, clients)            # ledger lines: bytes each rank's collectives moved this round
    transport.data_size(client, held)                # the data size the server weights a client by

A round loop calls these without asking which transport it has: in one process `scatter`/`gather`/`broadcast`
hand the messages through, `on_server` calls, and `wire_ledger` is empty. Under torchrun every message crosses
as a uint8 tensor of exactly the bytes the ledger counts. On Flower (flower/fedfull_flower/transport.py) the server's process runs
the loop and every client lives on a SuperNode: `exchange` and `from_client` send each node its clients'
downloads and return the replies that came back in time; a client that is offline, late or failing is left out
(`dropped`), and the loop goes on without it.

What a client does with one message is one function of the script, fn(run, rnd, client, download) -> (upload
bytes, stats dict), and every transport calls that same function: here in this process, under torchrun on the
client's rank, on Flower in the ClientApp of the client's node.
"""
import datetime
import os
import signal

import numpy as np
import torch

from .errors import GroupError


class Transport:
    """One process: every client lives here and nothing crosses a process boundary."""
    rank, world = 0, 1
    keeps_client_state = False  # Flower: each client's state lives on its node, which checks it (tags)
    declares_sizes = False  # Flower's deployment mode: the clients' data sizes are their nodes' declarations

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

    def from_client(self, client, keys, fn, run, rnd, download, tag=None, longest=None):
        """Client `client`'s work: fn(run, rnd, client, download) -> (message, stats) on the rank where the client
        lives, then its message and the stats named by `keys` on every rank (`broadcast`). Flower returns
        (None, {"dropped": why}) for a client that did not answer, or whose upload is longer than `longest`."""
        message, stats = fn(run, rnd, client, download) if client % self.world == self.rank else (b"", None)
        return self.broadcast(message, stats, client, keys)

    def wire_ledger(self, rnd, clients):
        return []

    def data_size(self, client, held):
        """The data size the server weights `client` by: here `held`, the size of the client's partition, which the
        server computes from its own copy of the data set (the research simulation). Flower's deployment mode
        (`declares_sizes`) returns 1 for every client, or with the run config's `max-declared-size` set what the
        client's node declared when it joined, capped at it."""
        return held

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


def accept_replies(replies, clients, dropped, check, log):
    """Server: the round's replies {client: (upload, stats)} -> those it takes, in `clients` order. A client with no
    reply, or whose upload `check(client, upload)` finds a reason to refuse, is left out with one logged line, and
    `dropped` (client -> reason, filled by the transport for the clients that did not answer) gets its reason."""
    accepted = {}
    for c in clients:
        if c not in replies:
            dropped.setdefault(c, "no reply")
            continue
        why = check(c, replies[c][0])
        if why is None:
            accepted[c] = replies[c]
        else:
            dropped[c] = f"bad upload: {why}"
    for c, why in dropped.items():
        log(f"client {c} left out of the round: {why}")
    return accepted
