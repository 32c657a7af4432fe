"""One checkpoint format and one resume rule for the three scripts.

    <output_dir>/checkpoint.safetensors    the server's state after a complete round, replaced atomically: its
                                           tensors (FedKSeed: A's history and the seed statistics, kilobytes;
                                           FedCyBGD / FedAvg: the global weights), and as metadata the round, the
                                           run's config and a small JSON state (FedCyBGD: block versions)

    tasks.checkpoint.check_output_dir(out, resume)          # a folder holding a run needs --resume; --resume needs one
    tasks.checkpoint.save(out, "fedkseed", rnd, config, tensors, state)
    rnd, tensors, state = tasks.checkpoint.load(out, "fedkseed", config)   # ConfigError: missing, truncated,
                                                                          # foreign, or other trajectory flags
    tasks.checkpoint.read(out)            # {"round", "config", "state", **tensors}: for tests and tools

The resume rule: a run resumes only under the flags it was written with, except those of RESUME_FREE, which do not
change the weights a run produces (how long it runs, how often and on how much it is evaluated, where it runs).
The Flower nodes name their clients' stored states by the same rule (flower/fedfull_flower/transport.py).
"""
import json
from pathlib import Path

from .errors import ConfigError
from .runfiles import save_atomic

NAME = "checkpoint.safetensors"
RESUME_FREE = frozenset({"rounds", "resume", "eval_every", "output_dir", "device", "dist_timeout", "eval_samples",
                         "rouge_samples", "rouge_at_start", "max_new_tokens"})


def path_of(out):
    return Path(out) / NAME


def _plain(config):
    return json.loads(json.dumps(config, default=str))  # what a config reads as after a round trip through JSON


def check_output_dir(out, resume):
    """Fail fast, before anything slow: a folder that holds a run's checkpoint is continued only with --resume, and
    --resume needs one."""
    path = path_of(out)
    if path.exists() and not resume:
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it or pick another --output_dir")
    if resume and not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")


def save(out, script, rnd, config, tensors, state=None):
    """Write the checkpoint of round `rnd` under a temporary name, then rename it over the last one."""
    from safetensors.torch import save_file
    meta = {"format": "fedfull", "script": script, "round": str(rnd), "config": json.dumps(_plain(config)),
            "state": json.dumps(state or {})}
    save_atomic(path_of(out), lambda tmp: save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), meta))


def read(out):
    """-> {"round": int, "script", "config": dict, "state": dict, **tensors}; raises what safetensors and json raise."""
    from safetensors import safe_open
    with safe_open(str(path_of(out)), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    return {"round": int(meta["round"]), "script": meta["script"], "config": json.loads(meta["config"]),
            "state": json.loads(meta["state"]), **tensors}


def load(out, script, config, fixed=()):
    """-> (round, tensors, state) of the checkpoint in `out`, after checking it was written by `script` under the
    same flags as `config` (all but RESUME_FREE; `fixed`: flags this run cannot change either, e.g. --rounds under a
    schedule that spans the run). Missing, unreadable, foreign or other flags -> ConfigError (one line)."""
    path = path_of(out)
    if not path.is_file():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001  a truncated file or foreign bytes: safetensors raises many types
        raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}): it is truncated or not a {script} "
                          "checkpoint; delete it to start over") from None
    if meta.get("format") != "fedfull" or meta.get("script") != script:
        raise ConfigError(f"--resume: {path} is not a {script} checkpoint"
                          + (f" (written by {meta['script']})" if meta.get("format") == "fedfull" else ""))
    try:
        saved = read(out)
    except Exception as e:  # noqa: BLE001  tensors cut short, metadata that is not JSON
        raise ConfigError(f"--resume: {path} cannot be read ({type(e).__name__}): it is truncated; delete it to "
                          "start over") from None
    now = _plain(config)
    for key in sorted(set(now) | set(saved["config"])):
        if (key not in RESUME_FREE or key in fixed) and saved["config"].get(key) != now.get(key):
            raise ConfigError(f"--resume: {path} was written with {key}={saved['config'].get(key)!r}, this run has "
                              f"{key}={now.get(key)!r}; use the same flags or another --output_dir")
    tensors = {k: v for k, v in saved.items() if k not in ("round", "script", "config", "state")}
    return saved["round"], tensors, saved["state"]
