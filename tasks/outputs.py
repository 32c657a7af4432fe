"""Run outputs the scripts share: the tuned model in Hugging Face format."""
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
