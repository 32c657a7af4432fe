"""One FedCyBGD client step vs one full-parameter AdamW step: same model, same batch, one run.

    python bench/bench_cybgd.py                       # smollm2-135m, batch 2 x 256 tokens, block layer.0
    python bench/bench_cybgd.py --block layer.29 --steps 5

Each variant runs in a fresh child process, so one cannot inherit the other's memory. Two memory figures:
  * peak RSS: the process's resident-set high-water mark (VmHWM) during the step, reset just before it
    via /proc/self/clear_refs (Linux), minus the resident size before the step (weights, libraries);
    the absolute peak is printed too.
  * tensor bytes: fedcybgd's ledger formula -- weights + gradients + Adam moments + fp32 masters +
    activations autograd saved for backward -- the same figure a run writes as peak_memory_bytes.
The FedCyBGD step trains one block (default layer.0, the worst case: backward runs through every
layer above it) plus the head; the baseline trains every parameter. The batch is random token ids.
Time is the median over --steps steps after one warm-up step (the CPU may be shared: compare ratios).
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fedcybgd as cy  # noqa: E402
import tasks  # noqa: E402


def status_kb(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(args):
    model, _ = tasks.load_model(args.model, "sft", dtype=args.dtype)
    model.requires_grad_(False)
    cycle, units = cy.find_blocks(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():
        model(**batch)  # warm the allocator and lazy initialisations outside the measurement
    rss_before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    times = []
    if args.child == "cybgd":
        names = units[args.block] + units["head"]
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            _, stats = cy.client_update(model, names, [batch], [1e-5], 0.01, 1, seed=step)
            times.append(time.perf_counter() - t0)
            if step == 0:
                peak_rss, tensor_bytes = status_kb("VmHWM"), stats["peak_memory_bytes"]
        trained = sum(p.numel() for n, p in model.named_parameters() if n in names)
    else:
        named = list(model.named_parameters())
        model.requires_grad_(True)
        opt = torch.optim.AdamW(tasks.param_groups(named, 0.01), lr=1e-5)
        model.train()
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            with tasks.SavedActivations(model) as saved:
                loss = model(**batch).loss
            loss.backward()
            grads = tasks.tensor_bytes(p.grad for _, p in named)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            if step == 0:
                peak_rss = status_kb("VmHWM")
                state = tasks.tensor_bytes(t for s in opt.state.values() for t in s.values() if t.ndim > 0)
                tensor_bytes = tasks.tensor_bytes(model.parameters()) + grads + state + saved.bytes
        trained = sum(p.numel() for _, p in named)
    print(json.dumps({"peak_rss": peak_rss, "rss_before": rss_before, "tensor_bytes": tensor_bytes,
                      "seconds": statistics.median(times[1:]), "trained": trained,
                      "params": sum(p.numel() for p in model.parameters())}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--block", default="layer.0", help="the unit the FedCyBGD step trains")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--child", choices=("cybgd", "full"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    tasks.load_model(args.model, "sft")  # convert/unzip into the cache once, outside the measurements
    results = {}
    for variant in ("full", "cybgd"):
        argv = [sys.executable, __file__, "--child", variant] + sys.argv[1:]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {variant} child failed: {r.stderr.strip().splitlines()[-1]}")
        results[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    f, c = results["full"], results["cybgd"]
    mb = lambda x: f"{x / 2**20:9.1f} MiB"
    print(f"model {args.model} ({f['params'] / 1e6:.1f}M params, {args.dtype}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, FedCyBGD block {args.block} + head ({c['trained'] / 1e6:.2f}M trained)")
    print(f"{'':34}{'full AdamW':>14}{'FedCyBGD':>14}{'ratio':>8}")
    rows = [("peak RSS during the step", "peak_rss"), ("  minus RSS before the step", None),
            ("tensor bytes (ledger formula)", "tensor_bytes")]
    for label, key in rows:
        a, b = (f[key], c[key]) if key else (f["peak_rss"] - f["rss_before"], c["peak_rss"] - c["rss_before"])
        print(f"{label:34}{mb(a):>14}{mb(b):>14}{b / a:8.2f}x")
    print(f"{'step time (median)':34}{f['seconds']:13.2f}s{c['seconds']:13.2f}s{c['seconds'] / f['seconds']:8.2f}x")


if __name__ == "__main__":
    main()
