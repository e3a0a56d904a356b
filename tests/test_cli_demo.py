"""The first five minutes: ``kandinsky-trt demo``, then every pipeline from the CLI on its artifacts.

The demo runs once per session, as a new user runs it (``demo_run`` in conftest.py, shared with
tests/test_readme.py; about a minute on 2 cores): tiny checkpoint, export of every network (inpaint
included), our image and diffusers' image of the same draws, the comparison picture.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.cli.main import main
from kandinsky_trt.runtime.contract.manifest import load_manifest

FAST = ["--steps", "2", "--prior-steps", "2", "--seed", "0"]


MAX_STDERR_LINES = 40  # the demo's progress: 1 line per stage, 3 per network; third-party chatter is not


@pytest.fixture(scope="session")
def demo(demo_run):
    assert demo_run.returncode == 0, "\n".join(demo_run.stderr[-30:])
    return demo_run.out


def test_demo_writes_every_file(demo):
    for name in ("demo.png", "demo_comparison.png", "mask.png", "artifacts/manifest.json"):
        assert (demo / name).is_file(), name
    assert load_manifest(demo / "artifacts").network("unet_inpaint")  # the demo exports everything it has
    assert Image.open(demo / "demo_comparison.png").size == (3 * 256 + 32, 256 + 64)


def test_demo_image_and_mask_have_the_artifacts_size(demo):
    """So that img2img and inpaint, served or from the CLI, take the demo's files as they are."""
    profile = load_manifest(demo / "artifacts").profile
    for name in ("demo.png", "mask.png"):
        assert Image.open(demo / name).size == (profile.width, profile.height), name


def test_demo_prints_the_figures_and_where_files_went(demo, demo_run):
    """The demo's own report: its difference to diffusers, then where every file went as the last line;
    the command to try next is the one the user ran the demo with (.venv/bin/kandinsky-trt)."""
    lines = demo_run.stdout
    figures = next(line for line in lines if line.startswith("kandinsky-trt vs diffusers"))
    max_diff = float(figures.split("max |difference| ")[1].split(",")[0])
    assert max_diff < 5e-4  # the fp32 parity tolerance for images (tests/test_pipelines.py)
    assert lines[-1].startswith("files: ") and "kandinsky-demo/demo_comparison.png" in lines[-1]
    assert any(line.startswith("try: .venv/bin/kandinsky-trt generate") for line in lines)


def test_demo_shows_progress_not_third_party_chatter(demo, demo_run):
    """Issue 18: ~1,190 stderr lines per tiny export ("Replaced initializer", "install accelerate" x9,
    weight-loading bars, torchvision notices, staging folders that no longer exist)."""
    err = demo_run.stderr
    assert len(err) <= MAX_STDERR_LINES, "\n".join(err)
    assert "[8/8] movq_encoder" in err and any("parity:" in line for line in err)  # progress stays
    for chatter in ("accelerate", "Replaced initializer", "torchvision", "Loading weights", ".ktrt-export-",
                    "[torch.onnx]", "Warning"):
        assert not [line for line in err + demo_run.stdout if chatter in line], chatter


def _generate(demo, tmp_path, *extra) -> Image.Image:
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--artifacts", str(demo / "artifacts"), "--out", str(out), *FAST, *extra]) == 0
    return Image.open(out)


@pytest.mark.parametrize("pipeline", ["text2img", "img2img", "inpaint"])
def test_every_pipeline_runs_on_the_demo_artifacts_at_their_size(pipeline, demo, tmp_path, capsys):
    extra = {"text2img": [], "img2img": ["--image", str(demo / "demo.png"), "--strength", "0.5"],
             "inpaint": ["--image", str(demo / "demo.png"), "--mask", str(demo / "mask.png")]}[pipeline]
    assert _generate(demo, tmp_path, *extra).size == (64, 64)  # no size given: the artifacts' 64x64
    assert "size: width 64, height 64 (the artifacts' size" in capsys.readouterr().err


def test_interpolate_runs_on_the_demo_artifacts(demo, tmp_path):
    out = tmp_path / "mix.png"
    assert main(["interpolate", "--artifacts", str(demo / "artifacts"), "--text", "a cat", "0.5",
                 "--image", str(demo / "demo.png"), "0.5", "--out", str(out), *FAST]) == 0
    assert Image.open(out).size == (64, 64)


def test_default_size_equals_the_explicit_one(demo, tmp_path):
    implicit = np.asarray(_generate(demo, tmp_path))
    explicit = np.asarray(_generate(demo, tmp_path, "--height", "64", "--width", "64"))
    np.testing.assert_array_equal(implicit, explicit)


@pytest.mark.parametrize("command", [
    ["generate", "a cat"],
    ["generate", "a cat", "--image", "{demo}/demo.png"],
    ["generate", "a cat", "--image", "{demo}/demo.png", "--mask", "{demo}/mask.png"],
    ["interpolate", "--text", "a cat", "1"],
])
def test_wrong_size_is_refused_before_any_network_runs(command, demo, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(OrtBackend, "load", lambda self, network, profile=0: loaded.append(network))
    argv = [a.format(demo=demo) for a in command]
    code = main(argv + ["--artifacts", str(demo / "artifacts"), "--height", "128", "--out", str(tmp_path / "x.png")])
    assert code == 2 and loaded == []
    err = capsys.readouterr().err
    assert "height/width: expected a size these artifacts hold (width x height: 64x64)" in err
    assert "found width 64 x height 128" in err
    assert not (tmp_path / "x.png").exists()


def test_api_combined_pipelines_refuse_a_wrong_size_before_the_prior(demo, monkeypatch):
    from kandinsky_trt.runtime import KandinskyCombinedPipeline
    from kandinsky_trt.runtime.pipelines.components import PipelineInputError

    pipe = KandinskyCombinedPipeline(demo / "artifacts")
    loaded = []
    monkeypatch.setattr(OrtBackend, "load", lambda self, network, profile=0: loaded.append(network))
    with pytest.raises(PipelineInputError, match="found width 192 x height 64"):
        pipe("a cat", width=192, num_inference_steps=2, prior_num_inference_steps=2)
    assert loaded == []


def test_ctrl_c_during_generate_is_one_line_exit_130_and_writes_nothing(demo, tmp_path):
    """SIGINT while the decoder runs: "interrupted", status 130, no image and no temporary file."""
    out = tmp_path / "out" / "cat.png"
    argv = [sys.executable, "-m", "kandinsky_trt.runtime.cli.main", "generate", "a cat", "--artifacts",
            str(demo / "artifacts"), "--out", str(out), "--steps", "500", "--seed", "0"]
    # A terminal's Ctrl-C reaches a process whose SIGINT is the default; a suite started in the background
    # by a non-interactive shell (``cmd &``) has it ignored, which its children inherit (and Python then
    # raises no KeyboardInterrupt): the child gets the default back.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    try:
        while "decoder" not in seen and proc.poll() is None:  # the bar appears with the first step
            seen += proc.stderr.read(1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    err = (seen + err).replace("\r", "\n")
    lines = [line for line in err.splitlines() if line.strip() and "decoder" not in line]
    assert proc.returncode == 130, err
    assert lines[-1] == "interrupted" and "Traceback" not in err, err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_api_default_size_is_the_artifacts_size(demo):
    from kandinsky_trt.runtime import KandinskyCombinedPipeline

    images = KandinskyCombinedPipeline(demo / "artifacts")(
        "a cat", num_inference_steps=2, prior_num_inference_steps=2, generator=0, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
