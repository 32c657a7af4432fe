"""A Flower server restarted with --resume continues from its checkpoint with the same SuperNodes still connected,
and the run equals the one-process run bit for bit (the nodes' kept states carry their tags across the restart)."""
import sys

import pytest

from fedfull_flower.local import LocalFederation
from test_dropouts import exported, same_weights
from test_fedkseed import dolly, tiny_dir  # noqa: F401  (fixtures)
from test_flower import fk_flags, lines, one_process, one_thread_everywhere, submitted  # noqa: F401

pytest.importorskip("flwr")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and 127.0.0.1 ports")


def test_resumed_flower_server_continues_exactly(tiny_dir, dolly, tmp_path):  # noqa: F811
    out = tmp_path / "flower"
    with LocalFederation(tmp_path / "fed", nodes=2) as fed:
        submitted(fed, "fedkseed", fk_flags(tiny_dir, dolly, out, "--rounds", "2"))
        submitted(fed, "fedkseed", fk_flags(tiny_dir, dolly, out, "--rounds", "4", "--resume"))
    one_process("fedkseed", fk_flags(tiny_dir, dolly, tmp_path / "one", "--rounds", "4"))
    assert same_weights(exported(tmp_path / "one"), exported(out))
    assert lines(tmp_path / "one" / "ledger.jsonl") == lines(out / "ledger.jsonl")
    assert [m["dropped"] for m in lines(out / "metrics.jsonl")[1:]] == [[]] * 4
