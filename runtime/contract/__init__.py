"""kandinsky_trt.runtime.contract: what an artifacts directory promises, stated once.

Owns the component spec (every network's tensors and the denoising loops that wire them), the
dtype table, ``manifest.json`` (its dataclasses, JSON Schema, range rules and file integrity), the
scheduler coefficient tables and the project's exception roots. Every other layer, the C++ host
included (``runtime/cpp``), reads the contract from here.

May import the standard library and numpy only (``spec`` and ``manifest`` not even numpy): nothing
else of the runtime, so any layer can depend on it.
"""
