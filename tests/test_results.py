"""bench/results.py --quick end to end on tiny models: the lr grid, the seeds, the committed data, the page; then the
page again from the data alone (--collect), and a per-example file that no longer gives its logged figure."""
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
    """One --quick run of the whole set (two seeds, a one-point grid); the tests below read what it wrote."""
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
            "--sst2", str(write_glue(root / "SST-2", "sst2", 80)), "--grid_points", "1", "--seeds", "42,43",
            "--runs", str(root / "runs"), "--data", str(root / "data"), "--page", str(root / "docs" / "RESULTS.md")]
    threads = torch.get_num_threads()
    load_results().main(argv)
    torch.set_num_threads(threads)
    return root, argv


def test_quick_writes_the_page_with_every_row_from_the_committed_files(quick):
    root, argv = quick
    page = (root / "docs" / "RESULTS.md").read_text()
    for row in ("## SST-2", "| zero-shot, bfloat16 forwards", "| zero-shot, float32 forwards", "| FedKSeed (two-point) |",
                "| FedKSeed (FZOO, n = 4) |", "| FedKSeed-Pro (two-point) |", "| FedIT (LoRA) |", "| FedAvg (full) |",
                "| centralized fine-tuning |", "against FedIT, paired", "## MRPC", "| FedCyBGD (its GLUE regime) |",
                "FedCyBGD against FedAvg", "## Dolly", "| zero-shot (pretrained) |", "| FedKSeed |",
                "| centralized MeZO (one client) |", "**The protocol, the same for every row.**", " ± "):
        assert row in page, row
    for plot in ("results_sst2_examples", "results_sst2_bytes", "results_sst2_seconds", "results_mrpc", "results_dolly"):
        assert (root / "docs" / f"{plot}.svg").read_text().startswith("<svg")
    # the committed data: the small files of every run, never weights
    runs = list((root / "data").glob("*/*"))
    assert {r.parent.name for r in runs} == {"sst2", "mrpc", "dolly"} and len(runs) == 6 * 2 + 3 * 2 + 6 * 1
    for r in runs:
        assert sorted(f.name for f in r.iterdir()) == sorted(load_results().KEPT)
    # --collect writes the same page from the data alone, the weights folder gone
    before = page
    import shutil
    shutil.rmtree(root / "runs")
    load_results().main(argv + ["--collect"])
    assert (root / "docs" / "RESULTS.md").read_text().split("\n", 3)[3] == before.split("\n", 3)[3]


def test_collect_refuses_per_example_values_that_do_not_give_the_logged_figure(quick):
    root, argv = quick
    run = next((root / "data" / "mrpc").glob("centralized-*"))
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[-1]["accuracy"] = rows[-1]["accuracy"] + 0.5
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="its per-example accuracy gives"):
        load_results().main(argv + ["--collect"])
