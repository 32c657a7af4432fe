"""The Flower server's reading of a node's reply (fedfull_flower.transport.read_reply): every malformed or hostile
shape drops that node's clients with a reason, and nothing raises out of `Flower.exchange`. No processes: the
replies are built here as a ClientApp (or an attacker's ClientApp) would send them."""
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")
from fedfull_flower.transport import MESSAGE_KEY, Flower, read_reply  # noqa: E402

KEYS = ("loss", "sync_seconds")


def reply(node=1, error=None, **cfg):
    """A reply as Flower hands it to the server: metadata, has_error(), error.reason, content[MESSAGE_KEY]."""
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: error is not None,
                           error=error, content={MESSAGE_KEY: cfg})


def good(clients=(0, 2), uploads=(b"\x01" * 10, b"\x02" * 10), stats=None):
    stats = stats if stats is not None else [{"loss": 1.5, "sync_seconds": 0.1}] * len(clients)
    return dict(clients=list(clients), uploads=list(uploads), errors=[""] * len(clients), stats=json.dumps(stats))


def test_a_well_formed_reply_is_taken():
    dropped = {}
    got = read_reply(reply(**good()), [0, 2], KEYS, 64, dropped)
    assert got == {0: (b"\x01" * 10, {"loss": 1.5, "sync_seconds": 0.1}),
                   2: (b"\x02" * 10, {"loss": 1.5, "sync_seconds": 0.1})} and dropped == {}


@pytest.mark.parametrize("stat, words", [
    (10 ** 400, "not all finite numbers"),          # valid JSON; float() of it overflows
    (float("inf"), "not all finite numbers"),       # json.dumps writes Infinity, json.loads reads it back
    (float("nan"), "not all finite numbers"),
    ("1.5", "not all finite numbers"),
    (True, "not all finite numbers"),
    (None, "not all finite numbers"),
])
def test_a_stat_that_is_not_a_finite_number_drops_the_client(stat, words):
    dropped = {}
    stats = [{"loss": stat, "sync_seconds": 0.1}, {"loss": 1.0, "sync_seconds": 0.1}]
    got = read_reply(reply(**good(stats=stats)), [0, 2], KEYS, 64, dropped)
    assert list(got) == [2] and words in dropped[0]


def test_an_upload_longer_than_the_protocol_allows_is_refused_before_use():
    dropped = {}
    got = read_reply(reply(**good(uploads=(b"\x00" * 65, b"\x00" * 64))), [0, 2], KEYS, 64, dropped)
    assert list(got) == [2] and dropped[0] == "upload of 65 bytes, longer than the protocol's 64"


@pytest.mark.parametrize("error", [SimpleNamespace(reason=""), SimpleNamespace(reason=None), SimpleNamespace(),
                                   SimpleNamespace(reason="Traceback ...\n  ...\nValueError: boom")])
def test_an_error_reply_of_any_shape_drops_the_node_with_a_line(error):
    dropped = {}
    assert read_reply(reply(error=error), [0, 2], KEYS, 64, dropped) == {}
    assert set(dropped) == {0, 2} and all(v.startswith("node failed: ") for v in dropped.values())
    if getattr(error, "reason", None):
        assert dropped[0] == "node failed: ValueError: boom"


class Grid:
    """A grid whose nodes answer with the given replies."""
    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [1]

    def send_and_receive(self, messages, timeout):
        return self.replies


@pytest.mark.parametrize("cfg", [
    dict(good(), clients=[0]),                      # not the node's clients
    dict(good(), uploads=[b"x"]),                   # fewer uploads than clients
    dict(good(), stats="{not json"),
    dict(good(), stats=json.dumps([1, 2])),         # stats that are not dicts
    dict(good(), uploads=["text", 5]),              # uploads that are not bytes
    {},                                              # nothing at all
])
def test_exchange_never_raises_on_a_hostile_reply(cfg, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for k in ("run_id", "task_id", "node_id"):  # what a ServerApp process has set when it builds messages
        monkeypatch.setattr(TaskIdentity, "_" + k, 1)
    flower = Flower(Grid([reply(**cfg)]), "cpu", "fedkseed", "", 1, 1.0, 1.0, log=lambda *_: None)
    flower.partitions, flower.node_of, flower.known, flower.key = 1, {0: 1}, {1: 0}, "k"
    run = SimpleNamespace(args=SimpleNamespace())
    got = flower.exchange(None, run, 1, {0: b"d", 2: b"d"}, [0, 2], (None, 64), KEYS, {0: ("", "1"), 2: ("", "1")})
    assert got == {} or set(got) <= {0, 2}
    assert set(flower.dropped) | set(got) == {0, 2}
    assert all(isinstance(v, str) and v for v in flower.dropped.values())
