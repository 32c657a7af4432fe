"""The SuperLink's gate: a TLS front that lets the SuperNodes reach the Fleet API and nothing else.

    python -m fedfull_flower.gate --listen 0.0.0.0:9093 --upstream 127.0.0.1:9092 \
        --certfile superlink.crt --keyfile superlink.key --upstream_ca ca.crt

Why. Flower 1.42 serves every SuperLink API on one HTTP port: the Fleet API the SuperNodes use (/v1/fleet/...), the
Control API that submits runs (/v1/control/..., `flwr run`: an App's code then runs on every SuperNode) and the Runtime
API of the ServerApp (/v1/runtime/...). Without OIDC (not in the open-source distribution) the Control API
authenticates no one, so any machine that reaches the port can run code on every node. Bind the SuperLink to
127.0.0.1 and expose this gate instead: it terminates TLS and forwards POST /v1/fleet/<name> (and GET /health) to the
SuperLink, unchanged, headers included (SuperNode authentication signs them); every other request gets 403 here. Run
submission then needs a shell on the server machine. SuperNode authentication (--enable-supernode-auth) needs the
SuperLink itself on TLS: --upstream_ca is the CA the gate checks it against (its certificate must name 127.0.0.1).

It reads a request's body in chunks and streams it on, refusing more than --max_body bytes (413), so one node cannot
make the SuperLink or the gate hold an upload of any size. Standard library only; one thread a connection.
"""
import argparse
import http.client
import re
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLEET = re.compile(r"/v1/fleet/[a-z0-9-]+")  # the Fleet API's routes, no query string, no traversal
CHUNK = 1 << 16
HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer"}


class Gate(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Flower's HTTP client expects
    upstream = ("127.0.0.1", 9092)
    upstream_tls = None  # an ssl.SSLContext that checks the SuperLink's certificate, or None: plain HTTP
    max_body = 1 << 30
    log_requests = False

    def log_message(self, fmt, *args):  # one line per refused request; accepted ones only with --verbose
        if self.log_requests:
            sys.stderr.write(f"gate: {self.client_address[0]} {fmt % args}\n")

    def refuse(self, code, why):
        body = (why + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        sys.stderr.write(f"gate: refused {self.command} {self.path[:120]!r} from {self.client_address[0]}: {why}\n")

    def do_GET(self):
        if self.path == "/health":
            return self.forward(0)
        self.refuse(403, "only the Fleet API is served here")

    def do_POST(self):
        if not FLEET.fullmatch(self.path):
            return self.refuse(403, "only the Fleet API is served here")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self.refuse(411, "a Content-Length is required")
        try:
            n = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self.refuse(400, "a malformed Content-Length")
        if n < 0 or n > self.max_body:
            self.close_connection = True
            return self.refuse(413, f"a body of {n} bytes; this gate takes at most {self.max_body}")
        self.forward(n)

    def do_PUT(self):
        self.refuse(403, "only the Fleet API is served here")

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_PUT

    def forward(self, n):
        """The request to the SuperLink with its body streamed, then the answer back, streamed."""
        up = (http.client.HTTPSConnection(*self.upstream, timeout=600, context=self.upstream_tls) if self.upstream_tls
              else http.client.HTTPConnection(*self.upstream, timeout=600))
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP:
                    up.putheader(k, v)
            up.endheaders()
            left = n
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    raise ConnectionError("the client closed before sending its body")
                up.send(chunk)
                left -= len(chunk)
            answer = up.getresponse()
            self.send_response(answer.status, answer.reason)
            length = answer.getheader("Content-Length")
            for k, v in answer.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            if length is None:
                self.close_connection = True  # no length: the body ends with the connection
            self.end_headers()
            while chunk := answer.read(CHUNK):
                self.wfile.write(chunk)
        except (OSError, http.client.HTTPException) as e:
            self.close_connection = True
            try:
                self.refuse(502, f"the SuperLink did not answer ({type(e).__name__})")
            except OSError:
                pass
        finally:
            up.close()


def serve(listen, upstream, certfile=None, keyfile=None, max_body=1 << 30, verbose=False, ready=None, upstream_ca=None):
    """Run the gate until interrupted. certfile/keyfile None: plain HTTP (tests on 127.0.0.1 only); upstream_ca: the
    SuperLink speaks TLS, with a certificate from that CA."""
    host, port = listen.rsplit(":", 1)
    uhost, uport = upstream.rsplit(":", 1)
    tls = ssl.create_default_context(cafile=upstream_ca) if upstream_ca else None
    handler = type("BoundGate", (Gate,), {"upstream": (uhost, int(uport)), "max_body": max_body,
                                          "log_requests": verbose, "upstream_tls": tls})
    server = ThreadingHTTPServer((host, int(port)), handler)
    server.daemon_threads = True
    if certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"gate: {'https' if certfile else 'http'}://{listen} -> the Fleet API of "
          f"{'https' if upstream_ca else 'http'}://{upstream}", flush=True)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="0.0.0.0:9093", help="address the SuperNodes connect to")
    p.add_argument("--upstream", default="127.0.0.1:9092", help="the SuperLink (flower-superlink --host 127.0.0.1)")
    p.add_argument("--certfile", help="TLS certificate for the listen address (the nodes hold its CA)")
    p.add_argument("--keyfile", help="its private key")
    p.add_argument("--upstream_ca", help="the SuperLink is on TLS (needed by --enable-supernode-auth): its CA")
    p.add_argument("--insecure", action="store_true", help="plain HTTP: only for a test on 127.0.0.1")
    p.add_argument("--max_body", type=int, default=1 << 30, help="bytes a request may carry (default 1 GiB)")
    p.add_argument("--verbose", action="store_true", help="log every request, not only refused ones")
    a = p.parse_args(argv)
    if not a.insecure and not (a.certfile and a.keyfile):
        p.error("give --certfile and --keyfile (TLS), or --insecure for a test on 127.0.0.1")
    try:
        serve(a.listen, a.upstream, None if a.insecure else a.certfile, a.keyfile, a.max_body, a.verbose,
              upstream_ca=a.upstream_ca)
    except KeyboardInterrupt:
        return 0
    except (OSError, ssl.SSLError) as e:
        print(f"gate: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

