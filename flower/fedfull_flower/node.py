"""The Flower node side: the ClientApp's functions. For each message, build the node's view of the run from the
script's own flags, then for each of its clients load the state the node keeps (checking its tag), call the script's
`client_round`, store the new state, and reply with the uploads (see transport.py for the protocol)."""
import json
import os
import re
import shlex
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import tasks
from tasks import ConfigError

from .transport import MESSAGE_KEY, script_module


def client_node(script, args):
    """A node's view of a run: what the script's `load_parts` loads on every party (the model, its clients' data;
    fedkseed: w0 and the seeds too), a device, progress bars, and no server."""
    run = SimpleNamespace(args=args, device=args.device, server=None, progress=tasks.Progress())
    script.load_parts(run)
    return run


def answer_query(message, context):
    """The partition this node serves (its node config); when the server asks for data sizes (the deployment mode:
    the message carries the run's script and flags), also each of its clients and the number of examples it holds,
    read from this node's own data. A run the node refuses (`node_args`) gets the partition only."""
    from flwr.app import ConfigRecord, Message, RecordDict
    node, cfg = context.node_config, message.content[MESSAGE_KEY]
    reply = {k: int(node[k]) for k in ("partition-id", "num-partitions") if k in node}
    if "script" in cfg and len(reply) == 2:
        try:
            _, script, args = node_args(cfg, node)
            run = client_node(script, args)
            p, count = reply["partition-id"], reply["num-partitions"]
            mine = [c for c in range(len(run.clients)) if c % count == p]
            reply.update(clients=mine, sizes=[len(run.clients[c]) for c in mine])
        except BaseException as e:  # noqa: BLE001  bad flags (argparse exits), a missing file: the server is told
            print(f"fedfull node: no data sizes declared: {type(e).__name__}: {e}".splitlines()[0], flush=True)
    return Message(RecordDict({MESSAGE_KEY: ConfigRecord(reply)}), reply_to=message)


def state_dir(context):
    return Path(str(context.node_config.get("state-dir", Path.home() / ".cache" / "fedfull" / "flower-state")))


KEY = re.compile(r"[0-9a-f]{16}")  # what run_key makes: the state folder's name, never a path
# the sizes a node allows (flag: node config key, default), checked before anything is allocated or run
LIMITS = {"K": ("max-K", 2**20), "max_length": ("max-length", 2**15), "local_steps": ("max-local-steps", 10**5),
          "local_epochs": ("max-local-epochs", 100), "grad_accum": ("max-grad-accum", 1024),
          "directions": ("max-directions", 1024), "batch_size": ("max-batch-size", 4096),
          "num_clients": ("max-clients", 10**5), "lora_r": ("max-lora-r", 256)}
# products of flags, each bounded too (name: node config key, default, the flags multiplied): a client's examples a
# round (local_steps x batch_size x grad_accum, x directions for FedKSeed's forwards) and tokens a step
PRODUCTS = {"examples a round": ("max-examples", 10**6, ("local_steps", "batch_size", "grad_accum", "directions")),
            "tokens a step": ("max-step-tokens", 2**22, ("batch_size", "grad_accum", "max_length"))}
STATE_BYTES = 20 * 2**30  # the state dir's size a node allows (node config max-state-bytes)


def server_chose(argv, flag):
    """The value the server's argv gives `flag` (`--flag v` or `--flag=v`; argparse's prefixes too), or None; given
    more than once, the last, as argparse takes it."""
    chose = None
    for i, x in enumerate(argv):
        head, eq, value = x.partition("=")
        if len(head) > 2 and flag.startswith(head) and head.startswith("--"):
            chose = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return chose


def node_args(cfg, node):
    """The run a message asks this node to take part in -> (script name, module, its parsed flags), or a ConfigError
    (one line) when the node refuses it: a state key that is not run_key's 16 hex digits (it names a folder: never a
    path), a data path or model that the server chose and the node's config does not set (node config `data-path`,
    `model` pin them, and `device` the device; `trust-server-paths=true` lets the server choose, as the local
    launcher does, where one person runs every process) -- refused before the flags are parsed, so the answer says
    nothing of whether such a path exists here --, or sizes past the node's limits (LIMITS: `max-K`, `max-length`,
    `max-local-steps`, `max-local-epochs`, `max-grad-accum`, `max-directions`, `max-batch-size`, `max-clients`,
    `max-lora-r`; PRODUCTS: `max-examples`, `max-step-tokens`), refused before anything is allocated."""
    name = str(cfg["script"])
    script = script_module(name)
    if not KEY.fullmatch(str(cfg["key"])):
        raise ConfigError(f"state key {str(cfg['key'])[:40]!r} is not 16 hex digits: refused")
    argv = shlex.split(str(cfg["argv"]))
    if str(node.get("trust-server-paths", "false")).lower() != "true":
        for key, flag in (("data-path", "--data_path"), ("model", "--model")):
            chose = server_chose(argv, flag)
            if key not in node and chose is not None and (flag == "--data_path" or chose != default_model(script,
                                                                                                        argv)):
                raise ConfigError(f"the server chose {flag} {chose[:200]}: this node's config does not set {key} (or "
                                  "trust-server-paths=true): refused")
    argv += [x for k, flag in (("data-path", "--data_path"), ("model", "--model"), ("device", "--device")) if k in node
             for x in (flag, str(node[k]))]
    args = script.parse_args(argv)
    for flag, (key, limit) in LIMITS.items():
        value, most = getattr(args, flag, None), float(node.get(key, limit))
        if value is not None and value > most:
            raise ConfigError(f"{'-K' if flag == 'K' else '--' + flag} {value} is more than this node allows "
                              f"({key} {most:.15g}): refused")
    for what, (key, limit, flags) in PRODUCTS.items():
        value, most = 1.0, float(node.get(key, limit))
        for flag in flags:
            value *= float(getattr(args, flag, None) or 1)
        if value > most:
            raise ConfigError(f"{' x '.join('--' + f for f in flags if (getattr(args, f, None) or 1) != 1)} = {value:.15g} "
                              f"{what}, more than this node allows ({key} {most:.15g}): refused")
    return name, script, args


def default_model(script, argv):
    """The script's own default --model for the run's --task (a server that names it chooses nothing)."""
    task = server_chose(argv, "--task")
    return script.parse_args(["--task", task] if task and hasattr(script, "TASK_DEFAULTS") else []).model


def room(folder, need, most):
    """Refuse to write `need` more bytes into the state dir once it would hold more than `most` (node config
    max-state-bytes): the runs a server can name are many, the node's disk is not."""
    held = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())
    if held + need > most:
        raise ConfigError(f"the state dir would hold {held + need} bytes, more than this node allows (max-state-bytes "
                          f"{most}): refused")


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
        name, script, args = node_args(cfg, context.node_config)
        folder = state_dir(context) / f"{name}-{cfg['key']}"
        folder.mkdir(parents=True, exist_ok=True)
        t = time.time()
        run = client_node(script, args)
        print(f"fedfull node: {name} round {cfg['round']}, clients {clients}: model and data loaded in "
              f"{time.time() - t:.2f} s", flush=True)
        run.last_client = clients[-1]
        fn = script.client_round
    except BaseException as e:  # noqa: BLE001  bad flags (argparse exits), a missing file: one line per client
        line = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        errors = [line] * len(clients)
    else:
        p, count = int(context.node_config.get("partition-id", -1)), int(context.node_config.get("num-partitions", 0))
        for i, (c, down, held, after) in enumerate(zip(clients, cfg["downloads"], cfg["held"], cfg["after"])):
            path = folder / f"client{c}.safetensors"
            try:
                if not (0 <= c < len(getattr(run, "clients", [])) and count > 0 and c % count == p):
                    raise ConfigError(f"client {c} is not one of this node's (partition {p} of {count}): refused")
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
                    room(state_dir(context), sum(t.numel() * t.element_size() for t in kept.values()),
                         int(float(context.node_config.get("max-state-bytes", STATE_BYTES))))
                    tmp = path.with_name(path.name + ".tmp")
                    save_file({k: v.contiguous() for k, v in kept.items()}, tmp, {"tag": after})
                    os.replace(tmp, path)
            except Exception as e:  # noqa: BLE001  this client fails; the message's other clients go on
                traceback.print_exc()
                errors[i] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    reply = ConfigRecord({"clients": clients, "uploads": uploads, "errors": errors,
                          "stats": json.dumps([{k: float(v) for k, v in s.items()} for s in stats])})
    return Message(RecordDict({MESSAGE_KEY: reply}), reply_to=message)
