"""FedAvg full-parameter fine-tuning and FedIT (FedAvg + LoRA): the baselines FedKSeed and FedCyBGD are compared to.

    python fedavg.py --task sft --dataset dolly                       # FedAvg, every weight trained and sent
    python fedavg.py --task sft --dataset dolly --method lora         # FedIT: LoRA adapters only
    python fedavg.py --task glue --dataset mrpc --num_clients 1 -m 1  # centralized fine-tuning (one client, all data)
    python fedavg.py --task prompt --dataset sst2 --method lora       # FedIT on prompt-based SST-2 (as fedkseed.py)
    python fedavg.py --help                                           # every flag, with its default

The method (McMahan et al., 2017). Each round the server samples int(N*m) of the N clients. Every sampled client
starts from the global weights (its download, `sync_model`), takes --local_steps optimizer steps on its own data
with a fresh optimizer (`client_update`) and uploads the weights it trained (`client_round`). The server checks each
upload (`check_upload`) and replaces the global weights by the average of the uploads, weighted by the clients' data
sizes n_i / sum_j n_j (`server_aggregate`). With --num_clients 1 -m 1 one client holds all the training data: the
"federated" run is plain centralized fine-tuning, the upper-bound row of a results table.

What crosses, serialised with safetensors (its length per client, round and direction in ledger.jsonl, beside the
memory the client's step needed, counted as every script counts it: tasks/memory.py):
    --method full  every weight, down and up: the whole model crosses twice per client per round
    --method lora  FedIT (Zhang et al., "Towards Building the Federated GPT", 2023): the pretrained weights are frozen
                   and every client holds them; only the LoRA adapters (peft) cross, and for --task glue the new
                   classification head with them

Options, one line each:
    --optimizer adamw|sgd          the clients' optimizer, fresh every round (its state never crosses)
    --lora_r, --lora_alpha, --lora_targets   the adapters' rank, scale (alpha/r * B A), modules (default: peft's)
    --tensor_bound c, --max_change f   robust aggregation (tasks/robust.py): each tensor's change within c x the recent
                                   lower median; an upload that moves the weights by more than f of their norm refused

Where the clients live. In one process they take turns on ONE model (no per-client copies); the server keeps one copy
of the global trainable weights. torchrun is not supported (one line says so). On Flower (docs/flower.md) each client
lives on a SuperNode and runs the same `client_round`; it keeps nothing between rounds, so a client that drops out, or
sends a malformed upload, simply misses the round.

docs/baselines.md has the outputs, and the measured upload and memory of every method.
"""
import argparse
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import tasks
from tasks import ConfigError

# -------- config: per-task defaults run out of the box on a CPU; None = the task's default
TASK_DEFAULTS = {
    "sft": dict(dataset="dolly", model="smollm2-135m", lr=1e-4, batch_size=2, max_length=256, eval_samples=50,
                val_samples=0),
    "glue": dict(dataset="mrpc", model="minilm-l6", lr=2e-4, batch_size=16, max_length=128, eval_samples=0,
                 val_samples=0),
    "prompt": dict(dataset="sst2", model="smollm2-135m", lr=1e-5, batch_size=8, max_length=128, eval_samples=0,
                   val_samples=200),  # validation examples: the template is chosen on them
}
LORA_LR = {"sft": 3e-4, "glue": 5e-4, "prompt": 3e-4}  # LoRA wants a larger step than full fine-tuning
DATASETS = {"sft": tasks.DATASETS, "glue": tasks.glue.TASKS, "prompt": tasks.prompts.TASKS}
SHARED_FLAGS = ("dataset data_path model rounds num_clients m local_steps batch_size lr weight_decay max_length iid "
                "seed output_dir resume eval_every eval_samples val_samples template max_new_tokens max_change "
                "tensor_bound tensor_window device dtype")


def parse_args(argv=None):
    defaults = "; ".join(f"{task}: " + ", ".join(f"{k} {v}" for k, v in d.items()) for task, d in TASK_DEFAULTS.items())
    p = argparse.ArgumentParser(description="FedAvg (full parameters) and FedIT (LoRA) baselines.",
                                epilog=f"None: the --task's default ({defaults}; lr with --method lora: "
                                f"{LORA_LR['sft']:g} sft, {LORA_LR['glue']:g} glue).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--task", choices=("sft", "glue", "prompt"), default="sft", help="sft: instruction tuning of a causal LM; "
      "glue: sentence(-pair) classification with a classification head; prompt: the same with a causal LM scoring "
      "label words after a template (fedkseed.py --dataset sst2|mrpc)")
    a("--method", choices=("full", "lora"), default="full", help="full: FedAvg over every weight; lora: FedIT")
    tasks.flags.add(p, SHARED_FLAGS, output_dir=dict(default="out/fedavg"), rounds=dict(default=2),
                    dataset=dict(help="; ".join(f"{t}: {'|'.join(d)}" for t, d in DATASETS.items())),
                    num_clients=dict(default=10, help="clients the training data is split over (N); 1 = centralized"),
                    m=dict(default=0.4), local_steps=dict(default=8), weight_decay=dict(default=0.0),
                    iid=dict(default="dir0.5"), val_samples=dict(default=None),
                    max_new_tokens=dict(help="sft: tokens generated for Rouge-L (greedy); 0 = no Rouge-L"))
    a("--optimizer", choices=("adamw", "sgd"), default="adamw", help="the clients' optimizer (fresh every round)")
    a("--lora_r", type=int, default=8, help="LoRA rank")
    a("--lora_alpha", type=float, default=16.0, help="LoRA scaling alpha (the update is alpha/r * B A)")
    a("--lora_targets", default=None, help="comma-separated module names to adapt (default: peft's choice for the "
      "architecture, e.g. q_proj,v_proj for Llama, query,value for BERT)")
    args = p.parse_args(argv)
    if args.lr is None and args.method == "lora":  # before the task defaults, which hold full fine-tuning's lr
        args.lr = LORA_LR[args.task]
    tasks.flags.fill_task_defaults(args, TASK_DEFAULTS, DATASETS)
    tasks.flags.check(args, SHARED_FLAGS)
    tasks.flags.check_at_least(args, {"lora_r": 1})  # fedavg's own flags
    tasks.flags.check_positive(args, ("lora_alpha",))
    args.grad_accum, args.local_epochs = 1, None  # what tasks.local_batches reads: plain steps here
    args.device = tasks.flags.pick_device(args.device)  # config.json records the device the run used
    return args


# -------- model: the task's Hugging Face model; FedIT wraps it with LoRA adapters
def build_model(args, device):
    """-> (model, tokenizer, names of the trainable tensors: what clients train and what crosses the wire)."""
    num_labels = tasks.glue.NUM_LABELS.get(args.dataset, 2)
    torch.manual_seed(args.seed)  # a randomly initialised head (and LoRA's A matrices) is the same on every run
    model, tokenizer = tasks.load_model(args.model, "sft" if args.task == "prompt" else args.task, num_labels,
                                        args.dtype, device)  # prompt: the causal LM itself, no new head
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        targets = args.lora_targets.split(",") if args.lora_targets else None
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=targets,
                            task_type=TaskType.SEQ_CLS if args.task == "glue" else TaskType.CAUSAL_LM)
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # e.g. target modules not in the model, or an architecture peft has no default for
            raise ConfigError(f"--method lora: {str(e).splitlines()[0]} (set --lora_targets)") from None
        names = [n for n, p in model.named_parameters() if p.requires_grad]  # adapters (+ a new task head)
    else:
        names = [n for n, _ in model.named_parameters()]
    model.requires_grad_(False).eval()  # only the client's step turns gradients on, for `names`
    return model, tokenizer, names


# -------- client: start from the global weights, --local_steps steps with a fresh optimizer, upload what it trained
def sync_model(model, message):
    """Client side of the download: write the global weights it received into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in message.items():
            params[n].copy_(t)


def client_update(model, names, batches, args, seed):
    """One client's local round on `batches` (its micro-batches, one per step) -> (upload: name -> the trained
    tensors, {"loss": mean train loss, "peak_memory_bytes"}). The model holds the global weights on entry. The
    optimizer lives for this call only; its memory is counted as every script counts it (tasks/memory.py)."""
    def optimizer(named):  # [(name, tensor)] -> AdamW or SGD; decay on ndim >= 2 only (tasks.param_groups)
        groups = tasks.param_groups(named, args.weight_decay)
        return (torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8) if args.optimizer == "adamw"
                else torch.optim.SGD(groups, lr=args.lr))

    return tasks.train_steps(model, names, batches, optimizer, [args.lr] * len(batches), seed=seed, fp32_masters=False,
                             loss_fn=tasks.prompts.label_word_loss if args.task == "prompt" else None)


def client_round(run, rnd, c, download):
    """Client c's round, wherever it lives (this process, its Flower node): start from the global weights (the
    download), take --local_steps steps on its own data -> (upload: the weights it trained, stats). Every transport
    calls this one function."""
    seed = tasks.derive_seed(run.args.seed, rnd, c)
    t = time.time()
    sync_model(run.model, tasks.unpack(download))
    batches = tasks.local_batches(run.args, run.clients[c], run.tokenizer, run.device, seed)
    upload, stats = client_update(run.model, run.names, batches, run.args, seed)
    wire_up = tasks.pack(upload)
    run.progress.log(f"round {rnd} client {c}: loss {stats['loss']:.4f} up {tasks.fmt_bytes(len(wire_up))} "
                     f"down {tasks.fmt_bytes(len(download))} mem {tasks.fmt_bytes(stats['peak_memory_bytes'])}")
    return wire_up, {**stats, "client_seconds": time.time() - t}  # its sync, batches and local steps


CLIENT_STATS = ("loss", "peak_memory_bytes", "held_bytes", "step_bytes", "client_seconds")  # with an upload


# -------- server: the download, the uploads' check, their average weighted by data size
def server_download(global_w):
    """The message every sampled client gets: the global weights of the trained tensors (safetensors bytes)."""
    return tasks.pack(global_w)


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


def check_upload(run, wire_up):
    """-> (why an upload cannot be averaged, or None; the unpacked upload). It must hold exactly the trained
    tensors, of the global weights' shapes and dtypes, all finite (`tasks.check_tensors`): a malformed or hostile
    upload is left out of the average."""
    return tasks.check_tensors(wire_up, run.names, run.global_w, run.args.max_change)


def check_uploads(run, rnd, sampled, replies, wire_down):
    """Server: the round's replies -> (the uploads it averages, their clients' data sizes, the round's ledger lines).
    A client that did not answer (Flower), or whose upload fails `check_upload`, is left out with one logged line."""
    uploads, sizes, turns = [], [], []
    for c in sampled:
        run.progress.advance("turns")
        line = {"round": rnd, "client": c}
        why, upload = ((run.transport.dropped.get(c, "no reply"), None) if c not in replies
                       else check_upload(run, replies[c][0]))
        if why is not None:
            turns.append({**line, "dropped": why, "upload_bytes": 0, "download_bytes": len(wire_down),
                          "client_seconds": 0.0})
            run.progress.log(f"round {rnd} client {c}: left out of the round: {why}")
            continue
        stats = replies[c][1]
        uploads.append(upload)
        sizes.append(run.transport.data_size(c, len(run.clients[c])))  # Flower's deployment: declared
        turns.append({**line, "loss": stats["loss"], "change": round(tasks.relative_change(upload, run.global_w), 6),
                      "upload_bytes": len(replies[c][0]),
                      "download_bytes": len(wire_down), "peak_memory_bytes": int(stats["peak_memory_bytes"]),
                      "held_bytes": int(stats["held_bytes"]), "step_bytes": int(stats["step_bytes"]),
                      "client_seconds": round(stats["client_seconds"], 3)})
    # robust aggregation (beyond FedAvg, on by default: --tensor_bound, tasks/robust.py): tensor changes <= c x median
    uploads, scaled, run.recent = tasks.bound_uploads(uploads, run.global_w, run.recent, run.args.tensor_bound,
                                                      run.args.tensor_window)
    for line, n in zip([t for t in turns if "dropped" not in t], scaled):
        line["bounded"] = n
    return uploads, sizes, turns


# -------- the round loop
def train(args, transport=None):
    """The rounds (FedAvg): each sampled client starts from the global weights, trains, uploads what it trained;
    the server averages the uploads, weighted by data size. transport: Flower's; by default one process."""
    run = setup(args, transport)
    if run.start == 0:  # round 0: the pretrained model's metrics, and checkpoint 0
        log_round(run, 0, time.time(), [])
    try:
        for rnd in range(run.start + 1, args.rounds + 1):
            t0 = time.time()
            # 1. the server samples the round's clients; each gets the same download, the global weights
            sampled = tasks.sample_clients(args.seed, rnd, args.num_clients, run.n_sampled)
            wire_down = server_download(run.global_w)
            # 2. each client, where it lives, runs client_round: start from the global weights, train, upload. In one
            #    process `exchange` is {c: client_round(run, rnd, c, wire_down) for c in sampled}
            tags = {c: ("", "") for c in sampled}  # a FedAvg client keeps no state between rounds
            replies = run.transport.exchange(client_round, run, rnd, {c: wire_down for c in sampled}, sampled,
                                             (None, tasks.packed_bound(run.global_w)), CLIENT_STATS, tags)
            # 3. the server keeps the well-formed uploads and averages them, weighted by data size (unchanged if
            #    nobody answered); the working model takes the average, is evaluated, and the round is written
            uploads, sizes, turns = check_uploads(run, rnd, sampled, replies, wire_down)
            if uploads:
                run.global_w = server_aggregate(uploads, sizes)
            sync_model(run.model, run.global_w)
            log_round(run, rnd, t0, turns)
    finally:
        run.progress.close()
    finish(run)
    return run.files.metrics


# -------- plumbing (a reader of the method can stop here): set up, what every party loads, the server's round end,
# the export, the Flower hooks, the command
def setup(args, transport=None):
    """Everything the rounds need, in one namespace: model and the names it trains, the server's global weights,
    data, the transport (one process, or Flower's), the run's files and the progress display."""
    if transport is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("fedavg.py runs in one process; torchrun is not supported (run it without torchrun)")
    run = SimpleNamespace(args=args, out=Path(args.output_dir), config=dict(vars(args)))
    tasks.checkpoint.check_output_dir(run.out, args.resume)
    run.transport = transport or tasks.Transport(args.device)
    run.device = run.transport.device
    load_parts(run)
    run.transport.join(0)
    params = dict(run.model.named_parameters())
    run.global_w = {n: params[n].detach().clone() for n in run.names}  # the server's copy of what is averaged
    run.recent = []  # --tensor_bound: the accepted tensors' change sizes of the last rounds, one list a round
    run.start = load_checkpoint(run) if args.resume else 0
    N = args.num_clients
    run.n_sampled = tasks.sampled_per_round(N, args.m)
    run.method = "FedIT (LoRA)" if args.method == "lora" else ("centralized fine-tuning" if N == 1 else "FedAvg (full)")
    trainable = sum(params[n].numel() for n in run.names)
    print(f"{run.method}: {args.model}, {trainable / 1e6:.2f}M of {sum(p.numel() for p in params.values()) / 1e6:.1f}M "
          f"parameters trained and sent; {N} clients, {run.n_sampled} per round, {args.local_steps} {args.optimizer} "
          f"steps each, lr {args.lr:g}" + run.transport.describe(), flush=True)
    run.files = tasks.RunFiles(run.out)
    run.files.start({**run.config, "trainable_params": trainable}, resumed_round=run.start if args.resume else None)
    run.progress = tasks.Progress(turns=(args.rounds * run.n_sampled, run.start * run.n_sampled))
    if args.resume:
        run.progress.log(f"resumed from {tasks.checkpoint.path_of(run.out)} after round {run.start}")
    return run


def load_parts(run):
    """What every party loads, the server and each client's process alike: the model, the names it trains, the data."""
    run.model, run.tokenizer, run.names = build_model(run.args, run.device)
    own = getattr(run, "transport", None) is not None and run.transport.declares_sizes  # Flower's deployment mode
    run.clients, run.val, run.test = tasks.load_task_data(run.args, run.tokenizer, run.args.num_clients, run.model, own)


def load_checkpoint(run):
    """Restore the global weights (and the working model) from <output_dir>/checkpoint.safetensors -> its round.
    Missing, unreadable, foreign, of other flags, or of other shapes: ConfigError."""
    rnd, weights, state = tasks.checkpoint.load(run.out, "fedavg", run.config)
    run.recent = state.get("recent", [])
    if weights.keys() != run.global_w.keys() or any(weights[n].shape != t.shape for n, t in run.global_w.items()):
        raise ConfigError(f"--resume: the weights in {tasks.checkpoint.path_of(run.out)} do not fit "
                          f"{run.args.model}")
    for n, t in run.global_w.items():
        t.copy_(weights[n])
    sync_model(run.model, run.global_w)
    return rnd


def log_round(run, rnd, t0, turns):
    """Server, end of round rnd (round 0: before training, no turns): evaluate the global model (in `model`), write
    the round's ledger lines, metrics row and then the checkpoint (a crash between them redoes the round), print its
    line."""
    args, per_example, evaluation = run.args, {}, {}
    if rnd % args.eval_every == 0 or rnd == args.rounds:
        evaluation = tasks.evaluate(args, run.model, run.tokenizer, run.test, run.device, run.val, run.progress,
                                    per_example)
        run.files.heldout_examples(rnd, per_example)
    row = tasks.round_row(rnd, t0, turns, evaluation)  # pops the turns' client_seconds: the ledger keeps no timings
    run.files.ledger(turns)
    run.files.metric(row)
    tasks.checkpoint.save(run.out, "fedavg", rnd, run.config, run.global_w,  # last: a crash before it redoes the round
                          {"recent": run.recent})
    run.progress.log(tasks.round_line(row))


def finish(run):
    """The tuned model in Hugging Face format (FedIT's adapters merged into the base weights), then the loss plot."""
    lora = run.args.method == "lora"
    export = run.model.merge_and_unload() if lora else run.model
    print(f"wrote {tasks.export_model(export, run.tokenizer, run.out / 'model')} (save_pretrained: config, weights, "
          f"tokenizer{', LoRA merged' if lora else ''})")
    if run.files.plot(run.method):  # after the export: a plot never decides whether a run succeeds
        print(f"wrote {run.out / 'loss.png'}")
    if line := run.files.change_line():
        print(line)


def client_state(run, c):  # Flower: a FedAvg client keeps nothing between rounds (it starts from its download)
    return {}


def set_client_state(run, c, state):
    pass


def main(argv=None):
    return tasks.run_cli("fedavg", lambda: train(parse_args(argv)))


if __name__ == "__main__":
    main()
