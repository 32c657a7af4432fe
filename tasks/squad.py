"""SQuAD v1.1 extractive question answering: load, windowed features, answer decoding, official EM/F1.

Example: {"id", "title", "context", "question", "answers": {"text": [...], "answer_start": [...]}}.
Features need a fast tokenizer (character offsets). A context longer than max_seq_length is cut into
windows that overlap by doc_stride tokens; each window is one feature.
"""
import collections
import re
import string
from pathlib import Path

import numpy as np

from .errors import DataError
from .sources import default_path, load_hub, read_json

HINT = ("expected the official train-v1.1.json and dev-v1.1.json (https://rajpurkar.github.io/SQuAD-explorer/) "
        "in data/squad/")


def read_squad_json(path):
    """The official v1.1 json (data -> paragraphs -> qas) -> flat list of examples."""
    doc = read_json(path)
    if not isinstance(doc, dict) or "data" not in doc:
        raise DataError(f"{path}: not a SQuAD json (no top-level 'data' list; {HINT})")
    examples = []
    try:
        for article in doc["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    examples.append({
                        "id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {"text": [a["text"] for a in qa["answers"]],
                                    "answer_start": [a["answer_start"] for a in qa["answers"]]},
                    })
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: malformed SQuAD record near example {len(examples)} (missing {e})") from None
    return examples


def load(data_path=None):
    """-> (train, dev); data_path is a folder with train-v1.1.json and dev-v1.1.json (default data/squad/)."""
    folder = Path(data_path) if data_path else default_path("squad")
    files = [folder / "train-v1.1.json", folder / "dev-v1.1.json"]
    for f in files:
        if not f.is_file():
            if data_path:
                raise DataError(f"{f} not found ({HINT})")
            hub = load_hub("squad", missing=f, hint=HINT)
            return tuple([dict(r) for r in hub[s]] for s in ("train", "validation"))
    return tuple(read_squad_json(f) for f in files)


def _check_tokenizer(tokenizer):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("SQuAD features need a fast tokenizer (character offsets); load it with use_fast=True")
    if tokenizer.pad_token is None:  # GPT-2 has none; padding positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token


def _encode(examples, tokenizer, max_seq_length, doc_stride):
    _check_tokenizer(tokenizer)
    return tokenizer(
        [e["question"].lstrip() for e in examples], [e["context"] for e in examples],
        truncation="only_second", max_length=max_seq_length, stride=doc_stride,
        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
    )


def prepare_train_features(examples, tokenizer, max_seq_length=384, doc_stride=128):
    """-> list of {"input_ids","attention_mask","start_positions","end_positions"} (one per window).

    Positions are token indices of the first answer inside the window; 0 when the answer is not in it.
    """
    enc = _encode(examples, tokenizer, max_seq_length, doc_stride)
    features = []
    for i in range(len(enc["input_ids"])):
        example = examples[enc["overflow_to_sample_mapping"][i]]
        offsets, seq_ids = enc["offset_mapping"][i], enc.sequence_ids(i)
        start_char = example["answers"]["answer_start"][0]
        end_char = start_char + len(example["answers"]["text"][0])
        context = [k for k, s in enumerate(seq_ids) if s == 1]
        start = end = 0
        if context and offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
            start = next(k for k in context if offsets[k][1] > start_char)
            end = next(k for k in reversed(context) if offsets[k][0] < end_char)
        features.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                          "start_positions": start, "end_positions": end})
    return features


def prepare_eval_features(examples, tokenizer, max_seq_length=384, doc_stride=128):
    """-> list of {"input_ids","attention_mask","example_id","offset_mapping"}; offsets None outside the context."""
    enc = _encode(examples, tokenizer, max_seq_length, doc_stride)
    features = []
    for i in range(len(enc["input_ids"])):
        seq_ids = enc.sequence_ids(i)
        offsets = [tuple(o) if seq_ids[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]
        features.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
                         "example_id": examples[enc["overflow_to_sample_mapping"][i]]["id"],
                         "offset_mapping": offsets})
    return features


def postprocess_predictions(examples, features, start_logits, end_logits, n_best=20, max_answer_length=30):
    """Logits per feature [F, T] -> {example id: answer text}: the best span over all of an example's windows."""
    by_example = collections.defaultdict(list)
    for f, feature in enumerate(features):
        by_example[feature["example_id"]].append(f)
    predictions = {}
    for example in examples:
        best_score, best_text = -np.inf, ""
        for f in by_example[example["id"]]:
            s_logits, e_logits = np.asarray(start_logits[f]), np.asarray(end_logits[f])
            offsets = features[f]["offset_mapping"]
            for s in np.argsort(s_logits)[::-1][:n_best]:
                for e in np.argsort(e_logits)[::-1][:n_best]:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = s_logits[s] + e_logits[e]
                    if score > best_score:
                        best_score, best_text = score, example["context"][offsets[s][0]:offsets[e][1]]
        predictions[example["id"]] = best_text
    return predictions


# ------------------------------------------------------------------ the official v1.1 evaluation, offline

def normalize_answer(s):
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction, ground_truth):
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def evaluate(examples, predictions):
    """Mean over examples of the max over gold answers, 0-100 scale; a missing prediction counts as ''."""
    em = f1 = 0.0
    for example in examples:
        pred = predictions.get(example["id"], "")
        golds = example["answers"]["text"] or [""]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(examples), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}
