"""Sparse perturbations, measured before they become an option: does a fixed mask of the weights learn more per
forward than the dense ZO step? (centralized ZO steps, as FedKSeed's client takes them; SST-2 or Dolly)

    python bench/mask_probe.py share --task sst2 --out runs/mask        # each rule's share of ||grad||^2 at w0
    python bench/mask_probe.py curve --task sst2 --rule sensitivity --density 0.01 --estimator fzoo --lr 1e-2 \
        --seed 1 --out runs/mask                                        # validation accuracy against forwards
    python bench/mask_probe.py grid --task sst2 --out runs/mask         # the grid of docs/fedkseed.md, resumable
    python bench/mask_probe.py report --out runs/mask                   # its tables (markdown)

Rules: a mask is each tensor's top `density` fraction by a score (seedops.mask_of), fixed for the run:
  sensitivity  the squared per-example gradient at w0 summed over --mask_examples examples the server holds (carved
               from the training pool like the validation set, never trained on): SensZOQ's rule; a server would send it
  magnitude    -|w0|: the smallest weights, Sparse MeZO's rule fixed at w0 (every party computes it from w0)
  random       a uniform score from the master seed's "mask" stream (every party computes it)
  dense        no mask: the step FedKSeed takes today
Why a mask can help: a ZO step's expected progress is about ||grad_M||^2 / |M| at its best lr, so a mask gains in
proportion to its share of ||grad||^2 over its share of the weights (`share` prints both, the gradient taken on the
validation set at w0); a random mask gains nothing in expectation but makes a pass and a replay cheaper.

A curve: ZO steps on batches of 16 (SST-2, the README's review template) or 1 (Dolly, 256 tokens) from a seeded pass
over the training pool, forwards in bfloat16 over float32 weights (--compute_dtype bfloat16), z Rademacher for FZOO
(n = 4 directions, 5 forwards a step) and Gaussian for the two-point step (2 forwards), the masked z the dense z at
the mask (seedops' masked ops); evaluated every --eval_every forwards on --val validation examples (accuracy and the
label-word loss; Dolly: the token loss). Nothing here reads the held-out set.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fedkseed as fk  # noqa: E402
import seedops  # noqa: E402
import tasks  # noqa: E402

RULES = ("dense", "sensitivity", "magnitude", "random")
DENSITIES = (0.001, 0.01, 0.1)
LR_DENSE = {("sst2", "fzoo"): 1e-3, ("sst2", "two_point"): 1e-5, ("dolly", "two_point"): 2e-6, ("dolly", "fzoo"): 2e-4}


# ----------------------------------------------------------------------------------------------------------- data
def load(task, seed, val, mask_examples, max_length):
    """-> (model float32, tokenizer, train, val, mask set): tokenized; the validation and mask examples carved from the
    training pool with the master seed's streams, the rest shuffled for the steps."""
    model, tok = tasks.load_model("smollm2-135m", "sft")
    if task == "sst2":
        data = tasks.prompts.load_prompt_data("sst2", str(ROOT / "data/glue/SST-2"), 1, "iid", seed, val)
        pool, val_set = data.clients[0], data.val
        template, ids = tasks.prompts.pick_template("sst2", "review", model, tok, val_set, max_length)
        enc = lambda es: [tasks.prompts.tokenize_prompt(tok, e, template, max_length, ids) for e in es]  # noqa: E731
    else:
        data = tasks.load_instruction_data("dolly", str(ROOT / "data/dolly/databricks-dolly-15k.jsonl"), 1, "iid",
                                           seed, tokenizer=tok, max_length=max_length, val_samples=val)
        pool, val_set = data.clients[0], data.val
        enc = lambda es: tasks.tokenize_examples(tok, es, max_length, log=None)  # noqa: E731
    chosen = set(tasks.stream(seed, "mask").choice(len(pool), mask_examples, replace=False).tolist())
    train = [e for i, e in enumerate(pool) if i not in chosen]
    return model, tok, enc(train), enc(val_set), enc([pool[i] for i in sorted(chosen)])


def batch_of(rows, pad):
    return tasks.collate_tokenized(rows, pad)


def loss_of(model, batch):
    return tasks.prompts.label_word_loss(model, batch) if "label_ids" in batch else model(**batch).loss


# ----------------------------------------------------------------------------------------------------------- rules
def gradient(model, rows, pad, bs):
    """The gradient at w0 of the mean loss over `rows` (float32, one tensor per trainable parameter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    n = len(rows)
    for k in range(0, n, bs):
        part = rows[k:k + bs]
        (loss_of(model, batch_of(part, pad)) * len(part) / n).backward()
    g = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return g


def squared_gradients(model, rows, pad):
    """sum_i g_i^2 over the examples, one backward each: the diagonal Fisher SensZOQ ranks weights by."""
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for r in rows:
        for p in params:
            p.grad = None
        loss_of(model, batch_of([r], pad)).backward()
        for a, p in zip(acc, params):
            a.add_(p.grad.float() ** 2)
    for p in params:
        p.grad = None
    return acc


def scores_of(rule, model, mask_rows, pad, seed):
    params = [p.detach() for p in model.parameters() if p.requires_grad]
    if rule == "sensitivity":
        return squared_gradients(model, mask_rows, pad)
    if rule == "magnitude":
        return [-p.abs() for p in params]
    g = torch.Generator().manual_seed(int(tasks.stream(seed, "mask", 1).integers(0, 2**62)))
    return [torch.rand(p.shape, generator=g) for p in params]


def masks_for(rule, density, model, mask_rows, pad, seed, cache):
    if rule == "dense":
        return None
    if rule not in cache:
        cache[rule] = scores_of(rule, model, mask_rows, pad, seed)
    return seedops.mask_of(cache[rule], density)


# ----------------------------------------------------------------------------------------------------------- share
def share(a):
    model, tok, train, val, mask_rows = load(a.task, a.seed, a.val, a.mask_examples, a.max_length)
    t = time.time()
    g = gradient(model, val, tok.pad_token_id, 16 if a.task == "sst2" else 4)
    total = sum(float((x.double() ** 2).sum()) for x in g)
    n = sum(x.numel() for x in g)
    print(f"{a.task}: gradient at w0 on {len(val)} validation examples ({time.time() - t:.0f} s), {n / 1e6:.1f}M weights")
    rows, cache = [], {}
    for rule in RULES[1:]:
        for d in DENSITIES:
            masks = masks_for(rule, d, model, mask_rows, tok.pad_token_id, a.seed, cache)
            got = sum(float((x.reshape(-1)[m].double() ** 2).sum()) for x, m in zip(g, masks))
            size = sum(len(m) for m in masks)
            rows.append({"rule": rule, "density": d, "weights_share": size / n, "grad_share": got / total,
                         "gain": (got / total) / (size / n)})
            print(f"  {rule:<12} {d:>6}: {size / n:.4%} of the weights hold {got / total:.4%} of ||grad||^2 "
                  f"({rows[-1]['gain']:.2f}x its share)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"share_{a.task}.json").write_text(json.dumps({"task": a.task, "seed": a.seed, "val": len(val),
                                                          "mask_examples": len(mask_rows), "rows": rows}, indent=1))


# ----------------------------------------------------------------------------------------------------------- curve
@torch.no_grad()
def evaluate(model, task, val, pad):
    if task == "sst2":
        out = tasks.prompts.evaluate_prompts(model, val, pad, batch_size=32)
        return out["accuracy"], out["eval_loss"]
    return None, tasks.heldout_loss(model, val, pad, batch_size=4)


def name_of(a):
    d = "" if a.rule == "dense" else f"-{a.density:g}"
    return f"{a.task}-{a.estimator}-{a.rule}{d}-lr{a.lr:g}-s{a.seed}"


def curve(a, loaded=None, cache=None):
    out = Path(a.out) / f"{name_of(a)}.json"
    if out.exists():
        return json.loads(out.read_text())
    pristine, tok, train, val, mask_rows = loaded or load(a.task, a.seed, a.val, a.mask_examples, a.max_length)
    pad = tok.pad_token_id
    masks = masks_for(a.rule, a.density, pristine, mask_rows, pad, a.seed, cache if cache is not None else {})
    model = copy.deepcopy(pristine)
    w0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    # the float32 weights apart from the model, whose parameters become the bfloat16 copy the forwards read
    model.to(torch.bfloat16)
    w = fk.weights_of(model, fk.RADEMACHER if a.estimator == "fzoo" else fk.GAUSSIAN)
    w.copies, w.tensors, w.masks = w.tensors, [p.clone() for p in w0], masks
    for c, p in zip(w.copies, w.tensors):
        c.copy_(p)
    rng = tasks.stream(a.seed, "seed_draws", 0, 0)
    order = rng.permutation(len(train))
    per_step = 2 if a.estimator == "two_point" else a.directions + 1
    bs = 16 if a.task == "sst2" else 1
    acc, vloss = evaluate(model, a.task, val, pad)
    points, forwards, t0, step = [(0, acc, vloss, 0.0)], 0, time.time(), 0
    print(f"{name_of(a)}: forwards 0 val {acc} {vloss:.4f}", flush=True)
    while forwards < a.forwards:
        rows = [train[order[(step * bs + b) % len(order)]] for b in range(bs)]
        batch = batch_of(rows, pad)
        seeds = [int(x) for x in rng.integers(1, 2**63 - 1, size=1 if a.estimator == "two_point" else a.directions)]
        if a.estimator == "two_point":
            fk.zo_step(model, w, batch, seeds[0], a.eps, a.lr)
        else:
            fk.one_sided_step(model, w, batch, seeds, a.eps, a.lr, normalise=True)
        forwards += per_step
        step += 1
        if forwards % a.eval_every < per_step or forwards >= a.forwards:
            acc, vloss = evaluate(model, a.task, val, pad)
            points.append((forwards, acc, vloss, time.time() - t0))
            print(f"{name_of(a)}: forwards {forwards} val {acc} {vloss:.4f} ({time.time() - t0:.0f} s)", flush=True)
    size = sum(len(m) for m in masks) if masks is not None else sum(p.numel() for p in w0)
    result = {"name": name_of(a), "task": a.task, "rule": a.rule, "density": a.density if masks is not None else 1.0,
              "masked": size, "estimator": a.estimator, "lr": a.lr, "eps": a.eps, "seed": a.seed,
              "directions": a.directions, "val": len(val), "points": points}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    return result


# ----------------------------------------------------------------------------------------------------------- grid
def lr_grid(task, estimator, density):
    """Three lrs a decade apart around the dense lr scaled for the mask: a normalised step (FZOO) moves sqrt(|M|)
    coordinates' worth, so its lr scales by 1 / sqrt(density); a two-point step's g shrinks with the mask too, 1 /
    density (the issue's probe: a random 1% mask at 100x the dense lr)."""
    base = LR_DENSE[(task, estimator)] / (math.sqrt(density) if estimator == "fzoo" else density)
    return [float(f"{base * f:.3g}") for f in (1 / 3, 1, 3)]


def grid(a):
    """For each (rule, density) of --plan: the lr grid at seed 1 (one more lr beyond its edge when the best is at an
    edge), then the best lr (the last evaluation's validation accuracy, or loss) at seed 2. Resumable: a finished
    curve is read from its file."""
    loaded = {}
    for item in a.plan.split(","):
        rule, d = item.split(":")[0], float(item.split(":")[1])
        results = []
        for lr in lr_grid(a.task, a.estimator, d):
            results.append(one(a, loaded, rule, d, lr, 1))
        ranked = sorted(results, key=lambda r: r["lr"])
        best = max(ranked, key=score)
        if best is ranked[0] or best is ranked[-1]:  # at an edge: one step of 3x further out
            edge = best["lr"] / 3 if best is ranked[0] else best["lr"] * 3
            results.append(one(a, loaded, rule, d, float(f"{edge:.3g}"), 1))
            best = max(results, key=score)
        one(a, loaded, rule, d, best["lr"], 2)


def one(a, loaded, rule, density, lr, seed):
    b = argparse.Namespace(**{**vars(a), "rule": rule, "density": density, "lr": lr, "seed": seed})
    if seed not in loaded:
        loaded[seed] = (load(a.task, seed, a.val, a.mask_examples, a.max_length), {})
    data, cache = loaded[seed]
    return curve(b, data, cache)


def score(r):
    """The last evaluation: validation accuracy (SST-2), else minus the validation loss."""
    last = r["points"][-1]
    return last[1] if last[1] is not None else -last[2]


# ----------------------------------------------------------------------------------------------------------- report
def report(a):
    out = Path(a.out)
    for share_file in sorted(out.glob("share_*.json")):
        s = json.loads(share_file.read_text())
        print(f"\n{s['task']}: share of ||grad||^2 at w0 on {s['val']} validation examples (sensitivity from "
              f"{s['mask_examples']} other examples)\n\n| rule | density | share of the weights | share of ||grad||^2 | "
              "ratio |\n|---|---:|---:|---:|---:|")
        for r in s["rows"]:
            print(f"| {r['rule']} | {r['density']:g} | {r['weights_share']:.3%} | {r['grad_share']:.3%} | "
                  f"{r['gain']:.2f}x |")
    curves = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith("share_")]
    for task in sorted({c["task"] for c in curves}):
        for est in sorted({c["estimator"] for c in curves if c["task"] == task}):
            cs = [c for c in curves if c["task"] == task and c["estimator"] == est]
            dense = [c for c in cs if c["rule"] == "dense"]
            best_dense = max(dense, key=score) if dense else None
            target = score(best_dense) if best_dense else None
            print(f"\n{task}, {est}: validation {'accuracy' if task == 'sst2' else 'loss'} after each run's forwards; "
                  f"'to dense' = the forwards a run took to reach the best dense run's final value "
                  f"({target if task == 'sst2' else -target:.4f})\n\n| rule | density | lr | seed | start | final | "
                  "best | forwards | to dense |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            for c in sorted(cs, key=lambda c: (RULES.index(c["rule"]), c["density"], c["seed"], c["lr"])):
                pts = c["points"]
                vals = [p[1] if p[1] is not None else -p[2] for p in pts]
                reach = next((p[0] for p, v in zip(pts, vals) if target is not None and v >= target - 1e-12), None)
                fmt = (lambda v: f"{v:.4f}") if task == "sst2" else (lambda v: f"{-v:.4f}")
                print(f"| {c['rule']} | {c['density']:g} | {c['lr']:g} | {c['seed']} | {fmt(vals[0])} | "
                      f"{fmt(vals[-1])} | {fmt(max(vals))} | {pts[-1][0]} | {reach if reach is not None else '-'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("share", "curve", "grid", "report"))
    ap.add_argument("--task", choices=("sst2", "dolly"), default="sst2")
    ap.add_argument("--rule", choices=RULES, default="dense")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--estimator", choices=("two_point", "fzoo"), default="fzoo")
    ap.add_argument("--plan", default="dense:1,sensitivity:0.001,sensitivity:0.01,sensitivity:0.1,magnitude:0.01,"
                    "random:0.01", help="grid: the (rule:density) points, in order")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--val", type=int, default=500, help="validation examples")
    ap.add_argument("--mask_examples", type=int, default=64, help="the server's examples for the sensitivity rule")
    ap.add_argument("--forwards", type=int, default=1000)
    ap.add_argument("--eval_every", type=int, default=250, help="forwards between evaluations")
    ap.add_argument("--max_length", type=int, default=None, help="default: 128 sst2, 256 dolly")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="runs/mask")
    a = ap.parse_args()
    a.max_length = a.max_length or (128 if a.task == "sst2" else 256)
    if a.threads:
        torch.set_num_threads(a.threads)
    {"share": share, "curve": curve, "grid": grid, "report": report}[a.what](a)


if __name__ == "__main__":
    main()
