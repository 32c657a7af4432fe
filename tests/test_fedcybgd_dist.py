"""fedcybgd.py under torchrun: two gloo ranks on CPU give the one-process run's metrics and weights bit for bit,
and a rank that dies or hangs stops the group with one line, keeping the last complete checkpoint for --resume."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedcybgd as cy
import tasks
from test_fedcybgd import checkpoint_weights, read_metrics, tiny_argv, tiny_run_files  # noqa: F401 (fixture)
from torchrun_helpers import dist_env, gloo_threads_left, lose_rank, torchrun

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "fedcybgd.py")
TIMEOUT = 10  # --dist_timeout of the runs below, seconds
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def flags(files, out, *extra):
    # 3 clients over 2 ranks: rank 0 holds clients 0 and 2, rank 1 client 1
    return [*tiny_argv(files, out, "--num_clients", "3", "--device", "cpu", "--dist_timeout", str(TIMEOUT)), *extra]


def checkpoint_round(out):
    """The round of the checkpoint in `out`, -1 without one (it is replaced atomically: never read half written)."""
    return tasks.checkpoint.read(out)["round"] if tasks.checkpoint.path_of(out).exists() else -1


def ledger(out):
    return [json.loads(l) for l in (out / "ledger.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [["--download", "delta"],
                                   ["--download", "int8", "--download_fraction", "0.5", "--switch_mode", "random"]],
                         ids=["delta", "int8-fraction"])
def test_two_ranks_equal_one_process(tiny_run_files, tmp_path, extra):
    """Same flags, 2 rounds: 1 process vs 2 gloo ranks -> the same metrics.jsonl values (all but `seconds`), the
    same per-turn ledger, the same checkpoint weights bit for bit; the ledger adds the broadcasts' bytes."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ("--rounds", "2", *extra)
    p1 = subprocess.Popen([sys.executable, SCRIPT, *flags(tiny_run_files, one, *common)], env=dist_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p2 = subprocess.run(torchrun(SCRIPT, 2, *flags(tiny_run_files, two, *common)), env=dist_env(), cwd=ROOT, capture_output=True,
                        text=True, timeout=180)
    out1, _ = p1.communicate(timeout=180)
    assert p1.returncode == 0, out1
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert read_metrics(one) == read_metrics(two) and [m["round"] for m in read_metrics(two)] == [0, 1, 2]
    a, b = checkpoint_weights(one), checkpoint_weights(two)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tasks.checkpoint.read(one)["round"] == tasks.checkpoint.read(two)["round"] == 2
    assert p2.stdout.count("2 ranks (torchrun)") == 1  # rank 0 alone speaks
    turns = [e for e in ledger(two) if "turn" in e]
    assert turns == ledger(one) and [t["client"] for t in turns] == [0, 1, 2] * 2
    header = 8 * (1 + len(cy.CLIENT_STATS))  # float64 [length, *the turn's stats] before each upload broadcast
    for r in (1, 2):  # what crossed: each turn's float64[3] header + its upload, to the one other rank
        wire = {e["rank"]: e for e in ledger(two) if "rank" in e and e["round"] == r}
        up = {t["client"]: header + t["upload_bytes"] for t in turns if t["round"] == r}
        assert wire[0]["clients"] == [0, 2] and wire[1]["clients"] == [1]
        assert wire[0]["sent"] == up[0] + up[2] == wire[1]["received"]
        assert wire[1]["sent"] == up[1] == wire[0]["received"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's process through /proc")
@pytest.mark.parametrize("sig, why", [(signal.SIGSTOP, f"a rank did not answer within {TIMEOUT} s"),
                                      (signal.SIGKILL, "")], ids=["hung", "killed"])
def test_lost_rank_stops_group_and_resume_completes(tiny_run_files, tmp_path, sig, why):
    """Stop (SIGSTOP: hangs) or kill rank 1 after a trained round: rank 0 gives up, within --dist_timeout for a hung
    rank and at once for a dead one, with one line naming the last complete checkpoint, the one on disk;
    (killed case) --resume with two ranks then finishes the run."""
    out = tmp_path / "run"
    many = ("--rounds", "100000", "--eval_every", "100000", "--max_new_tokens", "0")  # runs until stopped
    agent = subprocess.Popen(torchrun(SCRIPT, 2, *flags(tiny_run_files, out, *many)), env=dist_env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trained = lambda: checkpoint_round(out) >= 1
    waited, err = lose_rank(agent, trained, sig, TIMEOUT)
    assert agent.returncode != 0
    assert (TIMEOUT - 1 < waited < TIMEOUT + 20) if sig == signal.SIGSTOP else waited < TIMEOUT, waited
    ours = [l for l in err.splitlines() if l.startswith("fedcybgd: rank 0:")]
    assert len(ours) == 1, err
    assert why in ours[0] and "rerun every rank with --resume" in ours[0], ours[0]
    if sig == signal.SIGKILL:  # gloo sees the closed connection, or torchrun's SIGTERM comes first: same words
        assert "a rank exited" in ours[0], ours[0]
    assert 'fedcybgd.py", line' not in err  # no traceback from the ranks
    last = int(ours[0].split("the last complete checkpoint is round ")[1].split(":")[0])
    assert checkpoint_round(out) == last and last >= 1
    assert read_metrics(out)[-1]["round"] >= last  # a row may precede its checkpoint; --resume drops it
    if sig == signal.SIGSTOP:
        return  # resuming is the same either way; once is enough

    # --resume restarts the whole group: two more rounds, then the run ends normally
    more = ("--rounds", str(last + 2), "--eval_every", "100000", "--max_new_tokens", "0", "--resume")
    done = subprocess.run(torchrun(SCRIPT, 2, *flags(tiny_run_files, out, *more)), env=dist_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from round {last}" in done.stdout
    assert checkpoint_round(out) == last + 2
    assert [m["round"] for m in read_metrics(out)] == list(range(0, last + 3))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_group_ends_with_no_gloo_thread_left(tiny_run_files, tmp_path):
    """After main() no gloo worker thread is alive on any rank: nothing keeps the process group past
    destroy_process_group(), so no rank can abort while the interpreter tears such threads down at exit."""
    assert gloo_threads_left(SCRIPT, 2, tmp_path / "threads", *flags(tiny_run_files, tmp_path / "run", "--rounds", "1",
                                               "--max_new_tokens", "0")) == {0: 0, 1: 0}
