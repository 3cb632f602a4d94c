"""`artifacts serve`: model files over HTTPS with Range, for devices to download and resume.

TLS with a server certificate from the fleet CA, and client certificates from the same CA
required: only enrolled devices (and controllers) can fetch. A request names one file of
the served directory by its plain name; anything else (another path, a symlink, a dot
file, a name with `..`) is 404 without touching the file system beyond one `lstat`.
Range requests (`bytes=N-`, `bytes=N-M`) get 206 so an interrupted download resumes where
it stopped; an unsatisfiable range gets 416.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

log = logging.getLogger(__name__)
_NAME = re.compile(r"^/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")
_RANGE = re.compile(r"^bytes=(\d{1,19})-(\d{0,19})$")
BLOCK = 256 * 1024


class _Handler(BaseHTTPRequestHandler):
    directory: ClassVar[Path]
    server_version = "edge-agent-artifacts"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a silent client keeps its connection

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.client_address[0], format % args)

    def _file(self) -> tuple[int, Path] | None:
        m = _NAME.match(self.path.split("?", 1)[0])
        if m is None or ".." in m.group(1):
            return None
        path = self.directory / m.group(1)
        try:
            st = path.lstat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):  # symlinks and anything not a plain file
            return None
        return st.st_size, path

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        found = self._file()
        if found is None:
            self.send_error(404)
            return
        size, path = found
        start, end = 0, size - 1
        header = self.headers.get("Range")
        status = 200
        if header is not None:
            m = _RANGE.match(header.strip())
            if m is None or int(m.group(1)) >= size or (m.group(2) and
                                                         int(m.group(2)) < int(m.group(1))):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(size - 1, int(m.group(2))) if m.group(2) else size - 1
            status = 206
            log.info("%s %s: range from byte %d", self.client_address[0], path.name, start)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            left = end - start + 1
            os.lseek(fd, start, os.SEEK_SET)
            while left > 0:
                data = os.read(fd, min(BLOCK, left))
                if not data:
                    break
                self.wfile.write(data)
                left -= len(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # the device went away; it resumes with a Range request
        finally:
            os.close(fd)


def make_server(directory: Path, host: str, port: int, cert: Path, key: Path,
               ca: Path) -> ThreadingHTTPServer:
    """The HTTPS server (not started): serve_forever() runs it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    handler = type("ArtifactHandler", (_Handler,), {"directory": directory.resolve()})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    # The handshake happens in the request's thread (on its first read), so a client that
    # stalls it holds only its own thread, never the accept loop.
    server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                    do_handshake_on_connect=False)
    return server
