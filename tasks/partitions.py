"""Federated partitions: which example indices each client holds.

    iid        shuffle, then cut into num_clients nearly equal parts
    dirALPHA   label-Dirichlet (the FedKSeed / NIID-Bench recipe): for every label, draw client shares
               p ~ Dir(ALPHA, ..., ALPHA), give clients that already hold N/num_clients examples no more,
               and cut that label's examples by p; redraw everything until each client has >= min_size.
               Small ALPHA -> each client sees few labels; large ALPHA -> close to iid.
(One client per task, for Natural Instructions, is built by its loader.)
split_validation(examples, n, seed) carves a validation set out of the training pool before any of this.

Randomness: every use of the master seed draws from a stream of its own, `stream(seed, name, ...)` =
numpy's Generator of the SeedSequence [seed, STREAMS[name], ...], so a seed gives the same split everywhere and no
two uses share numbers (the torch-side draws of fedcybgd.py and fedavg.py go through `derive_seed`).
"""
from collections import Counter

import numpy as np
import torch

from .errors import DataError

MAX_DRAWS = 1000  # Dirichlet redraws before giving up on the minimum size
# the master seed's streams (numbers are forever: changing one changes every run's draws of that kind)
STREAMS = {"partition": 0, "sampling": 1, "seed_draws": 2, "validation": 3, "candidate_seeds": 4, "test_split": 5,
           "mask": 6}


def stream(seed, name, *more):
    """The numpy Generator of one use of the master seed: SeedSequence [seed, STREAMS[name], *more]."""
    return np.random.default_rng([seed, STREAMS[name], *more])


def split_validation(examples, n, seed):
    """Carve a validation set of n examples out of the training pool before it is partitioned over clients ->
    (the pool without them, the validation examples in their original order). A seeded choice (its own stream of
    `seed`), so every script given the same data, seed and n holds out the same examples; n = 0 -> (pool, []).
    Knobs are chosen on validation; the held-out test set is only reported."""
    if n <= 0:
        return list(examples), []
    if n >= len(examples):
        raise DataError(f"--val_samples {n}: the training data has only {len(examples)} examples")
    chosen = set(stream(seed, "validation").choice(len(examples), n, replace=False).tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


def parse_iid(iid):
    """'iid' -> None, 'dir0.5' -> 0.5; anything else is a DataError."""
    if iid == "iid":
        return None
    if isinstance(iid, str) and iid.startswith("dir"):
        try:
            alpha = float(iid[3:])
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return alpha
    raise DataError(f"unknown partition '{iid}': use 'iid' or 'dirALPHA' with ALPHA > 0 (e.g. dir0.5)")


def partition(labels, num_clients, iid="dir0.5", seed=42, min_size=10, server_only=False):
    """Split indices 0..len(labels)-1 over num_clients -> list (per client) of index lists. server_only: the server of
    a deployment (Flower, data-sizes = "declared"), which holds no client's data: num_clients empty lists."""
    if server_only:
        return [[] for _ in range(num_clients)]
    n = len(labels)
    alpha = parse_iid(iid)
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > n:
        raise DataError(f"cannot split {n} training examples over {num_clients} clients: use at most {n} clients")
    rng = stream(seed, "partition")
    if alpha is None:
        order = rng.permutation(n)
        return [part.tolist() for part in np.array_split(order, num_clients)]

    if num_clients * min_size > n:
        raise DataError(
            f"{num_clients} clients x at least {min_size} examples each needs {num_clients * min_size} "
            f"examples, only {n} available: use fewer clients or a smaller minimum size"
        )
    y = np.asarray([str(v) for v in labels])
    classes = sorted(set(y.tolist()))
    for _ in range(MAX_DRAWS):
        parts = [[] for _ in range(num_clients)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            # balance: a client already holding its fair share N/num_clients gets nothing more
            open_ = np.array([len(part) < n / num_clients for part in parts], dtype=float)
            p = p * open_
            p = p / p.sum() if p.sum() > 0 else open_ / open_.sum()  # tiny alpha: all mass on full clients
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            for part in parts:
                rng.shuffle(part)
            return parts
    raise DataError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DRAWS} tries gave all {num_clients} clients "
        f"at least {min_size} examples: use fewer clients, a larger alpha or a smaller minimum size"
    )


def partition_summary(parts, labels, max_rows=10):
    """A plain-text table: client sizes and each client's label mix (most common labels first)."""
    sizes = np.array([len(p) for p in parts])
    lines = [
        f"{len(parts)} clients, {int(sizes.sum())} examples; per client: "
        f"min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}",
        f"{'client':>6}  {'size':>6}  label mix",
    ]
    shown = list(range(len(parts))) if len(parts) <= max_rows else list(range(max_rows - 1)) + [len(parts) - 1]
    for j in shown:
        if j == len(parts) - 1 and len(parts) > max_rows:
            lines.append(f"{'...':>6}  ({len(parts) - max_rows} more)")
        mix = Counter(str(labels[i]) for i in parts[j]).most_common(3)
        rest = len({str(labels[i]) for i in parts[j]}) - len(mix)
        text = ", ".join(f"{k} {v}" for k, v in mix) + (f", +{rest} more labels" if rest > 0 else "")
        lines.append(f"{j:>6}  {len(parts[j]):>6}  {text}")
    return "\n".join(lines)


def sampled_per_round(num_clients, m):
    return int(num_clients * m + 1e-9)  # int(N*m) as the official codes, without 200*0.29 -> 57.99 -> 57


def sample_clients(seed, rnd, num_clients, n_sampled):
    """The round's clients, sorted: a function of (seed, round) only, so resume and every rank agree."""
    return np.sort(stream(seed, "sampling", rnd).choice(num_clients, n_sampled, replace=False)).tolist()


def derive_seed(*parts):
    """A 63-bit seed from (seed, round, client, ...) and an optional purpose ("stream"): FNV-1a over their decimal
    text, so a resumed run, every rank and every node derive the same randomness from nothing but these numbers."""
    h = 1469598103934665603
    for part in parts:
        for byte in str(part).encode() + b"|":
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h >> 1


def subsample(examples, n, seed):
    """A fixed subset of n held-out examples (all when n == 0), in their original order: for a given seed the
    same examples in every script, round and run, so evaluations are comparable."""
    if n == 0 or n >= len(examples):
        return list(examples)
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n]
    return [examples[i] for i in sorted(idx.tolist())]
