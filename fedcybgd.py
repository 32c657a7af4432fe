"""FedCyBGD: federated full-parameter tuning by cycle block gradient descent (Wang et al., arXiv 2406.11187).

    python fedcybgd.py --task sft  --data_path ../shared/data/dolly/databricks-dolly-15k.jsonl
    python fedcybgd.py --task glue --dataset mrpc --data_path ../shared/data/glue/MRPC

The idea. A transformer is a stack of layers; call each layer a *block*. Block coordinate descent trains
one block at a time while the others stay frozen, so gradients, Adam moments and an fp32 master copy
exist for one block only -- a fraction of full fine-tuning's memory. FedCyBGD spreads this over clients:
the clients take turns in a fixed cycle, each turn trains one block on that client's private data, and
each turn starts from the model the previous turn left:

    round r:  client 0 trains block b(0)  ->  client 1 trains block b(1)  ->  ...  ->  client N-1
              (turn t = r*N + c of the cycle trains block t mod L for --switch_mode ascending)

Because only one block changed, a client *uploads only its block* (plus the small task head, which is
trained on every turn). Before its turn a client must catch up with the blocks others changed; that
*download* is where the bytes are, and the script offers three ways to send it:

    full   the whole model, every turn (the naive baseline)
    delta  only the blocks that changed since this client's last turn (lossless)
    int8   delta's blocks, quantised to int8 per row, except the client's own block and the head, which come
           exact whenever the client lacks them exactly; a block the client holds at its current version is
           never sent again, so frozen embeddings (and a tied LM head) never travel
    --download_fraction f < 1   the official code's random block dropping: of the blocks that differ
           from the pretrained model, a random fraction f is sent, the rest stay pretrained on the client

Every message is serialised (safetensors) and its length is written to a ledger, per client turn and
direction, next to the memory the turn needed. The loop below is written as plain functions whose inputs
and outputs are exactly those messages (server_download -> sync_model -> client_update ->
server_aggregate), so the same functions run in one process or on many.

In one process the clients take turns on ONE model (no per-client copies); the server keeps one copy of the
exact global weights, and a record of what each client holds (version per block, and which blocks only as
int8). Before a turn the simulation rebuilds the client's copy from that record (`held_weights`: the current
weights, their int8 rounding, or the pretrained ones) and applies the download on top; in the lossless modes
that is the global model itself. The evaluation always uses the server's exact weights.

Label skew. Clients take turns, so under a label-skewed split each turn pulls the shared task head towards
its own labels, and a run can end predicting the last client's label (measured on MRPC, Dirichlet-0.5 over
6 clients: 31.6% accuracy, the minority class, after each of 3 rounds; README). No remedy here fixes that
yet. `--logit_adjust` (glue) adds the log of the client's own label frequencies to the logits of its training
loss (logit adjustment), and `--head_lr_scale` slows the head alone; both are candidates under measurement:
on that split neither kept the run off the minority class (a client with one label keeps widening its margin
after the prior shift). `--lr_scheduler cosine` with `--warmup_steps` is the official schedule, carried from
turn to turn over the whole run.

Across processes (`torchrun --nproc_per_node N fedcybgd.py ...`, also across machines): client c lives on
rank c % N, and every rank keeps its own model plus a replica of the server state. On client c's turn only
its rank trains; it then broadcasts its upload message (the block and the head, as uint8 bytes) and every
rank applies it with `server_aggregate`, so all replicas -- rank 0's, the one that evaluates and is
checkpointed, included -- stay equal bit for bit. The download message is built from the replica on the
client's rank and counted in the ledger, but no collective carries it: every rank already holds the server's
weights. One process and N ranks give the same metrics and the same weights.

Where this script differs from the official code (github.com/L3030/FedCyBGD, built on BAdam):
  * Blocks are discovered from the model (the largest nn.ModuleList of identical layers), not taken from
    hand-written per-model prefix lists; task heads (everything after the layer stack) are trainable on
    every turn; embeddings (everything before it) are an optional extra block (--train_embeddings).
  * Adam state lives for exactly one client turn. The official block optimizer rebuilds its fp32 copies
    and wipes the Adam moments every `switch_block_every` steps even though the block does not change
    within a turn, and it saves the optimizer state for the next client; the learning rate schedule, which
    it also carries from client to client, is carried here too (--lr_scheduler).
  * Weight decay skips every parameter with ndim < 2 (biases, norm weights). The official code tests
    `isinstance(param, LayerNorm)` on a tensor, which is never true, so norm weights decay.
  * The cycle: turn t trains block t mod L, so with fewer clients than blocks every block is still
    visited. The official code gives client c block c mod L in every round, so blocks >= N never train.
    --switch_mode random is the official draw (each client samples its blocks independently, without
    replacement over its rounds); with more rounds than blocks the official code fails, here a client starts
    a fresh permutation every L rounds. --switch_mode permutation is a fresh order per sweep of L turns.
  * The official code splits the data into equal contiguous shards; the split here is --iid (Dirichlet label
    skew by default), and --logit_adjust and --head_lr_scale have no counterpart there.
  * Download: the official "compression" (random dropping of updated blocks, the rest pretrained) is
    --download_fraction, except that the client's own block and the head are always sent (dropping them
    would make the client train from, and upload over, a stale copy). Lossless `delta` and lossy `int8`
    (which sends only what the client lacks) are added, and every byte is counted.
  * One model in memory instead of a deep copy of the model per client; float32 weights by default (the
    official code casts to fp16); the GPT-2/SQuAD and RoBERTa/GLUE variants, which the official code
    trains centrally, use the same federated loop here.
"""
import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tasks

# ----------------------------------------------------------------------------------------------------
# config: defaults run out of the box on a CPU; per-task defaults fill whatever is left as None
# ----------------------------------------------------------------------------------------------------
TASK_DEFAULTS = {
    #        dataset       model            lr     batch  max_length  eval_samples (0 = all)
    "sft":   dict(dataset="dolly", model="smollm2-135m", lr=1e-4, batch_size=2, max_length=256, eval_samples=50),
    "glue":  dict(dataset="mrpc", model="minilm-l6", lr=2e-4, batch_size=16, max_length=128, eval_samples=0),
    "squad": dict(dataset="squad", model="gpt2", lr=5e-5, batch_size=8, max_length=384, eval_samples=200),
}
DATASETS = {"sft": tasks.DATASETS, "glue": tasks.glue.TASKS, "squad": ("squad",)}


def get_config(argv=None):
    p = argparse.ArgumentParser(description="FedCyBGD: clients train one transformer block each, in a cycle.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("sft", "glue", "squad"), default="sft",
                   help="sft: instruction tuning of a causal LM; glue: sentence(-pair) classification; "
                        "squad: extractive QA")
    p.add_argument("--dataset", default=None, help="sft: dolly|instruct|alpaca_gpt4_en; glue: mrpc|rte|sst2|"
                   "cola|qqp|stsb|mnli|qnli; squad: squad (default: dolly / mrpc / squad)")
    p.add_argument("--data_path", default=None, help="local file or folder of the dataset (default: data/ next "
                   "to this script, then the Hugging Face hub)")
    p.add_argument("--model", default=None, help="smollm2-135m, minilm-l6, or any Hugging Face id/path "
                   "(default: smollm2-135m for sft, minilm-l6 for glue, gpt2 for squad)")
    p.add_argument("--num_clients", type=int, default=0,
                   help="number of clients; 0 = one client per block of the cycle")
    p.add_argument("--rounds", type=int, default=2, help="full cycles: in a round every client takes one turn")
    p.add_argument("--switch_mode", choices=("ascending", "descending", "permutation", "random"),
                   default="ascending", help="which block a turn trains: ascending/descending over the cycle; "
                   "permutation: a fresh random order for every sweep over the blocks; random: the official mode, "
                   "each client draws its own blocks independently (see block_of_turn)")
    p.add_argument("--local_steps", type=int, default=None,
                   help="optimizer steps per client turn (default 8 unless --local_epochs is given)")
    p.add_argument("--local_epochs", type=float, default=None,
                   help="passes over the client's data per turn instead of --local_steps")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (the peak, with --lr_scheduler) "
                   "(default: 1e-4 sft, 2e-4 glue, 5e-5 squad)")
    p.add_argument("--lr_scheduler", choices=("constant", "cosine"), default="constant",
                   help="learning rate over the whole run, carried from turn to turn: constant, or a cosine from "
                        "--lr to 0 at the last step of the last round")
    p.add_argument("--head_lr_scale", type=float, default=1.0,
                   help="the task head (trained on every turn) learns at this times --lr")
    p.add_argument("--logit_adjust", action="store_true",
                   help="glue classification: each client adds the log of its own label frequencies to the logits "
                        "of its training loss (logit adjustment; measured not to prevent the label-skew collapse yet)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps at the start of the run")
    p.add_argument("--weight_decay", type=float, default=0.01,
                   help="AdamW weight decay, applied to parameters with ndim >= 2 only")
    p.add_argument("--batch_size", type=int, default=None, help="examples per micro-batch "
                   "(default: 2 sft, 16 glue, 8 squad)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_length", type=int, default=None, help="tokens per example "
                   "(default: 256 sft, 128 glue, 384 squad)")
    p.add_argument("--iid", default="dir0.5", help="client partition: 'iid' or 'dirALPHA' (label-Dirichlet)")
    p.add_argument("--download", choices=("full", "delta", "int8"), default="delta",
                   help="full: whole model each turn; delta: only blocks changed since the client's last turn; "
                        "int8: whole model with frozen blocks quantised per row, own block exact")
    p.add_argument("--download_fraction", type=float, default=1.0,
                   help="< 1: send only this random fraction of the blocks that differ from the pretrained "
                        "model (own block and head always sent); the rest stay pretrained on the client. "
                        "Works with --download full or int8")
    p.add_argument("--train_embeddings", action="store_true",
                   help="add the input embeddings as one more block of the cycle")
    p.add_argument("--eval_every", type=int, default=1, help="evaluate every this many rounds "
                   "(also before training, as round 0, and after the last round)")
    p.add_argument("--eval_samples", type=int, default=None, help="held-out examples evaluated; 0 = all "
                   "(default: 50 sft, all glue, 200 squad)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="sft: tokens generated for Rouge-L (greedy, as "
                   "in fedkseed.py and fedavg.py); 0 = no Rouge-L")
    p.add_argument("--seed", type=int, default=42, help="all randomness derives from (seed, round, client)")
    p.add_argument("--output_dir", default="out/fedcybgd", help="config.json, metrics.jsonl, ledger.jsonl, "
                   "checkpoints, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="weight dtype; with bf16/fp16 the trained block gets an fp32 master copy for AdamW")
    p.add_argument("--dist_timeout", type=float, default=1800.0,
                   help="with torchrun: seconds a rank waits for the others at a collective (a turn's upload "
                        "broadcast) before the whole run stops with one error line; it must exceed rank 0's "
                        "evaluation time")
    cfg = p.parse_args(argv)
    for k, v in TASK_DEFAULTS[cfg.task].items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    check_config(cfg)
    return cfg


class InputError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


def check_config(cfg):
    if cfg.dataset not in DATASETS[cfg.task]:
        raise InputError(f"--dataset {cfg.dataset} is not a {cfg.task} dataset: choose one of "
                         f"{', '.join(DATASETS[cfg.task])}")
    if cfg.local_steps is not None and cfg.local_epochs is not None:
        raise InputError("give --local_steps or --local_epochs, not both")
    if cfg.local_steps is None and cfg.local_epochs is None:
        cfg.local_steps = 8
    for name in ("rounds", "batch_size", "grad_accum", "max_length"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name} must be >= 1 (got {getattr(cfg, name)})")
    for name in ("num_clients", "eval_samples", "max_new_tokens"):
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    if not (math.isfinite(cfg.head_lr_scale) and cfg.head_lr_scale >= 0):
        raise InputError(f"--head_lr_scale must be a finite number >= 0 (got {cfg.head_lr_scale})")
    if cfg.logit_adjust and (cfg.task != "glue" or tasks.glue.NUM_LABELS.get(cfg.dataset, 2) < 2):
        raise InputError("--logit_adjust needs a classification task (--task glue, not stsb)")
    if cfg.warmup_steps < 0:
        raise InputError(f"--warmup_steps must be >= 0 (got {cfg.warmup_steps})")
    if cfg.eval_every < 1:
        raise InputError(f"--eval_every must be >= 1 (got {cfg.eval_every})")
    if (cfg.local_steps is not None and cfg.local_steps < 1) or (cfg.local_epochs is not None and cfg.local_epochs <= 0):
        raise InputError("--local_steps must be >= 1 and --local_epochs > 0")
    for name in ("lr", "dist_timeout"):  # nan fails every comparison, inf passes "> 0": test finiteness too
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise InputError(f"--{name} must be a finite number > 0 (got {getattr(cfg, name)})")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise InputError(f"--weight_decay must be a finite number >= 0, 0 for none (got {cfg.weight_decay})")
    if not 0 < cfg.download_fraction <= 1:
        raise InputError(f"--download_fraction must be in (0, 1] (got {cfg.download_fraction})")
    if cfg.download_fraction < 1 and cfg.download == "delta":
        raise InputError("--download_fraction < 1 drops blocks against the pretrained model: use it with "
                         "--download full or int8, not delta")
    if cfg.data_path and not Path(cfg.data_path).exists():
        raise InputError(f"--data_path {cfg.data_path} not found")
    if cfg.iid != "iid" and not (cfg.iid.startswith("dir") and _is_float(cfg.iid[3:]) and float(cfg.iid[3:]) > 0):
        raise InputError(f"--iid must be 'iid' or 'dirALPHA' with ALPHA > 0, e.g. dir0.5 (got {cfg.iid})")


def _is_float(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------
# model: load any Hugging Face model; two packaged defaults work offline
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# blocks: one per transformer layer, found from the model's structure (no per-model name lists)
# ----------------------------------------------------------------------------------------------------
def _signature(module):
    return type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def find_blocks(model, train_embeddings=False):
    """-> (cycle, units). units: ordered dict unit name -> list of parameter names; cycle: the unit names
    that take turns (one per layer, plus "embeddings" last if train_embeddings).

    The layer stack is the nn.ModuleList of identical layers (same class, same parameter shapes) holding
    the most parameters: model.layers in Llama, transformer.h in GPT-2, encoder.layer in BERT/RoBERTa.
    Parameters registered before the stack are the input side ("embeddings": token/position embeddings,
    BERT's embedding LayerNorm); those after it are the output side ("head": final norm, pooler,
    classifier, an untied LM head). A tied LM head is the embedding matrix and belongs to "embeddings".
    """
    best, best_size = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({_signature(m) for m in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise InputError(f"{type(model).__name__}: no nn.ModuleList of identical layers found, so no blocks")
    layer_of = {}
    for i, layer in enumerate(model.get_submodule(best)):
        for n, _ in layer.named_parameters():
            layer_of[f"{best}.{i}.{n}"] = f"layer.{i}"
    units = {"embeddings": []}
    units.update({f"layer.{i}": [] for i in range(len(model.get_submodule(best)))})
    units["head"] = []
    side = "embeddings"
    for n, _ in model.named_parameters():  # registration order: input side, the stack, output side
        if n in layer_of:
            units[layer_of[n]].append(n)
            side = "head"
        else:
            units[side].append(n)
    cycle = [u for u in units if u.startswith("layer.")] + (["embeddings"] if train_embeddings and units["embeddings"] else [])
    return cycle, units


def block_of_turn(cycle, switch_mode, seed, rnd, client, num_clients):
    """The unit client `client` trains in round `rnd` (from 1): a pure function of these numbers, so resume and
    every rank agree. With turn index t = (rnd - 1) * num_clients + client and L = len(cycle):
      ascending    cycle[t mod L]        (every block visited even with fewer clients than blocks)
      descending   cycle[L-1 - t mod L]
      permutation  a fresh random permutation of the cycle for every sweep of L turns
      random       the official code's mode: each client draws its own blocks, without replacement over its
                   rounds (a fresh permutation per client for every L rounds), independently of the others:
                   two clients may train the same block in one round, and a block may go untrained
    """
    L = len(cycle)
    turn = (rnd - 1) * num_clients + client
    if switch_mode == "ascending":
        return cycle[turn % L]
    if switch_mode == "descending":
        return cycle[L - 1 - turn % L]
    if switch_mode == "permutation":
        sweep = torch.Generator().manual_seed(derive_seed(seed, "sweep", turn // L))
        return cycle[torch.randperm(L, generator=sweep)[turn % L].item()]
    own = torch.Generator().manual_seed(derive_seed(seed, "client-blocks", client, (rnd - 1) // L))
    return cycle[torch.randperm(L, generator=own)[(rnd - 1) % L].item()]


def learning_rate(args, step, total_steps):
    """The learning rate of optimizer step `step` (0-based, counted over the whole run: the schedule is carried
    from turn to turn, as the official code carries its scheduler from client to client) of `total_steps`:
    linear warmup over --warmup_steps, then constant, or a cosine from --lr down to 0 at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_scheduler == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def derive_seed(*parts):
    """A 63-bit seed from (seed, round, client, ...): resume needs nothing but these numbers."""
    h = 1469598103934665603
    for part in parts:
        for byte in str(part).encode() + b"|":
            h = ((h ^ byte) * 1099511628211) % (1 << 64)  # FNV-1a
    return h >> 1


# ----------------------------------------------------------------------------------------------------
# the wire: messages are dicts of tensors, serialised with safetensors; the ledger counts their length
# ----------------------------------------------------------------------------------------------------
def quantize_int8(w):
    """Per-row symmetric int8: w [rows, ...] -> (q int8 [rows, cols], scale fp32 [rows]).

    Each row keeps its own scale = max|row| / 127, so |w - dequantize(q, scale)| <= scale / 2 elementwise.
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)
    scale = w2.abs().amax(dim=1) / 127
    q = torch.round(w2 / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q, scale, shape, dtype):
    return (q.float() * scale[:, None]).reshape(shape).to(dtype)


# ----------------------------------------------------------------------------------------------------
# server side: the exact global weights, a version counter per unit, and what each client already has
# ----------------------------------------------------------------------------------------------------
def init_server(model, units):
    return {
        "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
        "version": {u: 0 for u in units},  # bumped every time an upload changes the unit
        "seen": {},                         # client -> {unit: version it holds}; missing = 0 (pretrained)
        "lossy": {},                        # client -> [units it holds only as an int8 copy]
    }


def server_download(server, units, client, block, mode, fraction=1.0, seed=0):
    """The message the server sends client `client` before it trains `block`: dict name -> tensor.

    full   every tensor, every turn (the naive baseline);
    delta  the units whose version differs from what the client holds, exact;
    int8   the same units as delta, but every matrix (ndim >= 2) of a unit the client will not train goes as
           name+".q8" (int8) and name+".scale" (fp32 per row); the client's own block and the head are sent
           exact when it lacks them exactly (also when it holds them only as int8). A unit the client holds
           at its current version is never sent again, so frozen units (the embeddings, when not trained)
           never travel and a tied LM head stays exact;
    fraction < 1 (full or int8): of the units that differ from pretrained, the client's block, the head and a
           seeded random ceil(fraction * n) of the n others; the client takes everything else from its
           pretrained copy.
    The server records what the client holds afterwards (version per unit, and which units only as int8).
    """
    version, seen = server["version"], server["seen"].get(client, {})
    lossy = set(server["lossy"].get(client, ()))
    own = {block, "head"}
    if fraction < 1:  # the official random dropping, against the pretrained copy every client has
        changed = [u for u in units if version[u] > 0 and u not in own]
        g = torch.Generator().manual_seed(seed)
        keep = math.ceil(len(changed) * fraction)
        kept = [changed[i] for i in sorted(torch.randperm(len(changed), generator=g)[:keep].tolist())]
        send = [u for u in units if (u in own and version[u] > 0) or u in kept]
    elif mode == "full":
        send = list(units)
    else:  # delta, int8: only what the client lacks
        send = [u for u in units if version[u] != seen.get(u, 0) or (u in own and u in lossy)]
    message, quantised = {}, set()
    for u in send:
        for n in units[u]:
            w = server["weights"][n]
            if mode == "int8" and u not in own and w.ndim >= 2:  # 1-D tensors (norms, biases) are tiny: exact
                message[n + ".q8"], message[n + ".scale"] = quantize_int8(w)
                quantised.add(u)
            else:
                message[n] = w
    # what the client holds afterwards: what was sent; the rest it already held at the current version, except
    # under fraction < 1, where the rest is pretrained (version 0, exact)
    server["seen"][client] = {u: version[u] if u in send or fraction >= 1 else 0 for u in units}
    server["lossy"][client] = sorted(quantised | {u for u in lossy if u not in send and fraction >= 1})
    return message


def sent_units(message, units):
    """The units a download carries, in cycle order; ':int8' marks those sent quantised (for the ledger)."""
    return [u + (":int8" if any(n + ".q8" in message for n in names) else "") for u, names in units.items()
            if any(n in message or n + ".q8" in message for n in names)]


def held_weights(server, units, client, base=None):
    """What client `client` holds of every tensor, after `server_download` recorded its download: the simulation
    rebuilds it from the server's record instead of keeping a model per client. Pretrained (`base`) for units
    it holds at version 0, a dequantised int8 copy of the current weights for units it holds only as int8,
    the current weights otherwise. The download's tensors then overwrite these (`sync_model(model, message,
    base=held_weights(...))`)."""
    seen, lossy = server["seen"].get(client, {}), set(server["lossy"].get(client, ()))
    held = {}
    for u, names in units.items():
        for n in names:
            w = server["weights"][n]
            if seen.get(u, 0) == 0 and base is not None:
                held[n] = base[n]
            elif u in lossy and w.ndim >= 2:
                held[n] = dequantize_int8(*quantize_int8(w), w.shape, w.dtype)
            else:
                held[n] = w
    return held


def sync_model(model, message, base=None):
    """Client side of the download: write the message into the model. Tensors the message leaves out keep
    the client's own copy, or are taken from `base` (the pretrained weights) when given."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            if n in message:
                p.copy_(message[n])
            elif n + ".q8" in message:
                p.copy_(dequantize_int8(message[n + ".q8"], message[n + ".scale"], p.shape, p.dtype))
            elif base is not None:
                p.copy_(base[n])


def server_aggregate(server, client, upload, units):
    """The server takes a client's upload (its block and the head). In the cycle exactly one client holds a
    block at a time, so aggregation is replacement, followed by a version bump of the units touched; the
    uploader already holds those new versions, so its next delta will not send them back."""
    touched = [u for u, names in units.items() if any(n in upload for n in names)]
    with torch.no_grad():
        for n, t in upload.items():
            server["weights"][n].copy_(t)
    for u in touched:
        server["version"][u] += 1
        server["seen"].setdefault(client, {})[u] = server["version"][u]
    return touched


# ----------------------------------------------------------------------------------------------------
# client side: one turn = AdamW on one block (plus head) for local_steps steps, then upload that block
# ----------------------------------------------------------------------------------------------------
def label_log_prior(examples, num_labels):
    """log of a client's label frequencies [num_labels] (add-one smoothed: a label it never saw stays finite)."""
    counts = torch.ones(num_labels)
    for e in examples:
        counts[e["labels"]] += 1
    return (counts / counts.sum()).log()


def client_update(model, train_names, batches, lrs, weight_decay, grad_accum, seed, head_names=(), head_lr_scale=1.0,
                  log_prior=None):
    """One client turn. Only `train_names` (the client's block and the head) require grad; those also in
    `head_names` learn at head_lr_scale times the rate. log_prior (classification only): the log of the client's
    own label frequencies [num_labels], added to the logits in the training loss (logit adjustment), so that a
    client whose data is nearly one label does not teach the shared head its label prior.

    batches: list of local_steps * grad_accum micro-batches (dicts of tensors on the model's device).
    lrs: the learning rate of each optimizer step (len(batches) // grad_accum of them; see `learning_rate`).
    Optimizer state lifetime: the AdamW moments (and the fp32 masters) are created here and freed when
    the turn ends; nothing of them crosses the wire or survives to the client's next turn, when it will
    usually train another block. With bf16/fp16 weights AdamW runs on fp32 master copies of the block,
    so updates below the low precision's resolution accumulate in fp32 during the turn.
    Returns (upload message: name -> tensor of the trained parameters, stats dict).
    """
    torch.manual_seed(seed)  # dropout, if the model has any, is a function of (seed, round, client)
    params = dict(model.named_parameters())
    trained = [(n, params[n]) for n in train_names]
    for _, p in trained:
        p.requires_grad_(True)
    low_precision = any(p.dtype != torch.float32 for _, p in trained)
    # masters [same shapes, fp32]: the tensors AdamW updates; with fp32 weights they are the weights themselves
    masters = [(n, p.detach().float().clone()) if low_precision else (n, p) for n, p in trained]
    head = set(head_names)
    groups = [dict(g, lr_scale=1.0) for g in tasks.param_groups([m for m in masters if m[0] not in head], weight_decay)]
    groups += [dict(g, lr_scale=head_lr_scale)
               for g in tasks.param_groups([m for m in masters if m[0] in head], weight_decay)]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8)
    model.train()
    losses, peak_activations = [], 0
    for step in range(len(batches) // grad_accum):
        for micro in batches[step * grad_accum:(step + 1) * grad_accum]:
            with tasks.SavedActivations(model) as saved:
                if log_prior is None:
                    loss = model(**micro).loss
                else:  # cross-entropy of (logits + log prior): the prior is explained away, not learned
                    logits = model(**{k: v for k, v in micro.items() if k != "labels"}).logits  # [B, labels]
                    loss = F.cross_entropy(logits.float() + log_prior, micro["labels"])
            peak_activations = max(peak_activations, saved.bytes)
            (loss / grad_accum).backward()
            losses.append(loss.item())
        if low_precision:
            for (_, m), (_, p) in zip(masters, trained):
                m.grad, p.grad = p.grad.float(), None
        grad_bytes = tasks.tensor_bytes(m.grad for _, m in masters)
        for group in opt.param_groups:
            group["lr"] = lrs[step] * group["lr_scale"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if low_precision:
            with torch.no_grad():
                for (_, m), (_, p) in zip(masters, trained):
                    p.copy_(m)  # round the fp32 master once into the weight dtype
    # the memory this turn needed, as tensor bytes: every weight the client holds, the block's gradients,
    # Adam moments, fp32 masters, and the activations autograd saved (max over micro-batches)
    state_bytes = tasks.tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    peak = (tasks.tensor_bytes(model.parameters()) + grad_bytes + state_bytes
            + (tasks.tensor_bytes(m for _, m in masters) if low_precision else 0) + peak_activations)
    for _, p in trained:
        p.requires_grad_(False)
        p.grad = None
    del opt, masters
    model.eval()
    upload = {n: p.detach().clone() for n, p in trained}
    return upload, {"loss": sum(losses) / len(losses), "peak_memory_bytes": peak}


# ----------------------------------------------------------------------------------------------------
# data: per task, lists of examples per client and a held-out list; micro-batches are built per turn
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# evaluation of the global model
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# outputs: atomic checkpoints, metrics lines, progress, plot
# ----------------------------------------------------------------------------------------------------
RESUME_FREE = ("rounds", "eval_every", "resume", "device", "output_dir", "dist_timeout")  # may change across a resume


def save_checkpoint(out, server, round_):
    """ckpt-R/ (server weights + versions) written under a temporary name, renamed, then `latest` moved."""
    from safetensors.torch import save_file
    final, tmp = out / f"ckpt-{round_}", out / f"ckpt-{round_}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({n: t.contiguous() for n, t in server["weights"].items()}, tmp / "weights.safetensors")
    (tmp / "state.json").write_text(json.dumps({"round": round_, "version": server["version"],
                                                "seen": {str(c): s for c, s in server["seen"].items()},
                                                "lossy": {str(c): s for c, s in server["lossy"].items()}}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    tasks.write_atomic(out / "latest", final.name)
    for old in out.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out, server):
    """Restore the server state from the checkpoint `latest` names -> its round. A truncated or foreign
    checkpoint (unreadable files, missing or misshapen tensors, missing state) is an InputError."""
    from safetensors.torch import load_file
    ckpt = out / (out / "latest").read_text().strip()
    try:
        weights = load_file(ckpt / "weights.safetensors")
        state = json.loads((ckpt / "state.json").read_text())
        version, seen, round_ = state["version"], {int(c): s for c, s in state["seen"].items()}, int(state["round"])
        lossy = {int(c): s for c, s in state["lossy"].items()}
        bad = [n for n, t in server["weights"].items() if n not in weights or weights[n].shape != t.shape]
    except Exception as e:  # noqa: BLE001  safetensors, json and the file system raise many types
        raise InputError(f"--resume: {ckpt} cannot be read ({type(e).__name__}): it is truncated or not a "
                         "fedcybgd checkpoint") from None
    if bad or set(version) != set(server["version"]):
        raise InputError(f"--resume: {ckpt} does not fit this model ({len(bad)} tensors missing or misshapen)")
    with torch.no_grad():
        for n, t in server["weights"].items():
            t.copy_(weights[n])
    server["version"], server["seen"], server["lossy"] = version, seen, lossy
    return round_


def plot_losses(out, metrics, ledger):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([(t["turn"] + 1) / t["turns_per_round"] for t in ledger], [t["loss"] for t in ledger], ".", ms=3,
            alpha=0.5, label="train loss (client turns)")
    ev = [m for m in metrics if m.get("eval_loss") is not None]
    ax.plot([m["round"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="held-out loss")
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# across processes: torchrun ranks; a turn's upload is the only thing that crosses, as a uint8 tensor
# ----------------------------------------------------------------------------------------------------
class GroupError(Exception):
    """A rank exited or hangs: the run stops with one line (exit code 3); --resume restarts the group."""


def rank_and_device(device):
    """-> (rank, world size, device) from torchrun's environment; with a plain 'cuda', each rank takes GPU
    LOCAL_RANK. Without torchrun: (0, 1, device). Nothing is joined yet: see `join_group`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return int(os.environ.get("RANK", "0")), world, device


def join_group(cfg, world, device):
    """Under torchrun, join the process group: gloo on CPU, NCCL on CUDA. Called only once the model and tokenizer
    are loaded: loading them with transformers while a group exists keeps a reference to it, so that
    `destroy_process_group()` at the end cannot free gloo's worker threads, and tearing them down during
    interpreter exit could abort the process ("terminate called without an active exception")."""
    if world <= 1:
        return
    backend = "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        backend = "nccl"
    # every collective below gives up after --dist_timeout seconds instead of waiting forever for a lost rank
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    except RuntimeError:
        raise GroupError(f"rank {os.environ.get('RANK', '?')}: the process group did not form within "
                         f"{cfg.dist_timeout:g} s (check the launch command on every machine)") from None

    def stopped_by_launcher(signum, frame):  # torchrun sends SIGTERM to the others when one rank fails
        raise GroupError("stopped by the launcher: a rank exited (or the launcher itself was stopped)")

    signal.signal(signal.SIGTERM, stopped_by_launcher)


def collective(fn, *a, **kw):
    """Run one torch.distributed call; a lost rank (timeout or closed connection) becomes a GroupError."""
    try:
        return fn(*a, **kw)
    except RuntimeError as e:  # torch.distributed.DistError and gloo/NCCL errors are RuntimeErrors
        raise GroupError("timeout" if "timed out" in str(e).lower() or "timeout" in str(e).lower()
                         else "a rank left the group") from None


HEADER_BYTES = 24  # float64[3] in front of every upload broadcast: message length, turn loss, peak memory


def broadcast_upload(wire_up, stats, src, rank, device):
    """Client rank `src`'s upload message (bytes) and its turn statistics -> every rank. Two `dist.broadcast`s:
    a float64[3] header (message length, mean train loss, peak memory bytes -- the last two for the metrics
    only; float64 holds both exactly), then the message as uint8[length]. Each other rank receives
    HEADER_BYTES + len(message) bytes. -> (message bytes, stats) on every rank."""
    head = torch.tensor([len(wire_up), stats["loss"], stats["peak_memory_bytes"]] if rank == src else [0.0] * 3,
                        dtype=torch.float64, device=device)
    collective(dist.broadcast, head, src=src)
    n, loss, peak = head.tolist()
    if rank == src:
        buf = torch.frombuffer(bytearray(wire_up), dtype=torch.uint8).to(device)
    else:
        buf = torch.empty(int(n), dtype=torch.uint8, device=device)
    collective(dist.broadcast, buf, src=src)
    return (wire_up if rank == src else buf.cpu().numpy().tobytes()), {"loss": loss, "peak_memory_bytes": int(peak)}


def wire_ledger(r, turns, world):
    """The bytes round r's broadcasts moved, per rank (the ledger.jsonl lines with "rank"): tensor payloads as
    `broadcast_upload` builds them, a sender counting one copy per receiving rank; the transport's own framing
    (gloo/NCCL headers, TCP) is not counted."""
    entries = []
    for k in range(world):
        mine = [t for t in turns if t["client"] % world == k]
        entries.append({"round": r, "rank": k, "clients": [t["client"] for t in mine],
                        "sent": (world - 1) * sum(HEADER_BYTES + t["upload_bytes"] for t in mine),
                        "received": sum(HEADER_BYTES + t["upload_bytes"] for t in turns if t not in mine)})
    return entries


# ----------------------------------------------------------------------------------------------------
# the rounds
# ----------------------------------------------------------------------------------------------------
def main(argv=None):
    cfg = get_config(argv)
    out = Path(cfg.output_dir)
    # checked by every rank before the group forms, so no rank can see rank 0's first checkpoint here
    if (out / "latest").exists() and not cfg.resume:
        raise InputError(f"{out} already holds a run: pass --resume to continue it or pick another --output_dir")
    if cfg.resume and not (out / "latest").exists():
        raise InputError(f"--resume: no checkpoint in {out}")
    if cfg.resume:
        try:
            old = json.loads((out / "config.json").read_text())
        except (OSError, ValueError):
            raise InputError(f"--resume: {out / 'config.json'} is missing or not JSON: not a fedcybgd run") from None
        diff = [k for k in old if k not in RESUME_FREE and old[k] != getattr(cfg, k, None)]
        if cfg.lr_scheduler == "cosine" and old.get("rounds") != cfg.rounds:
            diff.append("rounds (the cosine schedule spans the whole run)")
        if diff:
            raise InputError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {cfg.device}: this torch build sees no CUDA device")
    rank, world, device = rank_and_device(device)  # (0, 1, device) without torchrun; the group forms below
    wire_device = torch.device(device if world > 1 and device.startswith("cuda") else "cpu")  # of the collectives
    if rank != 0:  # rank 0 speaks for the run and writes every output; the others print nothing (errors aside)
        sys.stdout = open(os.devnull, "w")
    torch.manual_seed(cfg.seed)  # a randomly initialized head is the same on every run, rank and resume

    # model first: its layers decide the blocks, and the blocks decide the default number of clients
    num_labels = tasks.glue.NUM_LABELS.get(cfg.dataset, 2)
    model, tokenizer = tasks.load_model(cfg.model, cfg.task, num_labels, cfg.dtype, device)
    join_group(cfg, world, device)  # after loading: see join_group
    model.requires_grad_(False).eval()
    cycle, units = find_blocks(model, cfg.train_embeddings)
    num_clients = cfg.num_clients or len(cycle)
    params = dict(model.named_parameters())
    nparams = {u: sum(params[n].numel() for n in names) for u, names in units.items()}
    print(f"model {cfg.model}: {sum(nparams.values()) / 1e6:.1f}M parameters, {len(cycle)} blocks in the cycle "
          f"(~{nparams[cycle[0]] / 1e6:.2f}M each), head {nparams['head'] / 1e6:.3f}M, embeddings "
          f"{nparams['embeddings'] / 1e6:.1f}M ({'trained as a block' if 'embeddings' in cycle else 'frozen'}); "
          f"{num_clients} clients, download {cfg.download}"
          + (f" with fraction {cfg.download_fraction}" if cfg.download_fraction < 1 else "")
          + (f"; {world} ranks (torchrun), client c on rank c % {world}, rank 0 evaluates and writes" if world > 1
             else ""))

    clients, test = tasks.load_task_data(cfg, tokenizer, num_clients)
    server = init_server(model, units)  # under torchrun: every rank's replica, kept equal by the same uploads
    pretrained = ({n: p.detach().clone() for n, p in model.named_parameters()}
                  if cfg.download_fraction < 1 else None)  # the copy every client starts from

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    start = 0
    metrics, ledger = [], []
    if cfg.resume:  # every rank loads the checkpoint: on several machines --output_dir must be shared
        start = load_checkpoint(out, server)
        sync_model(model, server["weights"])
        # drop what a crash left after the checkpoint: those rounds run again, bit for bit
        metrics = [m for m in tasks.read_jsonl(out / "metrics.jsonl") if m["round"] <= start]
        lines = [t for t in tasks.read_jsonl(out / "ledger.jsonl") if t["round"] <= start]
        ledger = [t for t in lines if "turn" in t]  # (not the per-rank lines of torchrun)
        if rank == 0:
            tasks.write_atomic(out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
            tasks.write_atomic(out / "ledger.jsonl", "".join(json.dumps(t) + "\n" for t in lines))
        print(f"resumed from round {start}")
    if rank == 0:
        tasks.write_atomic(out / "config.json", json.dumps({k: v for k, v in vars(cfg).items()}, indent=2))

    def log_round(row):
        metrics.append(row)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    if start == 0 and rank == 0:
        t0 = time.time()
        row = {"round": 0, "train_loss": None, **tasks.evaluate(cfg, model, tokenizer, test, device),
               "upload_bytes": None, "download_bytes": None, "seconds": 0.0, "peak_memory_bytes": None}
        row["seconds"] = round(time.time() - t0, 2)
        log_round(row)
        print("round 0 " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                    if isinstance(v, float) and k != "seconds" and "bytes" not in k)
              + f" (evaluation {row['seconds']:.0f}s)")
        save_checkpoint(out, server, 0)
    saved = start  # the round of the last checkpoint written (rank 0), for the fault message

    log_priors = [label_log_prior(examples, num_labels) for examples in clients] if cfg.logit_adjust else None
    # optimizer steps of each client's turn (the same every round), and of the whole run, for the schedule
    per_step = cfg.batch_size * cfg.grad_accum
    turn_steps = [cfg.local_steps or max(1, math.ceil(cfg.local_epochs * len(examples) / per_step))
                  for examples in clients]
    steps_per_round = sum(turn_steps)
    total_steps = cfg.rounds * steps_per_round
    progress = tasks.Progress(cfg.rounds * num_clients, start * num_clients)
    r = start
    try:
        for r in range(start + 1, cfg.rounds + 1):
            t0 = time.time()
            turns = []
            for c in range(num_clients):
                turn = (r - 1) * num_clients + c
                block = block_of_turn(cycle, cfg.switch_mode, cfg.seed, r, c, num_clients)
                seed = derive_seed(cfg.seed, r, c)
                owner = c % world  # the rank that holds client c (always 0 in one process)
                # download: server -> client c, then the client brings its model up to date. Every rank runs
                # server_download on its replica (it records what c now holds); only c's rank and rank 0 (for the
                # ledger) serialise it. Under torchrun nothing carries it: c's rank builds it from its replica.
                down = server_download(server, units, c, block, cfg.download, cfg.download_fraction, seed)
                wire_down = tasks.pack(down) if rank in (0, owner) else b""
                wire_up, stats = b"", None
                first = (r - 1) * steps_per_round + sum(turn_steps[:c])  # the schedule's steps before this turn
                lrs = [learning_rate(cfg, first + k, total_steps) for k in range(turn_steps[c])]
                if rank == owner:
                    # lossless modes: the working model already holds the global weights (every turn's upload is
                    # applied on every rank), so only the lossy modes rebuild the client's own copy first
                    lossy = cfg.download == "int8" or pretrained is not None
                    sync_model(model, tasks.unpack(wire_down),
                               base=held_weights(server, units, c, pretrained) if lossy else None)
                    # the turn: train the block (and head) on the client's data, upload them
                    batches = tasks.local_batches(cfg, clients[c], tokenizer, device, seed)
                    upload, stats = client_update(model, units[block] + units["head"], batches, lrs, cfg.weight_decay,
                                                  cfg.grad_accum, seed, units["head"], cfg.head_lr_scale,
                                                  log_priors[c] if cfg.logit_adjust else None)
                    wire_up = tasks.pack(upload)
                if world > 1:  # the upload: client c's rank -> every other rank
                    wire_up, stats = broadcast_upload(wire_up, stats, owner, rank, wire_device)
                upload = tasks.unpack(wire_up)
                server_aggregate(server, c, upload, units)
                if rank != owner:
                    sync_model(model, upload)  # the other ranks' working copies follow the global model
                row = {"round": r, "turn": turn, "turns_per_round": num_clients, "client": c, "block": block,
                       "lr_first": lrs[0], "lr_last": lrs[-1],
                       "download_units": sent_units(down, units),
                       "loss": stats["loss"], "upload_bytes": len(wire_up), "download_bytes": len(wire_down),
                       "peak_memory_bytes": stats["peak_memory_bytes"]}
                turns.append(row)
                progress.turn(f"round {r} client {c} {block}: loss {stats['loss']:.4f} up {tasks.fmt_bytes(len(wire_up))} "
                              f"down {tasks.fmt_bytes(len(wire_down))} mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}"
                              + (f" (rank {owner})" if world > 1 else ""))
            if pretrained is not None or cfg.download == "int8":
                sync_model(model, server["weights"])  # lossy views: evaluate (and continue from) the exact model
            if rank != 0:
                continue  # evaluation and outputs are rank 0's; the others wait at the next turn's broadcast
            row = {"round": r, "train_loss": sum(t["loss"] for t in turns) / len(turns)}
            if r % cfg.eval_every == 0 or r == cfg.rounds:
                row.update(tasks.evaluate(cfg, model, tokenizer, test, device))
            row.update(upload_bytes=sum(t["upload_bytes"] for t in turns) / len(turns),  # mean per client turn
                       download_bytes=sum(t["download_bytes"] for t in turns) / len(turns),
                       upload_bytes_total=sum(t["upload_bytes"] for t in turns),
                       download_bytes_total=sum(t["download_bytes"] for t in turns),
                       seconds=round(time.time() - t0, 2),
                       peak_memory_bytes=max(t["peak_memory_bytes"] for t in turns))
            with open(out / "ledger.jsonl", "a") as f:
                f.writelines(json.dumps(t) + "\n" for t in turns + (wire_ledger(r, turns, world) if world > 1 else []))
            ledger += turns
            log_round(row)
            save_checkpoint(out, server, r)  # the round is complete: its last broadcast reached every rank
            saved = r
            progress.log("round {} ".format(r) + " ".join(
                f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "seconds" and "bytes" not in k)
                + f" up {tasks.fmt_bytes(row['upload_bytes'])} down {tasks.fmt_bytes(row['download_bytes'])} {row['seconds']:.0f}s")
    except GroupError as e:  # a rank exited or hangs: one line, no traceback
        why = (f"a rank did not answer within {cfg.dist_timeout:g} s" if str(e) == "timeout"
               else str(e) if "launcher" in str(e) else "a rank exited")
        last = (f"the last complete checkpoint is round {saved}" if rank == 0
                else "rank 0 keeps the last complete round in its checkpoint")
        raise GroupError(f"rank {rank}: {why} in round {r}; {last}: rerun every rank with --resume") from None
    finally:
        progress.close()
    if rank == 0:
        plot_losses(out, metrics, ledger)
        sync_model(model, server["weights"])  # the exact global model (a lossy download may have differed)
        progress.log(f"wrote {tasks.export_model(model, tokenizer, out / 'model')} (save_pretrained: config, "
                     "weights, tokenizer)")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (InputError, tasks.DataError, tasks.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except GroupError as e:
        print(f"fedcybgd: {e}", file=sys.stderr, flush=True)
        os._exit(3)  # at once: tearing down a process group that lost a rank can block
    except KeyboardInterrupt:
        print("interrupted: rerun with --resume to continue from the last complete round", file=sys.stderr)
        sys.exit(130)
