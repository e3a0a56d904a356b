"""Missing or damaged artifact files (from the first bad-input suite): clear errors naming the file.

Verification of every file the manifest names on load lives with the manifest's own tests.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from kandinsky_trt.runtime import KandinskyPipeline
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.manifest import ManifestError


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="run `kandinsky-trt export` first"):
        KandinskyPipeline(tmp_path)


def test_missing_and_corrupt_onnx(tmp_path, artifacts_fp32):
    out = tmp_path / "art"
    shutil.copytree(artifacts_fp32[0], out)
    files = {n: e.onnx for n, e in mf.load_manifest(out).networks.items()}  # content-addressed names
    (out / files["unet"]).unlink()
    with Components(out) as c:
        with pytest.raises(BackendError, match=r"unet: expected the ONNX file .*unet\.[0-9a-f]{16}\.onnx, found no such file"):
            c.session("unet")
    (out / files["movq_decoder"]).write_bytes(b"garbage")
    with Components(out) as c:
        with pytest.raises(BackendError, match="movq_decoder: .*does not match the manifest's sha256"):
            c.session("movq_decoder")


def test_wrong_feed_shape_is_named(artifacts_fp32):
    with Components(artifacts_fp32[0]) as components:
        session = components.session("movq_decoder")
        with pytest.raises(BackendError, match=r"movq_decoder.latents: expected float32\[1, 4, 8, 8\], found float32\[1, 4, 9, 8\]"):
            session.run({"latents": np.zeros((1, 4, 9, 8), np.float32)})
