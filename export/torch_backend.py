"""Torch backend: the original diffusers / transformers modules, loaded from the checkpoints.

It is the parity oracle (same pipeline code, the real modules underneath) and the eager baseline
of the benchmarks. The networks run through the same wrappers export traces
(``torch_modules.py``), in fp32; the step and bridge graphs (``spec.WEIGHT_FREE``) are tiny generated
ONNX graphs, not torch modules, so they run through ONNX Runtime on the CPU.

torch, diffusers and transformers are imported when a network is loaded, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import Backend, BackendError, NetworkSession, check_feeds
from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.contract.spec import NETWORK_SOURCE, WEIGHT_FREE, ResolvedNetwork


class TorchSession(NetworkSession):
    """One network at one profile; the sessions of every profile share one module."""

    def __init__(self, network: ResolvedNetwork, module, device: str) -> None:
        super().__init__(network)
        self._module = module
        self._device = device

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        check_feeds(self.network, feeds)
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self._device) for n in self.network.input_names]
            outputs = self._module(*args)
        return {n: o.cpu().numpy() for n, o in zip(self.network.output_names, outputs)}

    def close(self) -> None:
        self._module = None


class TorchBackend(Backend):
    """Networks from the checkpoint directories recorded in the manifest."""

    name = "torch"

    def __init__(self, manifest: mf.Manifest, device: str = "cpu") -> None:
        self.manifest = manifest
        self.device = device
        self._modules: dict[str, object] = {}  # network -> its wrapper module, one per network
        self._sessions: dict[tuple[str, int], NetworkSession] = {}
        self._steps = OrtBackend(manifest)

    def _component_dir(self, network: str) -> Path:
        checkpoint, subfolder = NETWORK_SOURCE[network]
        root = self.manifest.checkpoints.get(checkpoint)
        path = Path(root) / subfolder if root else None
        if path is None or not (path / "config.json").is_file():
            raise BackendError(
                f"{network}: the torch backend needs the {checkpoint} checkpoint the artifacts were exported "
                f"from; expected {path}/config.json, found no such file"
            )
        return path

    def load(self, network: str, profile: int = 0) -> NetworkSession:
        if network in WEIGHT_FREE:
            return self._steps.load(network, profile)
        key = (network, profile)
        if key not in self._sessions:
            resolved = self.manifest.network(network).resolved(profile)
            self._sessions[key] = TorchSession(resolved, self._module(network), self.device)
        return self._sessions[key]

    def _module(self, network: str):
        if network not in self._modules:
            from kandinsky_trt.export.torch_modules import WRAPPERS, load_module

            import torch

            module = load_module(network, self._component_dir(network)).to(self.device)
            self._modules[network] = WRAPPERS[network](module, torch.float32)
        return self._modules[network]

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._modules.clear()
        self._steps.close()


def create(manifest: mf.Manifest, device: str = "cpu") -> TorchBackend:
    """The runtime registry's factory, registered as the ``torch`` backend in ``pyproject.toml``."""
    return TorchBackend(manifest, device=device)
