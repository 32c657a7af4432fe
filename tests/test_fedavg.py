"""fedavg.py: FedAvg's weighted average by hand, FedIT's adapter-only messages, resume, export, bad input."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import crash_after_checkpoint, make_tiny_llama, make_tiny_tokenizer

import fedavg as fa
import tasks
from test_fedkseed import write_dolly

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama + character tokenizer as a model folder, and a tiny Dolly file."""
    root = tmp_path_factory.mktemp("fa")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", write_dolly(root / "dolly.jsonl")


def argv(files, out, *extra):
    model, dolly = files
    return ["--model", str(model), "--data_path", str(dolly), "--output_dir", str(out), "--num_clients", "4",
            "-m", "0.5", "--local_steps", "3", "--batch_size", "2", "--max_length", "48", "--iid", "iid",
            "--eval_samples", "4", "--max_new_tokens", "2", "--lr", "3e-3", "--device", "cpu", *extra]


def read_metrics(out):
    return [{k: v for k, v in json.loads(l).items() if k not in ("seconds", "client_seconds")}
            for l in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(out):
    from safetensors.torch import load_file
    return load_file(out / "checkpoint.safetensors")


def test_server_aggregate_by_hand():
    ups = [{"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])},
           {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}]
    got = fa.server_aggregate(ups, [1, 3])  # weights 1/4 and 3/4
    assert torch.equal(got["w"], torch.tensor([2.5, 5.0])) and torch.equal(got["b"], torch.tensor([3.0]))
    assert got["w"].dtype == torch.float32


def test_one_round_is_the_weighted_average_of_the_clients_weights(files, tmp_path):
    """After one round the global weights are sum_i n_i/sum(n) w_i of the two sampled clients' trained weights,
    recomputed here client by client and averaged by hand."""
    out = tmp_path / "run"
    fa.main(argv(files, out, "--rounds", "1"))
    args = fa.parse_args(argv(files, tmp_path / "unused", "--rounds", "1"))
    model, tok, names = fa.build_model(args, "cpu")
    clients, _, _ = tasks.load_task_data(args, tok, args.num_clients)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained, sizes = [], []
    for c in tasks.sample_clients(args.seed, 1, args.num_clients, 2):
        fa.sync_model(model, w0)
        seed = tasks.derive_seed(args.seed, 1, c)
        upload, _ = fa.client_update(model, names, tasks.local_batches(args, clients[c], tok, "cpu", seed), args, seed)
        trained.append(upload)
        sizes.append(len(clients[c]))
    saved = checkpoint(out)
    assert saved.keys() == set(names)
    for n in names:
        total = sizes[0] + sizes[1]  # the documented order: float64, client by client, weight n_i / sum(n) first
        by_hand = (sizes[0] / total) * trained[0][n].double() + (sizes[1] / total) * trained[1][n].double()
        assert torch.equal(saved[n], by_hand.float()), n
    assert all(not torch.equal(saved[n], w0[n]) for n in names)  # training moved every tensor


def test_fedit_uploads_only_adapters_and_the_ledger_is_their_serialised_size(files, tmp_path):
    out = tmp_path / "run"
    fa.main(argv(files, out, "--rounds", "1", "--method", "lora"))
    args = fa.parse_args(argv(files, tmp_path / "unused", "--method", "lora"))
    model, _, names = fa.build_model(args, "cpu")
    assert names and all("lora_A" in n or "lora_B" in n for n in names)  # q_proj and v_proj adapters only
    params = dict(model.named_parameters())
    adapter_bytes = len(tasks.pack({n: params[n] for n in names}))
    full_bytes = len(tasks.pack({n: p for n, p in make_tiny_llama(len(make_tiny_tokenizer())).named_parameters()}))
    ledger = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 2 and all(e["upload_bytes"] == e["download_bytes"] == adapter_bytes for e in ledger)
    assert adapter_bytes < full_bytes / 4
    assert set(checkpoint(out)) == set(names)
    rows = read_metrics(out)
    assert rows[1]["upload_bytes"] == rows[1]["download_bytes"] == adapter_bytes


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_bit_exact(files, tmp_path, method):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fa.main(argv(files, straight, "--rounds", "2", "--method", method))
    fa.main(argv(files, resumed, "--rounds", "1", "--method", method))
    fa.main(argv(files, resumed, "--rounds", "2", "--method", method, "--resume"))
    assert read_metrics(straight) == read_metrics(resumed) and [r["round"] for r in read_metrics(resumed)] == [0, 1, 2]
    a, b = checkpoint(straight), checkpoint(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_loads_with_transformers(files, tmp_path):
    """Full: the exported model's weights are the checkpoint's. LoRA: the adapters merged into the base give the
    same logits as the adapted model."""
    from transformers import AutoModelForCausalLM

    fa.main(argv(files, tmp_path / "full", "--rounds", "1"))
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "model").named_parameters())
    saved = checkpoint(tmp_path / "full")
    assert all(torch.equal(exported[n], saved[n]) for n in saved)

    fa.main(argv(files, tmp_path / "lora", "--rounds", "1", "--method", "lora"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    args = fa.parse_args(argv(files, tmp_path / "unused", "--method", "lora"))
    adapted, _, _ = fa.build_model(args, "cpu")
    fa.sync_model(adapted, checkpoint(tmp_path / "lora"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_centralized_and_glue_runs(tmp_path):
    """--num_clients 1 -m 1 on a GLUE task with a tiny BERT: one client, every round; the export loads as a
    sequence classifier."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_size=32,
                                             num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=256)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    rows = fa.main(["--task", "glue", "--data_path", str(ROOT / "tests/fixtures/glue/MRPC"), "--model",
                    str(tmp_path / "m"), "--num_clients", "1", "-m", "1", "--rounds", "1", "--local_steps", "2",
                    "--max_length", "64", "--output_dir", str(out)])
    assert [r["round"] for r in rows] == [0, 1] and {"accuracy", "f1", "eval_loss"} <= set(rows[1])
    ledger = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    assert [e["client"] for e in ledger] == [0]
    AutoModelForSequenceClassification.from_pretrained(out / "model")


@pytest.mark.parametrize("extra, words", [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--weight_decay=-1"], "--weight_decay -1.0: must be a finite number >= 0"),
    (["-m", "0.1"], "samples no client"),
    (["--dataset", "mrpc"], "is not a sft dataset"),
    (["--resume"], "no checkpoint"),
    (["--model", "./no/such/model"], "cannot load model"),
])
def test_bad_input_is_one_line(files, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        fa.main(argv(files, tmp_path / "out") + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_truncated_checkpoint_and_torchrun_are_one_line(files, tmp_path):
    out = tmp_path / "run"
    fa.main(argv(files, out, "--rounds", "1", "--max_new_tokens", "0"))
    ckpt = out / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    for env, args, words in (({}, ["--rounds", "2", "--resume"], "cannot be read"),
                             ({"WORLD_SIZE": "2"}, ["--rounds", "1"], "torchrun is not supported")):
        r = subprocess.run([sys.executable, str(ROOT / "fedavg.py"), *argv(files, out, *args)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


def test_lora_takes_its_own_default_learning_rate():
    """--lr's help promises 1e-4 / 2e-4 for full fine-tuning and 3e-4 / 5e-4 for LoRA when --lr is not given."""
    lrs = {(task, method): fa.parse_args(["--task", task, "--method", method]).lr
           for task in ("sft", "glue") for method in ("full", "lora")}
    assert lrs == {("sft", "full"): 1e-4, ("sft", "lora"): 3e-4, ("glue", "full"): 2e-4, ("glue", "lora"): 5e-4}
    assert fa.parse_args(["--method", "lora", "--lr", "1e-3"]).lr == 1e-3


def test_validation_loss_is_logged(files, tmp_path):
    rows = fa.main(argv(files, tmp_path / "out", "--rounds", "1", "--val_samples", "4", "--max_new_tokens", "0"))
    assert [r["round"] for r in rows] == [0, 1] and all(r["val_loss"] > 0 for r in rows)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_crash_after_the_checkpoint_loses_no_metrics_row(files, tmp_path, monkeypatch, method):
    """A crash right after round 2's checkpoint is written: --resume finishes the run with every round's row in
    metrics.jsonl once, as the run that did not crash wrote them (the row is written before the checkpoint)."""
    flags = ("--rounds", "3", "--method", method)
    fa.main(argv(files, tmp_path / "straight", *flags))
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit):
        fa.main(argv(files, tmp_path / "crashed", *flags))
    monkeypatch.undo()
    fa.main(argv(files, tmp_path / "crashed", *flags, "--resume"))
    assert read_metrics(tmp_path / "crashed") == read_metrics(tmp_path / "straight")
