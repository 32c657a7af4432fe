"""Memory accounting, one definition for the three scripts (tasks/memory.py): peak_memory_bytes = held + step. The
counter against allocations whose sizes are known, and each script's components on a tiny model against an
independent count of what its client holds and a lower bound of what its step allocates."""
import json

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer

import fedavg as fa
import fedcybgd as cy
import fedkseed as fk
import tasks
from test_fedkseed import write_dolly


def test_peak_allocations_counts_what_is_alive_at_once():
    outside = torch.zeros(1000)
    with tasks.PeakAllocations() as m:
        a = torch.empty(1000)  # 4,000 B
        b = torch.empty(500)  # 2,000 B: 6,000 B alive
        del a  # freed: 2,000 B alive
        c = torch.empty(250, dtype=torch.float64)  # 2,000 B: 4,000 B alive
        outside.add_(1.0)  # in place on a tensor from before: no allocation
        view = b.view(25, 20)  # a view: no allocation
    assert m.peak == 6000 and m.bytes == 4000
    assert view.shape == (25, 20) and c.numel() == 250


def test_peak_allocations_sees_the_backward_and_the_optimizer():
    """An AdamW step on one 100 x 100 weight: the gradient (40 KB) and Adam's two moments (80 KB) are allocated in
    the step and alive together at its end: the peak is at least that."""
    w = torch.nn.Parameter(torch.randn(100, 100))
    opt = torch.optim.AdamW([w], lr=1e-3)
    x = torch.randn(8, 100)
    with tasks.PeakAllocations() as m:
        (x @ w).square().sum().backward()
        opt.step()
    assert m.peak >= 3 * w.numel() * 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mem")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model", write_dolly(root / "dolly.jsonl")


def first_ledger_line(out):
    return next(e for e in (json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()) if "loss" in e)


def model_bytes(folder):
    model, _ = tasks.load_model(str(folder), "sft")
    return sum(p.numel() * 4 for p in model.parameters()), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("script", ["fedkseed", "fedkseed-bf16", "fedavg", "fedavg-lora", "fedcybgd"])
def test_each_script_counts_held_plus_step(files, tmp_path, script):
    """held: FedKSeed the model and w0 (8 B a weight; with bfloat16 forwards 2 + 4 + 4), FedAvg and FedCyBGD the model
    (4 B a weight; LoRA the adapters too); step: at least the logits of the step's batch (FedKSeed: one forward,
    float32 [B, T, V]) or the trained tensors' gradients and two Adam moments (12 B a trained weight); the peak is
    their sum, in the ledger line and in the metrics row."""
    model, dolly = files
    out = tmp_path / "run"
    common = ["--model", str(model), "--data_path", str(dolly), "--output_dir", str(out), "--rounds", "1",
              "--max_length", "48", "--eval_samples", "2", "--max_new_tokens", "1", "--device", "cpu"]
    full, n = model_bytes(model)
    if script.startswith("fedkseed"):
        extra = ["--compute_dtype", "bfloat16"] if script.endswith("bf16") else []
        fk.main(common + ["--num_clients", "4", "-m", "0.5", "-K", "16", "--local_steps", "2", "--iid", "iid",
                          "--rouge_samples", "0", *extra])
        held = (2 + 4 + 4) * n if extra else 8 * n
        line = first_ledger_line(out)
        vocab = make_tiny_tokenizer().__len__()
        assert line["step_bytes"] >= 1 * 8 * vocab * 4  # the logits of one example of at least 8 tokens, float32
    elif script.startswith("fedavg"):
        lora = ["--method", "lora"] if script.endswith("lora") else []
        fa.main(["--task", "sft"] + common + ["--num_clients", "4", "-m", "0.5", "--local_steps", "2", "--batch_size",
                                               "2", "--iid", "iid", *lora])
        line = first_ledger_line(out)
        wrapped = fa.build_model(fa.parse_args(["--task", "sft", "--model", str(model), *lora]), "cpu")
        held = sum(p.numel() * 4 for p in wrapped[0].parameters())
        trained = sum(p.numel() for nm, p in wrapped[0].named_parameters() if nm in wrapped[2])
        assert line["step_bytes"] >= 12 * trained
    else:
        cy.main(["--task", "sft"] + common + ["--num_clients", "2", "--local_steps", "2", "--batch_size", "2",
                                               "--iid", "iid"])
        line = first_ledger_line(out)
        held = full
        loaded, _ = tasks.load_model(str(model), "sft")
        _, units = cy.find_blocks(loaded)
        params = dict(loaded.named_parameters())
        trained = sum(params[nm].numel() for u in (line["block"], "head") for nm in units[u])
        assert line["step_bytes"] >= 12 * trained  # the block and the head: gradients and two Adam moments
    assert line["held_bytes"] == held and line["peak_memory_bytes"] == line["held_bytes"] + line["step_bytes"]
    row = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1]
    assert row["peak_memory_bytes"] >= line["peak_memory_bytes"]
