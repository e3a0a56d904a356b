"""Shared fixtures: one tiny checkpoint and its exported artifacts per test session.

Exports are the slow part of the suite, so each (precision, profile) pair is exported once and
shared by every test that needs it. Most use the TorchScript exporter (5-10x faster on tiny models);
``artifacts_fp16`` uses the default dynamo exporter, so both paths are checked end to end.

The ``gpu`` and ``tensorrt`` markers skip their tests where a CUDA device or TensorRT is missing
(:func:`pytest_collection_modifyitems`); tests do not check for those themselves.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _threads_per_worker() -> int | None:
    """Cores per pytest-xdist worker (None outside a worker: the libraries' defaults stay)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, len(os.sched_getaffinity(0)) // workers) if workers else None


# Each worker computes on its share of the cores. With torch's and ONNX Runtime's default (a thread
# per core) two workers on CI's two cores run four busy threads that spin waiting for each other:
# tests/test_pipelines.py -k fp32, two copies at once on the shared 2-core VM, took 127 s of CPU
# each by default, 38 s with one torch thread and 32 s with one ONNX Runtime thread as well. Set
# here, before anything imports torch (OpenMP reads it once); subprocesses inherit it. Outputs stay
# bit-identical (tests/test_golden_outputs.py).
if _threads_per_worker():
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads_per_worker()))


def _limit_onnxruntime_threads(threads: int) -> None:
    """ONNX Runtime's sessions in this process use ``threads`` intra-op threads unless the caller
    sets its own (``OrtOptions.intra_op_threads``): ONNX Runtime reads no environment variable."""
    import onnxruntime as ort

    class SessionOptions(ort.SessionOptions):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.intra_op_num_threads = threads

    ort.SessionOptions = SessionOptions


def pytest_configure(config):
    if _threads_per_worker():
        _limit_onnxruntime_threads(_threads_per_worker())


def _missing_cuda_device() -> str | None:
    from kandinsky_trt.runtime.cuda import runtime_api as cuda

    return None if cuda.cuda_available() else "needs cuda-python and a CUDA device, found none"


def _missing_tensorrt() -> str | None:
    from kandinsky_trt.runtime.backends.trt_engine import TensorRTUnavailableError, import_tensorrt

    try:
        import_tensorrt()  # the Python package and its libraries (a missing libnvinfer is an OSError there)
    except TensorRTUnavailableError as err:
        return str(err)
    return None


MARKER_REQUIREMENTS = {"gpu": _missing_cuda_device, "tensorrt": _missing_tensorrt}


# The files that take longest (exports, C++ builds, the fuzz pass, the demo, servers), run first
# in this order; the others follow in collection order. With ``--dist loadfile`` and
# ``--no-loadscope-reorder`` (pyproject.toml) the workers take files in this order, so the dynamo
# fp16 export (the longest, needed by five files) starts at once on one worker (the golden outputs
# need it first) while the other runs long files that need no shared fp16 export, and the short
# files are left to even out the end. Keep the files that wait for ``artifacts_fp16`` /
# ``artifacts_fp16_b2_wide`` / ``artifacts_fp32_multi`` (the golden file's exports) after the
# independent ones, or a worker idles on their lock.
LONG_FILES_FIRST = (
    "test_golden_outputs.py",  # exports fp16 (dynamo, ~2.5 min), fp16 batch 2 and fp32 multi-profile
    "test_cpp_fuzz.py",  # clang build + the 45 s fuzz pass
    "test_export_batches.py",  # its own dynamo export
    "test_movq_scale.py",  # its own two-level checkpoint and export
    "test_export_transactions.py",  # its own exports, one killed
    "test_cli_demo.py",  # the demo (shared with test_readme.py, whichever runs first makes it)
    "test_readme.py",
    "test_cpp_hostile.py",  # ASan build
    "test_console.py",  # a dynamo export
    "test_pipelines.py",  # from here: files that need the golden file's exports
    "test_precision_debug.py",
    "test_export.py",
    "test_pipeline_batches.py",
    "test_cpp_host.py",
    "test_cli_success.py",
    "test_gpu_suite_dry_run.py",
    "test_serve_replicas.py",
    "test_serve.py",
    "test_serve_edge.py",
    "test_serve_lifetime.py",
    "test_serve_steps.py",  # a step-scheduled server; its last test kills and reloads the model
    "test_step_executor.py",
    "test_slots.py",
    "test_serve_steps_units.py",
    "test_checkpoints.py",
    "test_bad_inputs_arguments.py",
    "test_artifact_trust.py",
    "test_deploy.py",
)


@pytest.hookimpl(specname="pytest_collection_modifyitems")
def pytest_long_files_first(config, items):  # a second implementation of that hook
    """Reorder ``items`` (stable, whole files kept together) by ``LONG_FILES_FIRST``."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(trylast=True)  # after ``-m`` / ``-k`` deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` / ``tensorrt`` tests where their requirement is missing (the markers' promise in
    pyproject.toml). Each check runs once, and only when a selected test carries its marker: a
    selection without such tests never imports cuda-python or TensorRT."""
    for marker, missing in MARKER_REQUIREMENTS.items():
        marked = [item for item in items if item.get_closest_marker(marker)]
        reason = missing() if marked else None
        for item in marked if reason else ():
            item.add_marker(pytest.mark.skip(reason=f"{marker}: {reason}"))


REPO = Path(__file__).resolve().parents[1]
DEMO_COMMAND = ".venv/bin/kandinsky-trt demo"  # the quick start's second line, as README.md writes it


@dataclass(frozen=True)
class DemoRun:
    """``kandinsky-trt demo`` run once per session as a new user runs it: ``cwd`` is a fresh working
    folder whose ``.venv`` is this interpreter's environment (so README lines that start with
    ``.venv/bin/`` work there), ``out`` the ``kandinsky-demo`` folder it wrote."""

    cwd: Path
    out: Path
    returncode: int
    stdout: list[str]
    stderr: list[str]


def user_environment(cwd: Path) -> dict:
    """The environment of a shell after the quick start: the venv is *not* on PATH, so a bare
    ``kandinsky-trt`` or ``python`` fails as it does for a new user."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
            if p and Path(p).resolve() != Path(venv_bin).resolve()]
    return {**os.environ, "PATH": os.pathsep.join(path), "PWD": str(cwd), "VIRTUAL_ENV": ""}


CLONE_FOLDERS = ("benchmarks", "deploy", "docs", "engine", "export", "runtime")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The quick start's demo, once per test run (tests/test_cli_demo.py and tests/test_readme.py,
    on whichever workers they run: ``shared``). Its tests only read what it wrote; the README's
    blocks write their own files beside ``kandinsky-demo``."""
    return shared(tmp_path_factory, "newcomer", _run_demo)


def _run_demo(cwd: Path) -> DemoRun:
    (cwd / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    for folder in CLONE_FOLDERS:  # what a clone has beside the venv, read by the README's blocks
        (cwd / folder).symlink_to(REPO / folder, target_is_directory=True)
    done = subprocess.run(DEMO_COMMAND.split(), cwd=cwd, env=user_environment(cwd), capture_output=True,
                          text=True, timeout=1800)
    return DemoRun(cwd, cwd / "kandinsky-demo", done.returncode, done.stdout.strip().splitlines(),
                   done.stderr.strip().splitlines())


def shared(tmp_path_factory, label: str, make):
    """``make(folder)``'s result, made once per test run even with pytest-xdist's workers: the first
    worker that needs ``label`` makes it in the run's shared temporary folder (under a file lock),
    the others wait for it and reuse it. ``make``'s result is pickled beside the folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above every worker's own
    folder = root / "shared" / label
    result = folder.with_name(f"{label}.pickle")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if result.is_file():
            return pickle.loads(result.read_bytes())
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        value = make(folder)
        result.write_bytes(pickle.dumps(value))
    return value


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    return shared(tmp_path_factory, "tiny", lambda folder: write_tiny_checkpoint(folder / "checkpoint", seed=0))


def _export(tmp_path_factory, checkpoint, precision: str, batch: int, height: int, width: int,
            exporter: str = "legacy"):
    from kandinsky_trt.runtime.contract.spec import Profile

    return _export_profiles(tmp_path_factory, checkpoint, precision, (Profile(batch, height, width, cfg=True),),
                            f"artifacts_{precision}_b{batch}_{height}x{width}", exporter)


def _export_profiles(tmp_path_factory, checkpoint, precision: str, profiles: tuple, label: str,
                     exporter: str = "legacy"):
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs

    dirs = CheckpointDirs(checkpoint.prior, checkpoint.decoder, checkpoint.inpaint)

    def export(out: Path):
        return out, export_artifacts(ExportConfig(dirs, out, profiles, precision, exporter=exporter, verify=True))

    return shared(tmp_path_factory, f"{label}_{exporter}", export)


@pytest.fixture(scope="session")
def artifacts_fp32(tmp_path_factory, tiny_checkpoint):
    """fp32 graphs, batch 1, 64x64, with guidance."""
    return _export(tmp_path_factory, tiny_checkpoint, "fp32", 1, 64, 64)


@pytest.fixture(scope="session")
def artifacts_fp16(tmp_path_factory, tiny_checkpoint):
    """fp16 graphs, batch 1, 64x64, with guidance; the default (dynamo) exporter."""
    return _export(tmp_path_factory, tiny_checkpoint, "fp16", 1, 64, 64, exporter="dynamo")


@pytest.fixture(scope="session")
def artifacts_fp32_b2_wide(tmp_path_factory, tiny_checkpoint):
    """fp32 graphs, batch 2, non-square 64x128."""
    return _export(tmp_path_factory, tiny_checkpoint, "fp32", 2, 64, 128)


@pytest.fixture(scope="session")
def artifacts_fp16_b2_wide(tmp_path_factory, tiny_checkpoint):
    """fp16 graphs, batch 2, non-square 64x128."""
    return _export(tmp_path_factory, tiny_checkpoint, "fp16", 2, 64, 128)


@pytest.fixture(scope="session")
def artifacts_fp32_multi(tmp_path_factory, tiny_checkpoint):
    """fp32 graphs, one artifacts set of 4 profiles: sizes 64x64 and 64x128 (height x width) x batches 1, 2
    (the sizes of ``artifacts_fp32`` and ``artifacts_fp32_b2_wide``)."""
    from kandinsky_trt.runtime.contract.spec import Profile

    profiles = tuple(Profile(b, h, w, cfg=True) for h, w in ((64, 64), (64, 128)) for b in (1, 2))
    return _export_profiles(tmp_path_factory, tiny_checkpoint, "fp32", profiles, "artifacts_fp32_multi")
