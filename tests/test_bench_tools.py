"""The small pure functions of bench/sweep_fedkseed.py and bench/dolly_long.py, against hand-written values."""
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


def test_reach_interpolates_on_each_axis():
    long = load("dolly_long")
    curve = [(0, 0.0, 0, 2.0), (100, 10.0, 1000, 1.8), (200, 30.0, 3000, 1.6)]  # (examples, seconds, bytes, loss)
    assert long.reach(curve, 1.7, 0) == pytest.approx(150)
    assert long.reach(curve, 1.7, 1) == pytest.approx(20.0)
    assert long.reach(curve, 1.7, 2) == pytest.approx(2000)
    assert long.reach(curve, 1.8, 0) == pytest.approx(100)
    assert long.reach(curve, 1.5, 0) is None


def test_write_section_replaces_only_its_block(tmp_path):
    long = load("dolly_long")
    page = tmp_path / "RESULTS.md"
    page.write_text("# Results\n\ntable\n\n## MRPC\n\nrows\n")
    long.write_section(page, [long.BEGIN, "first", long.END])
    assert page.read_text() == f"# Results\n\ntable\n\n{long.BEGIN}\nfirst\n{long.END}\n\n## MRPC\n\nrows\n"
    long.write_section(page, [long.BEGIN, "second", long.END])
    assert page.read_text() == f"# Results\n\ntable\n\n{long.BEGIN}\nsecond\n{long.END}\n\n## MRPC\n\nrows\n"


def test_loss_at_interpolates_and_stops_at_the_end():
    long = load("dolly_long")
    curve = [(0, 0.0, 0, 2.0), (100, 10.0, 1000, 1.8), (200, 30.0, 3000, 1.6)]
    assert long.loss_at(curve, 50, 0) == pytest.approx(1.9)
    assert long.loss_at(curve, 20.0, 1) == pytest.approx(1.7)
    assert long.loss_at(curve, 250, 0) is None
