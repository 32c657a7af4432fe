"""A Flower federation on this machine, in one command: a SuperLink and N SuperNodes on 127.0.0.1, one run of a
script through the Flower App (flower/), then every process stopped by its PID.

    python -m fedfull_flower.local --nodes 2 fedkseed --dataset dolly --num_clients 4 -m 0.5 --rounds 2 ...
    python -m fedfull_flower.local --nodes 2 fedcybgd --task sft --download delta --rounds 1 ...

The order is what keeps it deterministic: the SuperLink (with a database file, not :memory:) is up before the
first SuperNode starts, and each SuperNode has registered (the SuperLink logged it) before the next one starts;
the run is submitted once all have. Nothing is installed (--disable-runtime-dependency-installation) and nothing
calls out (FLWR_TELEMETRY_ENABLED=0, FLWR_DISABLE_UPDATE_CHECK=1); each federation has its own FLWR_HOME.
"""
import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

APP = Path(__file__).resolve().parent.parent  # the Flower App folder, flower/ (its own pyproject.toml)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home):
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    # the SuperLink starts `flower-superexec` by name: this Python's bin/ first, so an unactivated venv works too
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("WORLD_SIZE", None)  # never a torchrun group inside a Flower process
    return env


def binary(name):
    """A Flower command from the same environment as this Python (a venv's bin/)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1 under `folder` (FLWR_HOME, the database, logs, the nodes' states).
    gated: docs/flower.md's two-machine recipe on one machine: the SuperLink serves 127.0.0.1 only, on TLS (a CA and
    a certificate for 127.0.0.1 made with openssl, as the recipe does) with SuperNode authentication; each node has a
    key pair registered with `flwr supernode register` and reaches it through fedfull_flower.gate; the run is
    submitted to the SuperLink's own address; `gate_port` is what the nodes dial."""

    def __init__(self, folder, nodes=2, timeout=60.0, gated=False):
        self.folder, self.nodes, self.timeout, self.gated = Path(folder), nodes, timeout, gated
        self.home = self.folder / "flwr-home"
        self.port = free_port()
        self.gate_port = free_port() if gated else None
        self.env = flower_env(self.home)
        # the nodes share this machine's cores: each ClientApp gets its share of threads (unless OMP_NUM_THREADS is
        # set), since N nodes training at once with a thread per core each slow one another down several times
        self.node_env = dict(self.env)
        self.node_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nodes)))
        self.superlink, self.gate, self.supernodes, self.logs = None, None, {}, {}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _spawn(self, name, cmd, env=None):
        log = self.folder / f"{name}.log"
        self.logs[name] = log
        return subprocess.Popen(cmd, env=env or self.env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopped with its children

    def _wait(self, what, ready, proc):
        t = time.time()
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}: see {self.logs}")
            if time.time() - t > self.timeout:
                raise TimeoutError(f"{what} not ready within {self.timeout:g} s: see {self.logs}")
            time.sleep(0.1)

    def activated(self):
        """How many SuperNode registrations the SuperLink has logged."""
        log = self.logs.get("superlink")
        return log.read_text(errors="replace").count("Activated node_id=") if log and log.exists() else 0

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(exist_ok=True)
        if self.gated:  # the recipe: TLS and SuperNode authentication on the SuperLink, which serves 127.0.0.1 only
            self.certificates()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n'
            + (f'root-certificates = "{self.folder / "ca.crt"}"\n' if self.gated else "insecure = true\n"))
        tls = ["--ssl-ca-certfile", str(self.folder / "ca.crt"), "--ssl-certfile", str(self.folder / "superlink.crt"),
               "--ssl-keyfile", str(self.folder / "superlink.key"), "--enable-supernode-auth"]
        self.superlink = self._spawn("superlink", [
            binary("flower-superlink"), *(tls if self.gated else ["--insecure"]), "--host", "127.0.0.1", "--port",
            str(self.port), "--database", str(self.folder / "superlink.db"), "--disable-runtime-dependency-installation"])

        def listening():
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return "Uvicorn running" in self.logs["superlink"].read_text(errors="replace")
            except OSError:
                return False

        self._wait("the SuperLink", listening, self.superlink)
        if self.gated:
            self.gate = self._spawn("gate", [sys.executable, "-m", "fedfull_flower.gate", "--listen",
                                             f"127.0.0.1:{self.gate_port}", "--upstream", f"127.0.0.1:{self.port}",
                                             "--certfile", str(self.folder / "superlink.crt"),
                                             "--keyfile", str(self.folder / "superlink.key"),
                                             "--upstream_ca", str(self.folder / "ca.crt")])
            self._wait("the gate", lambda: "gate: https://" in self.logs["gate"].read_text(errors="replace"),
                       self.gate)
        for p in range(self.nodes):
            self.start_node(p)

    def certificates(self):
        """A CA and a certificate for 127.0.0.1 signed by it: the README's openssl lines with HOST = 127.0.0.1."""
        run = lambda *cmd: subprocess.run(cmd, cwd=self.folder, check=True, capture_output=True, timeout=120)  # noqa
        run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedfull CA",
            "-keyout", "ca.key", "-out", "ca.crt")
        run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "superlink.key",
            "-out", "superlink.csr")
        (self.folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run("openssl", "x509", "-req", "-in", "superlink.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "superlink.crt")

    def start_node(self, p, name=None, partitions=None):
        """Start the SuperNode of partition p (of `partitions`, default one per node) and wait until the SuperLink has
        registered it. name: another name for it (its log, `stop_node`), for a second node claiming p (tests)."""
        before, name = self.activated(), name or p
        link = ["--insecure", "--superlink", f"127.0.0.1:{self.port}"]
        if self.gated:  # through the gate, with a key pair the server's operator registered (`flwr supernode register`)
            key = self.folder / f"node{name}"
            if not key.exists():
                subprocess.run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-q", "-f", str(key)], check=True,
                               timeout=60)
                subprocess.run([binary("flwr"), "supernode", "register", f"{key}.pub", "local"], env=self.env,
                               check=True, capture_output=True, timeout=120)
            link = ["--superlink", f"127.0.0.1:{self.gate_port}", "--root-certificates", str(self.folder / "ca.crt"),
                    "--auth-supernode-private-key", str(key)]
        proc = self._spawn(f"supernode{name}", [
            binary("flower-supernode"), *link, "--port", str(free_port()), "--node-config",
            f'partition-id={p} num-partitions={partitions or self.nodes} state-dir="{self.folder / f"state{name}"}" '
            'trust-server-paths=true'], self.node_env)  # one machine, one operator: the nodes trust the run's paths
        self.supernodes[name] = proc
        self._wait(f"SuperNode {name}", lambda: self.activated() > before, proc)
        return proc

    def stop_node(self, name, sig=signal.SIGKILL):
        proc = self.supernodes.pop(name)
        _stop(proc, sig)

    def submit(self, script, argv, timeout, app=APP, **config):
        """`flwr run` the app (fedfull's, flower/) with the script and its flags; -> the finished `flwr run --stream`
        process."""
        import tomli_w
        overrides = self.folder / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"script": script, "argv": " ".join(_quote(a) for a in argv),
                                            "num-nodes": self.nodes, **config}))
        return subprocess.run([binary("flwr"), "run", str(app), "local", "--stream", "--run-config", str(overrides)],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def last_run(self):
        """-> (status, details) of the latest run the SuperLink knows (`flwr ls --format json`): "finished:completed"
        when the ServerApp returned, "finished:failed" when it died (`flwr run` exits 0 either way)."""
        done = subprocess.run([binary("flwr"), "ls", "local", "--format", "json"], env=self.env, capture_output=True,
                              text=True, timeout=60)
        try:
            runs = json.loads(done.stdout).get("runs", [])
            last = max(runs, key=lambda r: r.get("pending-at") or "")
            return str(last.get("status")), str(last.get("status-details") or "")
        except (ValueError, AttributeError):
            return "unknown", (done.stdout + done.stderr).strip()[-300:]

    def stop(self):
        for p in list(self.supernodes):
            self.stop_node(p, signal.SIGTERM)
        for proc in (self.gate, self.superlink):
            if proc is not None:
                _stop(proc, signal.SIGTERM)
        self.gate = self.superlink = None


def _quote(arg):
    import shlex
    return shlex.quote(str(arg))


def _stop(proc, sig):
    """Signal the process's group (it and the processes it started), then make sure it is gone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


def main(argv=None):
    p = argparse.ArgumentParser(description="Run a fedfull script on a local Flower federation: a SuperLink and "
                                "--nodes SuperNodes on 127.0.0.1, stopped when the run ends.")
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes (client c lives on node c %% nodes)")
    p.add_argument("--folder", default="out/federation", help="FLWR_HOME, logs, database and the nodes' states")
    p.add_argument("--round_timeout", type=float, default=600.0, help="seconds a round waits for a node's reply")
    p.add_argument("--timeout", type=float, default=86400.0, help="seconds the whole run may take")
    p.add_argument("script", choices=["fedkseed", "fedcybgd", "fedavg"])
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the script's own flags")
    a = p.parse_args(argv)
    flags = list(a.flags)
    if "--output_dir" in flags:  # the ServerApp runs in Flower's folder: make the path absolute
        i = flags.index("--output_dir") + 1
        flags[i] = str(Path(flags[i]).resolve())
    else:
        flags += ["--output_dir", str(Path(f"out/{a.script}").resolve())]
    with LocalFederation(Path(a.folder).resolve(), a.nodes) as fed:
        print(f"SuperLink on 127.0.0.1:{fed.port}, {a.nodes} SuperNodes; logs in {fed.folder}", flush=True)
        done = fed.submit(a.script, flags, a.timeout, **{"round-timeout": a.round_timeout})
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        status, details = fed.last_run() if done.returncode == 0 else ("", "")
    if done.returncode == 0 and status != "finished:completed":  # the ServerApp died: say why, in one line
        print(f"federation: the run ended {status}: {server_error(done.stdout + done.stderr) or details}",
              file=sys.stderr)
        return 1
    return done.returncode


def server_error(log):
    """The ServerApp's own error line in a run's streamed log: its one-line `error: ...` for a user's mistake, else
    the last line naming an exception."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    ours = [line[line.index("error: "):] for line in lines if "error: " in line]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return (ours or raised or [""])[-1][:300]


if __name__ == "__main__":
    sys.exit(main())
