"""Flower: the scripts' round loops over a real federation (flwr 1.42): the server side, a transport.

A Flower federation is a SuperLink (the server's machine) and one SuperNode per client machine. `flwr run flower`
starts our ServerApp on the SuperLink, which runs the script's own round loop (`train`) with the transport below;
every client lives on a SuperNode and does its work in our ClientApp (node.py), which calls the script's own
per-client function (`client_round`). Nothing else differs from one
process: the same flags (the script's `parse_args`, from the run config's `argv`), the same messages, the same bytes.

    server side   Flower(grid, device, nodes, round_timeout, node_timeout)   # a tasks.Transport
    node side     node.handle(message, context)                              # the ClientApp's train function

Who lives where. Each SuperNode is started with `--node-config 'partition-id=p num-partitions=P'`; client c lives
on the node of partition c % P (several clients a node, like torchrun's ranks), which keeps what a device keeps
for it in its `state-dir` (node config; default ~/.cache/fedfull/flower-state): FedKSeed a client's record of A
(K float32), FedCyBGD the weights the client holds. Flower starts a fresh ClientApp process for every message, so
a node loads the model and the data (its own path: node config `data-path`, `model`) once per round.

Exactness across drop-outs. Every message says what the server assumes each client holds (a tag: FedKSeed the
round of A it synced to, FedCyBGD its block versions; "" = the initial state), and what it will hold after this
message; the node stores the tag beside the state and refuses a client whose stored tag is not the assumed one.
A client that is offline, does not answer within `round-timeout`, fails or sends a malformed reply is left out of
the round (`dropped`, in the metrics and the ledger); the script then stops assuming anything of it -- FedKSeed
sends it a dense A next time, FedCyBGD treats it as pretrained --, so when it comes back it syncs bit for bit.
"""
import hashlib
import json
import math
import os
import shlex
import time

import tasks
from tasks import ConfigError, Transport
from tasks.checkpoint import RESUME_FREE  # the flags that leave the weights, and so a client's state, alone

SCRIPTS = ("fedkseed", "fedcybgd", "fedavg")  # each defines client_round (a client's work) and train (the loop)
MESSAGE_KEY = "fedfull"
MAX_REPLY_OBJECTS = 16  # a ClientApp's reply is a Message, its RecordDict and one ConfigRecord: 3 objects
QUERY_BYTES = 1 << 20  # the longest answer to the partition query (a node's client ids and sizes)
STAT_BOUND = 1e15  # a stat a node reports (a loss, seconds, bytes) is taken only within +-this: it enters the metrics


def script_module(name):
    """The script a message names: only the scripts that speak this protocol, never an arbitrary module."""
    import importlib
    if name not in SCRIPTS:
        raise ConfigError(f"script {name!r}: the Flower app runs one of {', '.join(SCRIPTS)}")
    return importlib.import_module(name)


def run_key(script, args):
    """A name for the states a run's clients keep: the flags that decide them (a changed --rounds keeps them)."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE}
    return hashlib.sha256(json.dumps([script, flags], default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# server side: the transport the round loop calls
# ----------------------------------------------------------------------------------------------------
class Flower(Transport):
    """The server's process runs the loop; no client lives here (`mine` is empty). `exchange` sends each node one
    message with its sampled clients' downloads and returns the uploads that came back within `round_timeout`;
    `from_client` does the same for one client's turn. Who did not answer is in `dropped`."""
    keeps_client_state = True

    def __init__(self, grid, device, script, argv, nodes, round_timeout, node_timeout, log=print, partitions=None,
                 data_sizes="partition", size_cap=0, key=None):
        super().__init__(device)
        self.grid, self.script, self.argv = grid, script, argv
        self.nodes, self.round_timeout, self.node_timeout, self.log = nodes, round_timeout, node_timeout, log
        self.partitions = partitions or nodes  # P, the run config's: a node cannot change it
        self.node_of, self.known = {}, {}  # partition -> the node serving it; node id -> the partition it claims
        self.declares_sizes, self.size_cap = data_sizes == "declared", size_cap
        self.declared = {}  # deployment mode: client -> the data size the node serving it declared when it joined
        self.sizes_of, self.misses = {}, {}  # node id -> the sizes it declared; -> queries it left unanswered
        self.key = key

    def describe(self):
        sizes = (("declared by the nodes, capped at " + str(self.size_cap)) if self.size_cap else
                 "equal: every client weighs 1, whatever its node declares (run config max-declared-size 0)")
        return (f"; Flower: {self.partitions} partitions on {len(self.node_of)} nodes, client c on the node of "
                f"partition c % {self.partitions}; data sizes "
                + (sizes + "; the server holds no client's data" if self.declares_sizes else
                   "from the server's copy of the partitions (research simulation)"))

    def join(self, timeout):
        """Wait (up to node_timeout) until `nodes` SuperNodes are connected, and learn each one's partition."""
        t = time.time()
        while len(list(self.grid.get_node_ids())) < self.nodes:
            if time.time() - t > self.node_timeout:
                raise ConfigError(f"Flower: {len(list(self.grid.get_node_ids()))} of {self.nodes} SuperNodes "
                                  f"connected after {self.node_timeout:g} s (run config num-nodes)")
            time.sleep(0.2)
        self.refresh()
        if not self.node_of:
            raise ConfigError("Flower: no SuperNode told its partition (start them with --node-config "
                              "'partition-id=p num-partitions=P', P the run config's num-partitions)")

    def mine(self, clients):
        return []

    def refresh(self):
        """Ask nodes not seen before for their partition (one query message each; in the deployment mode also their
        clients' data sizes), forget nodes that left, and hand each partition no connected node serves to the first
        node that claimed it. A node that counts other than the run config's num-partitions, or whose answer is
        malformed, serves nothing; a node that claims a partition a connected node serves waits until that node has
        left (so a newcomer cannot take over a client whose node is still there); two new nodes claiming one free
        partition in the same query: the lower node id gets it, whichever answered first (logged). A node's declared
        sizes count only once it is given the partition; a node that leaves 3 queries unanswered (or answers with an
        error) is left out. The answer is taken once per node id (a node that reconnects under a new id is asked
        again)."""
        from flwr.app import ConfigRecord, Message, RecordDict
        ids = set(self.grid.get_node_ids())
        self.node_of = {p: n for p, n in self.node_of.items() if n in ids}
        self.known = {n: p for n, p in self.known.items() if n in ids}  # a node that left is asked again if it returns
        self.misses = {n: k for n, k in self.misses.items() if n in ids}
        self.sizes_of = {n: v for n, v in self.sizes_of.items() if n in ids}
        new = [n for n in ids if n not in self.known]
        ask = {"ask": "partition"}
        if self.declares_sizes:  # the node needs the run's flags to find its clients and their data
            ask.update(script=self.script, argv=self.argv, key=self.key or "0" * 16)
        messages = [Message(RecordDict({MESSAGE_KEY: ConfigRecord(ask)}), dst_node_id=n, message_type="query")
                    for n in new]
        replies, unread = receive(self.grid, messages, self.node_timeout, QUERY_BYTES) if messages else ({}, {})
        for node, why in unread.items():
            self.log(f"Flower: node {clean(node)}: {why}")
        replies = list(replies.values())
        claimed = {}  # partition -> the new node that claimed it first in this query
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):  # node-id order, not arrival order
            node = reply.metadata.src_node_id
            if node not in new or node in self.known:
                continue
            try:  # nothing a node sends may raise here
                if reply.has_error():
                    continue  # a failed ClientApp: a miss, asked again next time
                self.misses.pop(node, None)
                why, p, sizes = self.read_claim(reply)
            except Exception as e:  # noqa: BLE001  an error reply, or a node without the node config
                why = f"did not tell its partition ({type(e).__name__})"
            if why:
                self.log(f"Flower: node {node} {why}: left out")
                self.known[node] = None
                continue
            self.known[node], self.sizes_of[node] = p, sizes
            if p not in self.node_of and claimed.setdefault(p, node) != node:
                self.log(f"Flower: nodes {claimed[p]} and {node} both claim free partition {p}: the lower id, "
                         f"{claimed[p]}, serves it; {node} waits")
            if p in self.node_of:
                self.log(f"Flower: node {node} claims partition {p}, which connected node {self.node_of[p]} serves: "
                         "it serves nothing while that node is connected")
        for node in new:
            if node not in self.known:
                self.misses[node] = self.misses.get(node, 0) + 1
                if self.misses[node] >= 3:
                    self.log(f"Flower: node {node} left 3 partition queries unanswered: left out")
                    self.known[node] = None
                    del self.misses[node]
        for node, p in self.known.items():  # in the order the claims were read
            if p is not None and p not in self.node_of:
                self.node_of[p] = node
                # its clients weigh what this node declared, never what a node refused for the partition did
                self.declared = {c: n for c, n in self.declared.items() if c % self.partitions != p}
                self.declared.update(self.sizes_of.get(node, {}))

    def read_claim(self, reply):
        """A node's answer to the partition query -> (why it is refused or None, its partition, {client: size})."""
        cfg = reply.content[MESSAGE_KEY]
        p, count = int(cfg["partition-id"]), int(cfg["num-partitions"])
        if count != self.partitions or not 0 <= p < count:
            return f"says partition {p} of {count}, the run has {self.partitions} (run config num-partitions)", p, {}
        if not self.declares_sizes:
            return None, p, {}
        if "clients" not in cfg:
            return "declared no data sizes (it refused the run or could not read its data: its log says why)", p, {}
        clients, sizes = list(cfg["clients"]), list(cfg["sizes"])
        if (len(clients) != len(sizes) or not clients or any(type(c) is not int or c % count != p for c in clients)
                or any(type(n) is not int or n < 1 for n in sizes)):
            return "declared no well-formed data sizes (its clients c, c % P == p, each with a size >= 1)", p, {}
        return None, p, dict(zip(clients, sizes))

    def data_size(self, client, held):
        """Deployment mode: every client 1 (the default: no declaration is trusted), or with the run config's
        max-declared-size M > 0, set by an operator who can defend it, the size the client's node declared when it
        joined, capped at M (one node's clients then weigh at most M each); else the partition's (`held`)."""
        if not self.declares_sizes:
            return held
        return min(self.declared.get(client, 0), self.size_cap) if self.size_cap else 1

    def exchange(self, fn, run, rnd, sent, clients, widths, keys, tags=None):
        """One message per node holding its clients' (download, tags); -> {client: (upload, stats)} of those whose
        upload came back in time. fn is not called here: the node's ClientApp calls the same function by name."""
        from flwr.app import ConfigRecord, Message, RecordDict
        self.refresh()
        self.dropped, by_node = {}, {}
        self.key = self.key or run_key(self.script, run.args)
        for c in clients:
            node = self.node_of.get(c % self.partitions)
            if node is None:
                self.dropped[c] = f"offline (no node serves partition {c % self.partitions})"
            elif self.declares_sizes and c not in self.declared:
                self.dropped[c] = "its node declared no data size for it"
            else:
                by_node.setdefault(node, []).append(c)
        messages = [Message(RecordDict({MESSAGE_KEY: ConfigRecord({
            "script": self.script, "argv": self.argv, "key": self.key, "round": rnd, "clients": cs,
            "downloads": [sent[c] for c in cs], "held": [tags[c][0] for c in cs],
            "after": [tags[c][1] for c in cs]})}), dst_node_id=node, message_type="train")
            for node, cs in by_node.items()]
        got = {}
        longest = widths[1] if widths else None  # the protocol's longest upload for the script and its flags
        most = {node: len(cs) * (longest or (1 << 30)) + (1 << 20) for node, cs in by_node.items()}  # + stats, framing
        replies, unread = receive(self.grid, messages, self.round_timeout, max(most.values(), default=0)) if messages \
            else ({}, {})
        for node, why in unread.items():
            for c in by_node.get(node, []):
                self.dropped[c] = why
        for node, reply in replies.items():
            mine = by_node.get(node, [])
            try:  # nothing a node sends may raise here: a bad reply drops that node's clients, with its reason
                got.update(read_reply(reply, mine, keys, longest, self.dropped))
            except Exception as e:  # noqa: BLE001  whatever a broken or hostile node sends
                for c in mine:
                    self.dropped[c] = f"malformed reply ({type(e).__name__})"
        for c in clients:
            if c not in got and c not in self.dropped:
                self.dropped[c] = f"no reply within {self.round_timeout:g} s"
        return {c: got[c] for c in clients if c in got}

    def from_client(self, client, keys, fn, run, rnd, download, tag=None, longest=None):
        got = self.exchange(fn, run, rnd, {client: download}, [client], (None, longest), keys, {client: tag})
        return got[client] if client in got else (None, {"dropped": self.dropped[client]})


def receive(grid, messages, timeout, max_bytes):
    """Flower's send_and_receive, one reply at a time: push the messages, then pull each node's reply on its own until
    it came or `timeout` passed -> ({node: reply Message}, {node: why its reply could not be read}). Whatever Flower
    raises while pulling or decoding one reply (a body whose hash is right but whose content is not a message, an
    object missing) drops that node alone, with the exception's name; a reply of more than MAX_REPLY_OBJECTS objects,
    or more than max_bytes, is refused before it is held whole (`pull_reply`)."""
    ids = list(grid.push_messages(messages))
    pending, replies, unread = {}, {}, {}
    for mid, msg in zip(ids, messages):
        if mid:
            pending[mid] = msg.metadata.dst_node_id
        else:
            unread[msg.metadata.dst_node_id] = "its message could not be pushed to the SuperLink"
    end = time.time() + timeout
    while pending:
        for mid, node in list(pending.items()):
            try:
                reply = pull_reply(grid, mid, max_bytes)
            except Exception as e:  # noqa: BLE001  whatever one node's reply makes Flower raise
                unread[node] = f"its reply could not be read ({type(e).__name__}: {clean(e)[:120]})"
                del pending[mid]
                continue
            if reply is not None:
                replies[node] = reply
                del pending[mid]
        if pending and time.time() < end:
            time.sleep(0.5)
        elif pending:
            break
    return replies, unread


class ReplyRefused(Exception):
    """A reply larger than the protocol allows: refused before it is held whole."""


def pull_reply(grid, message_id, max_bytes):
    """The reply to one message, or None while there is none -> a Flower Message. Flower's own pull (the HTTP grid's
    pull_messages, flwr 1.42) for one message, with two bounds first: the reply's object tree has at most
    MAX_REPLY_OBJECTS objects (counted before any is pulled) and its objects at most max_bytes in all (counted as they
    arrive). A grid without that API (not a SuperLink's) uses its own pull_messages."""
    client = getattr(grid, "_runtime_client", None)
    if client is None:
        got = list(grid.pull_messages([message_id]))
        return got[0] if got else None
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents, pull_objects
    res = client.PullMessages(PullAppMessagesRequest(message_ids=[message_id]))
    found = [(m, t) for m, t in zip(res.messages_list, res.message_object_trees)
             if m.metadata.reply_to_message_id == message_id]
    if not found:
        return None
    proto, tree = found[0]
    ids = [t.object_id for t in iterate_object_tree(tree)]
    if len(ids) > MAX_REPLY_OBJECTS:
        raise ReplyRefused(f"a reply of {len(ids)} objects, more than {MAX_REPLY_OBJECTS}")
    run_id, held = grid.run.run_id, [0]
    pull_one = make_pull_object_fn_protobuf(client.PullObject, grid.node, run_id)

    def bounded(object_id):
        content = pull_one(object_id)
        held[0] += len(content)
        if held[0] > max_bytes:
            raise ReplyRefused(f"a reply of more than {max_bytes} bytes")
        return content

    contents = pull_objects(ids, bounded)
    msg_id = proto.metadata.message_id
    client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id,
                                                                message_object_id=msg_id))
    message = inflate_object_from_contents(msg_id, contents)
    message.metadata.__dict__["_message_id"] = msg_id
    return message


def clean(text):
    """A node's text as one printable line for the server's log: control characters (newlines among them) escaped,
    so a node cannot forge log lines."""
    return str(text).encode("unicode_escape", "backslashreplace").decode("ascii", "replace")


def read_reply(reply, clients, keys, longest, dropped):
    """A node's reply -> {client: (upload bytes, stats)} for the clients it answers well; every other client of the
    node gets its reason in `dropped`. A reply is taken only as the ClientApp builds it: the node's client list in
    order, one upload (bytes, at most `longest` long) or error line per client, and a JSON list of stats dicts whose
    `keys` are finite numbers within +-STAT_BOUND (an error reply of any shape, a 400-digit integer, an infinity or
    1.7e308, which is finite but breaks a plot's axis, is refused)."""
    if reply.has_error():
        lines = str(getattr(reply.error, "reason", "") or "").strip().splitlines()
        for c in clients:
            dropped[c] = f"node failed: {clean(lines[-1] if lines else 'no reason given')[:200]}"
        return {}
    cfg = reply.content[MESSAGE_KEY]
    answered, uploads, errors = list(cfg["clients"]), list(cfg["uploads"]), list(cfg["errors"])
    stats = json.loads(cfg["stats"])
    if answered != clients or not (len(uploads) == len(errors) == len(stats) == len(clients)):
        raise ValueError("not the node's clients")
    got = {}
    for c, up, err, st in zip(clients, uploads, errors, stats):
        values = [st.get(k) for k in keys] if isinstance(st, dict) else []
        if err:
            dropped[c] = f"client failed: {clean(err)[:300]}"
        elif not isinstance(up, bytes):
            dropped[c] = "malformed reply: the upload is not bytes"
        elif longest is not None and len(up) > longest:
            dropped[c] = f"upload of {len(up)} bytes, longer than the protocol's {longest}"
        elif len(values) != len(keys) or not all(_finite_number(v) for v in values):
            dropped[c] = f"malformed reply: the stats {', '.join(keys)} are not all finite numbers within +-{STAT_BOUND:g}"
        else:
            got[c] = (up, {k: float(v) for k, v in zip(keys, values)})
    return got


def _finite_number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v)) and abs(float(v)) <= STAT_BOUND
    except OverflowError:  # an integer too large for a float
        return False


def serve(grid, context):
    """The ServerApp's main: the run config names the script and its flags; the script's round loop runs here."""
    cfg = context.run_config
    name, argv = str(cfg.get("script", "fedkseed")), str(cfg.get("argv", ""))
    script = script_module(name)
    args = script.parse_args(shlex.split(argv))
    if not os.path.isabs(args.output_dir):
        raise ConfigError(f"--output_dir {args.output_dir}: give an absolute path (the ServerApp runs in Flower's "
                          "own folder)")
    device = tasks.flags.pick_device(args.device)
    nodes, data_sizes = int(cfg.get("num-nodes", 1)), str(cfg.get("data-sizes", "partition"))
    if data_sizes not in ("partition", "declared"):
        raise ConfigError(f"run config data-sizes {data_sizes!r}: partition (research simulation) or declared")
    if name == "fedcybgd" and data_sizes == "declared":
        print("Flower: FedCyBGD weights no client by its data size: data-sizes = declared runs as partition (the nodes "
              "declare nothing; the server reads the data set, as in the research simulation)", flush=True)
        data_sizes = "partition"
    transport = Flower(grid, device, name, argv, nodes, float(cfg.get("round-timeout", 600)),
                       float(cfg.get("node-timeout", 120)), partitions=int(cfg.get("num-partitions", 0)) or nodes,
                       data_sizes=data_sizes, size_cap=int(cfg.get("max-declared-size", 0)),
                       key=run_key(name, args))
    return script.train(args, transport)
