"""tasks/: loaders on small committed fixtures, prompts and label masks, partitions, metrics, bad input."""
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks
from conftest import make_tiny_llama, make_tiny_tokenizer
from tasks import DataError, glue, squad

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------- loaders

def test_dolly_holds_out_one_category_and_uses_the_template():
    data = tasks.load_instruction_data("dolly", FIX / "dolly", num_clients=3, iid="iid", seed=0)
    assert len(data.clients) == 3 and sum(map(len, data.clients)) == 18
    assert len(data.test) == 6 and {e["category"] for e in data.test} == {"summarization"}
    assert {e["category"] for c in data.clients for e in c} == {"brainstorming", "closed_qa", "open_qa"}
    e = next(e for c in data.clients for e in c if e["category"] == "closed_qa")
    i = int(e["target"].split()[1].rstrip("."))
    assert e["prompt"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        f"Write a response for the task request.\n\n### Instruction:\nQuestion {i} for closed_qa?\n\n"
        f"### Input:\nPassage {i} about the river.\n\n### Response:"
    )
    e = next(e for c in data.clients for e in c if e["category"] == "open_qa")
    assert "### Input:" not in e["prompt"] and e["prompt"].startswith("Below is an instruction that describes a task. ")
    assert "3 clients" in data.summary and "summarization" in data.summary


def test_dolly_test_category_by_name():
    data = tasks.load_instruction_data("dolly", FIX / "dolly", num_clients=2, iid="iid", test_category="open_qa")
    assert {e["category"] for e in data.test} == {"open_qa"}


def test_instruct_official_sampling_with_filters():
    data = tasks.load_instruction_data("instruct", FIX / "natural-instructions", seed=1, max_length=100)
    # task_a 30 -> 6; task_b 50 minus 10 over-long inputs -> 40 -> 8; task_small (12 < 20) dropped
    assert [len(c) for c in data.clients] == [6, 8]
    assert [c[0]["category"] for c in data.clients] == ["task_a", "task_b"]
    assert all(len(e["target"]) and "x" * 300 not in e["prompt"] for c in data.clients for e in c)
    # test tasks: 25 > 20 -> max(20, 2%) = 20; 6 -> all
    assert Counter(e["category"] for e in data.test) == {"task_t1": 20, "task_t2": 6}
    e = data.clients[0][0]
    assert e["prompt"].startswith("Below is an instruction that describes a task, paired with an input")
    assert "Write a response that appropriately completes the request.\n\n### Instruction:\nDo task_a.\n\n### Input:\ninput " in e["prompt"]
    assert e["target"].startswith("out ")  # first reference output only
    again = tasks.load_instruction_data("instruct", FIX / "natural-instructions", seed=1, max_length=100)
    assert again.clients == data.clients and again.test == data.test


def test_instruct_token_length_filter():
    tok = make_tiny_tokenizer()  # one token per character
    short = tasks.load_instruction_data("instruct", FIX / "natural-instructions", tokenizer=tok, max_length=300)
    assert [c[0]["category"] for c in short.clients] == ["task_a", "task_b"]
    assert len(short.clients[1]) == 8  # the 300-character inputs no longer fit with their prompt
    for e in short.test:
        assert len(tok(e["prompt"])["input_ids"]) + len(e["target"]) + 1 <= 300
    with pytest.raises(DataError, match="no training task has 20 instances"):
        tasks.load_instruction_data("instruct", FIX / "natural-instructions", tokenizer=tok, max_length=50)


def test_token_counts_are_exact_near_the_limit():
    from tasks.instruction import ALPACA_TEMPLATE, _token_counts

    tok = make_tiny_tokenizer()

    def seam_tok(texts, add_special_tokens=True):  # whole prompts get one token more than their two halves
        out = tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [ids + [0] * ("### Instruction:" in t and "### Response:" in t) for t, ids in zip(texts, out)]}

    examples = [tasks.make_example("Define.", "x" * k, "yy", "t", ALPACA_TEMPLATE) for k in (0, 10, 60, 200)]
    exact = [len(p) + 1 + 2 + 1 for p in (e["prompt"] for e in examples)]  # +1 seam, target 2, EOS 1
    counts = _token_counts(seam_tok, examples, "Define.", max_length=exact[2])
    assert counts[2] == exact[2]  # near the limit: recounted on the whole prompt
    assert [counts[k] for k in (0, 1, 3)] == [exact[k] - 1 for k in (0, 1, 3)]  # far from it: the two-part estimate
    assert "### Input:" not in examples[0]["prompt"]  # the no-input form has its own head


@pytest.mark.parametrize("name", ["alpaca_gpt4_data_en.json", "alpaca.jsonl"])
def test_alpaca_json_and_jsonl(name):
    data = tasks.load_instruction_data("alpaca_gpt4_en", FIX / "alpaca" / name, num_clients=4, iid="iid",
                                       test_fraction=0.1)
    assert len(data.test) == 4 and sum(map(len, data.clients)) == 36
    prompts = {e["prompt"] for c in data.clients for e in c} | {e["prompt"] for e in data.test}
    assert len(prompts) == 40
    with_input = [p for p in prompts if "### Input:\ncontext" in p]
    assert len(with_input) == 14  # records 0, 3, ..., 39 have an input
    same = tasks.load_instruction_data("alpaca_gpt4_en", FIX / "alpaca" / name, num_clients=4, iid="iid",
                                       test_fraction=0.1)
    assert same.test == data.test


def test_alpaca_dirichlet_is_quantity_skew():
    data = tasks.load_instruction_data("alpaca_gpt4_en", FIX / "alpaca", num_clients=3, iid="dir0.5", min_size=2)
    assert sum(map(len, data.clients)) == 40 - 1 and min(map(len, data.clients)) >= 2


@pytest.mark.parametrize("task,n_train,first", [
    ("mrpc", 3, {"text_a": 'He said " the pie " is fine .', "text_b": "The pie is fine , he said .", "label": 1}),
    ("cola", 2, {"text_a": "The boy ran.", "text_b": None, "label": 1}),
    ("sst2", 2, {"text_a": "a fine film ", "text_b": None, "label": 1}),
    ("stsb", 1, {"text_a": "A plane takes off.", "text_b": "An air plane is taking off.", "label": 5.0}),
    ("mnli", 3, {"text_a": "It rains.", "text_b": "It is wet.", "label": 0}),
    ("rte", 2, {"text_a": "A b.", "text_b": "C d.", "label": 0}),
    ("qnli", 2, {"text_a": "A b.", "text_b": "C d.", "label": 0}),
    ("qqp", 1, {"text_a": "How old?", "text_b": "What age?", "label": 1}),
])
def test_glue_tsv(task, n_train, first):
    train, dev = glue.load(task, FIX / "glue" / glue.DIRS[task])
    assert len(train) == n_train and train[0] == first and len(dev) >= 1
    assert task in glue.TASKS and glue.METRIC[task] and glue.NUM_LABELS[task] == (1 if task == "stsb" else
                                                                                    3 if task == "mnli" else 2)
    if task == "mnli":  # entailment, contradiction, neutral -> the hub's numbering
        assert [e["label"] for e in train] == [0, 2, 1]


def test_glue_mrpc_bom_is_dropped():
    assert (FIX / "glue/MRPC/train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    train, dev = glue.load("mrpc", FIX / "glue/MRPC")
    assert [e["label"] for e in train] == [1, 0, 1] and dev[1]["text_b"] == "Indeed yes ."


def test_squad_load():
    train, dev = squad.load(FIX / "squad")
    assert [e["id"] for e in train] == ["t1", "t2"] and len(dev) == 2
    assert dev[0]["answers"] == {"text": ["1903", "in 1903"], "answer_start": [46, 43]}
    assert dev[0]["title"] == "Curie" and dev[0]["context"].startswith("Marie Curie")


# -------------------------------------------------------------------------------- tokenization and batching

EX = {"prompt": "Q: why?\n### Response:", "target": "Because.", "category": "c"}


def test_labels_mask_the_prompt_and_end_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    t = tasks.tokenize_example(tok, EX, max_length=64)
    n_prompt = len(EX["prompt"])
    assert not t["truncated"] and len(t["input_ids"]) == n_prompt + len(EX["target"]) + 1
    assert t["labels"][:n_prompt] == [-100] * n_prompt
    kept = [i for i in t["labels"] if i != -100]
    assert tok.decode(kept) == EX["target"] + tok.eos_token
    assert t["input_ids"][n_prompt:] == kept


def test_truncation_cuts_the_prompt_from_the_left_first(tiny_tokenizer):
    tok = tiny_tokenizer
    t = tasks.tokenize_example(tok, EX, max_length=20)  # 21 prompt + 9 target tokens
    assert t["truncated"] and len(t["input_ids"]) == 20
    kept = [i for i in t["labels"] if i != -100]
    assert tok.decode(kept) == EX["target"] + tok.eos_token  # whole target kept
    assert tok.decode(t["input_ids"][:11]) == EX["prompt"][-11:]  # the prompt's end survives
    long = {"prompt": "p" * 50, "target": "t" * 50, "category": "c"}
    t = tasks.tokenize_example(tok, long, max_length=20)
    labels = [i for i in t["labels"] if i != -100]
    assert len(t["input_ids"]) == 20 and len(labels) == 10  # target cut only down to half of max_length
    assert tok.decode(t["input_ids"][:10]) == "p" * 10


def test_tokenize_examples_reports_truncation_once(tiny_tokenizer):
    lines = []
    out = tasks.tokenize_examples(tiny_tokenizer, [EX, EX, {**EX, "prompt": "short"}], 20, log=lines.append)
    assert len(out) == 3 and lines == ["tasks: 2 of 3 examples longer than max_length=20 tokens were truncated"]


def test_collate_pads_right(tiny_tokenizer):
    ts = [tasks.tokenize_example(tiny_tokenizer, e, 64) for e in (EX, {**EX, "prompt": "Hi:"})]
    b = tasks.collate(ts, pad_token_id=0)
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (2, len(ts[0]["input_ids"]))
    n = len(ts[1]["input_ids"])
    assert b["attention_mask"][1].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
    assert (b["input_ids"][1, n:] == 0).all() and (b["labels"][1, n:] == -100).all()
    assert b["labels"][1, :n].tolist() == ts[1]["labels"]


def test_generate_batched_equals_one_at_a_time(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), seed=3)
    prompts = ["Hello there, how are", "Hi", "A much longer prompt than the others, really."]
    batched = tasks.generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [tasks.generate(model, tiny_tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single and all(isinstance(s, str) for s in batched)
    assert any(len(s) > 0 for s in batched)


def test_generate_stops_at_eos(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), seed=3)
    model.lm_head = torch.nn.Linear(32, len(tiny_tokenizer), bias=True)  # untie: EOS always wins
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tiny_tokenizer.eos_token_id] = 1.0
    assert tasks.generate(model, tiny_tokenizer, ["abc", "de"], max_new_tokens=5) == ["", ""]


# ------------------------------------------------------------------------------------------------ partitions

@pytest.mark.parametrize("n,clients", [(100, 7), (10, 10), (13, 1)])
def test_iid_partition_sizes(n, clients):
    parts = tasks.partition(list(range(n)), clients, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert len(parts) == clients and max(sizes) - min(sizes) <= 1
    assert sorted(i for p in parts for i in p) == list(range(n))


def _labels(n_per_class=200, classes=7):
    return [f"c{k}" for k in range(classes) for _ in range(n_per_class)]


def test_dirichlet_partition_is_a_partition_with_min_size_and_deterministic():
    labels = _labels()
    parts = tasks.partition(labels, 20, "dir0.5", seed=7, min_size=10)
    assert sorted(i for p in parts for i in p) == list(range(len(labels)))
    assert min(len(p) for p in parts) >= 10
    assert tasks.partition(labels, 20, "dir0.5", seed=7, min_size=10) == parts
    assert tasks.partition(labels, 20, "dir0.5", seed=8, min_size=10) != parts


def test_partitions_are_pinned():
    # numpy's Generator(PCG64) stream is the same on every platform: pinned values catch any drift
    parts = tasks.partition(_labels(20, 3), 4, "dir1.0", seed=42, min_size=1)
    assert [len(p) for p in parts] == [21, 16, 13, 10] and parts[0][:5] == [51, 55, 14, 54, 40]
    assert tasks.partition(list(range(10)), 3, "iid", seed=42) == [[5, 6, 0, 7], [3, 2, 4], [9, 1, 8]]


def _mean_label_entropy(parts, labels):
    ent = []
    for p in parts:
        counts = np.array(list(Counter(labels[i] for i in p).values()), dtype=float)
        q = counts / counts.sum()
        ent.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ent))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels()
    iid = _mean_label_entropy(tasks.partition(labels, 20, "iid", seed=0), labels)
    ents = [np.mean([_mean_label_entropy(tasks.partition(labels, 20, f"dir{a}", seed=s, min_size=5), labels)
                     for s in range(3)]) for a in (100.0, 1.0, 0.1)]
    assert iid > ents[0] - 0.05 and ents[0] > ents[1] > ents[2]
    assert ents[2] < 0.6 * math.log(7)


def test_partition_summary_lists_sizes_and_mix():
    labels = ["a"] * 5 + ["b"] * 3
    text = tasks.partition_summary([[0, 1, 5], [2, 3, 4, 6, 7]], labels)
    assert "2 clients, 8 examples" in text and "min 3" in text and "a 2, b 1" in text and "a 3, b 2" in text


# --------------------------------------------------------------------------------------------------- metrics

def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 tokens; P = R = 5/6 -> F = 5/6
    assert tasks.rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # LCS("a b c", "a x y c z") = 2; P = 2/3, R = 2/5 -> F = 2PR/(P+R) = 0.5
    assert tasks.rouge_l(["a b c"], ["a x y c z"]) == pytest.approx(0.5)
    # mean over samples, 0 for an empty prediction, case/punctuation ignored by the tokenizer
    assert tasks.rouge_l(["The cat.", "", "dog"], ["the cat", "anything", "cat"]) == pytest.approx(1 / 3)
    assert tasks.rouge_l([], []) == 0.0


@pytest.mark.parametrize("pred,gold,em,f1", [
    ("The Nobel Prize!", "nobel prize", 1.0, 1.0),  # article + punctuation + case
    ("an  apple", "apple", 1.0, 1.0),
    ("in 1903", "1903", 0.0, 2 / 3),  # P = 1/2, R = 1 -> 2/3
    ("Brazil and Peru", "Peru", 0.0, 0.5),  # P = 1/3, R = 1 -> 1/2
    ("nothing", "1903", 0.0, 0.0),
])
def test_squad_em_f1_by_hand(pred, gold, em, f1):
    assert squad.exact_match_score(pred, gold) == em and squad.f1_score(pred, gold) == pytest.approx(f1)


def test_squad_evaluate_takes_max_over_golds():
    _, dev = squad.load(FIX / "squad")
    # d1 golds "1903" / "in 1903": "In 1903." matches the second exactly.
    # d2 "Chemistry" vs "nobel prize in chemistry" (both golds normalise to 4 tokens): P = 1, R = 1/4 -> F = 0.4
    out = squad.evaluate(dev, {"d1": "In 1903.", "d2": "Chemistry"})
    assert out["exact_match"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(100 * (1.0 + 0.4) / 2)


def test_squad_features_and_postprocess_recover_the_answer(tiny_tokenizer):
    train, dev = squad.load(FIX / "squad")
    feats = squad.prepare_train_features(train, tiny_tokenizer, max_seq_length=64, doc_stride=16)
    assert len(feats) > len(train)  # long contexts become several windows
    assert all(len(f["input_ids"]) == 64 == len(f["attention_mask"]) for f in feats)
    hits = [f for f in feats if f["start_positions"] > 0]
    assert hits and all(f["end_positions"] >= f["start_positions"] for f in hits)
    for f in hits:  # the labelled span decodes to a gold answer
        span = tiny_tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1])
        assert span in ("Brazil", "The Amazon river")
    # windows of 80 tokens shifted by 16 context characters: some window holds each whole answer
    eval_feats = squad.prepare_eval_features(dev, tiny_tokenizer, max_seq_length=80, doc_stride=32)
    assert {f["example_id"] for f in eval_feats} == {"d1", "d2"}
    # logits that point at "1903" / "Nobel Prize in Chemistry" wherever the window holds them
    starts, ends = [], []
    for f in eval_feats:
        ex = next(e for e in dev if e["id"] == f["example_id"])
        a = ex["answers"]["answer_start"][0] if ex["id"] == "d1" else ex["context"].index("Nobel Prize in Chemistry")
        b = a + (4 if ex["id"] == "d1" else len("Nobel Prize in Chemistry"))
        s, e = np.zeros(80), np.zeros(80)
        for k, off in enumerate(f["offset_mapping"]):
            if off is not None and off[0] == a:
                s[k] = 10
            if off is not None and off[1] == b:
                e[k] = 10
        starts.append(s)
        ends.append(e)
    preds = squad.postprocess_predictions(dev, eval_feats, starts, ends)
    assert preds == {"d1": "1903", "d2": "Nobel Prize in Chemistry"}
    assert squad.evaluate(dev, preds) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_gpt2_like_tokenizer_without_pad():
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    train, _ = squad.load(FIX / "squad")
    feats = squad.prepare_train_features(train, tok, max_seq_length=256, doc_stride=32)
    assert tok.pad_token == tok.eos_token and len(feats) == 2


def test_glue_metrics_by_hand():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # TP 2, FP 1, FN 1, TN 2
    assert glue.compute_metrics("mrpc", pred, gold) == pytest.approx({"accuracy": 4 / 6, "f1": 2 * 2 / (4 + 1 + 1)})
    assert glue.compute_metrics("cola", pred, gold)["matthews_correlation"] == pytest.approx((4 - 1) / math.sqrt(3 * 3 * 3 * 3))
    assert glue.compute_metrics("mnli", [0, 1, 2, 2], [0, 1, 1, 2]) == {"accuracy": 0.75}
    assert glue.compute_metrics("cola", [1, 1], [1, 0])["matthews_correlation"] == 0.0  # empty margin
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # pearson: dx = (-1.5,-.5,.5,1.5), dy = (-1.75,.25,1.25,.25): sum dxdy = 3.5, sxx = 5, syy = 4.75
    m = glue.compute_metrics("stsb", x, y)
    assert m["pearson"] == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    # ranks of y with ties: (1, 2.5, 4, 2.5)
    assert m["spearman"] == pytest.approx(glue.pearson([1, 2, 3, 4], [1, 2.5, 4, 2.5]))


def test_glue_metrics_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 50).astype(float), rng.normal(size=50)
    assert glue.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0])
    assert glue.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0])


# ------------------------------------------------------------------------------------------------ bad input

def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_missing_files_name_path_layout_and_source(tmp_path):
    for call, words in [
        (lambda: tasks.load_instruction_data("dolly", tmp_path / "nope.jsonl"), ["nope.jsonl", "databricks-dolly-15k", "huggingface"]),
        (lambda: tasks.load_instruction_data("instruct", tmp_path / "ni"), ["ni", "splits/default", "git clone"]),
        (lambda: tasks.load_instruction_data("alpaca_gpt4_en", tmp_path / "a.json"), ["a.json", "instruction, input, output"]),
        (lambda: glue.load("rte", tmp_path), ["train.tsv", "GLUE", "data/glue/RTE"]),
        (lambda: squad.load(tmp_path), ["train-v1.1.json", "data/squad"]),
    ]:
        with pytest.raises(DataError) as err:
            call()
        msg = _one_line(err)
        assert all(w in msg for w in words), msg


def test_missing_default_path_offline_says_where_to_put_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(tasks.sources, "DATA_ROOT", tmp_path / "data")
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly")
    msg = _one_line(err)
    assert "data/dolly/databricks-dolly-15k.jsonl not found" in msg and "not reachable" in msg
    with pytest.raises(DataError, match="nyu-mll/glue"):
        glue.load("mrpc")


def test_malformed_json_line_names_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "i", "context": "", "response": "r", "category": "c"})
    f.write_text(good + "\n" + good + "\n{broken\n")
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly", f)
    assert f"{f}:3: malformed JSON line" in _one_line(err)
    f.write_text(good + "\n" + json.dumps({"instruction": "i"}) + "\n")
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly", f)
    assert f"{f}:2: record lacks field(s) context, response, category" in _one_line(err)
    j = tmp_path / "a.json"
    j.write_text('[\n{"instruction": "x", "output": "y"},\n{"instruction": }\n]')
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("alpaca_gpt4_en", j)
    assert f"{j}:3: malformed JSON" in _one_line(err)


def test_bad_ni_and_glue_records(tmp_path):
    root = tmp_path / "ni"
    (root / "splits/default").mkdir(parents=True)
    (root / "tasks").mkdir()
    (root / "splits/default/train_tasks.txt").write_text("t1\n")
    (root / "splits/default/test_tasks.txt").write_text("t1\n")
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("instruct", root)
    assert "t1.json not found: the split lists task 't1'" in _one_line(err)
    (root / "tasks/t1.json").write_text(json.dumps({"Definition": ["d"], "Instances": [{"input": "x"}]}))
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("instruct", root)
    assert "Instances[0]: record lacks field(s) output" in _one_line(err)
    g = tmp_path / "RTE"
    g.mkdir()
    (g / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    (g / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\n")
    with pytest.raises(DataError) as err:
        glue.load("rte", g)
    assert f"{g / 'train.tsv'}:2: bad rte label 'maybe'" in _one_line(err)


def test_unknown_names_list_choices():
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly15k")
    assert "dolly, instruct, alpaca_gpt4_en" in _one_line(err)
    with pytest.raises(DataError) as err:
        glue.load("wnli")
    assert "cola, sst2, mrpc" in _one_line(err)
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly", FIX / "dolly", test_category="poetry", num_clients=2, iid="iid")
    assert "brainstorming, closed_qa, open_qa, summarization" in _one_line(err)
    with pytest.raises(DataError, match="use 'iid' or 'dirALPHA'"):
        tasks.partition([0, 1, 2], 2, "dirichlet")
    with pytest.raises(DataError, match="use 'iid' or 'dirALPHA'"):
        tasks.partition([0, 1, 2], 2, "dir-1")


def test_impossible_splits():
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly", FIX / "dolly", num_clients=19, iid="iid")
    assert "cannot split 18 training examples over 19 clients" in _one_line(err)
    with pytest.raises(DataError) as err:
        tasks.load_instruction_data("dolly", FIX / "dolly", num_clients=3)  # 3 x min 10 > 18
    assert "needs 30 examples, only 18" in _one_line(err)
    with pytest.raises(DataError) as err:  # possible on paper, but alpha 0.01 never gives every client 8
        tasks.partition(_labels(20, 2), 5, "dir0.01", seed=0, min_size=8)
    assert "no Dirichlet(alpha=0.01) draw" in _one_line(err)


def test_squad_needs_a_fast_tokenizer():
    class Slow:
        is_fast = False
    with pytest.raises(DataError, match="fast tokenizer"):
        squad.prepare_train_features([], Slow())


# ------------------------------------------------------------------------------ integration (shared data)

@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data")
def test_shared_data_counts():
    records = tasks.instruction.read_dolly(SHARED / "dolly")
    assert len(records) == 15011 and len({r["category"] for r in records}) == 8
    root = SHARED / "natural-instructions" / "splits" / "default"
    assert len((root / "train_tasks.txt").read_text().split()) == 51
    assert len((root / "test_tasks.txt").read_text().split()) == 10
    train, dev = glue.load("mrpc", SHARED / "glue" / "MRPC")
    data_rows = (SHARED / "glue/MRPC/train.tsv").read_bytes().count(b"\n") - 1  # every line but the header
    assert len(train) == data_rows and len(dev) == 408
    assert {e["label"] for e in train} == {0, 1} and train[0]["text_a"].startswith("Amrozi accused")


@pytest.mark.skipif(not SHARED.is_dir(), reason="no ../shared/data")
def test_shared_data_loads_as_fedkseed_uses_it():
    dolly = tasks.load_instruction_data("dolly", SHARED / "dolly")  # official defaults: 200 clients, dir0.5
    assert len(dolly.clients) == 200 and len(dolly.test) == 1188 and min(map(len, dolly.clients)) >= 10
    assert sum(map(len, dolly.clients)) + len(dolly.test) == 15011
    ni = tasks.load_instruction_data("instruct", SHARED / "natural-instructions")
    assert 0 < len(ni.clients) <= 51 and {e["category"] for e in ni.test} <= set(
        (SHARED / "natural-instructions/splits/default/test_tasks.txt").read_text().split())


# ------------------------------------------------------------------------------------------- validation split
def test_validation_is_carved_from_training_before_partitioning(tmp_path):
    """Dolly: the validation examples come from the training categories, are held by no client, never touch the
    held-out category, and are the same examples for the same seed (every script calls the same loader)."""
    from test_fedkseed import write_dolly
    path = write_dolly(tmp_path / "dolly.jsonl", n=80)
    plain = tasks.load_instruction_data("dolly", path, num_clients=4, iid="iid", seed=7)
    data = tasks.load_instruction_data("dolly", path, num_clients=4, iid="iid", seed=7, val_samples=10)
    again = tasks.load_instruction_data("dolly", path, num_clients=4, iid="iid", seed=7, val_samples=10)
    key = lambda e: (e["prompt"], e["target"])  # noqa: E731
    val = {key(e) for e in data.val}
    held = {key(e) for c in data.clients for e in c}
    assert len(data.val) == 10 and len(val) == 10 and not (val & held)
    assert all(e["category"] != "summarization" for e in data.val) and data.test == plain.test
    assert held | val == {key(e) for c in plain.clients for e in c}  # nothing lost: train = clients + validation
    assert [key(e) for e in again.val] == [key(e) for e in data.val]
    with pytest.raises(tasks.DataError, match="--val_samples 1000"):
        tasks.load_instruction_data("dolly", path, num_clients=4, iid="iid", seed=7, val_samples=1000)


def test_glue_validation_split_is_disjoint_from_clients_and_dev():
    from types import SimpleNamespace
    args = SimpleNamespace(task="glue", dataset="mrpc", data_path=str(FIX / "glue/MRPC"), iid="iid",
                           seed=3, max_length=64, eval_samples=0, val_samples=1)
    tok = make_tiny_tokenizer()
    clients, val, dev = tasks.load_task_data(args, tok, 2)
    _, none, dev_plain = tasks.load_task_data(SimpleNamespace(**{**vars(args), "val_samples": 0}), tok, 2)
    ids = lambda es: {tuple(e["input_ids"]) for e in es}  # noqa: E731
    assert len(val) == 1 and none is None and ids(dev) == ids(dev_plain)
    assert not (ids(val) & ids([e for c in clients for e in c]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
def test_an_honest_pack_fits_its_bound(dtype):
    """A server refuses an upload longer than `packed_bound` before decoding it, so an honest one must fit. The
    length is checked against the safetensors layout written out here: an 8-byte header size, the JSON header,
    the raw bytes."""
    tensors = {"model.layers.%d.self_attn.q_proj.weight_with_a_long_name_%s" % (i, "x" * 40 * i):
               torch.ones([3] * (i % 4)).to(dtype) for i in range(12)}
    wire = tasks.pack(tensors)
    header = int.from_bytes(wire[:8], "little")
    assert len(wire) == 8 + header + sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(wire) <= tasks.packed_bound(tensors) <= len(wire) + 1024 + 128 * len(tensors)
    assert tasks.unpack(wire).keys() == tensors.keys()


def test_a_plot_that_fails_never_fails_the_run(tmp_path, capsys):
    """A metric no axis can hold (1.7e308 is finite: matplotlib cannot lay out the axis) or any other plot error: one
    line, no loss.png, and the caller goes on."""
    import tasks
    pytest.importorskip("matplotlib")
    files = tasks.RunFiles(tmp_path)
    files.start({})
    for r in range(3):
        files.metric({"round": r, "train_loss": 1.7e308 if r else None, "eval_loss": -1.7e308})
    assert files.plot("a title") is None and not (tmp_path / "loss.png").exists()
    assert capsys.readouterr().out.strip().startswith("loss.png not written: ")
