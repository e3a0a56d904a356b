"""Layering: every runtime module imports without torch, diffusers, transformers, tensorrt or an upper layer.

The module list is walked (pkgutil), not written by hand, so a new module is covered the day it
lands; each import runs in a fresh interpreter so one module's imports cannot hide another's.
"""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import kandinsky_trt.runtime as runtime

FORBIDDEN = ["torch", "diffusers", "transformers", "tensorrt", "onnx", "onnxscript", "polygraphy",
             "kandinsky_trt.export", "kandinsky_trt.engine", "kandinsky_trt.benchmarks"]
# What each layer of the runtime may import of the others (runtime/__init__.py lists them).
MAY_IMPORT = {
    "contract": set(),
    "processing": {"contract"},
    "cuda": {"contract"},
    "backends": {"contract", "cuda"},  # never loops: the loops layer builds loops on the backend interface
    "loops": {"contract", "cuda", "backends"},
    "pipelines": {"contract", "processing", "backends", "loops", "cuda"},
    # the step scheduler knows requests, stages and slots by name only: executors bring the networks
    "scheduling": {"contract"},
    "cli": {"contract", "processing", "backends", "loops", "cuda", "pipelines", "serve", "scheduling"},
    "serve": {"contract", "processing", "backends", "loops", "cuda", "pipelines", "cli", "scheduling"},
}


def runtime_modules() -> list[str]:
    return sorted([runtime.__name__] + [m.name for m in pkgutil.walk_packages(runtime.__path__, runtime.__name__ + ".")])


def test_the_walk_finds_every_layer_and_the_modules_that_once_escaped_a_hand_list():
    modules = runtime_modules()
    assert {m.split(".")[2] for m in modules if m.count(".") >= 2} >= set(MAY_IMPORT)
    assert "kandinsky_trt.runtime.loops.device" in modules and len(modules) > 50


IMPORTS_OF = (
    "import importlib, json, sys\n"
    "before = set(sys.modules)\n"
    "importlib.import_module(sys.argv[1])\n"
    "print(json.dumps(sorted(set(sys.modules) - before)))\n"
)


@pytest.fixture(scope="module")
def imports() -> dict[str, list[str]]:
    """Module -> every module its import loaded, each in a fresh interpreter (run in one batch of processes)."""
    import json

    procs = {m: subprocess.Popen([sys.executable, "-c", IMPORTS_OF, m], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for m in runtime_modules()}
    out = {}
    for module, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{module} does not import: {stderr[-2000:]}"
        out[module] = json.loads(stdout)
    return out


def _hits(loaded: list[str], roots: list[str]) -> list[str]:
    return sorted({r for r in roots for m in loaded if m == r or m.startswith(r + ".")})


def test_no_runtime_module_imports_heavy_or_upper_layer_modules(imports):
    bad = {m: _hits(loaded, FORBIDDEN) for m, loaded in imports.items()}
    assert {m: hits for m, hits in bad.items() if hits} == {}


def test_each_runtime_layer_imports_only_the_layers_below_it(imports):
    bad = {}
    for module, loaded in imports.items():
        parts = module.split(".")
        if len(parts) < 3 or parts[2] not in MAY_IMPORT:
            continue
        layers = {m.split(".")[2] for m in loaded if m.startswith("kandinsky_trt.runtime.") and m.count(".") >= 2}
        extra = layers - MAY_IMPORT[parts[2]] - {parts[2]}
        if extra:
            bad[module] = sorted(extra)
    assert bad == {}


def test_spec_and_manifest_use_the_standard_library_only(imports):
    for module in ("kandinsky_trt.runtime.contract.spec", "kandinsky_trt.runtime.contract.manifest"):
        assert "numpy" not in imports[module], module


def test_the_scheduler_uses_the_standard_library_only(imports):
    scheduling = [m for m in imports if m.startswith("kandinsky_trt.runtime.scheduling")]
    assert len(scheduling) > 5
    assert {m: "numpy" for m in scheduling if "numpy" in imports[m]} == {}


def test_the_walk_would_have_caught_a_torch_import(tmp_path):
    """A module planted in a copy of the layout is found by the same walk and flagged."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "torch_wrappers.py").write_text("import json as torch_stand_in\nimport email\n")
    sys.path.insert(0, str(tmp_path))
    try:
        found = [m.name for m in pkgutil.walk_packages(importlib.import_module("probe_pkg").__path__, "probe_pkg.")]
    finally:
        sys.path.remove(str(tmp_path))
    assert found == ["probe_pkg.torch_wrappers"]
    loaded = subprocess.run([sys.executable, "-c", IMPORTS_OF, "probe_pkg.torch_wrappers"], capture_output=True,
                            text=True, check=True, env={"PYTHONPATH": str(tmp_path)}).stdout
    assert _hits(__import__("json").loads(loaded), ["email"]) == ["email"]
