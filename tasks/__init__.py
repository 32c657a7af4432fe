"""tasks: the data, metrics and run plumbing the three scripts share. Every dataset becomes plain lists of dicts.

Instruction data (causal LM: FedKSeed --dataset dolly|instruct, FedCyBGD --task sft):

    data = tasks.load_instruction_data(name, data_path=None, num_clients=200, iid="dir0.5", seed=42,
                                       test_category="summarization", test_fraction=0.01, min_size=10,
                                       tokenizer=None, max_length=1024, val_samples=0)
        name "dolly":          test = one whole category (test_category); the other 7 categories are split
                               over num_clients by iid="iid" or label-Dirichlet "dirALPHA" (>= min_size each)
        name "instruct":       Natural Instructions: one client per training task (num_clients is ignored),
                               20% of each task; test = max(20, 2%) of each test task; instances longer than
                               max_length tokens (tokenizer given) or characters (no tokenizer) are dropped
        name "alpaca_gpt4_en": test = a seeded test_fraction of the records; the rest split like dolly
        data.clients  list over clients of lists of examples
        data.test     list of held-out examples
        data.val      val_samples examples carved from the training pool before partitioning (split_validation)
        data.summary  printable text table: client sizes and label mix
        example = {"prompt": str (Alpaca-style template filled in), "target": str (no EOS), "category": str}

    t = tasks.tokenize_example(tokenizer, example, max_length)
        -> {"input_ids": list[int], "labels": list[int] (-100 on the prompt), "truncated": bool}
           input_ids = prompt + target + EOS; too long -> the prompt is cut from the left first
    ts = tasks.tokenize_examples(tokenizer, examples, max_length)    # same, and prints how many were cut
    batch = tasks.collate(ts, pad_token_id)
        -> {"input_ids", "attention_mask", "labels"}: LongTensor [B, T], right padding, labels -100 there
    texts = tasks.generate(model, tokenizer, prompts, max_new_tokens=128, batch_size=8)   # greedy, new text only
    score = tasks.rouge_l(predictions, references)   # mean per-sample Rouge-L F in [0, 1], 0 for empty
    loss = tasks.heldout_loss(model, tokenized, pad_token_id)    # token-weighted mean target-token loss
    score = tasks.heldout_rouge_l(model, tokenizer, tokenized, targets, max_new_tokens)   # what all scripts report
    sums, counts = tasks.heldout_token_losses(model, tokenized, pad_token_id)   # per example (bench/results.py)
    texts = tasks.heldout_generations(model, tokenizer, tokenized, max_new_tokens)   # from the prompts' own ids
    scores = tasks.rouge_l_scores(predictions, references)
    delta, lo, hi = tasks.paired_interval(first, last, tasks.token_weighted_loss)   # per-example dicts, 95% bootstrap

Partitions:  (tasks/partitions.py) partition(labels, num_clients, iid="dir0.5", seed=42, min_size=10) -> index lists;
             split_validation(examples, n, seed) -> (rest, validation): carved before partitioning; subsample(examples,
             n, seed): the held-out subset every script evaluates; partition_summary(parts, labels) -> str;
             sample_clients(seed, round, N, n), sampled_per_round(N, m), derive_seed(seed, round, client, ...),
             stream(seed, name, ...): every random draw is a function of these numbers, each use its own stream
Prompts:     (tasks/prompts.py) prompt-based classification with a causal LM (FedKSeed --dataset sst2|mrpc): a template,
             label words scored at the answer position, their cross-entropy as the loss, accuracy as the metric
GLUE:        tasks.glue.TASKS, NUM_LABELS[task], METRIC[task], load(task, data_path=None) -> (train, dev),
             compute_metrics(task, predictions, labels) -> dict; example {"text_a", "text_b" or None, "label"}
SQuAD v1.1:  tasks.squad.load(data_path=None) -> (train, dev), prepare_train_features, prepare_eval_features,
             postprocess_predictions, evaluate(examples, predictions) -> {"exact_match", "f1"} (0-100)
Task data:   (tasks/data.py) load_task_data (each client's tokenized examples, validation, held-out), make_batch,
             local_batches, collate_tokenized
Evaluation:  (tasks/evaluation.py) evaluate (fedcybgd, fedavg), heldout_sets / evaluate_lm and prompt_sets /
             evaluate_prompt_sets, both through evaluate_sets (fedkseed): the same metric definitions in every script
Intervals:   (tasks/bootstrap.py) paired_interval(first, last, stat), token_weighted_loss, accuracy_of
Models:      (tasks/models.py) load_model(name, task, num_labels, dtype, device) -> (model, tokenizer);
             tasks.models.smollm2_folder() converts the packaged GGUF once; tasks.hub_reachable()
Training:    (tasks/training.py) train_steps (a client's local optimizer steps), param_groups (weight decay groups)
Masks:       (tasks/masks.py) fedkseed's --mask: mask_scores(rule, ...) (sensitivity, magnitude, random), encode_mask /
             decode_mask (the global indices the server sends)
Memory:      (tasks/memory.py) PeakAllocations, tensor_bytes: a client's peak memory, held + step, one definition
Flags:       (tasks/flags.py) the flags the scripts share, one table with the checks: tasks.flags.add / check
Checkpoints: (tasks/checkpoint.py) one format and one resume rule: tasks.checkpoint.save / load / read
Runs:        (tasks/runfiles.py) tasks.Progress(**bars), tasks.RunFiles(folder, active), tasks.round_row(rnd, t0, turns,
             evaluation) (a round's metrics row, the same in every script), tasks.round_line(row),
             tasks.export_model(model, tokenizer, folder), write_atomic, save_atomic, fmt_bytes, tasks.run_cli(name, fn)
Wire:        (tasks/wire.py) tasks.pack(dict name -> tensor) -> bytes (safetensors), tasks.unpack(bytes) -> dict,
             tasks.packed_bound(tensors) (uploads are refused beyond it), check_tensors (the server's check of an
             upload of tensors), relative_change
Robust:      (tasks/robust.py) on by default: scalar_bound, clip_client_norms (FedKSeed), bound_uploads
             (FedAvg, FedCyBGD): bounds relative to the recent uploads' lower median (lower_median)
Transports:  (tasks/transport.py) tasks.transport_from_env(device) -> Transport (one process) or Ranks (torchrun);
             Flower's transport and ClientApp are the Flower App's (flower/fedfull_flower/)
Errors:      (tasks/errors.py) tasks.ConfigError, tasks.DataError, tasks.ModelError, tasks.GroupError: one line each
Sources:     (tasks/sources.py) local files under data/ or the hub; read_json, read_jsonl (the one jsonl reader)

Local files are read from data/ next to the scripts (or data_path); when missing, the Hugging Face hub
is tried. Every problem a user can cause raises tasks.DataError with a one-line message.
"""
from . import checkpoint, flags, glue, prompts, squad
from .bootstrap import accuracy_of, paired_interval, token_weighted_loss
from .data import Batches, collate_tokenized, load_task_data, local_batches, make_batch
from .errors import ConfigError, DataError, GroupError, ModelError
from .evaluation import (evaluate, evaluate_lm, evaluate_prompt_sets, evaluate_sets, glue_predictions, heldout_sets,
                         prompt_sets)
from .instruction import DATASETS, InstructionData, load_instruction_data, make_example
from .lm import (IGNORE_INDEX, collate, generate, generate_ids, heldout_generations, heldout_loss, heldout_prompt_ids,
                 heldout_rouge_l, heldout_token_losses, rouge_l, rouge_l_scores, tokenize_example, tokenize_examples)
from .masks import decode_mask, encode_mask, mask_scores
from .memory import PeakAllocations, tensor_bytes
from .models import load_model
from .partitions import (STREAMS, derive_seed, partition, partition_summary, sample_clients, sampled_per_round,
                         split_validation, stream, subsample)
from .runfiles import (Progress, RunFiles, export_model, fmt_bytes, read_run_jsonl, round_line, round_row, run_cli,
                       save_atomic, write_atomic)
from .sources import hub_reachable, read_jsonl
from .training import param_groups, train_steps
from .transport import Ranks, Transport, accept_replies, transport_from_env
from .robust import (bound_changes, bound_uploads, change_limit, change_sizes, clip_client_norms, lower_median,
                     scalar_bound)
from .wire import check_tensors, pack, packed_bound, relative_change, unpack
