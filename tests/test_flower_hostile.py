"""A hostile SuperNode in a real local federation (a SuperLink and 2 SuperNodes on 127.0.0.1): node 1 runs fedfull's
ClientApp but corrupts its replies a different way each round (tests/hostile_app: a 400-digit stat, an oversized
upload, pairs stacked on a seed it was not assigned, a reply naming other clients, an error reply with an empty
reason, an infinite stat, every scalar 0, stats of +-1.7e308), then answers honestly; and after round 1 two more
SuperNodes join, one claiming the partition that node 0 serves, one counting 3 partitions where the run has 2. The
federation runs in the deployment mode (run config data-sizes=declared), where the hostile node declares 10^9
examples a client and, with no cap set, every client weighs 1. The ServerApp never dies, each bad reply is left out
with its reason, the zero upload is taken (well-formed) and bounded, neither newcomer serves a client, the exported
model equals, bit for bit, the one-process run in which that node's clients (1 and 3) miss exactly those rounds and
upload zeros in round 7, and its held-out loss is within 1% of the honest run's."""
import json
import sys
import time
from pathlib import Path

import pytest

from test_dropouts import Dropping, exported, run_fk, same_weights
from test_fedkseed import argv, dolly, tiny_dir, write_dolly  # noqa: F401  (fixtures)

pytest.importorskip("flwr")
from fedfull_flower.local import LocalFederation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and 127.0.0.1 ports")


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_hostile_node_is_left_out_round_after_round_and_the_rest_stays_exact(tiny_dir, dolly, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same threads in every process: the same floating-point sums
    import threading

    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out, bad_rounds = tmp_path / "flower", (1, 2, 3, 4, 5, 6, 8)
    # 32 training examples, 8 a client: the deployment mode's equal weights are then the partitions' sizes, so the
    # one-process run (weighted by its partitions) is the same computation
    dolly = write_dolly(tmp_path / "dolly.jsonl", n=42)
    metrics = lambda: lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []  # noqa: E731
    try:
        flags = argv(tiny_dir, dolly, out, "-m", "1", "--rounds", "9", "--rouge_samples", "0")
        with LocalFederation(tmp_path / "fed", nodes=2) as fed:
            result = {}
            runner = threading.Thread(target=lambda: result.update(done=fed.submit(
                "fedkseed", flags, 600, app=Path(__file__).parent / "hostile_app", **{"data-sizes": "declared"})))
            runner.start()
            t = time.time()
            while len(metrics()) < 2 and runner.is_alive() and time.time() - t < 300:
                time.sleep(0.2)
            fed.start_node(0, name="thief")  # claims partition 0, which node 0 serves
            fed.start_node(0, name="counter", partitions=3)  # counts 3 partitions
            runner.join(600)
            assert not runner.is_alive()
            done, status = result["done"], fed.last_run()
        assert done.returncode == 0 and status[0] == "finished:completed", done.stdout[-3000:] + done.stderr[-3000:]
        one = run_fk(tiny_dir, dolly, tmp_path / "one", "-m", "1", "--rounds", "9",
                     transport=Zeroing({r: (1, 3) for r in bad_rounds}))
        honest = run_fk(tiny_dir, dolly, tmp_path / "honest", "-m", "1", "--rounds", "9")
    finally:
        torch.set_num_threads(threads)
    log = done.stdout + done.stderr
    assert "data sizes equal: every client weighs 1, whatever its node declares" in log
    assert "claims partition 0, which connected node" in log and "says partition 0 of 3, the run has 2" in log
    assert [m["dropped"] for m in metrics()[1:]] == [[1, 3]] * 6 + [[], [1, 3], []]
    reasons = {(e["round"], e["client"]): e["dropped"] for e in lines(out / "ledger.jsonl") if e.get("dropped")}
    assert set(reasons) == {(r, c) for r in bad_rounds for c in (1, 3)}
    assert all("not all finite numbers" in reasons[r, c] for r in (1, 6, 8) for c in (1, 3))
    assert all("a reply of more than" in reasons[2, c] for c in (1, 3))  # refused while it was pulled
    assert all("not the draws the protocol assigns" in reasons[3, c] for c in (1, 3))
    assert all(reasons[4, c].startswith("malformed reply") for c in (1, 3))
    assert all(reasons[5, c] == "node failed: no reason given" for c in (1, 3))
    assert same_weights(exported(out), exported(one))
    last, honest_last = metrics()[-1]["eval_loss"], lines(tmp_path / "honest" / "metrics.jsonl")[-1]["eval_loss"]
    assert abs(last - honest_last) <= 0.01 * honest_last, (last, honest_last)


class Zeroing(Dropping):
    """One process: the clients of drops[round] do not answer, and clients 1 and 3 upload every scalar 0 in round 7."""

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        import fedkseed as fk
        import numpy as np
        got = super().exchange(fn, run, rnd, sent, clients, widths, keys, tags)
        for c in ((1, 3) if rnd == 7 else ()):
            n, idx, g = fk.decode_upload(got[c][0], run.args.K)
            got[c] = (fk.encode_upload(n, idx, np.zeros(len(g)), run.args.K), got[c][1])
        return got


def test_a_hostile_node_sending_a_1e30_block_is_refused_and_the_rest_stays_exact(tiny_dir, dolly, tmp_path,  # noqa: F811
                                                                                monkeypatch):
    """FedIT (FedAvg + LoRA) on 2 SuperNodes, 4 clients, all sampled, 2 rounds: in round 1 node 1 uploads its
    clients' adapters filled with 1e30 (finite, well-formed). --max_change refuses them; the exported model equals
    the one-process run in which clients 1 and 3 miss round 1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import fedavg as fa
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    flags = lambda out: [*argv(tiny_dir, dolly, out)[:6], "--num_clients", "4", "-m", "1", "--local_steps", "2",  # noqa: E731
                         "--batch_size", "2", "--max_length", "48", "--iid", "iid", "--eval_samples", "3",
                         "--max_new_tokens", "2", "--lr", "3e-3", "--device", "cpu", "--method", "lora",
                         "--rounds", "2"]
    try:
        with LocalFederation(tmp_path / "fed", nodes=2) as fed:
            done = fed.submit("fedavg", flags(tmp_path / "flower"), 600, app=Path(__file__).parent / "hostile_app")
            status = fed.last_run()
        assert done.returncode == 0 and status[0] == "finished:completed", done.stdout[-3000:] + done.stderr[-3000:]
        fa.train(fa.parse_args(flags(tmp_path / "one")), Dropping({1: (1, 3)}))
    finally:
        torch.set_num_threads(threads)
    reasons = {(e["round"], e["client"]): e["dropped"] for e in lines(tmp_path / "flower" / "ledger.jsonl")
               if e.get("dropped")}
    assert set(reasons) == {(1, 1), (1, 3)}
    assert all(r.startswith("it changes the weights it was sent by") for r in reasons.values()), reasons
    assert same_weights(exported(tmp_path / "flower"), exported(tmp_path / "one"))
