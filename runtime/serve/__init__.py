"""kandinsky_trt.runtime.serve: serving on NVIDIA Triton Inference Server (DESIGN.md §10).

Owns the request contract (``contract``: tensor names, types and shapes, from which ``config.pbtxt``
and the README's client table are generated), the model repository writer (``repository``), the
request decoding and grouped execution behind the Python-backend model (``requests``,
``executor``, ``model``, with cancellation at step boundaries in ``cancel``), the tritonserver
launcher (``launcher``) with its HTTP front bounding request sizes (``front``), the stub watchdog
that keeps readiness true to the model (``watchdog``), step-level serving (``stepped``: the model's
requests through runtime/scheduling's scheduler on one worker thread, with ``--scheduling step``;
its executor on loaded artifacts, ``step_executor``, with a request's rows per stage in
``step_rows``; its metrics on Triton's /metrics, ``step_metrics``), the hygiene of what a server leaves behind
(``hygiene``) and the bounds in one place (``limits``), the client (``client``) and the CLI
commands (``commands``).

May import the rest of ``kandinsky_trt.runtime``, numpy and the standard library at module level;
``tritonclient`` and ``triton_python_backend_utils`` (which exists only inside the server's Python
stub) only inside the functions that need them, so every module here imports on a runtime-only
install without the ``serve`` extra. Like the rest of the runtime: no torch, diffusers,
transformers, ``kandinsky_trt.export`` or ``kandinsky_trt.engine``.
"""
