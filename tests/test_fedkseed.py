"""fedkseed.py on tiny models: the ZO step, aggregation, Pro's probabilities, replay, the ledger, resume, errors."""
import importlib.util
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fedkseed as fk
import seedops
import tasks
from conftest import crash_after_checkpoint, make_tiny_llama, make_tiny_tokenizer


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread hand-offs cost milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CATEGORIES = ["open_qa", "classification", "brainstorming", "summarization"]


def write_dolly(path, n=40):
    """A tiny Dolly-format jsonl: 4 categories, 'summarization' is the held-out one."""
    with open(path, "w") as f:
        for i in range(n):
            cat = CATEGORIES[i % len(CATEGORIES)]
            f.write(json.dumps({"instruction": f"Say {i} twice.", "context": "ctx" if i % 3 == 0 else "",
                                "response": f"{i} {i}", "category": cat}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama + character tokenizer saved as a local model folder, usable as --model."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dolly(tmp_path_factory):
    return write_dolly(tmp_path_factory.mktemp("data") / "dolly.jsonl")


def argv(tiny_dir, dolly, out, *extra):
    return ["--model", str(tiny_dir), "--data_path", str(dolly), "--output_dir", str(out), "--num_clients", "4",
            "-m", "0.5", "-K", "16", "--local_steps", "3", "--rounds", "2", "--lr", "1e-3", "--zo_eps", "1e-2",
            "--max_length", "64", "--iid", "iid", "--eval_every", "1", "--eval_samples", "3", "--rouge_samples", "2",
            "--max_new_tokens", "4", "--device", "cpu", *extra]


# the estimator / server-optimizer options the exactness tests run under
OPTIONS = {"two_point": (), "one_sided": ("--estimator", "one_sided", "--directions", "3"),
           "fzoo": ("--estimator", "fzoo", "--directions", "3"),
           "server_momentum": ("--server_lr", "2", "--server_momentum", "0.9"),
           "one_sided+server_momentum": ("--estimator", "one_sided", "--directions", "2", "--server_lr", "1.5",
                                         "--server_momentum", "0.5"),
           "fzoo+cosine": ("--estimator", "fzoo", "--directions", "2", "--lr_scheduler", "cosine"),
           "mask_magnitude": ("--mask", "magnitude", "--mask_density", "0.1"),
           "mask_sensitivity+fzoo": ("--mask", "sensitivity", "--mask_density", "0.05", "--mask_examples", "4",
                                     "--estimator", "fzoo", "--directions", "2")}
COSINE_3_ROUNDS = [1.0, 0.75, 0.25]  # (1 + cos(pi (t - 1) / 3)) / 2 for t = 1, 2, 3: cos 0 = 1, cos pi/3 = 1/2, ...


def batch_for(tok, texts):
    import tasks

    rows = [tasks.tokenize_example(tok, {"prompt": "Q: ", "target": t}, 64) for t in texts]
    return tasks.collate(rows, tok.pad_token_id)


# ---------------------------------------------------------------------------------------------- the ZO step
def flat(tensors, offsets, kind=fk.GAUSSIAN, copies=None):
    """Tensors as fedkseed's weights namespace (`weights_of`'s shape) for tensors that are not a model's."""
    return fk.SimpleNamespace(tensors=tensors, offsets=offsets, kind=kind, copies=copies, masks=None)


def f32(x):
    return torch.tensor(x, dtype=torch.float32)  # the ops round their scales to float32


def explicit_zo_step(loss_at, w0, zs, eps, lr):
    """The two-point step written out in float32 -> (g, the loss at w (L(w + eps z) + L(w - eps z)) / 2, the weights
    after the step)."""
    w_plus = [w + f32(eps) * z for w, z in zip(w0, zs)]
    l_plus = loss_at(w_plus)
    w_minus = [w + f32(-2 * eps) * z for w, z in zip(w_plus, zs)]
    l_minus = loss_at(w_minus)
    g = float(np.float32((l_plus - l_minus) / (2 * eps)))
    return g, (l_plus + l_minus) / 2, [w + f32(eps - lr * g) * z for w, z in zip(w_minus, zs)]


@pytest.mark.parametrize("kind", [fk.GAUSSIAN, fk.RADEMACHER])
def test_zo_step_equals_explicit_formula(tiny_llama, tiny_tokenizer, kind):
    """w+ = w + eps z; w- = w+ - 2 eps z; g = (L(w+) - L(w-)) / 2 eps; w' = w- + (eps - lr g) z.

    Computed in float32 with z_reference; the step (compiled ops when built) must give the same bits."""
    model, seed, eps, lr = tiny_llama, 1234567, 1e-2, 1e-2
    batch = batch_for(tiny_tokenizer, ["hello world", "abc"])
    weights = fk.weights_of(model, kind)
    params, offsets = weights.tensors, weights.offsets
    w0 = [p.clone() for p in params]
    zs = [seedops.z_reference(seed, off, p.numel(), kind).view_as(p) for p, off in zip(params, offsets)]

    def loss_at(ws):
        for p, w in zip(params, ws):
            p.copy_(w)
        return fk.batch_loss(model, batch)

    g, l_plus, expected = explicit_zo_step(loss_at, w0, zs, eps, lr)

    for p, w in zip(params, w0):
        p.copy_(w)
    got_g, got_loss = fk.zo_step(model, weights, batch, seed, eps, lr)
    assert got_g == g and got_loss == l_plus and g != 0.0
    for p, e in zip(params, expected):
        assert torch.equal(p, e)
    assert any(not torch.equal(p, w) for p, w in zip(params, w0))  # the update moved the weights


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
def test_zo_step_with_a_compute_copy_equals_explicit_formula(tiny_tokenizer, compute_dtype):
    """--compute_dtype: the forwards read the float32 weights rounded to the compute dtype, written by the same pass.
    Expected, computed independently: the float32 weights as in the plain step (z_reference), and each loss from a
    model holding their rounding; the step's float32 weights and its copy must give the same bits."""
    seed, eps, lr, kind = 99, 1e-2, 1e-2, fk.GAUSSIAN
    batch = batch_for(tiny_tokenizer, ["hello world", "abc"])
    model = make_tiny_llama(len(tiny_tokenizer)).to(compute_dtype)  # the copy the forwards read
    copies, offsets = fk.weights_of(model).tensors, fk.weights_of(model).offsets
    w0 = [p.float().clone() for p in copies]
    zs = [seedops.z_reference(seed, off, p.numel(), kind).view_as(p) for p, off in zip(w0, offsets)]

    def loss_at(ws):
        for c, w in zip(copies, ws):
            c.copy_(w.to(compute_dtype))
        return fk.batch_loss(model, batch)

    g, l_plus, expected = explicit_zo_step(loss_at, w0, zs, eps, lr)

    params = [w.clone() for w in w0]
    loss_at(w0)
    weights = fk.SimpleNamespace(tensors=params, offsets=offsets, kind=kind, copies=copies, masks=None)
    got_g, got_loss = fk.zo_step(model, weights, batch, seed, eps, lr)
    assert got_g == g and got_loss == l_plus and g != 0.0
    for p, c, e in zip(params, copies, expected):
        assert torch.equal(p, e) and torch.equal(c, e.to(compute_dtype))


def test_folded_steps_equal_their_explicit_formula(tiny_llama, tiny_tokenizer):
    """--fold: two steps and the closing pass, computed independently with z_reference in float32. Step 2 opens with
    one two-seed pass w + (c1 z1 + eps z2) (the sum in float32 in seed order, one rounding), not two."""
    model, eps, lr, kind = tiny_llama, 1e-2, 1e-2, fk.GAUSSIAN
    s1, s2 = 11, 22
    batch = batch_for(tiny_tokenizer, ["hello world", "abc"])
    weights = fk.weights_of(model, kind)
    params, offsets = weights.tensors, weights.offsets
    w0 = [p.clone() for p in params]
    z1, z2 = ([seedops.z_reference(s, off, p.numel(), kind).view_as(p) for p, off in zip(params, offsets)] for s in (s1, s2))

    def loss_at(ws):
        for p, w in zip(params, ws):
            p.copy_(w)
        return fk.batch_loss(model, batch)

    w = [a + f32(eps) * z for a, z in zip(w0, z1)]
    lp = loss_at(w)
    w = [a + f32(-2 * eps) * z for a, z in zip(w, z1)]
    g1 = float(np.float32((lp - loss_at(w)) / (2 * eps)))
    w = [a + (f32(eps - lr * g1) * x + f32(eps) * y) for a, x, y in zip(w, z1, z2)]  # the fold: one rounding
    lp2 = loss_at(w)
    w = [a + f32(-2 * eps) * z for a, z in zip(w, z2)]
    g2 = float(np.float32((lp2 - loss_at(w)) / (2 * eps)))
    expected = [a + f32(eps - lr * g2) * z for a, z in zip(w, z2)]

    for p, a in zip(params, w0):
        p.copy_(a)
    g1_got, _, pending = fk.zo_step_folded(model, weights, batch, s1, eps, lr, None)
    g2_got, _, pending = fk.zo_step_folded(model, weights, batch, s2, eps, lr, pending)
    assert [g1_got, g2_got] == [g1, g2] and pending == (s2, eps - lr * g2)
    fk.perturb(weights, *pending)  # the closing pass the caller applies after the last step
    assert all(torch.equal(p, e) for p, e in zip(params, expected))


def test_fold_run_resumes_exactly(tiny_dir, dolly, tmp_path):
    flags = ("--fold", "--rouge_samples", "0")
    fk.main(argv(tiny_dir, dolly, tmp_path / "a", "--rounds", "2", *flags))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "1", *flags))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "2", "--resume", *flags))
    fk.main(argv(tiny_dir, dolly, tmp_path / "c", "--rounds", "2", "--rouge_samples", "0"))
    a, b, c = (tasks.checkpoint.read(tmp_path / x)["A_history"] for x in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)  # exact on resume; the three-pass run differs in its bits


def test_replay_with_a_compute_copy_equals_the_replay_without_it():
    """sync_model with copies: the float32 weights are the plain replay's bits, the copy their rounding."""
    model = make_tiny_llama(104)
    w0, offsets = fk.weights_of(model).tensors, fk.weights_of(model).offsets
    seeds = fk.candidate_seeds(5, 16)
    A = np.zeros(16, dtype=np.float32)
    A[[1, 4, 9]] = [1e-3, -2e-3, 5e-4]
    plain = [torch.empty_like(w) for w in w0]
    fk.sync_model(flat(plain, offsets), w0, seeds, A)
    params = [torch.empty_like(w) for w in w0]
    copies = [torch.empty(w.shape, dtype=torch.bfloat16) for w in w0]
    fk.sync_model(flat(params, offsets, copies=copies), w0, seeds, A)
    assert all(torch.equal(p, q) for p, q in zip(params, plain))
    assert all(torch.equal(c, q.to(torch.bfloat16)) for c, q in zip(copies, plain))
    fk.sync_model(flat(params, offsets, copies=copies), w0, seeds, np.zeros(16, dtype=np.float32))  # nothing touched
    assert all(torch.equal(c, w.to(torch.bfloat16)) for c, w in zip(copies, w0))


def test_compute_dtype_run_resumes_exactly_and_exports_float32(tiny_dir, dolly, tmp_path):
    """--compute_dtype bfloat16: 1 + 1 resumed rounds == 2 rounds (A, metrics); the exported model is the float32
    global model w0 + sum_k A_k z_k, not its bfloat16 copy; the memory held: 10 bytes a weight instead of 8."""
    flags = ("--compute_dtype", "bfloat16", "--rouge_samples", "0")
    fk.main(argv(tiny_dir, dolly, tmp_path / "a", "--rounds", "2", *flags))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "1", *flags))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "2", "--resume", *flags))
    a, b = (tasks.checkpoint.read(tmp_path / x) for x in "ab")
    assert torch.equal(a["A_history"], b["A_history"])
    rows = {x: [json.loads(l) for l in (tmp_path / x / "metrics.jsonl").read_text().splitlines()] for x in "ab"}
    assert [(r["train_loss"], r["eval_loss"]) for r in rows["a"]] == [(r["train_loss"], r["eval_loss"]) for r in rows["b"]]
    model, _ = tasks.load_model(str(tiny_dir), "sft")
    weights = fk.weights_of(model)
    params = weights.tensors
    fk.sync_model(weights, [p.clone() for p in params], fk.candidate_seeds(42, 16), a["A_history"][-1].numpy())
    exported = fk.weights_of(tasks.load_model(str(tmp_path / "a" / "model"), "sft")[0]).tensors
    assert all(e.dtype == torch.float32 and torch.equal(e, p) for e, p in zip(exported, params))
    n = sum(p.numel() for p in params)
    plain = tmp_path / "plain"
    fk.main(argv(tiny_dir, dolly, plain, "--rounds", "1", "--rouge_samples", "0"))
    held = {x: [json.loads(l) for l in (d / "ledger.jsonl").read_text().splitlines()][0]["held_bytes"]
            for x, d in (("plain", plain), ("a", tmp_path / "a"))}
    assert held["plain"] == 8 * n and held["a"] == (2 + 4 + 4) * n  # model + w0; bf16 model + w0 + fp32 weights
    with pytest.raises(SystemExit):  # the copy is written from float32 weights
        fk.main(argv(tiny_dir, dolly, tmp_path / "c", "--dtype", "bfloat16", "--compute_dtype", "float16"))


def test_non_finite_loss_is_skipped(tiny_llama, tiny_tokenizer):
    """All labels masked -> loss NaN: weights restored (to rounding), nothing recorded, nothing uploaded."""
    import tasks

    weights = fk.weights_of(tiny_llama)
    params = weights.tensors
    w0 = [p.clone() for p in params]
    batch = batch_for(tiny_tokenizer, ["x"])
    batch["labels"][:] = -100
    g, _ = fk.zo_step(tiny_llama, weights, batch, 7, 1e-2, 1e-2)
    assert g is None
    for p, w in zip(params, w0):
        torch.testing.assert_close(p, w, rtol=0, atol=1e-6)

    Args = fk.parse_args(["--seed", "0", "--local_steps", "2", "--batch_size", "1", "--zo_eps", "1e-2", "--lr", "1e-2",
                          "--device", "cpu"])  # the paper's step: two-point, no fold

    ex = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}]
    up, loss = fk.client_update(tiny_llama, weights, ex, None, fk.candidate_seeds(0, 4), Args, 1, 0,
                                tiny_tokenizer.pad_token_id)
    n, idx, gs = fk.decode_upload(up, 4)
    assert n == 1 and len(idx) == 0 and len(gs) == 0 and math.isnan(loss)
    assert tasks  # the collate used by client_update


# ---------------------------------------------------------------------------------------------- server
def test_server_aggregate_weights_by_data_size():
    K, lr = 8, 0.5
    ups = [fk.encode_upload(1, [2, 5, 2], [1.0, -2.0, 0.5], K),  # client A: 1 example
           fk.encode_upload(3, [5, 7], [4.0, 1.0], K)]  # client B: 3 examples
    coefs = fk.server_aggregate(ups, [1, 3], K, lr)
    expected = np.zeros(K)
    expected[2] = 0.25 * (1.0 + 0.5)
    expected[5] = 0.25 * -2.0 + 0.75 * 4.0
    expected[7] = 0.75 * 1.0
    np.testing.assert_array_equal(coefs, (-lr * expected).astype(np.float32))
    assert coefs.dtype == np.float32


def test_pro_probabilities_by_hand():
    K, clip, initial = 4, 10.0, 0.0
    hist_sum, hist_count = np.full(K, initial), np.ones(K, dtype=np.int64)
    ups = [fk.encode_upload(5, [0, 1, 1, 3], [2.0, -4.0, 100.0, 1.0], K)]
    fk.update_seed_history(hist_sum, hist_count, ups, K, clip)
    # mean |clip(g)| over each history [initial, g...]: seed0 (0+2)/2=1, seed1 (0+4+10)/3, seed2 0, seed3 0.5
    # min-max to [0, 1]: 1/(14/3) = 0.2143, 1, 0, 0.5/(14/3) = 0.1071 -> x 255, rounded: 55, 255, 0, 27
    importance = fk.seed_importance(hist_sum, hist_count)
    assert importance.dtype == np.uint8 and importance.tolist() == [55, 255, 0, 27]
    e = np.exp(np.array([55, 255, 0, 27]) / 255 - 1.0)
    probs = fk.seed_probabilities(importance)
    np.testing.assert_allclose(probs, e / e.sum(), rtol=1e-12)
    assert probs.argmax() == 1 and probs.max() / probs.min() <= math.e + 1e-9
    # uniform before any history: all means equal -> min-max gives zeros -> softmax uniform
    np.testing.assert_allclose(fk.seed_probabilities(fk.seed_importance(np.zeros(K), np.ones(K))), np.full(K, 0.25))


# ---------------------------------------------------------------------------------------------- messages
def test_download_sends_exactly_what_the_client_lacks():
    K = 300
    old = np.zeros(K, dtype=np.float32)
    new = old.copy()
    new[[3, 299]] = [0.5, -1.25]
    msg = fk.encode_download(new, old)
    assert len(msg) == 1 + 4 + 2 * (2 + 4)  # sparse: flag, count, 2 x (uint16 index, float32 value)
    back, imp, _ = fk.decode_download(msg, old)
    assert back.tobytes() == new.tobytes() and imp is None and not np.shares_memory(back, old)
    assert len(fk.encode_download(new, new)) == 1 + 4  # nothing lacking: flag + count 0
    dense = np.arange(K, dtype=np.float32) + 1
    msg = fk.encode_download(dense, old, np.arange(K) % 256)
    assert len(msg) == 1 + 4 * K + K  # dense A + Pro's uint8 importances
    back, imp, _ = fk.decode_download(msg, old)
    assert back.tobytes() == dense.tobytes() and imp.tolist() == (np.arange(K) % 256).tolist()
    # -0.0 differs from 0.0 in its bits: sent, so the record matches A bit for bit
    neg = old.copy()
    neg[7] = -0.0
    assert fk.decode_download(fk.encode_download(neg, old), old)[0].tobytes() == neg.tobytes()


def test_ledger_under_18_kilobytes_for_paper_setting_at_any_staleness():
    """K = 4096, 200 local steps: the largest download (every entry of A new to the client, whatever it missed)
    + the upload < 18,000 bytes; Pro adds one byte per seed."""
    K, steps = 4096, 200
    rng = np.random.default_rng(0)
    up = fk.encode_upload(75, rng.integers(0, K, steps), rng.normal(size=steps), K)
    A = rng.normal(size=K).astype(np.float32)
    down = fk.encode_download(A, np.zeros(K, np.float32))
    assert len(up) == 4 + steps * 6 == 1204 and len(down) == 1 + 4 * K == fk.longest_messages(K, False, steps)[0] == 16_385
    assert len(up) + len(down) == 17_589 < 18_000
    pro = fk.encode_download(A, np.zeros(K, np.float32), np.zeros(K, np.uint8))
    assert len(pro) == fk.longest_messages(K, True, steps)[0] == 16_385 + 4096


# ---------------------------------------------------------------------------------------------- replay
@pytest.mark.parametrize("kind", [fk.GAUSSIAN, fk.RADEMACHER], ids=["gaussian", "rademacher"])
def test_stale_client_that_trained_locally_syncs_to_independently_built_weights(tiny_llama, tiny_tokenizer, kind):
    """Client B trains locally in round 1, misses rounds 2-6, then syncs with one download. Its weights equal
    weights built independently: A summed round by round in numpy, applied to the pretrained weights by the
    pure-Python reference of z (not the compiled op the script uses), seed by seed in ascending index order."""
    K = 32
    seeds = fk.candidate_seeds(3, K)
    pretrained = make_tiny_llama(tiny_llama.config.vocab_size)
    w0, offsets = fk.weights_of(pretrained).tensors, fk.weights_of(pretrained).offsets
    client = make_tiny_llama(tiny_llama.config.vocab_size)
    weights = fk.weights_of(client, kind)
    cp = weights.tensors
    record = np.zeros(K, dtype=np.float32)  # client B's own state besides w0

    Args = fk.parse_args(["--seed", "0", "--local_steps", "2", "--batch_size", "1", "--zo_eps", "1e-2", "--lr", "1e-2",
                          "--device", "cpu"])  # the paper's step: two-point, no fold

    ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}]
    fk.client_update(client, weights, ex, None, seeds, Args, 1, 0, tiny_tokenizer.pad_token_id)  # local steps
    assert any(not torch.equal(a, b) for a, b in zip(cp, w0))  # B now holds its own, locally trained weights
    rng = np.random.default_rng(1)
    A, independent = np.zeros(K, dtype=np.float32), np.zeros(K, dtype=np.float32)
    for rnd in range(1, 7):  # the server's rounds (B is away for 2..6)
        sizes = [int(rng.integers(1, 9)) for _ in range(3)]
        ups = [fk.encode_upload(n, rng.integers(0, K, 5), rng.normal(size=5), K) for n in sizes]
        coefs = fk.server_aggregate(ups, sizes, K, 1e-2)
        A = A + coefs
        independent = np.float32(independent + coefs)
    msg = fk.encode_download(A, record)
    record, _, _ = fk.decode_download(msg, record)
    fk.sync_model(weights, w0, seeds, record)
    touched = np.flatnonzero(independent)
    assert len(touched) > 10
    for p, p0, off in zip(cp, w0, offsets):
        expected = p0.clone()
        seedops.apply_seeds_reference_(expected, [seeds[k] for k in touched], [float(independent[k]) for k in touched],
                                  off, kind)
        assert torch.equal(p, expected)
    assert any(not torch.equal(a, b) for a, b in zip(cp, w0))  # the rounds did move the weights


# ---------------------------------------------------------------------------------------------- end to end
def test_two_rounds_write_outputs_and_replay_matches_checkpoint(tiny_dir, dolly, tmp_path):
    out = tmp_path / "run"
    fk.main(argv(tiny_dir, dolly, out))
    for name in ("config.json", "metrics.jsonl", "ledger.jsonl", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    # the plot is optional: written exactly when matplotlib is installed
    assert (out / "loss.png").is_file() == (importlib.util.find_spec("matplotlib") is not None)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"round", "train_loss", "eval_loss", "rougeL", "upload_bytes", "download_bytes", "seconds"} <= set(r)
    # Rouge-L after the last round only, as the official code (--rouge_at_start adds round 0)
    assert rows[0]["train_loss"] is None and rows[0]["rougeL"] is None and rows[2]["rougeL"] is not None
    examples = json.loads((out / "heldout_examples.json").read_text())  # round 0 and the last, per example
    assert (examples["first"]["round"], examples["last"]["round"]) == (0, 2)
    sums, counts = examples["last"]["loss_sum"], examples["last"]["tokens"]
    assert sum(sums) / sum(counts) == pytest.approx(rows[2]["eval_loss"], rel=1e-12)
    assert rows[1]["upload_bytes"] == 4 + 3 * 6  # 3 steps of (uint16, float32) + the data size
    ledger = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 2 * 2 and all(e["upload_bytes"] > 0 and e["download_bytes"] > 0 for e in ledger)
    # the exported model is the global model A defines: the pretrained weights + sum_k A_k z_k
    state = tasks.checkpoint.read(out)
    assert state["A_history"].shape == (3, 16) and all(r["replay_max_abs_diff"] == 0.0 for r in rows[1:])
    model, _ = tasks.load_model(str(tiny_dir), "sft")
    weights = fk.weights_of(model)
    params = weights.tensors
    w0 = [p.clone() for p in params]
    fk.sync_model(weights, w0, fk.candidate_seeds(42, 16), state["A_history"][-1].numpy())
    exported = fk.weights_of(tasks.load_model(str(out / "model"), "sft")[0]).tensors
    assert all(torch.equal(p, w) for p, w in zip(params, exported))
    assert any(not torch.equal(p, w) for p, w in zip(w0, exported))


@pytest.mark.parametrize("option", ["two_point", "one_sided+server_momentum", "mask_sensitivity+fzoo"])
def test_resume_is_bit_exact(tiny_dir, dolly, tmp_path, option):
    """2 rounds + resume to 4 == 4 rounds straight (weights bit for bit, same metrics), FedKSeed-Pro; also with the
    one-sided estimator and server momentum (whose buffer the checkpoint carries)."""
    pro = ("--bias_sampling", "--eval_every", "2", "--rouge_samples", "0", *OPTIONS[option])
    fk.main(argv(tiny_dir, dolly, tmp_path / "a", "--rounds", "4", *pro))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "2", *pro))
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", "--rounds", "4", "--resume", *pro))
    a = tasks.checkpoint.read(tmp_path / "a")
    b = tasks.checkpoint.read(tmp_path / "b")
    assert a["round"] == b["round"] == 4
    assert torch.equal(a["A_history"], b["A_history"]) and torch.equal(a["synced_round"], b["synced_round"])
    assert torch.equal(a["hist_sum"], b["hist_sum"]) and torch.equal(a["hist_count"], b["hist_count"])
    assert torch.equal(a["velocity"], b["velocity"])
    wa, wb = (fk.weights_of(tasks.load_model(str(tmp_path / x / "model"), "sft")[0]).tensors for x in "ab")
    assert all(torch.equal(x, y) for x, y in zip(wa, wb))
    ra = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    def key(rows):
        return [(r["round"], r["train_loss"], r["upload_bytes"], r["download_bytes"]) for r in rows]

    assert key(ra) == key(rb)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra, words", [
    (["-m", "0"], "-m 0.0"),
    (["-m", "1.5"], "(0, 1]"),
    (["-K", "0"], "-K 0"),
    (["-m", "0.1"], "samples no client"),
    (["--num_clients", "100"], "over 100 clients"),  # more clients than training examples
    (["--model", "./no/such/model"], "no such folder"),
    (["--model", "no-such-org/no-such-model"], "--model no-such-org/no-such-model:"),  # hub id: offline or 404
    (["--data_path", "/no/such/dolly.jsonl"], "not found"),
    (["--resume"], "no checkpoint"),
])
def test_bad_input_is_one_line(tiny_dir, dolly, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, dolly, tmp_path / "out") + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_resume_with_other_config_is_one_line(tiny_dir, dolly, tmp_path, capsys):
    out = tmp_path / "run"
    fk.main(argv(tiny_dir, dolly, out, "--rounds", "1", "--rouge_samples", "0"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, dolly, out, "--rounds", "2", "--resume", "--lr", "2e-3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "lr=0.001" in err[0] and "lr=0.002" in err[0]


@pytest.mark.parametrize("extra, words", [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number > 0"),
    (["--lr=-1e-3"], "--lr -0.001: must be"),
    (["--zo_eps", "inf"], "--zo_eps inf: must be a finite number > 0"),
    (["--zo_eps", "0"], "--zo_eps 0.0: must be"),
    (["--grad_initial", "nan"], "--grad_initial nan"),
    (["--directions", "2"], "two-point estimator takes 1 direction"),
    (["--estimator", "one_sided", "--directions", "0"], "--directions 0"),
    (["--estimator", "one_sided", "--fold"], "--fold"),
    (["--estimator", "fzoo", "--directions", "1"], "--estimator fzoo 2 or more"),
    (["--server_momentum", "1"], "--server_momentum 1.0: must be in [0, 1)"),
    (["--server_lr", "nan"], "--server_lr nan: must be a finite number > 0"),
    (["--clip_norm=-1"], "--clip_norm -1.0: must be a finite number >= 0"),
    (["--mask", "random", "--mask_density", "0"], "--mask_density 0.0: must be a finite number > 0"),
    (["--mask_density", "1.5"], "--mask_density 1.5: a fraction"),
    (["--mask", "sensitivity", "--mask_examples", "1000"], "fewer than --mask_examples 1000"),
])
def test_non_finite_or_non_positive_flags_are_one_line(tiny_dir, dolly, tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, dolly, tmp_path / "out") + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err


def test_empty_data_file_is_one_line(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, empty, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "has no records" in err[0], err


@pytest.mark.parametrize("damage, words", [
    ("truncate", "cannot be read"),
    ("foreign", "is not a fedkseed checkpoint"),
])
def test_truncated_or_foreign_checkpoint_is_one_line(tiny_dir, dolly, tmp_path, capsys, damage, words):
    out = tmp_path / "run"
    fk.main(argv(tiny_dir, dolly, out, "--rounds", "1", "--rouge_samples", "0"))
    ckpt = out / "checkpoint.safetensors"
    if damage == "truncate":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        save_file({"weights": torch.zeros(3)}, str(ckpt))  # a safetensors file, but not ours
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, dolly, out, "--rounds", "2", "--rouge_samples", "0", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err


def test_final_model_is_exported_and_resume_of_a_finished_run_reexports(tiny_dir, dolly, tmp_path):
    """<output_dir>/model/ loads with AutoModelForCausalLM + AutoTokenizer, holds the checkpoint's weights, and
    --resume of a finished run writes it again without training (no new metrics rows, same weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    flags = ("--rounds", "2", "--rouge_samples", "0")
    fk.main(argv(tiny_dir, dolly, out, *flags))
    state = tasks.checkpoint.read(out)
    model, _ = tasks.load_model(str(tiny_dir), "sft")
    weights = fk.weights_of(model)  # the global model the checkpoint's A defines
    params = weights.tensors
    fk.sync_model(weights, [p.clone() for p in params], fk.candidate_seeds(42, 16), state["A_history"][-1].numpy())
    exported = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.equal(p, w) for p, w in zip(fk.weights_of(exported).tensors, params))
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert tok("abc")["input_ids"]
    rows = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "model")
    fk.main(argv(tiny_dir, dolly, out, *flags, "--resume"))
    again = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all(torch.equal(p, w) for p, w in zip(fk.weights_of(again).tensors, params))
    assert (out / "metrics.jsonl").read_text() == rows
    assert tasks.checkpoint.read(out)["round"] == 2


@pytest.mark.parametrize("option", ["two_point", "one_sided+server_momentum", "mask_sensitivity+fzoo"])
def test_client_back_after_five_missed_rounds_replays_the_server_weights_exactly(tiny_dir, dolly, tmp_path, option):
    """10 rounds, 2 of 8 clients per round; the seed is chosen so that some client misses >= 5 rounds between two
    participations. Every round's replay_max_abs_diff (clients' replayed weights vs the server's) is 0.0, that
    client's download is its missing entries of A only (never weights, never more than 1 + 4K bytes), and
    the server's w(T) is exported."""
    N, n, rounds = 8, 2, 10

    def longest_gap(seed):
        seen = {}
        gaps = []
        for r in range(1, rounds + 1):
            for c in tasks.sample_clients(seed, r, N, n):
                if c in seen:
                    gaps.append((r - seen[c] - 1, c, r))
                seen[c] = r
        return max(gaps) if gaps else (0, None, None)

    seed = next(s for s in range(100) if longest_gap(s)[0] >= 5)
    missed, client, back = longest_gap(seed)
    out = tmp_path / "run"
    fk.main(argv(tiny_dir, dolly, out, "--num_clients", str(N), "-m", "0.25", "--rounds", str(rounds), "--seed",
                 str(seed), "--eval_every", "5", "--rouge_samples", "0", *OPTIONS[option]))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert all(r["replay_max_abs_diff"] == 0.0 and r["sync_seconds"] >= 0 for r in rows[1:])
    ledger = [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]
    entry = next(e for e in ledger if e["client"] == client and e["round"] == back)
    state = tasks.checkpoint.read(out)
    A = state["A_history"].numpy()
    lacking = int(np.count_nonzero(A[back - 1].view(np.uint32) != A[back - missed - 2].view(np.uint32)))
    assert missed >= 5 and lacking > 0
    assert entry["download_bytes"] == min(1 + 4 + lacking * 6, 1 + 4 * 16)  # sparse or dense, whichever is smaller
    if "--mask" in OPTIONS[option]:  # the mask travels once, in each client's first download, and is counted there
        first = {}
        for e in ledger:
            first.setdefault(e["client"], e["round"])
        mask_bytes = len(state["mask"].numpy().tobytes())
        assert mask_bytes == 4 * sum(math.ceil(0.05 * p.numel()) for p in tasks.load_model(str(tiny_dir), "sft")[0].parameters())
        assert all((e["download_bytes"] > mask_bytes) == (e["round"] == first[e["client"]]) for e in ledger)


def test_validation_loss_is_logged_beside_the_held_out_loss(tiny_dir, dolly, tmp_path):
    """--val_samples: rows that evaluate carry val_loss (from training-pool examples no client holds)."""
    out = tmp_path / "val"
    fk.main(argv(tiny_dir, dolly, out, "--val_samples", "4", "--rouge_samples", "0"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["val_loss"]) and math.isfinite(r["eval_loss"]) for r in rows)
    assert len({r["val_loss"] for r in rows}) > 1  # it follows the model


# ---------------------------------------------------------------------------------------------- other estimators
def add_seeds(ws, scales, zs):
    """w + sum_s scales[s] z_s per tensor: the sum in float32 in seed order, one rounding (an apply_seeds_ pass)."""
    out = []
    for j, w in enumerate(ws):
        acc = torch.zeros_like(w)
        for c, z in zip(scales, zs):
            acc = acc + f32(c) * z[j]
        out.append(w + acc)
    return out


def one_sided_losses(model, tokenizer, kind, step_seeds, eps):
    """The losses a one-sided step of len(step_seeds) = 3 directions sees, written out with z_reference:
    L0 = L(w); w1 = w + eps z1; w2 = w1 - eps z1 + eps z2; w3 = w2 - eps z2 + eps z3 -> (params, offsets, batch, w0,
    zs, L0, [L(w1), L(w2), L(w3)], w3); the model's weights are w0 again on return."""
    batch = batch_for(tokenizer, ["hello world", "abc"])
    weights = fk.weights_of(model, kind)
    params, offsets = weights.tensors, weights.offsets
    w0 = [p.clone() for p in params]
    zs = [[seedops.z_reference(s, off, p.numel(), kind).view_as(p) for p, off in zip(params, offsets)] for s in step_seeds]

    def loss_at(ws):
        for p, w in zip(params, ws):
            p.copy_(w)
        return fk.batch_loss(model, batch)

    l0 = loss_at(w0)
    w, losses = add_seeds(w0, [eps], zs[:1]), []
    losses.append(loss_at(w))
    for i in (1, 2):
        w = add_seeds(w, [-eps, eps], zs[i - 1:i + 1])
        losses.append(loss_at(w))
    for p, a in zip(params, w0):
        p.copy_(a)
    return weights, batch, w0, zs, l0, losses, w


def test_one_sided_step_equals_explicit_formula(tiny_llama, tiny_tokenizer):
    """--estimator one_sided, n = 3 (`one_sided_losses`): c_i = (L(w_i) - L0) / (n eps) in float32;
    w' = w3 + sum_i (-lr c_i) z_i - eps z3."""
    eps, lr, kind, step_seeds = 1e-2, 1e-2, fk.GAUSSIAN, [11, 22, 33]
    weights, batch, w0, zs, l0, losses, w = one_sided_losses(tiny_llama, tiny_tokenizer, kind, step_seeds, eps)
    c = [float(np.float32((loss - l0) / (3 * eps))) for loss in losses]
    expected = add_seeds(w, [-lr * c[0], -lr * c[1], -lr * c[2] - eps], zs)
    got_c, got_loss = fk.one_sided_step(tiny_llama, weights, batch, step_seeds, eps, lr)
    assert got_c == c and got_loss == l0 and all(x != 0.0 for x in c)
    assert all(torch.equal(p, e) for p, e in zip(weights.tensors, expected))


def test_an_upload_on_seeds_other_than_the_assigned_draws_is_refused():
    """The server recomputes a client's draws from (seed, round, client) and Pro's probabilities; any other index
    (all pairs stacked on one seed, one index changed, steps out of order) is refused. Honest uploads pass, also
    when a step with a non-finite loss uploaded nothing."""
    args = fk.parse_args(["--device", "cpu", "-K", "64", "--local_steps", "5"])
    probs = fk.seed_probabilities(np.arange(64, dtype=np.uint8) * 4)  # Pro's: non-uniform
    for p in (None, probs):
        draws = fk.seed_draws(args, 64, 3, 7, p)[0]
        assert (draws == np.random.default_rng([42, 2, 3, 7]).choice(64, 5, p=p) if p is not None else
                draws == np.random.default_rng([42, 2, 3, 7]).integers(0, 64, 5)).all()  # the client's own draws
        up = lambda idx: fk.encode_upload(10, idx, [0.5] * len(idx), 64)  # noqa: E731
        check = lambda idx: fk.check_upload(up(idx), 64, 5, 1, 10, draws)  # noqa: E731
        assert check(draws) is None and check(np.delete(draws, 2)) is None  # honest; step 2 skipped (NaN loss)
        stacked = np.full(5, draws[0])
        if not (draws == draws[0]).all():
            assert "not the draws" in check(stacked)
        other = draws.copy()
        other[1] = (other[1] + 1) % 64
        assert "not the draws" in check(other)
        if draws[0] != draws[1]:
            assert "not the draws" in check(draws[[1, 0, 2, 3, 4]])


def test_clip_norm_bounds_one_client_as_its_formula_says():
    """--clip_norm c with 4 clients, one of them uploading g = 1e30 on its seeds. Written out in numpy apart from the
    script: v_i[k] = sum of client i's g on seed k; bound = c * lower median_i |v_i|; v_i *= bound / |v_i| where larger;
    a = -lr * sum_i (n_i / sum n) v_i. The hostile client's share of a is at most lr * n_i / sum n * bound; the honest
    run is unchanged bit for bit when no norm exceeds the bound."""
    K, lr, c = 16, 1e-3, 2.0
    rng = np.random.default_rng(0)
    clients = [(10 + i, rng.integers(0, K, 5), rng.normal(0, 3, 5).astype(np.float32)) for i in range(4)]
    hostile = (13, clients[3][1], np.full(5, 1e30, np.float32))
    ups = [fk.encode_upload(n, idx, g, K) for n, idx, g in clients[:3] + [hostile]]
    ns = [n for n, _, _ in clients[:3] + [hostile]]
    vs = []
    for n, idx, g in clients[:3] + [hostile]:
        v = np.zeros(K)
        for k, x in zip(idx, g):
            v[k] += float(x)
        vs.append(v)
    norms = [math.sqrt(sum(x * x for x in v)) for v in vs]
    bound = c * sorted(norms)[1]  # the lower median of four: the 2nd smallest
    sizes = np.array([n for n, _, _ in clients[:3] + [hostile]], np.float64)
    expected = np.zeros(K)
    for w, v, nv in zip(sizes / sizes.sum(), vs, norms):
        expected += w * (v * (bound / nv) if nv > bound else v)
    got = fk.server_aggregate(ups, ns, K, lr, clip_norm=c)
    np.testing.assert_allclose(got, (-lr * expected).astype(np.float32), rtol=1e-6)
    hostile_share = lr * sizes[3] / sizes.sum() * bound
    assert norms[3] > bound  # the hostile client is clipped: its share of a has norm lr * n_i / sum n * bound
    share = lr * sizes[3] / sizes.sum() * vs[3] * (bound / norms[3])
    assert abs(np.linalg.norm(share) - hostile_share) <= 1e-9 * hostile_share and np.isfinite(got).all()
    honest = ups[:3]  # no norm above 2 x the median: the same bits as without the option
    assert np.array_equal(fk.server_aggregate(honest, ns[:3], K, lr, clip_norm=10.0),
                          fk.server_aggregate(honest, ns[:3], K, lr))


def test_fzoo_step_equals_its_formula(tiny_llama, tiny_tokenizer):
    """--estimator fzoo, n = 3, Rademacher z, FZOO's update written out independently (`one_sided_losses`):
    sigma = sqrt(mean_i (L_i - mean L)^2) (the population std, in Python floats); c_i = (L_i - L0) / (3 sigma) rounded
    to float32 (no 1/eps); w' = w_3 + sum_i (-lr c_i) z_i - eps z3."""
    eps, lr, kind, step_seeds = 1e-2, 1e-1, fk.RADEMACHER, [5, 6, 7]
    weights, batch, w0, zs, l0, losses, w = one_sided_losses(tiny_llama, tiny_tokenizer, kind, step_seeds, eps)
    mean = sum(losses) / 3
    sigma = math.sqrt(sum((x - mean) ** 2 for x in losses) / 3)
    c = [float(np.float32((x - l0) / (3 * sigma))) for x in losses]
    expected = add_seeds(w, [-lr * c[0], -lr * c[1], -lr * c[2] - eps], zs)
    got_c, got_loss = fk.one_sided_step(tiny_llama, weights, batch, step_seeds, eps, lr, normalise=True)
    assert got_c == c and got_loss == l0 and sigma > 0
    assert all(torch.equal(p, e) for p, e in zip(weights.tensors, expected))


def test_fzoo_step_without_spread_restores_and_records_nothing(tiny_llama, tiny_tokenizer, monkeypatch):
    weights = fk.weights_of(tiny_llama, fk.RADEMACHER)
    params = weights.tensors
    w0 = [p.clone() for p in params]
    losses = iter([1.0, 2.0, 2.0])  # L0, then two perturbed losses with no spread: sigma = 0
    monkeypatch.setattr(fk, "batch_loss", lambda model, batch: next(losses))
    batch = batch_for(tiny_tokenizer, ["x"])
    assert fk.one_sided_step(tiny_llama, weights, batch, [1, 2], 1e-2, 1e-2, normalise=True) == (None, 1.0)
    # undone by the opposite pass: the same weights up to float32 rounding (w + eps z1 - eps z1 + eps z2 - eps z2)
    assert all(torch.allclose(p, w, rtol=0, atol=1e-6) for p, w in zip(params, w0))


def test_fzoo_flags():
    args = fk.parse_args(["--estimator", "fzoo", "--directions", "4", "--device", "cpu"])
    assert args.perturbation == "rademacher"  # as published
    assert fk.parse_args(["--estimator", "fzoo", "--directions", "2", "--perturbation", "gaussian",
                          "--device", "cpu"]).perturbation == "gaussian"
    assert fk.parse_args(["--device", "cpu"]).perturbation == "gaussian"


def test_one_sided_step_with_a_non_finite_loss_restores_and_records_nothing(tiny_llama, tiny_tokenizer):
    weights = fk.weights_of(tiny_llama)
    params = weights.tensors
    w0 = [p.clone() for p in params]
    batch = batch_for(tiny_tokenizer, ["x"])
    batch["labels"][:] = -100  # loss NaN
    assert fk.one_sided_step(tiny_llama, weights, batch, [1, 2], 1e-2, 1e-2)[0] is None
    assert all(torch.equal(p, w) for p, w in zip(params, w0))  # L(w) is evaluated first: nothing was perturbed


def test_server_step_by_hand():
    """m(t) = beta m(t-1) + a(t), increment = s m(t); under the defaults A + increment == A + a(t) bit for bit."""
    a1 = np.array([1.0, -2.0, 0.0, -0.0], dtype=np.float32)
    a2 = np.array([0.5, 0.5, 4.0, 0.0], dtype=np.float32)
    inc, m = fk.server_step(a1, np.zeros(4, np.float32), 1.0, 0.0)
    A = np.array([0.0, 1.5, -3.0, 2.0], dtype=np.float32)  # A is never -0.0: a sum starting at +0.0
    assert (A + inc).tobytes() == (A + a1).tobytes() and np.array_equal(m, a1)
    inc1, m1 = fk.server_step(a1, np.zeros(4, np.float32), 3.0, 0.5)
    inc2, m2 = fk.server_step(a2, m1, 3.0, 0.5)
    np.testing.assert_array_equal(m2, [1.0, -0.5, 4.0, 0.0])  # 0.5 * a1 + a2
    np.testing.assert_array_equal(inc1, [3.0, -6.0, 0.0, 0.0])
    np.testing.assert_array_equal(inc2, [3.0, -1.5, 12.0, 0.0])
    assert inc2.dtype == m2.dtype == np.float32


def parse_upload(msg):
    """The upload's layout parsed here, apart from decode_upload: uint32 data size, uint16 indices (K <= 65536),
    float32 scalars, little-endian."""
    steps = (len(msg) - 4) // 6
    return (int.from_bytes(msg[:4], "little"), np.frombuffer(msg, "<u2", steps, 4).astype(np.int64),
            np.frombuffer(msg, "<f4", steps, 4 + 2 * steps))


@pytest.mark.parametrize("option", list(OPTIONS))
def test_global_model_equals_its_definition_from_the_uploaded_pairs(tiny_dir, dolly, tmp_path, monkeypatch, option):
    """3 rounds under each option; the uploads are captured at the server. In numpy, from those pairs alone: the
    robust bound B(t) = 10 x the lower median |scalar| of rounds 1..t (--g_bound's default, its window longer than the run),
    a(t) = -lr sum_i (n_i / sum n) (client i's scalars per seed, each clipped to [-B, B]), m = beta m + a, A += s m
    (float64, each rounded to float32), then w = w0 + sum_k A_k z_k in float64. The checkpoint's A is that A exactly;
    the exported model that w (float32 rounding)."""
    captured = []
    server_update = fk.server_update

    def spy(server, uploads, sizes, *rest):
        captured.append(list(uploads))
        assert sizes == [parse_upload(u)[0] for u in uploads]  # the server's record: each client's own size
        return server_update(server, uploads, sizes, *rest)

    monkeypatch.setattr(fk, "server_update", spy)
    extra = OPTIONS[option]
    fk.main(argv(tiny_dir, dolly, tmp_path / "run", "--rounds", "3", "--rouge_samples", "0", *extra))
    flag = lambda name, default: float(extra[extra.index(name) + 1]) if name in extra else default  # noqa: E731
    s, beta, n_dir = flag("--server_lr", 1.0), flag("--server_momentum", 0.0), int(flag("--directions", 1))
    K = 16
    A, m = np.zeros(K, np.float32), np.zeros(K, np.float32)
    seen = []
    for t, ups in enumerate(captured):
        lr = 1e-3 * (COSINE_3_ROUNDS[t] if "cosine" in extra else 1.0)
        decoded = [parse_upload(u) for u in ups]
        assert all(len(idx) == 3 * n_dir for _, idx, _ in decoded)  # 3 steps, n pairs each
        seen += [abs(float(v)) for _, _, val in decoded for v in val]
        bound = 10 * sorted(seen)[(len(seen) - 1) // 2]  # the lower median
        sizes = np.array([n for n, _, _ in decoded], np.float64)
        acc = np.zeros(K)
        for wgt, (_, idx, val) in zip(sizes / sizes.sum(), decoded):
            for k, v in zip(idx, val):
                acc[k] += wgt * min(max(float(v), -bound), bound)
        a = (-lr * acc).astype(np.float32)
        m = (beta * m.astype(np.float64) + a.astype(np.float64)).astype(np.float32)
        A = A + (s * m.astype(np.float64)).astype(np.float32)
    state = tasks.checkpoint.read(tmp_path / "run")
    assert len(captured) == 3 and np.array_equal(state["A_history"][-1].numpy(), A) and np.count_nonzero(A) > 0
    assert np.array_equal(state["velocity"].numpy(), m)  # beta 0: m is the last round's a(t)
    initial = fk.weights_of(tasks.load_model(str(tiny_dir), "sft")[0])
    w0, offsets = initial.tensors, initial.offsets
    seeds = fk.candidate_seeds(42, K)
    kind = fk.RADEMACHER if "fzoo" in option else fk.GAUSSIAN  # FZOO's z as published
    exported = fk.weights_of(tasks.load_model(str(tmp_path / "run" / "model"), "sft")[0]).tensors
    for i, (p0, off, e) in enumerate(zip(w0, offsets, exported)):
        w = p0.double().view(-1).numpy().copy()
        at = np.ones(p0.numel(), bool)  # --mask: z is the dense z at the mask and 0 elsewhere
        if "magnitude" in option:  # the smallest |w0|, ties to the lower index, computed here in numpy
            at[:] = False
            at[np.argsort(np.abs(p0.view(-1).numpy()), kind="stable")[:math.ceil(0.1 * p0.numel())]] = True
        elif "sensitivity" in option:  # the server's mask, as it sent it (the checkpoint keeps its bytes)
            sent = np.frombuffer(state["mask"].numpy().tobytes(), np.uint32).astype(np.int64)
            at[:] = False
            at[sent[(sent >= off) & (sent < off + p0.numel())] - off] = True
            assert at.sum() == math.ceil(0.05 * p0.numel())
        for k in np.flatnonzero(A):
            w += float(A[k]) * seedops.z_reference(seeds[k], off, p0.numel(), kind).double().numpy() * at
        np.testing.assert_allclose(e.view(-1).numpy(), w, rtol=0, atol=1e-6)
        assert np.array_equal(e.view(-1).numpy()[~at], p0.view(-1).numpy()[~at])  # bit for bit off the mask
    assert any(not torch.equal(p0, e) for p0, e in zip(w0, exported))


@pytest.mark.parametrize("estimator", ["two_point", "fzoo"])
def test_cosine_round_steps_at_its_rate(tiny_tokenizer, estimator):
    """--lr_scheduler cosine, round 2 of 3: the client's steps are those of a constant-lr client at 0.75 lr (the
    rate written out above), bit for bit: the same upload and the same local weights."""
    est = ["--estimator", estimator] + (["--directions", "2"] if estimator == "fzoo" else [])
    ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 5, 6], "labels": [-100, 5, 6]}]
    seeds, results = fk.candidate_seeds(3, 16), []
    for flags in (["--lr", "1e-2", "--lr_scheduler", "cosine"], ["--lr", str(1e-2 * COSINE_3_ROUNDS[1])]):
        args = fk.parse_args(["--seed", "0", "--local_steps", "3", "--zo_eps", "1e-2", "--rounds", "3", "--device",
                              "cpu", *est, *flags])
        model = make_tiny_llama(len(tiny_tokenizer))
        weights = fk.weights_of(model, fk.RADEMACHER if estimator == "fzoo" else fk.GAUSSIAN)
        up, _ = fk.client_update(model, weights, ex, None, seeds, args, 2, 0, tiny_tokenizer.pad_token_id)
        results.append((up, [p.clone() for p in weights.tensors]))
    (up_a, w_a), (up_b, w_b) = results
    assert up_a == up_b and all(torch.equal(a, b) for a, b in zip(w_a, w_b))
    assert fk.round_lr(fk.parse_args(["--lr", "1e-2", "--lr_scheduler", "cosine", "--rounds", "3"]), 1) == 1e-2


def test_cosine_run_resumes_exactly_and_keeps_its_rounds(tiny_dir, dolly, tmp_path, capsys, monkeypatch):
    """A cosine run that stops after round 2 of 4 and resumes == 4 rounds straight (A bit for bit); resuming it
    with other --rounds would change the rate of the rounds it already took: one line."""
    flags = ("--rounds", "4", "--eval_every", "4", "--rouge_samples", "0", *OPTIONS["fzoo+cosine"])
    fk.main(argv(tiny_dir, dolly, tmp_path / "a", *flags))
    client_round = fk.client_round

    def crash_in_round_3(run, rnd, *rest):
        if rnd == 3:
            raise KeyboardInterrupt
        return client_round(run, rnd, *rest)

    monkeypatch.setattr(fk, "client_round", crash_in_round_3)
    with pytest.raises(SystemExit):  # main's one line for an interrupt: rerun with --resume
        fk.main(argv(tiny_dir, dolly, tmp_path / "b", *flags))
    monkeypatch.setattr(fk, "client_round", client_round)
    assert tasks.checkpoint.read(tmp_path / "b")["round"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fk.main(argv(tiny_dir, dolly, tmp_path / "b", *flags, "--rounds", "6", "--resume"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "rounds=4" in err[0] and "rounds=6" in err[0], err
    fk.main(argv(tiny_dir, dolly, tmp_path / "b", *flags, "--resume"))
    a, b = tasks.checkpoint.read(tmp_path / "a"), tasks.checkpoint.read(tmp_path / "b")
    assert a["round"] == b["round"] == 4 and torch.equal(a["A_history"], b["A_history"])


def test_a_crash_after_the_checkpoint_loses_no_metrics_row(tiny_dir, dolly, tmp_path, monkeypatch):
    """A crash right after round 2's checkpoint is written: --resume finishes the run with every round's row in
    metrics.jsonl once, as the run that did not crash wrote them (the row is written before the checkpoint)."""
    flags = ("--rounds", "3", "--rouge_samples", "0")
    fk.main(argv(tiny_dir, dolly, tmp_path / "straight", *flags))
    crash_after_checkpoint(monkeypatch, 2)
    with pytest.raises(SystemExit):
        fk.main(argv(tiny_dir, dolly, tmp_path / "crashed", *flags))
    monkeypatch.undo()
    fk.main(argv(tiny_dir, dolly, tmp_path / "crashed", *flags, "--resume"))
    timings = ("seconds", "client_seconds", "sync_seconds")
    rows = {x: [{k: v for k, v in json.loads(l).items() if k not in timings}
                for l in (tmp_path / x / "metrics.jsonl").read_text().splitlines()] for x in ("straight", "crashed")}
    assert rows["crashed"] == rows["straight"] and [r["round"] for r in rows["crashed"]] == [0, 1, 2, 3]


@pytest.mark.parametrize("estimator", ["two_point", "fzoo"])
def test_train_loss_is_the_loss_at_the_steps_weights_for_every_estimator(tiny_tokenizer, estimator, monkeypatch):
    """train_loss means one thing for every estimator: the mean over a client's steps of the loss at the step's
    weights w. The one-sided and FZOO steps compute L(w); the two-point step reports (L(w + eps z) + L(w - eps z)) / 2
    (= L(w) + O(eps^2)). Written out from the losses each step saw, in the order it saw them."""
    seen = []
    real = fk.batch_loss
    monkeypatch.setattr(fk, "batch_loss", lambda model, batch: seen.append(real(model, batch)) or seen[-1])
    est = ["--estimator", estimator] + (["--directions", "2"] if estimator == "fzoo" else [])
    args = fk.parse_args(["--seed", "0", "--local_steps", "3", "--zo_eps", "1e-2", "--lr", "1e-3", "--device", "cpu",
                          *est])
    model = make_tiny_llama(len(tiny_tokenizer))
    ex = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 5, 6], "labels": [-100, 5, 6]}]
    weights = fk.weights_of(model, fk.RADEMACHER if estimator == "fzoo" else fk.GAUSSIAN)
    _, loss = fk.client_update(model, weights, ex, None, fk.candidate_seeds(3, 16), args, 1, 0,
                               tiny_tokenizer.pad_token_id)
    per_step = 2 if estimator == "two_point" else 3  # forwards a step: L+, L-; or L(w), L(w + eps z_1), L(...z_2)
    steps = [seen[i:i + per_step] for i in range(0, len(seen), per_step)]
    at_w = [(s[0] + s[1]) / 2 if estimator == "two_point" else s[0] for s in steps]
    assert len(steps) == 3 and loss == pytest.approx(sum(at_w) / 3, rel=1e-12)


def test_every_use_of_the_master_seed_has_its_own_stream():
    """The candidate seeds, the partition, the sampling, the seed draws, the validation carve-out: distinct streams
    of the master seed (the candidate seeds once shared the partition's)."""
    assert len(set(tasks.STREAMS.values())) == len(tasks.STREAMS)
    K = 8
    shared = np.random.default_rng(42).integers(1, 2**63 - 1, size=K, dtype=np.int64).tolist()  # the partition's
    assert fk.candidate_seeds(42, K) != shared
    assert fk.candidate_seeds(42, K) == tasks.stream(42, "candidate_seeds").integers(1, 2**63 - 1, size=K,
                                                                                       dtype=np.int64).tolist()
    labels = [i % 3 for i in range(60)]
    assert tasks.partition(labels, 4, "iid", 42) == [p.tolist() for p in np.array_split(
        tasks.stream(42, "partition").permutation(60), 4)]


# ---------------------------------------------------------------------------------------------- --mask
def test_sensitivity_scores_are_the_summed_squared_per_example_gradients(tiny_llama, tiny_tokenizer):
    """tasks.mask_scores("sensitivity"): sum over examples of the squared gradient of each example's loss at w0,
    checked against torch.func's gradient of a functional call of the model, one example at a time."""
    from torch.func import functional_call, grad

    model = tiny_llama
    batches = [batch_for(tiny_tokenizer, [t]) for t in ["hello world", "abc", "the cat sat"]]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    scores = tasks.mask_scores("sensitivity", [p.detach() for p in params.values()], 0, list(params.values()),
                               batches, lambda b: model(**b).loss)
    frozen = {n: p.detach().clone() for n, p in params.items()}
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in frozen.items()}
    for b in batches:
        g = grad(lambda ps: functional_call(model, ps, args=(), kwargs=b).loss)(frozen)
        for n in expected:
            expected[n] += g[n].double() ** 2
    for s, n in zip(scores, params):
        torch.testing.assert_close(s.double(), expected[n], rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in params.values())  # the model is left as it was


def test_a_mask_travels_as_ascending_global_indices_and_bad_bytes_are_one_line():
    sizes, offsets = [5, 3, 4], [0, 5, 8]
    masks = [torch.tensor([1, 4]), torch.tensor([0]), torch.tensor([2, 3])]
    msg = tasks.encode_mask(masks, offsets, 12)
    assert np.frombuffer(msg, np.uint32).tolist() == [1, 4, 5, 10, 11]
    assert [m.tolist() for m in tasks.decode_mask(msg, offsets, sizes)] == [[1, 4], [0], [2, 3]]
    for bad in (msg[:-1], np.array([4, 1], np.uint32).tobytes(), np.array([12], np.uint32).tobytes(), b""):
        with pytest.raises(ValueError):
            tasks.decode_mask(bad, offsets, sizes)
