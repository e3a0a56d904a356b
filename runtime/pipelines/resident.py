"""One request's device-resident stage chain: :class:`ResidentChain` (issue 19, item 5).

On a device backend whose copies stay on the device (``DeviceBackend.copies_on_device``:
TensorRT) the pipelines run text encoders, loops and MoVQ through a chain, so stage outputs stay
in device buffers: the text encoders'
outputs are copied into the loop's conditioning rows on the device, the loop's retired latents are
copied (device to device) straight into the MoVQ decoder's bound input, and only what the host
needs is downloaded (:meth:`ResidentChain.download`: the image, or the prior pipeline's embeddings).
Between two stages the elementwise maths runs as a bridge graph (``spec.BRIDGE_NETWORKS``) where the
artifacts have it: the prior's final latents become CLIP image embeddings on the device
(:meth:`ResidentChain.image_embeds`), kept per chunk (:meth:`ResidentChain.keep`) until the decoder
gathers its rows (:meth:`ResidentChain.gather`). The chain runs under ``Components``' chain lock,
because a stage's output buffer is reused by its next run (``backends/resident.py``).

NaN/Inf checks move with the downloads: a resident stage output is not checked itself (that would
be a download); a non-finite value reaches the downloaded result and is reported there, naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Hashable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.backends.base import DeviceRows
from kandinsky_trt.runtime.backends.resident import Feed, ResidentStages
from kandinsky_trt.runtime.contract.errors import require_finite
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.contract.spec import ResolvedTensor
from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows

if TYPE_CHECKING:
    from kandinsky_trt.runtime.pipelines.components import Components


class ResidentChain:
    """Stage runs, loops and downloads of one request on ``components``' device backend."""

    def __init__(self, components: "Components", stages: ResidentStages) -> None:
        self.components, self.stages = components, stages

    def run(self, network: str, feeds: Mapping[str, Feed]) -> dict[str, DeviceRows]:
        """Run a stage network at the profile of the feeds' shapes; its outputs stay on the device."""
        c = self.components
        profile = c.profile_of(network, feeds)
        with c.loaded.serial():
            return self.stages.run(network, feeds, profile)

    def stage_input(self, network: str, name: str, like: np.ndarray) -> DeviceRows:
        """The bound input ``name`` of stage ``network`` at the profile where it has ``like``'s shape:
        what a loop's :meth:`denoise` can retire into, so the stage reads it in place."""
        c = self.components
        with c.loaded.serial():
            return self.stages.inputs(network, c.profile_of(network, {name: like}))[name]

    def denoise(self, spec: LoopSpec, table: SchedulerTable, inputs: LoopInputs,
                into: DeviceRows | None = None) -> DeviceRows:
        """``Components.denoise`` (no callback: it would download every step) with the final latents
        copied on the device into ``into`` (device rows, one per chunk row; default a scratch buffer
        of the loop's batch), returned as device rows."""
        c = self.components

        def run(loop):
            target = into
            if target is None:
                tensor = loop.storage.step_io.tensor(spec.io.latents)
                target = self.stages.scratch(tensor, ("retired", spec.network, tensor))[:len(inputs.latents)]
            return loop.run(chunk_rows(inputs, table), None, c.should_stop, into=target)

        return c.with_loop(spec, inputs.latents, run)

    def image_embeds(self, latents: DeviceRows) -> DeviceRows:
        """The prior loop's final latents as CLIP image embeddings, on the device (the bridge graph
        ``prior_embeds``: ``latents * clip_std + clip_mean``); valid until its next run."""
        loaded = self.components.loaded
        feeds = {"latents": latents, "clip_std": loaded.constant("clip_std"), "clip_mean": loaded.constant("clip_mean")}
        return self.run("prior_embeds", feeds)["image_embeds"]

    def keep(self, rows: DeviceRows, key: Hashable) -> DeviceRows:
        """``rows`` copied (device to device) into a buffer of their own, one per ``key`` and shape, so
        the next run of the stage that wrote them leaves them as they are (until ``key``'s next use).
        Kept buffers live as long as the stages (``Components.close``): bounded by the distinct keys."""
        return self._written(ResolvedTensor(rows.tensor.name, rows.tensor.dtype, rows.shape), ("kept", key), [rows])

    def gather(self, name: str, pieces: Sequence[DeviceRows | np.ndarray]) -> DeviceRows:
        """``pieces`` (device rows or host arrays, one row shape) written one after another into one
        buffer (one per name and total rows; uploads for host pieces, device copies for the others):
        what a loop admits as one conditioning input."""
        first = pieces[0]
        shape = (sum(len(p) for p in pieces), *first.shape[1:])
        return self._written(ResolvedTensor(name, str(np.dtype(first.dtype)), shape), ("gathered",), pieces)

    def _written(self, tensor: ResolvedTensor, key: tuple, pieces: Sequence[DeviceRows | np.ndarray]) -> DeviceRows:
        """The scratch buffer of ``tensor`` under ``key``, with ``pieces`` written into it in order."""
        whole = self.stages.scratch(tensor, (*key, tensor))
        row = 0
        with self.components.loaded.serial():
            for piece in pieces:
                self.stages.backend.write_rows(whole.buffer, tensor, row, piece)
                row += len(piece)
        return whole

    def download(self, rows: DeviceRows, what: str) -> np.ndarray:
        """The host copy of ``rows`` (one download, one sync), checked for NaN/Inf naming ``what``."""
        with self.components.loaded.serial():
            array = self.stages.download(rows)
        return require_finite(array, what)
