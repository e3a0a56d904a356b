"""``kandinsky-trt serve`` in a child process on free loopback ports: what the serving benchmarks and the
serving tests start (tests/serve_helpers.py builds on it).

The child's output is collected line by line; ``stop`` sends SIGTERM to the CLI (which stops its
tritonserver), then SIGKILLs both by PID if anything is left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from kandinsky_trt.runtime.serve.launcher import free_port

PORTS = ("http", "grpc", "metrics")


class ServeCli:
    """The CLI server child; ``ports`` (http, grpc, metrics) free ones unless given."""

    def __init__(self, artifacts: Path, *flags: str, ports: dict | None = None, new_session: bool = False) -> None:
        self.ports = ports or {name: free_port() for name in PORTS}
        cmd = [sys.executable, "-m", "kandinsky_trt.runtime.cli.main", "serve", "--artifacts", str(artifacts),
               *(a for name in PORTS for a in (f"--{name}-port", str(self.ports[name]))), *flags]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=new_session)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def triton_pid(self) -> int | None:
        """The tritonserver PID the CLI printed once serving (None before)."""
        for line in self.lines:
            if "tritonserver pid " in line:
                return int(line.split("tritonserver pid ")[1].split(";")[0])
        return None

    def stop(self) -> int | None:
        """SIGTERM to the CLI, then SIGKILL to it and tritonserver's group if left; the CLI's exit status."""
        triton = self.triton_pid()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if triton is not None:
            try:
                os.killpg(triton, signal.SIGKILL)  # tritonserver leads its own group (stubs included)
            except ProcessLookupError:
                pass
        return self.process.returncode
