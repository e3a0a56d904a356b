"""The backend interface: load a network named in the manifest, run it by tensor name.

Every backend (``ort``, ``torch``, ``trt``) returns :class:`NetworkSession` objects with the same
contract, so pipelines never know which one runs underneath. Standard library + numpy only.
"""

from __future__ import annotations

import abc
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.errors import KandinskyTrtError
from kandinsky_trt.runtime.spec import ResolvedNetwork


class BackendError(KandinskyTrtError, RuntimeError):
    """A backend could not load or run a network (missing files, mismatched artifacts, ...)."""


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
    def load(self, network: str) -> NetworkSession:
        """Load ``network`` (a name from the manifest) and check it against the manifest."""

    def close(self) -> None:
        """Free every session this backend created; idempotent."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
