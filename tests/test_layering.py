"""Layering: the runtime imports neither export/engine nor torch, diffusers or transformers."""

import subprocess
import sys

RUNTIME_MODULES = [
    "kandinsky_trt.runtime", "kandinsky_trt.runtime.spec", "kandinsky_trt.runtime.manifest",
    "kandinsky_trt.runtime.components", "kandinsky_trt.runtime.prior_pipeline",
    "kandinsky_trt.runtime.decoder_pipelines", "kandinsky_trt.runtime.combined_pipelines",
    "kandinsky_trt.runtime.backends.ort", "kandinsky_trt.runtime.backends.torch_backend",
    "kandinsky_trt.runtime.backends.trt", "kandinsky_trt.runtime.schedulers",
    "kandinsky_trt.runtime.tokenization", "kandinsky_trt.runtime.image_processing", "kandinsky_trt.runtime.cli",
    "kandinsky_trt.runtime.inputs", "kandinsky_trt.runtime.once", "kandinsky_trt.runtime.output_paths",
    "kandinsky_trt.runtime.cli_checks", "kandinsky_trt.runtime.errors",
]
FORBIDDEN = ["torch", "diffusers", "transformers", "tensorrt", "kandinsky_trt.export", "kandinsky_trt.engine"]


def test_runtime_imports_no_heavy_or_upper_layer_modules():
    code = (
        "import importlib, sys\n"
        f"for m in {RUNTIME_MODULES!r}: importlib.import_module(m)\n"
        f"print(sorted(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_spec_and_manifest_use_the_standard_library_only():
    code = (
        "import sys\n"
        "import kandinsky_trt.runtime.spec, kandinsky_trt.runtime.manifest\n"
        "print('numpy' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
