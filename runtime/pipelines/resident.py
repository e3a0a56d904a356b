"""One request's device-resident stage chain: :class:`ResidentChain` (issue 19, item 5).

On a device backend whose copies stay on the device (``DeviceBackend.copies_on_device``:
TensorRT) the pipelines run text encoders, loops and MoVQ through a chain, so stage outputs stay
in device buffers: the text encoders'
outputs are copied into the loop's conditioning rows on the device, the loop's retired latents are
copied (device to device) straight into the MoVQ decoder's bound input, and only what the host
needs is downloaded (:meth:`ResidentChain.download`: the image, or the prior's embeddings, whose
post-processing is host numpy). The chain runs under ``Components``' chain lock, because a stage's
output buffer is reused by its next run (``backends/resident.py``).

NaN/Inf checks move with the downloads: a resident stage output is not checked itself (that would
be a download); a non-finite value reaches the downloaded result and is reported there, naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from kandinsky_trt.runtime.backends.base import DeviceRows
from kandinsky_trt.runtime.backends.resident import Feed, ResidentStages
from kandinsky_trt.runtime.contract.errors import require_finite
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
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

    def download(self, rows: DeviceRows, what: str) -> np.ndarray:
        """The host copy of ``rows`` (one download, one sync), checked for NaN/Inf naming ``what``."""
        with self.components.loaded.serial():
            array = self.stages.download(rows)
        return require_finite(array, what)
