"""FedCyBGD: federated full-parameter tuning by cycle block gradient descent (Wang et al., arXiv 2406.11187).

    python fedcybgd.py --task sft  --dataset dolly     # SmolLM2-135M-Instruct on Dolly-15K: held-out loss, Rouge-L
    python fedcybgd.py --task glue --dataset mrpc      # the MiniLM-L6 encoder + a classifier: accuracy, F1

The method. A transformer is a stack of layers; each layer is a *block* (`find_blocks`). Block coordinate descent
trains one block at a time while the others stay frozen, so gradients, Adam moments (and, with bf16/fp16 weights,
an fp32 master copy) exist for one block only: a fraction of full fine-tuning's memory. FedCyBGD spreads this over
clients that take turns in a fixed cycle, each turn starting from the model the previous turn left:

    round r:  client 0 trains block b(0)  ->  client 1 trains block b(1)  ->  ...  ->  client N-1
              (turn t = (r-1)*N + c of the cycle trains block t mod L of the L blocks: `block_of_turn`)

A turn: (1) the server sends client c what it lacks of the current model (`server_download`), which the client
writes into its copy (`sync_model`); (2) the client trains its block and the small task head (everything after the
layer stack) with AdamW on its own data for --local_steps steps (`client_update`; the Adam state lives for the turn
only); (3) it uploads only the block and the head; the server checks them (`check_upload`) and, since one client
holds a block at a time, takes them by replacement, bumping a version per block (`server_aggregate`).
`client_round` is a client's side of a turn, `turn` the server's, `train` the round loop.

A device keeps its data and the weights it holds (the model as of its last turn); the server keeps the exact global
weights and a record of what each client holds (the version of every block; which blocks only as int8). Crossing the
wire (safetensors messages, their bytes in ledger.jsonl per turn): up, the block and the head; down, by --download:
    full   the whole model, every turn (the naive baseline)
    delta  only the blocks that changed since this client's last turn (lossless, the default)
    int8   delta's blocks, every matrix of a block the client will not train quantised to int8 per row; its own
           block and the head exact; a block it holds at its current version is never sent again, so frozen
           embeddings (and a tied LM head) never travel

Options beyond the paper (their section below; the glue and squad defaults are the official code's regime):
    --iid stream                clients own no data: each turn takes the next batches of one stream over the data
    --layers_per_turn k         k blocks a turn (--switch_mode random: a fresh draw of k distinct blocks every turn)
    --switch_mode               the order of the blocks: ascending, descending, permutation, random (official)
    --lr_scheduler, --warmup_*  one learning-rate curve over the whole run, carried from turn to turn
    --max_grad_norm             clip each step's gradient (the trained tensors together) to this norm
    --download_fraction f       the official random block dropping: a fraction f of the changed blocks is sent
    --logit_adjust, --head_lr_scale   candidate remedies for label skew (docs/label-skew.md)
    --train_embeddings          the input embeddings become one more block of the cycle
    --tensor_bound c, --max_change f  robust aggregation (tasks/robust.py): each tensor's change within c x the recent
                                lower median; an upload that moves the weights by more than f of their norm is refused

In one process the clients take turns on ONE model; under torchrun client c lives on rank c % world (every rank
keeps an equal replica of the server); on Flower on a SuperNode that keeps its weights on disk. A client that does not
answer, or whose upload is refused, loses its turn and is treated as pretrained again.
docs/fedcybgd.md: flags, defaults, figures, differences from the official code (L3030/FedCyBGD); docs/label-skew.md.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import tasks
from tasks import ConfigError, GroupError, derive_seed

# -------- config: defaults run out of the box on a CPU; per-task defaults fill whatever is left as None
TASK_DEFAULTS = {
    # sft: FedKSeed's Dolly split (so the two scripts share clients), one block a turn, ascending, as causal_llms
    "sft": dict(dataset="dolly", model="smollm2-135m", lr=1e-4, batch_size=2, max_length=256, eval_samples=50,
                num_clients=0, rounds=2, iid="dir0.5", switch_mode="ascending", layers_per_turn=1, weight_decay=0.01,
                adam_eps=1e-8, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0),
    # glue: the official roberta-glue regime (docs/fedcybgd.md) but for lr, 4e-4 for the 6-layer MiniLM, chosen on
    # validation among 5e-5..4e-4 (the official 2e-5 is roberta-base's)
    "glue": dict(dataset="mrpc", model="minilm-l6", lr=4e-4, batch_size=64, max_length=128, eval_samples=0,
                 num_clients=24, rounds=3, iid="stream", switch_mode="random", layers_per_turn=0, weight_decay=0.0,
                 adam_eps=1e-6, lr_scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0),
    # squad: the official gpt/ regime: the same stream, 24 clients, 4 random layers, lr 3e-5, warmup 10% of a round
    "squad": dict(dataset="squad", model="gpt2", lr=3e-5, batch_size=8, max_length=384, eval_samples=200,
                  num_clients=24, rounds=3, iid="stream", switch_mode="random", layers_per_turn=0, weight_decay=0.0,
                  adam_eps=1e-8, lr_scheduler="linear", warmup_ratio=0.1, max_grad_norm=1.0),
}
DATASETS = {"sft": tasks.DATASETS, "glue": tasks.glue.TASKS, "squad": ("squad",)}
SHARED_FLAGS = ("dataset data_path model rounds num_clients local_steps batch_size lr weight_decay max_length iid seed "
                "output_dir resume eval_every eval_samples val_samples max_new_tokens max_change tensor_bound "
                "tensor_window device dtype dist_timeout")
CLIENT_STATS = ("loss", "peak_memory_bytes", "held_bytes", "step_bytes")  # a turn's statistics that travel with
# its upload, for the metrics (the memory: tasks/memory.py)


def parse_args(argv=None):
    defaults = "; ".join(f"{task}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for task, d in TASK_DEFAULTS.items())
    p = argparse.ArgumentParser(description="FedCyBGD: clients train one transformer block each, in a cycle.",
                                epilog=f"None: the --task's default ({defaults}).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("sft", "glue", "squad"), default="sft", help="sft: instruction tuning of a "
                   "causal LM; glue: sentence(-pair) classification; squad: extractive QA")
    tasks.flags.add(p, SHARED_FLAGS, output_dir=dict(default="out/fedcybgd"),
                    rounds=dict(help="full cycles: in a round every client takes one turn"),
                    num_clients=dict(help="clients in the cycle; 0 = one per block"),
                    local_steps=dict(help="optimizer steps a turn (None: 8 sft; glue, squad one client's share of "
                                     "the n examples in batches of B, floor(floor(n/N)/B), as the official code)"),
                    iid=dict(help="client split: 'stream' (clients own no data), 'iid' or 'dirALPHA'"))
    a = p.add_argument
    a("--switch_mode", choices=("ascending", "descending", "permutation", "random"), help="the blocks' order")
    a("--layers_per_turn", type=int, default=None, help="blocks a turn trains; 0 = 4 (the official GLUE/SQuAD code's "
      "4 of 12), or every block of a model with fewer")
    a("--local_epochs", type=float, default=None, help="passes over the client's data a turn, not --local_steps")
    a("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr_scheduler", choices=("constant", "cosine", "linear"), default=None, help="the learning rate over the "
      "whole run, carried from turn to turn: constant, or a decay to 0 at the end of the last round")
    a("--warmup_steps", type=int, default=0, help="linear warmup steps at the start of the run")
    a("--warmup_ratio", type=float, default=None, help="warmup over this fraction of one round's steps instead")
    a("--adam_eps", type=float, default=None, help="AdamW epsilon")
    a("--max_grad_norm", type=float, default=None, help="clip each step's gradient to this L2 norm; 0 = off")
    a("--head_lr_scale", type=float, default=1.0, help="the task head learns at this times --lr")
    a("--logit_adjust", action="store_true", help="glue: train on logits + the client's log label prior")
    a("--download", choices=("full", "delta", "int8"), default="delta", help="what a client receives before its turn")
    a("--download_fraction", type=float, default=1.0, help="< 1: send a random fraction of the blocks that differ "
      "from the pretrained model (own block and head always); with --download full or int8")
    a("--train_embeddings", action="store_true", help="the input embeddings become one more block of the cycle")
    args = p.parse_args(argv)
    tasks.flags.fill_task_defaults(args, TASK_DEFAULTS, DATASETS)
    tasks.flags.check(args, SHARED_FLAGS, num_clients=0)
    # fedcybgd's own flags; a ConfigError is one line
    if args.local_steps is not None and args.local_epochs is not None:
        raise ConfigError("give --local_steps or --local_epochs, not both")
    if args.local_steps is None and args.local_epochs is None and args.task == "sft":
        args.local_steps = 8  # glue, squad: load_parts derives the official turn
    tasks.flags.check_positive(args, "local_epochs adam_eps")  # None passes
    tasks.flags.check_nonnegative(args, "head_lr_scale max_grad_norm warmup_ratio")
    tasks.flags.check_at_least(args, {"grad_accum": 1, "layers_per_turn": 0, "warmup_steps": 0})
    for bad, why in [
            (args.warmup_ratio and args.warmup_steps, "give --warmup_steps or --warmup_ratio, not both"),
            (args.layers_per_turn != 1 and args.switch_mode == "permutation", "--layers_per_turn > 1 works with "
             "--switch_mode random, ascending or descending, not permutation"),  # 0: min(4, blocks) >= 2
            (args.logit_adjust and (args.task != "glue" or tasks.glue.NUM_LABELS.get(args.dataset, 2) < 2),
             "--logit_adjust needs a classification task (--task glue, not stsb)"),
            (args.iid == "stream" and args.local_epochs is not None, "--iid stream: clients own no data, so a turn is "
             "--local_steps batches, not --local_epochs"),
            (args.iid == "stream" and args.logit_adjust, "--logit_adjust needs clients that own data (a label prior "
             "of their own), not --iid stream"),
            (not 0 < args.download_fraction <= 1, f"--download_fraction {args.download_fraction}: must be in (0, 1]"),
            (args.download_fraction < 1 and args.download == "delta", "--download_fraction < 1 drops blocks against "
             "the pretrained model: use it with --download full or int8, not delta")]:
        if bad:
            raise ConfigError(why)
    args.device = tasks.flags.pick_device(args.device)  # config.json records the device the run used
    return args


# -------- blocks: one per transformer layer, found from the model's structure (no per-model name lists)
def find_blocks(model, train_embeddings=False):
    """-> (cycle, units): units, unit name -> its parameter names; cycle, the units that take turns (one per layer,
    and "embeddings" last with train_embeddings). The layer stack is the nn.ModuleList of identical layers with the
    most parameters (model.layers in Llama, transformer.h in GPT-2, encoder.layer in BERT); what precedes it is
    "embeddings" (a tied LM head too), what follows it the "head" (final norm, pooler, classifier, untied LM head)."""
    signature = lambda m: (type(m), tuple((n, tuple(p.shape)) for n, p in m.named_parameters()))  # noqa: E731
    stacks = [(sum(p.numel() for p in mod.parameters()), name) for name, mod in model.named_modules()
              if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({signature(m) for m in mod}) == 1]
    if not stacks:
        raise ConfigError(f"{type(model).__name__}: no nn.ModuleList of identical layers found, so no blocks")
    best = max(stacks, key=lambda size_name: size_name[0])[1]  # the first of the largest
    stack = model.get_submodule(best)
    layer_of = {f"{best}.{i}.{n}": f"layer.{i}" for i, layer in enumerate(stack) for n, _ in layer.named_parameters()}
    units, side = {"embeddings": [], **{f"layer.{i}": [] for i in range(len(stack))}, "head": []}, "embeddings"
    for n, _ in model.named_parameters():  # registration order: input side, the stack, output side
        side = "head" if n in layer_of else side
        units[layer_of.get(n, side)].append(n)
    cycle = [u for u in units if u.startswith("layer.")]
    return cycle + (["embeddings"] if train_embeddings and units["embeddings"] else []), units


# ====================================================================================================
# the method, in the order a turn happens: the cycle (whose turn trains which block), the server's download, the
# client's sync and training, the server's check and aggregation, then the round loop
# ====================================================================================================
def block_of_turn(cycle, switch_mode, seed, rnd, client, num_clients):
    """The unit client `client` trains in round `rnd` (from 1), a function of these numbers alone (resume, ranks).
    With turn t = (rnd - 1) * num_clients + client and L = len(cycle), by --switch_mode:
      ascending    cycle[t mod L] (every block visited, even with fewer clients than blocks); descending the reverse
      permutation  a fresh random permutation of the cycle for every sweep of L turns
      random       the official code's: each client draws its own blocks without replacement over its rounds (a
                   fresh permutation per client every L rounds), independently: two clients may share a block"""
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


def turn_plan(run, rnd, c):
    """Client c's turn of round rnd -> (its blocks, its seed, the learning rate of each of its steps): functions of
    the flags alone, so the server and the client's own process (its rank, its Flower node) compute the same."""
    args, per_round = run.args, sum(run.turn_steps)
    first = (rnd - 1) * per_round + sum(run.turn_steps[:c])  # the schedule is one curve over the run's steps
    # --lr by default; `learning_rate` (options, after the method) adds warmup and decay: a reader may skip it
    lrs = [learning_rate(args, first + k, args.rounds * per_round, run.warmup) for k in range(run.turn_steps[c])]
    # one block, `block_of_turn`, by default; `blocks_of_turn` (options) handles --layers_per_turn k > 1
    blocks = blocks_of_turn(run.cycle, args.switch_mode, args.seed, rnd, c, run.num_clients, run.layers_per_turn)
    return blocks, derive_seed(args.seed, rnd, c), lrs


def init_server(model, units):
    """The server: the exact global weights, a version per unit (bumped by every upload that changes it) and per
    client "seen" {unit: version it holds; missing = 0, pretrained} and "lossy" [units it holds only as int8]."""
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()}, "version": {u: 0 for u in units},
            "seen": {}, "lossy": {}, "recent": []}


def server_download(server, units, client, blocks, mode, fraction=1.0, seed=0):
    """The message the server sends client `client` before it trains `blocks` (units): dict name -> tensor. full:
    every tensor; delta: the units whose version differs from the client's, exact; int8: delta's units, but a matrix
    (ndim >= 2) of a unit the client will not train goes as name+".q8" (int8) and name+".scale" (fp32 per row); its
    own block and the head go exact unless it holds them exactly; fraction < 1: `fraction_units`, the rest pretrained.
    The server records what the client holds afterwards (version per unit, and which units only as int8)."""
    version, seen = server["version"], server["seen"].get(client, {})
    lossy = set(server["lossy"].get(client, ()))
    own = {*blocks, "head"}
    if fraction < 1:
        send = fraction_units(units, version, own, fraction, seed)
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
    # the client now holds what was sent, and the rest as it did (under fraction < 1 pretrained: version 0, exact)
    server["seen"][client] = {u: version[u] if u in send or fraction >= 1 else 0 for u in units}
    server["lossy"][client] = sorted(quantised | {u for u in lossy if u not in send and fraction >= 1})
    return message


def sent_units(message, units):
    """The units a download carries, in cycle order; ':int8' marks those sent quantised (for the ledger)."""
    return [u + (":int8" if any(n + ".q8" in message for n in names) else "") for u, names in units.items()
            if any(n in message or n + ".q8" in message for n in names)]


def held_weights(server, units, client, base=None):
    """What client `client` holds of every tensor, rebuilt from the server's record (no model per client is kept):
    pretrained (`base`) for units at version 0, the int8 rounding of the current weights for units it holds only as
    int8, the current weights otherwise. The download then overwrites these (`sync_model(..., base=held)`)."""
    seen, lossy = server["seen"].get(client, {}), set(server["lossy"].get(client, ()))
    held = {}
    for u, names in units.items():
        for n in names:
            w = server["weights"][n]
            held[n] = (base[n] if seen.get(u, 0) == 0 and base is not None else
                       dequantize_int8(*quantize_int8(w), w.shape, w.dtype) if u in lossy and w.ndim >= 2 else w)
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


def client_update(model, names, batches, lrs, weight_decay=0.0, grad_accum=1, seed=0, head=(), head_lr_scale=1.0,
                  log_prior=None, adam_eps=1e-8, max_grad_norm=0.0):
    """A turn's training: AdamW on `names` (the client's block and the head; the rest frozen), step k on grad_accum
    micro-batches of `batches` at lrs[k] -> (upload: name -> trained tensor, {"loss", "peak_memory_bytes"}). The Adam
    moments (and the fp32 masters of bf16/fp16 weights) live for this turn only. Options: `head` learns at
    head_lr_scale x the rate; log_prior (--logit_adjust) joins the logits; max_grad_norm > 0 clips each step."""
    head = set(head)

    def adamw(named):  # [(name, tensor)] -> AdamW; decay on ndim >= 2 only (tasks.param_groups)
        groups = [dict(g, lr_scale=scale) for in_head, scale in ((False, 1.0), (True, head_lr_scale))
                  for g in tasks.param_groups([m for m in named if (m[0] in head) == in_head], weight_decay)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lrs[0], betas=(0.9, 0.999), eps=adam_eps)
    loss_fn = None if log_prior is None else (lambda model, batch: logit_adjusted_loss(model, batch, log_prior))
    clip = (lambda tensors: clip_gradients(tensors, max_grad_norm)) if max_grad_norm > 0 else None
    return tasks.train_steps(model, names, batches, adamw, lrs, grad_accum, seed, loss_fn, clip)


def client_round(run, rnd, c, download):
    """Client c's turn where it lives (this process, its rank, its Flower node: every transport calls this): apply the
    download, train its block(s) and the head on its data -> (upload, stats). A lossy mode first rebuilds the client's
    copy (`held_weights`; a Flower node holds it, and resets to pretrained what --download_fraction did not send)."""
    args = run.args
    blocks, seed, lrs = turn_plan(run, rnd, c)
    base = run.pretrained if run.server is None else (
        held_weights(run.server, run.units, c, run.pretrained) if run.lossy else None)
    sync_model(run.model, tasks.unpack(download), base=base)
    # reshuffled passes over the client's own examples, seeded by (seed, round, client); or (--iid stream, an option
    # after the method) the stream's next batches
    batches = (stream_batches(run, rnd, c) if run.stream else
               tasks.local_batches(args, run.clients[c], run.tokenizer, run.device, seed))
    names = [n for b in blocks for n in run.units[b]] + run.units["head"]
    upload, stats = client_update(run.model, names, batches, lrs, args.weight_decay, args.grad_accum, seed,
                                  run.units["head"], args.head_lr_scale, run.log_priors[c], args.adam_eps,
                                  args.max_grad_norm)
    return tasks.pack(upload), stats


def check_upload(run, wire_up, blocks):
    """-> (why a turn's upload cannot be taken, or None; the unpacked upload): exactly the tensors of the client's
    blocks and the head, of the server's shapes and dtypes, all finite: no client writes a tensor it did not train."""
    want = [n for b in blocks for n in run.units[b]] + run.units["head"]
    return tasks.check_tensors(wire_up, want, run.server["weights"], run.args.max_change)


def server_aggregate(server, client, upload, units):
    """The server takes a client's upload (its block and the head): one client holds a block at a time, so this is
    replacement, and a version bump of the units touched, which the uploader holds (its next delta skips them)."""
    touched = [u for u, names in units.items() if any(n in upload for n in names)]
    with torch.no_grad():
        for n, t in upload.items():
            server["weights"][n].copy_(t)
    for u in touched:
        server["version"][u] += 1
        server["seen"].setdefault(client, {})[u] = server["version"][u]
    return touched


def turn(run, rnd, c):
    """Turn c of round rnd, as every rank runs it on its replica of the server -> the turn's ledger line."""
    args, server, transport = run.args, run.server, run.transport
    blocks, seed, lrs = turn_plan(run, rnd, c)
    # 1. download: server -> client c, serialised from c's rank's replica (rank 0's too, for the ledger): no collective
    seen_before = dict(server["seen"].get(c, {}))  # the versions c holds before it (Flower's nodes check their disk)
    down = server_download(server, run.units, c, blocks, args.download, args.download_fraction, seed)
    wire_down = tasks.pack(down) if transport.is_server or transport.mine([c]) else b""
    tag = state_tags(server, c, blocks, seen_before) if transport.keeps_client_state else None
    # 2. client c's turn where it lives: its upload and stats reach every rank. In one process `from_client` is
    #    client_round(run, rnd, c, wire_down); torchrun and Flower carry the same bytes to and from the client
    t0 = time.time()
    longest = tasks.packed_bound({n: server["weights"][n] for b in blocks + ["head"] for n in run.units[b]})
    wire_up, stats = transport.from_client(c, CLIENT_STATS, client_round, run, rnd, wire_down, tag, longest)
    seconds = round(time.time() - t0, 3)  # the turn as this rank sees it: its own work, or waiting for it
    # 3. server: take a well-formed upload; else the turn is lost and the client treated as holding the pretrained model
    why, upload = (stats["dropped"], None) if wire_up is None else check_upload(run, wire_up, blocks)
    line, block = {"round": rnd, "turn": (rnd - 1) * run.num_clients + c}, "+".join(blocks)
    if why is not None:  # the client may have trained the working model in place: its blocks and head go back
        server["seen"][c], server["lossy"][c] = {}, []
        sync_model(run.model, {n: server["weights"][n] for b in blocks + ["head"] for n in run.units[b]})
        line.update(client=c, block=block, dropped=why, download_bytes=len(wire_down), upload_bytes=0)
        run.progress.log(f"round {rnd} client {c}: left out of the round: {why}")
    else:
        line["change"] = round(tasks.relative_change(upload, server["weights"]), 6)  # before the upload replaces them
        # robust aggregation (on by default: --tensor_bound, tasks/robust.py): each tensor's change <= c x the median
        (upload,), (line["bounded"],), server["recent"] = tasks.bound_uploads(
            [upload], server["weights"], server["recent"], args.tensor_bound, args.tensor_window)
        server_aggregate(server, c, upload, run.units)
        sync_model(run.model, upload)  # every working copy follows the global model
        line.update(turns_per_round=run.num_clients, client=c, block=block, lr_first=lrs[0], lr_last=lrs[-1],
                    download_units=sent_units(down, run.units), loss=stats["loss"], upload_bytes=len(wire_up),
                    download_bytes=len(wire_down), peak_memory_bytes=int(stats["peak_memory_bytes"]),
                    held_bytes=int(stats["held_bytes"]), step_bytes=int(stats["step_bytes"]))
        run.progress.log(f"round {rnd} client {c} {block}: loss {stats['loss']:.4f} up {tasks.fmt_bytes(len(wire_up))}"
                         f" down {tasks.fmt_bytes(len(wire_down))} mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}")
    run.progress.advance("turns")
    return {**line, "client_seconds": seconds}


def train(args, transport=None):
    """The rounds (the paper's Algorithm 1): the clients take turns in a cycle, then the server evaluates the global
    model -> the metrics rows. transport: Flower's (flower/fedfull_flower/); by default one process or torchrun's."""
    run = setup(args, transport)
    if run.start == 0:  # round 0: the pretrained model's metrics, and checkpoint 0
        run.transport.on_server(log_round, run, 0, time.time(), [])
    rnd = run.start
    try:
        for rnd in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            turns = [turn(run, rnd, c) for c in range(run.num_clients)]  # the cycle: clients in order
            if run.lossy:
                sync_model(run.model, run.server["weights"])  # evaluate (and continue from) the exact model
            run.transport.on_server(log_round, run, rnd, t0, turns)
    except GroupError as e:  # a rank exited or hangs: one line, no traceback
        raise run.transport.lost_rank(e, rnd, run.saved, args.dist_timeout) from None
    finally:
        run.progress.close()
    run.transport.on_server(finish, run)
    run.transport.close()
    return run.files.metrics


# ====================================================================================================
# options beyond the paper: the official code's regimes (stream, several blocks a turn, the schedule, clipping,
# block dropping), the int8 download, and the label-skew candidates (logit adjustment, the head's rate)
# ====================================================================================================
def blocks_of_turn(cycle, switch_mode, seed, rnd, client, num_clients, k=1):
    """--layers_per_turn k: the k units (in cycle order) of client `client`'s turn t = (rnd - 1) * num_clients +
    client; k = 1: block_of_turn. With L = len(cycle), by --switch_mode:
      ascending    cycle[(t*k + j) mod L] for j < k: k consecutive blocks, the next turn the next k
      descending   the same counted from the top, cycle[L-1 - (t*k + j) mod L]
      random       a fresh uniform draw of k distinct blocks every turn: the official GLUE/SQuAD regime (4 of 12)"""
    if k == 1:
        return [block_of_turn(cycle, switch_mode, seed, rnd, client, num_clients)]
    L = len(cycle)
    turn = (rnd - 1) * num_clients + client
    if switch_mode in ("ascending", "descending"):
        picks = {(turn * k + j) % L for j in range(k)}
        picks = {L - 1 - i for i in picks} if switch_mode == "descending" else picks
    else:
        g = torch.Generator().manual_seed(derive_seed(seed, "turn-blocks", rnd, client))
        picks = set(torch.randperm(L, generator=g)[:k].tolist())
    return [cycle[i] for i in sorted(picks)]


def stream_indices(n, per_turn, turn, seed):
    """--iid stream, the official GLUE/SQuAD regime: clients own no data. The training set is one stream of passes,
    pass p a seeded permutation of range(n); turn `turn` (0-based over the run) takes its positions [turn * per_turn,
    (turn + 1) * per_turn). Within a pass no example is lost or repeated; a turn may end one pass and start the next."""
    out, pos, end = [], turn * per_turn, (turn + 1) * per_turn
    while pos < end:
        p, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "stream", p)))
        take = min(end - pos, n - i)
        out += perm[i:i + take].tolist()
        pos += take
    return out


def stream_batches(run, rnd, c):
    """--iid stream: client c's turn in round rnd takes the next local_steps batches of the stream, in its order."""
    args, pool = run.args, run.clients[0]
    order = stream_indices(len(pool), args.local_steps * args.batch_size * args.grad_accum,
                           (rnd - 1) * run.num_clients + c, args.seed)
    return tasks.Batches([order[k:k + args.batch_size] for k in range(0, len(order), args.batch_size)],
                         lambda rows: tasks.make_batch(args.task, [pool[i] for i in rows], run.tokenizer, run.device))


def learning_rate(args, step, total_steps, warmup=None):
    """--lr_scheduler: the rate of step `step` of `total_steps`, both counted over the whole run (the official code
    carries its scheduler from client to client), with W = `warmup` steps (default --warmup_steps): lr * (step + 1) /
    W during warmup, then constant lr; cosine lr * (1 + cos(pi * (step - W) / (total - W))) / 2; linear (Hugging
    Face's, the official GLUE/SQuAD code's) lr * (total - step) / (total - W), lr / (total - W) at the last step."""
    warmup = args.warmup_steps if warmup is None else warmup
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_scheduler == "constant":
        return args.lr
    if args.lr_scheduler == "linear":
        return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(tensors, max_norm):
    """--max_grad_norm: scale the gradients of `tensors` together so that their joint L2 norm is at most max_norm
    (0 = off), as torch.nn.utils.clip_grad_norm_ (and the official code's Trainer) does -> the norm before clipping."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def fraction_units(units, version, own, fraction, seed):
    """--download_fraction < 1, the official random block dropping: of the units that differ from pretrained, the
    client's own (else it would train a stale copy) and a seeded random ceil(fraction * n) of the n others."""
    changed = [u for u in units if version[u] > 0 and u not in own]
    g = torch.Generator().manual_seed(seed)
    keep = math.ceil(len(changed) * fraction)
    kept = [changed[i] for i in sorted(torch.randperm(len(changed), generator=g)[:keep].tolist())]
    return [u for u in units if (u in own and version[u] > 0) or u in kept]


def quantize_int8(w):
    """--download int8: w [rows, ...] -> (q int8 [rows, cols], scale fp32 [rows]), symmetric per row: scale =
    max|row| / 127, so |w - dequantize_int8(q, scale)| <= scale / 2 elementwise."""
    w2 = w.detach().float().reshape(w.shape[0], -1)
    scale = w2.abs().amax(dim=1) / 127
    q = torch.round(w2 / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize_int8(q, scale, shape, dtype):
    return (q.float() * scale[:, None]).reshape(shape).to(dtype)


def label_log_prior(examples, num_labels):
    """--logit_adjust: log of a client's label frequencies [num_labels], add-one smoothed (an unseen label: finite)."""
    counts = torch.ones(num_labels)
    for e in examples:
        counts[e["labels"]] += 1
    return (counts / counts.sum()).log()


def logit_adjusted_loss(model, batch, log_prior):
    """--logit_adjust: cross-entropy of (logits + the client's log prior): the prior is explained away, not learned,
    so a client whose data is nearly one label does not teach the shared head its label prior."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [B, labels]
    return F.cross_entropy(logits.float() + log_prior, batch["labels"])


def one_label_clients(clients, share=0.95):
    """Clients (indices) whose examples carry one label in at least `share` of them: under such a split the cycle
    tends to end predicting the last client's label (docs/label-skew.md)."""
    labels = [[int(e["labels"]) for e in examples] for examples in clients]
    return [c for c, ys in enumerate(labels) if ys and max(ys.count(y) for y in set(ys)) >= share * len(ys)]


# -------- plumbing (a reader of the method can stop here): set up, what every party loads, checkpoints, the round's
# end, the Flower hooks, the command
def setup(args, transport=None):
    """Everything the rounds need, in one namespace: model, blocks, data, the server (every rank keeps a replica), the
    schedule, the transport (by default one process or torchrun's ranks), the run's files and the progress display."""
    run = SimpleNamespace(args=args, out=Path(args.output_dir))
    tasks.checkpoint.check_output_dir(run.out, args.resume)  # every rank, before rank 0 writes anything
    run.transport = transport = transport or tasks.transport_from_env(args.device)
    run.device = transport.device
    if not transport.is_server:  # rank 0 speaks for the run and writes every output; the others print nothing
        sys.stdout = open(os.devnull, "w")
    ranks = (f"; {transport.world} ranks (torchrun), client c on rank c % {transport.world}, rank 0 evaluates and "
             "writes" if transport.world > 1 else "")
    load_parts(run, ranks + transport.describe())
    run.config = dict(vars(args))  # after load_parts derived --local_steps (glue, squad): the flags the run uses
    run.server = init_server(run.model, run.units)  # under torchrun: every rank's replica, kept equal by the uploads
    # every rank loads the checkpoint (several machines share --output_dir); run.saved: the last one, for a fault line
    run.start = run.saved = load_checkpoint(run) if args.resume else 0
    transport.join(args.dist_timeout)  # after loading: see Ranks.join
    run.files = tasks.RunFiles(run.out, active=transport.is_server)
    run.files.start(run.config, resumed_round=run.start if args.resume else None)
    run.progress = tasks.Progress(turns=(args.rounds * run.num_clients, run.start * run.num_clients))
    return run


def load_parts(run, describe=""):
    """What every party loads (the server, each client's process): the model and its blocks, the data, the schedule."""
    args = run.args
    torch.manual_seed(args.seed)  # a randomly initialized head is the same on every run, rank, node and resume
    num_labels = tasks.glue.NUM_LABELS.get(args.dataset, 2)
    run.model, run.tokenizer = tasks.load_model(args.model, args.task, num_labels, args.dtype, run.device)
    run.model.requires_grad_(False).eval()
    run.cycle, run.units = find_blocks(run.model, args.train_embeddings)
    run.layers_per_turn = args.layers_per_turn or min(4, len(run.cycle))
    if run.layers_per_turn > len(run.cycle):
        raise ConfigError(f"--layers_per_turn {args.layers_per_turn}: the model has only {len(run.cycle)} blocks")
    run.num_clients = args.num_clients or len(run.cycle)
    params = dict(run.model.named_parameters())
    m = {u: sum(params[n].numel() for n in names) / 1e6 for u, names in run.units.items()}  # millions per unit
    print(f"model {args.model}: {sum(m.values()):.1f}M parameters, {len(run.cycle)} blocks in the cycle (~"
          f"{m[run.cycle[0]]:.2f}M each), head {m['head']:.3f}M, embeddings {m['embeddings']:.1f}M "
          f"({'trained as a block' if 'embeddings' in run.cycle else 'frozen'}); {run.num_clients} clients, "
          f"{run.layers_per_turn} block(s) a turn ({args.switch_mode}), download {args.download}"
          + (f" with fraction {args.download_fraction}" if args.download_fraction < 1 else "") + describe)
    run.stream = args.iid == "stream"  # clients own no data: every turn takes the next batches of one stream
    data_args, parts = (SimpleNamespace(**{**vars(args), "iid": "iid"}), 1) if run.stream else (args, run.num_clients)
    run.clients, run.val, run.test = tasks.load_task_data(data_args, run.tokenizer, parts)
    n = sum(len(examples) for examples in run.clients)
    per_step = args.batch_size * args.grad_accum
    if args.local_steps is None and args.local_epochs is None:  # glue, squad: the official turn, one client's share
        args.local_steps = (n // run.num_clients) // per_step  # floor(floor(n/N)/B)
        if args.local_steps < 1:
            raise ConfigError(f"{n} training examples over {run.num_clients} clients leave less than one batch of "
                              f"{per_step} a turn: use fewer clients or --local_steps")
    if run.stream:
        passes = run.num_clients * args.local_steps * per_step / n
        print(f"stream: the {n} training examples are one seeded stream of passes (the official GLUE/SQuAD regime); "
              f"each turn the next {args.local_steps} batches of {per_step}: {passes:.2f} passes a round")
    if skewed := one_label_clients(run.clients) if args.task == "glue" and num_labels > 1 and not run.stream else []:
        print(f"warning: clients {', '.join(map(str, skewed))} hold one label in >= 95% of their examples: the cycle "
              "tends to end predicting the last client's label (docs/label-skew.md)")
    run.pretrained = ({n: p.detach().clone() for n, p in run.model.named_parameters()}
                      if args.download_fraction < 1 else None)  # the copy every client starts from
    run.lossy = args.download == "int8" or run.pretrained is not None  # a client's copy may differ from the global
    run.log_priors = ([label_log_prior(examples, num_labels) for examples in run.clients] if args.logit_adjust
                      else [None] * run.num_clients)
    # optimizer steps of each client's turn (the same every round), and the warmup, for the schedule
    run.turn_steps = ([args.local_steps] * run.num_clients if run.stream else
                      [args.local_steps or max(1, math.ceil(args.local_epochs * len(examples) / per_step))
                       for examples in run.clients])
    run.warmup = round(args.warmup_ratio * sum(run.turn_steps)) if args.warmup_ratio else args.warmup_steps


def load_checkpoint(run):
    """The server state from <output_dir>/checkpoint.safetensors -> its round; ConfigError as tasks.checkpoint.load."""
    fixed = ("rounds",) if run.args.lr_scheduler in ("cosine", "linear") else ()
    rnd, weights, state = tasks.checkpoint.load(run.out, "fedcybgd", run.config, fixed)
    server = run.server
    if weights.keys() != server["weights"].keys() or any(weights[n].shape != t.shape
                                                         for n, t in server["weights"].items()):
        raise ConfigError(f"--resume: {tasks.checkpoint.path_of(run.out)} does not fit this model")
    sync_model(run.model, weights)  # the working model; the server's weights are a copy of it
    run.server = {**init_server(run.model, run.units), "version": state["version"], "recent": state.get("recent", []),
                  **{k: {int(c): v for c, v in state[k].items()} for k in ("seen", "lossy")}}  # JSON keys are strings
    print(f"resumed from round {rnd}")
    return rnd


def log_round(run, rnd, t0, turns):
    """Server, end of round rnd (round 0: before training, no turns): evaluate the global model, write the round's
    ledger lines, metrics row and checkpoint (a crash between them redoes the round), print its line."""
    args, per_example, evaluation = run.args, {}, {}
    if rnd % args.eval_every == 0 or rnd == args.rounds:
        evaluation = tasks.evaluate(args, run.model, run.tokenizer, run.test, run.device, run.val, run.progress,
                                    per_example)
        run.files.heldout_examples(rnd, per_example)
    row = tasks.round_row(rnd, t0, turns, evaluation)
    if turns:
        run.files.ledger(turns + run.transport.wire_ledger(rnd, list(range(run.num_clients))))
    run.files.metric(row)
    # the round is complete (its last broadcast reached every rank): the server's weights and record of the clients
    tasks.checkpoint.save(run.out, "fedcybgd", rnd, run.config, run.server["weights"],
                          {k: run.server[k] for k in ("version", "seen", "lossy", "recent")})
    run.saved = rnd
    run.progress.log(tasks.round_line(row))


def finish(run):
    """The exact global model (a lossy download may have differed) in Hugging Face format, and the loss plot."""
    sync_model(run.model, run.server["weights"])
    run.progress.log(f"wrote {tasks.export_model(run.model, run.tokenizer, run.out / 'model')} (save_pretrained: "
                     "config, weights, tokenizer)")
    run.files.plot("FedCyBGD")
    if line := run.files.change_line():
        run.progress.log(line)


def state_tags(server, c, blocks, seen_before):
    """Flower: what client c holds before its turn (`seen_before`, the server's record before the download) and after
    it (its trained units one version on), as tags its node checks against its disk; "" = the pretrained model."""
    after = {**server["seen"].get(c, {}), **{u: server["version"][u] + 1 for u in {*blocks, "head"}}}  # aggregated
    tag = lambda record: json.dumps(sorted(record.items())) if any(record.values()) else ""  # noqa: E731
    return tag(seen_before), tag(after)


def client_state(run, c):  # Flower: what client c keeps on its node's disk between turns: every weight it holds
    return {n: p.detach() for n, p in run.model.named_parameters()}


def set_client_state(run, c, state):  # Flower: from its node's disk; None (new, or dropped out): pretrained, as loaded
    if state is not None:
        sync_model(run.model, state)


def main(argv=None):
    return tasks.run_cli("fedcybgd", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
