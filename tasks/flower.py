"""Flower: the scripts' round loops over a real federation (flwr 1.42; the app is flower/ at the repository root).

A Flower federation is a SuperLink (the server's machine) and one SuperNode per client machine. `flwr run flower`
starts our ServerApp on the SuperLink, which runs the script's own round loop (`fedkseed.train`, `fedcybgd.main`)
with the transport below; every client lives on a SuperNode and does its work in our ClientApp, which calls the
script's own per-client function (`fedkseed.client_round`, `fedcybgd.client_turn`). Nothing else differs from one
process: the same flags (the script's `parse_args`, from the run config's `argv`), the same messages, the same bytes.

    server side   Flower(grid, device, nodes, round_timeout, node_timeout)   # a tasks.Transport
    node side     handle(message, context)                                   # the ClientApp's train function

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
import os
import shlex
import time
import traceback
from pathlib import Path

from .run import ConfigError, Transport

SCRIPTS = {"fedkseed": ("client_round", "train"), "fedcybgd": ("client_turn", "main"),
           "fedavg": ("client_round", "train")}  # each script's per-client function and round loop
TRAJECTORY_FREE = {"rounds", "resume", "eval_every", "output_dir", "device", "dist_timeout", "eval_samples",
                   "rouge_samples", "rouge_at_start", "max_new_tokens"}  # flags that leave a client's states alone
MESSAGE_KEY = "fedfull"


def script_module(name):
    """The script a message names: only the scripts that speak this protocol, never an arbitrary module."""
    import importlib
    if name not in SCRIPTS:
        raise ConfigError(f"script {name!r}: the Flower app runs one of {', '.join(SCRIPTS)}")
    return importlib.import_module(name)


def run_key(script, args):
    """A name for the states a run's clients keep: the flags that decide them (a changed --rounds keeps them)."""
    flags = {k: v for k, v in sorted(vars(args).items()) if k not in TRAJECTORY_FREE}
    return hashlib.sha256(json.dumps([script, flags], default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# server side: the transport the round loop calls
# ----------------------------------------------------------------------------------------------------
class Flower(Transport):
    """The server's process runs the loop; no client lives here (`mine` is empty). `exchange` sends each node one
    message with its sampled clients' downloads and returns the uploads that came back within `round_timeout`;
    `from_client` does the same for one client's turn. Who did not answer is in `dropped`."""
    keeps_client_state = True

    def __init__(self, grid, device, script, argv, nodes, round_timeout, node_timeout, log=print):
        super().__init__(device)
        self.grid, self.script, self.argv = grid, script, argv
        self.nodes, self.round_timeout, self.node_timeout, self.log = nodes, round_timeout, node_timeout, log
        self.node_of, self.partitions, self.known = {}, None, {}  # partition -> node id; P; node id -> partition
        self.key = None

    def describe(self):
        return (f"; Flower: {self.partitions} partitions on {len(self.node_of)} nodes, client c on the node of "
                f"partition c % {self.partitions}")

    def join(self, timeout):
        """Wait (up to node_timeout) until `nodes` SuperNodes are connected, and learn each one's partition."""
        t = time.time()
        while len(list(self.grid.get_node_ids())) < self.nodes:
            if time.time() - t > self.node_timeout:
                raise ConfigError(f"Flower: {len(list(self.grid.get_node_ids()))} of {self.nodes} SuperNodes "
                                  f"connected after {self.node_timeout:g} s (run config num-nodes)")
            time.sleep(0.2)
        self.refresh()
        if self.partitions is None:
            raise ConfigError("Flower: no SuperNode told its partition (start them with --node-config "
                              "'partition-id=p num-partitions=P')")

    def mine(self, clients):
        return []

    def refresh(self):
        """Ask nodes not seen before for their partition (one query message each); forget nodes that left."""
        from flwr.app import ConfigRecord, Message, RecordDict
        ids = set(self.grid.get_node_ids())
        self.node_of = {p: n for p, n in self.node_of.items() if n in ids}
        new = [n for n in ids if n not in self.known]
        if not new:
            return
        ask = [Message(RecordDict({MESSAGE_KEY: ConfigRecord({"ask": "partition"})}), dst_node_id=n,
                       message_type="query") for n in new]
        for reply in self.grid.send_and_receive(ask, timeout=self.node_timeout):  # a ClientApp starts per message
            node = reply.metadata.src_node_id
            try:
                cfg = reply.content[MESSAGE_KEY]
                p, count = int(cfg["partition-id"]), int(cfg["num-partitions"])
            except Exception:  # noqa: BLE001  an error reply, or a node without the node config
                self.log(f"Flower: node {node} did not tell its partition: left out")
                self.known[node] = None
                continue
            if self.partitions is None:
                self.partitions = count
            if count != self.partitions or not 0 <= p < count:
                self.log(f"Flower: node {node} says partition {p} of {count}, the federation has {self.partitions}: "
                         "left out")
                self.known[node] = None
                continue
            self.known[node] = p
            if p in self.node_of:
                self.log(f"Flower: node {node} now serves partition {p} (was node {self.node_of[p]})")
            self.node_of[p] = node

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
            else:
                by_node.setdefault(node, []).append(c)
        messages = [Message(RecordDict({MESSAGE_KEY: ConfigRecord({
            "script": self.script, "argv": self.argv, "key": self.key, "round": rnd, "clients": cs,
            "downloads": [sent[c] for c in cs], "held": [tags[c][0] for c in cs],
            "after": [tags[c][1] for c in cs]})}), dst_node_id=node, message_type="train")
            for node, cs in by_node.items()]
        got = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout) if messages else []:
            node = reply.metadata.src_node_id
            mine = by_node.get(node, [])
            if reply.has_error():
                for c in mine:
                    self.dropped[c] = f"node failed: {reply.error.reason.strip().splitlines()[-1][:200]}"
                continue
            try:
                cfg = reply.content[MESSAGE_KEY]
                answered, uploads, errors = list(cfg["clients"]), list(cfg["uploads"]), list(cfg["errors"])
                stats = json.loads(cfg["stats"])
                assert answered == mine and len(uploads) == len(errors) == len(stats) == len(mine)
            except Exception:  # noqa: BLE001  whatever a broken or hostile node sends
                for c in mine:
                    self.dropped[c] = "malformed reply"
                continue
            for c, up, err, st in zip(mine, uploads, errors, stats):
                if err:
                    self.dropped[c] = f"client failed: {err}"
                elif isinstance(up, bytes) and isinstance(st, dict) and all(isinstance(st.get(k), (int, float))
                                                                          for k in keys):
                    got[c] = (up, {k: float(st[k]) for k in keys})
                else:
                    self.dropped[c] = "malformed reply"
        for c in clients:
            if c not in got and c not in self.dropped:
                self.dropped[c] = f"no reply within {self.round_timeout:g} s"
        return {c: got[c] for c in clients if c in got}

    def from_client(self, client, keys, fn, run, rnd, download, tag=None):
        got = self.exchange(fn, run, rnd, {client: download}, [client], None, keys, {client: tag})
        return got[client] if client in got else (None, {"dropped": self.dropped[client]})


def serve(grid, context):
    """The ServerApp's main: the run config names the script and its flags; the script's round loop runs here."""
    cfg = context.run_config
    name, argv = str(cfg.get("script", "fedkseed")), str(cfg.get("argv", ""))
    script = script_module(name)
    args = script.parse_args(shlex.split(argv))
    if not os.path.isabs(args.output_dir):
        raise ConfigError(f"--output_dir {args.output_dir}: give an absolute path (the ServerApp runs in Flower's "
                          "own folder)")
    device = script.pick_device(args) if hasattr(script, "pick_device") else args.device
    transport = Flower(grid, device, name, argv, int(cfg.get("num-nodes", 1)), float(cfg.get("round-timeout", 600)),
                       float(cfg.get("node-timeout", 120)))
    return getattr(script, SCRIPTS[name][1])(args, transport)


# ----------------------------------------------------------------------------------------------------
# node side: the ClientApp
# ----------------------------------------------------------------------------------------------------
def answer_query(message, context):
    """The partition this node serves (its node config)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    node = context.node_config
    reply = {k: int(node[k]) for k in ("partition-id", "num-partitions") if k in node}
    return Message(RecordDict({MESSAGE_KEY: ConfigRecord(reply)}), reply_to=message)


def state_dir(context):
    return Path(str(context.node_config.get("state-dir", Path.home() / ".cache" / "fedfull" / "flower-state")))


def handle(message, context):
    """The ClientApp's train function: build the node's view of the run from the script's own flags (with the
    node's own data-path and model), then for each client of the message load its state (checking its tag), call
    the script's per-client function, store the new state, and reply with the uploads. A client that fails gets its
    error line in the reply instead of an upload; the others go on."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from safetensors import safe_open
    from safetensors.torch import save_file
    cfg = message.content[MESSAGE_KEY]
    clients = [int(c) for c in cfg["clients"]]
    uploads, stats, errors = [b""] * len(clients), [{}] * len(clients), [""] * len(clients)
    try:
        name = str(cfg["script"])
        script = script_module(name)
        node = context.node_config
        argv = shlex.split(str(cfg["argv"]))
        argv += [x for k, flag in (("data-path", "--data_path"), ("model", "--model")) if k in node
                 for x in (flag, str(node[k]))]
        args = script.parse_args(argv)
        folder = state_dir(context) / f"{name}-{cfg['key']}"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.time()
        run = script.client_node(args)
        print(f"fedfull node: {name} round {cfg['round']}, clients {clients}: model and data loaded in "
              f"{time.time() - t:.2f} s", flush=True)
        run.last_client = clients[-1]
        fn = getattr(script, SCRIPTS[name][0])
    except BaseException as e:  # noqa: BLE001  bad flags (argparse exits), a missing file: one line per client
        line = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        errors = [line] * len(clients)
    else:
        for i, (c, down, held, after) in enumerate(zip(clients, cfg["downloads"], cfg["held"], cfg["after"])):
            path = folder / f"client{c}.safetensors"
            try:
                state = None
                if held:
                    if not path.is_file():
                        raise ConfigError(f"client {c} keeps no state here, the server assumed {held}")
                    with safe_open(path, "pt") as f:
                        kept = (f.metadata() or {}).get("tag")
                        if kept != held:
                            raise ConfigError(f"client {c} holds state {kept}, the server assumed {held}")
                        state = {k: f.get_tensor(k) for k in f.keys()}
                script.set_client_state(run, c, state)
                t = time.time()
                uploads[i], stats[i] = fn(run, int(cfg["round"]), c, down)
                print(f"fedfull node: client {c} done in {time.time() - t:.2f} s", flush=True)
                kept = script.client_state(run, c)
                if kept:  # FedAvg's clients keep nothing
                    tmp = path.with_name(path.name + ".tmp")
                    save_file({k: v.contiguous() for k, v in kept.items()}, tmp, {"tag": after})
                    os.replace(tmp, path)
            except Exception as e:  # noqa: BLE001  this client fails; the message's other clients go on
                traceback.print_exc()
                errors[i] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    reply = ConfigRecord({"clients": clients, "uploads": uploads, "errors": errors,
                          "stats": json.dumps([{k: float(v) for k, v in s.items()} for s in stats])})
    return Message(RecordDict({MESSAGE_KEY: reply}), reply_to=message)
