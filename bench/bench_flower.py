"""A FedKSeed round over Flower against the same round in one process, and what Flower's framing adds per message.

    python bench/bench_flower.py                   # SmolLM2 on Dolly (data/dolly), 2 SuperNodes, 2 rounds
    python bench/bench_flower.py --local_steps 50  # any fedkseed.py flag after the bench's own

1. Framing: the Message our transport sends (flower/fedfull_flower/transport.py) for a download and an upload of FedKSeed's sizes,
   serialized as Flower serializes it (every nested object's `deflate()`), minus the payload bytes the ledger
   counts. HTTP and TLS framing come on top and are not measured here.
2. Time: the same flags run once in one process and once on a local federation (a SuperLink and --nodes
   SuperNodes on 127.0.0.1); per round, the server's wall time from metrics.jsonl, and from the nodes' logs where a
   node's time went: loading the model and data (once per message: Flower starts a ClientApp per message), and
   each client's replay + steps. Run it alone: the 2 cores are shared by every process of the federation.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FLAGS = ["--dataset", "dolly", "--num_clients", "4", "-m", "0.5", "--rounds", "2", "--local_steps", "20", "--lr",
         "2e-6", "--zo_eps", "1e-3", "-K", "1024", "--max_length", "256", "--eval_samples", "8", "--eval_every", "2",
         "--rouge_samples", "0", "--device", "cpu"]


def framing():
    """-> [(what, payload bytes, serialized message bytes)] for FedKSeed-sized messages."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 2**63 - 1, 2**63 - 1, 2**63 - 1  # 8-byte ids

    import fedkseed as fk
    from fedfull_flower.transport import MESSAGE_KEY

    def size(msg):
        return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())

    out = []
    for K, steps in ((1024, 200), (4096, 200)):
        down_bytes, up_bytes = fk.longest_messages(K, False, steps)
        down, up = b"\x00" * down_bytes, b"\x00" * up_bytes
        argv = " ".join(FLAGS)
        m = Message(RecordDict({MESSAGE_KEY: ConfigRecord({
            "script": "fedkseed", "argv": argv, "key": "0" * 16, "round": 1, "clients": [3], "downloads": [down],
            "held": ["12"], "after": ["13"]})}), dst_node_id=1, message_type="train")
        out.append((f"download, dense A at K={K}, one client (with the run's flags, {len(argv)} B)", len(down), size(m)))
        r = Message(RecordDict({MESSAGE_KEY: ConfigRecord({
            "clients": [3], "uploads": [up], "errors": [""],
            "stats": json.dumps([{"loss": 2.345678, "sync_seconds": 1.234567, "train_seconds": 12.345678}])})}),
            dst_node_id=1, message_type="train")
        out.append((f"upload, {steps} steps at K={K}, one client", len(up), size(r)))
    return out


def rounds(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["seconds"], r.get("client_seconds")) for r in rows[1:]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=2)
    a, extra = p.parse_known_args()
    flags = FLAGS + extra
    print("== Flower framing per message (serialized Message minus payload; HTTP/TLS not included)")
    for what, payload, total in framing():
        print(f"{what}: payload {payload:,} B, message {total:,} B, framing {total - payload:,} B")

    from fedfull_flower.local import LocalFederation
    work = Path(tempfile.mkdtemp(prefix="bench_flower_"))
    print(f"\n== time, flags: {' '.join(flags)}")
    t = time.time()
    done = subprocess.run([sys.executable, str(ROOT / "fedkseed.py"), *flags, "--output_dir", str(work / "one")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"one process: {time.time() - t:.1f} s in all")
    one = rounds(work / "one")
    t = time.time()
    with LocalFederation(work / "fed", nodes=a.nodes, timeout=120) as fed:
        started = time.time() - t
        done = fed.submit("fedkseed", flags + ["--output_dir", str(work / "flower")], 7200)
        assert done.returncode == 0, done.stdout + done.stderr
        logs = [fed.logs[f"supernode{p}"].read_text(errors="replace") for p in range(a.nodes)]
    print(f"Flower: {time.time() - t:.1f} s in all ({started:.1f} s to start the SuperLink and {a.nodes} SuperNodes)")
    flower = rounds(work / "flower")
    for (r, s1, c1), (_, s2, c2) in zip(one, flower):
        print(f"round {r}: one process {s1:.1f} s, Flower {s2:.1f} s ({s2 / s1:.2f}x); clients' replay + steps "
              f"summed: {c1:.1f} s vs {c2:.1f} s")
    loads = [float(x) for log in logs for x in re.findall(r"model and data loaded in ([0-9.]+) s", log)]
    work_s = [float(x) for log in logs for x in re.findall(r"client \d+ done in ([0-9.]+) s", log)]
    if loads:
        print(f"nodes: {len(loads)} messages, model and data loaded in {sum(loads) / len(loads):.1f} s a message "
              f"(median {sorted(loads)[len(loads) // 2]:.1f}); {len(work_s)} client rounds of replay + steps, "
              f"{sum(work_s) / max(1, len(work_s)):.1f} s each")
    same = subprocess.run([sys.executable, "-c", "import sys; from safetensors.torch import load_file as l; "
                           "a, b = l(sys.argv[1]), l(sys.argv[2]); print(all((a[k] == b[k]).all() for k in a))",
                           str(work / "one/model/model.safetensors"), str(work / "flower/model/model.safetensors")],
                          capture_output=True, text=True).stdout.strip()
    print(f"exported models equal bit for bit: {same}  (outputs in {work})")


if __name__ == "__main__":
    main()
