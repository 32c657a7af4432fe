"""Clients that drop out and hostile uploads, in one process: the server goes on without them, stays exact, and its
robust aggregation (FedKSeed's --g_bound by default, and --max_abs_g; FedAvg's and FedCyBGD's --tensor_bound and
--max_change) bounds what a Byzantine client can do. tests/test_flower.py runs the same over Flower."""
import json

import numpy as np
import pytest
import torch

import fedcybgd as cy
import fedkseed as fk
import tasks
from test_fedcybgd import tiny_argv, tiny_run_files  # noqa: F401  (a fixture)
from test_fedkseed import argv, dolly, tiny_dir  # noqa: F401  (fixtures)


class Dropping(tasks.Transport):
    """One process, but the clients in drops[round] do not answer (their work is done and thrown away, as when a
    node fails after computing): what a Flower run with those drop-outs must equal."""

    def __init__(self, drops):
        super().__init__("cpu")
        self.drops = drops

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        got = super().exchange(fn, run, rnd, sent, clients, widths, keys, tags)
        self.dropped = {c: "no reply" for c in self.drops.get(rnd, ()) if c in clients}
        return {c: v for c, v in got.items() if c not in self.dropped}

    def from_client(self, client, keys, fn, run, rnd, download, tag=None, longest=None):
        got = super().from_client(client, keys, fn, run, rnd, download, tag, longest)
        return (None, {"dropped": "no reply"}) if client in self.drops.get(rnd, ()) else got


def exported(out):
    from safetensors.torch import load_file
    return load_file(out / "model" / "model.safetensors")


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rows(out, name="metrics.jsonl"):
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def corrupt(monkeypatch, module, name, client, how):
    """Client `client`'s upload replaced by how(upload bytes) in every round."""
    real = getattr(module, name)

    def hostile(run, rnd, c, download):
        up, stats = real(run, rnd, c, download)
        return (how(up) if c == client else up), stats

    monkeypatch.setattr(module, name, hostile)


def run_fk(tiny_dir, dolly, out, *extra, transport=None):  # noqa: F811
    fk.train(fk.parse_args(argv(tiny_dir, dolly, out, "--rounds", "3", "-m", "0.75", "--rouge_samples", "0", *extra)),
             transport)
    return out


def test_dropped_client_syncs_exactly_when_it_comes_back(tiny_dir, dolly, tmp_path):  # noqa: F811
    """Clients 1 and 2 (sampled in rounds 1-3) drop out of round 1: the round goes on with the others, the drop is in
    the metrics and ledger, and their next download is dense (the server no longer knows their record), so the
    run's global model equals w0 + sum_k A_k z_k rebuilt from the checkpoint -- and replays stay bit for bit."""
    out = run_fk(tiny_dir, dolly, tmp_path / "a", transport=Dropping({1: (1, 2)}))
    metrics = rows(out)
    assert metrics[1]["dropped"] == [1, 2] and metrics[2]["dropped"] == [] and metrics[3]["replay_max_abs_diff"] == 0
    ledger = rows(out, "ledger.jsonl")
    assert [e["client"] for e in ledger if e.get("dropped")] == [1, 2]
    K = 16
    for e in ledger:  # after its drop, a client's next download is dense A (1 + 4 K bytes)
        if e["round"] > 1 and e["client"] in (1, 2) and e["round"] == min(
                x["round"] for x in ledger if x["client"] == e["client"] and x["round"] > 1):
            assert e["download_bytes"] == 1 + 4 * K
    honest = run_fk(tiny_dir, dolly, tmp_path / "b")
    assert not same_weights(exported(out), exported(honest))  # the drop changed the run


BAD = {"truncated": lambda up: up[:-3],
       "seed_index_out_of_range": lambda up: up[:4] + np.full((len(up) - 4) // 6, 999, np.uint16).tobytes()
       + up[4 + 2 * ((len(up) - 4) // 6):],
       "nan": lambda up: up[:-4] + np.float32(np.nan).tobytes(),
       "wrong_data_size": lambda up: np.uint32(10**6).tobytes() + up[4:]}


@pytest.mark.parametrize("how", BAD, ids=list(BAD))
def test_bad_fedkseed_upload_is_left_out(tiny_dir, dolly, tmp_path, monkeypatch, how):  # noqa: F811
    """Client 1 sends a malformed upload every round: the server logs it, leaves the client out and goes on; the
    model equals the run in which client 1 never answers."""
    corrupt(monkeypatch, fk, "client_round", 1, BAD[how])
    bad = run_fk(tiny_dir, dolly, tmp_path / "bad")
    monkeypatch.undo()
    sampled = {r: tasks.sample_clients(42, r, 4, 3) for r in (1, 2, 3)}
    silent = run_fk(tiny_dir, dolly, tmp_path / "silent",
                    transport=Dropping({r: [1] for r, s in sampled.items() if 1 in s}))
    assert same_weights(exported(bad), exported(silent))
    reasons = [e["dropped"] for e in rows(bad, "ledger.jsonl") if "dropped" in e]
    assert reasons and all(r.startswith("bad upload:") for r in reasons)


def test_byzantine_client_is_bounded_by_default_and_by_max_abs_g(tiny_dir, dolly, tmp_path, monkeypatch):  # noqa: F811
    """Client 1 (1 of the 3 clients a round) uploads g = 1e30 for every pair. With the robust bound off (--g_bound 0)
    the model is wrecked: weights of 1e20 and more, the held-out loss at the uniform predictor's ln(vocabulary). With
    the default (--g_bound 10: every scalar within 10x the median |g|) the weights stay within 2x the honest run's
    largest and the held-out loss within 5% of its; with --max_abs_g 10 instead (honest |g| reach 8.7 here) within 2%.
    (The tiny model's ZO steps move its weights by tens of percent each, so the weights themselves are not compared.)"""
    honest = run_fk(tiny_dir, dolly, tmp_path / "honest", "--g_bound", "0")

    def byzantine(up):
        n = (len(up) - 4) // 6
        return up[:4 + 2 * n] + np.full(n, 1e30, np.float32).tobytes()

    corrupt(monkeypatch, fk, "client_round", 1, byzantine)
    attacked = run_fk(tiny_dir, dolly, tmp_path / "attacked", "--g_bound", "0")
    default = run_fk(tiny_dir, dolly, tmp_path / "default")
    capped = run_fk(tiny_dir, dolly, tmp_path / "capped", "--g_bound", "0", "--max_abs_g", "10")
    loss = lambda out: rows(out)[-1]["eval_loss"]  # noqa: E731
    largest = lambda out: max(float(t.abs().max()) for t in exported(out).values())  # noqa: E731
    assert largest(attacked) > 1e20 and abs(loss(attacked) - np.log(104)) < 1e-3  # uniform over the vocabulary
    assert largest(default) < 2 * largest(honest) and abs(loss(default) - loss(honest)) < 0.05 * loss(honest)
    assert largest(capped) < 2 * largest(honest) and abs(loss(capped) - loss(honest)) < 0.02 * loss(honest)


def test_server_aggregate_clips_by_hand():
    """--max_abs_g clips each scalar before the weighted sum: a by-hand example."""
    K = 4
    ups = [fk.encode_upload(1, [0, 1], [1e30, -0.5], K), fk.encode_upload(3, [1, 2], [2.0, -7.0], K)]
    got = fk.server_aggregate(ups, [1, 3], K, 0.1, bound=3.0)
    want = -0.1 * np.array([0.25 * 3.0, 0.25 * -0.5 + 0.75 * 2.0, 0.75 * -3.0, 0.0])
    assert np.array_equal(got, want.astype(np.float32))


def test_check_upload_reasons():
    K = 16
    good = fk.encode_upload(7, [3, 5], [0.5, -1.0], K)
    assert fk.check_upload(good, K, 2, 1, 7) is None
    assert "bytes" in fk.check_upload(good[:-1], K, 2, 1, 7)
    assert "at most" in fk.check_upload(good, K, 1, 1, 7)
    assert "data size" in fk.check_upload(good, K, 2, 1, 8)
    assert "out of range" in fk.check_upload(fk.encode_upload(7, [3, 16], [0.5, 1.0], K), K, 2, 1, 7)
    assert "not finite" in fk.check_upload(fk.encode_upload(7, [3, 5], [np.inf, 1.0], K), K, 2, 1, 7)


def test_check_tensors_reasons():
    """tasks.check_tensors, which fedcybgd's and fedavg's check_upload call: one reason per kind of bad upload."""
    ref = {"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    good = {"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    why, got = tasks.check_tensors(tasks.pack(good), ["b", "a"], ref)
    assert why is None and all(torch.equal(got[k], good[k]) for k in good)
    cases = {b"\x00" * 20: "not a safetensors message",
             tasks.pack({"a": good["a"]}): "tensors [] not asked for, ['b'] missing",
             tasks.pack({**good, "c": torch.ones(1)}): "tensors ['c'] not asked for, [] missing",
             tasks.pack({**good, "a": torch.ones(3, 2)}): "a is (3, 2) torch.float32, expected (2, 3) torch.float32",
             tasks.pack({**good, "b": torch.ones(4)}): "b is (4,) torch.float32, expected (4,) torch.bfloat16",
             tasks.pack({**good, "a": torch.tensor([[1.0, 2, 3], [4, float("inf"), 6]])}): "a holds a value that is"}
    for wire, reason in cases.items():
        why, got = tasks.check_tensors(wire, ["a", "b"], ref)
        assert why.startswith(reason) and got is None, (why, reason)


def test_an_upload_that_moves_the_weights_too_far_is_refused():
    """--max_change r (fedcybgd, fedavg): ||upload - sent|| / ||sent|| over the upload's tensors, written out here in
    Python floats; a finite block of 1e30 is refused, an honest step passes, and r = 0 turns the check off."""
    ref = {"a": torch.full((2, 3), 0.5), "b": torch.full((4,), -1.0)}
    step = {"a": ref["a"] + 0.01, "b": ref["b"] - 0.02}
    size = (6 * 0.5 ** 2 + 4 * 1.0 ** 2) ** 0.5
    change = (6 * 0.01 ** 2 + 4 * 0.02 ** 2) ** 0.5 / size
    assert abs(tasks.relative_change(step, ref) - change) < 1e-7  # float32 steps: 0.01 is not exact
    assert tasks.check_tensors(tasks.pack(step), ["a", "b"], ref, max_change=1.0)[0] is None
    huge = {"a": torch.full((2, 3), 1e30), "b": ref["b"]}
    why, got = tasks.check_tensors(tasks.pack(huge), ["a", "b"], ref, max_change=1.0)
    assert got is None and why.startswith("it changes the weights it was sent by 1.04e+30 of their norm, more than 1")
    assert tasks.check_tensors(tasks.pack(huge), ["a", "b"], ref, max_change=0.0)[0] is None  # off


def wrong_shape(up):
    tensors = tasks.unpack(up)
    name = next(iter(tensors))
    tensors[name] = torch.zeros(3, 3)
    return tasks.pack(tensors)


def foreign_tensor(up):
    tensors = tasks.unpack(up)
    tensors["model.embed_tokens.weight"] = torch.zeros(1)
    return tasks.pack(tensors)


CY_BAD = {"wrong_block_shape": wrong_shape, "foreign_tensor": foreign_tensor, "garbage": lambda up: b"\x00" * 20,
          "nan": lambda up: tasks.pack({k: torch.full_like(v, float("nan")) for k, v in tasks.unpack(up).items()}),
          "block_1e30": lambda up: tasks.pack({k: torch.full_like(v, 1e30) for k, v in tasks.unpack(up).items()}),
          "all_zero": lambda up: tasks.pack({k: torch.zeros_like(v) for k, v in tasks.unpack(up).items()})}


@pytest.mark.parametrize("how", CY_BAD, ids=list(CY_BAD))
def test_bad_fedcybgd_upload_loses_its_turn(tiny_run_files, tmp_path, monkeypatch, how):  # noqa: F811
    """Client 1's upload is malformed every round: its turn is lost (logged, in the ledger), the cycle goes on, and
    the model equals the run in which client 1 never answers; its next download treats it as pretrained."""
    flags = lambda out: tiny_argv(tiny_run_files, out, "--num_clients", "3", "--rounds", "2", "--device", "cpu",  # noqa: E731
                                  "--download", "delta")
    corrupt(monkeypatch, cy, "client_round", 1, CY_BAD[how])
    cy.main(flags(tmp_path / "bad"))
    monkeypatch.undo()
    cy.train(cy.parse_args(flags(tmp_path / "silent")), Dropping({1: [1], 2: [1]}))
    a, b = (cy_weights(tmp_path / d) for d in ("bad", "silent"))
    assert same_weights(a, b)
    turns = [e for e in rows(tmp_path / "bad", "ledger.jsonl") if "turn" in e]
    assert [e["client"] for e in turns if "dropped" in e] == [1, 1]
    assert all(e["dropped"].startswith(("not a safetensors", "tensors", "model.", "lm_head", "head",
                                        "it changes the weights it was sent by"))
               or "not finite" in e["dropped"] or " is (" in e["dropped"] for e in turns if "dropped" in e)
    metrics = rows(tmp_path / "bad")
    assert metrics[1]["dropped"] == [1] and metrics[2]["dropped"] == [1]


def cy_weights(out):
    saved = tasks.checkpoint.read(out)
    return {k: v for k, v in saved.items() if k not in ("round", "script", "config", "state")}


@pytest.mark.parametrize("how", ["wrong_shape", "nan", "block_1e30", "all_zero"])
def test_bad_fedavg_upload_is_left_out_of_the_average(tmp_path, monkeypatch, how):
    """FedAvg/FedIT: client 1's malformed upload is left out of the average; the model equals the run in which
    client 1 never answers."""
    import fedavg as fa
    from test_fedavg import argv as fa_argv
    from conftest import make_tiny_llama, make_tiny_tokenizer
    from test_fedkseed import write_dolly
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    files = (tmp_path / "model", write_dolly(tmp_path / "dolly.jsonl"))
    flags = lambda out: fa_argv(files, out, "--rounds", "2", "-m", "1", "--method", "lora")  # noqa: E731
    corrupt(monkeypatch, fa, "client_round", 1, {"wrong_shape": wrong_shape, **CY_BAD}[how])
    fa.main(flags(tmp_path / "bad"))
    monkeypatch.undo()
    fa.train(fa.parse_args(flags(tmp_path / "silent")), Dropping({1: [1], 2: [1]}))
    assert same_weights(exported(tmp_path / "bad"), exported(tmp_path / "silent"))
    assert [m["dropped"] for m in rows(tmp_path / "bad")[1:]] == [[1], [1]]


def test_tensor_bound_scales_each_tensor_to_c_times_the_pooled_median():
    """--tensor_bound c (tasks.bound_uploads), written out here in numpy: each tensor's change size is its RMS change
    per element; the pool is the window's sizes and this round's; a tensor above c x the pool's lower median is scaled to
    it along its change, one within it kept bit for bit; the window keeps this round's sizes capped at the limit."""
    ref = {"a": torch.zeros(4), "b": torch.ones(9)}
    ups = [{"a": torch.tensor([0.1, -0.1, 0.1, -0.1]), "b": torch.ones(9) + 0.2},
           {"a": torch.full((4,), 50.0), "b": torch.ones(9) - 0.1}]
    recent = [[0.1, 0.3], [0.2]]
    got, scaled, window = tasks.bound_uploads(ups, ref, recent, 2.0, 1)
    size = lambda t, r: float(np.sqrt(np.mean((t.double().numpy() - r.double().numpy()) ** 2)))  # noqa: E731
    sizes = [[size(u[n], ref[n]) for n in ("a", "b")] for u in ups]
    pool = sorted([0.1, 0.3, 0.2] + [x for s_ in sizes for x in s_])
    limit = 2.0 * pool[(len(pool) - 1) // 2]  # the lower median
    for u, g, s_ in zip(ups, got, sizes):
        for n, x in zip(("a", "b"), s_):
            want = u[n] if x <= limit else (ref[n].double() + (u[n].double() - ref[n].double()) * limit / x).float()
            assert torch.equal(g[n], want)
    assert scaled == [sum(x > limit for x in s_) for s_ in sizes] == [0, 1]
    assert window == [[0.2], [min(x, limit) for s_ in sizes for x in s_]]  # window 1: this round and the last


def test_half_the_scalars_at_1e30_leave_the_bound_at_an_honest_value():
    """FedKSeed's --g_bound with 2 of 4 clients uploading g = 1e30: the lower median of the pooled |scalars| is the
    largest honest one, so each 1e30 becomes 10x it (numpy's median, the mean of the two middle values, would be
    5e29: no bound at all)."""
    honest = [np.array([0.5, -2.0, 1.0], np.float32), np.array([3.0, -0.25, 1.5], np.float32)]
    hostile = [np.full(3, 1e30, np.float32)] * 2
    bound, _, clipped = tasks.scalar_bound([], honest + hostile, 10.0, 10)
    assert bound == 10 * 3.0 and clipped == 6
    assert float(np.median(np.abs(np.concatenate(honest + hostile)))) > 4e29  # the mean of the middle two: no bound


def test_a_median_of_zero_bounds_every_scalar_to_zero_and_lifts_nothing():
    """FedKSeed's --g_bound: clients uploading zeros that make the pooled median 0 bound every scalar to (nearly) 0,
    the huge ones included; no bound at all only when the factor is 0."""
    scalars = [np.zeros(6, np.float32), np.zeros(6, np.float32), np.full(3, 1e30, np.float32)]
    bound, recent, clipped = tasks.scalar_bound([], scalars, 10.0, 10)
    assert 0 < bound < 1e-37 and clipped == 3 and len(recent) == 1
    a = fk.server_aggregate([fk.encode_upload(1, [0, 1, 2], s[:3], 4) for s in scalars], [1, 1, 1], 4, 1.0, bound)
    assert np.abs(a).max() < 1e-38  # the 1e30 scalars moved A by at most a third of the bound
    assert tasks.scalar_bound([], scalars, 0.0, 10)[0] == 0.0  # off


def test_a_flipped_final_norm_is_bounded_per_tensor(tmp_path, monkeypatch):
    """FedAvg full, 3 clients, all sampled, 2 rounds, --max_change 0 (off, to see --tensor_bound alone): client 1
    flips the sign of the final norm's weights in its upload. --tensor_bound (on by default) scales that tensor's change
    down to 10x the median change size of the pooled tensors (ledger `bounded`), so the averaged norm stays within a
    tenth of the distance the flip moves it with --tensor_bound 0."""
    import fedavg as fa
    from test_fedavg import argv as fa_argv
    from conftest import make_tiny_llama, make_tiny_tokenizer
    from test_fedkseed import write_dolly
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    files = (tmp_path / "model", write_dolly(tmp_path / "dolly.jsonl"))
    flags = lambda out, *x: fa_argv(files, out, "--rounds", "2", "-m", "1", "--num_clients", "3",  # noqa: E731
                                    "--max_change", "0", *x)
    name = "model.norm.weight"

    def flip(up):
        t = tasks.unpack(up)
        return tasks.pack({**t, name: -t[name]})

    fa.main(flags(tmp_path / "honest"))
    corrupt(monkeypatch, fa, "client_round", 1, flip)
    fa.main(flags(tmp_path / "bad"))
    fa.main(flags(tmp_path / "unbounded", "--tensor_bound", "0"))
    turns = [e for e in rows(tmp_path / "bad", "ledger.jsonl") if e.get("client") == 1 and "loss" in e]
    assert len(turns) == 2 and all(e["bounded"] >= 1 for e in turns)
    honest, bad, unbounded = (exported(tmp_path / d)[name] for d in ("honest", "bad", "unbounded"))
    assert (bad - honest).abs().max() < 0.1 * (unbounded - honest).abs().min()
