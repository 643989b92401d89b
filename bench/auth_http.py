#!/usr/bin/env python3
"""A tiny nginx ``auth_http`` responder: every IMAP login goes to one backend.

nginx's mail proxy asks an HTTP service where a user's mail is (``Auth-User``,
``Auth-Pass``, ``Auth-Protocol`` request headers) and connects to the
``Auth-Server``/``Auth-Port`` of the answer, where the backend checks the password
itself.  This responder answers every request with the one backend it was given,
so that nginx can be measured beside the other proxies (bench/bench_peers.py).

    python bench/auth_http.py --server 127.0.0.2:1143 [--listen 127.0.0.1:0]

prints ``listening on HOST:PORT`` on stdout once it accepts requests.  Loopback only.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_hostport(text: str) -> tuple[str, int]:
    """'127.0.0.2:1143' -> ('127.0.0.2', 1143); the host must be a loopback IP address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host}: only loopback addresses")
    return host, int(port)


def make_handler(server_host: str, server_port: int) -> type[BaseHTTPRequestHandler]:
    """The request handler class that sends every login to *server_host*:*server_port*."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # nginx's auth_http speaks 1.0, one request per connection
        answered = 0

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.headers.get("Auth-User") is None:
                self._reply(["Auth-Status: Invalid login or password", "Auth-Wait: 1"])
                return
            type(self).answered += 1
            self._reply(["Auth-Status: OK", f"Auth-Server: {server_host}", f"Auth-Port: {server_port}"])

        def _reply(self, headers: list[str]) -> None:
            self.send_response(200)
            for h in headers:
                name, _, value = h.partition(": ")
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - one line per login: too much
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", required=True, help="the IMAP backend every user goes to, HOST:PORT")
    ap.add_argument("--listen", default="127.0.0.1:0", help="where to answer nginx (127.0.0.1:0 = a free port)")
    args = ap.parse_args(argv)
    try:
        backend = parse_hostport(args.server)
        listen = parse_hostport(args.listen)
    except ValueError as e:
        ap.error(str(e))
    httpd = ThreadingHTTPServer(listen, make_handler(*backend))
    httpd.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = httpd.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
