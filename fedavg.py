"""FedAvg full-parameter fine-tuning and FedIT (FedAvg + LoRA): the baselines FedKSeed and FedCyBGD are compared to.

    python fedavg.py --task sft --dataset dolly                      # FedAvg, every weight trained and sent
    python fedavg.py --task sft --dataset dolly --method lora        # FedIT: LoRA adapters only
    python fedavg.py --task glue --dataset mrpc --num_clients 1 -m 1  # centralized fine-tuning (one client, all data)

FedAvg (McMahan et al., 2017). Each round the server samples int(N*m) of the N clients. Every sampled client
starts from the global weights (its download), takes --local_steps optimizer steps (AdamW, or SGD) on its own
data, and uploads the weights it trained. The server replaces the global weights by the average of the
uploads, weighted by the clients' data sizes n_i / sum_j n_j. Each client's optimizer state lives for one
round. With --num_clients 1 -m 1 there is one client holding all the training data, and the "federated" run
is plain centralized fine-tuning: the upper-bound row of a results table.

    --method full  every weight is trained, uploaded and downloaded: the whole model crosses twice per round
    --method lora  FedIT (Zhang et al., "Towards Building the Federated GPT", 2023): the pretrained weights
                   are frozen and every client holds them; LoRA adapters (`peft`, --lora_r, --lora_alpha,
                   --lora_targets) are trained and averaged, and only they cross the network (for --task glue
                   the new classification head trains and travels with them)

What crosses is serialised with safetensors and its length goes into a ledger, per client, round and direction,
next to the memory the client's step needed (counted as fedcybgd.py counts it: every weight the client holds,
the gradients and optimizer state of what it trains, and the activations autograd saved). FedKSeed's upload is
4 + 6 x steps bytes and FedCyBGD's one block; this script gives the other side of both comparisons.

In one process the clients take turns on ONE model (no per-client copies); the server keeps one copy of the
global trainable weights. torchrun is not supported: under it the script stops with one line.

The script reads top to bottom: config, model, wire, client (`client_update`), server (`server_aggregate`,
`sync_model`), outputs, the round loop (`train`), `main`.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tasks

# ----------------------------------------------------------------------------------------------------
# config: per-task defaults run out of the box on a CPU; None = the task's default
# ----------------------------------------------------------------------------------------------------
TASK_DEFAULTS = {
    "sft": dict(dataset="dolly", model="smollm2-135m", lr=1e-4, batch_size=2, max_length=256, eval_samples=50),
    "glue": dict(dataset="mrpc", model="minilm-l6", lr=2e-4, batch_size=16, max_length=128, eval_samples=0),
}
LORA_LR = {"sft": 3e-4, "glue": 5e-4}  # LoRA wants a larger step than full fine-tuning
DATASETS = {"sft": tasks.DATASETS, "glue": tasks.glue.TASKS}
# flags that change the weights a run produces: a checkpoint resumes only under the same values
TRAJECTORY = ("task", "dataset", "data_path", "model", "method", "num_clients", "m", "local_steps", "optimizer", "lr",
              "weight_decay", "batch_size", "max_length", "iid", "lora_r", "lora_alpha", "lora_targets", "seed",
              "dtype")


class ConfigError(Exception):
    """A user-caused problem with a flag, the model or a checkpoint: printed as one line, exit code 2."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="FedAvg (full parameters) and FedIT (LoRA) baselines.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", choices=("sft", "glue"), default="sft",
      help="sft: instruction tuning of a causal LM; glue: sentence(-pair) classification")
    a("--dataset", default=None, help="sft: dolly|instruct|alpaca_gpt4_en; glue: mrpc|rte|sst2|cola|qqp|stsb|mnli|"
      "qnli (default: dolly / mrpc)")
    a("--data_path", default=None, help="local file or folder of the dataset (default: data/ next to the script, "
      "then the Hugging Face hub)")
    a("--model", default=None, help="smollm2-135m, minilm-l6, or any Hugging Face id/folder "
      "(default: smollm2-135m for sft, minilm-l6 for glue)")
    a("--method", choices=("full", "lora"), default="full", help="full: FedAvg over every weight; lora: FedIT")
    a("--rounds", type=int, default=2, help="communication rounds")
    a("--num_clients", type=int, default=10, help="clients the training data is split over (N); 1 = centralized")
    a("-m", type=float, default=0.4, help="fraction of clients sampled per round, in (0, 1]: int(N*m) clients")
    a("--local_steps", type=int, default=8, help="optimizer steps per client per round")
    a("--optimizer", choices=("adamw", "sgd"), default="adamw", help="the clients' optimizer (fresh every round)")
    a("--lr", type=float, default=None, help="learning rate (default: 1e-4 sft / 2e-4 glue for full, "
      "3e-4 / 5e-4 for lora)")
    a("--weight_decay", type=float, default=0.0, help="weight decay, on tensors with ndim >= 2 only; 0 = none")
    a("--batch_size", type=int, default=None, help="examples per step (default: 2 sft, 16 glue)")
    a("--max_length", type=int, default=None, help="tokens per example (default: 256 sft, 128 glue)")
    a("--iid", default="dir0.5", help="client partition: 'iid' or 'dirALPHA' (label-Dirichlet)")
    a("--lora_r", type=int, default=8, help="LoRA rank")
    a("--lora_alpha", type=float, default=16.0, help="LoRA scaling alpha (the update is alpha/r * B A)")
    a("--lora_targets", default=None, help="comma-separated module names to adapt (default: peft's choice for "
      "the architecture, e.g. q_proj,v_proj for Llama, query,value for BERT)")
    a("--eval_every", type=int, default=1, help="evaluate every this many rounds (and at round 0 and the end)")
    a("--eval_samples", type=int, default=None, help="held-out examples evaluated; 0 = all (default: 50 sft, "
      "all glue)")
    a("--max_new_tokens", type=int, default=128, help="sft: tokens generated for Rouge-L (greedy); 0 = no Rouge-L")
    a("--seed", type=int, default=42, help="all randomness derives from (seed, round, client)")
    a("--output_dir", default="out/fedavg", help="config.json, metrics.jsonl, ledger.jsonl, checkpoint, loss.png, "
      "model/")
    a("--resume", action="store_true", help="continue from the checkpoint in --output_dir (same flags; --rounds "
      "may grow)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weight dtype")
    args = p.parse_args(argv)
    for k, v in TASK_DEFAULTS[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.lr is None:
        args.lr = LORA_LR[args.task] if args.method == "lora" else TASK_DEFAULTS[args.task]["lr"]
    args.grad_accum, args.local_epochs = 1, None  # what tasks.local_batches reads: plain steps here
    check_config(args)
    return args


def check_config(args):
    """Impossible flag values -> ConfigError (one line)."""
    if args.dataset not in DATASETS[args.task]:
        raise ConfigError(f"--dataset {args.dataset} is not a {args.task} dataset: choose one of "
                          f"{', '.join(DATASETS[args.task])}")
    for name in ("rounds", "num_clients", "local_steps", "batch_size", "max_length", "eval_every", "lora_r"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be at least 1")
    for name in ("eval_samples", "max_new_tokens"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be >= 0")
    for name in ("lr", "lora_alpha"):  # nan fails every comparison, inf passes "> 0": test finiteness too
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            raise ConfigError(f"--{name} {getattr(args, name)}: must be a finite number > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ConfigError(f"--weight_decay {args.weight_decay}: must be a finite number >= 0 (0 = none)")
    if not 0.0 < args.m <= 1.0:
        raise ConfigError(f"-m {args.m}: the client sampling ratio must be in (0, 1]")
    if sampled_per_round(args.num_clients, args.m) < 1:
        raise ConfigError(f"-m {args.m} x --num_clients {args.num_clients} samples no client per round: "
                          f"use -m >= {1 / args.num_clients:g}")
    if args.data_path and not Path(args.data_path).exists():
        raise ConfigError(f"--data_path {args.data_path} not found")


def sampled_per_round(num_clients, m):
    return int(num_clients * m + 1e-9)  # int(N*m), without 200*0.29 -> 57.99 -> 57


def sample_clients(seed, rnd, num_clients, n_sampled):
    return sorted(np.random.default_rng([seed, 1, rnd]).choice(num_clients, n_sampled, replace=False).tolist())


def derive_seed(*parts):
    """A 63-bit seed from (seed, round, client): resume needs nothing but these numbers."""
    return int(np.random.default_rng(list(parts)).integers(0, 2**63 - 1))


# ----------------------------------------------------------------------------------------------------
# model: the task's Hugging Face model; FedIT wraps it with LoRA adapters
# ----------------------------------------------------------------------------------------------------
def build_model(args, device):
    """-> (model, tokenizer, names of the trainable tensors: what clients train and what crosses the wire)."""
    num_labels = tasks.glue.NUM_LABELS.get(args.dataset, 2)
    torch.manual_seed(args.seed)  # a randomly initialised head (and LoRA's A matrices) is the same on every run
    model, tokenizer = tasks.load_model(args.model, args.task, num_labels, args.dtype, device)
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = args.lora_targets.split(",") if args.lora_targets else None
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                            task_type=TaskType.CAUSAL_LM if args.task == "sft" else TaskType.SEQ_CLS)
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules not in the model, or an architecture peft has no default for
            raise ConfigError(f"--method lora: {str(e).splitlines()[0]} (set --lora_targets)") from None
        names = [n for n, p in model.named_parameters() if p.requires_grad]  # adapters (+ a new task head)
    else:
        names = [n for n, _ in model.named_parameters()]
    model.requires_grad_(False).eval()  # only the client's step turns gradients on, for `names`
    return model, tokenizer, names


# ----------------------------------------------------------------------------------------------------
# client: fresh optimizer, --local_steps steps from the global weights, upload what it trained
# ----------------------------------------------------------------------------------------------------
def client_update(model, train_names, batches, args, seed):
    """One client's local round on `batches` (its micro-batches, one per step) -> (upload: name -> tensor of the
    trained weights, stats: mean train loss and peak memory bytes). The model holds the global weights on entry."""
    torch.manual_seed(seed)  # dropout, if the model has any, is a function of (seed, round, client)
    params = dict(model.named_parameters())
    trained = [(n, params[n]) for n in train_names]
    for _, p in trained:
        p.requires_grad_(True)
    groups = tasks.param_groups(trained, args.weight_decay)
    opt = (torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8) if args.optimizer == "adamw"
           else torch.optim.SGD(groups, lr=args.lr))
    model.train()
    losses, peak_activations, grad_bytes = [], 0, 0
    for batch in batches:
        with tasks.SavedActivations(model) as saved:
            loss = model(**batch).loss
        peak_activations = max(peak_activations, saved.bytes)
        loss.backward()
        losses.append(loss.item())
        grad_bytes = tasks.tensor_bytes(p.grad for _, p in trained)
        opt.step()
        opt.zero_grad(set_to_none=True)
    # memory as fedcybgd.py counts it: every weight held, the trained tensors' gradients, optimizer state,
    # and the activations autograd saved (max over steps)
    state_bytes = tasks.tensor_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    peak = tasks.tensor_bytes(model.parameters()) + grad_bytes + state_bytes + peak_activations
    for _, p in trained:
        p.requires_grad_(False)
    del opt
    model.eval()
    return {n: p.detach().clone() for n, p in trained}, {"loss": sum(losses) / len(losses), "peak_memory_bytes": peak}


# ----------------------------------------------------------------------------------------------------
# server: the data-size-weighted average of the uploads; clients start the round from it
# ----------------------------------------------------------------------------------------------------
def server_aggregate(uploads, sizes):
    """[(name -> tensor)] of the round's clients, their data sizes -> the new global weights: for every name,
    sum_i (n_i / sum_j n_j) * w_i, summed in float64 in client order and rounded once to the weights' dtype."""
    total = float(sum(sizes))
    out = {}
    for name, first in uploads[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for up, n in zip(uploads, sizes):
            acc += (n / total) * up[name].double()
        out[name] = acc.to(first.dtype)
    return out


def sync_model(model, message):
    """Client side of the download: write the global weights it received into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in message.items():
            params[n].copy_(t)


# ----------------------------------------------------------------------------------------------------
# outputs: an atomic checkpoint (global trainable weights + round), metrics, plot
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path, global_w, round_, config):
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({n: t.contiguous() for n, t in global_w.items()}, str(tmp),
              metadata={"round": str(round_), "config": json.dumps(config)})
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path, global_w, config):
    """Restore the global weights -> the checkpoint's round. Missing, truncated, foreign, or written with other
    trajectory flags -> ConfigError."""
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            saved, round_ = json.loads(meta["config"]), int(meta["round"])
            weights = {n: f.get_tensor(n) for n in global_w}
    except Exception as e:  # noqa: BLE001  safetensors and json raise many types
        raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}): it is truncated or not a fedavg "
                          "checkpoint") from None
    for key in TRAJECTORY:
        if saved.get(key) != config[key]:
            raise ConfigError(f"--resume: {path} was written with {key}={saved.get(key)!r}, this run has "
                              f"{key}={config[key]!r}; use the same flags or another --output_dir")
    if any(weights[n].shape != t.shape for n, t in global_w.items()):
        raise ConfigError(f"--resume: the weights in {path} do not fit {config['model']}")
    for n, t in global_w.items():
        t.copy_(weights[n])
    return round_


def plot_losses(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, style in (("train_loss", "train loss (sampled clients)", "o-"),
                              ("eval_loss", "held-out loss (global model)", "s-")):
        points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=11)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------
# the round loop
# ----------------------------------------------------------------------------------------------------
def train(args):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fedavg.py runs in one process; torchrun is not supported (run it without torchrun)")
    out = Path(args.output_dir)
    config = dict(vars(args))
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt_path = out / "checkpoint.safetensors"
    if ckpt_path.exists() and not args.resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or pick another --output_dir")
    model, tokenizer, names = build_model(args, device)
    params = dict(model.named_parameters())
    global_w = {n: params[n].detach().clone() for n in names}  # the server's copy of what is averaged
    start = load_checkpoint(ckpt_path, global_w, config) if args.resume else 0

    N = args.num_clients
    n_sampled = sampled_per_round(N, args.m)
    clients, test = tasks.load_task_data(args, tokenizer, N)
    method = "FedIT (LoRA)" if args.method == "lora" else ("centralized fine-tuning" if N == 1 else "FedAvg (full)")
    trainable = sum(params[n].numel() for n in names)
    print(f"{method}: {args.model}, {trainable / 1e6:.2f}M of {sum(p.numel() for p in params.values()) / 1e6:.1f}M "
          f"parameters trained and sent; {N} clients, {n_sampled} per round, {args.local_steps} {args.optimizer} "
          f"steps each, lr {args.lr:g}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    tasks.write_atomic(out / "config.json", json.dumps({**config, "trainable_params": trainable}, indent=2))
    metrics_path, ledger_path = out / "metrics.jsonl", out / "ledger.jsonl"
    metrics = [m for m in tasks.read_jsonl(metrics_path) if m["round"] <= start] if args.resume else []
    ledger = [e for e in tasks.read_jsonl(ledger_path) if e["round"] <= start] if args.resume else []
    tasks.write_atomic(metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))  # drop rounds after the checkpoint
    tasks.write_atomic(ledger_path, "".join(json.dumps(e) + "\n" for e in ledger))

    def log_row(row):
        metrics.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    if start == 0:
        t0 = time.time()
        log_row({"round": 0, "train_loss": None, **tasks.evaluate(args, model, tokenizer, test, device),
                 "upload_bytes": None, "download_bytes": None, "seconds": round(time.time() - t0, 2),
                 "peak_memory_bytes": None})
        print("round 0 " + " ".join(f"{k} {v:.4f}" for k, v in metrics[-1].items()
                                    if isinstance(v, float) and k != "seconds"), flush=True)
    else:
        sync_model(model, global_w)
        print(f"resumed from {ckpt_path} after round {start}")

    progress = tasks.Progress((args.rounds - start) * n_sampled, 0)
    try:
        for rnd in range(start + 1, args.rounds + 1):
            t0 = time.time()
            sampled = sample_clients(args.seed, rnd, N, n_sampled)
            wire_down = tasks.pack(global_w)  # the same download for every client of the round
            uploads, sizes, turns = [], [], []
            for c in sampled:
                seed = derive_seed(args.seed, rnd, c)
                sync_model(model, tasks.unpack(wire_down))  # the client starts from the global weights
                batches = tasks.local_batches(args, clients[c], tokenizer, device, seed)
                upload, stats = client_update(model, names, batches, args, seed)
                wire_up = tasks.pack(upload)
                uploads.append(tasks.unpack(wire_up))
                sizes.append(len(clients[c]))
                turns.append({"round": rnd, "client": c, "loss": stats["loss"], "up": len(wire_up),
                              "down": len(wire_down), "peak_memory_bytes": stats["peak_memory_bytes"]})
                progress.turn(f"round {rnd} client {c}: loss {stats['loss']:.4f} up {tasks.fmt_bytes(len(wire_up))} "
                              f"down {tasks.fmt_bytes(len(wire_down))} mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}")
            global_w = server_aggregate(uploads, sizes)
            sync_model(model, global_w)  # evaluate (and export) the global model
            row = {"round": rnd, "train_loss": float(np.mean([t["loss"] for t in turns]))}
            if rnd % args.eval_every == 0 or rnd == args.rounds:
                row.update(tasks.evaluate(args, model, tokenizer, test, device))
            row.update(upload_bytes=float(np.mean([t["up"] for t in turns])),
                       download_bytes=float(np.mean([t["down"] for t in turns])),
                       upload_bytes_total=sum(t["up"] for t in turns), download_bytes_total=sum(t["down"] for t in turns),
                       seconds=round(time.time() - t0, 2),
                       peak_memory_bytes=max(t["peak_memory_bytes"] for t in turns))
            with open(ledger_path, "a") as f:
                f.writelines(json.dumps(t) + "\n" for t in turns)
            save_checkpoint(ckpt_path, global_w, rnd, config)
            log_row(row)
            progress.log(f"round {rnd} " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                    if isinstance(v, float) and k not in ("seconds", "upload_bytes",
                                                                                          "download_bytes"))
                         + f" up {tasks.fmt_bytes(row['upload_bytes'])} down {tasks.fmt_bytes(row['download_bytes'])}"
                         f" per client, {row['seconds']:.0f}s")
    finally:
        progress.close()
    if plot_losses(metrics, out / "loss.png", method):
        print(f"wrote {out / 'loss.png'}")
    # the tuned model in Hugging Face format; FedIT's adapters are merged into the base weights first
    export = model.merge_and_unload() if args.method == "lora" else model
    print(f"wrote {tasks.export_model(export, tokenizer, out / 'model')} (save_pretrained: config, weights, "
          f"tokenizer{', LoRA merged' if args.method == 'lora' else ''})")
    return metrics


def main(argv=None):
    try:
        return train(parse_args(argv))
    except (ConfigError, tasks.DataError, tasks.ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
