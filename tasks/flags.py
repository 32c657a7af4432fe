"""The flags the three scripts share, in one table, each with its check beside it: every script spells, documents
and checks --lr (say) the same way, and declares only its own flags.

    p = argparse.ArgumentParser(...)
    tasks.flags.add(p, "dataset model rounds lr ...", lr=dict(default=3e-7), rounds=dict(help="..."))
    p.add_argument(...)                     # the script's own flags
    args = p.parse_args(argv)
    tasks.flags.check(args, "dataset model rounds lr ...", rounds=0)   # every shared flag's check (low bounds may
                                                                       # be given per script), ConfigError on failure
    tasks.flags.check_positive(args, "x y"); check_nonnegative(args, "z"); check_at_least(args, {"n": 1})
                                            # a script's own flags, checked in the same words

A shared flag's entry: its option strings, argparse keywords (type, default, help) and its check. A script may
override any keyword (its default, a longer help) but not the check, except the lowest value of a count.
"""
import math
from pathlib import Path

from .errors import ConfigError
from .partitions import sampled_per_round


def _finite(args, name, low=0.0, strict=True, note=""):
    """finite and > low (>= low with strict=False). nan fails every comparison and inf passes '> 0', so finiteness is
    tested first."""
    v = getattr(args, name)
    if v is not None and not (math.isfinite(v) and (v > low if strict else v >= low)):
        raise ConfigError(f"--{name} {v}: must be a finite number {'>' if strict else '>='} {low:g}{note}")


def _at_least(low):
    def check(args, name, low=low):
        v = getattr(args, name)
        if v is not None and v < low:
            raise ConfigError(f"--{name} {v}: must be at least {low}")
    return check


def _sampling(args, name, low=None):
    """-m in (0, 1], and at least one client sampled a round (int(N*m), as the official codes)."""
    if not 0.0 < args.m <= 1.0:
        raise ConfigError(f"-m {args.m}: the client sampling ratio must be in (0, 1]")
    n = getattr(args, "num_clients", 0) or 0
    if n and sampled_per_round(n, args.m) < 1:
        raise ConfigError(f"-m {args.m} x --num_clients {n} samples no client per round: use -m >= {1 / n:g}")


def _exists(args, name, low=None):
    if args.data_path and not Path(args.data_path).exists():
        raise ConfigError(f"--data_path {args.data_path} not found")


def _split(args, name, low=None):
    """'iid', 'dirALPHA' with ALPHA > 0 (label Dirichlet), or 'stream' where the script has it (fedcybgd)."""
    v = args.iid
    if v in ("iid", "stream"):
        return
    try:
        ok = v.startswith("dir") and float(v[3:]) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"--iid {v}: must be 'iid' or 'dirALPHA' with ALPHA > 0, e.g. dir0.5"
                          + (", or 'stream'" if getattr(args, "task", None) else ""))


def _none(args, name, low=None):
    pass


# name -> (option strings, argparse keywords, check)
SHARED = {
    "dataset": (("--dataset",), dict(default=None, help="the dataset"), _none),
    "data_path": (("--data_path",), dict(default=None, help="local dataset file or folder (default: data/ next to "
                                         "the scripts, else the Hugging Face hub)"), _exists),
    "model": (("--model",), dict(default=None, help="Hugging Face model id or local folder; 'smollm2-135m' and "
                                 "'minilm-l6' are converted once from the packaged files"), _none),
    "rounds": (("--rounds",), dict(type=int, default=None, help="communication rounds"), _at_least(1)),
    "num_clients": (("--num_clients",), dict(type=int, default=None, help="clients the training data is split "
                                             "over (N)"), _at_least(1)),
    "m": (("-m",), dict(type=float, default=None, help="fraction of clients sampled per round, in (0, 1]: int(N*m) "
                        "clients"), _sampling),
    "local_steps": (("--local_steps",), dict(type=int, default=None, help="optimizer steps per client per round"),
                    _at_least(1)),
    "batch_size": (("--batch_size",), dict(type=int, default=None, help="examples per step"), _at_least(1)),
    "lr": (("--lr",), dict(type=float, default=None, help="learning rate"), _finite),
    "weight_decay": (("--weight_decay",), dict(type=float, default=None, help="AdamW weight decay, on tensors with "
                                               "ndim >= 2 only; 0 = none"),
                     lambda args, name, low=None: _finite(args, name, 0.0, strict=False, note=" (0 = none)")),
    "max_length": (("--max_length",), dict(type=int, default=None, help="max tokens of one example (longer ones "
                                           "are truncated)"), _at_least(1)),
    "iid": (("--iid",), dict(default=None, help="client split: 'iid' or 'dirALPHA' (label Dirichlet, e.g. "
                             "dir0.5)"), _split),
    "seed": (("--seed",), dict(type=int, default=42, help="master seed: all randomness derives from (seed, round, "
                               "client)"), _none),
    "output_dir": (("--output_dir",), dict(default=None, help="config.json, metrics.jsonl, ledger.jsonl, "
                                           "checkpoint.safetensors, loss.png, model/"), _none),
    "resume": (("--resume",), dict(action="store_true", help="continue from the checkpoint in --output_dir (the "
                                   "same flags but those of tasks.checkpoint.RESUME_FREE; --rounds may grow)"), _none),
    "eval_every": (("--eval_every",), dict(type=int, default=1, help="evaluate every this many rounds (and at "
                                           "round 0 and after the last)"), _at_least(1)),
    "eval_samples": (("--eval_samples",), dict(type=int, default=None, help="held-out examples evaluated, a "
                                               "seeded subset (the same in every script); 0 = all"), _at_least(0)),
    "val_samples": (("--val_samples",), dict(type=int, default=0, help="validation examples carved from the "
                                             "training data before it is split over clients (seeded: the same "
                                             "examples in every script), evaluated beside the held-out set as "
                                             "val_loss (val_<metric>); choose knobs on these, not on the held-out "
                                             "set. 0 = none"), _at_least(0)),
    "template": (("--template",), dict(default="auto", help="prompt-based classification (sst2, mrpc): the template "
                                       "and label words (tasks/prompts.py TEMPLATES); auto: the one with the best "
                                       "zero-shot accuracy on the --val_samples validation examples"), _none),
    "max_new_tokens": (("--max_new_tokens",), dict(type=int, default=128, help="tokens generated for Rouge-L "
                                                   "(greedy)"), _at_least(0)),
    "max_change": (("--max_change",), dict(type=float, default=0.5, help="the server refuses an upload that changes "
                                           "the weights it was sent by more than this fraction of their norm (a "
                                           "hostile block of 1e30 is finite, an all-zero upload changes them by 1.0); "
                                           "0 = off"),
                   lambda args, name, low=None: _finite(args, name, 0.0, strict=False, note=" (0 = off)")),
    "tensor_bound": (("--tensor_bound",), dict(type=float, default=10.0, help="robust aggregation: each uploaded "
                                               "tensor's change (RMS per element) is scaled down to at most this many "
                                               "times the lower median change of the tensors accepted in this and the "
                                               "last --tensor_window rounds (FedCyBGD: turns); 0 = off"),
                     lambda args, name, low=None: _finite(args, name, 0.0, strict=False, note=" (0 = off)")),
    "tensor_window": (("--tensor_window",), dict(type=int, default=10, help="--tensor_bound: the past rounds (turns) "
                                                 "whose accepted tensors the median pools"), _at_least(0)),
    "device": (("--device",), dict(default="auto", help="auto, cpu, cuda, cuda:1, ..."), _none),
    "dtype": (("--dtype",), dict(choices=("float32", "bfloat16", "float16"), default="float32",
                                 help="weight dtype"), _none),
    "dist_timeout": (("--dist_timeout",), dict(type=float, default=1800.0, help="with torchrun: seconds a rank waits "
                                               "for the others at a collective before the whole run stops with one "
                                               "error line; it must exceed rank 0's evaluation time"), _finite),
}


def _names(names):
    return names.split() if isinstance(names, str) else list(names)


def add(parser, names, **overrides):
    """Add the shared flags `names` (in that order) to an argparse parser; overrides: name -> argparse keywords that
    replace the table's (a script's default, help or choices)."""
    for name in _names(names):
        options, kwargs, _ = SHARED[name]
        kwargs = {**kwargs, **overrides.get(name, {})}
        parser.add_argument(*kwargs.pop("options", options), **kwargs)  # "options": a script's extra spellings


def check(args, names, **low):
    """Each shared flag's check, in table order -> ConfigError (one line) on the first that fails. low: name -> the
    lowest value of a count where the script allows another (e.g. rounds=0: evaluate only)."""
    for name in SHARED:
        if name in _names(names):
            SHARED[name][2](args, name, **({"low": low[name]} if name in low else {}))


def check_positive(args, names):
    """A script's own numeric flags, each a finite number > 0, in the shared flags' words."""
    for name in _names(names):
        _finite(args, name)


def check_nonnegative(args, names):
    """A script's own numeric flags, each a finite number >= 0, in the shared flags' words."""
    for name in _names(names):
        _finite(args, name, strict=False)


def check_at_least(args, low):
    """A script's own counts: low = {name: its lowest value}, in the shared flags' words."""
    for name, value in low.items():
        _at_least(value)(args, name)


def fill_task_defaults(args, defaults, datasets):
    """Flags left at None take the --task's defaults; a --dataset of another task is a ConfigError."""
    for k, v in defaults[args.task].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dataset not in datasets[args.task]:
        raise ConfigError(f"--dataset {args.dataset} is not a {args.task} dataset: choose one of "
                          f"{', '.join(datasets[args.task])}")


def pick_device(device):
    """--device: 'auto' is CUDA where this torch sees a GPU, else the CPU; an explicit 'cuda' without one is a
    ConfigError."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch build sees no CUDA device")
    return device
