"""Nothing outlives `kandinsky-trt serve` (issue 18 §1.4, §1.5, §4): a SIGKILLed launcher takes
tritonserver and its stubs with it, its leftovers are removed by the next start, the shared-memory
regions are private while serving and gone after; a busy port is named first."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import CliServer

from kandinsky_trt.runtime.serve import hygiene
from kandinsky_trt.runtime.serve.launcher import is_ready
from kandinsky_trt.runtime.serve.watchdog import _stat, stubs_of

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")

GONE_WITHIN_S = 10.0


def _gone(pid: int) -> bool:
    stat = _stat(pid)
    return stat is None or stat[0] == "Z"


def _leftovers(pid: int) -> list[Path]:
    tmp = [p for prefix in hygiene.DIR_PREFIXES for p in Path("/tmp").glob(f"{prefix}-{pid}-*")]
    return tmp + list(hygiene.SHM_DIR.glob(f"{hygiene.SHM_PREFIX}-{pid}-*"))


def _ports_free(ports: dict) -> bool:
    try:
        hygiene.check_ports_free("127.0.0.1", {f"--{k}-port": v for k, v in ports.items()})
        return True
    except hygiene.PortInUse:
        return False


def test_sigkilled_serve_leaves_nothing_running_and_the_next_start_cleans_up(artifacts_fp32_b2_wide):
    first = CliServer(artifacts_fp32_b2_wide[0], new_session=True)
    second = None
    try:
        first.wait_ready()
        launcher, triton = first.process.pid, first.triton_pid()
        stubs = stubs_of(triton)
        regions = list(hygiene.SHM_DIR.glob(f"{hygiene.SHM_PREFIX}-{launcher}-*"))
        assert stubs and regions, (stubs, regions)
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in regions), [oct(p.stat().st_mode) for p in regions]

        first.process.kill()  # SIGKILL: no handler, no cleanup of its own
        first.process.wait(timeout=10)
        # Looked at at once: any `serve` start (another test worker's too) sweeps a dead launcher's files.
        left = _leftovers(launcher)
        killed = time.monotonic()
        while not (all(_gone(p) for p in {triton, *stubs}) and _ports_free(first.ports)):
            assert time.monotonic() - killed < GONE_WITHIN_S, "tritonserver or a stub outlived its launcher"
            time.sleep(0.1)
        print(f"\nlauncher SIGKILLed: server and stubs gone, ports free after {time.monotonic() - killed:.2f} s")
        assert left, "expected what a SIGKILLed launcher cannot remove (the next start does)"

        second = CliServer(artifacts_fp32_b2_wide[0], ports=first.ports)
        second.wait_ready()
        assert _leftovers(launcher) == [], "the next start left the dead launcher's leftovers"
        assert is_ready(second.config)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert second.process.returncode == 0, "".join(second.lines)
    assert _leftovers(second.process.pid) == [], "a stopped server left files behind"


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
def test_busy_port_is_named_first(artifacts_fp32_b2_wide, flag):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "kandinsky_trt.runtime.cli.main", "serve", "--artifacts",
                                 str(artifacts_fp32_b2_wide[0]), "--http-port", "0", "--grpc-port", "0",
                                 "--metrics-port", "0", flag, str(port)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines()[0] == f"error: {flag}: expected a free port, found {port} in use"
    assert "serving" not in result.stdout


_ECHO_CONFIG = '''name: "echo"
backend: "python"
max_batch_size: 1
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
'''
_ECHO_MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
'''


def test_a_port_taken_after_the_check_is_still_named_first(tmp_path, monkeypatch):
    """The race the check cannot close (taken between the check and Triton's bind): Triton's own
    "already in use" line leads the error, not its option table."""
    from kandinsky_trt.runtime.serve.launcher import ServerConfig, ServerError, TritonServer

    (tmp_path / "echo" / "1").mkdir(parents=True)
    (tmp_path / "echo" / "config.pbtxt").write_text(_ECHO_CONFIG)
    (tmp_path / "echo" / "1" / "model.py").write_text(_ECHO_MODEL)
    monkeypatch.setattr(hygiene, "check_ports_free", lambda *a: None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = ServerConfig(tmp_path, http_port=0, grpc_port=port, metrics_port=0, startup_timeout_s=60, model="")
        with pytest.raises(ServerError) as err:
            TritonServer(config).start()
    assert str(err.value).splitlines()[0] == f"--grpc-port: expected a free port, found {port} in use"
