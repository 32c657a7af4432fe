"""Launching a script under torchrun from a test, and losing one of its ranks on purpose (both dist test files)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def dist_env():
    """One thread per process on both sides: bitwise equality of a 1-process and a 2-rank run needs it."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), script, *args]


def rank_pid(agent_pid, rank):
    """The worker of `rank` among the launcher's children (its environment has RANK=<rank>)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def lose_rank(agent, ready, sig, timeout):
    """Once `ready()` (a complete round is on disk), send `sig` to rank 1 of the torchrun `agent` and wait for
    rank 0 to exit (at most timeout + 30 s). Returns (seconds rank 0 took to stop, the agent's stderr)."""
    try:
        deadline = time.time() + 120
        while not ready():
            assert agent.poll() is None and time.time() < deadline, agent.stderr.read() if agent.poll() else "slow"
            time.sleep(0.1)
        victim = rank_pid(agent.pid, 1)
        assert victim is not None
        os.kill(victim, sig)
        stopped = time.time()
        rank0 = rank_pid(agent.pid, 0)
        while rank0 is not None and Path(f"/proc/{rank0}").exists() and time.time() - stopped < timeout + 30:
            try:
                if Path(f"/proc/{rank0}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # exited; the launcher has not reaped it yet
            except OSError:
                break
            time.sleep(0.1)
        waited = time.time() - stopped
        if sig == signal.SIGSTOP:
            os.kill(victim, signal.SIGCONT)  # a stopped process cannot act on the launcher's SIGTERM; let it
        _, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    return waited, err


def gloo_threads_left(script, nproc, report, *args):
    """Run `script`'s main() under torchrun (tests/gloo_threads_probe.py) -> {rank: gloo threads alive after it}.
    `report`: a new folder for the probe's per-rank files."""
    Path(report).mkdir()
    probe = str(Path(__file__).resolve().parent / "gloo_threads_probe.py")
    cmd = torchrun(probe, nproc, str(report), Path(script).stem, *args)
    done = subprocess.run(cmd, env=dist_env(), cwd=Path(script).parent, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return {int(f.name[len("rank"):]): int(f.read_text()) for f in Path(report).iterdir()}
