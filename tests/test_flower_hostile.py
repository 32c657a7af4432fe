"""A hostile SuperNode in a real local federation (a SuperLink and 2 SuperNodes on 127.0.0.1): node 1 runs fedfull's
ClientApp but corrupts its replies a different way each round (tests/hostile_app: a 400-digit stat, an oversized
upload, pairs stacked on a seed it was not assigned, a reply naming other clients), then answers honestly. The
ServerApp never dies, each bad reply is left out with its reason, and the exported model equals, bit for bit, the
one-process run in which that node's clients (1 and 3) miss exactly those rounds."""
import json
import sys
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
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flags = argv(tiny_dir, dolly, tmp_path / "flower", "-m", "1", "--rounds", "5", "--rouge_samples", "0")
        with LocalFederation(tmp_path / "fed", nodes=2) as fed:
            done = fed.submit("fedkseed", flags, 600, app=Path(__file__).parent / "hostile_app")
            status = fed.last_run()
        assert done.returncode == 0 and status[0] == "finished:completed", done.stdout[-3000:] + done.stderr[-3000:]
        one = run_fk(tiny_dir, dolly, tmp_path / "one", "-m", "1", "--rounds", "5",
                     transport=Dropping({r: (1, 3) for r in (1, 2, 3, 4)}))
    finally:
        torch.set_num_threads(threads)
    metrics = lines(tmp_path / "flower" / "metrics.jsonl")
    assert [m["dropped"] for m in metrics[1:]] == [[1, 3]] * 4 + [[]]
    reasons = {(e["round"], e["client"]): e["dropped"] for e in lines(tmp_path / "flower" / "ledger.jsonl")
               if e.get("dropped")}
    assert set(reasons) == {(r, c) for r in (1, 2, 3, 4) for c in (1, 3)}
    assert all("not all finite numbers" in reasons[1, c] for c in (1, 3))
    assert all("longer than the protocol's" in reasons[2, c] for c in (1, 3))
    assert all("not the draws the protocol assigns" in reasons[3, c] for c in (1, 3))
    assert all(reasons[4, c].startswith("malformed reply") for c in (1, 3))
    assert same_weights(exported(tmp_path / "flower"), exported(one))
