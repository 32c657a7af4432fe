"""The one-machine launcher (python -m fedfull_flower.local) with real processes: when the ServerApp dies it exits
non-zero with the ServerApp's own error line (`flwr run` itself exits 0), and it works from a virtual environment
that is not activated (the SuperLink starts flower-superexec by name)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and 127.0.0.1 ports")


def test_a_dead_run_exits_non_zero_with_its_error_line_without_an_activated_venv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env.update(PATH="/usr/bin:/bin", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "fedfull_flower.local", "--nodes", "1", "--folder",
                           str(tmp_path / "fed"), "fedkseed", "--lr", "nan", "--output_dir", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert last.startswith("federation: the run ended finished:failed: "), done.stderr[-2000:]
    assert "--lr nan: must be a finite number > 0" in last, last
