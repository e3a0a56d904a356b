"""The exception roots are importable from ``kandinsky_trt.runtime`` (issue 18 §3.3), lazily."""

import subprocess
import sys

import pytest

import kandinsky_trt.runtime as runtime
from kandinsky_trt.runtime.contract import errors

ROOTS = ("KandinskyTrtError", "PipelineInputError", "NonFiniteOutputError", "ManifestError", "IntegrityError",
         "SpecError", "ImageInputError", "BackendError")


def test_kandinsky_trt_error_importable_from_runtime():
    from kandinsky_trt.runtime import KandinskyTrtError

    assert KandinskyTrtError is errors.KandinskyTrtError


@pytest.mark.parametrize("name", ROOTS)
def test_error_roots_exported_and_derive_from_the_root(name):
    cls = getattr(runtime, name)
    assert issubclass(cls, errors.KandinskyTrtError)
    assert name in runtime.__all__


def test_a_pipeline_error_is_caught_by_the_exported_root(tmp_path):
    from kandinsky_trt.runtime import Components, KandinskyTrtError

    with pytest.raises(KandinskyTrtError, match=r"^artifacts: expected"):
        Components(tmp_path / "missing")


def test_error_exports_are_lazy():
    """Importing the package loads no pipeline, backend, PIL or numpy module; the attribute does."""
    code = ("import sys, kandinsky_trt.runtime as r; "
            "before = {m for m in sys.modules if m.startswith(('kandinsky_trt.runtime.', 'PIL', 'numpy'))}; "
            "r.KandinskyTrtError; "
            "print(sorted(before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
