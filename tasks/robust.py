"""Robust aggregation, on by default in every script: what one client's upload can move is bounded relative to a
robust statistic (a lower median) of the recent accepted uploads, so a hostile client is bounded and an honest run keeps
its bits wherever nothing reaches the bound.

    bound, recent, clipped = tasks.scalar_bound(recent, scalars, factor, window, cap)   # FedKSeed: --g_bound
    decoded = tasks.clip_client_norms(decoded, K, factor)                              # FedKSeed: --clip_norm
    uploads, scaled, recent = tasks.bound_uploads(uploads, reference, recent, factor, window)   # --tensor_bound

The statistic is the lower median (`lower_median`: the ceil(n/2)-th smallest of n values; the median for odd n).
Breakdown point: an attacker raises it above every honest value only when it holds more than half of the values
pooled (with exactly half, the lower median is the largest honest value; the mean of the two middle values, numpy's
median, would be about 5e29 with half the values at 1e30); it lowers it below every honest value (a smaller bound:
the honest clients' steps are cut, nothing is enlarged) with half or more. The pool is this round's uploads and
those of the last `window` rounds (turns), so an attacker must hold half of the recent uploads' values, not half of
one round's; below that its every value is bounded by `factor` times an honest one. A lower median of 0 (an
attacker uploading zeros) bounds every value to 0, never lifts the bound.
"""
import numpy as np
import torch

ZERO = float(np.finfo(np.float32).tiny)  # the bound a median of 0 gives: every value to (nearly) 0, not "no bound"


def lower_median(values):
    """The ceil(n/2)-th smallest of n values (float64): the median for odd n, the lower middle value for even n."""
    values = np.asarray(values, dtype=np.float64).ravel()
    k = (len(values) - 1) // 2
    return float(np.partition(values, k)[k])


def scalar_bound(recent, scalars, factor, window, cap=0.0):
    """FedKSeed's --g_bound c: the bound B on every scalar of this round, c x the lower median |scalar| over this round's
    scalars and the last `window` rounds' (kept in `recent`, a list of arrays, one a round), then the smaller of B and
    `cap` (--max_abs_g; 0 = none) -> (B, 0 for no bound; the new `recent`; how many of this round's scalars exceed B).
    `recent` keeps the |scalars| as uploaded (the median ranks them: clipped to B, for c >= 1, it would be the same)."""
    now = np.abs(np.concatenate(list(scalars) + [np.zeros(0, np.float32)]))
    recent = (list(recent) + [now])[-(window + 1):]
    pooled = np.concatenate(recent)
    bound = max(ZERO, factor * lower_median(pooled)) if factor > 0 and len(pooled) else 0.0
    caps = [b for b in (bound, cap) if b > 0]
    return (min(caps) if caps else 0.0), recent, (int(np.sum(now > min(caps))) if caps else 0)


def clip_client_norms(decoded, K, factor):
    """FedKSeed's --clip_norm c: client i's update is v_i = its sum of scalars per seed (float64[K]); every v_i whose
    L2 norm exceeds c x the lower median of the round's norms is scaled down to it, by scaling the client's scalars (a
    factor of exactly 1 leaves them, and the run, bit for bit). One client then moves A by at most lr x (its data
    share) x c x (lower median) in a round's aggregate, whatever it uploads, as long as the lower median is an honest
    client's norm: at most half of the round's clients hostile. decoded: [(n, seed indices, scalars)]."""
    norms = [float(np.linalg.norm(np.bincount(i, weights=g.astype(np.float64), minlength=K))) for _, i, g in decoded]
    bound = factor * lower_median(norms) if norms else 0.0
    return [(n, idx, g.astype(np.float64) * (bound / norm) if norm > bound else g)
            for (n, idx, g), norm in zip(decoded, norms)]


def change_sizes(upload, reference):
    """Each uploaded tensor's change from what the client was sent, as its root mean square per element (float64):
    {name: ||upload - sent|| / sqrt(numel)}. An optimizer's step moves every trained element by about its learning
    rate, whatever the tensor's own scale (a LoRA B starts at zero), so these sizes compare across tensors."""
    return {n: float(torch.linalg.vector_norm(t.double() - reference[n].double())) / max(1, t.numel()) ** 0.5
            for n, t in upload.items()}


def change_limit(pool, factor):
    """--tensor_bound c: the largest change size a tensor may have, c x the lower median of `pool` (the change sizes of the
    tensors of the recent accepted uploads and of this round's); 0 (no bound) when the factor is 0 or the pool empty.
    Breakdown point: uploads holding fewer than half of the pool's tensors cannot move the median out of the honest
    sizes' range (the module's docstring)."""
    return max(ZERO, factor * lower_median(pool)) if factor > 0 and pool else 0.0


def bound_changes(upload, reference, limit):
    """Each tensor's change scaled down to at most `limit` (a change size, `change_sizes`): t' = sent + (t - sent) x
    limit / size where size > limit, computed in float64 and rounded once to the tensor's dtype; a tensor within the
    limit is kept as it came, bit for bit. -> (the bounded upload, how many tensors were scaled). limit 0: no bound."""
    if limit <= 0:
        return upload, 0
    out, scaled = {}, 0
    for n, size in change_sizes(upload, reference).items():
        t = upload[n]
        if size > limit:
            sent = reference[n].double()
            t = (sent + (t.double() - sent) * (limit / size)).to(t.dtype)
            scaled += 1
        out[n] = t
    return out, scaled



def bound_uploads(uploads, reference, recent, factor, window):
    """FedAvg's and FedCyBGD's --tensor_bound c on the round's (turn's) accepted uploads of tensors: the change sizes
    of their tensors join the last `window` rounds' in the pool (`recent`: one list a round), every tensor's change is
    bounded to c x the pool's median (`bound_changes`) -> (the bounded uploads, how many tensors each had scaled, the
    new `recent`, this round's sizes counted at most at the bound)."""
    sizes = [change_sizes(u, reference) for u in uploads]
    limit = change_limit([d for r in recent for d in r] + [d for s in sizes for d in s.values()], factor)
    bounded = [bound_changes(u, reference, limit) for u in uploads]
    recent = (list(recent) + [[min(d, limit or d) for s in sizes for d in s.values()]])[-(window + 1):]
    return [u for u, _ in bounded], [n for _, n in bounded], recent


def pack_recent(recent):
    """The window of recent values (a list of float32 arrays, one a round) as one tensor and its lengths, for a
    checkpoint; `unpack_recent` inverts it."""
    return torch.from_numpy(np.concatenate(list(recent) + [np.zeros(0, np.float32)])), [len(r) for r in recent]


def unpack_recent(flat, lengths):
    cut = np.cumsum([0] + list(lengths))
    return [flat.numpy()[a:b].copy() for a, b in zip(cut[:-1], cut[1:])]
