"""The bounds the server enforces, in one place (the CLI's defaults and the README's numbers).

- ``DEFAULT_MAX_REQUEST_BYTES``: the largest request body. HTTP: the front answers 413 before
  reading a larger body. gRPC: the model refuses a request whose tensors hold more (INVALID_ARGUMENT),
  Triton 2.51 itself has no gRPC message bound to set. 32 MiB holds a 1024x1024 RGB image sent as
  KServe JSON (about 13 MB) with room to spare.
- ``DEFAULT_MAX_QUEUE_SIZE``: requests waiting for the model beyond it are refused at once by
  Triton's dynamic batcher (``default_queue_policy.max_queue_size``) instead of queueing forever.
- ``DEFAULT_QUEUE_TIMEOUT_S``: a request still waiting for the model after this long is refused
  without running. A client may ask for less per request (KServe ``timeout`` parameter, in
  microseconds; Triton only lets a request shorten a non-zero default, hence a default at all).
- ``DEFAULT_MAX_CONNECTIONS``: HTTP connections the front holds open at once; one more is answered
  503 and closed. ``DEFAULT_MAX_BUFFERED_BYTES``: request bodies the front holds in memory at once
  (each is read whole before it is forwarded); a request that would exceed it is answered 503.
  Together they bound the front's memory (about 256 MiB + 256 x 200 KiB of stream buffers).
- ``HEAD_TIMEOUT_S``: an idle connection, or a request head not complete within it, is closed
  (slowloris); ``BODY_TIMEOUT_S``: a body not received within it is answered 408.
"""

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_QUEUE_SIZE = 64
DEFAULT_QUEUE_TIMEOUT_S = 300.0
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
HEAD_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 120.0
