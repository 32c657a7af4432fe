"""Prompt-based classification with a causal LM (MeZO's setting): the model reads a template filled with the
example and scores one label word per class at the answer position; the loss is the cross-entropy over those
label words' logits, the prediction their argmax.

    SST-2, MeZO's template:   "<sentence> It was"  ->  " terrible" / " great"
    SST-2, instruction style: "Review: <sentence>\nSentiment:"  ->  " negative" / " positive"

    data = load_prompt_data(task, data_path, num_clients, iid, seed, val_samples, min_size=10)
        GLUE TSV (tasks.glue.load): clients split train.tsv (after `val_samples` are carved out for validation) by
        iid or label-Dirichlet dirALPHA; test = dev.tsv. example {"text_a", "text_b" or None, "label": int}
    TEMPLATES[task]: name -> (prompt format with {text_a} / {text_b}, label words, class 0 first)
    ids = label_token_ids(tokenizer, words)                # one token per label word (the first, if several)
    t = tokenize_prompt(tokenizer, example, template, max_length, ids) -> {"input_ids": the prompt's ids,
                                                                         "label": int, "label_ids": ids}
    batch = collate_prompts(ts, pad_id) -> {"input_ids", "attention_mask" [B, T] (right padding),
                                            "answer_at" [B] (each prompt's last position), "label" [B],
                                            "label_ids" [L]}
    scores = label_word_logits(model, batch)    # [B, L] float32: the label words' logits at the answer position
    loss = label_word_loss(model, batch)        # mean cross-entropy of `scores` against the labels
    out = evaluate_prompts(model, ts, pad_id, ids, per_example) -> {"accuracy", "eval_loss"} (per_example: "correct")
    name, table = choose_template(model, tokenizer, task, val, max_length)   # best zero-shot validation accuracy
    template, ids = pick_template(task, name_or_auto, model, tokenizer, val, max_length)   # what a script calls
(the evaluation sets and the scripts' entry point: tasks/evaluation.py, prompt_sets / evaluate_prompt_sets)
"""
from types import SimpleNamespace

import numpy as np
import torch

from . import glue
from .partitions import partition, partition_summary, split_validation
from .errors import DataError

TASKS = ("sst2", "mrpc")
# per task, the candidate templates (format, label words for class 0, 1, ...): MeZO's own (princeton-nlp/MeZO,
# templates.py) and instruction-style ones; which one a run uses is chosen on validation data (`choose_template`)
TEMPLATES = {
    "sst2": {
        "mezo": ("{text_a} It was", (" terrible", " great")),
        "good_bad": ("{text_a} It was", (" bad", " good")),
        "review": ("Review: {text_a}\nSentiment:", (" negative", " positive")),
    },
    "mrpc": {  # label 1: the two sentences are paraphrases
        "mezo": ("{text_a} ? {text_b}", (" No", " Yes")),  # MeZO's MRPC template: "*cls**sent_0*?*mask*,*sent_1*"
        "question": ("Sentence 1: {text_a}\nSentence 2: {text_b}\nDo they mean the same thing? Answer:",
                     (" No", " Yes")),
        "equivalent": ("{text_a}\n{text_b}\nThe two sentences are", (" different", " equivalent")),
    },
}


def load_prompt_data(task, data_path=None, num_clients=10, iid="iid", seed=42, val_samples=0, min_size=10,
                     server_only=False):
    """A GLUE task as federated prompt data -> SimpleNamespace(clients, val, test, summary) of example lists.
    server_only: no client data (`partition`)."""
    if task not in TASKS:
        raise DataError(f"prompt-based classification: unknown task '{task}' (choose one of {', '.join(TASKS)})")
    train, test = glue.load(task, data_path)
    train, val = split_validation(train, val_samples, seed)
    labels = [e["label"] for e in train]
    parts = partition(labels, num_clients, iid, seed, min_size, server_only)
    return SimpleNamespace(clients=[[train[i] for i in part] for part in parts], val=val, test=test,
                           summary=partition_summary(parts, labels))


def label_token_ids(tokenizer, words):
    """The token id that stands for each label word: its first token (every word of TEMPLATES is a single token for
    the packaged SmolLM2 tokenizer); two words with the same first token are a DataError."""
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
    if len(set(ids)) != len(ids):
        raise DataError(f"label words {list(words)} share a first token: they cannot be told apart")
    return ids


def tokenize_prompt(tokenizer, example, template, max_length, label_ids):
    """The filled template as token ids (the tokenizer's special tokens included), with the label and the label
    words' ids it is scored on; too long -> its last max_length tokens, so the answer position stays its end."""
    text = template[0].format(text_a=example["text_a"].strip(), text_b=(example.get("text_b") or "").strip())
    ids = tokenizer(text)["input_ids"]
    return {"input_ids": ids[-max_length:], "label": int(example["label"]), "label_ids": list(label_ids)}


def collate_prompts(tokenized, pad_token_id):
    """Prompts -> a batch padded on the right; `answer_at` is each prompt's last position, whose next-token logits
    score the label words (right padding leaves them as without padding: attention is causal)."""
    width = max(len(t["input_ids"]) for t in tokenized)
    input_ids = torch.full((len(tokenized), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(tokenized), width), dtype=torch.long)
    for b, t in enumerate(tokenized):
        input_ids[b, :len(t["input_ids"])] = torch.tensor(t["input_ids"], dtype=torch.long)
        attention_mask[b, :len(t["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "answer_at": torch.tensor([len(t["input_ids"]) - 1 for t in tokenized], dtype=torch.long),
            "label": torch.tensor([t["label"] for t in tokenized], dtype=torch.long),
            "label_ids": torch.tensor(tokenized[0]["label_ids"], dtype=torch.long)}


def label_word_logits(model, batch):
    """[B, L] float32: the logits of the L label words at each prompt's answer position. The vocabulary projection
    is computed only at the batch's distinct answer positions (`logits_to_keep`: U <= B of the T positions; the
    head is a fifth of SmolLM2-135M's weights, so scoring every position would cost about that much more)."""
    keep, which = torch.unique(batch["answer_at"], return_inverse=True)  # [U] positions; row b's is keep[which[b]]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=keep).logits  # [B, U, V]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, which][:, batch["label_ids"]].float()


def label_word_loss(model, batch):
    """The classification loss: mean over the batch of the cross-entropy of the label words' logits (a softmax over
    the L label words only, not the vocabulary) against the example's label."""
    return torch.nn.functional.cross_entropy(label_word_logits(model, batch), batch["label"])


@torch.no_grad()
def evaluate_prompts(model, tokenized, pad_token_id, per_example=None, batch_size=8, progress=None,
                     name="held-out accuracy"):
    """Accuracy (share of examples whose label word has the largest logit; ties go to the lower class) and the mean
    label-word cross-entropy `eval_loss`; per_example receives "correct" (0/1 per example, for a paired interval)."""
    device = next(model.parameters()).device
    correct, losses = [], []
    if progress is not None:
        progress.start(name, len(tokenized))
    for k in range(0, len(tokenized), batch_size):
        rows = tokenized[k:k + batch_size]
        batch = {key: v.to(device) for key, v in collate_prompts(rows, pad_token_id).items()}
        scores = label_word_logits(model, batch)
        correct += (scores.argmax(1) == batch["label"]).long().tolist()
        losses += torch.nn.functional.cross_entropy(scores, batch["label"], reduction="none").double().tolist()
        if progress is not None:
            progress.advance(name, len(rows))
    if progress is not None:
        progress.done(name)
    if per_example is not None:
        per_example.update(correct=correct)
    return {"accuracy": float(np.mean(correct)) if correct else None,
            "eval_loss": float(np.mean(losses)) if losses else None}


def choose_template(model, tokenizer, task, val, max_length, log=print):
    """The template (a name of TEMPLATES[task]) with the best zero-shot accuracy on the validation examples `val`
    (ties: the first in TEMPLATES' order) -> (its name, {name: accuracy}). Chosen on validation, never on the
    held-out set."""
    if not val:
        raise DataError("choosing a template needs validation examples (--val_samples > 0), or name one (--template)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = {}
    for name, template in TEMPLATES[task].items():
        ids = label_token_ids(tokenizer, template[1])
        table[name] = evaluate_prompts(model, [tokenize_prompt(tokenizer, e, template, max_length, ids) for e in val],
                                       pad, name=f"template {name}")["accuracy"]
    best = max(table, key=lambda n: (table[n], -list(TEMPLATES[task]).index(n)))
    log(f"template: {best}, chosen on zero-shot validation accuracy over {len(val)} examples ("
        + ", ".join(f"{n} {a:.3f}" for n, a in table.items()) + ")")
    return best, table


def pick_template(task, name, model, tokenizer, val, max_length, log=print):
    """--template: a name of TEMPLATES[task], or "auto" (`choose_template` on the validation examples) -> (the
    template, its label words' token ids). Every party computes the same choice from the same model and examples."""
    if name == "auto":
        name, _ = choose_template(model, tokenizer, task, val, max_length, log)
    elif name not in TEMPLATES[task]:
        raise DataError(f"--template {name}: {task} has {', '.join(TEMPLATES[task])} (or auto: chosen on validation)")
    return TEMPLATES[task][name], label_token_ids(tokenizer, TEMPLATES[task][name][1])
