"""FedCyBGD: blocks, one client turn, the download/upload messages and their bytes, resume, a tiny run."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crash_after_checkpoint, make_tiny_llama, make_tiny_tokenizer

import fedcybgd as cy
import tasks

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------- tiny models of four kinds
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=3, n_head=4)).eval()


def tiny_bert(**config):
    """A 2-layer BERT classifier (vocab 100 unless config says otherwise), in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**{**dict(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                              num_attention_heads=4, intermediate_size=64,
                                                              max_position_embeddings=64), **config})).eval()


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification
    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=64,
                                                          max_position_embeddings=70)).eval()


# expected layout, written out by hand: (layer stack prefix, layers, embeddings, head)
LAYOUTS = {
    "llama": (lambda: make_tiny_llama(104, layers=3), "model.layers", 3,
              ["model.embed_tokens.weight"], ["model.norm.weight"]),  # lm_head is tied to embed_tokens
    "gpt2": (tiny_gpt2, "transformer.h", 3, ["transformer.wte.weight", "transformer.wpe.weight"],
             ["transformer.ln_f.weight", "transformer.ln_f.bias"]),
    "bert": (tiny_bert, "bert.encoder.layer", 2,
             ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
              "bert.embeddings.LayerNorm.bias"],
             ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"]),
    "roberta": (tiny_roberta, "roberta.encoder.layer", 2,
                ["roberta.embeddings.word_embeddings.weight", "roberta.embeddings.position_embeddings.weight",
                 "roberta.embeddings.token_type_embeddings.weight", "roberta.embeddings.LayerNorm.weight",
                 "roberta.embeddings.LayerNorm.bias"],
                ["classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                 "classifier.out_proj.bias"]),
}


@pytest.mark.parametrize("arch", LAYOUTS)
def test_find_blocks(arch):
    make, stack, n_layers, embeddings, head = LAYOUTS[arch]
    model = make()
    cycle, units = cy.find_blocks(model)
    assert cycle == [f"layer.{i}" for i in range(n_layers)]
    assert sorted(units["embeddings"]) == sorted(embeddings) and units["head"] == head
    for i in range(n_layers):
        expected = [f"{stack}.{i}.{n}" for n, _ in model.get_submodule(stack)[i].named_parameters()]
        assert units[f"layer.{i}"] == expected and expected
    everything = [n for names in units.values() for n in names]
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())  # each parameter exactly once
    cycle, _ = cy.find_blocks(model, train_embeddings=True)
    assert cycle[-1] == "embeddings" and len(cycle) == n_layers + 1


def test_no_layer_stack_is_a_clear_error():
    with pytest.raises(cy.ConfigError, match="no nn.ModuleList"):
        cy.find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("mode,n_clients", [("ascending", 3), ("ascending", 2), ("descending", 5),
                                            ("permutation", 3)])
def test_every_sweep_visits_every_block(mode, n_clients):
    cycle = [f"layer.{i}" for i in range(4)]
    turns = [cy.block_of_turn(cycle, mode, 7, t // n_clients + 1, t % n_clients, n_clients) for t in range(8)]
    assert sorted(turns[:4]) == cycle and sorted(turns[4:]) == cycle  # blocks visited even with fewer clients
    if mode == "ascending":
        assert turns[:4] == cycle
    if mode == "descending":
        assert turns[:4] == cycle[::-1]


def test_random_mode_is_the_official_independent_draw():
    """random: each client draws its own blocks without replacement over its rounds (a permutation per client for
    every L rounds), independently of the others, so two clients can train the same block in one round."""
    cycle = [f"layer.{i}" for i in range(6)]
    n, L = 4, len(cycle)
    draws = {c: [cy.block_of_turn(cycle, "random", 11, r, c, n) for r in range(1, 2 * L + 1)] for c in range(n)}
    for c in range(n):
        assert sorted(draws[c][:L]) == cycle and sorted(draws[c][L:]) == cycle  # without replacement per L rounds
        expected = [cycle[i] for w in range(2) for i in torch.randperm(
            L, generator=torch.Generator().manual_seed(cy.derive_seed(11, "client-blocks", c, w))).tolist()]
        assert draws[c] == expected  # the definition, spelled out
    assert any(len({draws[c][r] for c in range(n)}) < n for r in range(2 * L))  # a shared block in some round
    assert draws == {c: [cy.block_of_turn(cycle, "random", 11, r, c, n) for r in range(1, 2 * L + 1)]
                     for c in range(n)}  # reproducible


@pytest.mark.parametrize("mode,k,expected", [
    # hand-written: L = 5 blocks, 2 clients, k consecutive blocks a turn, the next turn the next k (mod L)
    ("ascending", 2, [[0, 1], [2, 3], [0, 4], [1, 2], [3, 4], [0, 1]]),
    ("descending", 2, [[3, 4], [1, 2], [0, 4], [2, 3], [0, 1], [3, 4]]),
    ("ascending", 3, [[0, 1, 2], [0, 3, 4], [1, 2, 3], [0, 1, 4], [2, 3, 4], [0, 1, 2]]),
])
def test_layers_per_turn_consecutive(mode, k, expected):
    cycle = [f"layer.{i}" for i in range(5)]
    got = [cy.blocks_of_turn(cycle, mode, 3, t // 2 + 1, t % 2, 2, k) for t in range(6)]
    assert got == [[f"layer.{i}" for i in e] for e in expected]


def test_layers_per_turn_random_is_a_fresh_uniform_draw_per_turn():
    """random with k > 1 (the official roberta-glue/gpt regime): every turn an independent uniform draw of k distinct
    blocks. Checked against the definition's properties: k distinct, in cycle order, reproducible, and each block
    drawn in about k/L of the turns; every k-subset of the L blocks turns up."""
    cycle = [f"layer.{i}" for i in range(6)]
    L, k, n, rounds = len(cycle), 4, 24, 50
    draws = [cy.blocks_of_turn(cycle, "random", 42, r, c, n, k) for r in range(1, rounds + 1) for c in range(n)]
    assert all(len(set(d)) == k and d == sorted(d, key=cycle.index) for d in draws)
    assert draws == [cy.blocks_of_turn(cycle, "random", 42, r, c, n, k) for r in range(1, rounds + 1) for c in range(n)]
    share = {b: sum(b in d for d in draws) / len(draws) for b in cycle}
    # 1,200 draws: the share's standard deviation is sqrt(p(1-p)/1200) ~ 0.014 at p = 2/3; 0.06 is > 4 sigma
    assert all(abs(v - k / L) < 0.06 for v in share.values()), share
    assert len({tuple(d) for d in draws}) == math.comb(L, k)
    assert cy.blocks_of_turn(cycle, "random", 42, 1, 0, n, 1) == [cy.block_of_turn(cycle, "random", 42, 1, 0, n)]


@pytest.mark.parametrize("n,per_turn", [(10, 3), (7, 7), (5, 12), (64, 1)])
def test_stream_loses_and_repeats_no_example(n, per_turn):
    """--iid stream: the turns, taken in order, read a stream of passes; each pass holds every example once."""
    turns = 4 * n  # enough turns for per_turn * 4 * n / n = 4 * per_turn passes
    stream = [i for t in range(turns) for i in cy.stream_indices(n, per_turn, t, seed=9)]
    assert len(stream) == turns * per_turn
    passes = [stream[p * n:(p + 1) * n] for p in range(len(stream) // n)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    if n > 5:
        assert passes[0] != passes[1]  # a fresh shuffle every pass
    assert cy.stream_indices(n, per_turn, 3, seed=9) == stream[3 * per_turn:4 * per_turn]  # a pure function


def test_clipping_bounds_the_gradient_norm():
    g = torch.Generator().manual_seed(0)
    ts = [torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)]
    for t in ts:
        t.grad = torch.randn(t.shape, generator=g) * 10
    flat = np.concatenate([t.grad.numpy().ravel() for t in ts]).astype(np.float64)
    before = cy.clip_gradients(ts, 1.5)
    after = np.concatenate([t.grad.numpy().ravel() for t in ts]).astype(np.float64)
    assert before == pytest.approx(np.linalg.norm(flat), rel=1e-6)
    assert np.linalg.norm(after) <= 1.5 * (1 + 1e-6)
    np.testing.assert_allclose(after, flat * 1.5 / np.linalg.norm(flat), rtol=1e-5)  # same direction
    small = [t.grad.clone() for t in ts]
    cy.clip_gradients(ts, 100.0)  # below the bound: untouched
    assert all(torch.equal(t.grad, s) for t, s in zip(ts, small))
    cy.clip_gradients(ts, 0.0)  # 0 = off
    assert all(torch.equal(t.grad, s) for t, s in zip(ts, small))


def test_linear_schedule_is_the_formula():
    class Args:
        lr, warmup_steps, lr_scheduler = 2e-3, 0, "linear"

    total = 10
    for step in range(total):  # Hugging Face's linear schedule without warmup: lr * (total - step) / total
        assert cy.learning_rate(Args, step, total) == pytest.approx(2e-3 * (total - step) / total, rel=1e-12)
    for step in range(3, total):  # with 3 warmup steps: lr * (total - step) / (total - 3)
        assert cy.learning_rate(Args, step, total, warmup=3) == pytest.approx(2e-3 * (total - step) / 7, rel=1e-12)
    assert cy.learning_rate(Args, 0, total, warmup=3) == pytest.approx(2e-3 / 3, rel=1e-12)


def test_stream_run_with_several_layers_a_turn(tiny_run_files, tmp_path):
    """The official GLUE-style regime end to end on the tiny fixture: clients own no data, two random blocks a turn,
    linear decay, clipping; the ledger records both blocks; resume gives the same weights (with a constant schedule:
    a linear one spans the whole run, so its --rounds cannot grow on resume)."""
    flags = ["--iid", "stream", "--layers_per_turn", "2", "--switch_mode", "random", "--max_grad_norm", "1.0",
             "--adam_eps", "1e-6", "--max_new_tokens", "0"]
    out = tmp_path / "linear"
    cy.main(tiny_argv(tiny_run_files, out, "--rounds", "2", "--lr_scheduler", "linear", *flags))
    turns = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines() if '"turn"' in l]
    assert len(turns) == 4 and all(len(t["block"].split("+")) == 2 for t in turns)
    assert turns[-1]["lr_last"] == pytest.approx(3e-3 / 12)  # linear: the run's last of 12 steps
    with pytest.raises(cy.ConfigError, match="was written with rounds=2, this run has rounds=3"):  # the schedule
        cy.train(cy.parse_args(tiny_argv(tiny_run_files, out, "--rounds", "3", "--lr_scheduler", "linear", "--resume",
                                         *flags)))
    out = tmp_path / "run"
    cy.main(tiny_argv(tiny_run_files, out, "--rounds", "2", *flags))
    resumed = tmp_path / "resumed"
    cy.main(tiny_argv(tiny_run_files, resumed, "--rounds", "1", *flags))
    cy.main(tiny_argv(tiny_run_files, resumed, "--rounds", "2", "--resume", *flags))
    assert read_metrics(resumed) == read_metrics(out)
    a, b = checkpoint_weights(out), checkpoint_weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedule_is_the_formula(schedule):
    class Args:
        lr, warmup_steps, lr_scheduler = 1e-3, 4, schedule

    total = 24
    for step in range(total):
        if step < 4:
            expected = 1e-3 * (step + 1) / 4
        elif schedule == "constant":
            expected = 1e-3
        else:
            expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 20))
        assert cy.learning_rate(Args, step, total) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_cosine_schedule_is_carried_across_turns(tiny_run_files, tmp_path):
    """The lr of a turn's first step continues from the previous turn: a run's turns, taken in order, step through
    one cosine from --lr at the first step to ~0 at the last."""
    out = tmp_path / "run"
    cy.main(tiny_argv(tiny_run_files, out, "--rounds", "2", "--lr_scheduler", "cosine", "--max_new_tokens", "0"))
    turns = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    total = 2 * 2 * 3  # rounds x clients x local steps

    class Args:
        lr, warmup_steps, lr_scheduler = 3e-3, 0, "cosine"

    for k, t in enumerate(turns):  # turn k runs steps 3k .. 3k + 2 of the one schedule
        assert (t["lr_first"], t["lr_last"]) == (cy.learning_rate(Args, 3 * k, total),
                                                 cy.learning_rate(Args, 3 * k + 2, total))
    lrs = [turns[0]["lr_first"], turns[-1]["lr_last"]]
    assert lrs[0] == 3e-3 and lrs[-1] < 3e-3 * 0.02


# ---------------------------------------------------------------------------------------------- a client turn
def llama_batches(tokenizer, n, seed=0, length=12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(4, len(tokenizer), (2, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", ["layer.0", "layer.1"])
def test_client_turn_changes_only_its_block_and_head(tiny_tokenizer, dtype, block):
    model = make_tiny_llama(len(tiny_tokenizer), layers=3).to(dtype).requires_grad_(False)
    cycle, units = cy.find_blocks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = units[block] + units["head"]
    upload, stats = cy.client_update(model, train, llama_batches(tiny_tokenizer, 4), [1e-2] * 2, 0.1, 2, seed=1)
    after = dict(model.named_parameters())
    for n in before:
        if n in train:
            assert not torch.equal(before[n], after[n]), f"{n} did not train"
        else:
            assert torch.equal(before[n], after[n]), f"{n} changed outside the block"
        assert not after[n].requires_grad and after[n].grad is None
    assert list(upload) == train and all(torch.equal(upload[n], after[n]) for n in train)
    assert math.isfinite(stats["loss"])
    # memory ledger: at least the weights held + grads + two Adam moments of the trained tensors
    trained_numel = sum(after[n].numel() for n in train)
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert stats["peak_memory_bytes"] >= all_bytes + trained_numel * (4 + 8)


def test_upload_bytes_equal_the_block_size(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), layers=3).requires_grad_(False)
    _, units = cy.find_blocks(model)
    train = units["layer.2"] + units["head"]
    upload, _ = cy.client_update(model, train, llama_batches(tiny_tokenizer, 1), [1e-3], 0.0, 1, seed=0)
    wire = tasks.pack(upload)
    header = 8 + int.from_bytes(wire[:8], "little")  # safetensors: u64 header length, JSON header, raw data
    params = dict(model.named_parameters())
    assert len(wire) - header == sum(params[n].numel() * 4 for n in train)
    assert set(json.loads(wire[8:header])) - {"__metadata__"} == set(train)


def test_weight_decay_groups_by_parameter_shape():
    model = tiny_gpt2()
    _, units = cy.find_blocks(model)
    named = [(n, p) for n, p in model.named_parameters() if n in units["layer.0"] + units["head"]]
    decay, no_decay = tasks.param_groups(named, 0.1)
    names = {id(p): n for n, p in named}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        f"transformer.h.0.{k}.weight" for k in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(n.endswith(".bias") or ".ln_" in n for n in (names[id(p)] for p in no_decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_logit_adjusted_loss_is_cross_entropy_of_logits_plus_the_clients_log_prior(tiny_tokenizer):
    """--logit_adjust: the turn's loss is CE(logits + log p_client, labels), p_client the client's add-one smoothed
    label frequencies; checked against a hand computation at lr 0 (the weights do not move)."""
    model = tiny_bert(vocab_size=len(tiny_tokenizer), pad_token_id=tiny_tokenizer.pad_token_id, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0).requires_grad_(False)
    _, units = cy.find_blocks(model)
    examples = [dict(tiny_tokenizer(f"ab {i}"), labels=int(i == 0)) for i in range(9)]  # 8 x label 0, 1 x label 1
    prior = cy.label_log_prior(examples, 2)
    assert torch.allclose(prior, torch.tensor([9 / 11, 2 / 11]).log())  # (8 + 1, 1 + 1) / (9 + 2)
    batch = tasks.make_batch("glue", examples, tiny_tokenizer, "cpu")
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    by_hand = torch.nn.functional.cross_entropy(logits + prior, batch["labels"]).item()
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    _, stats = cy.client_update(model, units["layer.0"] + units["head"], [batch], [0.0], 0.0, 1, 0, units["head"], 1.0,
                                prior)
    assert stats["loss"] == pytest.approx(by_hand, rel=1e-6) and abs(by_hand - plain) > 1e-3
    _, stats = cy.client_update(model, units["layer.0"] + units["head"], [batch], [0.0], 0.0, 1, 0)
    assert stats["loss"] == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("counts, flagged", [
    ([(1983, 25), (101, 51), (969, 1)], [0, 2]),  # MRPC dir0.5's clients 0, 1 and 5: 98.8%, 66.4%, 99.9%
    ([(95, 5), (94, 6)], [0]),  # the bound is inclusive: 95% flags, 94% does not
    ([(0, 7), (3, 3)], [0]),  # one label only
])
def test_one_label_clients_are_those_with_one_label_in_95_percent_of_their_examples(counts, flagged):
    clients = [[{"labels": 0}] * n0 + [{"labels": 1}] * n1 for n0, n1 in counts]
    assert cy.one_label_clients(clients) == flagged


def tiny_cycle_recalls(tokenizer, split):
    """Three rounds of the cycle (fedcybgd's own block_of_turn and client_update) over 3 clients on a task a tiny
    BERT learns in a few steps: the text holds an 'x' (label 1) or a 'y' (label 0) among 11 random letters.
    split "iid": every client holds both labels; "one-label": clients hold only label 1, 0, 1, so the last turn
    is a label-1 client while the untrained model predicts label 0 (3 clients over 2 blocks: a block is trained
    by clients of both labels). -> recall of (label 0, label 1) on a balanced test set of 200."""
    import random

    model = tiny_bert(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).requires_grad_(False)
    cycle, units = cy.find_blocks(model)
    rng = random.Random(0)

    def example(label):
        text, k = "".join(rng.choice("abcdefgh") for _ in range(12)), rng.randrange(12)
        return dict(tokenizer(text[:k] + ("x" if label else "y") + text[k + 1:]), labels=label)

    clients = [[example(i % 2 if split == "iid" else (k + 1) % 2) for i in range(64)] for k in range(3)]
    test = [example(i % 2) for i in range(200)]
    for r in range(1, 4):
        for c, examples in enumerate(clients):
            block = cy.block_of_turn(cycle, "ascending", 0, r, c, len(clients))
            g = torch.Generator().manual_seed(10 * r + c)
            batches = [tasks.make_batch("glue", [examples[i] for i in torch.randperm(64, generator=g)[:16]],
                                                 tokenizer, "cpu") for _ in range(10)]
            cy.client_update(model, units[block] + units["head"], batches, [3e-3] * 10, 0.01, 1, 10 * r + c,
                             units["head"])
    preds, _ = tasks.glue_predictions(model, tokenizer, test, "cpu")
    return tuple(sum(p == y for p, e in zip(preds, test) if e["labels"] == y) / 100 for y in (0, 1))


def test_tiny_cycle_learns_both_labels_when_clients_hold_both(tiny_tokenizer):
    """The control for the test below: the same cycle, model and task learn when every client holds both labels."""
    assert min(tiny_cycle_recalls(tiny_tokenizer, "iid")) >= 0.9


@pytest.mark.xfail(strict=True, reason="issue 11 (blocked): under a one-label-per-client split the cycle ends predicting "
                   "the last client's label (docs/label-skew.md, Why); strict, so a fix turns this red until "
                   "the marker goes")
def test_tiny_cycle_under_one_label_per_client_does_not_end_at_the_last_clients_label(tiny_tokenizer):
    assert min(tiny_cycle_recalls(tiny_tokenizer, "one-label")) >= 0.75


# -------------------------------------------------------------------------------------- the download messages
def message_units(message, units):
    return sorted({u for u, names in units.items() for n in names
                   if n in message or n + ".q8" in message})


def run_turn(server, model, units, client, block, mode, tokenizer, fraction=1.0, base=None):
    message = tasks.unpack(tasks.pack(cy.server_download(server, units, client, [block], mode, fraction, seed=client)))
    cy.sync_model(model, message, base=base)
    upload, _ = cy.client_update(model, units[block] + units["head"], llama_batches(tokenizer, 1, client),
                                 [1e-2], 0.0, 1, seed=client)
    cy.server_aggregate(server, client, tasks.unpack(tasks.pack(upload)), units)
    return message


def test_delta_sends_only_blocks_changed_since_the_last_turn(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), layers=3).requires_grad_(False)
    _, units = cy.find_blocks(model)
    server = cy.init_server(model, units)
    assert run_turn(server, model, units, 0, "layer.0", "delta", tiny_tokenizer) == {}  # nothing changed yet
    assert message_units(run_turn(server, model, units, 1, "layer.1", "delta", tiny_tokenizer), units) == [
        "head", "layer.0"]
    # client 0 again: its own layer.0 is unchanged since its turn, so only what client 1 changed comes
    assert message_units(run_turn(server, model, units, 0, "layer.2", "delta", tiny_tokenizer), units) == [
        "head", "layer.1"]
    # in one process the working model equals the server's weights after every lossless turn
    assert all(torch.equal(p, server["weights"][n]) for n, p in model.named_parameters())
    full = cy.server_download(server, units, 1, ["layer.0"], "full")
    assert message_units(full, units) == sorted(units)


def test_int8_quantisation_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    w[3] = 0.0
    q, scale = cy.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (cy.dequantize_int8(q, scale, w.shape, torch.float32) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5))
    assert torch.all(err[3] == 0)
    assert torch.equal(scale, w.abs().amax(1) / 127)


def test_int8_sends_only_what_the_client_lacks_and_its_own_block_exact(tiny_tokenizer):
    """int8 = delta's units, matrices of blocks the client will not train quantised: a unit the client holds at its
    current version is never re-sent, except its own block when it holds that only as int8."""
    model = make_tiny_llama(len(tiny_tokenizer), layers=3).requires_grad_(False)
    _, units = cy.find_blocks(model)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    server = cy.init_server(model, units)

    def turn(client, block):
        message = cy.server_download(server, units, client, [block], "int8")
        cy.sync_model(model, tasks.unpack(tasks.pack(message)), base=cy.held_weights(server, units, client, pretrained))
        upload, _ = cy.client_update(model, units[block] + units["head"], llama_batches(tiny_tokenizer, 1, client),
                                     [1e-2], 0.0, 1, seed=client)
        cy.server_aggregate(server, client, upload, units)
        return cy.sent_units(message, units)

    assert turn(0, "layer.0") == []  # nothing has changed yet: the pretrained model is held by everyone
    assert turn(1, "layer.1") == ["layer.0:int8", "head"]  # what client 0 changed; the head is trained: exact
    assert turn(0, "layer.1") == ["layer.1", "head"]  # its own layer.0 is current; layer.1 is its block now
    # client 1 now trains layer.0, which it holds only as int8: resent exact although unchanged since;
    # layer.1 (client 0 changed it) comes as int8; the frozen embeddings never travel
    message = cy.server_download(server, units, 1, ["layer.0"], "int8")
    assert cy.sent_units(message, units) == ["layer.0", "layer.1:int8", "head"]
    cy.sync_model(model, tasks.unpack(tasks.pack(message)), base=cy.held_weights(server, units, 1, pretrained))
    for u, names in units.items():
        for n in names:
            p, w = dict(model.named_parameters())[n], server["weights"][n]
            if u == "layer.1" and w.ndim >= 2:  # held as int8: within half a step of the row's scale
                scale = w.abs().reshape(w.shape[0], -1).amax(1) / 127
                err = (p - w).abs().reshape(w.shape[0], -1)
                assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5)) and not torch.equal(p, w)
            else:
                assert torch.equal(p, w), n  # own block, head, norms, untouched layer.2, embeddings: exact


def test_int8_run_never_sends_a_frozen_tensor(tiny_run_files, tmp_path):
    """From the ledger of a whole run: the frozen embeddings (here also the tied LM head) never travel, a client's
    own block never comes quantised, and a round's int8 downloads are smaller than delta's."""
    bytes_ = {}
    for mode in ("delta", "int8"):
        out = tmp_path / mode
        cy.main(tiny_argv(tiny_run_files, out, "--rounds", "2", "--download", mode, "--max_new_tokens", "0"))
        turns = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
        assert all(not u.startswith("embeddings") for t in turns for u in t["download_units"])
        assert all(t["block"] + ":int8" not in t["download_units"] for t in turns)
        bytes_[mode] = sum(t["download_bytes"] for t in turns if t["round"] == 2)
        if mode == "int8":
            assert any(u.endswith(":int8") for t in turns for u in t["download_units"])
    assert bytes_["int8"] < bytes_["delta"]


def test_download_fraction_drops_blocks_to_pretrained(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), layers=4).requires_grad_(False)
    _, units = cy.find_blocks(model)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    server = cy.init_server(model, units)
    for c in range(3):
        run_turn(server, model, units, c, f"layer.{c}", "full", tiny_tokenizer, 0.5, pretrained)
    message = cy.server_download(server, units, 3, ["layer.0"], "full", fraction=0.5, seed=3)
    sent = message_units(message, units)
    assert "layer.0" in sent and "head" in sent  # own block and head always
    assert len([u for u in sent if u not in ("layer.0", "head")]) == math.ceil(2 * 0.5)  # of layer.1, layer.2
    cy.sync_model(model, message, base=pretrained)
    for u, names in units.items():
        for n in names:
            want = server["weights"][n] if u in sent else pretrained[n]
            assert torch.equal(dict(model.named_parameters())[n], want)


# ------------------------------------------------------------------------------------------- whole runs (main)
@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory):
    """A tiny Llama + character tokenizer saved as a model folder, and a Dolly-format jsonl."""
    root = tmp_path_factory.mktemp("cy")
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), layers=2, hidden=32)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    records = []
    for i in range(40):
        cat = ("open_qa", "brainstorming")[i % 2]
        records.append({"instruction": f"Say {'ab' if i % 2 else 'cd'} {i % 4}", "context": "",
                        "response": "ab ab ab" if i % 2 else "cd cd", "category": cat})
    for i in range(4):
        records.append({"instruction": "Summarize", "context": f"ab cd {i}", "response": "ab cd",
                        "category": "summarization"})
    (root / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def tiny_argv(files, out, *extra):
    return ["--task", "sft", "--dataset", "dolly", "--data_path", str(files / "dolly.jsonl"),
            "--model", str(files / "model"), "--num_clients", "2", "--iid", "iid", "--local_steps", "3",
            "--batch_size", "2", "--max_length", "48", "--eval_samples", "4", "--max_new_tokens", "2",
            "--lr", "3e-3", "--output_dir", str(out), *extra]


def read_metrics(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "client_seconds")} for r in rows]


def checkpoint_weights(out):
    saved = tasks.checkpoint.read(out)
    return {k: v for k, v in saved.items() if k not in ("round", "script", "config", "state")}


def test_tiny_run_lowers_the_loss(tiny_run_files, tmp_path):
    metrics = cy.main(tiny_argv(tiny_run_files, tmp_path / "run", "--rounds", "4"))
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[1]["train_loss"]
    assert metrics[-1]["eval_loss"] < metrics[0]["eval_loss"]
    ledger = [json.loads(l) for l in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    assert [t["block"] for t in ledger] == ["layer.0", "layer.1"] * 4
    assert all(t["upload_bytes"] > 0 and t["peak_memory_bytes"] > 0 for t in ledger)
    assert {"rougeL", "upload_bytes", "download_bytes", "peak_memory_bytes", "seconds"} <= set(metrics[1])


@pytest.mark.parametrize("extra", [["--download", "delta"], ["--download", "int8", "--download_fraction", "0.5",
                                                              "--switch_mode", "random"]])
def test_resume_is_bit_exact(tiny_run_files, tmp_path, extra):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cy.main(tiny_argv(tiny_run_files, straight, "--rounds", "2", *extra))
    cy.main(tiny_argv(tiny_run_files, resumed, "--rounds", "1", *extra))
    cy.main(tiny_argv(tiny_run_files, resumed, "--rounds", "2", "--resume", *extra))
    assert read_metrics(straight) == read_metrics(resumed)
    a, b = checkpoint_weights(straight), checkpoint_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,message", [
    (["--download", "delta", "--download_fraction", "0.5"], "use it with --download full or int8"),
    (["--download_fraction", "1.5"], "must be in (0, 1]"),
    (["--local_steps", "3", "--local_epochs", "1"], "not both"),
    (["--task", "glue", "--dataset", "dolly"], "is not a glue dataset"),
    (["--data_path", "/nonexistent/dolly.jsonl"], "not found"),
    (["--iid", "dirichlet"], "--iid dirichlet: must be"),
    (["--rounds", "0"], "--rounds 0: must be at least 1"),
])
def test_bad_input_is_one_clear_error(argv, message):
    with pytest.raises(cy.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cy.parse_args(argv)


def test_bad_input_prints_one_line_without_traceback(tiny_run_files, tmp_path):
    argv = tiny_argv(tiny_run_files, tmp_path / "x", "--model", str(tmp_path / "no-model"))
    r = subprocess.run([sys.executable, str(ROOT / "fedcybgd.py"), *argv], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load model"), r.stderr


def test_a_second_run_into_the_same_folder_needs_resume(tiny_run_files, tmp_path):
    cy.main(tiny_argv(tiny_run_files, tmp_path / "run", "--rounds", "1", "--max_new_tokens", "0"))
    with pytest.raises(cy.ConfigError, match="already holds a run"):
        cy.train(cy.parse_args(tiny_argv(tiny_run_files, tmp_path / "run", "--rounds", "1")))
    with pytest.raises(cy.ConfigError, match="was written with lr=0.003, this run has lr=0.001"):
        cy.train(cy.parse_args(tiny_argv(tiny_run_files, tmp_path / "run", "--rounds", "2", "--max_new_tokens", "0",
                                         "--resume", "--lr", "1e-3")))


def save_tiny(model_cls, cfg_cls, folder, **cfg):
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = model_cls(cfg_cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **cfg))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("task", ["glue", "squad"])
def test_glue_and_squad_runs_log_their_metrics(task, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForQuestionAnswering
    if task == "glue":
        model = save_tiny(BertForSequenceClassification, BertConfig, tmp_path / "m", hidden_size=32,
                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=256)
        data, keys = ROOT / "tests/fixtures/glue/MRPC", {"accuracy", "f1", "eval_loss"}
    else:
        model = save_tiny(GPT2ForQuestionAnswering, GPT2Config, tmp_path / "m", n_positions=256, n_embd=32,
                          n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
        data, keys = ROOT / "tests/fixtures/squad", {"exact_match", "f1"}
    metrics = cy.main(["--task", task, "--data_path", str(data), "--model", str(model), "--num_clients", "2",
                       "--iid", "iid", "--rounds", "1", "--local_steps", "1", "--max_length", "128",
                       "--output_dir", str(tmp_path / "out")])
    assert [m["round"] for m in metrics] == [0, 1] and keys <= set(metrics[0]) and keys <= set(metrics[1])
    assert metrics[1]["upload_bytes"] > 0 and math.isfinite(metrics[1]["train_loss"])
    # the exported model loads with the Auto class that fits the task
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    auto = AutoModelForSequenceClassification if task == "glue" else AutoModelForQuestionAnswering
    exported = auto.from_pretrained(tmp_path / "out" / "model")
    weights = checkpoint_weights(tmp_path / "out")
    assert all(torch.equal(p, weights[n]) for n, p in exported.named_parameters())


def test_config_records_the_local_steps_a_glue_run_derived(tmp_path):
    """glue, squad: --local_steps left out is the official floor(floor(n/N)/B); config.json and the checkpoint record
    the value the run took (here 3 training pairs over 2 clients in batches of 1: 1 step a turn)."""
    from transformers import BertConfig, BertForSequenceClassification
    model = save_tiny(BertForSequenceClassification, BertConfig, tmp_path / "m", hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
    out = tmp_path / "out"
    cy.main(["--task", "glue", "--data_path", str(ROOT / "tests/fixtures/glue/MRPC"), "--model", str(model),
             "--num_clients", "2", "--iid", "iid", "--rounds", "1", "--batch_size", "1", "--max_length", "128",
             "--output_dir", str(out)])
    assert json.loads((out / "config.json").read_text())["local_steps"] == 1
    assert tasks.checkpoint.read(out)["config"]["local_steps"] == 1
    turns = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    lr = cy.TASK_DEFAULTS["glue"]["lr"]  # linear over 2 turns of 1 step: lr, lr / 2
    assert [(t["lr_first"], t["lr_last"]) for t in turns] == [(lr, lr), (lr / 2, lr / 2)]


@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--weight_decay", "nan"], "--weight_decay nan: must be a finite number >= 0"),
    (["--weight_decay=-0.1"], "--weight_decay -0.1: must be a finite number >= 0"),
])
def test_non_finite_or_negative_numbers_are_refused(argv, message):
    with pytest.raises(cy.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cy.parse_args(argv)


def run_script(argv):
    r = subprocess.run([sys.executable, str(ROOT / "fedcybgd.py"), *argv], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return r.returncode, r.stderr.strip().splitlines()


@pytest.mark.parametrize("case, words", [
    ("empty data file", "has no records"),
    ("GLUE folder without dev.tsv", "dev.tsv not found"),
    ("truncated checkpoint", "cannot be read"),
    ("foreign checkpoint", "cannot be read"),
])
def test_bad_files_are_one_line_with_exit_code_2(tiny_run_files, tmp_path, case, words):
    out = tmp_path / "run"
    if case == "empty data file":
        (tmp_path / "empty.jsonl").write_text("")
        argv = tiny_argv(tiny_run_files, out, "--data_path", str(tmp_path / "empty.jsonl"))
    elif case == "GLUE folder without dev.tsv":
        (tmp_path / "MRPC").mkdir()
        (tmp_path / "MRPC" / "train.tsv").write_bytes((ROOT / "tests/fixtures/glue/MRPC/train.tsv").read_bytes())
        argv = tiny_argv(tiny_run_files, out, "--task", "glue", "--dataset", "mrpc", "--data_path",
                         str(tmp_path / "MRPC"))
    else:
        cy.main(tiny_argv(tiny_run_files, out, "--rounds", "1", "--max_new_tokens", "0"))
        ckpt = tasks.checkpoint.path_of(out)
        if case == "truncated checkpoint":
            ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
        else:
            ckpt.write_text('{"something": "else"}')
        argv = tiny_argv(tiny_run_files, out, "--rounds", "2", "--max_new_tokens", "0", "--resume")
    code, err = run_script(argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_final_model_is_exported_and_resume_of_a_finished_run_reexports(tiny_run_files, tmp_path):
    """<output_dir>/model/ loads with AutoModelForCausalLM + AutoTokenizer and holds the checkpoint's weights;
    --resume of a finished run writes it again without training."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    flags = ("--rounds", "1", "--max_new_tokens", "0")
    cy.main(tiny_argv(tiny_run_files, out, *flags))
    weights = checkpoint_weights(out)
    exported = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    assert exported.keys() == weights.keys() and all(torch.equal(exported[n], weights[n]) for n in weights)
    assert AutoTokenizer.from_pretrained(out / "model")("ab")["input_ids"]
    rows = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "model")
    cy.main(tiny_argv(tiny_run_files, out, *flags, "--resume"))
    again = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    assert all(torch.equal(again[n], weights[n]) for n in weights)
    assert (out / "metrics.jsonl").read_text() == rows


def test_validation_metrics_are_logged_beside_the_test_metrics(tiny_run_files, tmp_path):
    metrics = cy.main(tiny_argv(tiny_run_files, tmp_path / "run", "--rounds", "1", "--val_samples", "4"))
    assert all(math.isfinite(m["val_loss"]) for m in metrics) and "val_rougeL" not in metrics[0]


class Skipping(tasks.Transport):
    """One process, but client `left_out`'s turns never run (the reference a refused turn must equal: nothing of it
    reaches the working model)."""

    def __init__(self, left_out):
        super().__init__("cpu")
        self.left_out = left_out

    def from_client(self, client, keys, fn, run, rnd, download, tag=None, longest=None):
        if client == self.left_out:
            return None, {"dropped": "left out"}
        return super().from_client(client, keys, fn, run, rnd, download, tag, longest)


def test_a_refused_turn_leaves_no_trace(tiny_run_files, tmp_path, monkeypatch):
    """Client 1's training diverges to NaN in place every turn, and its upload is refused. The run equals, bit for
    bit, the run in which client 1's turns never run: the refused weights do not stay in the working model for the
    next clients to train on and for the evaluation to read."""
    flags = ("--rounds", "2", "--num_clients", "3", "--eval_every", "1")
    cy.train(cy.parse_args(tiny_argv(tiny_run_files, tmp_path / "skipped", *flags)), Skipping(1))
    real = cy.client_round

    def diverging(run, rnd, c, download):
        wire, stats = real(run, rnd, c, download)
        if c != 1:
            return wire, stats
        upload = tasks.unpack(wire)
        with torch.no_grad():
            for n, p in run.model.named_parameters():
                if n in upload:
                    p.fill_(float("nan"))  # what a diverged step leaves in the weights it trained
        return tasks.pack({n: torch.full_like(t, float("nan")) for n, t in upload.items()}), stats

    monkeypatch.setattr(cy, "client_round", diverging)
    cy.main(tiny_argv(tiny_run_files, tmp_path / "nan", *flags))
    a, b = checkpoint_weights(tmp_path / "skipped"), checkpoint_weights(tmp_path / "nan")
    assert all(torch.isfinite(t).all() for t in b.values()) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["eval_loss"] for r in read_metrics(tmp_path / "skipped")] == [r["eval_loss"] for r in
                                                                           read_metrics(tmp_path / "nan")]
    reasons = [t["dropped"] for t in (json.loads(l) for l in (tmp_path / "nan" / "ledger.jsonl").read_text()
                                      .splitlines()) if "dropped" in t]
    assert len(reasons) == 2 and all("not finite" in r for r in reasons)


def test_a_crash_after_the_checkpoint_loses_no_metrics_row(tiny_run_files, tmp_path, monkeypatch):
    """A crash right after round 2's checkpoint is written: --resume finishes the run with every round's row in
    metrics.jsonl once, as the run that did not crash wrote them."""
    flags = ("--rounds", "3")
    cy.main(tiny_argv(tiny_run_files, tmp_path / "straight", *flags))
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit):
        cy.main(tiny_argv(tiny_run_files, tmp_path / "crashed", *flags))
    monkeypatch.undo()
    cy.main(tiny_argv(tiny_run_files, tmp_path / "crashed", *flags, "--resume"))
    assert read_metrics(tmp_path / "crashed") == read_metrics(tmp_path / "straight")

