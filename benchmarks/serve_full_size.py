"""Serving benchmark on full-size networks: :mod:`serve_bench` with a workload a 2-core CPU serves in minutes.

    python -m kandinsky_trt.benchmarks.serve_full_size --artifacts A --name STEM

``A`` is a full-size artifacts directory: ``python -m kandinsky_trt.export.full_size_checkpoints CKPT``
then ``kandinsky-trt export --prior CKPT/prior --decoder CKPT/decoder --precision fp32 --height 256
--width 256 --batch 2 --out A`` (random weights: the cost of real networks, not their images). The
same side-by-side run as the tiny one (in-process API, Triton with dynamic batching on and off), at
concurrency 1 and 2, 2 prior + 2 decoder steps, a few requests per level and one round by default.

Memory is the constraint here: every network the manifest lists is resident in the Triton stub
(12.3 GiB of fp32 graphs at 256x256), and in this process while the in-process API runs. The run
refuses to start unless ``MemAvailable`` exceeds the weights plus :data:`HEADROOM_GB`, and records the
peak RSS of the server's process tree (tritonserver + its Python stub) next to this process's own.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from kandinsky_trt.benchmarks import serve_bench

HEADROOM_GB = 3.0  # activations, ONNX Runtime arenas, Python, tritonserver itself
SAMPLE_S = 0.5


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    except OSError:  # exited between listing and reading
        return 0


def _descendants(root: int) -> list[int]:
    """PIDs below ``root`` (children, their children, ...), from each process's ppid in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # Field 4 of /proc/PID/stat, after the parenthesised command (which may hold spaces).
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ChildTreeRssSampler:
    """Peak summed RSS of this process's descendants (the tritonserver it starts and its stubs)."""

    def __init__(self, root: int) -> None:
        self.root, self.peak_mb = root, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            total_mb = sum(_rss_kib(pid) for pid in _descendants(self.root)) / 1024
            self.peak_mb = max(self.peak_mb, total_mb)

    def __enter__(self) -> "ChildTreeRssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _mem_available_gb() -> float:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        return next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:")) / 2**20


def check_memory(artifacts: Path) -> float:
    """The manifest's network weights in GB; raises unless this machine has room for them now."""
    from kandinsky_trt.runtime.contract import manifest as mf

    manifest = mf.load_manifest(artifacts)
    weights_gb = sum(manifest.files[name].size for entry in manifest.networks.values()
                     for name in (entry.onnx, *entry.external_data)) / 2**30
    available = _mem_available_gb()
    if available < weights_gb + HEADROOM_GB:
        raise SystemExit(f"memory: expected MemAvailable >= {weights_gb + HEADROOM_GB:.1f} GB (the graphs' "
                         f"{weights_gb:.1f} GB + {HEADROOM_GB} GB), found {available:.1f} GB; not started")
    return weights_gb


def main() -> None:
    parser = serve_bench.build_parser()
    parser.set_defaults(label="full-size networks (random weights), 256x256, batch-2 artifacts",
                        concurrency=[1, 2], steps=2, prior_steps=2, requests=4, warmup=1, rounds=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    weights_gb = check_memory(Path(args.artifacts))
    with ChildTreeRssSampler(os.getpid()) as sampler:
        result = serve_bench.run(args)
    result["memory"] = {"graph_files_gb": round(weights_gb, 2), "peak_rss_mb_server_tree": round(sampler.peak_mb),
                        "peak_rss_mb_client_process": round(result.pop("peak_rss_mb_client_process"))}
    serve_bench.write_report(result, Path(args.out), args.name)


if __name__ == "__main__":
    main()
