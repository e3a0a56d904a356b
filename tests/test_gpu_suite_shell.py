"""The GPU suite's shell script (``benchmarks/gpu_suite.sh``): wheel joining with bash on temporary files,
and the run it hands over to (on a machine without CUDA: wheels installed, then exit 2 naming the dry run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

SUITE_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def _wheel(path: Path, size: int) -> bytes:
    """A small valid zip named like a wheel, padded with incompressible bytes to ``size``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ktrt_probe/__init__.py", "VALUE = 42\n")
        z.writestr("ktrt_probe/pad.bin", np.random.default_rng(0).bytes(size))
        z.writestr("ktrt_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ktrt-probe\nVersion: 1.0\n")
        z.writestr("ktrt_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("ktrt_probe-1.0.dist-info/RECORD", "")
    return path.read_bytes()


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("split") is None, reason="needs bash and split")
def test_suite_joins_split_wheels(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    whole = _wheel(source / "ktrt_probe-1.0-py3-none-any.whl", 300_000)
    pieces = tmp_path / "wheels"
    pieces.mkdir()
    subprocess.run(["split", "-b", "100000", source / "ktrt_probe-1.0-py3-none-any.whl",
                    pieces / "ktrt_probe-1.0-py3-none-any.whl.part-"], check=True)
    assert sorted(p.name for p in pieces.iterdir())[-1].endswith(".part-ad")  # 4 pieces, joined in order
    (pieces / "other-2.0-py3-none-any.whl").write_bytes(whole)  # an unsplit wheel is taken as it is
    dest = tmp_path / "joined"
    result = subprocess.run(["bash", SUITE_SH, "--join-only", pieces, dest], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["ktrt_probe-1.0-py3-none-any.whl", "other-2.0-py3-none-any.whl"]
    assert (dest / "ktrt_probe-1.0-py3-none-any.whl").read_bytes() == whole
    assert zipfile.ZipFile(dest / "ktrt_probe-1.0-py3-none-any.whl").testzip() is None


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_suite_refuses_a_missing_piece_and_no_cuda_device(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(tmp_path / "w.whl", 1000)
    data = (tmp_path / "w.whl").read_bytes()
    (wheels / "w-1.0-py3-none-any.whl.part-aa").write_bytes(data[:500])
    (wheels / "w-1.0-py3-none-any.whl.part-ac").write_bytes(data[500:])  # -ab is missing
    result = subprocess.run(["bash", SUITE_SH, "--join-only", wheels, tmp_path / "j"], capture_output=True, text=True)
    assert result.returncode != 0 and "part-ab" in result.stderr
    import torch

    if torch.cuda.is_available():
        return
    (wheels / "w-1.0-py3-none-any.whl.part-ac").unlink()
    _wheel(wheels / "ktrt_probe-1.0-py3-none-any.whl", 100)
    (wheels / "w-1.0-py3-none-any.whl.part-aa").unlink()
    env = {**os.environ, "PYTHON": sys.executable, "SITE_DIR": str(tmp_path / "site")}
    result = subprocess.run(["bash", SUITE_SH, wheels, tmp_path / "out"], capture_output=True, text=True, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA device" in result.stderr and "--dry-run" in result.stderr
    assert (tmp_path / "site" / "ktrt_probe" / "__init__.py").is_file()  # the wheels were installed first
