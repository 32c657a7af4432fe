"""One FedKSeed client step on the default model: fused seed ops (3 passes) vs a MeZO-style step (4 passes), and
the fused step with bfloat16 forwards over the float32 weights (--compute_dtype bfloat16).

    python bench/bench_zo_step.py                  # SmolLM2-135M, float32, batch 1, 256 tokens
    python bench/bench_zo_step.py --repeats 5 --threads 1 --model path/to/model
    python bench/bench_zo_step.py --device cuda --repeats 10                 # on a GPU
    python bench/bench_zo_step.py --device cuda --model llama-1b --repeats 10  # a 1.1B Llama, random weights

The MeZO-style step is what the official FedKSeed code does per step: seed the global RNG, draw
z = torch.normal(...) for every parameter and add it out of place (`param.data = param.data + eps * z`), four
times (+eps, -2 eps, +eps to restore, then the update -lr*g*z). The fused step is `fedkseed.zo_step`: three
in-place passes of the compiled `perturb_` op. Both run here, interleaved, on the same model and batch; the
script prints medians, the split between the two forward passes and the perturbation passes, and the ratio.
Target on a 2-core CPU: >= 3x for the whole step. On a GPU the passes are memory-bound and the target is the
step against its two forwards: <= 1.15x on an H100. `--model llama-1b` builds a 1.1B-parameter Llama from a
config (TinyLlama's shapes) with random weights on the device: timing needs no trained weights.

The bfloat16 row is `fedkseed.zo_step` with a compute copy: the forwards read a bfloat16 copy of the float32
weights, which the same three passes write (`perturb_copy_multi_`). Targets on this CPU (AVX-512 BF16): that step
<= 1.2x its two bfloat16 forwards and >= 2x faster than the fused float32 step. `--probes N` (default 64) also
measures whether the estimate survives: for N (seed, example) pairs, g from the bfloat16 copy's forwards against g
from float32 forwards at the same float32 weights +- eps z (Dolly examples from data/ when present, else random
tokens): their correlation and how often the signs agree.
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fedkseed as fk
import seedops  # noqa: E402
import tasks  # noqa: E402


@torch.no_grad()
def mezo_style_step(named, model, batch, seed, eps, lr):
    """The official code's step: 4 passes of torch.normal under torch.manual_seed, out-of-place adds."""
    def perturb(scale):
        torch.manual_seed(seed)
        for _, p in named:
            z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
            p.data = p.data + scale * eps * z

    perturb(1)
    loss1 = model(**batch).loss
    perturb(-2)
    loss2 = model(**batch).loss
    perturb(1)
    g = ((loss1 - loss2) / (2 * eps)).item()
    torch.manual_seed(seed)
    for _, p in named:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data - lr * (g * z)
    return g


@torch.no_grad()
def mezo_style_pass(named, seed, scale):
    torch.manual_seed(seed)
    for _, p in named:
        z = torch.normal(mean=0, std=1, size=p.data.size(), device=p.data.device, dtype=p.data.dtype)
        p.data = p.data + scale * z


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def llama_1b(device):
    """A 1.1B-parameter Llama (TinyLlama-1.1B's shapes), random weights, built on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    with torch.device(device):
        return LlamaForCausalLM(config).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=fk.DEFAULT_MODEL, help="a model name or folder, or llama-1b (random weights)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="steps of each kind (interleaved); medians are printed")
    ap.add_argument("--compute_dtype", default="bfloat16", choices=["bfloat16", "float16"],
                    help="the compute copy's dtype for the third row and the probes")
    ap.add_argument("--probes", type=int, default=64, help="(seed, example) pairs for the estimate's check; 0 = none")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); "
                    "on a machine busy with other jobs, 1 avoids threads waiting on each other")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not seedops.HAVE_COMPILED_OPS:
        sys.exit("the compiled ops are not built (pip install --no-build-isolation -e .): nothing fused to measure")

    model, tok = (llama_1b(args.device), None) if args.model == "llama-1b" else tasks.load_model(
        args.model, "sft", device=args.device)
    weights = fk.weights_of(model)
    params, offsets = weights.tensors, weights.offsets
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    n_el = sum(p.numel() for p in params)
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens),
                        generator=torch.Generator().manual_seed(0)).to(args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    eps, lr, seed = 1e-3, 1e-6, 123456789
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} threads")
    print(f"{args.model}: {n_el / 1e6:.1f}M params float32, batch 1 x {args.tokens} tokens, {where}, "
          f"{args.repeats} repeats")

    low = copy.deepcopy(model).to(getattr(torch, args.compute_dtype))  # the compute copy's model
    copies = fk.weights_of(low).tensors
    low_weights = fk.SimpleNamespace(tensors=params, offsets=offsets, kind=fk.GAUSSIAN, copies=copies, masks=None)
    fk.batch_loss(model, batch)  # warm-up
    fk.batch_loss(low, batch)
    seedops.perturb_multi_(params, seed, offsets, 0.0, fk.GAUSSIAN)  # first write to the loaded weights' pages (adds 0)
    fused, mezo, forward, fused_pass, mezo_pass, rad_pass = [], [], [], [], [], []
    low_step, low_forward, low_pass, folded, pending = [], [], [], [], [None]
    for r in range(args.repeats):  # interleaved, so drift in the machine's load hits every kind alike
        forward.append(timed(lambda: fk.batch_loss(model, batch)))
        low_forward.append(timed(lambda: fk.batch_loss(low, batch)))
        low_pass.append(timed(lambda: seedops.perturb_copy_multi_(params, copies, seed, offsets, 1e-12, fk.GAUSSIAN)))
        low_step.append(timed(lambda: fk.zo_step(low, low_weights, batch, seed + r, eps, lr)))
        folded.append(timed(lambda: pending.__setitem__(0, fk.zo_step_folded(model, weights, batch, seed + r, eps, lr,
                                                                             pending[0])[2])))  # --fold: 2 passes
        fused_pass.append(timed(lambda: seedops.perturb_multi_(params, seed, offsets, 1e-12, fk.GAUSSIAN)))
        rad_pass.append(timed(lambda: seedops.perturb_multi_(params, seed, offsets, 1e-12, fk.RADEMACHER)))
        mezo_pass.append(timed(lambda: mezo_style_pass(named, seed, 1e-12)))
        weights = fk.weights_of(model)  # the MeZO-style pass replaced the parameter tensors
        params, low_weights.tensors = weights.tensors, weights.tensors
        fused.append(timed(lambda: fk.zo_step(model, weights, batch, seed + r, eps, lr)))
        mezo.append(timed(lambda: mezo_style_step(named, model, batch, seed + r, eps, lr)))
        weights = fk.weights_of(model)
        params, low_weights.tensors = weights.tensors, weights.tensors

    med = statistics.median
    fwd2, low2 = 2 * med(forward), 2 * med(low_forward)
    print(f"  {'':<52} {'step':>8}  {'2 forwards':>10}  {'perturbation passes':>20}")
    for name, t, f2, passes in [
            ("MeZO-style step (4 x torch.normal, out-of-place add)", med(mezo), fwd2, 4 * med(mezo_pass)),
            ("fused step (3 x perturb_)", med(fused), fwd2, 3 * med(fused_pass)),
            (f"fused step, {args.compute_dtype} forwards (3 x perturb_copy_)", med(low_step), low2, 3 * med(low_pass))]:
        print(f"  {name:<52} {t:7.3f} s  {f2:8.3f} s  {passes:8.3f} s ({100 * passes / t:4.1f}% of the step)")
    print(f"  one pass over {n_el / 1e6:.1f}M weights: MeZO-style {med(mezo_pass):.3f} s, fused Gaussian "
          f"{med(fused_pass):.3f} s ({n_el / med(fused_pass) / 1e9:.2f} G elements/s), fused Rademacher "
          f"{med(rad_pass):.3f} s")
    print(f"speedup of the whole step: {med(mezo) / med(fused):.2f}x (target >= 3x on CPU); "
          f"of the perturbation passes: {4 * med(mezo_pass) / (3 * med(fused_pass)):.1f}x")
    if pending[0] is not None:
        fk.perturb(weights, *pending[0])  # the last folded step's closing pass
    print(f"fused step / its two forwards: {med(fused) / fwd2:.2f}x (target <= 1.15x on an H100); folded (--fold, 2 "
          f"passes) {med(folded):.3f} s, {med(folded) / fwd2:.2f}x its forwards")
    print(f"{args.compute_dtype} forwards: the step / its two forwards {med(low_step) / low2:.2f}x (target <= 1.2x); "
          f"fused float32 step / this step {med(fused) / med(low_step):.2f}x (target >= 2x); MeZO-style step / this "
          f"step {med(mezo) / med(low_step):.2f}x (target >= 7x); one copy-writing pass {med(low_pass):.3f} s")
    if args.probes:
        probe_estimate(model, low, tok, args, eps)


def probe_batches(n, tokens, tok, vocab, device):
    """n one-example batches: Dolly's training examples (data/) when present and the model has a tokenizer, else
    random tokens."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "dolly", "databricks-dolly-15k.jsonl")
    if os.path.isfile(path) and tok is not None:
        examples = tasks.load_instruction_data("dolly", path, num_clients=1, iid="iid", seed=0).clients[0][:n]
        rows = tasks.tokenize_examples(tok, examples, tokens, log=None)
        return "Dolly examples", [{k: v.to(device) for k, v in tasks.collate([r], tok.pad_token_id).items()}
                                  for r in rows]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return "random tokens", out


@torch.no_grad()
def probe_estimate(model, low, tok, args, eps):
    """g from the compute copy's forwards vs g from float32 forwards, at the same float32 weights +- eps z."""
    import numpy as np
    weights = fk.weights_of(model)
    params, offsets = weights.tensors, weights.offsets
    copies = fk.weights_of(low).tensors
    seeds = fk.candidate_seeds(7, 8)
    what, batches = probe_batches(-(-args.probes // len(seeds)), args.tokens, tok, model.config.vocab_size,
                                  args.device)
    g32, g16 = [], []
    for b in batches:
        for s in seeds:
            if len(g32) == args.probes:
                break
            losses = []
            for scale in (eps, -2 * eps):  # the float32 weights and their copy, as the step has them
                seedops.perturb_copy_multi_(params, copies, s, offsets, scale, fk.GAUSSIAN)
                losses.append((fk.batch_loss(model, b), fk.batch_loss(low, b)))
            seedops.perturb_copy_multi_(params, copies, s, offsets, eps, fk.GAUSSIAN)
            g32.append((losses[0][0] - losses[1][0]) / (2 * eps))
            g16.append((losses[0][1] - losses[1][1]) / (2 * eps))
    g32, g16 = np.array(g32), np.array(g16)
    print(f"estimate over {len(g32)} (seed, example) probes ({what}, eps {eps:g}): correlation of {args.compute_dtype} g "
          f"with float32 g {np.corrcoef(g32, g16)[0, 1]:.3f}, same sign in {int(np.sum(np.sign(g32) == np.sign(g16)))}"
          f"/{len(g32)}; |g| float32 median {np.median(np.abs(g32)):.3f}, |difference| median "
          f"{np.median(np.abs(g32 - g16)):.3f}")


if __name__ == "__main__":
    main()
