"""fedfull's ClientApp (fedfull_flower.node), except on the node of partition 1, whose reply is replaced, round by
round, by what a hostile participant could send: a stat that is a 400-digit integer (round 1), uploads a megabyte
longer than the protocol allows (round 2), every pair stacked on one seed the client was not assigned, with a large
scalar (round 3), a reply naming other clients (round 4), an error reply with an empty reason (round 5), an
infinite stat (round 6), every scalar 0 on its assigned seeds (round 7: well-formed, so taken, and bounded), stats of
+-1.7e308 (round 8: finite, but past any plot's axis); from round 9 on it answers honestly. Asked for its data sizes
(the deployment mode) it declares 10^9 examples a client. Under fedavg or fedcybgd it sends, in round 1, every
upload's tensors filled with 1e30, then answers honestly."""
import json

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfull_flower.node import answer_query, handle
from fedfull_flower.transport import MESSAGE_KEY

import fedkseed as fk

app = ClientApp()


@app.query()
def query(message, context):
    reply = answer_query(message, context)
    got = dict(reply.content[MESSAGE_KEY])
    if int(context.node_config.get("partition-id", 0)) != 1 or "sizes" not in got:
        return reply
    got["sizes"] = [10 ** 9] * len(got["sizes"])  # far past any cap an operator would set
    return Message(RecordDict({MESSAGE_KEY: ConfigRecord(got)}), reply_to=message)


def stacked(upload, K=16):
    """The same data size and number of pairs, every pair on one seed index none of its steps drew, g = 1e3."""
    n, idx, g = fk.decode_upload(upload, K)
    other = next(k for k in range(K) if k not in set(idx.tolist()))
    return fk.encode_upload(n, [other] * len(idx), [1e3] * len(idx), K)


def zeroed(upload, K=16):
    """The same data size and pairs on the assigned seeds, every scalar 0."""
    n, idx, g = fk.decode_upload(upload, K)
    return fk.encode_upload(n, idx, [0.0] * len(idx), K)


def huge_block(upload):
    """FedAvg/FedCyBGD: the same tensors, names, shapes and dtypes, every value 1e30 (finite)."""
    import torch

    import tasks
    return tasks.pack({k: torch.full_like(v, 1e30) for k, v in tasks.unpack(upload).items()})


@app.train()
def train(message, context):
    reply = handle(message, context)
    rnd = int(message.content[MESSAGE_KEY]["round"])
    if int(context.node_config.get("partition-id", 0)) != 1 or rnd > 8:
        return reply
    if str(message.content[MESSAGE_KEY]["script"]) != "fedkseed":  # round 1: a 1e30 block, then honest
        if rnd > 1:
            return reply
        got = reply.content[MESSAGE_KEY]
        cfg = {k: got[k] for k in ("clients", "uploads", "errors", "stats")}
        cfg["uploads"] = [huge_block(bytes(u)) for u in cfg["uploads"]]
        return Message(RecordDict({MESSAGE_KEY: ConfigRecord(cfg)}), reply_to=message)
    if rnd == 5:
        return Message(Error(code=0, reason=""), reply_to=message)
    got = reply.content[MESSAGE_KEY]
    cfg = {k: got[k] for k in ("clients", "uploads", "errors", "stats")}
    n = len(cfg["clients"])
    if rnd == 1:
        cfg["stats"] = json.dumps([{"loss": 10 ** 400, "sync_seconds": 0.0, "train_seconds": 0.0}] * n)
    elif rnd == 2:
        cfg["uploads"] = [bytes(u) + b"\0" * 2 ** 20 for u in cfg["uploads"]]
    elif rnd == 3:
        cfg["uploads"] = [stacked(bytes(u)) for u in cfg["uploads"]]
    elif rnd == 4:
        cfg["clients"] = [int(c) + 100 for c in cfg["clients"]]
    elif rnd == 7:
        cfg["uploads"] = [zeroed(bytes(u)) for u in cfg["uploads"]]
    elif rnd == 8:
        cfg["stats"] = json.dumps([{"loss": 1.7e308, "sync_seconds": -1.7e308, "train_seconds": 0.0}] * n)
    else:
        cfg["stats"] = json.dumps([{"loss": float("inf"), "sync_seconds": 0.0, "train_seconds": 0.0}] * n)
    return Message(RecordDict({MESSAGE_KEY: ConfigRecord(cfg)}), reply_to=message)



