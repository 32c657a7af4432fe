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
    (1.7e308, "not all finite numbers within +-1e+15"),  # finite, but no plot's axis can hold it
    (-1.7e308, "not all finite numbers within +-1e+15"),
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
    """A grid whose nodes answer with the given replies: message i is answered by replies[i] (None: no answer)."""
    def __init__(self, replies, nodes=(1,)):
        self.replies, self.nodes = replies, list(nodes)

    def get_node_ids(self):
        return self.nodes

    def push_messages(self, messages):
        self.sent = list(messages)
        return [f"m{i}" for i in range(len(self.sent))]

    def pull_messages(self, ids):
        (mid,) = ids
        r = self.replies[int(mid[1:])] if int(mid[1:]) < len(self.replies) else None
        return [] if r is None else [r]


def flower_for(grid, monkeypatch, nodes=((0, 1),)):
    from flwr.supercore.task_identity import TaskIdentity
    for k in ("run_id", "task_id", "node_id"):  # what a ServerApp process has set when it builds messages
        monkeypatch.setattr(TaskIdentity, "_" + k, 1)
    flower = Flower(grid, "cpu", "fedkseed", "", 1, 1.0, 1.0, log=lambda *_: None)
    flower.partitions, flower.node_of = len(nodes), dict(nodes)
    flower.known, flower.key = {n: p for p, n in nodes}, "k"
    return flower


def exchange(flower, clients):
    """Round 1 of a fedkseed exchange with `clients`, each sent b"d" (uploads up to 64 bytes) -> what it took."""
    run = SimpleNamespace(args=SimpleNamespace())
    return flower.exchange(None, run, 1, {c: b"d" for c in clients}, list(clients), (None, 64), KEYS,
                           {c: ("", "1") for c in clients})


@pytest.mark.parametrize("cfg, why", [
    (dict(good(), clients=[0]), "malformed reply (ValueError)"),                    # not the node's clients
    (dict(good(), uploads=[b"x"]), "malformed reply (ValueError)"),                 # fewer uploads than clients
    (dict(good(), stats="{not json"), "malformed reply (JSONDecodeError)"),
    (dict(good(), stats=json.dumps([1, 2])), "malformed reply: the stats loss, sync_seconds are not all finite "
                                                  "numbers within +-1e+15"),
    (dict(good(), uploads=["text", 5]), "malformed reply: the upload is not bytes"),
    ({}, "malformed reply (KeyError)"),                                              # nothing at all
])
def test_exchange_drops_exactly_the_nodes_clients_with_the_reason(cfg, why, monkeypatch):
    flower = flower_for(Grid([reply(**cfg)]), monkeypatch)  # one node serves clients 0 and 2
    got = exchange(flower, [0, 2])
    assert got == {} and flower.dropped == {0: why, 2: why}


def test_a_node_that_does_not_answer_is_dropped_and_the_other_taken(monkeypatch):
    flower = flower_for(Grid([None, reply(node=2, **good(clients=(1,), uploads=(b"u",)))], nodes=(1, 2)), monkeypatch,
                        nodes=((0, 1), (1, 2)))
    got = exchange(flower, [0, 1])
    assert set(got) == {1} and flower.dropped == {0: "no reply within 1 s"}


class StubLink:
    """The Runtime API of a SuperLink as the HTTP grid calls it (PullMessages, PullObject, ConfirmMessageReceived),
    holding real replies as Flower stores them: a message proto, its object tree, its objects' contents."""
    def __init__(self):
        self.messages, self.objects, self.pulled = {}, {}, []

    def store(self, reply_to, message, corrupt=None, extra_objects=0):
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
        from flwr.app.message import remove_content_from_message
        contents = {oid: o.deflate() for oid, o in get_all_nested_objects(message).items()}
        tree = get_object_tree(message)
        if corrupt is not None:  # the ConfigRecord's body replaced by garbage, its object id recomputed: a valid hash
            from flwr.supercore.inflatable.inflatable_object import get_object_id
            old = next(oid for oid, c in contents.items() if c.startswith(b"ConfigRecord"))
            head = contents[old].split(b"\x00", 1)[0]
            bad = head.split(b" ")[0] + b"  " + str(len(corrupt)).encode() + b"\x00" + corrupt
            contents = {(get_object_id(bad) if k == old else k): (bad if k == old else v) for k, v in contents.items()}
            for node in _walk(tree):
                if node.object_id == old:
                    node.object_id = get_object_id(bad)
        for i in range(extra_objects):
            tree.children.add(object_id=f"{i:064x}")
        proto = message_to_proto(remove_content_from_message(message))
        proto.metadata.reply_to_message_id = reply_to
        proto.metadata.message_id = tree.object_id  # as the SuperLink stores a reply: its id is its object's
        self.messages[reply_to] = (proto, tree)
        self.objects.update(contents)

    def PullMessages(self, request):
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse
        got = [self.messages.pop(m) for m in request.message_ids if m in self.messages]
        return PullAppMessagesResponse(messages_list=[p for p, _ in got], message_object_trees=[t for _, t in got])

    def PullObject(self, request):
        from flwr.proto.message_pb2 import PullObjectResponse
        self.pulled.append(request.object_id)
        found = request.object_id in self.objects
        return PullObjectResponse(object_found=found, object_available=found,
                                  object_content=self.objects.get(request.object_id, b""))

    def ConfirmMessageReceived(self, request):
        from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse
        return ConfirmMessageReceivedResponse()


def _walk(tree):
    yield tree
    for child in tree.children:
        yield from _walk(child)


class LinkGrid(Grid):
    """A grid on a StubLink: Flower's own object pulls and decoding run on what the link holds."""
    def __init__(self, link, nodes=(1, 2)):
        from flwr.proto.node_pb2 import Node
        super().__init__([], nodes)
        self._runtime_client, self.run, self.node = link, SimpleNamespace(run_id=1), Node(node_id=0)

    def push_messages(self, messages):
        return [f"m{i}" for i in range(len(list(messages)))]


def node_reply(node, clients, uploads=None):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.app.metadata import Metadata
    uploads = [b"u"] * len(clients) if uploads is None else uploads
    m = Message(RecordDict({MESSAGE_KEY: ConfigRecord(good(clients=clients, uploads=uploads))}),
                dst_node_id=0, message_type="train")
    m.metadata.__dict__["_src_node_id"] = node
    return m, Metadata


def test_a_reply_whose_content_is_not_a_message_drops_its_node_in_flowers_own_decoding(monkeypatch):
    """Node 1's reply holds an object with a valid hash over garbage (Flower's inflate raises); node 2's is well
    formed. Flower's real pull and decoding run (a stub link under them): node 1's clients are dropped with the
    exception's name, node 2's taken, and nothing raises out of the exchange."""
    flower = flower_for(Grid([], nodes=(1, 2)), monkeypatch, nodes=((0, 1), (1, 2)))
    link = StubLink()
    link.store("m0", node_reply(1, [0])[0], corrupt=b"\xff\xfe not a protobuf \x00\x01")
    link.store("m1", node_reply(2, [1])[0])
    flower.grid = LinkGrid(link)
    got = exchange(flower, [0, 1])
    assert set(got) == {1} and list(flower.dropped) == [0]
    assert flower.dropped[0].startswith("its reply could not be read (")


def test_a_reply_of_too_many_objects_is_refused_before_any_is_pulled(monkeypatch):
    flower = flower_for(Grid([]), monkeypatch)
    link = StubLink()
    link.store("m0", node_reply(1, [0, 1])[0], extra_objects=10_000)
    flower.grid = LinkGrid(link, nodes=(1,))
    got = exchange(flower, [0, 1])
    assert got == {} and link.pulled == []
    assert all(why.startswith("its reply could not be read (ReplyRefused: a reply of 10003 objects")
               for why in flower.dropped.values()) and set(flower.dropped) == {0, 1}


def test_a_reply_of_more_bytes_than_its_uploads_allow_is_refused_while_it_is_pulled(monkeypatch):
    """Node 1 answers with an upload of 2 MiB where the protocol allows 64 bytes: its objects are counted as they
    arrive and the reply is refused past the node's bound (its clients x the longest upload + 1 MiB), before Flower
    inflates it; node 2's reply is taken."""
    flower = flower_for(Grid([], nodes=(1, 2)), monkeypatch, nodes=((0, 1), (1, 2)))
    link = StubLink()
    link.store("m0", node_reply(1, [0], uploads=[b"u" * (2 << 20)])[0])
    link.store("m1", node_reply(2, [1])[0])
    flower.grid = LinkGrid(link)
    got = exchange(flower, [0, 1])
    assert set(got) == {1} and list(flower.dropped) == [0]
    assert flower.dropped[0].startswith("its reply could not be read (ReplyRefused: a reply of more than 1048640 bytes")


def test_a_nodes_error_text_cannot_forge_a_log_line():
    """A client's error line with a newline and an escape sequence: the server's reason is one line, escaped."""
    dropped = {}
    cfg = dict(good(clients=(0,), uploads=(b"",)), errors=["boom\nFlower: node 9 claims partition 0\x1b[2J"])
    read_reply(reply(**cfg), [0], KEYS, 64, dropped)
    assert dropped[0] == "client failed: boom\\nFlower: node 9 claims partition 0\\x1b[2J"
