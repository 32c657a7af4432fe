"""Evaluation of a global model, the same definitions in every script: the held-out loss (token-weighted), Rouge-L,
prompt-based accuracy and label-word loss, GLUE and SQuAD metrics; each on a seeded subset of the held-out set that
is the same in every script, and on the validation set beside it.

    sets = tasks.heldout_sets(tokenizer, test, val, max_length, eval_samples, rouge_samples, seed)   # fedkseed, LM
    out = tasks.evaluate_lm(model, tokenizer, sets, rouge, max_new_tokens, progress, per_example)
    sets = tasks.prompt_sets(tokenizer, test, val, template, ids, max_length, eval_samples, seed)   # fedkseed, prompts
    out = tasks.evaluate_prompt_sets(model, pad_id, sets, progress, per_example)
    out = tasks.evaluate(args, model, tokenizer, test, device, val)   # fedcybgd, fedavg: task, dataset,
                                                                      # max_new_tokens; + val_loss, val_<metric>
"""
from types import SimpleNamespace

import torch

from . import glue, prompts, squad
from .data import make_batch
from .lm import heldout_loss, heldout_rouge_l, tokenize_examples
from .partitions import subsample
from .prompts import evaluate_prompts, tokenize_prompt


def heldout_sets(tokenizer, test, val, max_length, eval_samples, rouge_samples, seed):
    """A causal LM's evaluation sets, tokenized once (fedkseed.py): `eval`, a seeded subset of `eval_samples` held-out
    examples (the same in every script; 0 = all) for the loss; `rouge`, the same subset (rouge_samples None), another
    seeded subset, or none (0), with its `targets`, for Rouge-L; `val`, the validation examples ([] without)."""
    eval_set = subsample(test, eval_samples, seed)
    rouge_set = [] if rouge_samples == 0 else eval_set if rouge_samples is None else subsample(test, rouge_samples, seed)
    return SimpleNamespace(eval=tokenize_examples(tokenizer, eval_set, max_length), rouge_is_eval=rouge_set is eval_set,
                           rouge=tokenize_examples(tokenizer, rouge_set, max_length, log=None),
                           targets=[e["target"] for e in rouge_set],
                           val=tokenize_examples(tokenizer, val, max_length, log=None))


def evaluate_lm(model, tokenizer, sets, rouge, max_new_tokens, progress=None, per_example=None):
    """`model` on `heldout_sets` -> {eval_loss (token-weighted mean), rougeL (when `rouge` and a Rouge-L set, else None),
    val_loss (with a validation set)}; per_example receives the held-out per-example values (`paired_interval`)."""
    pad = tokenizer.pad_token_id
    out = {"eval_loss": heldout_loss(model, sets.eval, pad, progress=progress, per_example=per_example),
           "rougeL": heldout_rouge_l(model, tokenizer, sets.rouge, sets.targets, max_new_tokens, progress,
                                     per_example if sets.rouge_is_eval else None) if rouge and sets.rouge else None}
    if sets.val:
        out["val_loss"] = heldout_loss(model, sets.val, pad, progress=progress, name="validation loss")
    return out


def prompt_sets(tokenizer, test, val, template, label_ids, max_length, eval_samples, seed):
    """The evaluation sets, tokenized once: `eval`, the seeded subset of `eval_samples` held-out examples (0 = all;
    the same subset as every script's), and `val`, the validation examples."""
    tok = lambda examples: [tokenize_prompt(tokenizer, e, template, max_length, label_ids)  # noqa: E731
                            for e in examples]
    return SimpleNamespace(eval=tok(subsample(test, eval_samples, seed)), val=tok(val))


def evaluate_sets(model, tokenizer, sets, rouge, max_new_tokens, progress=None, per_example=None):
    """fedkseed.py's evaluation: `prompt_sets` -> `evaluate_prompt_sets`; `heldout_sets` -> `evaluate_lm`."""
    if hasattr(sets, "targets"):
        return evaluate_lm(model, tokenizer, sets, rouge, max_new_tokens, progress, per_example)
    return evaluate_prompt_sets(model, tokenizer.pad_token_id, sets, progress, per_example)


def evaluate_prompt_sets(model, pad_token_id, sets, progress=None, per_example=None):
    """`model` on `prompt_sets` -> {accuracy, eval_loss (label-word cross-entropy), val_accuracy, val_loss (with a
    validation set)}; per_example receives the held-out per-example "correct" (`paired_interval`)."""
    out = evaluate_prompts(model, sets.eval, pad_token_id, per_example, progress=progress)
    if sets.val:
        val = evaluate_prompts(model, sets.val, pad_token_id, progress=progress, name="validation accuracy")
        out.update(val_accuracy=val["accuracy"], val_loss=val["eval_loss"])
    return out


@torch.no_grad()
def evaluate(args, model, tokenizer, test, device, val=None, progress=None, per_example=None):
    """The held-out metrics of `model` (eval_loss and the task's metrics) -> dict; with `val`, the same on the
    validation set as val_loss and val_<metric> (no generation there: Rouge-L is a test-set number).
    progress: a tasks.Progress (bars with ETA for the loss and the generation). per_example: a dict that receives the
    test set's per-example values (sft: loss_sum, tokens, and rouge when generated; classification: correct, and
    glue pred and label) for `paired_interval` and the results page."""
    out = evaluate_one(args, model, tokenizer, test, device, True, progress, per_example)
    if val is not None:
        out.update({("val_loss" if k == "eval_loss" else f"val_{k}"): v
                    for k, v in evaluate_one(args, model, tokenizer, val, device, False, progress).items()})
    return out


@torch.no_grad()
def evaluate_one(args, model, tokenizer, test, device, generate=True, progress=None, per_example=None):
    model.eval()
    if args.task == "sft":  # the same definitions as fedkseed.py: token-weighted loss, Rouge-L of greedy generations
        tokenized = [e["tokens"] for e in test]
        out = {"eval_loss": heldout_loss(model, tokenized, tokenizer.pad_token_id, progress=progress,
                                         per_example=per_example)}
        if generate and args.max_new_tokens > 0:
            out["rougeL"] = heldout_rouge_l(model, tokenizer, tokenized, [e["target"] for e in test],
                                            args.max_new_tokens, progress, per_example)
        return out
    if args.task == "prompt":  # accuracy and the label-word cross-entropy, as fedkseed.py reports them
        return prompts.evaluate_prompts(model, test, tokenizer.pad_token_id, per_example, progress=progress)
    if args.task == "glue":
        preds, loss = glue_predictions(model, tokenizer, test, device)
        labels = [e["labels"] for e in test]
        if per_example is not None and isinstance(labels[0], int):
            per_example.update(correct=[int(p == y) for p, y in zip(preds, labels)], pred=[int(p) for p in preds],
                               label=list(labels))
        return {"eval_loss": loss, **glue.compute_metrics(args.dataset, preds, labels)}
    examples, features = test
    starts, ends = [], []
    for k in range(0, len(features), 32):
        out = model(**{n: v for n, v in make_batch("squad", features[k:k + 32], tokenizer, device).items()})
        starts += out.start_logits.float().cpu().tolist()
        ends += out.end_logits.float().cpu().tolist()
    preds = squad.postprocess_predictions(examples, features, starts, ends)
    return squad.evaluate(examples, preds)


@torch.no_grad()
def glue_predictions(model, tokenizer, test, device):
    """A sequence classifier over encoded examples -> (predictions: class ids, or scores for a regression task,
    mean loss over the examples), in batches of 64."""
    total, preds = 0.0, []
    for k in range(0, len(test), 64):
        out = model(**make_batch("glue", test[k:k + 64], tokenizer, device))
        total += out.loss.item() * len(test[k:k + 64])
        logits = out.logits.float()
        preds += (logits[:, 0] if logits.shape[1] == 1 else logits.argmax(-1)).tolist()
    return preds, total / len(test)
