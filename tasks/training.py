"""A client's local training with an optimizer, as fedcybgd.py's turn and fedavg.py's round run it.

    upload, stats = tasks.train_steps(model, names, batches, make_optimizer, lrs)   # steps on the tensors `names`
    groups = tasks.param_groups(named, weight_decay)                               # decay on matrices only
"""
import contextlib

import torch

from .memory import PeakAllocations, tensor_bytes


def param_groups(named, weight_decay):
    """Weight decay by parameter shape: matrices decay; ndim < 2 (biases, norm weights) do not."""
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_steps(model, names, batches, make_optimizer, lrs, grad_accum=1, seed=0, loss_fn=None, clip=None,
                fp32_masters=True):
    """A client's local training, as fedcybgd.py's turn and fedavg.py's round run it: optimizer steps on the tensors
    `names` of `model` (everything else frozen), step k on micro-batches [k*grad_accum, (k+1)*grad_accum) of `batches`
    at learning rate lrs[k] -> (upload: name -> a copy of each trained tensor, {"loss": mean over the micro-batches,
    "peak_memory_bytes"}). The model is in eval mode with no gradients on entry and on return.

    make_optimizer([(name, tensor)]) -> a torch optimizer over those tensors; a param group's "lr_scale" (default 1)
    multiplies lrs[k]. The optimizer lives for this call only. With bf16/fp16 weights and fp32_masters it steps fp32
    master copies, rounded into the weights after every step, so updates below the low precision's resolution
    accumulate. loss_fn(model, micro_batch) -> the loss (default: model(**micro_batch).loss); clip(tensors) runs on
    the tensors the optimizer steps, their gradients complete, before each step (gradient clipping).
    peak_memory_bytes, tasks/memory.py's definition: held (every weight the model holds, the fp32 masters) + the peak of
    the tensors the first step allocates (activations, gradients, the optimizer state it creates)."""
    torch.manual_seed(seed)  # dropout, if the model has any, is a function of (seed, round, client)
    params = dict(model.named_parameters())
    trained = [(n, params[n]) for n in names]
    for _, p in trained:
        p.requires_grad_(True)
    low_precision = fp32_masters and any(p.dtype != torch.float32 for _, p in trained)
    # masters [the trained tensors' shapes, fp32]: what the optimizer steps; with fp32 weights the weights themselves
    masters = [(n, p.detach().float().clone()) if low_precision else (n, p) for n, p in trained]
    opt = make_optimizer(masters)
    model.train()
    held = tensor_bytes(model.parameters()) + (tensor_bytes(m for _, m in masters) if low_precision else 0)
    losses, first = [], PeakAllocations()
    for step in range(len(batches) // grad_accum):
        with first if step == 0 else contextlib.nullcontext():  # the first step: its allocations' peak
            for micro in batches[step * grad_accum:(step + 1) * grad_accum]:
                loss = model(**micro).loss if loss_fn is None else loss_fn(model, micro)
                (loss / grad_accum).backward()
                losses.append(loss.item())
            if low_precision:
                for (_, m), (_, p) in zip(masters, trained):
                    m.grad, p.grad = p.grad.float(), None
            if clip is not None:
                clip([m for _, m in masters])
            for group in opt.param_groups:
                group["lr"] = lrs[step] * group.get("lr_scale", 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if low_precision:
            with torch.no_grad():
                for (_, m), (_, p) in zip(masters, trained):
                    p.copy_(m)  # round the fp32 master once into the weight dtype
    peak = held + first.peak
    for _, p in trained:
        p.requires_grad_(False)
        p.grad = None
    del opt, masters
    model.eval()
    return {n: p.detach().clone() for n, p in trained}, {"loss": sum(losses) / len(losses), "peak_memory_bytes": peak,
                                                          "held_bytes": held, "step_bytes": first.peak}
