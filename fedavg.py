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
global trainable weights. torchrun is not supported: under it the script stops with one line. On Flower
(tasks/flower.py, `python -m tasks.federation fedavg ...`) each client lives on a SuperNode and runs the same
`client_round`; a FedAvg client keeps nothing between rounds, so a client that drops out simply misses the round.

The script reads top to bottom: config, model, client (`client_update`), server (`server_aggregate`,
`sync_model`), checkpoints, `setup`, `log_round`, the round loop (`train`), `main`. Progress bars, the run's
files and the one-line errors are tasks/run.py's.
"""
import argparse
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import tasks
from tasks import ConfigError, sample_clients, sampled_per_round

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
              "dtype", "val_samples")


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
    a("--val_samples", type=int, default=0, help="validation examples carved from the training data before it is "
      "split over clients (seeded: the same examples in every script), evaluated beside the test set as val_loss, "
      "val_<metric>; choose knobs on these, not on the test set. 0 = none")
    a("--max_new_tokens", type=int, default=128, help="sft: tokens generated for Rouge-L (greedy); 0 = no Rouge-L")
    a("--seed", type=int, default=42, help="all randomness derives from (seed, round, client)")
    a("--output_dir", default="out/fedavg", help="config.json, metrics.jsonl, ledger.jsonl, checkpoint, loss.png, "
      "model/")
    a("--resume", action="store_true", help="continue from the checkpoint in --output_dir (same flags; --rounds "
      "may grow)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="weight dtype")
    args = p.parse_args(argv)
    if args.lr is None and args.method == "lora":  # before the task defaults, which hold full fine-tuning's lr
        args.lr = LORA_LR[args.task]
    tasks.fill_task_defaults(args, TASK_DEFAULTS, DATASETS)
    args.grad_accum, args.local_epochs = 1, None  # what tasks.local_batches reads: plain steps here
    check_config(args)
    return args


def check_config(args):
    """Impossible flag values -> ConfigError (one line)."""
    tasks.check_at_least(args, ("rounds", "num_clients", "local_steps", "batch_size", "max_length", "eval_every",
                                "lora_r"), 1)
    tasks.check_at_least(args, ("eval_samples", "max_new_tokens", "val_samples"), 0)
    tasks.check_finite(args, ("lr", "lora_alpha"), 0)
    tasks.check_finite(args, ("weight_decay",), 0, strict=False, note=" (0 = none)")
    tasks.check_sampling(args.m, args.num_clients, args.data_path)


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
# checkpoints: the global trainable weights and the round, replaced atomically
# ----------------------------------------------------------------------------------------------------
def save_checkpoint(path, global_w, round_, config):
    from safetensors.torch import save_file

    tasks.save_atomic(path, lambda tmp: save_file({n: t.contiguous() for n, t in global_w.items()}, str(tmp),
                                                  metadata={"round": str(round_), "config": json.dumps(config)}))


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


# ----------------------------------------------------------------------------------------------------
# the run: set up, the round's end, the round loop
# ----------------------------------------------------------------------------------------------------
def pick_device(args):
    return ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device


def load_parts(run):
    """What every party loads, the server and each client's process alike: the model, the names it trains, the data."""
    run.model, run.tokenizer, run.names = build_model(run.args, run.device)
    run.clients, run.val, run.test = tasks.load_task_data(run.args, run.tokenizer, run.args.num_clients)


def client_node(args):
    """A Flower node's view of the run (tasks/flower.py): the model and its clients' data; no server."""
    run = SimpleNamespace(args=args, device=pick_device(args), progress=tasks.Progress())
    load_parts(run)
    return run


def client_state(run, c):
    """Flower: a FedAvg client keeps nothing between rounds (it starts every round from its download)."""
    return {}


def set_client_state(run, c, state):
    pass


def setup(args, transport=None):
    """Everything the rounds need, in one namespace: model and the names it trains, the server's global weights,
    data, the transport (one process, or Flower's), the run's files and the progress display."""
    if transport is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fedavg.py runs in one process; torchrun is not supported (run it without torchrun)")
    run = SimpleNamespace(args=args, out=Path(args.output_dir), config=dict(vars(args)))
    run.transport = transport or tasks.Transport(pick_device(args))
    run.device = run.transport.device
    run.ckpt_path = run.out / "checkpoint.safetensors"
    if run.ckpt_path.exists() and not args.resume:
        raise ConfigError(f"{run.out} already holds a run: pass --resume to continue it or pick another --output_dir")
    load_parts(run)
    run.transport.join(0)
    params = dict(run.model.named_parameters())
    run.global_w = {n: params[n].detach().clone() for n in run.names}  # the server's copy of what is averaged
    run.start = load_checkpoint(run.ckpt_path, run.global_w, run.config) if args.resume else 0
    N = args.num_clients
    run.n_sampled = sampled_per_round(N, args.m)
    run.method = "FedIT (LoRA)" if args.method == "lora" else ("centralized fine-tuning" if N == 1 else "FedAvg (full)")
    trainable = sum(params[n].numel() for n in run.names)
    print(f"{run.method}: {args.model}, {trainable / 1e6:.2f}M of {sum(p.numel() for p in params.values()) / 1e6:.1f}M "
          f"parameters trained and sent; {N} clients, {run.n_sampled} per round, {args.local_steps} {args.optimizer} "
          f"steps each, lr {args.lr:g}" + run.transport.describe(), flush=True)
    run.files = tasks.RunFiles(run.out)
    run.files.start({**run.config, "trainable_params": trainable}, resumed_round=run.start if args.resume else None)
    run.progress = tasks.Progress(turns=(args.rounds * run.n_sampled, run.start * run.n_sampled))
    if run.start == 0:
        t0, per_example = time.time(), {}
        run.files.metric({"round": 0, "train_loss": None,
                          **tasks.evaluate(args, run.model, run.tokenizer, run.test, run.device, run.val, run.progress,
                                           per_example),
                          "upload_bytes": None, "download_bytes": None, "seconds": round(time.time() - t0, 2),
                          "peak_memory_bytes": None})
        run.files.heldout_examples(0, per_example)
        run.progress.log("round 0 " + " ".join(f"{k} {v:.4f}" for k, v in run.files.metrics[-1].items()
                                               if isinstance(v, float) and k != "seconds"))
    else:
        sync_model(run.model, run.global_w)
        run.progress.log(f"resumed from {run.ckpt_path} after round {run.start}")
    return run


def log_round(run, rnd, t0, turns):
    """End of round: evaluate the global model (in `model`), write the round's ledger lines, checkpoint and metrics
    row (a crash between them redoes the round), print its line."""
    args = run.args
    taken = [t for t in turns if "dropped" not in t]
    row = {"round": rnd, "train_loss": float(np.mean([t["loss"] for t in taken])) if taken else None}
    if rnd % args.eval_every == 0 or rnd == args.rounds:
        per_example = {}
        row.update(tasks.evaluate(args, run.model, run.tokenizer, run.test, run.device, run.val, run.progress,
                                  per_example))
        run.files.heldout_examples(rnd, per_example)
    row.update(upload_bytes=float(np.mean([t["up"] for t in taken])) if taken else None,
               download_bytes=float(np.mean([t["down"] for t in turns])),
               upload_bytes_total=sum(t["up"] for t in turns), download_bytes_total=sum(t["down"] for t in turns),
               seconds=round(time.time() - t0, 2),
               peak_memory_bytes=max((t["peak_memory_bytes"] for t in taken), default=None),
               # the clients' work, summed; popped from the turns, so the ledger lines stay what they were
               client_seconds=round(sum(t.pop("client_seconds", 0.0) for t in turns), 2),
               dropped=[t["client"] for t in turns if "dropped" in t])
    run.files.ledger(turns)
    save_checkpoint(run.ckpt_path, run.global_w, rnd, run.config)
    run.files.metric(row)
    run.progress.log(f"round {rnd} " + " ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                if isinstance(v, float) and k not in ("seconds", "upload_bytes",
                                                                                      "download_bytes"))
                     + f" up {tasks.fmt_bytes(row['upload_bytes'] or 0)} down {tasks.fmt_bytes(row['download_bytes'])}"
                     f" per client, {row['seconds']:.0f}s")


def client_round(run, rnd, c, download):
    """Client c's round, wherever it lives (this process, its Flower node): start from the global weights (the
    download), take --local_steps steps on its own data -> (upload: the weights it trained, stats). Every transport
    calls this one function."""
    seed = derive_seed(run.args.seed, rnd, c)
    t = time.time()
    sync_model(run.model, tasks.unpack(download))
    batches = tasks.local_batches(run.args, run.clients[c], run.tokenizer, run.device, seed)
    upload, stats = client_update(run.model, run.names, batches, run.args, seed)
    wire_up = tasks.pack(upload)
    run.progress.log(f"round {rnd} client {c}: loss {stats['loss']:.4f} up {tasks.fmt_bytes(len(wire_up))} "
                     f"down {tasks.fmt_bytes(len(download))} mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}")
    return wire_up, {**stats, "client_seconds": time.time() - t}  # its sync, batches and local steps


CLIENT_STATS = ("loss", "peak_memory_bytes", "client_seconds")  # what travels with an upload, for the metrics


def check_upload(run, wire_up):
    """-> (why an upload cannot be averaged, or None; the unpacked upload). It must hold exactly the trained
    tensors, of the global weights' shapes and dtypes, all finite (`tasks.check_tensors`): a malformed or hostile
    upload is left out of the average."""
    return tasks.check_tensors(wire_up, run.names, run.global_w)


def train(args, transport=None):
    """The rounds (FedAvg): each sampled client starts from the global weights, trains, uploads what it trained;
    the server averages the uploads, weighted by data size. transport: Flower's (tasks/flower.py); by default one
    process."""
    run = setup(args, transport)
    model, progress, transport = run.model, run.progress, run.transport
    try:
        for rnd in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            sampled = sample_clients(args.seed, rnd, args.num_clients, run.n_sampled)
            wire_down = tasks.pack(run.global_w)  # 1. the same download for every client of the round
            tags = {c: ("", "") for c in sampled}  # a FedAvg client keeps no state between rounds
            # 2. each client, where it lives (`client_round`): start from the global weights, train, upload
            replies = transport.exchange(client_round, run, rnd, {c: wire_down for c in sampled}, sampled,
                                         (None, None), CLIENT_STATS, tags)
            uploads, sizes, turns = [], [], []
            for c in sampled:  # 3. server: keep the well-formed uploads of the clients that answered
                progress.advance("turns")
                why, upload = (transport.dropped.get(c, "no reply"), None) if c not in replies else check_upload(
                    run, replies[c][0])
                if why is not None:
                    turns.append({"round": rnd, "client": c, "dropped": why, "up": 0, "down": len(wire_down)})
                    progress.log(f"round {rnd} client {c}: left out of the round: {why}")
                    continue
                stats = replies[c][1]
                uploads.append(upload)
                sizes.append(len(run.clients[c]))
                turns.append({"round": rnd, "client": c, "loss": stats["loss"], "up": len(replies[c][0]),
                              "down": len(wire_down), "peak_memory_bytes": int(stats["peak_memory_bytes"]),
                              "client_seconds": round(stats["client_seconds"], 3)})
            # 4. server: the data-size-weighted average (unchanged if nobody answered); evaluate it, write the round
            if uploads:
                run.global_w = server_aggregate(uploads, sizes)
            sync_model(model, run.global_w)
            log_round(run, rnd, t0, turns)
    finally:
        progress.close()
    if run.files.plot(run.method):
        print(f"wrote {run.out / 'loss.png'}")
    # the tuned model in Hugging Face format; FedIT's adapters are merged into the base weights first
    export = model.merge_and_unload() if args.method == "lora" else model
    print(f"wrote {tasks.export_model(export, run.tokenizer, run.out / 'model')} (save_pretrained: config, weights, "
          f"tokenizer{', LoRA merged' if args.method == 'lora' else ''})")
    if line := run.files.change_line():
        print(line)
    return run.files.metrics


def main(argv=None):
    return tasks.run_cli("fedavg", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
