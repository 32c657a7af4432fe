"""Instruction data for causal-LM tuning: Dolly-15K, Natural Instructions (v2 layout), Alpaca-format json.

Every record becomes an example {"prompt": str, "target": str, "category": str}: the prompt is the
instruction (and its input, if any) filled into an Alpaca-style template, the target is the response
(the tokenizer appends EOS later). The model is trained on target tokens only.
"""
from dataclasses import dataclass, field
from pathlib import Path


from .partitions import partition, partition_summary, split_validation, stream
from .errors import DataError
from .sources import default_path, load_hub, read_json, read_jsonl, require_fields

# FedKSeed's Dolly template (Alpaca's, with "for the task request").
DOLLY_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response for the task request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    "Below is an instruction that describes a task. "
    "Write a response for the task request.\n\n### Instruction:\n{instruction}\n\n### Response:",
)
# Alpaca's original template; FedKSeed uses its with-input form for Natural Instructions.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
)

DATASETS = ("dolly", "instruct", "alpaca_gpt4_en")


def make_example(instruction, input_text, target, category, template):
    """Fill the template (the with-input form only when there is an input)."""
    with_input, no_input = template
    if input_text:
        prompt = with_input.format(instruction=instruction, input=input_text)
    else:
        prompt = no_input.format(instruction=instruction)
    return {"prompt": prompt, "target": target, "category": category}


@dataclass
class InstructionData:
    clients: list  # clients[j] = list of examples held by client j
    test: list  # held-out examples
    summary: str  # printable table of client sizes and label mix
    val: list = field(default_factory=list)  # validation examples carved from the training pool (val_samples)

    def __repr__(self):
        return (f"InstructionData({len(self.clients)} clients, {sum(map(len, self.clients))} train, {len(self.val)} "
                f"val, {len(self.test)} test)")


# ---------------------------------------------------------------------------------------------- Dolly-15K

DOLLY_HINT = (
    "expected databricks-dolly-15k.jsonl with fields instruction/context/response/category; get it from "
    "https://huggingface.co/datasets/databricks/databricks-dolly-15k and put it at data/dolly/"
)


def read_dolly(data_path=None):
    """-> list of raw records {instruction, context, response, category}."""
    path = Path(data_path) if data_path else default_path("dolly", "databricks-dolly-15k.jsonl")
    if path.is_dir():
        path = path / "databricks-dolly-15k.jsonl"
    if not path.is_file():
        if data_path:
            raise DataError(f"{path} not found ({DOLLY_HINT})")
        return list(load_hub("databricks/databricks-dolly-15k", missing=path, hint=DOLLY_HINT)["train"])
    records = []
    for lineno, r in read_jsonl(path):
        require_fields(r, ("instruction", "context", "response", "category"), f"{path}:{lineno}")
        records.append(r)
    if not records:
        raise DataError(f"{path} has no records ({DOLLY_HINT})")
    return records


def load_dolly(data_path, num_clients, iid, seed, test_category="summarization", min_size=10, val_samples=0,
               server_only=False):
    """FedKSeed's split: one whole category is the test set, the other 7 are partitioned over clients (after
    val_samples of them are carved out for validation). server_only: no client data (`partition`)."""
    records = read_dolly(data_path)
    examples = [
        make_example(r["instruction"], r["context"], r["response"], r["category"], DOLLY_TEMPLATE) for r in records
    ]
    categories = sorted({e["category"] for e in examples})
    if test_category not in categories:
        raise DataError(f"unknown Dolly test category '{test_category}': choose one of {', '.join(categories)}")
    train = [e for e in examples if e["category"] != test_category]
    test = [e for e in examples if e["category"] == test_category]
    train, val = split_validation(train, val_samples, seed)
    labels = [e["category"] for e in train]
    parts = partition(labels, num_clients, iid, seed, min_size=min_size, server_only=server_only)
    clients = [[train[i] for i in part] for part in parts]
    head = (f"dolly: test = category '{test_category}' ({len(test)} examples), train = {len(categories) - 1} "
            f"categories, {iid}" + (f", {len(val)} of them held out for validation" if val else ""))
    return InstructionData(clients, test, head + "\n" + partition_summary(parts, labels), val)


# --------------------------------------------------------------------------- Natural Instructions (v2 layout)

NI_HINT = (
    "expected the Natural Instructions v2 layout tasks/<name>.json + splits/default/{train,test}_tasks.txt; "
    "get it with: git clone https://github.com/allenai/natural-instructions data/natural-instructions"
)


def _read_task_list(path):
    if not path.is_file():
        raise DataError(f"{path} not found ({NI_HINT})")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_ni_task(root, name):
    """-> (definition, list of (input, first output)) for one task file."""
    path = root / "tasks" / f"{name}.json"
    if not path.is_file():
        raise DataError(f"{path} not found: the split lists task '{name}' ({NI_HINT})")
    task = read_json(path)
    if not isinstance(task, dict):
        raise DataError(f"{path}: expected a JSON object with Definition and Instances")
    require_fields(task, ("Definition", "Instances"), str(path))
    definition = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
    pairs = []
    for k, inst in enumerate(task["Instances"]):
        require_fields(inst, ("input", "output"), f"{path}: Instances[{k}]")
        outputs = inst["output"] if isinstance(inst["output"], list) else [inst["output"]]
        if not outputs:
            raise DataError(f"{path}: Instances[{k}] has an empty output list")
        pairs.append((inst["input"], outputs[0]))  # only the first reference output is used, as officially
    return definition, pairs


def _token_counts(tokenizer, examples, definition, max_length, margin=16):
    """Tokens of prompt + target + EOS per example, as tokenize_example counts them (exact near max_length).

    A task's long definition is in every prompt: tokenize it once and each instance's remainder apart
    (several times faster). Token merges across that seam can shift a count by a token or two, so
    counts within `margin` of max_length are redone on the whole prompt.
    """
    if not examples:
        return []
    cut = [e["prompt"].index("### Instruction:\n") + len("### Instruction:\n") + len(definition) for e in examples]
    heads = sorted({e["prompt"][:c] for e, c in zip(examples, cut)})  # with-input and no-input forms
    n_head = {h: len(ids) for h, ids in zip(heads, tokenizer(heads)["input_ids"])}
    rest = tokenizer([e["prompt"][c:] for e, c in zip(examples, cut)], add_special_tokens=False)["input_ids"]
    target = tokenizer([e["target"] for e in examples], add_special_tokens=False)["input_ids"]
    counts = [n_head[e["prompt"][:c]] + len(r) + len(t) + 1 for e, c, r, t in zip(examples, cut, rest, target)]
    near = [k for k, n in enumerate(counts) if abs(n - max_length) <= margin]
    if near:
        exact = tokenizer([examples[k]["prompt"] for k in near])["input_ids"]
        for k, ids in zip(near, exact):
            counts[k] = len(ids) + len(target[k]) + 1
    return counts


def load_natural_instructions(data_path, seed, tokenizer=None, max_length=1024, val_samples=0):
    """One client per training task; the official sampling, with a token-length filter.

    Train tasks: drop instances longer than max_length, drop tasks left with < 20 instances, keep a random
    20% of each. Test tasks: same length filter, then max(20, 2%) instances each (all if <= 20).
    The filter counts tokens of prompt + target + EOS when a tokenizer is given (the official code
    counts characters of the input, which is what happens without a tokenizer).
    """
    root = Path(data_path) if data_path else default_path("natural-instructions")
    if not root.is_dir():
        raise DataError(f"{root} not found ({NI_HINT})")
    split = root / "splits" / "default"
    train_names = _read_task_list(split / "train_tasks.txt")
    test_names = _read_task_list(split / "test_tasks.txt")
    rng = stream(seed, "test_split")

    def task_examples(name):
        definition, pairs = read_ni_task(root, name)
        examples = [make_example(definition, inp, out, name, ALPACA_TEMPLATE) for inp, out in pairs]
        if tokenizer is None:
            return [e for e, (inp, _) in zip(examples, pairs) if len(inp) < max_length]
        return [e for e, n in zip(examples, _token_counts(tokenizer, examples, definition, max_length))
                if n <= max_length]

    clients, dropped = [], []
    for name in train_names:
        examples = task_examples(name)
        if len(examples) < 20:
            dropped.append(name)
            continue
        keep = rng.choice(len(examples), int(len(examples) * 0.2), replace=False)
        clients.append([examples[i] for i in keep])
    if not clients:
        raise DataError(f"{root}: no training task has 20 instances within max_length={max_length}")
    test = []
    for name in test_names:
        examples = task_examples(name)
        if len(examples) > 20:
            keep = rng.choice(len(examples), max(20, int(0.02 * len(examples))), replace=False)
            examples = [examples[i] for i in keep]
        test.extend(examples)
    if val_samples:  # carved from the pooled training instances, then each client keeps the rest of its own
        owner = [k for k, c in enumerate(clients) for _ in c]
        pool, val = split_validation(list(zip(owner, [e for c in clients for e in c])), val_samples, seed)
        clients = [c for c in ([e for k, e in pool if k == j] for j in range(len(clients))) if c]
        val = [e for _, e in val]
    else:
        val = []
    labels = [e["category"] for c in clients for e in c]
    parts, start = [], 0
    for c in clients:
        parts.append(list(range(start, start + len(c))))
        start += len(c)
    head = (
        f"instruct: {len(clients)} clients (one per training task; {len(dropped)} tasks under 20 instances dropped), "
        f"test = {len(test)} examples from {len(test_names)} tasks" + (f", {len(val)} validation" if val else "")
    )
    return InstructionData(clients, test, head + "\n" + partition_summary(parts, labels), val)


# --------------------------------------------------------------------------------------- Alpaca-format json

ALPACA_HINT = (
    "expected a json list or jsonl of {instruction, input, output} records, e.g. alpaca_gpt4_data_en.json from "
    "https://huggingface.co/datasets/vicgalle/alpaca-gpt4, put at data/alpaca_gpt4_en/"
)


def read_alpaca(data_path=None):
    path = Path(data_path) if data_path else default_path("alpaca_gpt4_en", "alpaca_gpt4_data_en.json")
    if path.is_dir():
        found = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl"))
        if not found:
            raise DataError(f"{path} has no .json or .jsonl file ({ALPACA_HINT})")
        path = found[0]
    if not path.is_file():
        if data_path:
            raise DataError(f"{path} not found ({ALPACA_HINT})")
        return list(load_hub("vicgalle/alpaca-gpt4", missing=path, hint=ALPACA_HINT)["train"])
    if path.suffix == ".jsonl":
        numbered = [(f"{path}:{lineno}", r) for lineno, r in read_jsonl(path)]
    else:
        data = read_json(path)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records ({ALPACA_HINT})")
        numbered = [(f"{path}: record {k}", r) for k, r in enumerate(data)]
    records = []
    for where, r in numbered:
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected a JSON object")
        require_fields(r, ("instruction", "output"), where)
        records.append(r)
    if not records:
        raise DataError(f"{path} has no records ({ALPACA_HINT})")
    return records


def load_alpaca(data_path, num_clients, iid, seed, test_fraction=0.01, min_size=10, val_samples=0):
    """A seeded held-out slice is the test set; the rest is partitioned (dirALPHA: quantity skew only)."""
    records = read_alpaca(data_path)
    examples = [
        make_example(r["instruction"], r.get("input") or "", r["output"], "alpaca", ALPACA_TEMPLATE) for r in records
    ]
    order = stream(seed, "test_split").permutation(len(examples))
    n_test = max(1, int(round(test_fraction * len(examples))))
    if n_test >= len(examples):
        raise DataError(f"only {len(examples)} records: too few to hold out {n_test} for testing")
    test = [examples[i] for i in order[:n_test]]
    train, val = split_validation([examples[i] for i in order[n_test:]], val_samples, seed)
    labels = [e["category"] for e in train]
    parts = partition(labels, num_clients, iid, seed, min_size=min_size)
    head = f"alpaca_gpt4_en: test = {len(test)} held-out records, {iid}" + (f", {len(val)} validation" if val else "")
    return InstructionData([[train[i] for i in p] for p in parts], test, head + "\n" + partition_summary(parts, labels),
                           val)


def load_instruction_data(name, data_path=None, num_clients=200, iid="dir0.5", seed=42, *,
                          test_category="summarization", test_fraction=0.01, min_size=10,
                          tokenizer=None, max_length=1024, val_samples=0, server_only=False):
    """name -> InstructionData(clients, test, summary, val). See the package docstring. server_only (dolly): the
    held-out and validation sets of the server's own file, no client data."""
    if name == "dolly":
        return load_dolly(data_path, num_clients, iid, seed, test_category=test_category, min_size=min_size,
                          val_samples=val_samples, server_only=server_only)
    if server_only:
        raise DataError(f"{name}: a server without the clients' data (Flower, data-sizes = declared) reads dolly, sst2 "
                        "or mrpc only")
    if name == "instruct":  # num_clients is the number of training tasks
        return load_natural_instructions(data_path, seed, tokenizer=tokenizer, max_length=max_length,
                                         val_samples=val_samples)
    if name == "alpaca_gpt4_en":
        return load_alpaca(data_path, num_clients, iid, seed, test_fraction=test_fraction, min_size=min_size,
                           val_samples=val_samples)
    raise DataError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
