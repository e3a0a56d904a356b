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
- answers ``Expect: 100-continue`` itself,
- gives it a fresh cancel token (header ``kandinsky-cancel-token``; the client's own is dropped) and,
  when the client's connection closes while its response is pending, marks the token cancelled until
  Triton has answered (see ``cancel.py``: the model stops at the next step boundary),
- answers 503 (retryable: a balancer sends it to another replica) every infer request still pending
  when the stub watchdog reports the model process dead (:meth:`HttpFront.set_unavailable`), and
  closes its connection: a step-scheduled model answers through response senders that die with
  its process, and Triton 2.51 never answers those requests (measured: the clients waited until
  their own timeouts); a request Triton is already relaying an answer to is left to finish.

Bounds (``limits.py``): at most ``max_connections`` connections open at once and
``max_buffered_bytes`` of request bodies held at once (503 beyond either); a request head (or an
idle keep-alive connection) must complete within ``head_timeout_s`` (closed otherwise) and its body
within ``body_timeout_s`` (408). Responses are relayed byte for byte; the front reads their heads
(``Content-Length``) only to know when each request has been answered. gRPC is not behind the front
(a gRPC proxy is another matter); Triton's gRPC server has no such crash, is bounded by the model
(see ``model.py``) and reports cancellation itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from collections import deque
from dataclasses import dataclass

from kandinsky_trt.runtime.serve.cancel import MARK_MAX_AGE_S, TOKEN_HEADER, CancelMarks, new_token
from kandinsky_trt.runtime.serve.limits import (BODY_TIMEOUT_S, DEFAULT_MAX_BUFFERED_BYTES, DEFAULT_MAX_CONNECTIONS,
                                                 DEFAULT_MAX_REQUEST_BYTES, HEAD_TIMEOUT_S)

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 64 * 1024
_DISCARD_BYTES = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body, then close


@dataclass(frozen=True)
class FrontConfig:
    host: str
    port: int  # public; 0 = any free port
    upstream_port: int  # tritonserver's HTTP port on 127.0.0.1
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    cancel_dir: str | None = None  # where disconnects are marked (None: no HTTP cancellation)
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    head_timeout_s: float = HEAD_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S


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
        if key == TOKEN_HEADER.encode():
            continue  # only the front names a request's token
        if key == b"content-type" and value.lower().startswith(b"application/x-www-form-urlencoded"):
            continue  # Triton never needs it; libevhtp would parse the body on its stack
        kept.append(line)
    length = length or 0
    if length > limit:
        raise Refusal("413 Payload Too Large", f"request body: expected at most {limit} bytes (this server's "
                                               f"limit), found {length}", discard=0 if expect else length)
    return b"\r\n".join(kept) + b"\r\n\r\n", length, expect


def _needs_the_model(head: bytes) -> bool:
    """Infer and readiness requests: while the model reloads the front answers them 503 itself, so
    readiness seen through the front turns true only once the front forwards infer again."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    return path.endswith(b"/infer") or path.endswith(b"/ready")


class HttpFront:
    """Runs the proxy on its own event-loop thread; ``start()`` binds (or raises), ``stop()`` ends it."""

    def __init__(self, config: FrontConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server = None
        self.port = config.port
        self._open = 0  # connections being served (the event loop's thread only)
        # Set (by the stub watchdog's thread) while the model reloads: infer and readiness requests
        # get 503 with this reason (not Triton's "unknown model" 400), so a balancer retries them
        # elsewhere, and ready turns true only when infer is forwarded again.
        self.unavailable: str | None = None
        self._buffered = 0  # request-body bytes held
        self._exchanges: set[_Exchange] = set()  # connections being served (the event loop's thread only)

    def set_unavailable(self, reason: str | None) -> None:
        """``reason`` (one line) refuses infer requests with 503 until called again with None, and
        answers the infer requests pending now with 503 too (their model process died)."""
        self.unavailable = reason
        if reason is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._fail_pending, reason)

    def _fail_pending(self, reason: str) -> None:
        failed = sum(exchange.fail_pending(reason) for exchange in list(self._exchanges))
        if failed:
            log.warning("answered %d pending infer request(s) 503: %s", failed, reason)

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
        if self._open >= self.config.max_connections:
            await self._refuse(reader, writer, Refusal(
                "503 Service Unavailable", f"connections: expected at most {self.config.max_connections} open at "
                                           f"once (this server's limit), found that many; retry later"), linger=1.0)
            writer.close()
            return
        self._open += 1
        try:
            _no_delay(writer)
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): the connection ends with the server
        finally:
            self._open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = _Exchange(writer, CancelMarks(self.config.cancel_dir) if self.config.cancel_dir else None)
        upstream: tuple | None = None
        pump = None
        self._exchanges.add(exchange)
        try:
            while True:
                try:
                    head = await self._read_head(reader, exchange)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError):
                    return  # the client closed (or stayed idle / too slow): nothing more to read
                forward, length, expect = _parse_head(head, self.config.max_request_bytes)
                if self.unavailable and _needs_the_model(head):
                    raise Refusal("503 Service Unavailable", self.unavailable, discard=0 if expect else length)
                if expect:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                async with self._budget(length, expect):
                    body = await self._read_body(reader, length)
                    if upstream is None:
                        upstream = await self._open_upstream()
                        pump = exchange.pump = asyncio.ensure_future(self._pump(upstream[0], exchange))
                    upstream[1].write(exchange.forward(forward) + body)
                    del body
                    await upstream[1].drain()
        except Refusal as refusal:
            await self._refuse(reader, writer, refusal)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._exchanges.discard(exchange)
            await exchange.client_gone(pump)
            for w in ([upstream[1]] if upstream else []) + [writer]:
                w.close()

    async def _read_head(self, reader: asyncio.StreamReader, exchange: "_Exchange") -> bytes:
        """The next request head; idle or slow beyond ``head_timeout_s`` raises TimeoutError, except
        while a response is pending (the client waits for it: its close is what we watch for)."""
        read = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=self.config.head_timeout_s)
                if done:
                    try:
                        return read.result()
                    except asyncio.LimitOverrunError:
                        raise Refusal("431 Request Header Fields Too Large",
                                      f"request head: expected at most {MAX_HEAD_BYTES} bytes, found more") from None
                if not exchange.pending:
                    raise asyncio.TimeoutError
        finally:
            read.cancel()

    async def _read_body(self, reader: asyncio.StreamReader, length: int) -> bytes:
        try:
            return await asyncio.wait_for(reader.readexactly(length), self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise Refusal("408 Request Timeout", f"request body: expected {length} bytes within "
                                                 f"{self.config.body_timeout_s:g} s, found them slower") from None

    def _budget(self, length: int, expect: bool) -> "_Budget":
        if self._buffered + length > self.config.max_buffered_bytes:
            raise Refusal("503 Service Unavailable",
                          f"request body: expected room in this server's {self.config.max_buffered_bytes} bytes for "
                          f"bodies in flight, found {self._buffered} held; retry later",
                          discard=0 if expect else length)
        return _Budget(self, length)

    async def _open_upstream(self) -> tuple:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.config.upstream_port)
            _no_delay(writer)
            return reader, writer
        except OSError as err:
            raise Refusal("503 Service Unavailable", f"server: expected tritonserver to accept the request, "
                                                     f"found it not answering ({err.strerror or err})") from None

    @staticmethod
    async def _refuse(reader, writer, refusal: Refusal, linger: float = 10.0) -> None:
        log.info("refused a request: %s", refusal)
        _respond(writer, refusal.status, str(refusal))
        left = min(refusal.discard, _DISCARD_BYTES) if linger >= 10 else 1 << 16
        try:
            await writer.drain()
            while left > 0:  # read what the client is still sending, so it gets the answer, not a reset
                chunk = await asyncio.wait_for(reader.read(min(left, 1 << 20)), timeout=linger)
                if not chunk:
                    break
                left -= len(chunk)
        except (ConnectionError, asyncio.TimeoutError, OSError):
            pass

    @staticmethod
    async def _pump(upstream: asyncio.StreamReader, exchange: "_Exchange") -> None:
        """Relay Triton's responses; after each complete one, its request is answered (unmarked)."""
        try:
            while True:
                head = await upstream.readuntil(b"\r\n\r\n")
                status, length = _response_length(head, exchange.method())
                if length is None:  # no Content-Length (Triton always sends one): relay until it closes
                    await exchange.send(head)
                    while chunk := await upstream.read(1 << 16):
                        await exchange.send(chunk)
                    return
                pending = head  # sent with the body's first chunk: one segment for a small answer
                exchange.relaying = True
                while length > 0:
                    chunk = await upstream.read(min(length, 1 << 16))
                    if not chunk:
                        return
                    length -= len(chunk)
                    await exchange.send(pending + chunk)
                    pending = b""
                if pending:
                    await exchange.send(pending)
                exchange.relaying = False
                if status >= 200 and exchange.answered():
                    return
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            if not exchange.gone:
                exchange.writer.close()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY: a request or answer written in two parts must not wait for a delayed ACK (40 ms)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _response_length(head: bytes, method: bytes) -> tuple[int, int | None]:
    """A response head's status and body length (None: until the connection closes)."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"transfer-encoding":
            return status, None
        if key == b"content-length" and value.strip().isdigit():
            return status, int(value.strip())
    return status, None


class _Budget:
    """Holds ``length`` bytes of the front's body budget while a body is read and forwarded."""

    def __init__(self, front: HttpFront, length: int) -> None:
        self.front, self.length = front, length

    async def __aenter__(self) -> None:
        self.front._buffered += self.length

    async def __aexit__(self, *exc) -> None:
        self.front._buffered -= self.length


class _Exchange:
    """One client connection's requests in flight: their tokens, and what happens when it closes."""

    def __init__(self, writer: asyncio.StreamWriter, marks: CancelMarks | None) -> None:
        self.writer, self.marks = writer, marks
        self.pending: deque[tuple[str | None, bytes]] = deque()  # (token, method) per forwarded request
        self.gone = False
        self.relaying = False  # an answer is being relayed (its head sent, its body not yet all)
        self.pump: asyncio.Future | None = None

    def fail_pending(self, reason: str) -> int:
        """Answer every pending request 503 with ``reason`` and close the connection (the pump's end
        closes it), if an infer request is among them and no answer is half relayed; how many."""
        if self.gone or self.relaying or self.pump is None or not any(m == b"POST" for _, m in self.pending):
            return 0
        count = len(self.pending)
        for _ in range(count):
            _respond(self.writer, "503 Service Unavailable", reason)
            self.answered()
        self.pump.cancel()
        return count

    def forward(self, head: bytes) -> bytes:
        """``head`` with a fresh token (when marks are on); the request is now pending."""
        token = new_token() if self.marks else None
        self.pending.append((token, head.split(b" ", 1)[0]))
        return head if token is None else head[:-2] + f"{TOKEN_HEADER}: {token}\r\n\r\n".encode()

    def method(self) -> bytes:
        return self.pending[0][1] if self.pending else b""

    async def send(self, data: bytes) -> None:
        if self.gone:
            return  # the client has gone: drain Triton's answer only to learn the request ended
        self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.gone = True

    def answered(self) -> bool:
        """The oldest pending request was answered; True once the client has gone and none is left."""
        if self.pending:
            token, _ = self.pending.popleft()
            if token is not None and self.marks is not None:
                self.marks.unmark(token)
        return self.gone and not self.pending

    async def client_gone(self, pump) -> None:
        """Mark every pending request cancelled; keep reading Triton's answers (at most
        ``MARK_MAX_AGE_S``) so each mark lives until its request ends, then remove what is left."""
        self.gone = True
        if pump is None:
            return
        tokens = [t for t, _ in self.pending if t is not None]
        if not tokens or self.marks is None or pump.done():
            pump.cancel()
            return
        for token in tokens:
            self.marks.mark(token)
        log.info("client gone with %d request(s) pending: marked cancelled", len(tokens))
        try:
            await asyncio.wait_for(pump, MARK_MAX_AGE_S)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 - cleanup below
            pass
        finally:
            for token in tokens:
                self.marks.unmark(token)
