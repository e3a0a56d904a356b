"""kandinsky_trt.runtime: artifacts -> images, without torch.

Imports neither ``kandinsky_trt.export`` nor ``kandinsky_trt.engine``, nor torch / diffusers /
transformers at module level (enforced by tests/test_layering.py): a deployed host installs only
the runtime. The pipeline classes are loaded on first access.
"""

from importlib import import_module

_EXPORTS = {
    "KandinskyPriorPipeline": "prior_pipeline",
    "KandinskyPriorPipelineOutput": "prior_pipeline",
    "KandinskyPipeline": "decoder_pipelines",
    "KandinskyImg2ImgPipeline": "decoder_pipelines",
    "KandinskyInpaintPipeline": "decoder_pipelines",
    "ImagePipelineOutput": "decoder_pipelines",
    "KandinskyCombinedPipeline": "combined_pipelines",
    "KandinskyImg2ImgCombinedPipeline": "combined_pipelines",
    "KandinskyInpaintCombinedPipeline": "combined_pipelines",
    "Components": "components",
    "Profile": "spec",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
