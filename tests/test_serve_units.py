"""Serving without a server: contract and config.pbtxt, request checks, batched == serial, layering."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import assert_same, make_image, python_api, task_fields

from kandinsky_trt.runtime.serve.client import item_arrays
from kandinsky_trt.runtime.serve.contract import INPUTS, OUTPUTS, contract_markdown
from kandinsky_trt.runtime.serve.requests import RequestError, decode_request

TASKS = ("text2img", "img2img", "inpaint", "prior", "interpolate")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


def test_config_pbtxt_is_derived_from_the_manifest(artifacts_fp32_b2_wide, tmp_path):
    from kandinsky_trt.runtime.contract import manifest as mf
    from kandinsky_trt.runtime.serve.repository import RepoConfig, write_repository

    manifest = mf.load_manifest(artifacts_fp32_b2_wide[0])
    path = write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path, instances=3, max_queue_delay_us=777))
    text = path.read_text()
    assert f"max_batch_size: {max(manifest.batches())}\n" in text and manifest.batches() == [2]
    assert "max_queue_delay_microseconds: 777" in text and "count: 3" in text and "kind: KIND_CPU" in text
    names = re.findall(r'name: "(\w+)"\n    data_type: TYPE_(\w+)\n    dims: \[ ([-\d, ]+) \]', text)
    expected = [(t.name, "STRING" if t.datatype == "BYTES" else t.datatype,
                 ", ".join(str(manifest.model_dims.clip_dim if d == "E" else d) for d in t.dims))
                for t in INPUTS + OUTPUTS]
    assert names == expected
    assert text.count("optional: true") == sum(t.optional for t in INPUTS)
    assert "kandinsky_trt.runtime.serve.model import TritonPythonModel" in (path.parent / "1" / "model.py").read_text()
    off = write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path / "off", batching=False)).read_text()
    assert "max_batch_size: 1\n" in off and 'string_value: "false"' in off
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_readme_shows_the_generated_contract():
    assert contract_markdown() in README.read_text(), "README's contract table is stale: paste contract_markdown()"


@pytest.mark.parametrize("fields, message", [
    (dict(prompt="a cat"), "task: expected a BYTES input tensor 'task', found none"),
    (dict(task="text2img"), "prompt: expected a BYTES input tensor 'prompt', found none"),
    (dict(task="paint", prompt="a cat"), "task: expected one of ('text2img', 'img2img', 'inpaint', 'prior', "
                                         "'interpolate'), found 'paint'"),
    (dict(task="img2img", prompt="a cat"), "image: task img2img expects an image input, found none"),
    (dict(task="text2img", prompt="a cat", image=make_image(8, 8)), "image: task text2img takes no image, found one"),
    (dict(task="inpaint", prompt="a cat", image=make_image(8, 8)), "mask: task inpaint expects a mask input"),
    (dict(task="text2img", prompt="a cat", num_images=1000), "num_images: expected at most 16 (this server's limit"),
])
def test_request_level_checks(fields, message):
    with pytest.raises(RequestError, match=re.escape(message)):
        decode_request(item_arrays(fields), max_images=16)


def test_tensor_checks_name_the_tensor():
    arrays = item_arrays(dict(task="text2img", prompt="a cat"))
    with pytest.raises(RequestError, match=r"seed: expected datatype INT64, found numpy float32"):
        decode_request({**arrays, "seed": np.zeros((1, 1), np.float32)}, 16)
    with pytest.raises(RequestError, match=r"image: expected shape \[B, -1, -1, 3\], found \[1, 8, 8, 4\]"):
        decode_request({**arrays, "task": np.array([[b"img2img"]], object),
                        "image": np.zeros((1, 8, 8, 4), np.uint8)}, 16)
    with pytest.raises(RequestError, match="prompt: expected UTF-8 text"):
        decode_request({**arrays, "prompt": np.array([[b"\xff\xfe"]], object)}, 16)
    with pytest.raises(RequestError, match="inputs: expected one batch size B >= 1 shared by every tensor"):
        decode_request({**arrays, "prompt": np.array([[b"a"], [b"b"]], object)}, 16)


def _requests(components, seeds, tasks=TASKS):
    height, width = components.profile.height, components.profile.width
    return [task_fields(task, seed, height, width, prompt=f"prompt {seed}") for task in tasks for seed in seeds]


def test_batched_equals_serial_and_the_python_api(components):
    """Two items per task in one batch (one merged call each; batch-2 artifacts): bit-identical to
    serial calls and to the Python API with generator=seed."""
    from kandinsky_trt.runtime.serve.executor import Executor, ExecutorConfig

    fields = _requests(components, (3, 4))
    fields.append({**fields[0], "negative_prompt": "blurry", "num_images": 2, "seed": 5})
    fields.append({**fields[0], "negative_prompt": "dark", "num_images": 2, "seed": 6})
    requests = [item_arrays(f) for f in fields]
    batched = Executor(components).handle(requests)
    serial = Executor(components, ExecutorConfig(batching=False)).handle(requests)
    for f, b, s in zip(fields, batched, serial):
        assert b.error is None and s.error is None, (b.error, s.error)
        assert_same(b.outputs, s.outputs)
        if "negative_prompt" not in f or f["task"] == "prior":
            assert_same(b.outputs, python_api(components, f))


def test_batches_really_merge(components, caplog):
    from kandinsky_trt.runtime.serve.executor import Executor

    with caplog.at_level("DEBUG", logger="kandinsky_trt.runtime.serve.executor"):
        Executor(components).handle([item_arrays(f) for f in _requests(components, (1, 2), ("text2img", "prior"))])
    merged = [r.message for r in caplog.records if "in one call" in r.message]
    assert merged == ["served 2 text2img items in one call", "served 2 prior items in one call"]


def test_a_bad_item_fails_alone(components):
    """Bad items grouped with good ones: each bad one gets the pipeline's message, the good ones their images."""
    from kandinsky_trt.runtime.serve.executor import Executor

    good = _requests(components, (7, 8), ("text2img",))
    bad_steps = {**good[0], "num_inference_steps": 0}
    bad_size = {**good[0], "height": components.profile.height + 64}
    results = Executor(components).handle([item_arrays(f) for f in (good[0], bad_steps, good[1], bad_size)])
    assert results[1].error == "num_inference_steps: expected an integer >= 1, found 0"
    assert results[3].error.startswith("height/width: expected a size these artifacts hold (width x height: 128x64)")
    for index in (0, 2):
        assert_same(results[index].outputs, python_api(components, good[index // 2]))


def test_serve_modules_import_without_the_serve_extra_or_torch():
    """A runtime-only install (no tritonclient, no pytriton) still imports every serve module."""
    import kandinsky_trt.runtime.serve as pkg
    import pkgutil

    modules = [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    code = (
        "import sys, importlib\n"
        "for blocked in ('tritonclient', 'pytriton', 'triton_python_backend_utils'): sys.modules[blocked] = None\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'tensorrt', 'kandinsky_trt.export', "
        "'kandinsky_trt.engine', 'tritonclient') if sys.modules.get(m) is not None))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert len(modules) >= 8


def test_server_environment_uses_this_interpreter(tmp_path):
    import sysconfig

    from kandinsky_trt.runtime.serve.launcher import find_tritonserver

    install = find_tritonserver(tmp_path)
    assert install.env["LD_LIBRARY_PATH"].split(":")[0] == sysconfig.get_config_var("LIBDIR")
    assert install.env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    stub = install.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file() and (install.backend_dir / "python" / "libtriton_python.so").is_file()


def test_missing_tritonserver_is_a_clear_error(tmp_path, monkeypatch):
    from kandinsky_trt.runtime.serve import launcher

    monkeypatch.setattr(launcher, "_pytriton_root", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(launcher.ServerError, match=r"expected the serve extra .* or a tritonserver on PATH"):
        launcher.find_tritonserver(tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from kandinsky_trt.runtime.cli.main import main
    from kandinsky_trt.runtime.serve.launcher import free_port

    assert main(["triton-repo", "--artifacts", str(tmp_path / "missing"), "--out", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "repo").exists()
    assert main(["client", "a cat", "--url", f"127.0.0.1:{free_port()}", "--timeout", "5"]) == 2
    err = capsys.readouterr().err
    assert "no answer, the connection failed" in err and err.count("\n") == 1


def _defaults(function) -> dict:
    import inspect

    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _settings_defaults(cls) -> dict:
    from dataclasses import MISSING, fields

    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def test_served_defaults_are_the_pipelines_defaults():
    """A field a request leaves out takes the settings dataclasses' default (serve/calls.py); those are
    the public signatures' defaults, so an item without a field runs as a Python call without that argument."""
    from kandinsky_trt.runtime import (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                                       KandinskyInpaintCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline)
    from kandinsky_trt.runtime.pipelines import requests as rq
    from kandinsky_trt.runtime.serve.calls import IMAGES_PER_PROMPT

    prior, decoder = _settings_defaults(rq.PriorSettings), _settings_defaults(rq.DecoderSettings)
    combined_prior = {"num_inference_steps": "prior_num_inference_steps", "guidance_scale": "prior_guidance_scale"}
    for pipeline in (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline):
        signature = _defaults(pipeline.__call__)
        assert signature["num_images_per_prompt"] == IMAGES_PER_PROMPT
        for name in ("num_inference_steps", "guidance_scale", "output_type", "callback_steps", "scheduler"):
            assert signature[name] == decoder[name], (pipeline.__name__, name)
        for name, public in combined_prior.items():
            assert signature[public] == prior[name], (pipeline.__name__, public)
    assert _defaults(KandinskyImg2ImgCombinedPipeline.__call__)["strength"] == rq.DEFAULT_STRENGTH
    for name in ("num_inference_steps", "guidance_scale"):
        assert _defaults(KandinskyPriorPipeline.__call__)[name] == prior[name]
        assert _defaults(KandinskyPipeline.__call__)[name] == decoder[name]
    interpolate = _defaults(KandinskyPriorPipeline.interpolate)
    for name, value in _settings_defaults(rq.InterpolateSettings).items():
        assert interpolate[name] == value, name


def test_calls_build_typed_requests_without_name_tables():
    """serve/calls.py, serve/batching.py and the CLI build the requests directly: no signature
    introspection, no argument-name tables, no ``dict(locals())`` anywhere on the way to the pipelines."""
    root = Path(__file__).resolve().parents[1] / "runtime"
    paths = [root / "serve" / "calls.py", root / "serve" / "batching.py", root / "cli" / "main.py",
             *sorted((root / "pipelines").glob("*.py"))]
    for path in paths:
        text = path.read_text()
        for banned in ("inspect", "locals()", "_COMBINED_ARGS", "_PRIOR_ARGS", "_KEY_ARGS", "call: dict"):
            assert banned not in text, (path.name, banned)
