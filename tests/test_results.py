"""bench/results.py --quick end to end on tiny models: every run, the per-example re-evaluation, the page."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

from tasks import prompts
from test_fedkseed import write_dolly
from test_prompts import write_glue

ROOT = Path(__file__).resolve().parent.parent


def load_results():
    spec = importlib.util.spec_from_file_location("results", ROOT / "bench" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_mrpc(folder, n_train=80, n_dev=24):
    """A GLUE-layout MRPC folder: paraphrase pairs (label 1) and unrelated pairs (label 0), about 2:1 like MRPC."""
    folder.mkdir()
    rng = random.Random(0)
    words = "the a cat dog sat ran on mat park fast slow red blue big small".split()
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a = " ".join(rng.choice(words) for _ in range(6))
            label = int(i % 3 != 0)
            b = " ".join(reversed(a.split())) if label else " ".join(rng.choice(words) for _ in range(6))
            lines.append(f"{label}\t{2 * i}\t{2 * i + 1}\t{a}\t{b}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run of the whole set (about a minute); the tests below read what it wrote."""
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("results")
    words = {w for templates in prompts.TEMPLATES.values() for _, labels in templates.values() for w in labels}
    tok = make_tiny_tokenizer(sorted(words))  # the label words one token each, as in the packaged tokenizer
    make_tiny_llama(len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=128)).save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    argv = ["--quick", "--sft_model", str(root / "llama"), "--glue_model", str(root / "bert"),
            "--dolly", str(write_dolly(root / "dolly.jsonl", n=120)), "--mrpc", str(write_mrpc(root / "MRPC")),
            "--sst2", str(write_glue(root / "SST-2", "sst2", 80)),
            "--runs", str(root / "runs"), "--page", str(root / "docs" / "RESULTS.md"), "--threads", "1"]
    threads = torch.get_num_threads()
    load_results().main(argv)
    torch.set_num_threads(threads)
    return root, argv


def test_quick_writes_the_page_with_every_row(quick):
    root, _ = quick
    page = (root / "docs" / "RESULTS.md").read_text()
    for row in ("| zero-shot (pretrained) |", "| FedKSeed |", "| FedKSeed-Pro |", "| centralized MeZO", "| FedCyBGD |",
                "| FedAvg (full) |", "| FedIT (LoRA) |", "| FedCyBGD (its default stream) |", "| majority class",
                "| always positive |",
                "| centralized fine-tuning", "### FedAvg over `--iid iid` clients", "**FedKSeed at this budget.**",
                "## SST-2", "| zero-shot, bfloat16 forwards", "| zero-shot, float32 forwards", "| FedKSeed (two-point) |",
                "| FedKSeed (FZOO, n = 4) |", "| FedKSeed-Pro (two-point) |",
                "### FedKSeed (FZOO) for as long as 60 minutes allow", "DeComFL (OPT-125m"):
        assert row in page, row
    assert (root / "docs" / "results_dolly.svg").read_text().startswith("<svg")
    assert (root / "docs" / "results_mrpc.svg").read_text().startswith("<svg")
    for plot in ("examples", "bytes", "seconds"):
        assert (root / "docs" / f"results_sst2_{plot}.svg").read_text().startswith("<svg")
    # every run left its metrics and the per-example values its intervals come from
    for name in ("fedkseed", "fedkseed-pro", "mezo", "fedcybgd", "fedavg", "fedit", "mrpc-iid-fedcybgd",
                 "mrpc-iid-fedavg", "mrpc-centralized", "sst2-fedkseed", "sst2-fedkseed-fzoo", "sst2-fedkseed-pro",
                 "sst2-fedit", "sst2-fedavg", "sst2-centralized", "sst2-fedkseed-long"):
        kept = "heldout_examples.json" if name.startswith("sst2") else "examples.json"  # SST-2: the run's own
        assert (root / "runs" / name / "metrics.jsonl").is_file() and (root / "runs" / name / kept).is_file()


def test_collect_refuses_a_number_the_model_does_not_reproduce(quick):
    """--collect trains nothing; a metrics.jsonl that no longer matches its exported model stops the page."""
    root, argv = quick
    path = root / "runs" / "mrpc-centralized" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[-1]["accuracy"] = rows[-1]["accuracy"] + 0.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="mrpc-centralized: accuracy re-evaluated from model/"):
        load_results().main(argv + ["--collect"])
