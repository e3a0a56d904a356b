"""kandinsky_trt.runtime.loops: the denoising loop, written once, and its three strategies.

``template`` owns the checks, the identity-row start, the stepping, the callback and the download
for any :class:`~kandinsky_trt.runtime.contract.loop_specs.LoopSpec`; ``host`` runs it on numpy arrays
through ``NetworkSession.run`` (every backend), ``ort_bound`` on ONNX Runtime IO bindings with its
CUDA graphs, ``trt_graph`` on TensorRT bindings with one CUDA graph per step. A backend returns its
strategy from ``backend.loop(spec, profile, cuda_graph=...)``, one per (spec, profile).

May import ``contract``, ``cuda`` and the backend interface (``backends.base``); never pipelines.
"""
