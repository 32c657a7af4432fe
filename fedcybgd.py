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

The script reads top to bottom: config, blocks (`find_blocks`, `block_of_turn`), the schedule, the wire (int8),
the server (`server_download`, `held_weights`, `sync_model`, `server_aggregate`), the client (`client_update`),
checkpoints, `setup`, a client's turn (`client_turn`), the server's round end (`evaluate_round`), then `main`:
the round loop on one screen. One process, torchrun ranks or a Flower federation sit behind `tasks.Transport`
(`from_client` runs `client_turn` where the client lives and brings its upload to every rank), so the loop has no
rank branches; the progress bars, the run's files and the one-line errors are tasks/run.py's.

On Flower (tasks/flower.py, docs/flower.md) each client lives on a SuperNode, which keeps the weights the client
holds on its disk between turns. The server checks every upload (`check_upload`: the turn's tensors, their shapes,
finite values); a client that does not answer or sends a malformed upload loses its turn, the cycle goes on, and
the server treats it as holding the pretrained model again, so its next download brings it back exactly.

In one process the clients take turns on ONE model (no per-client copies); the server keeps one copy of the
exact global weights, and a record of what each client holds (version per block, and which blocks only as
int8). Before a turn the simulation rebuilds the client's copy from that record (`held_weights`: the current
weights, their int8 rounding, or the pretrained ones) and applies the download on top; in the lossless modes
that is the global model itself. The evaluation always uses the server's exact weights.

Label skew (open). Clients take turns, so under a label-skewed split each turn pulls the shared task head, and
the one block it trains, towards its own labels, and a run can end predicting the last client's label (MRPC,
Dirichlet-0.5 over 6 clients, whose last client holds 969 negatives and 1 positive: 31.6% accuracy, the minority
class; docs/label-skew.md lists every remedy measured). Two things make it: a client holding one label
has no contrast in its data, so any loss on that data alone falls by moving every prediction towards its label;
and AdamW takes steps of about --lr whatever the gradient's size, so a loss that is already nearly satisfied
(logit adjustment) still moves the weights at full size for the whole turn. `--logit_adjust` (glue) and
`--head_lr_scale` are kept as measured candidates; neither prevents the collapse, on MRPC or on a tiny
cycle whose clients each hold one label. The contrast can only come from across clients, and a cycle carries it
only when turns are short against the learning: one AdamW fed the cycle's one-label batches in order learns in 90
steps as turns of 1-2 steps, not as turns of 5-10 steps (lower rates need about 10 cycles). A head refitted
afterwards does not rescue MRPC either: under the Dirichlet-0.5 split the encoder's features support about 71%
(69% pretrained). The script warns when clients hold one label in >= 95% of their examples (`one_label_clients`).

The schedule (--lr_scheduler, --warmup_steps) is one curve over the whole run, carried from turn to turn.

Across processes (`torchrun --nproc_per_node N fedcybgd.py ...`, also across machines): client c lives on
rank c % N, and every rank keeps its own model plus a replica of the server state. On client c's turn only
its rank trains; it then broadcasts its upload message (the block and the head, as uint8 bytes) and every
rank applies it with `server_aggregate`, so all replicas -- rank 0's, the one that evaluates and is
checkpointed, included -- stay equal bit for bit. The download message is built from the replica on the
client's rank and counted in the ledger, but no collective carries it: every rank already holds the server's
weights. One process and N ranks give the same metrics and the same weights.

The official code's regimes, and this script's defaults. The official repository has three: `roberta-glue` and
`gpt/` (SQuAD) are not partitioned at all -- one Hugging Face Trainer runs over the whole shuffled training set and a
"client" is the next floor(floor(n/N)/B) batches of that stream (24 clients, batch 64: 2 steps a turn on MRPC), each
turn training 4 random layers of 12 plus the head, with a linear schedule and clipping at 1.0 (AdamW eps 1e-6 and no
weight decay for GLUE; warmup over 10% of an epoch and lr 3e-5 for SQuAD); `causal_llms` cuts a seeded shuffle into
equal contiguous shards and gives client c block c mod L every round. The glue and squad defaults here are the
first regime (`--iid stream --num_clients 24 --layers_per_turn 4 --switch_mode random --lr_scheduler linear
--max_grad_norm 1.0`, `blocks_of_turn`, `stream_indices`), and a turn is floor(floor(n/N)/B) steps under any
split of these tasks (under --iid dirALPHA, one client's share of the data: short turns; on MRPC under dir0.5 they
end at the majority class, 68.4%, not at the minority class as long turns do, docs/label-skew.md); `--iid iid` is
causal_llms' shards.

Where this script differs from the official code (github.com/L3030/FedCyBGD, built on BAdam), and the effect:
  * Blocks are discovered from the model (the largest nn.ModuleList of identical layers), not taken from
    hand-written per-model prefix lists; task heads (everything after the layer stack) are trainable on
    every turn; embeddings (everything before it) are an optional extra block (--train_embeddings). The
    official causal code trains neither the final norm nor the LM head; here the final norm is the head.
  * Adam state lives for exactly one client turn. The official causal code rebuilds its fp32 copies and wipes the
    Adam moments after every step (`switch_block_every` -1) although the block does not change within a turn, and
    saves the optimizer state for the next client; the learning rate schedule, which it also carries from client to
    client, is carried here too (--lr_scheduler). The official `gpt/` loop steps its base optimizer twice per batch;
    here every batch is one step.
  * Weight decay skips every parameter with ndim < 2 (biases, norm weights). The official code tests
    `isinstance(param, LayerNorm)` on a tensor, which is never true, so norm weights decay.
  * The causal cycle: turn t trains block t mod L, so with fewer clients than blocks every block is still
    visited. The official causal code gives client c block c mod L in every round, so blocks >= N never train.
    --switch_mode random with one block a turn is the official causal draw (each client samples its blocks
    independently, without replacement over its rounds); with more rounds than blocks the official code fails,
    here a client starts a fresh permutation every L rounds. --switch_mode permutation is a fresh order per sweep.
  * Under --iid stream a round is N turns of floor(floor(n/N)/B) batches, slightly less than one pass (MRPC:
    24 x 2 x 64 = 3,072 of 3,667 examples); the stream runs on across rounds, so no example is skipped, but rounds
    and epochs do not line up (the official Trainer counts epochs, and its client index runs on across them).
    Clients that own data (--iid iid / dirALPHA) hold fixed shards reused every round, unlike the official GLUE/SQuAD
    clients, which own nothing and never reuse a batch within an epoch. --logit_adjust and --head_lr_scale have
    no official counterpart; the sft default split is FedKSeed's label-Dirichlet one, so that both scripts share
    clients.
  * The GLUE model is the 6-layer MiniLM (offline), not roberta-base: 4 layers a turn are 2/3 of it, not 1/3, and
    the learning rate is 4e-4 where the official code uses 2e-5 (chosen on validation data, docs/fedcybgd.md);
    max length 128 where the official code pads to 512 (MRPC pairs fit in 128 tokens; padding changes no result).
  * Download: the official "compression" (random dropping of updated blocks, the rest pretrained) is
    --download_fraction, except that the client's own block and the head are always sent (dropping them
    would make the client train from, and upload over, a stale copy). Lossless `delta` and lossy `int8`
    (which sends only what the client lacks) are added, and every byte is counted.
  * One model in memory instead of a deep copy of the model per client; float32 weights by default (the
    official code casts to fp16).
"""
import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import tasks
from tasks import ConfigError, GroupError

# ----------------------------------------------------------------------------------------------------
# config: defaults run out of the box on a CPU; per-task defaults fill whatever is left as None
# ----------------------------------------------------------------------------------------------------
TASK_DEFAULTS = {
    # sft: FedKSeed's Dolly split (so the two scripts share clients), one block a turn, ascending, as causal_llms
    "sft": dict(dataset="dolly", model="smollm2-135m", lr=1e-4, batch_size=2, max_length=256, eval_samples=50,
                num_clients=0, rounds=2, iid="dir0.5", switch_mode="ascending", layers_per_turn=1, weight_decay=0.01,
                adam_eps=1e-8, lr_scheduler="constant", warmup_ratio=0.0, max_grad_norm=0.0),
    # glue: the official roberta-glue regime: one shuffled stream over the training set, 24 "clients" that each take
    # the next floor(floor(n/N)/B) batches, 4 random layers a turn, AdamW eps 1e-6 without decay, linear decay to 0,
    # clipping 1.0, batch 64, 3 epochs. lr 4e-4 for the 6-layer MiniLM, chosen on validation among 5e-5..4e-4
    # (docs/fedcybgd.md; the official 2e-5 is roberta-base's).
    "glue": dict(dataset="mrpc", model="minilm-l6", lr=4e-4, batch_size=64, max_length=128, eval_samples=0,
                 num_clients=24, rounds=3, iid="stream", switch_mode="random", layers_per_turn=0, weight_decay=0.0,
                 adam_eps=1e-6, lr_scheduler="linear", warmup_ratio=0.0, max_grad_norm=1.0),
    # squad: the official gpt/ regime: the same stream, 24 clients, 4 random layers, lr 3e-5, warmup 10% of a round
    "squad": dict(dataset="squad", model="gpt2", lr=3e-5, batch_size=8, max_length=384, eval_samples=200,
                  num_clients=24, rounds=3, iid="stream", switch_mode="random", layers_per_turn=0, weight_decay=0.0,
                  adam_eps=1e-8, lr_scheduler="linear", warmup_ratio=0.1, max_grad_norm=1.0),
}
DATASETS = {"sft": tasks.DATASETS, "glue": tasks.glue.TASKS, "squad": ("squad",)}


def parse_args(argv=None):
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
    p.add_argument("--num_clients", type=int, default=None,
                   help="number of clients; 0 = one client per block of the cycle (default: 0 sft, 24 glue/squad)")
    p.add_argument("--rounds", type=int, default=None, help="full cycles: in a round every client takes one turn "
                   "(default: 2 sft; 3 glue/squad, i.e. about 3 epochs of the stream)")
    p.add_argument("--switch_mode", choices=("ascending", "descending", "permutation", "random"),
                   default=None, help="which blocks a turn trains: ascending/descending over the cycle; "
                   "permutation: a fresh random order for every sweep over the blocks; random: the official mode "
                   "(see blocks_of_turn) (default: ascending sft, random glue/squad)")
    p.add_argument("--layers_per_turn", type=int, default=None,
                   help="blocks a turn trains; 0 = 4 as the official GLUE/SQuAD code (4 of 12), or every block "
                        "of a model with fewer (default: 1 sft, 0 glue/squad); with random a fresh uniform draw of "
                        "that many distinct blocks per turn, with ascending/descending that many consecutive ones")
    p.add_argument("--local_steps", type=int, default=None,
                   help="optimizer steps per client turn (default: 8 for sft; for glue/squad the official "
                        "floor(floor(n/N)/B), one client's share of the n training examples in batches of B)")
    p.add_argument("--local_epochs", type=float, default=None,
                   help="passes over the client's data per turn instead of --local_steps")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (the peak, with --lr_scheduler) "
                   "(default: 1e-4 sft, 4e-4 glue, 3e-5 squad)")
    p.add_argument("--lr_scheduler", choices=("constant", "cosine", "linear"), default=None,
                   help="learning rate over the whole run, carried from turn to turn: constant, or a cosine or a "
                        "linear decay from --lr to 0 at the end of the last round (default: constant sft, linear "
                        "glue/squad)")
    p.add_argument("--head_lr_scale", type=float, default=1.0,
                   help="the task head (trained on every turn) learns at this times --lr")
    p.add_argument("--logit_adjust", action="store_true",
                   help="glue classification: each client adds the log of its own label frequencies to the logits "
                        "of its training loss (logit adjustment; measured not to prevent the label-skew collapse yet)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warmup steps at the start of the run")
    p.add_argument("--warmup_ratio", type=float, default=None, help="warmup over this fraction of one round's "
                   "optimizer steps instead of --warmup_steps (default: 0.1 squad, as the official gpt/ code; else 0)")
    p.add_argument("--weight_decay", type=float, default=None,
                   help="AdamW weight decay, applied to parameters with ndim >= 2 only (default: 0.01 sft, 0 glue/squad)")
    p.add_argument("--adam_eps", type=float, default=None, help="AdamW epsilon (default: 1e-8; 1e-6 glue, as "
                   "the official roberta-glue code)")
    p.add_argument("--max_grad_norm", type=float, default=None, help="clip the turn's gradient (its trained "
                   "tensors together) to this L2 norm before each step; 0 = off (default: 0 sft, 1.0 glue/squad)")
    p.add_argument("--batch_size", type=int, default=None, help="examples per micro-batch "
                   "(default: 2 sft, 16 glue, 8 squad)")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max_length", type=int, default=None, help="tokens per example "
                   "(default: 256 sft, 128 glue, 384 squad)")
    p.add_argument("--iid", default=None, help="client partition: 'stream' (clients own no data: each turn takes "
                   "the next batches of one seeded stream of passes over the whole training set, as the official "
                   "GLUE/SQuAD code), 'iid' (equal shards of a seeded shuffle, as the official causal code) or "
                   "'dirALPHA' (label-Dirichlet) (default: dir0.5 sft, stream glue/squad)")
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
    p.add_argument("--val_samples", type=int, default=0, help="validation examples carved from the training data "
                   "before it is split over clients (seeded: the same examples in every script), evaluated beside the "
                   "test set as val_loss, val_<metric>; choose knobs on these, not on the test set. 0 = none")
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
    args = p.parse_args(argv)
    tasks.fill_task_defaults(args, TASK_DEFAULTS, DATASETS)
    check_config(args)
    return args


def check_config(args):
    """Impossible flag values -> ConfigError (one line)."""
    if args.local_steps is not None and args.local_epochs is not None:
        raise ConfigError("give --local_steps or --local_epochs, not both")
    if args.local_steps is None and args.local_epochs is None and args.task == "sft":
        args.local_steps = 8  # glue, squad: setup derives the official floor(floor(n/N)/B)
    for name in ("rounds", "batch_size", "grad_accum", "max_length"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ("num_clients", "eval_samples", "max_new_tokens", "val_samples", "layers_per_turn"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must be >= 0 (got {getattr(args, name)})")
    if not (math.isfinite(args.head_lr_scale) and args.head_lr_scale >= 0):
        raise ConfigError(f"--head_lr_scale must be a finite number >= 0 (got {args.head_lr_scale})")
    if args.logit_adjust and (args.task != "glue" or tasks.glue.NUM_LABELS.get(args.dataset, 2) < 2):
        raise ConfigError("--logit_adjust needs a classification task (--task glue, not stsb)")
    if args.warmup_ratio and args.warmup_steps:
        raise ConfigError("give --warmup_steps or --warmup_ratio, not both")
    if args.warmup_steps < 0:
        raise ConfigError(f"--warmup_steps must be >= 0 (got {args.warmup_steps})")
    if args.eval_every < 1:
        raise ConfigError(f"--eval_every must be >= 1 (got {args.eval_every})")
    if (args.local_steps is not None and args.local_steps < 1) or (args.local_epochs is not None and args.local_epochs <= 0):
        raise ConfigError("--local_steps must be >= 1 and --local_epochs > 0")
    for name in ("lr", "adam_eps", "dist_timeout"):  # nan fails every comparison, inf passes "> 0": test finiteness
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ConfigError(f"--{name} must be a finite number > 0 (got {getattr(args, name)})")
    if args.iid == "stream" and args.local_epochs is not None:
        raise ConfigError("--iid stream: clients own no data, so a turn is --local_steps batches, not --local_epochs")
    if args.iid == "stream" and args.logit_adjust:
        raise ConfigError("--logit_adjust needs clients that own data (a label prior of their own), not --iid stream")
    for name in ("max_grad_norm", "warmup_ratio"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise ConfigError(f"--{name} must be a finite number >= 0, 0 for none (got {getattr(args, name)})")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ConfigError(f"--weight_decay must be a finite number >= 0, 0 for none (got {args.weight_decay})")
    if not 0 < args.download_fraction <= 1:
        raise ConfigError(f"--download_fraction must be in (0, 1] (got {args.download_fraction})")
    if args.download_fraction < 1 and args.download == "delta":
        raise ConfigError("--download_fraction < 1 drops blocks against the pretrained model: use it with "
                         "--download full or int8, not delta")
    if args.data_path and not Path(args.data_path).exists():
        raise ConfigError(f"--data_path {args.data_path} not found")
    if args.iid not in ("iid", "stream") and not (args.iid.startswith("dir") and _is_float(args.iid[3:])
                                                  and float(args.iid[3:]) > 0):
        raise ConfigError(f"--iid must be 'stream', 'iid' or 'dirALPHA' with ALPHA > 0, e.g. dir0.5 (got {args.iid})")


def _is_float(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


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
        raise ConfigError(f"{type(model).__name__}: no nn.ModuleList of identical layers found, so no blocks")
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


def blocks_of_turn(cycle, switch_mode, seed, rnd, client, num_clients, k=1):
    """The k units client `client` trains in round `rnd` (from 1), a list. k = 1: [block_of_turn(...)]. k > 1, with
    turn t = (rnd - 1) * num_clients + client and L = len(cycle):
      ascending    cycle[(t*k + j) mod L] for j < k: k consecutive blocks, the next turn the next k
      descending   the same counted from the top, cycle[L-1 - (t*k + j) mod L]
      random       a fresh uniform draw of k distinct blocks for every turn, seeded by (seed, round, client): the
                   official roberta-glue/gpt regime (4 random layers of 12 each turn)
    Returned in cycle order."""
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


def learning_rate(args, step, total_steps, warmup=None):
    """The learning rate of optimizer step `step` (0-based, counted over the whole run: the schedule is carried
    from turn to turn, as the official code carries its scheduler from client to client) of `total_steps`, with
    W = `warmup` steps (default --warmup_steps):
      warmup    step < W: lr * (step + 1) / W
      constant  lr
      cosine    lr * (1 + cos(pi * (step - W) / (total - W))) / 2
      linear    lr * (total - step) / (total - W): Hugging Face's linear schedule, 1 at the first step after
                warmup, lr / (total - W) at the last (the official GLUE/SQuAD code's)"""
    warmup = args.warmup_steps if warmup is None else warmup
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_scheduler == "constant":
        return args.lr
    if args.lr_scheduler == "linear":
        return args.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def stream_indices(n, per_turn, turn, seed):
    """--iid stream, the official GLUE/SQuAD regime: clients own no data. The training set is one stream of passes,
    pass p a seeded permutation of range(n), and turn `turn` (0-based over the run) takes the next `per_turn`
    positions of it: positions [turn * per_turn, (turn + 1) * per_turn). Within a pass no example is lost or repeated;
    a turn that straddles two passes ends one and starts the next. A pure function of its arguments (resume, ranks)."""
    out, pos, end = [], turn * per_turn, (turn + 1) * per_turn
    while pos < end:
        p, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "stream", p)))
        take = min(end - pos, n - i)
        out += perm[i:i + take].tolist()
        pos += take
    return out


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


def server_download(server, units, client, blocks, mode, fraction=1.0, seed=0):
    """The message the server sends client `client` before it trains `blocks` (a list of units): dict name -> tensor.

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
    own = {*blocks, "head"}
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


def one_label_clients(clients, share=0.95):
    """Clients (indices) whose examples carry one label in at least `share` of them: under such a split the cycle
    tends to end predicting the last client's label (the docstring's Label skew)."""
    skewed = []
    for c, examples in enumerate(clients):
        labels = [int(e["labels"]) for e in examples]
        if labels and max(labels.count(y) for y in set(labels)) >= share * len(labels):
            skewed.append(c)
    return skewed


def clip_gradients(tensors, max_norm):
    """Scale the gradients of `tensors` together so that their joint L2 norm is at most max_norm (0 = off), as
    torch.nn.utils.clip_grad_norm_ (and the official code's Trainer) does -> the norm before clipping."""
    grads = [t.grad for t in tensors if t.grad is not None]
    if not grads:
        return 0.0
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item()
    if max_norm > 0 and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def client_update(model, train_names, batches, lrs, weight_decay, grad_accum, seed, head_names=(), head_lr_scale=1.0,
                  log_prior=None, adam_eps=1e-8, max_grad_norm=0.0):
    """One client turn. Only `train_names` (the client's block and the head) require grad; those also in
    `head_names` learn at head_lr_scale times the rate. log_prior (classification only): the log of the client's
    own label frequencies [num_labels], added to the logits in the training loss (logit adjustment), so that a
    client whose data is nearly one label does not teach the shared head its label prior.

    batches: list of local_steps * grad_accum micro-batches (dicts of tensors on the model's device).
    lrs: the learning rate of each optimizer step (len(batches) // grad_accum of them; see `learning_rate`).
    adam_eps: AdamW's epsilon; max_grad_norm > 0: the step's gradient is clipped to that norm (`clip_gradients`).
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
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lrs[0], betas=(0.9, 0.999), eps=adam_eps)
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
        clip_gradients([m for _, m in masters], max_grad_norm)
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
# checkpoints of the server state (data, evaluation and the run's files are in tasks/)
# ----------------------------------------------------------------------------------------------------
RESUME_FREE = ("rounds", "eval_every", "resume", "device", "output_dir", "dist_timeout")  # may change across a resume
HEADER_BYTES = 24  # float64 [length, turn loss, peak memory] the transport sends before each upload broadcast
TURN_STATS = ("loss", "peak_memory_bytes")  # a turn's statistics that travel with its upload (for the metrics)


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
    checkpoint (unreadable files, missing or misshapen tensors, missing state) is a ConfigError."""
    from safetensors.torch import load_file
    ckpt = out / (out / "latest").read_text().strip()
    try:
        weights = load_file(ckpt / "weights.safetensors")
        state = json.loads((ckpt / "state.json").read_text())
        version, seen, round_ = state["version"], {int(c): s for c, s in state["seen"].items()}, int(state["round"])
        lossy = {int(c): s for c, s in state["lossy"].items()}
        bad = [n for n, t in server["weights"].items() if n not in weights or weights[n].shape != t.shape]
    except Exception as e:  # noqa: BLE001  safetensors, json and the file system raise many types
        raise ConfigError(f"--resume: {ckpt} cannot be read ({type(e).__name__}): it is truncated or not a "
                          "fedcybgd checkpoint") from None
    if bad or set(version) != set(server["version"]):
        raise ConfigError(f"--resume: {ckpt} does not fit this model ({len(bad)} tensors missing or misshapen)")
    with torch.no_grad():
        for n, t in server["weights"].items():
            t.copy_(weights[n])
    server["version"], server["seen"], server["lossy"] = version, seen, lossy
    return round_


def check_resume(args, out):
    """Checked by every rank before the group forms, so no rank can see rank 0's first checkpoint here."""
    if (out / "latest").exists() and not args.resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or pick another --output_dir")
    if not args.resume:
        return
    if not (out / "latest").exists():
        raise ConfigError(f"--resume: no checkpoint in {out}")
    try:
        old = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--resume: {out / 'config.json'} is missing or not JSON: not a fedcybgd run") from None
    diff = [k for k in old if k not in RESUME_FREE and old[k] != getattr(args, k, None)]
    if args.lr_scheduler in ("cosine", "linear") and old.get("rounds") != args.rounds:
        diff.append(f"rounds (the {args.lr_scheduler} schedule spans the whole run)")
    if diff:
        raise ConfigError(f"--resume: the config differs from the checkpoint's in {', '.join(diff)}")


# ----------------------------------------------------------------------------------------------------
# the run: set up, a client's turn, the server's round end, the round loop
# ----------------------------------------------------------------------------------------------------
def pick_device(args):
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: this torch build sees no CUDA device")
    return device


def setup(args, transport=None):
    """Everything the rounds need, in one namespace: model, blocks, data, the server state (every rank keeps a
    replica), the schedule, the transport, the run's files and the progress display. transport: Flower's
    (tasks/flower.py); by default one process or torchrun's ranks, from the environment."""
    run = SimpleNamespace(args=args, out=Path(args.output_dir), config=dict(vars(args)))  # the flags as given
    check_resume(args, run.out)
    run.transport = transport = transport or tasks.transport_from_env(pick_device(args))
    run.device = transport.device
    if not transport.is_server:  # rank 0 speaks for the run and writes every output; the others print nothing
        sys.stdout = open(os.devnull, "w")
    load_parts(run, transport.describe())
    transport.join(args.dist_timeout)  # after loading: see Ranks.join
    run.server = init_server(run.model, run.units)  # under torchrun: every rank's replica, kept equal by the uploads
    run.start = 0
    if args.resume:  # every rank loads the checkpoint: on several machines --output_dir must be shared
        run.start = load_checkpoint(run.out, run.server)
        sync_model(run.model, run.server["weights"])
        print(f"resumed from round {run.start}")
    run.saved = run.start  # the round of the last checkpoint written (rank 0), for the fault message
    run.files = tasks.RunFiles(run.out, active=transport.is_server)
    run.files.start(run.config, resumed_round=run.start if args.resume else None)
    run.progress = tasks.Progress(turns=(args.rounds * run.num_clients, run.start * run.num_clients))
    return run


def client_node(args):
    """A Flower node's view of the run (tasks/flower.py): what a device holds -- the pretrained model, its clients'
    data, the schedule -- and no server. The weights a client kept from its last turn come from the node's disk."""
    run = SimpleNamespace(args=args, server=None, progress=tasks.Progress(), device=pick_device(args))
    load_parts(run)
    return run


def client_state(run, c):
    """Flower: what client c keeps between turns, to store on its node's disk: every weight it holds."""
    return {n: p.detach() for n, p in run.model.named_parameters()}


def set_client_state(run, c, state):
    """Flower: client c's weights from its node's disk; None (a new client, or one the server treats as holding the
    pretrained model again after it dropped out): the pretrained model, as loaded."""
    if state is not None:
        sync_model(run.model, state)


def load_parts(run, transport_line=""):
    """What every party loads, the server and each client's process alike: the model (its layers decide the blocks,
    and the blocks the default number of clients), the data split, each client's turn length and the schedule."""
    args = run.args
    torch.manual_seed(args.seed)  # a randomly initialized head is the same on every run, rank, node and resume
    num_labels = tasks.glue.NUM_LABELS.get(args.dataset, 2)
    run.model, run.tokenizer = tasks.load_model(args.model, args.task, num_labels, args.dtype, run.device)
    run.model.requires_grad_(False).eval()
    run.cycle, run.units = find_blocks(run.model, args.train_embeddings)
    run.layers_per_turn = args.layers_per_turn or min(4, len(run.cycle))
    if run.layers_per_turn > len(run.cycle):
        raise ConfigError(f"--layers_per_turn {args.layers_per_turn}: the model has only {len(run.cycle)} blocks")
    if run.layers_per_turn > 1 and args.switch_mode == "permutation":
        raise ConfigError("--layers_per_turn > 1 works with --switch_mode random, ascending or descending, "
                          "not permutation")
    run.num_clients = args.num_clients or len(run.cycle)
    params = dict(run.model.named_parameters())
    nparams = {u: sum(params[n].numel() for n in names) for u, names in run.units.items()}
    print(f"model {args.model}: {sum(nparams.values()) / 1e6:.1f}M parameters, {len(run.cycle)} blocks in the cycle "
          f"(~{nparams[run.cycle[0]] / 1e6:.2f}M each), head {nparams['head'] / 1e6:.3f}M, embeddings "
          f"{nparams['embeddings'] / 1e6:.1f}M ({'trained as a block' if 'embeddings' in run.cycle else 'frozen'}); "
          f"{run.num_clients} clients, {run.layers_per_turn} block(s) a turn ({args.switch_mode}), download "
          f"{args.download}"
          + (f" with fraction {args.download_fraction}" if args.download_fraction < 1 else "")
          + (f"; {run.transport.world} ranks (torchrun), client c on rank c % {run.transport.world}, rank 0 evaluates "
             "and writes" if getattr(run, "transport", None) and run.transport.world > 1 else "") + transport_line)

    run.stream = args.iid == "stream"  # clients own no data: every turn takes the next batches of one stream
    data_args = SimpleNamespace(**{**vars(args), "iid": "iid"}) if run.stream else args
    run.clients, run.val, run.test = tasks.load_task_data(data_args, run.tokenizer, 1 if run.stream else run.num_clients)
    n = sum(len(examples) for examples in run.clients)
    if args.local_steps is None and args.local_epochs is None:  # glue, squad: the official turn, one client's share
        args.local_steps = (n // run.num_clients) // (args.batch_size * args.grad_accum)  # floor(floor(n/N)/B)
        if args.local_steps < 1:
            raise ConfigError(f"{n} training examples over {run.num_clients} clients leave less than one batch of "
                              f"{args.batch_size * args.grad_accum} a turn: use fewer clients or --local_steps")
    if run.stream:
        print(f"stream: the {n} training examples are one seeded stream of passes (the official GLUE/SQuAD regime); "
              f"each turn takes the next {args.local_steps} batches of {args.batch_size * args.grad_accum}, "
              f"{run.num_clients} turns a round = {run.num_clients * args.local_steps * args.batch_size * args.grad_accum / n:.2f} passes")
    skewed = one_label_clients(run.clients) if args.task == "glue" and num_labels > 1 and not run.stream else []
    if skewed:
        print(f"warning: clients {', '.join(map(str, skewed))} hold one label in >= 95% of their examples; under such "
              "label skew the cycle tends to end predicting the last client's label (docs/label-skew.md)")
    run.pretrained = ({n: p.detach().clone() for n, p in run.model.named_parameters()}
                      if args.download_fraction < 1 else None)  # the copy every client starts from
    run.log_priors = ([label_log_prior(examples, num_labels) for examples in run.clients] if args.logit_adjust
                      else [None] * run.num_clients)
    # optimizer steps of each client's turn (the same every round), and of the whole run, for the schedule
    per_step = args.batch_size * args.grad_accum
    run.turn_steps = ([args.local_steps] * run.num_clients if run.stream else
                      [args.local_steps or max(1, math.ceil(args.local_epochs * len(examples) / per_step))
                       for examples in run.clients])
    run.warmup = round(args.warmup_ratio * sum(run.turn_steps)) if args.warmup_ratio else args.warmup_steps


def turn_learning_rates(run, r, c):
    """The schedule's learning rates for the steps of client c's turn in round r (carried over the whole run)."""
    steps_per_round = sum(run.turn_steps)
    first = (r - 1) * steps_per_round + sum(run.turn_steps[:c])
    return [learning_rate(run.args, first + k, run.args.rounds * steps_per_round, run.warmup)
            for k in range(run.turn_steps[c])]


def turn_plan(run, r, c):
    """Client c's turn of round r -> (its blocks, its seed, its learning rates): functions of the flags alone, so the
    server and the client's own process (its rank, its Flower node) compute the same."""
    blocks = blocks_of_turn(run.cycle, run.args.switch_mode, run.args.seed, r, c, run.num_clients, run.layers_per_turn)
    return blocks, derive_seed(run.args.seed, r, c), turn_learning_rates(run, r, c)


def client_turn(run, r, c, wire_down):
    """Client c's turn, wherever it lives (this process, its torchrun rank, its Flower node): bring its model up to
    date with the download, train its block (and the head) on its data -> (upload message, stats). Every transport
    calls this one function. In the lossless modes the working model already holds the global weights (every turn's
    upload is applied on every rank; a Flower node loads what the client kept and applies the download), so only
    the lossy modes rebuild the client's own copy first (`held_weights` from the server's record; on a node the
    model already holds the client's copy, and --download_fraction < 1 resets what is not sent to pretrained)."""
    args = run.args
    blocks, seed, lrs = turn_plan(run, r, c)
    lossy = args.download == "int8" or run.pretrained is not None
    if run.server is None:  # a Flower node
        base = run.pretrained
    else:
        base = held_weights(run.server, run.units, c, run.pretrained) if lossy else None
    sync_model(run.model, tasks.unpack(wire_down), base=base)
    if run.stream:  # the next local_steps batches of the stream, in stream order
        per_step, pool = args.batch_size * args.grad_accum, run.clients[0]
        order = stream_indices(len(pool), args.local_steps * per_step, (r - 1) * run.num_clients + c, args.seed)
        batches = [tasks.make_batch(args.task, [pool[i] for i in order[k:k + args.batch_size]], run.tokenizer,
                                    run.device) for k in range(0, len(order), args.batch_size)]
    else:
        batches = tasks.local_batches(args, run.clients[c], run.tokenizer, run.device, seed)
    trained = [n for b in blocks for n in run.units[b]] + run.units["head"]
    upload, stats = client_update(run.model, trained, batches, lrs, args.weight_decay, args.grad_accum, seed,
                                  run.units["head"], args.head_lr_scale, run.log_priors[c], args.adam_eps,
                                  args.max_grad_norm)
    return tasks.pack(upload), stats


def check_upload(run, wire_up, blocks):
    """-> (why a turn's upload cannot be taken, or None; the unpacked upload). It must hold exactly the tensors of
    the client's blocks and the head, of the server's shapes and dtypes, all finite (`tasks.check_tensors`): a bad
    upload is left out (the turn is lost, the cycle goes on), so no client writes a tensor it did not train."""
    want = [n for b in blocks for n in run.units[b]] + run.units["head"]
    return tasks.check_tensors(wire_up, want, run.server["weights"])


def state_tags(server, c, blocks, held):
    """Flower only: what client c holds before its turn (`held`: the server's record before the download, {unit:
    version}) and after it (the record after the download, its trained units one version on), as tags its node
    checks against what it keeps on disk; "" = the pretrained model (a new client, or one that dropped out)."""
    after = dict(server["seen"].get(c, {}))
    for u in {*blocks, "head"}:
        after[u] = server["version"][u] + 1  # what server_aggregate will make them
    tag = lambda record: json.dumps(sorted(record.items())) if any(record.values()) else ""  # noqa: E731
    return tag(held), tag(after)


def evaluate_round(run, r, t0, turns):
    """Server, end of round r: evaluate the global model, write the round's ledger lines, metrics row and
    checkpoint (a crash between them redoes the round), print its line."""
    args = run.args
    taken = [t for t in turns if "dropped" not in t]  # the turns whose upload the server took
    row = {"round": r, "train_loss": sum(t["loss"] for t in taken) / len(taken) if taken else None}
    if r % args.eval_every == 0 or r == args.rounds:
        per_example = {}
        row.update(tasks.evaluate(args, run.model, run.tokenizer, run.test, run.device, run.val, run.progress,
                                  per_example))
        run.files.heldout_examples(r, per_example)
    row.update(upload_bytes=sum(t["upload_bytes"] for t in turns) / len(turns),  # mean per client turn
               download_bytes=sum(t["download_bytes"] for t in turns) / len(turns),
               upload_bytes_total=sum(t["upload_bytes"] for t in turns),
               download_bytes_total=sum(t["download_bytes"] for t in turns),
               seconds=round(time.time() - t0, 2),
               peak_memory_bytes=max((t["peak_memory_bytes"] for t in taken), default=None),
               # the turns' wall time, summed; popped from the turns, so the ledger lines stay what they were
               client_seconds=round(sum(t.pop("client_seconds") for t in turns), 2),
               dropped=[t["client"] for t in turns if "dropped" in t])
    run.files.ledger(turns + run.transport.wire_ledger(r, list(range(run.num_clients))))
    run.files.metric(row)
    save_checkpoint(run.out, run.server, r)  # the round is complete: its last broadcast reached every rank
    run.saved = r
    run.progress.log(f"round {r} " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                             if isinstance(v, float) and k != "seconds" and "bytes" not in k)
                     + f" up {tasks.fmt_bytes(row['upload_bytes'])} down {tasks.fmt_bytes(row['download_bytes'])} "
                     f"{row['seconds']:.0f}s")


def evaluate_round_zero(run):
    """Server, before training: the pretrained model's metrics as round 0, and checkpoint 0."""
    t0 = time.time()
    per_example = {}
    row = {"round": 0, "train_loss": None, **tasks.evaluate(run.args, run.model, run.tokenizer, run.test, run.device,
                                                             run.val, run.progress, per_example),
           "upload_bytes": None, "download_bytes": None, "seconds": 0.0, "peak_memory_bytes": None}
    row["seconds"] = round(time.time() - t0, 2)
    run.files.metric(row)
    run.files.heldout_examples(0, per_example)
    run.progress.log("round 0 " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                           if isinstance(v, float) and k != "seconds" and "bytes" not in k)
                     + f" (evaluation {row['seconds']:.0f}s)")
    save_checkpoint(run.out, run.server, 0)


def main(argv=None, transport=None):
    """The rounds (the paper's Algorithm 1): in each, the clients take turns in a cycle; a turn downloads what the
    client lacks, trains one block on the client's data, uploads the block, and the server takes it.
    transport: Flower's (tasks/flower.py); by default one process or torchrun's ranks."""
    run = setup(argv if isinstance(argv, argparse.Namespace) else parse_args(argv), transport)
    args, transport, progress, server, units = run.args, run.transport, run.progress, run.server, run.units
    if run.start == 0:
        transport.on_server(evaluate_round_zero, run)
    r = run.start
    try:
        for r in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            turns = []
            for c in range(run.num_clients):
                blocks, seed, lrs = turn_plan(run, r, c)
                # 1. download: server -> client c. Every rank runs it on its replica (which records what c now
                #    holds); no collective carries it: c's rank serialises it from its own replica, rank 0 too (for
                #    the ledger), the other ranks skip that work.
                held = dict(server["seen"].get(c, {}))
                down = server_download(server, units, c, blocks, args.download, args.download_fraction, seed)
                wire_down = tasks.pack(down) if transport.is_server or transport.mine([c]) else b""
                tag = state_tags(server, c, blocks, held) if transport.keeps_client_state else None
                # 2. client c's turn, where it lives: sync, train the block (and head) -> the upload, on every rank
                tc = time.time()
                wire_up, stats = transport.from_client(c, TURN_STATS, client_turn, run, r, wire_down, tag)
                turn_seconds = time.time() - tc  # the turn as this rank sees it: its own work, or waiting for it
                # 3. server: take a well-formed upload (every rank's replica); every working copy follows the global
                #    model. A client that did not answer (Flower) or sent a malformed upload loses its turn, and the
                #    server treats it as holding the pretrained model again (its next download says so).
                why, upload = ((stats["dropped"], None) if wire_up is None else check_upload(run, wire_up, blocks))
                if why is not None:
                    server["seen"][c], server["lossy"][c] = {}, []
                    turns.append({"round": r, "turn": (r - 1) * run.num_clients + c, "client": c,
                                  "block": "+".join(blocks), "dropped": why, "download_bytes": len(wire_down),
                                  "upload_bytes": 0, "client_seconds": round(turn_seconds, 3)})
                    progress.log(f"round {r} client {c}: left out of the round: {why}")
                    progress.advance("turns")
                    continue
                server_aggregate(server, c, upload, units)
                sync_model(run.model, upload)
                turns.append({"round": r, "turn": (r - 1) * run.num_clients + c, "turns_per_round": run.num_clients,
                              "client": c, "block": "+".join(blocks), "lr_first": lrs[0], "lr_last": lrs[-1],
                              "download_units": sent_units(down, units), "loss": stats["loss"],
                              "upload_bytes": len(wire_up), "download_bytes": len(wire_down),
                              "peak_memory_bytes": int(stats["peak_memory_bytes"]),
                              "client_seconds": round(turn_seconds, 3)})
                progress.log(f"round {r} client {c} {'+'.join(blocks)}: loss {stats['loss']:.4f} up "
                             f"{tasks.fmt_bytes(len(wire_up))} down {tasks.fmt_bytes(len(wire_down))} "
                             f"mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}")
                progress.advance("turns")
            if run.pretrained is not None or args.download == "int8":
                sync_model(run.model, server["weights"])  # lossy views: evaluate (and continue from) the exact model
            # 4. server: evaluate the global model, write the round
            transport.on_server(evaluate_round, run, r, t0, turns)
    except GroupError as e:  # a rank exited or hangs: one line, no traceback
        raise transport.lost_rank(e, r, run.saved, args.dist_timeout) from None
    finally:
        progress.close()
    transport.on_server(finish, run)
    transport.close()
    return run.files.metrics


def finish(run):
    """The exact global model (a lossy download may have differed) in Hugging Face format, and the loss plot."""
    sync_model(run.model, run.server["weights"])
    run.progress.log(f"wrote {tasks.export_model(run.model, run.tokenizer, run.out / 'model')} (save_pretrained: "
                     "config, weights, tokenizer)")
    run.files.plot("FedCyBGD")
    if line := run.files.change_line():
        run.progress.log(line)


if __name__ == "__main__":
    tasks.run_cli("fedcybgd", main)
