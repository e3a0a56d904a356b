"""kandinsky_trt.runtime: artifacts -> images, without torch.

The layers, bottom to top (each package's docstring says what it owns and may import):

- ``contract``: the spec, the manifest, the scheduler tables, the exception roots;
- ``processing``: image and text pre/post-processing;
- ``cuda``: the checked CUDA runtime wrapper and step-graph replay;
- ``backends``: the backend interface and ONNX Runtime / TensorRT behind it;
- ``loops``: the one denoising loop and its per-backend strategies;
- ``pipelines``: ``Components`` and the diffusers-shaped pipelines;
- ``cli`` and ``serve``: the command line and Triton Inference Server;
- ``cpp``: the C++ host contract program (not Python).

No module here imports ``kandinsky_trt.export``/``engine``/``benchmarks``, torch, diffusers,
transformers or tensorrt at module level (tests/test_layering.py walks every one): a deployed host
installs only the runtime. The pipeline classes below are loaded on first access.
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
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
