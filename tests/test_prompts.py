"""Prompt-based classification (tasks/prompts.py) against computations written out here: each prompt run alone
(no padding, no batching), the label words' logits read off the last position, the cross-entropy by log-sum-exp
in float64, the accuracy by counting."""
import math

import numpy as np
import pytest
import torch

import tasks
from tasks import prompts
from conftest import make_tiny_llama, make_tiny_tokenizer
from test_fedkseed import tiny_dir  # noqa: F401  (a fixture)

WORDS = ("a fine film", "dull and slow", "warm , funny", "a mess", "it works", "not worth it", "pure joy", "tedious")


def write_glue(folder, task, n):
    """Synthetic GLUE TSVs (train.tsv, dev.tsv) of n and n // 2 rows for sst2 or mrpc, labels alternating."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.tsv", n), ("dev.tsv", n // 2)):
        if task == "sst2":
            lines = ["sentence\tlabel"] + [f"{WORDS[i % 8]} {i}\t{i % 2}" for i in range(rows)]
        else:
            lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
                f"{i % 2}\t{i}\t{i + 1}\t{WORDS[i % 8]} {i}\t{WORDS[(i + 3) % 8]}" for i in range(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    return {"sst2": write_glue(root / "SST-2", "sst2", 60), "mrpc": write_glue(root / "MRPC", "mrpc", 40)}
# the character tokenizer of the tests splits " great" into " " and "g", so the tests use one-character label words
TINY = {"sst2": {"eq": ("{text_a} =", ("n", "p")), "ask": ("Is it good? {text_a}\nA:", ("x", "y"))},
        "mrpc": {"pair": ("{text_a} | {text_b} ?", ("n", "y"))}}


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    return make_tiny_llama(len(tok)).eval(), tok


@pytest.fixture
def tiny_templates(monkeypatch):
    monkeypatch.setattr(prompts, "TEMPLATES", TINY)


def by_hand(model, tok, examples, template):
    """-> per example (label-word logits as float64 [L], cross-entropy, correct): one unpadded forward each."""
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in template[1]]
    out = []
    for e in examples:
        text = template[0].format(text_a=e["text_a"].strip(), text_b=(e.get("text_b") or "").strip())
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0, -1].double().numpy()
        s = logits[ids]
        lse = s.max() + math.log(np.exp(s - s.max()).sum())
        out.append((s, lse - s[e["label"]], int(np.argmax(s) == e["label"])))
    return out


@pytest.mark.parametrize("task, name", [("sst2", "eq"), ("sst2", "ask"), ("mrpc", "pair")])
def test_label_word_loss_and_accuracy_equal_one_prompt_at_a_time(tiny, tiny_templates, glue_dir, task, name):
    model, tok = tiny
    train, _ = tasks.glue.load(task, glue_dir[task])
    examples, template = train[:7], TINY[task][name]
    want = by_hand(model, tok, examples, template)
    label_ids = prompts.label_token_ids(tok, template[1])
    ts = [prompts.tokenize_prompt(tok, e, template, 512, label_ids) for e in examples]
    batch = tasks.collate_tokenized(ts, tok.pad_token_id)  # padded: prompts of different lengths
    with torch.no_grad():
        scores = prompts.label_word_logits(model, batch).double().numpy()
        loss = float(prompts.label_word_loss(model, batch))
    assert np.allclose(scores, np.stack([s for s, _, _ in want]), atol=1e-5)
    assert math.isclose(loss, float(np.mean([ce for _, ce, _ in want])), rel_tol=1e-5)
    per_example = {}
    out = prompts.evaluate_prompts(model, ts, tok.pad_token_id, per_example, batch_size=3)
    assert per_example["correct"] == [c for _, _, c in want]
    assert math.isclose(out["accuracy"], np.mean([c for _, _, c in want]))
    assert math.isclose(out["eval_loss"], float(np.mean([ce for _, ce, _ in want])), rel_tol=1e-5)


def test_the_template_is_the_best_on_validation(tiny, tiny_templates, glue_dir):
    model, tok = tiny
    train, _ = tasks.glue.load("sst2", glue_dir["sst2"])
    val = train[:12]
    name, table = prompts.choose_template(model, tok, "sst2", val, 512, log=lambda *_: None)
    want = {n: float(np.mean([c for _, _, c in by_hand(model, tok, val, t)])) for n, t in TINY["sst2"].items()}
    assert table == pytest.approx(want) and name == max(want, key=lambda n: (want[n], -list(want).index(n)))
    with pytest.raises(tasks.DataError, match="needs validation examples"):
        prompts.choose_template(model, tok, "sst2", [], 512)


def test_label_words_that_share_a_first_token_are_refused(tiny):
    _, tok = tiny
    with pytest.raises(tasks.DataError, match="share a first token"):
        prompts.label_token_ids(tok, prompts.TEMPLATES["sst2"]["mezo"][1])  # " terrible" / " great": " " and " "


def test_a_long_prompt_keeps_its_end():
    tok = make_tiny_tokenizer()
    t = prompts.tokenize_prompt(tok, {"text_a": "x" * 50, "label": 1}, TINY["sst2"]["eq"], 8, [4, 5])
    assert tok.decode(t["input_ids"]) == "xxxxxx =" and t["label"] == 1


@pytest.mark.parametrize("iid", ["iid", "dir0.5"])
def test_prompt_data_carves_validation_then_splits_the_rest(glue_dir, iid):
    train, dev = tasks.glue.load("sst2", glue_dir["sst2"])
    data = prompts.load_prompt_data("sst2", glue_dir["sst2"], num_clients=3, iid=iid, seed=1, val_samples=5,
                                    min_size=2)
    held = [e for c in data.clients for e in c]
    key = lambda e: (e["text_a"], e["label"])  # noqa: E731
    assert len(data.val) == 5 and data.test == dev and len(held) + 5 == len(train)
    assert sorted(map(key, held + data.val)) == sorted(map(key, train))
    with pytest.raises(tasks.DataError, match="unknown task"):
        prompts.load_prompt_data("cola", glue_dir["sst2"])


def test_fedkseed_on_sst2_reports_accuracy_and_resumes_exactly(tiny_dir, glue_dir, tiny_templates,  # noqa: F811
                                                                tmp_path):
    """`fedkseed.py --dataset sst2`: the template chosen on validation, accuracy at round 0 (zero-shot) and after,
    the label-word loss as the ZO steps' loss, and a run stopped after round 1 and resumed equals the whole run."""
    import fedkseed as fk
    from test_dropouts import exported, same_weights

    def flags(out, *extra):
        return ["--model", str(tiny_dir), "--dataset", "sst2", "--data_path", str(glue_dir["sst2"]), "--num_clients",
                "3", "-m", "0.67", "-K", "16", "--local_steps", "3", "--rounds", "2", "--lr", "1e-2", "--zo_eps",
                "1e-2", "--max_length", "64", "--iid", "iid", "--eval_samples", "8", "--val_samples", "6",
                "--eval_every", "1", "--device", "cpu", "--output_dir", str(out), *extra]
    rows = fk.train(fk.parse_args(flags(tmp_path / "whole")))
    assert [r["round"] for r in rows] == [0, 1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["val_accuracy"] is not None and r["eval_loss"] > 0 for r in rows) and "rougeL" not in rows[0]
    assert all(r["train_loss"] > 0 for r in rows[1:])
    fk.train(fk.parse_args(flags(tmp_path / "cut", "--rounds", "1")))
    fk.train(fk.parse_args(flags(tmp_path / "cut", "--resume")))
    assert same_weights(exported(tmp_path / "whole"), exported(tmp_path / "cut"))
    with pytest.raises(tasks.DataError, match="--template nope: sst2 has eq, ask"):
        fk.train(fk.parse_args(flags(tmp_path / "bad", "--template", "nope")))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fedavg_on_prompt_sst2_trains_the_label_word_loss_and_reports_accuracy(tiny_dir, glue_dir,  # noqa: F811
                                                                             tiny_templates, tmp_path, method):
    """`fedavg.py --task prompt`: the same template choice, examples and metrics as fedkseed.py's, the label-word
    cross-entropy as the training loss (so FedAvg, FedIT and centralized runs sit beside FedKSeed's)."""
    import fedavg as fa
    rows = fa.train(fa.parse_args([
        "--task", "prompt", "--method", method, "--model", str(tiny_dir), "--data_path", str(glue_dir["sst2"]),
        "--num_clients", "3", "-m", "0.67", "--rounds", "2", "--local_steps", "2", "--batch_size", "4",
        "--max_length", "64", "--iid", "iid", "--eval_samples", "8", "--val_samples", "6", "--device", "cpu",
        "--output_dir", str(tmp_path / method)] + (["--lora_targets", "q_proj,v_proj"] if method == "lora" else [])))
    assert [r["round"] for r in rows] == [0, 1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["val_accuracy"] is not None for r in rows) and rows[1]["train_loss"] > 0
    per_example = __import__("json").loads((tmp_path / method / "heldout_examples.json").read_text())
    assert len(per_example["first"]["correct"]) == 8
