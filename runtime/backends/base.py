"""The backend interface at two levels, and the denoising loop each backend runs.

* Host level, every backend (``ort``, ``torch``, ``trt``): ``load(network, profile)`` returns a
  :class:`NetworkSession` at the static shapes of manifest profile ``profile`` (an index of
  ``manifest.profiles``; the sessions of one network share its weights); ``run(feeds)`` takes and
  returns host numpy arrays by spec tensor name, so pipelines never know which backend runs underneath.
* Device level, the backends with device buffers (:class:`DeviceBackend`: ONNX Runtime with IO
  binding, TensorRT): ``allocate(tensor)`` a buffer, ``bind(network, buffers)`` one buffer to every
  input and output once (at one profile), and ``BoundNetwork.enqueue(stream)`` runs on them;
  ``write_rows`` copies host rows into row offsets of a buffer (its address never changes, so a
  captured CUDA graph stays valid), ``runner`` enqueues bound networks in order with the backend's
  CUDA graphs, ``read`` is the download and its one sync, ``free`` frees buffers once queued work
  is done. The device storage of the loop of slots (``runtime/loops/device.py``) uses this level only.
* Device-resident values: :class:`DeviceRows` names rows of a device buffer (a stage output, a
  loop's retired latents) without downloading them; ``write_rows`` takes one as its source (a
  device-to-device copy ordered on the backend's stream where the backend has one), so stage
  outputs can feed the next stage's inputs on the device (``runtime/backends/resident.py``).
* Loops are built by the loops layer (:func:`kandinsky_trt.runtime.loops.factory.make_loop`), never
  here: a backend never imports a loop.

Standard library + numpy at import (the loop modules are imported when a loop is made).
"""

from __future__ import annotations

import abc
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor

class BackendError(KandinskyTrtError, RuntimeError):
    """A backend could not load or run a network (missing files, mismatched artifacts, ...)."""


class DeviceRows:
    """Rows ``rows`` (indices into the first axis) of a device ``buffer`` holding ``tensor``: a
    handle, nothing is copied. Indexing (a slice or an index list) selects rows of the selection,
    as numpy does, so the loop's row bookkeeping works on device values as on host arrays.
    """

    def __init__(self, buffer: Any, tensor: ResolvedTensor, rows: Sequence[int] | None = None) -> None:
        self.buffer, self.tensor = buffer, tensor
        self.rows = tuple(range(tensor.shape[0])) if rows is None else tuple(int(r) for r in rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.tensor.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.tensor.dtype)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> "DeviceRows":
        rows = np.asarray(self.rows)[key]
        if rows.ndim != 1:
            raise BackendError(f"{self.tensor.name}: device rows expected a slice or an index list, found {key!r}")
        return DeviceRows(self.buffer, self.tensor, rows.tolist())

    def runs(self) -> list[tuple[int, int]]:
        """(first source row, row count) of each run of consecutive rows: one copy each."""
        out: list[tuple[int, int]] = []
        for row in self.rows:
            if out and out[-1][0] + out[-1][1] == row:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((row, 1))
        return out

    def __repr__(self) -> str:
        return f"DeviceRows({self.tensor.name}, rows={list(self.rows)})"


class NetworkSession(abc.ABC):
    """One loaded network. Inputs and outputs are host numpy arrays keyed by spec tensor name."""

    def __init__(self, network: ResolvedNetwork) -> None:
        self.network = network

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. ``feeds`` holds every input of the resolved spec with its exact shape and dtype."""

    def close(self) -> None:
        """Free what the session holds; idempotent."""

    def __enter__(self) -> "NetworkSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backend(abc.ABC):
    """Creates sessions for the networks of one artifacts directory."""

    name: str = ""

    @abc.abstractmethod
    def load(self, network: str, profile: int = 0) -> NetworkSession:
        """Load ``network`` (a name from the manifest) at manifest profile ``profile`` and check it
        against the manifest; the weights are loaded once per network, whatever the profile."""

    def close(self) -> None:
        """Free every session this backend created; idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BoundNetwork(abc.ABC):
    """One network with a device buffer bound to each input and output, once; runs read and write them."""

    def __init__(self, network: ResolvedNetwork, buffers: Mapping[str, Any]) -> None:
        self.network = network
        self.buffers = dict(buffers)  # held so that every bound (and captured) address stays valid

    @abc.abstractmethod
    def enqueue(self, stream: Any = None) -> None:
        """Run once on the bound buffers, on ``stream`` where the backend takes one."""

    def close(self) -> None:
        """Release the binding (not the buffers: their owner frees them); idempotent."""


class StepRunner(abc.ABC):
    """Runs a fixed sequence of bound networks, in order, each time :meth:`run` is called.

    Where the backend has CUDA graphs and they are enabled, the runner captures the sequence (or
    each binding, ONNX Runtime's way) and replays it; the buffers are bound once, so a replay reads
    whatever was written into them since.
    """

    @abc.abstractmethod
    def run(self) -> None:
        """Enqueue one run of the sequence after every earlier write; never waits for it to finish
        where the backend queues work (TensorRT), never syncs for a replay."""

    def close(self) -> None:
        """Drop captured graphs; idempotent."""


class DeviceBackend(Backend):
    """A backend with device buffers: the device level of the interface (see the module docstring)."""

    # Whether ``write_rows`` from :class:`DeviceRows` stays on the device (no download, no sync):
    # where it does not, chaining stages on the device saves nothing, so pipelines keep host hops.
    copies_on_device: bool = False

    @abc.abstractmethod
    def allocate(self, tensor: ResolvedTensor) -> Any:
        """A new, uninitialised buffer for ``tensor`` on this backend's device; the caller frees it
        (:meth:`free`)."""

    @abc.abstractmethod
    def bind(self, network: str, buffers: Mapping[str, Any], profile: int = 0) -> BoundNetwork:
        """Bind ``buffers`` (one per input and output of ``network`` at ``profile``, by name) once."""

    @abc.abstractmethod
    def write_rows(self, buffer: Any, tensor: ResolvedTensor, first_row: int, values: np.ndarray | DeviceRows) -> None:
        """Copy ``values`` (whole rows of ``tensor``) into ``buffer`` from row ``first_row`` on, ordered
        after every run enqueued before and before every run enqueued after; the buffer's address
        never changes. The backend keeps ``values`` alive until the copy is done. ``values`` may be
        :class:`DeviceRows` of this backend (rows of the same row shape and dtype): a device-to-device
        copy where the backend's API has one (see each backend for what it costs)."""

    @abc.abstractmethod
    def read(self, buffer: Any, tensor: ResolvedTensor) -> np.ndarray:
        """A host copy of ``buffer`` (``tensor``'s shape and dtype) after all work enqueued before:
        the download and its one synchronisation."""

    @abc.abstractmethod
    def runner(self, bindings: Sequence[BoundNetwork], cuda_graph: bool = True) -> StepRunner:
        """A :class:`StepRunner` of ``bindings`` (made by :meth:`bind`), replaying CUDA graphs where
        the backend has them and ``cuda_graph`` is true (False: the same bindings eagerly)."""

    def free(self, buffers: Iterable[Any]) -> None:
        """Free ``buffers`` (from :meth:`allocate`) once the work enqueued on them is done."""
        for buffer in buffers:
            close = getattr(buffer, "close", None)
            if close is not None:
                close()


def check_device_rows(values: DeviceRows, tensor: ResolvedTensor, first_row: int) -> None:
    """Raise unless ``values`` fit rows ``first_row..`` of ``tensor`` (row shape, dtype, row range)."""
    if (values.shape[1:], values.dtype) != (tuple(tensor.shape[1:]), np.dtype(tensor.dtype)):
        raise BackendError(f"{tensor.name}: expected rows of {tensor.dtype}{list(tensor.shape[1:])}, found "
                           f"{values.dtype}{list(values.shape[1:])} ({values.tensor.name})")
    if not 0 <= first_row <= first_row + len(values) <= tensor.shape[0]:
        raise BackendError(f"{tensor.name}: rows expected within [0, {tensor.shape[0]}), found "
                           f"[{first_row}, {first_row + len(values)})")


def check_buffer_names(network: ResolvedNetwork, buffers: Mapping[str, Any]) -> None:
    """Raise unless ``buffers`` has exactly one entry per input and output of ``network``."""
    names = sorted(network.input_names + network.output_names)
    if sorted(buffers) != names:
        raise BackendError(f"{network.name}: buffers expected {names}, found {sorted(buffers)}")


def check_feeds(network: ResolvedNetwork, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise a readable error when ``feeds`` do not match the resolved spec exactly."""
    expected = {t.name: t for t in network.inputs}
    missing, extra = set(expected) - set(feeds), set(feeds) - set(expected)
    if missing or extra:
        raise BackendError(
            f"{network.name}: inputs expected {sorted(expected)}, found {sorted(feeds)}"
            f" (missing {sorted(missing)}, unexpected {sorted(extra)})"
        )
    for name, tensor in expected.items():
        array = feeds[name]
        if tuple(array.shape) != tensor.shape or array.dtype != np.dtype(tensor.dtype):
            raise BackendError(
                f"{network.name}.{name}: expected {tensor.dtype}{list(tensor.shape)}, "
                f"found {array.dtype}{list(array.shape)}"
            )


def sample_inputs(network: ResolvedNetwork, seed: int = 0) -> dict[str, np.ndarray]:
    """Plausible inputs for any network: token ids, text masks of mixed lengths, timestep 500,
    N(0, 1) floats. Used to trace exports, check parity and time stages."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in network.inputs:
        if t.name == "input_ids":
            feeds[t.name] = rng.integers(3, 30, size=t.shape, dtype=np.int64)
        elif t.name == "attention_mask":
            lengths = rng.integers(2, t.shape[1] + 1, size=t.shape[0])
            feeds[t.name] = (np.arange(t.shape[1])[None, :] < lengths[:, None]).astype(t.dtype)
        elif t.name == "timestep":
            feeds[t.name] = np.full(t.shape, 500.0, dtype=np.float32)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds
