"""kandinsky_trt.runtime.cuda: CUDA plumbing for the device-level backends.

Owns the checked wrapper over cuda-python's runtime API (``runtime_api``: streams, device buffers,
copies, graphs) and the CUDA-graph replay of one step (``graphs``). cuda-python is imported inside
the functions that need it, so these modules import on a CPU-only install.

May import ``contract`` and numpy; never backends, loops or pipelines.
"""
