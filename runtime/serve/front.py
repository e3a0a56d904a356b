"""The HTTP front: a bounded reverse proxy before tritonserver's HTTP port.

Why: tritonserver 2.51 (the one bundled in nvidia-pytriton) has no option to bound an HTTP request
body, and its HTTP library (libevhtp) parses a body sent as ``application/x-www-form-urlencoded``
(curl's default for ``-d``) into query arguments on the HTTP thread's stack: a body of about half
the thread stack (RLIMIT_STACK, 8 MiB here: ~4,180,000 bytes) overflows it and the whole server
dies on SIGSEGV, on any endpoint (``/v2/logging`` too). Measured: the threshold moves with
``ulimit -s`` (2,100,000 bytes at 4 MiB, 8,400,000 at 16 MiB) and does not exist for
``application/json`` bodies.

So the front, listening on the public HTTP port, forwards to Triton on a private loopback port
and, per request:

- refuses a body over ``max_request_bytes`` with 413 (read from ``Content-Length``, before the
  body is read; a request without one is refused with 411: Triton's KServe clients always send it),
- refuses a header block over :data:`MAX_HEAD_BYTES` with 431,
- drops a form-urlencoded ``Content-Type`` (no Triton endpoint reads it; it is what crashes it),
- answers ``Expect: 100-continue`` itself.

Responses are relayed byte for byte. gRPC is not behind the front (a gRPC proxy is another
matter); Triton's gRPC server has no such crash and is bounded by the model (see ``model.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from dataclasses import dataclass

from kandinsky_trt.runtime.serve.limits import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 64 * 1024
_DISCARD_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, then close


@dataclass(frozen=True)
class FrontConfig:
    host: str
    port: int  # public; 0 = any free port
    upstream_port: int  # tritonserver's HTTP port on 127.0.0.1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


class Refusal(Exception):
    def __init__(self, status: str, message: str, discard: int = 0) -> None:
        super().__init__(message)
        self.status, self.discard = status, discard


def _respond(writer: asyncio.StreamWriter, status: str, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)


def _parse_head(head: bytes, limit: int) -> tuple[bytes, int, bool]:
    """The head to forward, the body length, whether the client expects 100-continue."""
    lines = head[:-4].split(b"\r\n")
    kept, length, expect = [lines[0]], None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key, value = name.strip().lower(), value.strip()
        if key == b"transfer-encoding":
            raise Refusal("411 Length Required", "request body: expected a Content-Length header, found "
                                                 f"Transfer-Encoding: {value.decode('latin-1')}")
        if key == b"content-length":
            if not value.isdigit() or (length is not None and int(value) != length):
                raise Refusal("400 Bad Request", f"Content-Length: expected one integer, found {value!r}")
            length = int(value)
        if key == b"expect" and value.lower() == b"100-continue":
            expect = True
            continue
        if key == b"content-type" and value.lower().startswith(b"application/x-www-form-urlencoded"):
            continue  # Triton never needs it; libevhtp would parse the body on its stack
        kept.append(line)
    length = length or 0
    if length > limit:
        raise Refusal("413 Payload Too Large", f"request body: expected at most {limit} bytes (this server's "
                                               f"limit), found {length}", discard=0 if expect else length)
    return b"\r\n".join(kept) + b"\r\n\r\n", length, expect


class HttpFront:
    """Runs the proxy on its own event-loop thread; ``start()`` binds (or raises), ``stop()`` ends it."""

    def __init__(self, config: FrontConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server = None
        self.port = config.port

    def start(self) -> "HttpFront":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.host, self.config.port))  # OSError here, in the caller: port taken
        self.port = sock.getsockname()[1]
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._connection, sock=sock, limit=MAX_HEAD_BYTES, backlog=256))
        self._thread = threading.Thread(target=self._loop.run_forever, name="kandinsky-http-front", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return

        async def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple | None = None
        pump = None
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    raise Refusal("431 Request Header Fields Too Large",
                                  f"request head: expected at most {MAX_HEAD_BYTES} bytes, found more") from None
                forward, length, expect = _parse_head(head, self.config.max_request_bytes)
                if expect:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = await reader.readexactly(length)
                if upstream is None:
                    upstream = await self._open_upstream()
                    pump = asyncio.ensure_future(self._pump(upstream[0], writer))
                upstream[1].write(forward + body)
                await upstream[1].drain()
        except Refusal as refusal:
            await self._refuse(reader, writer, refusal)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            if pump is not None:
                pump.cancel()
            for w in ([upstream[1]] if upstream else []) + [writer]:
                w.close()

    async def _open_upstream(self) -> tuple:
        try:
            return await asyncio.open_connection("127.0.0.1", self.config.upstream_port)
        except OSError as err:
            raise Refusal("503 Service Unavailable", f"server: expected tritonserver to accept the request, "
                                                     f"found it not answering ({err.strerror or err})") from None

    async def _refuse(self, reader, writer, refusal: Refusal) -> None:
        log.info("refused a request: %s", refusal)
        _respond(writer, refusal.status, str(refusal))
        left = min(refusal.discard, _DISCARD_BYTES)
        try:
            await writer.drain()
            while left > 0:  # read what the client is still sending, so it gets the answer, not a reset
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), timeout=10)
                if not chunk:
                    break
                left -= len(chunk)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass

    @staticmethod
    async def _pump(upstream: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await upstream.read(1 << 16):
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
