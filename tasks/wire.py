"""The wire format of tensor messages (FedCyBGD's blocks, FedAvg's weights, FedIT's adapters) and the server's check
of an upload: what crosses the network is `pack`'s bytes, and nothing a client sends is used before `check_tensors`.

    wire = tasks.pack({name: tensor})          # safetensors bytes; tasks.unpack(wire) -> {name: tensor}
    most = tasks.packed_bound(tensors)         # the longest pack of such tensors (a longer upload is refused)
    why, upload = tasks.check_tensors(wire, names, reference, max_change)   # why it is refused, or None
    tasks.relative_change(upload, reference)   # ||upload - sent|| / ||sent||
"""


def pack(message):
    """dict name -> tensor -> bytes (what would cross the network)."""
    from safetensors.torch import save
    return save({k: v.detach().contiguous().cpu() for k, v in message.items()})


def packed_bound(tensors):
    """The longest `pack` of tensors of these names, shapes and dtypes can be: their bytes, plus the header's JSON
    (per tensor its name, dtype, shape and offsets: under len(name) + 128 bytes) and 1 KiB. A server refuses a longer
    upload before decoding it."""
    return 1024 + sum(t.numel() * t.element_size() + len(n) + 128 for n, t in tensors.items())


def unpack(wire):
    from safetensors.torch import load
    return load(wire)


def check_tensors(wire, names, reference, max_change=0.0):
    """A client's upload of tensors -> (why the server cannot take it, or None; the unpacked upload). It must
    unpack and hold exactly `names`, each of its `reference` tensor's shape and dtype, all finite, and (max_change
    > 0, --max_change) change the weights it was sent by at most that fraction of their norm (`relative_change`): a
    malformed or hostile upload is left out, so no client can crash the server, write a tensor it was not asked for,
    or replace a block by one of any size (a block of 1e30 is finite)."""
    import torch
    try:
        upload = unpack(wire)
    except Exception as e:  # noqa: BLE001  safetensors raises several types on bytes that are not a file
        return f"not a safetensors message ({type(e).__name__})", None
    if sorted(upload) != sorted(names):
        extra, missing = sorted(set(upload) - set(names)), sorted(set(names) - set(upload))
        return f"tensors {extra[:2]} not asked for, {missing[:2]} missing", None
    for n, t in upload.items():
        w = reference[n]
        if t.shape != w.shape or t.dtype != w.dtype:
            return f"{n} is {tuple(t.shape)} {t.dtype}, expected {tuple(w.shape)} {w.dtype}", None
        if not torch.isfinite(t).all():
            return f"{n} holds a value that is not finite", None
    change = relative_change(upload, reference) if max_change > 0 else 0.0
    if change > max_change > 0:
        return f"it changes the weights it was sent by {change:.3g} of their norm, more than {max_change:g}", None
    return None, upload


def relative_change(upload, reference):
    """||upload - sent|| / ||sent||, over all the upload's tensors together (float64; the tensors it was sent are
    `reference[name]`): how far a client moved the weights it trained, as a fraction of their size."""
    import torch
    diff = sum(float(torch.sum((t.double() - reference[n].double()) ** 2)) for n, t in upload.items())
    size = sum(float(torch.sum(reference[n].double() ** 2)) for n in upload)
    return (diff / size) ** 0.5 if size > 0 else (0.0 if diff == 0 else float("inf"))

