"""The Fleet-only gate (fedfull_flower.gate): docs/flower.md's two-machine recipe on 127.0.0.1. The SuperLink serves
127.0.0.1 only, on TLS with SuperNode authentication; the SuperNodes (registered keys) reach it through the gate over
TLS and train; a run submitted through the nodes' address is refused (403) and never starts, while the server
machine's own submission runs; a node whose key is not registered never joins."""
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from test_fedkseed import argv, dolly, tiny_dir  # noqa: F401  (fixtures)

pytest.importorskip("flwr")
from fedfull_flower import gate  # noqa: E402
from fedfull_flower.local import LocalFederation, binary  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and 127.0.0.1 ports")


class Upstream(BaseHTTPRequestHandler):
    """A stand-in SuperLink: answers every request with its path and body length."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def answer(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = f"{self.command} {self.path} {len(self.rfile.read(n))} {self.headers.get('flwr-signature')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer


@pytest.fixture
def gate_on_a_stand_in(unused=None):
    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    ready = threading.Event()
    sock = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # a free port
    port = sock.server_address[1]
    sock.server_close()
    threading.Thread(target=gate.serve, args=(f"127.0.0.1:{port}", f"127.0.0.1:{up.server_address[1]}"),
                     kwargs={"max_body": 1000, "ready": ready}, daemon=True).start()
    ready.wait(10)
    yield port
    up.shutdown()


def ask(port, method, path, body=b"", headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, r.read().decode()


@pytest.mark.parametrize("method, path", [("POST", "/v1/control/start-run"), ("POST", "/v1/runtime/acquire-task"),
                                          ("GET", "/docs"), ("POST", "/v1/fleet/../control/start-run"),
                                          ("POST", "/v1/fleet/pull-messages?x=1"), ("PUT", "/v1/fleet/push-object"),
                                          ("GET", "/v1/fleet/get-run")])
def test_the_gate_refuses_everything_but_the_fleet_api(gate_on_a_stand_in, method, path):
    status, body = ask(gate_on_a_stand_in, method, path, b"x")
    assert status == 403 and "only the Fleet API" in body


def test_the_gate_forwards_fleet_requests_unchanged_and_bounds_their_size(gate_on_a_stand_in):
    status, body = ask(gate_on_a_stand_in, "POST", "/v1/fleet/push-object", b"y" * 1000, {"flwr-signature": "s1"})
    assert status == 200 and body == "POST /v1/fleet/push-object 1000 s1"  # the node's signed headers pass
    assert ask(gate_on_a_stand_in, "GET", "/health")[0] == 200
    assert ask(gate_on_a_stand_in, "POST", "/v1/fleet/push-object", b"y" * 1001)[0] == 413


def test_the_recipe_refuses_a_run_submitted_through_the_nodes_address(tiny_dir, dolly, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with LocalFederation(tmp_path / "fed", nodes=2, gated=True) as fed:
            flags = argv(tiny_dir, dolly, tmp_path / "out", "--rounds", "2", "--rouge_samples", "0")
            done = fed.submit("fedkseed", flags, 600)
            status = fed.last_run()
            assert done.returncode == 0 and status[0] == "finished:completed", done.stdout[-2000:] + done.stderr[-2000:]
            # a client machine's operator: the CA it was given, the address its node dials
            config = fed.home / "config.toml"
            config.write_text(config.read_text() + f'\n[superlink.nodes]\naddress = "127.0.0.1:{fed.gate_port}"\n'
                              f'root-certificates = "{fed.folder / "ca.crt"}"\n')
            attempt = subprocess.run([binary("flwr"), "run", str(Path(gate.__file__).parent.parent), "nodes"],
                                     env=fed.env, capture_output=True, text=True, timeout=120)
            runs = subprocess.run([binary("flwr"), "ls", "local", "--format", "json"], env=fed.env,
                                  capture_output=True, text=True, timeout=60)
            gate_log = fed.logs["gate"].read_text()
            # a node whose key nobody registered: it dials the gate with the CA, and is never activated
            before = fed.activated()
            subprocess.run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-f", str(fed.folder / "stranger")],
                           check=True, timeout=60)
            stranger = fed._spawn("stranger", [binary("flower-supernode"), "--superlink", f"127.0.0.1:{fed.gate_port}",
                                               "--root-certificates", str(fed.folder / "ca.crt"),
                                               "--auth-supernode-private-key", str(fed.folder / "stranger"),
                                               "--node-config", "partition-id=0 num-partitions=2"], fed.node_env)
            time.sleep(15)
            joined = fed.activated() - before
            os.killpg(stranger.pid, signal.SIGKILL)
    finally:
        torch.set_num_threads(threads)
    assert "403" in attempt.stdout + attempt.stderr, attempt.stdout[-2000:] + attempt.stderr[-2000:]
    assert runs.stdout.count('"run-id"') == 1, runs.stdout  # only the server's own run exists
    assert "refused POST '/v1/control/start-run'" in gate_log
    rows = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all('"dropped": []' in r for r in rows[1:])  # both nodes trained, through the gate
    assert joined == 0
