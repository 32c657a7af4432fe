"""The small pure functions of bench/sweep_fedkseed.py, against hand-written values."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("flags, forwards", [
    ([], 2), (["--estimator", "two_point"], 2), (["--estimator", "one_sided"], 2),
    (["--estimator", "one_sided", "--directions", "4"], 5), (["--lr", "1e-6", "--estimator", "one_sided",
                                                             "--directions", "8"], 9),
    (["--estimator", "fzoo", "--directions", "8"], 9)])
def test_forwards_per_step(flags, forwards):
    assert load("sweep_fedkseed").forwards_per_step(flags) == forwards
