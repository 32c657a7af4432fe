"""Causal-LM plumbing the scripts share: tokenize with masked prompts, pad a batch, generate, the held-out loss, Rouge-L."""
import torch

IGNORE_INDEX = -100  # label value the loss skips (prompt tokens and padding)


def tokenize_example(tokenizer, example, max_length):
    """example {"prompt","target"} -> {"input_ids", "labels", "truncated"}.

    input_ids = prompt tokens + target tokens + EOS; labels = -100 on the prompt, the ids on the target.
    Too long: the prompt loses tokens from the left (its end, "### Response:", stays next to the target)
    until at least half of max_length is left for the target; only then is the target cut (from the right).
    """
    prompt = tokenizer(example["prompt"])["input_ids"]  # with the tokenizer's BOS, if it adds one
    target = tokenizer(example["target"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(target) > max_length
    if truncated:
        keep_target = min(len(target), max(max_length - len(prompt), max_length // 2))
        keep_prompt = max_length - keep_target
        bos = tokenizer.bos_token_id
        if keep_prompt > 1 and bos is not None and prompt[0] == bos:
            prompt = prompt[:1] + prompt[len(prompt) - keep_prompt + 1:]
        else:
            prompt = prompt[len(prompt) - keep_prompt:] if keep_prompt > 0 else []
        target = target[:keep_target]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target, "truncated": truncated}


def tokenize_examples(tokenizer, examples, max_length, log=print):
    """tokenize_example over a list; says once how many examples were truncated."""
    out = [tokenize_example(tokenizer, e, max_length) for e in examples]
    cut = sum(t["truncated"] for t in out)
    if cut and log is not None:
        log(f"tasks: {cut} of {len(out)} examples longer than max_length={max_length} tokens were truncated")
    return out


def collate(tokenized, pad_token_id):
    """List of tokenized examples -> LongTensors [B, T], padded on the right (labels -100 on padding)."""
    width = max(len(t["input_ids"]) for t in tokenized)
    input_ids = torch.full((len(tokenized), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(tokenized), width), dtype=torch.long)
    labels = torch.full((len(tokenized), width), IGNORE_INDEX, dtype=torch.long)
    for b, t in enumerate(tokenized):
        n = len(t["input_ids"])
        input_ids[b, :n] = torch.tensor(t["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(t["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate(model, tokenizer, prompts, max_new_tokens=128, batch_size=8):
    """Greedy completions of the text `prompts` -> list of new texts (tokenized, then `generate_ids`)."""
    return generate_ids(model, tokenizer, [tokenizer(p)["input_ids"] for p in prompts], max_new_tokens, batch_size)


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids, max_new_tokens=128, batch_size=8, progress=None):
    """Greedy completions of prompts given as token ids -> list of new texts (prompt not included, stops at EOS).

    Batches are padded on the LEFT with an attention mask, so every prompt ends at the same position and
    the new tokens of a batch line up; padding never changes a result. progress: a tasks.Progress (a bar with ETA).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs = []
    if progress is not None:
        progress.start("generating (Rouge-L)", len(prompt_ids))
    for start in range(0, len(prompt_ids), batch_size):
        encoded = prompt_ids[start:start + batch_size]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for b, ids in enumerate(encoded):
            input_ids[b, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[b, width - len(ids):] = 1
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
        )  # [B, width + new]
        for row in generated[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            outputs.append(tokenizer.decode(row, skip_special_tokens=True))
        if progress is not None:
            progress.advance("generating (Rouge-L)", len(encoded))
    if progress is not None:
        progress.done("generating (Rouge-L)")
    return outputs


_scorer = None


def rouge_l_scores(predictions, references):
    """Per-sample Rouge-L F-measure (rouge-score, no stemming), 0 for an empty prediction; each in [0, 1]."""
    global _scorer
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    if _scorer is None and predictions:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [_scorer.score(ref, pred)["rougeL"].fmeasure if pred.strip() else 0.0
            for pred, ref in zip(predictions, references)]


def rouge_l(predictions, references):
    """Mean per-sample Rouge-L F-measure (`rouge_l_scores`); in [0, 1], 0 for no samples."""
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def heldout_token_losses(model, tokenized, pad_token_id, batch_size=4, progress=None, name="held-out loss"):
    """Per example: (sum of its target tokens' cross-entropy, number of target tokens) -> two lists.
    progress: a tasks.Progress, to show a bar `name` with ETA."""
    device = next(model.parameters()).device
    sums, counts = [], []
    if progress is not None:
        progress.start(name, len(tokenized))
    for k in range(0, len(tokenized), batch_size):
        b = {key: v.to(device) for key, v in collate(tokenized[k:k + batch_size], pad_token_id).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [B, T, V]
        targets = b["labels"][:, 1:]  # token t predicts token t+1
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets,
                                                   ignore_index=IGNORE_INDEX, reduction="none")  # [B, T-1]
        sums += losses.double().sum(1).tolist()
        counts += (targets != IGNORE_INDEX).sum(1).tolist()
        if progress is not None:
            progress.advance(name, len(tokenized[k:k + batch_size]))
    if progress is not None:
        progress.done(name)
    return sums, counts


def heldout_loss(model, tokenized, pad_token_id, batch_size=4, progress=None, per_example=None, name="held-out loss"):
    """The held-out loss every script reports: the token-weighted mean cross-entropy of the targets (response +
    EOS) over the whole set, i.e. the sum of all target tokens' losses / the number of target tokens.
    per_example: a dict that receives "loss_sum" and "tokens", the per-example lists (for a paired interval)."""
    sums, counts = heldout_token_losses(model, tokenized, pad_token_id, batch_size, progress, name)
    if per_example is not None:
        per_example.update(loss_sum=sums, tokens=counts)
    return sum(sums) / max(sum(counts), 1)


def heldout_prompt_ids(tokenized):
    """The prompt of each tokenized example as token ids, exactly as tokenized for the loss (a long context cut from
    the left): generation starts from these ids, never from a decoded and re-tokenized text."""
    return [[i for i, l in zip(t["input_ids"], t["labels"]) if l == IGNORE_INDEX] for t in tokenized]


def heldout_generations(model, tokenizer, tokenized, max_new_tokens, progress=None):
    """Greedy generations of up to max_new_tokens from each held-out prompt (`heldout_prompt_ids`) -> texts."""
    return generate_ids(model, tokenizer, heldout_prompt_ids(tokenized), max_new_tokens, progress=progress)


def heldout_rouge_l(model, tokenizer, tokenized, targets, max_new_tokens, progress=None, per_example=None):
    """The Rouge-L every script reports: the mean per-example Rouge-L F of `heldout_generations`; per_example
    receives "rouge", the per-example scores (for a paired interval)."""
    scores = rouge_l_scores(heldout_generations(model, tokenizer, tokenized, max_new_tokens, progress), targets)
    if per_example is not None:
        per_example["rouge"] = scores
    return sum(scores) / len(scores) if scores else 0.0
