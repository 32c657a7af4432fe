"""A hostile SuperNode in a real local federation (a SuperLink and 2 SuperNodes on 127.0.0.1): node 1 runs fedfull's
ClientApp but corrupts its replies a different way each round (tests/hostile_app: a 400-digit stat, an oversized
upload, pairs stacked on a seed it was not assigned, a reply naming other clients, an error reply with an empty
reason, an infinite stat), then answers honestly; and after round 1 two more SuperNodes join, one claiming the
partition that node 0 serves, one counting 3 partitions where the run has 2. The federation runs in the deployment
mode (run config data-sizes=declared): the server weights clients by what their nodes declared. The ServerApp never
dies, each bad reply is left out with its reason, neither newcomer serves a client, and the exported model equals,
bit for bit, the one-process run in which that node's clients (1 and 3) miss exactly those rounds."""
import json
import sys
import time
from pathlib import Path

import pytest

from test_dropouts import Dropping, exported, run_fk, same_weights
from test_fedkseed import argv, dolly, tiny_dir  # noqa: F401  (fixtures)

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
    out, bad_rounds = tmp_path / "flower", (1, 2, 3, 4, 5, 6)
    metrics = lambda: lines(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []  # noqa: E731
    try:
        flags = argv(tiny_dir, dolly, out, "-m", "1", "--rounds", "7", "--rouge_samples", "0")
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
        one = run_fk(tiny_dir, dolly, tmp_path / "one", "-m", "1", "--rounds", "7",
                     transport=Dropping({r: (1, 3) for r in bad_rounds}))
    finally:
        torch.set_num_threads(threads)
    log = done.stdout + done.stderr
    assert "data sizes declared by the nodes" in log
    assert "claims partition 0, which connected node" in log and "says partition 0 of 3, the run has 2" in log
    assert [m["dropped"] for m in metrics()[1:]] == [[1, 3]] * len(bad_rounds) + [[]]
    reasons = {(e["round"], e["client"]): e["dropped"] for e in lines(out / "ledger.jsonl") if e.get("dropped")}
    assert set(reasons) == {(r, c) for r in bad_rounds for c in (1, 3)}
    assert all("not all finite numbers" in reasons[r, c] for r in (1, 6) for c in (1, 3))
    assert all("longer than the protocol's" in reasons[2, c] for c in (1, 3))
    assert all("not the draws the protocol assigns" in reasons[3, c] for c in (1, 3))
    assert all(reasons[4, c].startswith("malformed reply") for c in (1, 3))
    assert all(reasons[5, c] == "node failed: no reason given" for c in (1, 3))
    assert same_weights(exported(out), exported(one))


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
