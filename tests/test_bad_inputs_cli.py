"""The command line on bad input (issue 8, kinds 1 and 6): one line ``error: <flag>: expected ...,
found ...`` on stderr, no traceback, exit status 2, and no work done first."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from PIL import Image

from kandinsky_trt.runtime.cli.main import main

RUN = ["--height", "64", "--width", "64", "--steps", "2", "--prior-steps", "2"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(root / "image.png")
    Image.new("L", (64, 64), 255).save(root / "mask.png")
    (root / "truncated.png").write_bytes((root / "mask.png").read_bytes()[:-20])
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    return root


@pytest.mark.parametrize("argv, match", [
    (["generate", "a cat", "--seed", "-1"], r"--seed: expected a seed >= 0, found -1"),
    (["generate", "a cat", "--image", "{image}", "--strength", "nan"], r"--strength: expected a finite number, found nan"),
    (["generate", "a cat", "--image", "{image}", "--strength", "0.1"],
     r"--strength: expected >= 0.5 with num_inference_steps=2 .*found 0.1, which runs no step"),
    (["generate", "a cat", "--image", "{image}", "--mask", "{truncated}"],
     r"--mask: expected a readable image file, found '.*truncated.png' \(image file is truncated"),
    (["generate", "a cat", "--image", "{garbage}", "--strength", "0.5"], r"--image: expected a readable image file, found '.*garbage.png'"),
    (["generate", "a cat", "--guidance", "nan"], r"--guidance: expected a finite number, found nan"),
    (["generate", "a cat", "--prior-guidance", "inf"], r"--prior-guidance: expected a finite number, found inf"),
    (["generate", "a cat", "--num-images", "1000000000"], r"--num-images: expected an integer <= 64, found 1000000000"),
    (["generate", "a cat", "--num-images", "0"], r"--num-images: expected an integer >= 1, found 0"),
    (["generate", "a cat", "--steps", "-3"], r"--steps: expected an integer >= 1, found -3"),
    (["generate", "a \udcff cat"], r"PROMPT: expected valid Unicode text, found the lone surrogate '\\udcff'"),
    (["generate", "a cat", "--mask", "{image}"], r"--mask: expected --image as well"),
    (["interpolate", "--text", "a cat", "abc"], r"--text 'a cat' WEIGHT: expected a number, found 'abc'"),
    (["interpolate", "--text", "a cat", "nan"], r"--text WEIGHT: expected a finite number, found nan"),
    (["interpolate", "--image", "{truncated}", "1"], r"--image: expected a readable image file"),
    (["interpolate", "--text", "a \udcff", "1"], r"--text/--image\[0\]: expected valid Unicode text"),
])
def test_cli_input_errors(argv, match, files, artifacts_fp32, capsys, monkeypatch):
    from kandinsky_trt.runtime.pipelines import components

    real_init = components.Components.__init__
    started = []
    monkeypatch.setattr(components.Components, "__init__",
                        lambda self, *a, **k: started.append(1) or real_init(self, *a, **k))
    argv = [a.format(**{p.stem: p for p in files.iterdir()}) for a in argv]
    out = files / "out.png"
    assert main([argv[0], *RUN, *argv[1:], "--artifacts", str(artifacts_fp32[0]), "--out", str(out)]) == 2
    assert re.match(rf"error: {match}", _error_line(capsys))
    assert not started and not out.exists()  # refused before the artifacts were opened


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main(["generate", "a cat", "--artifacts", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: artifacts: expected") and "Traceback" not in err


def test_guidance_at_or_below_one_gives_one_image(tmp_path, artifacts_fp32, capsys):
    """diffusers' rule: --guidance -2, 0.5 and 1 all give the conditional prediction, the same image."""
    outputs = []
    for scale in ("1", "0.5", "-2"):
        out = tmp_path / f"g{scale}.png"
        assert main(["generate", "a cat", "--artifacts", str(artifacts_fp32[0]), "--out", str(out), "--seed", "3",
                     "--guidance", scale, "--prior-guidance", scale, *RUN]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    out = tmp_path / "g4.png"
    assert main(["generate", "a cat", "--artifacts", str(artifacts_fp32[0]), "--out", str(out), "--seed", "3",
                 "--guidance", "4", *RUN]) == 0
    assert out.read_bytes() != outputs[0]


@pytest.fixture(scope="module")
def artifacts_without_inpaint(artifacts_fp32, tmp_path_factory):
    """The fp32 artifacts as an export without --inpaint would write them (like the demo's)."""
    out = tmp_path_factory.mktemp("no_inpaint") / "artifacts"
    shutil.copytree(artifacts_fp32[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    dropped = [n for n in manifest["networks"] if n["name"] in ("unet_inpaint", "unet_inpaint_step")]
    manifest["networks"] = [n for n in manifest["networks"] if n not in dropped]
    for network in dropped:  # content-addressed file names, recorded in `files`
        (out / network["onnx"]).unlink()
        manifest["files"].pop(network["onnx"])
    manifest["checkpoints"].pop("inpaint", None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize("argv, match", [
    (["--pipelines", "text2img", "inpaint"],
     r"--pipelines inpaint: expected artifacts with unet_inpaint \(export with --inpaint DIR\), found none"),
    (["--stages", "bogus"], r"--stages: expected networks of .*, found bogus"),
    (["--repeat", "0"], r"--repeat: expected an integer >= 1, found 0"),
    (["--warmup", "-1"], r"--warmup: expected an integer >= 0, found -1"),
])
def test_bench_refuses_before_any_work(argv, match, artifacts_without_inpaint, tmp_path, capsys, monkeypatch):
    """Before issue 8: ``KeyError: 'inpaint'`` after the other pipelines had run."""
    from kandinsky_trt.benchmarks import harness

    monkeypatch.setattr(harness, "Components", lambda *a, **k: pytest.fail("work started"))
    assert main(["bench", "--artifacts", str(artifacts_without_inpaint), "--backends", "ort",
                 "--out", str(tmp_path / "results"), *argv]) == 2
    assert re.match(rf"error: {match}", _error_line(capsys))
    assert not (tmp_path / "results").exists()


def test_generate_inpaint_without_inpaint_unet(artifacts_without_inpaint, files, capsys):
    assert main(["generate", "a cat", "--artifacts", str(artifacts_without_inpaint), "--image", str(files / "image.png"),
                 "--mask", str(files / "mask.png"), "--out", str(files / "inp.png"), *RUN]) == 2
    assert "error: artifacts: expected an inpaint UNet (export with --inpaint DIR), found none" in _error_line(capsys)
