"""A local HTTP server on 127.0.0.1 that serves archives and misbehaves on request (for download tests)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from email.utils import formatdate


class ArchiveServer:
    """A threaded HTTP server on 127.0.0.1 serving byte strings, with per-file misbehaviour.

    ``add(name, data, fail=[503, 503], drop_after=N, drop_times=1, ignore_range=True, retry_after="0")``:
    the first requests answer the statuses in ``fail``; the next ``drop_times`` responses announce the
    full length but close the connection after ``drop_after`` bytes; ``ignore_range`` answers every
    Range request with the whole file (HTTP 200). Every request is recorded as (name, Range header).
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.rules: dict[str, dict] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                name = self.path.split("?", 1)[0].lstrip("/")
                range_header = self.headers.get("Range")
                with server.lock:
                    server.requests.append((name, range_header))
                    rule = server.rules.setdefault(name, {})
                    failure = rule["fail"].pop(0) if rule.get("fail") else None
                    drop = None
                    if rule.get("drop_times", 0) > 0 and failure is None:
                        rule["drop_times"] -= 1
                        drop = rule["drop_after"]
                if failure is not None:
                    self.send_response(failure)
                    if rule.get("retry_after") is not None:
                        self.send_header("Retry-After", rule["retry_after"])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if range_header and not rule.get("ignore_range"):
                    start = int(range_header.split("=", 1)[1].split("-", 1)[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", '"' + hashlib.md5(data).hexdigest() + '"')
                self.send_header("Last-Modified", formatdate(1_600_000_000, usegmt=True))
                self.end_headers()
                if drop is not None:
                    self.wfile.write(body[:drop])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, name: str, data: bytes, **rule) -> str:
        self.files[name] = data
        self.rules[name] = dict(rule)
        return f"{self.base}/{name}"

    def ranges(self, name: str) -> list[str | None]:
        return [r for n, r in self.requests if n == name]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
