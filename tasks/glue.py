"""GLUE: sentence(-pair) classification and STS-B regression, from the GLUE TSV layout or hub nyu-mll/glue.

Example: {"text_a": str, "text_b": str or None, "label": int (float for stsb)}.
Labels follow the hub's numbering (e.g. rte/qnli: 0 = entailment; mnli: 0 entailment, 1 neutral, 2 contradiction).
"""
import csv
import math
import sys
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import default_path, load_hub

TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
NUM_LABELS = {"cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "stsb": 1, "mnli": 3, "qnli": 2, "rte": 2}
METRIC = {  # the main number GLUE reports per task
    "cola": "matthews_correlation", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1",
    "stsb": "pearson", "mnli": "accuracy", "qnli": "accuracy", "rte": "accuracy",
}
DIRS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
        "qnli": "QNLI", "rte": "RTE"}
DEV_FILE = {"mnli": "dev_matched.tsv"}
# columns of the GLUE TSV files: (text_a, text_b or None, label); CoLA has no header row, so indices there
COLUMNS = {
    "cola": (3, None, 1), "sst2": ("sentence", None, "label"), "mrpc": ("#1 String", "#2 String", "Quality"),
    "qqp": ("question1", "question2", "is_duplicate"), "stsb": ("sentence1", "sentence2", "score"),
    "mnli": ("sentence1", "sentence2", "gold_label"), "qnli": ("question", "sentence", "label"),
    "rte": ("sentence1", "sentence2", "label"),
}
LABEL_NAMES = {"mnli": ["entailment", "neutral", "contradiction"], "qnli": ["entailment", "not_entailment"],
               "rte": ["entailment", "not_entailment"]}
HUB_COLUMNS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
               "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
               "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2")}


def _check_task(task):
    if task not in TASKS:
        raise DataError(f"unknown GLUE task '{task}': choose one of {', '.join(TASKS)}")


def _label(task, value, where):
    try:
        if task == "stsb":
            return float(value)
        if task in LABEL_NAMES:
            return LABEL_NAMES[task].index(value)
        return int(value)
    except ValueError:
        raise DataError(f"{where}: bad {task} label '{value}'") from None


def read_tsv(task, path):
    """One GLUE TSV file -> examples. Handles the UTF-8 byte-order mark of MRPC's train.tsv."""
    csv.field_size_limit(sys.maxsize)
    a, b, y = COLUMNS[task]
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig drops a leading BOM
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None if task == "cola" else next(rows, None)
        if header is not None:
            missing = [c for c in (a, b, y) if c is not None and c not in header]
            if missing:
                raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} for {task}")
            a, b, y = (header.index(c) if c is not None else None for c in (a, b, y))
        need = max(i for i in (a, b, y) if i is not None)
        for lineno, row in enumerate(rows, 2 if header is not None else 1):
            if not row:
                continue
            if len(row) <= need:
                raise DataError(f"{path}:{lineno}: expected at least {need + 1} tab-separated columns, got {len(row)}")
            examples.append({"text_a": row[a], "text_b": row[b] if b is not None else None,
                             "label": _label(task, row[y], f"{path}:{lineno}")})
    return examples


def load(task, data_path=None):
    """-> (train, dev) example lists; data_path is the task folder (default data/glue/<TASK>/)."""
    _check_task(task)
    folder = Path(data_path) if data_path else default_path("glue", DIRS[task])
    dev_name = DEV_FILE.get(task, "dev.tsv")
    hint = (f"expected train.tsv and {dev_name} in the GLUE layout; get them with the GLUE download script "
            f"(https://gluebenchmark.com/tasks) into data/glue/{DIRS[task]}/")
    if not (folder / "train.tsv").is_file() or not (folder / dev_name).is_file():
        lacking = folder / ("train.tsv" if not (folder / "train.tsv").is_file() else dev_name)
        if data_path:
            raise DataError(f"{lacking} not found ({hint})")
        hub = load_hub("nyu-mll/glue", task, missing=lacking, hint=hint)
        a, b = HUB_COLUMNS[task]
        split = "validation_matched" if task == "mnli" else "validation"
        return tuple(
            [{"text_a": r[a], "text_b": r[b] if b else None, "label": r["label"]} for r in hub[s]]
            for s in ("train", split)
        )
    return read_tsv(task, folder / "train.tsv"), read_tsv(task, folder / dev_name)


# ------------------------------------------------------------------------------------------------ metrics

def accuracy(pred, gold):
    return float(np.mean(np.asarray(pred) == np.asarray(gold)))


def f1_binary(pred, gold):
    """F1 of the positive class (label 1)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred, gold):
    """(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)), 0 when a margin is empty."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred != 1) & (gold != 1)))
    fp = float(np.sum((pred == 1) & (gold != 1)))
    fn = float(np.sum((pred != 1) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x, y):
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _ranks(x):
    """Ranks 1..n, ties get the average of their ranks."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x, y):
    return pearson(_ranks(x), _ranks(y))


def compute_metrics(task, predictions, labels):
    """predictions: class ids (or floats for stsb) -> dict of the metrics GLUE reports for the task."""
    _check_task(task)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions vs {len(labels)} labels")
    if task == "stsb":
        return {"pearson": pearson(predictions, labels), "spearman": spearman(predictions, labels)}
    out = {"accuracy": accuracy(predictions, labels)}
    if task in ("mrpc", "qqp"):
        out["f1"] = f1_binary(predictions, labels)
    if task == "cola":
        out["matthews_correlation"] = matthews(predictions, labels)
    return out
