"""fedkseed.py under torchrun: two gloo ranks on CPU give the one-process run's metrics and weights bit for bit,
and a rank that hangs stops the group with one line, keeping the last complete checkpoint for --resume."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tasks

import fedkseed as fk
from conftest import make_tiny_llama, make_tiny_tokenizer
from test_fedkseed import write_dolly
from torchrun_helpers import dist_env, gloo_threads_left, lose_rank, torchrun

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "fedkseed.py")
TIMEOUT = 10  # --dist_timeout of the runs below, seconds
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama + character tokenizer as a local model folder, and a tiny Dolly file."""
    folder = tmp_path_factory.mktemp("tiny_model")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, write_dolly(tmp_path_factory.mktemp("data") / "dolly.jsonl")


def flags(files, out, *extra):
    # 4 clients, 3 sampled per round; client c lives on rank c % 2
    model, dolly = files
    return ["--model", str(model), "--data_path", str(dolly), "--output_dir", str(out), "--num_clients", "4",
            "-m", "0.75", "-K", "16", "--local_steps", "3", "--lr", "1e-3", "--zo_eps", "1e-2", "--max_length", "64",
            "--iid", "iid", "--eval_samples", "3", "--rouge_samples", "2", "--max_new_tokens", "4", "--device", "cpu",
            "--bias_sampling", "--dist_timeout", str(TIMEOUT), *extra]


def metrics(out):
    """metrics.jsonl without what differs between one process and ranks by nature: timings, and the replay check
    that only one process can make (under torchrun no rank but the server holds the server's weights)."""
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "sync_seconds", "client_seconds",
                                                       "replay_max_abs_diff")} for r in rows]


def checkpoint(out):
    return tasks.checkpoint.read(out)


def exported(out):
    from transformers import AutoModelForCausalLM

    return [p.detach() for p in AutoModelForCausalLM.from_pretrained(str(out / "model")).parameters()]


ONE_SIDED = ("--estimator", "one_sided", "--directions", "2", "--server_lr", "1.5", "--server_momentum", "0.5")
FZOO_COSINE = ("--estimator", "fzoo", "--directions", "2", "--lr_scheduler", "cosine")
MASK = ("--mask", "sensitivity", "--mask_density", "0.05", "--mask_examples", "4", "--estimator", "fzoo",
        "--directions", "2")  # the server's mask travels to rank 1's clients in their first downloads


@pytest.mark.parametrize("compute_dtype, option", [("float32", ()), ("bfloat16", ()), ("float32", ONE_SIDED),
                                                  ("float32", FZOO_COSINE), ("bfloat16", MASK)],
                         ids=["float32", "bfloat16", "one_sided+server_momentum", "fzoo+cosine", "mask+bfloat16"])
def test_two_ranks_equal_one_process(files, tmp_path, compute_dtype, option):
    """Same flags (FedKSeed-Pro, 3 rounds): 1 process vs 2 gloo ranks -> same metrics.jsonl values (all but timings
    and the one-process replay check), the same global model bit for bit, the same server state; the ledger adds
    the collectives' bytes. Also with bfloat16 forwards over the float32 weights (--compute_dtype), and with the
    one-sided estimator and server momentum, with FZOO under the cosine lr schedule, and with --mask sensitivity."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--rounds", "3", "--eval_every", "1", "--compute_dtype", compute_dtype, *option)
    n_dir = 2 if option else 1
    p1 = subprocess.Popen([sys.executable, SCRIPT, *flags(files, one, *common)], env=dist_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p2 = subprocess.run(torchrun(SCRIPT, 2, *flags(files, two, *common)), env=dist_env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=180)
    out1, _ = p1.communicate(timeout=180)
    assert p1.returncode == 0, out1
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert metrics(one) == metrics(two) and [r["round"] for r in metrics(two)] == [0, 1, 2, 3]
    a, b = checkpoint(one), checkpoint(two)
    assert all(torch.equal(a[key], b[key]) for key in ("A_history", "synced_round", "hist_sum", "hist_count", "velocity",
                                                       "mask_sent", "mask"))
    assert all(torch.equal(x, y) for x, y in zip(exported(one), exported(two)))
    assert any(not torch.equal(x, y) for x, y in zip(exported(two), checkpoint_initial(files)))  # training moved them
    # rank 0 alone speaks: one header line, one summary
    assert p2.stdout.count("2 ranks (torchrun), rank 0 the server") == 1 and p2.stdout.count("communication:") == 1
    # the ledger: per client the protocol's messages (as in one process) + per rank the collectives' tensor bytes
    ledger = [json.loads(l) for l in (two / "ledger.jsonl").read_text().splitlines()]
    clients = [e for e in ledger if "client" in e]
    assert clients == [json.loads(l) for l in (one / "ledger.jsonl").read_text().splitlines()]
    up_row = 4 + 5 * 8 + 4 + 3 * n_dir * (2 + 4)  # uint32 length, float64 CLIENT_STATS (5), the upload
    # uint32 length, the longest download: flag, dense A, Pro's uint8 importances (and the mask)
    down_row = 4 + 1 + 4 * 16 + 16 + (a["mask"].numel() if option == MASK else 0)
    for rnd in (1, 2, 3):
        wire = {e["rank"]: e for e in ledger if "rank" in e and e["round"] == rnd}
        round_clients = [e["client"] for e in clients if e["round"] == rnd]
        rows = max(sum(c % 2 == r for c in round_clients) for r in (0, 1))
        assert wire[1]["clients"] == [c for c in round_clients if c % 2 == 1]
        assert wire[1]["received"] == rows * down_row == wire[0]["sent"]
        assert wire[1]["sent"] == rows * up_row == wire[0]["received"]


def checkpoint_initial(files):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(files[0]), dtype=torch.float32)
    return [p.detach() for p in model.parameters() if p.requires_grad]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("sig, why", [(signal.SIGSTOP, f"a rank did not answer within {TIMEOUT} s"),
                                      (signal.SIGKILL, "a rank exited")], ids=["hung", "killed"])
def test_lost_rank_stops_group_and_resume_completes(files, tmp_path, sig, why):
    """Stop (SIGSTOP: hangs) or kill rank 1 after a few rounds: rank 0 gives up, within --dist_timeout for a hung
    rank and at once for a dead one, with one line naming the last complete checkpoint, which is the latest round
    in the checkpoint and metrics.jsonl; (hung case) --resume with two ranks then finishes the run."""
    out = tmp_path / "run"
    many = ("--rounds", "100000", "--eval_every", "100000", "--rouge_samples", "0")  # runs until stopped
    agent = subprocess.Popen(torchrun(SCRIPT, 2, *flags(files, out, *many)), env=dist_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    waited, err = lose_rank(agent, lambda: (out / "checkpoint.safetensors").exists() and tasks.checkpoint.read(out)["round"] >= 1, sig, TIMEOUT)
    assert agent.returncode != 0
    assert (TIMEOUT - 1 < waited < TIMEOUT + 20) if sig == signal.SIGSTOP else waited < TIMEOUT, waited
    ours = [l for l in err.splitlines() if l.startswith("fedkseed: rank 0:")]
    assert len(ours) == 1, err
    assert why in ours[0] and "rerun every rank with --resume" in ours[0]
    assert 'fedkseed.py", line' not in err  # no traceback from the ranks
    last = int(ours[0].split("the last complete checkpoint is round ")[1].split(":")[0])
    state = checkpoint(out)
    assert state["round"] == last >= 1 and metrics(out)[-1]["round"] == last
    if sig == signal.SIGKILL:
        return  # resuming is the same either way; once is enough

    # --resume restarts the whole group: two more rounds, then the run ends normally
    more = ("--rounds", str(last + 2), "--eval_every", "100000", "--rouge_samples", "0", "--resume")
    done = subprocess.run(torchrun(SCRIPT, 2, *flags(files, out, *more)), env=dist_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {out / 'checkpoint.safetensors'} after round {last}" in done.stdout
    assert checkpoint(out)["round"] == last + 2
    assert [r["round"] for r in metrics(out)] == list(range(0, last + 3))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_group_ends_with_no_gloo_thread_left(files, tmp_path):
    """After main() no gloo worker thread is alive on any rank: nothing keeps the process group past
    destroy_process_group(), so no rank can abort while the interpreter tears such threads down at exit."""
    assert gloo_threads_left(SCRIPT, 2, tmp_path / "threads", *flags(files, tmp_path / "run", "--rounds", "1", "--rouge_samples", "0")) \
        == {0: 0, 1: 0}
