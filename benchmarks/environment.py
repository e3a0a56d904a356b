"""Where a benchmark runs: machine description, package versions and host memory figures.

Recorded in every result file (:mod:`kandinsky_trt.benchmarks.report`). Standard library only;
package versions are read from installed metadata, nothing heavy is imported.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
from dataclasses import dataclass
from importlib import metadata, util


def peak_host_rss_mb() -> float:
    """Peak resident set size of this process (``getrusage`` ``ru_maxrss``) in MiB.

    A high-water mark since start, or since :func:`reset_peak_host_rss`.
    """
    import resource  # POSIX only; imported here so the module loads everywhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def current_host_rss_mb() -> float | None:
    """Current resident set size (``VmRSS`` of ``/proc/self/status``) in MiB; None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_host_rss() -> bool:
    """Reset the peak-RSS mark (Linux >= 4.0: ``5`` into ``/proc/self/clear_refs``), so the
    next :func:`peak_host_rss_mb` measures one stage. Returns False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class MachineInfo:
    """The host: name, CPU model, logical cores, RAM in GiB, ``platform.platform()``."""

    hostname: str
    cpu_model: str
    cores: int
    ram_gb: float
    platform: str = ""

    @classmethod
    def collect(cls) -> "MachineInfo":
        return cls(socket.gethostname(), _cpu_model(), os.cpu_count() or 0, _ram_gb(), platform.platform())


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


# module name -> distribution names that provide it (the GPU builds have other names)
_VERSIONED = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"),
}


def _version_of(module: str, distributions: tuple[str, ...]) -> str | None:
    """The installed version, or None when the module is not importable; nothing is imported."""
    if util.find_spec(module) is None:
        return None
    for dist in distributions:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def collect_versions() -> dict[str, str]:
    """Versions of kandinsky_trt, python and the numerical packages that are importable."""
    versions = {"python": platform.python_version()}
    try:
        versions["kandinsky_trt"] = metadata.version("kandinsky-trt")
    except metadata.PackageNotFoundError:
        versions["kandinsky_trt"] = "unknown"
    for module, dists in _VERSIONED.items():
        found = _version_of(module, dists)
        if found is not None:
            versions[module] = found
    return versions
