"""Every task's data as the scripts hold it -- each client's tokenized examples, the validation and held-out sets --
and the batches a client's steps take.

`args` is the script's parsed flags; the attributes each function reads are named in its docstring.

    clients, val, test = tasks.load_task_data(args, tokenizer, num_clients)  # task, dataset, data_path, iid,
                                                                     # seed, max_length, eval_samples, val_samples
    batch = tasks.make_batch(task, items, tokenizer, device)        # dict of tensors the model takes
    batches = tasks.local_batches(args, examples, tokenizer, device, seed)  # batch_size, grad_accum, local_steps
                                                                          # or local_epochs, task
    batch = tasks.collate_tokenized(items, pad_id)                  # prompts or instruction examples, on the CPU
"""
import math

import torch

from . import glue, prompts, squad
from .errors import DataError
from .instruction import load_instruction_data
from .lm import collate, tokenize_examples
from .partitions import partition, partition_summary, split_validation, subsample
from .prompts import collate_prompts


def load_task_data(args, tokenizer, num_clients, model=None, server_only=False):
    """-> (clients: list of lists of tokenized examples, val: validation examples as the evaluator wants them or
    None without --val_samples, test: held-out examples as the evaluator wants them). The validation examples are
    carved from the training pool before it is partitioned (`split_validation`); the test set is untouched.
    task "prompt" (classification with a causal LM): the template is --template, or with "auto" chosen with `model`
    on the validation examples (tasks/prompts.py). server_only (prompt, sft, glue): num_clients empty clients, the
    validation and held-out sets from the server's own files (Flower's deployment mode)."""
    val_samples = getattr(args, "val_samples", 0)
    if args.task == "prompt":
        data = prompts.load_prompt_data(args.dataset, args.data_path, num_clients, args.iid, args.seed, val_samples,
                                        server_only=server_only)
        print(data.summary)
        template, ids = prompts.pick_template(args.dataset, args.template, model, tokenizer, data.val, args.max_length)
        enc = lambda es: [prompts.tokenize_prompt(tokenizer, e, template, args.max_length, ids) for e in es]  # noqa
        return ([enc(c) for c in data.clients], enc(data.val) if val_samples else None,
                enc(subsample(data.test, args.eval_samples, args.seed)))
    if args.task == "sft":
        data = load_instruction_data(args.dataset, args.data_path, num_clients=num_clients, iid=args.iid,
                                     seed=args.seed, tokenizer=tokenizer, max_length=args.max_length,
                                     val_samples=val_samples, server_only=server_only)
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
        parts = partition(strat, num_clients, args.iid, args.seed, min_size=min(10, len(train) // num_clients),
                          server_only=server_only)
        print(f"{args.dataset}: {len(train)} train, {len(val)} validation, {len(dev)} dev\n"
              + partition_summary(parts, strat))
        enc = lambda es: [dict(tokenizer(e["text_a"], e["text_b"], truncation=True, max_length=args.max_length),
                               labels=e["label"]) for e in es]
        return ([enc([train[i] for i in part]) for part in parts], enc(val) if val_samples else None,
                enc(subsample(dev, args.eval_samples, args.seed)))
    if server_only:
        raise DataError("squad: a server without the clients' data (Flower, data-sizes = declared) is not supported")
    train, dev = squad.load(args.data_path)
    train, val = split_validation(train, val_samples, args.seed)
    parts = partition([0] * len(train), num_clients, "iid", args.seed, min_size=1)
    stride = min(128, args.max_length // 4)  # overlap of the windows a long context is cut into
    clients = [squad.prepare_train_features([train[i] for i in part], tokenizer, args.max_length, stride)
               for part in parts]
    dev = subsample(dev, args.eval_samples, args.seed)
    val = (val, squad.prepare_eval_features(val, tokenizer, args.max_length, stride)) if val_samples else None
    return clients, val, (dev, squad.prepare_eval_features(dev, tokenizer, args.max_length, stride))


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
    """The micro-batches of one turn: reshuffled passes over the client's data, seeded by (seed, round, client). Built
    when a step takes them (`Batches`): a turn holds one step's batches at a time, however many steps it has."""
    per_step = args.batch_size * args.grad_accum
    steps = args.local_steps or max(1, math.ceil(args.local_epochs * len(examples) / per_step))
    g = torch.Generator().manual_seed(seed)
    order = []
    while len(order) < steps * per_step:
        order += torch.randperm(len(examples), generator=g).tolist()
    order = order[:steps * per_step]
    return Batches([order[k:k + args.batch_size] for k in range(0, len(order), args.batch_size)],
                   lambda rows: make_batch(args.task, [examples[i] for i in rows], tokenizer, device))


class Batches:
    """A turn's micro-batches as a sequence (len, index, slice), each built from its example indices when it is
    taken: the list of batches a long turn would be is never held whole."""

    def __init__(self, rows, make):
        self.rows, self.make = rows, make

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        return [self.make(r) for r in self.rows[k]] if isinstance(k, slice) else self.make(self.rows[k])


def collate_tokenized(tokenized, pad_token_id):
    """A batch of either kind of tokenized example: prompts (a label scored on label words) -> `collate_prompts`;
    instruction examples (a target per token) -> tasks.collate."""
    if "label_ids" in tokenized[0]:
        return collate_prompts(tokenized, pad_token_id)
    return collate(tokenized, pad_token_id)
