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


def unpack(wire):
    from safetensors.torch import load
    return load(wire)


def fmt_bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
