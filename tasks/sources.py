"""Where data comes from: local files under data/ (or --data_path), else the Hugging Face hub.

Every problem a user can cause becomes a DataError with a one-line message that says what was
expected and how to get it; the scripts print it and exit instead of showing a traceback.
"""
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import DataError

# data/ next to the scripts, wherever they are run from (a local copy can be linked: ln -s /path/to/data data)
DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


def default_path(*parts):
    return DATA_ROOT.joinpath(*parts)


def read_json(path):
    """A whole-file JSON document; a syntax error names file:line."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None


def read_jsonl(path):
    """One JSON object per line (blank lines skipped) -> list of (line number, dict); a bad line names file:line.
    The one reader of jsonl files: data sets, and the run's own metrics.jsonl and ledger.jsonl (tasks/runfiles.py)."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    return records


def require_fields(record, fields, where):
    """Check that a record has every field (strings for text); `where` is 'file:line' or similar."""
    missing = [k for k in fields if k not in record]
    if missing:
        raise DataError(f"{where}: record lacks field(s) {', '.join(missing)} (has: {', '.join(sorted(record))})")


def hub_reachable(timeout=3.0):
    """False when offline mode is set or the hub cannot be reached within `timeout` seconds."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def load_hub(hub_name, config=None, *, missing, hint):
    """datasets.load_dataset(hub_name, config) for online users; offline -> DataError.

    missing: the local path that was looked for; hint: the expected layout and how to get it.
    """
    message = f"{missing} not found ({hint}); the hub copy '{hub_name}' is not reachable either"
    if not hub_reachable():
        raise DataError(message)
    try:
        import datasets

        return datasets.load_dataset(hub_name, config)
    except Exception as e:  # network, auth or format problems all mean: use local files
        raise DataError(f"{message}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
