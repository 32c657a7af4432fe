"""Run fedkseed.py's or fedcybgd.py's main() in a torchrun worker, then print how many gloo threads are left.

    python -m torch.distributed.run --nproc_per_node 2 tests/gloo_threads_probe.py REPORT_DIR fedkseed <flags>

Each rank writes the count to REPORT_DIR/rank<RANK> (one file each: the ranks' output streams interleave).

main() ends the process group; if anything still held it, gloo's worker threads ('pt_gloo_runloop',
'gloo_tcp_loop') would outlive it and be torn down during interpreter exit, which can abort the process."""
import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
report, script = Path(sys.argv[1]), importlib.import_module(sys.argv[2])
script.main(sys.argv[3:])
names = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
(report / f"rank{os.environ['RANK']}").write_text(str(sum("gloo" in n for n in names)))
