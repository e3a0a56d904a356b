"""The suite's own machinery: the ``gpu`` / ``tensorrt`` skip hook (tests/conftest.py) and the parity
check of tests/pipeline_helpers.py, whose measurement printing must never switch its assertion off."""

from __future__ import annotations

import conftest  # tests/ is on sys.path under pytest
import pytest
from pipeline_helpers import check_close


class _Item:
    """What the hook reads and writes of a collected test: its markers."""

    def __init__(self, *markers: str) -> None:
        self.markers = [getattr(pytest.mark, m) for m in markers]

    def get_closest_marker(self, name: str):
        return next((m for m in self.markers if m.name == name), None)

    def add_marker(self, marker) -> None:
        self.markers.append(marker)

    @property
    def skip_reasons(self) -> list[str]:
        return [m.kwargs["reason"] for m in self.markers if m.name == "skip"]


def test_marker_hook_skips_only_what_misses_its_requirement(monkeypatch):
    checks = []
    requirements = {"gpu": lambda: checks.append("gpu") or "no CUDA device",
                    "tensorrt": lambda: checks.append("tensorrt")}  # None: TensorRT present
    monkeypatch.setattr(conftest, "MARKER_REQUIREMENTS", requirements)
    gpu, both, trt, plain = _Item("gpu"), _Item("gpu", "tensorrt"), _Item("tensorrt"), _Item("slow")
    conftest.pytest_collection_modifyitems(None, [gpu, both, trt, plain])
    assert checks == ["gpu", "tensorrt"]  # each requirement checked once
    assert gpu.skip_reasons == both.skip_reasons == ["gpu: no CUDA device"]
    assert trt.skip_reasons == plain.skip_reasons == []


def test_marker_hook_checks_nothing_without_marked_tests(monkeypatch):
    monkeypatch.setattr(conftest, "MARKER_REQUIREMENTS", {"gpu": pytest.fail, "tensorrt": pytest.fail})
    plain = _Item()
    conftest.pytest_collection_modifyitems(None, [plain])
    assert plain.skip_reasons == []


def test_measurement_printing_keeps_the_assertion(monkeypatch, capsys):
    monkeypatch.setenv("KTRT_MEASURE", "1")
    check_close("unet", 1e-7, 1e-6)
    with pytest.raises(AssertionError, match=r"unet: max abs diff 2.000e-06 >= tolerance 1e-06"):
        check_close("unet", 2e-6, 1e-6)
    assert capsys.readouterr().out.splitlines() == ["PARITY unet 1.000e-07", "PARITY unet 2.000e-06"]
