"""kandinsky_trt.runtime: artifacts -> images, without torch.

The layers, bottom to top (each package's docstring says what it owns and may import):

- ``contract``: the spec, the manifest, the scheduler tables, the exception roots;
- ``processing``: image and text pre/post-processing;
- ``cuda``: the checked CUDA runtime wrapper and step-graph replay;
- ``backends``: the backend interface and ONNX Runtime / TensorRT behind it (and stage networks
  run on device buffers, their outputs left there);
- ``loops``: the loop of slots and its two storages (host arrays, bound device buffers);
- ``pipelines``: ``Components`` and the diffusers-shaped pipelines;
- ``scheduling``: the step-level scheduler (requests through stages and slots; standard library
  only, it sees the hardware through an executor protocol);
- ``cli`` and ``serve``: the command line and Triton Inference Server;
- ``cpp``: the C++ host contract program (not Python).

No module here imports ``kandinsky_trt.export``/``engine``/``benchmarks``, torch, diffusers,
transformers or tensorrt at module level (tests/test_layering.py walks every one): a deployed host
installs only the runtime. The pipeline classes and the exception roots below are loaded on first
access: ``except kandinsky_trt.runtime.KandinskyTrtError`` catches every error a user can cause.
"""

from importlib import import_module

_EXPORTS = {
    "KandinskyPriorPipeline": "pipelines.prior",
    "KandinskyPriorPipelineOutput": "pipelines.prior",
    "KandinskyPipeline": "pipelines.decoder",
    "KandinskyImg2ImgPipeline": "pipelines.decoder",
    "KandinskyInpaintPipeline": "pipelines.decoder",
    "ImagePipelineOutput": "pipelines.decoder",
    "KandinskyCombinedPipeline": "pipelines.combined",
    "KandinskyImg2ImgCombinedPipeline": "pipelines.combined",
    "KandinskyInpaintCombinedPipeline": "pipelines.combined",
    "Components": "pipelines.components",
    "Profile": "contract.spec",
    # The exception roots (every one derives from KandinskyTrtError).
    "KandinskyTrtError": "contract.errors",
    "PipelineInputError": "contract.errors",
    "NonFiniteOutputError": "contract.errors",
    "ManifestError": "contract.manifest",
    "IntegrityError": "contract.integrity",
    "SpecError": "contract.spec",
    "ImageInputError": "processing.images",
    "BackendError": "backends.base",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
