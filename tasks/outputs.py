"""Run outputs the scripts share: the tuned model in Hugging Face format, atomic text files, jsonl, the
safetensors wire format of tensor messages, byte counts for people."""
import json
import os
import shutil
from pathlib import Path


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


def read_jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


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


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000


def save_atomic(path, write):
    """write(temporary path), then rename it over `path`: a crash mid-write leaves the previous file intact."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
