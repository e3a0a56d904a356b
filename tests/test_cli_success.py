"""The command line's success paths: ``export`` writes artifacts that load and run, ``generate`` and
``interpolate`` write PNGs of the requested size, or of the artifacts' size when none is given.

The demo and every pipeline at the demo's square 64x64 are in ``test_cli_demo.py``; these use a
non-square profile (64 high, 128 wide), where a swapped height and width would show. One test runs
the installed ``kandinsky-trt`` console script in a subprocess; the others call ``main``.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.cli.main import main
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.contract.spec import BRIDGE_NETWORKS, NETWORKS, STEP_NETWORKS

FAST = ["--steps", "2", "--prior-steps", "2", "--seed", "0"]
WIDE = (128, 64)  # PIL's (width, height) of artifacts_fp32_b2_wide and of the export below


def _run(argv: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(argv)
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """``kandinsky-trt export`` of the tiny checkpoint (inpaint included), fp32, 64x128, batch 1."""
    out = tmp_path_factory.mktemp("cli_export") / "artifacts"
    argv = ["export", "--prior", str(tiny_checkpoint.prior), "--decoder", str(tiny_checkpoint.decoder),
            "--inpaint", str(tiny_checkpoint.inpaint), "--out", str(out), "--precision", "fp32",
            "--exporter", "legacy", "--height", "64", "--width", "128"]
    code, printed = _run(argv)
    assert code == 0, printed
    return out, argv, printed


def _feeds(entry, rng) -> dict[str, np.ndarray]:
    """Inputs of the entry's shapes: N(0, 1) floats; integers and booleans 1 (a valid token id and mask)."""
    return {t.name: rng.standard_normal(t.shape).astype(t.dtype) if t.dtype.startswith("float")
            else np.ones(t.shape, t.dtype) for t in entry.resolved().inputs}


def test_export_writes_a_manifest_whose_networks_run(exported):
    out, _, printed = exported
    manifest = load_manifest(out)
    # --inpaint: unet_inpaint too
    assert set(manifest.networks) == set(NETWORKS) | set(STEP_NETWORKS) | set(BRIDGE_NETWORKS)
    # the count is of exported models; their step graphs come with them
    assert f"manifest: {out / 'manifest.json'}  (exported {len(NETWORKS)}, reused 0)" in printed
    rng = np.random.default_rng(0)
    with OrtBackend(manifest) as backend:
        for name, entry in manifest.networks.items():
            outputs = backend.load(name).run(_feeds(entry, rng))
            for tensor in entry.resolved().outputs:
                value = outputs[tensor.name]
                assert (value.shape, value.dtype.name) == (tensor.shape, tensor.dtype), f"{name}.{tensor.name}"
                assert np.isfinite(value).all(), f"{name}.{tensor.name}"


def test_export_again_reuses_every_network(exported):
    out, argv, _ = exported
    code, printed = _run(argv)
    assert code == 0
    assert f"manifest: {out / 'manifest.json'}  (exported 0, reused {len(NETWORKS)})" in printed


def test_generate_writes_the_requested_size(artifacts_fp32_b2_wide, tmp_path):
    """--height 64 --width 128 on 64x128 batch-2 artifacts, two images: out-0.png and out-1.png."""
    out = tmp_path / "out.png"
    code, printed = _run(["generate", "a cat", "--artifacts", str(artifacts_fp32_b2_wide[0]), "--out", str(out),
                          "--height", "64", "--width", "128", "--num-images", "2", *FAST])
    assert code == 0
    targets = [tmp_path / "out-0.png", tmp_path / "out-1.png"]
    assert printed.splitlines() == [f"wrote {t}" for t in targets]
    images = [Image.open(t) for t in targets]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", WIDE, "RGB")] * 2
    assert not np.array_equal(*map(np.asarray, images))  # two draws, not one image twice


def test_interpolate_writes_the_requested_size(artifacts_fp32_b2_wide, tmp_path):
    out = tmp_path / "mix.png"
    code, _ = _run(["interpolate", "--artifacts", str(artifacts_fp32_b2_wide[0]), "--text", "a cat", "0.7",
                    "--text", "a dog", "0.3", "--height", "64", "--width", "128", "--out", str(out), *FAST])
    assert code == 0
    image = Image.open(out)
    assert (image.format, image.size) == ("PNG", WIDE)


def _console_script() -> str:
    """The ``kandinsky-trt`` that ``pip install`` put beside this interpreter (or on PATH)."""
    script = shutil.which("kandinsky-trt", path=str(Path(sys.executable).parent)) or shutil.which("kandinsky-trt")
    assert script, "kandinsky-trt: expected the console script of `pip install -e .`, found none"
    return script


def test_console_script_generates_at_the_artifacts_size(exported, tmp_path):
    """The installed entry point, on the CLI-exported artifacts, no --height/--width: their 64x128."""
    artifacts, _, _ = exported
    out = tmp_path / "cat.png"
    done = subprocess.run([_console_script(), "generate", "a cat", "--artifacts", str(artifacts), "--out", str(out),
                           *FAST], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "size: width 128, height 64 (the artifacts' size" in done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    image = Image.open(out)
    assert (image.format, image.size) == ("PNG", WIDE)
