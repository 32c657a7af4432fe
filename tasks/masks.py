"""fedkseed.py's --mask: the fixed index set of each weight tensor that the ZO steps perturb (z is 0 elsewhere), the
rules that choose it and the bytes it travels as.

    scores = tasks.mask_scores(rule, w0, seed, params=None, batches=None, loss_fn=None)   # a tensor per weight tensor
    masks = seedops.mask_of(scores, density)          # int64 indices of each tensor's top `density` fraction
    masks = tasks.own_mask(rule, w0, seed, density)   # magnitude, random: the two, on w0's devices
    n = tasks.mask_size(w0, density)                  # the elements a mask keeps
    msg = tasks.encode_mask(masks, offsets, total)    # the global indices (offset + j), ascending: uint32 (or uint64)
    masks = tasks.decode_mask(msg, offsets, sizes)    # on the CPU; one line of ValueError for anything else
    msg = tasks.masks.sensitivity_mask(model, w0, offsets, rows, pad_id, density, loss_fn)   # the server's, as bytes

Rules (each scores every element of every trainable tensor; the mask keeps the highest scores):
  sensitivity  sum over the server's examples of the squared per-example gradient at w0 (the diagonal Fisher:
               SensZOQ, arXiv 2406.02913): only the server computes it, on examples it holds, and sends the mask
  magnitude    -|w0|: the smallest weights (Sparse MeZO's rule, arXiv 2402.15751, fixed at w0): every party computes it
  random       uniform numbers from the master seed's "mask" stream (a control): every party computes it
The two rules every party computes are functions of (w0, seed) on the CPU, so their bits, and the masks, are the same
on every machine.
"""

import numpy as np
import torch

import seedops

from .partitions import stream

RULES = ("sensitivity", "magnitude", "random")


def mask_scores(rule, w0, seed, params=None, batches=None, loss_fn=None):
    """-> a float32 score tensor per weight tensor (w0: the pretrained tensors; sensitivity: `params`, the model's
    trainable parameters at w0 (the tensors the forwards read), `batches` of one example each, and loss_fn(batch) ->
    a scalar loss tensor)."""
    if rule == "magnitude":
        return [-p.detach().float().abs().cpu() for p in w0]
    if rule == "random":
        g = torch.Generator().manual_seed(int(stream(seed, "mask", 1).integers(0, 2**62)))
        return [torch.rand(p.shape, generator=g) for p in w0]
    if rule != "sensitivity":
        raise ValueError(f"unknown mask rule {rule!r}: {', '.join(RULES)}")
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    with torch.enable_grad():
        for batch in batches:
            for p in params:
                p.grad = None
            loss_fn(batch).backward()
            for s, p in zip(scores, params):
                s.add_(p.grad.float() ** 2)
    for p in params:
        p.grad = None
    return scores


def index_dtype_of(total):
    return np.uint32 if total <= 2**32 else np.uint64


def encode_mask(masks, offsets, total):
    """The masks as the ascending global indices offset + j of their elements (z's element numbering; `total`
    elements in all: uint32 indices up to 2**32 of them)."""
    width = index_dtype_of(total)
    return b"".join((m.cpu().numpy().astype(np.int64) + o).astype(width).tobytes() for m, o in zip(masks, offsets))


def decode_mask(msg, offsets, sizes):
    """The masks from `encode_mask`'s bytes: for tensor i of `sizes[i]` elements at `offsets[i]`, its indices j."""
    total = int(offsets[-1]) + int(sizes[-1])
    width = index_dtype_of(total)
    if len(msg) % np.dtype(width).itemsize:
        raise ValueError(f"a mask of {len(msg)} bytes is not whole {np.dtype(width).name} indices")
    idx = np.frombuffer(msg, width).astype(np.int64)
    if len(idx) == 0 or np.any(np.diff(idx) <= 0) or idx[-1] >= total:
        raise ValueError(f"a mask must be ascending indices below {total}")
    cuts = np.searchsorted(idx, list(offsets) + [total])
    return [torch.from_numpy(idx[a:b] - o) for a, b, o in zip(cuts[:-1], cuts[1:], offsets)]


def mask_size(w0, density):
    """The elements a mask of `density` keeps: seedops.mask_count of each tensor, summed."""
    return sum(seedops.mask_count(p.numel(), density) for p in w0)


def mask_bytes(w0, density):
    """The bytes of encode_mask's message for a mask of `density`."""
    return mask_size(w0, density) * np.dtype(index_dtype_of(sum(p.numel() for p in w0))).itemsize


def own_mask(rule, w0, seed, density):
    """magnitude, random: the mask every party computes from (w0, seed) -> an int64 index tensor per tensor."""
    return [m.to(p.device) for m, p in zip(seedops.mask_of(mask_scores(rule, w0, seed), density), w0)]


def sensitivity_mask(model, w0, offsets, rows, pad_id, density, loss_fn):
    """The sensitivity rule's mask as the server sends it: each weight's squared gradient at w0 summed over `rows`
    (tokenized examples, one backward each; `model` at w0), the top `density` of each tensor -> encode_mask's bytes."""
    from .data import collate_tokenized
    device = w0[0].device
    batches = [{k: v.to(device) for k, v in collate_tokenized([r], pad_id).items()} for r in rows]
    scores = mask_scores("sensitivity", w0, 0, [p for p in model.parameters() if p.requires_grad], batches, loss_fn)
    return encode_mask(seedops.mask_of(scores, density), offsets, sum(p.numel() for p in w0))
