"""Supervised training plumbing fedcybgd.py and fedavg.py share: task data per client, micro-batches of a local
round, evaluation of a global model, weight-decay groups, and the memory a training step needs.

`args` is the script's parsed flags; the attributes each function reads are named in its docstring.

    clients, val, test = tasks.load_task_data(args, tokenizer, num_clients)  # task, dataset, data_path, iid,
                                                                     # seed, max_length, eval_samples, val_samples
    batches = tasks.local_batches(args, examples, tokenizer, device, seed)  # batch_size, grad_accum, local_steps
                                                                          # or local_epochs, task
    metrics = tasks.evaluate(args, model, tokenizer, test, device, val)    # task, dataset, max_new_tokens;
                                                                          # + val_loss, val_<metric> when val given
    upload, stats = tasks.train_steps(model, names, batches, make_optimizer, lrs)  # a client's local steps
"""
import math

import torch

from . import glue, prompts, squad
from .instruction import load_instruction_data
from .lm import collate, heldout_loss, heldout_rouge_l, tokenize_examples
from .partitions import partition, partition_summary, split_validation


def load_task_data(args, tokenizer, num_clients, model=None):
    """-> (clients: list of lists of tokenized examples, val: validation examples as the evaluator wants them or
    None without --val_samples, test: held-out examples as the evaluator wants them). The validation examples are
    carved from the training pool before it is partitioned (`split_validation`); the test set is untouched.
    task "prompt" (classification with a causal LM): the template is --template, or with "auto" chosen with `model`
    on the validation examples (tasks/prompts.py)."""
    val_samples = getattr(args, "val_samples", 0)
    if args.task == "prompt":
        data = prompts.load_prompt_data(args.dataset, args.data_path, num_clients, args.iid, args.seed, val_samples)
        print(data.summary)
        template, ids = prompts.pick_template(args.dataset, args.template, model, tokenizer, data.val, args.max_length)
        enc = lambda es: [prompts.tokenize_prompt(tokenizer, e, template, args.max_length, ids) for e in es]  # noqa
        return ([enc(c) for c in data.clients], enc(data.val) if val_samples else None,
                enc(subsample(data.test, args.eval_samples, args.seed)))
    if args.task == "sft":
        data = load_instruction_data(args.dataset, args.data_path, num_clients=num_clients, iid=args.iid,
                                     seed=args.seed, tokenizer=tokenizer, max_length=args.max_length,
                                     val_samples=val_samples)
        print(data.summary)
        clients = [tokenize_examples(tokenizer, c, args.max_length, log=None) for c in data.clients]
        cut, total = sum(t["truncated"] for c in clients for t in c), sum(len(c) for c in clients)
        print(f"{cut} of {total} training examples longer than --max_length {args.max_length} were truncated")
        test = subsample(data.test, args.eval_samples, args.seed)
        for e, t in zip(test + data.val, tokenize_examples(tokenizer, test + data.val, args.max_length, log=None)):
            e["tokens"] = t
        return clients, (data.val if val_samples else None), test
    if args.task == "glue":
        train, dev = glue.load(args.dataset, args.data_path)
        train, val = split_validation(train, val_samples, args.seed)
        labels = [e["label"] for e in train]
        strat = labels if glue.NUM_LABELS[args.dataset] > 1 else [0] * len(train)  # stsb: no classes
        parts = partition(strat, num_clients, args.iid, args.seed, min_size=min(10, len(train) // num_clients))
        print(f"{args.dataset}: {len(train)} train, {len(val)} validation, {len(dev)} dev\n"
              + partition_summary(parts, strat))
        enc = lambda es: [dict(tokenizer(e["text_a"], e["text_b"], truncation=True, max_length=args.max_length),
                               labels=e["label"]) for e in es]
        return ([enc([train[i] for i in part]) for part in parts], enc(val) if val_samples else None,
                enc(subsample(dev, args.eval_samples, args.seed)))
    train, dev = squad.load(args.data_path)
    train, val = split_validation(train, val_samples, args.seed)
    parts = partition([0] * len(train), num_clients, "iid", args.seed, min_size=1)
    stride = min(128, args.max_length // 4)  # overlap of the windows a long context is cut into
    clients = [squad.prepare_train_features([train[i] for i in part], tokenizer, args.max_length, stride)
               for part in parts]
    dev = subsample(dev, args.eval_samples, args.seed)
    val = (val, squad.prepare_eval_features(val, tokenizer, args.max_length, stride)) if val_samples else None
    return clients, val, (dev, squad.prepare_eval_features(dev, tokenizer, args.max_length, stride))


def subsample(examples, n, seed):
    """A fixed subset of n held-out examples (all when n == 0), in their original order: for a given seed the
    same examples in every script, round and run, so evaluations are comparable."""
    if n == 0 or n >= len(examples):
        return list(examples)
    idx = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:n]
    return [examples[i] for i in sorted(idx.tolist())]


def make_batch(task, items, tokenizer, device):
    """Tokenized examples -> dict of tensors the model takes (labels included)."""
    if task == "sft":
        b = collate(items, tokenizer.pad_token_id)
    elif task == "prompt":
        b = prompts.collate_prompts(items, tokenizer.pad_token_id)
    elif task == "glue":
        b = tokenizer.pad([{k: v for k, v in e.items() if k != "labels"} for e in items], return_tensors="pt")
        b = dict(b)
        dtype = torch.float if isinstance(items[0]["labels"], float) else torch.long
        b["labels"] = torch.tensor([e["labels"] for e in items], dtype=dtype)
    else:
        b = {k: torch.tensor([e[k] for e in items]) for k in items[0] if k not in ("example_id", "offset_mapping")}
    return {k: v.to(device) for k, v in b.items()}


def local_batches(args, examples, tokenizer, device, seed):
    """The micro-batches of one turn: reshuffled passes over the client's data, seeded by (seed, round, client)."""
    per_step = args.batch_size * args.grad_accum
    steps = args.local_steps or max(1, math.ceil(args.local_epochs * len(examples) / per_step))
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps * per_step:
        order += torch.randperm(len(examples), generator=g).tolist()
    order = order[:steps * per_step]
    return [make_batch(args.task, [examples[i] for i in order[k:k + args.batch_size]], tokenizer, device)
            for k in range(0, len(order), args.batch_size)]


@torch.no_grad()
def evaluate(args, model, tokenizer, test, device, val=None, progress=None, per_example=None):
    """The held-out metrics of `model` (eval_loss and the task's metrics) -> dict; with `val`, the same on the
    validation set as val_loss and val_<metric> (no generation there: Rouge-L is a test-set number).
    progress: a tasks.Progress (bars with ETA for the loss and the generation). per_example: a dict that receives the
    test set's per-example values (sft: loss_sum, tokens; classification: correct) for `paired_interval`."""
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
                                            args.max_new_tokens, progress)
        return out
    if args.task == "prompt":  # accuracy and the label-word cross-entropy, as fedkseed.py reports them
        return prompts.evaluate_prompts(model, test, tokenizer.pad_token_id, per_example, progress=progress)
    if args.task == "glue":
        preds, loss = glue_predictions(model, tokenizer, test, device)
        labels = [e["labels"] for e in test]
        if per_example is not None and isinstance(labels[0], int):
            per_example["correct"] = [int(p == y) for p, y in zip(preds, labels)]
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


def param_groups(named, weight_decay):
    """Weight decay by parameter shape: matrices decay; ndim < 2 (biases, norm weights) do not."""
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class SavedActivations:
    """Counts the bytes autograd saves for backward (deduplicated by storage, parameters excluded):
    the activation part of a step's memory, measured the same way on CPU and GPU."""

    def __init__(self, model):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self.seen, self.bytes = set(), 0
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def train_steps(model, names, batches, make_optimizer, lrs, grad_accum=1, seed=0, loss_fn=None, clip=None,
                fp32_masters=True):
    """A client's local training, as fedcybgd.py's turn and fedavg.py's round run it: optimizer steps on the tensors
    `names` of `model` (everything else frozen), step k on micro-batches [k*grad_accum, (k+1)*grad_accum) of `batches`
    at learning rate lrs[k] -> (upload: name -> a copy of each trained tensor, {"loss": mean over the micro-batches,
    "peak_memory_bytes"}). The model is in eval mode with no gradients on entry and on return.

    make_optimizer([(name, tensor)]) -> a torch optimizer over those tensors; a param group's "lr_scale" (default 1)
    multiplies lrs[k]. The optimizer lives for this call only. With bf16/fp16 weights and fp32_masters it steps fp32
    master copies, rounded into the weights after every step, so updates below the low precision's resolution
    accumulate. loss_fn(model, micro_batch) -> the loss (default: model(**micro_batch).loss); clip(tensors) runs on
    the tensors the optimizer steps, their gradients complete, before each step (gradient clipping).
    peak_memory_bytes, as tensor bytes (the same count on CPU and GPU): every weight the model holds, the trained
    tensors' gradients, the optimizer state, the fp32 masters, and the activations autograd saved (max over
    micro-batches)."""
    torch.manual_seed(seed)  # dropout, if the model has any, is a function of (seed, round, client)
    params = dict(model.named_parameters())
    trained = [(n, params[n]) for n in names]
    for _, p in trained:
        p.requires_grad_(True)
    low_precision = fp32_masters and any(p.dtype != torch.float32 for _, p in trained)
    # masters [the trained tensors' shapes, fp32]: what the optimizer steps; with fp32 weights the weights themselves
    masters = [(n, p.detach().float().clone()) if low_precision else (n, p) for n, p in trained]
    opt = make_optimizer(masters)
    model.train()
    losses, peak_activations, grad_bytes = [], 0, 0
    for step in range(len(batches) // grad_accum):
        for micro in batches[step * grad_accum:(step + 1) * grad_accum]:
            with SavedActivations(model) as saved:
                loss = model(**micro).loss if loss_fn is None else loss_fn(model, micro)
            peak_activations = max(peak_activations, saved.bytes)
            (loss / grad_accum).backward()
            losses.append(loss.item())
        if low_precision:
            for (_, m), (_, p) in zip(masters, trained):
                m.grad, p.grad = p.grad.float(), None
        grad_bytes = tensor_bytes(m.grad for _, m in masters)
        if clip is not None:
            clip([m for _, m in masters])
        for group in opt.param_groups:
            group["lr"] = lrs[step] * group.get("lr_scale", 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if low_precision:
            with torch.no_grad():
                for (_, m), (_, p) in zip(masters, trained):
                    p.copy_(m)  # round the fp32 master once into the weight dtype
    state_bytes = tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    peak = (tensor_bytes(model.parameters()) + grad_bytes + state_bytes
            + (tensor_bytes(m for _, m in masters) if low_precision else 0) + peak_activations)
    for _, p in trained:
        p.requires_grad_(False)
        p.grad = None
    del opt, masters
    model.eval()
    return {n: p.detach().clone() for n, p in trained}, {"loss": sum(losses) / len(losses), "peak_memory_bytes": peak}
