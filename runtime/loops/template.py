"""What the pipelines hand the loop for one chunk, and how a chunk becomes the loop's rows.

A pipeline builds one :class:`LoopInputs` per batch-sized chunk (the chunked call of DESIGN §4);
:func:`chunk_rows` splits it into the :class:`~kandinsky_trt.runtime.loops.slots.LoopRow` s the loop
of slots admits (``Components.denoise``: every row of a chunk admitted at once). The loop itself,
the per-row contract and the storages are in :mod:`~kandinsky_trt.runtime.loops.slots`,
:mod:`~kandinsky_trt.runtime.loops.host` and :mod:`~kandinsky_trt.runtime.loops.device`; the names
re-exported here keep the pipelines' and the server's imports. Imports: numpy, the backend
interface and the loops layer only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.backends.base import DeviceRows
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.loops.slots import (IDENTITY_ROW, LoopRow, LoopStopped, StepCallback, StopCheck,  # noqa: F401
                                               guided)


@dataclass(frozen=True)
class LoopInputs:
    """One batch-sized chunk: initial latents, the network's fixed inputs, the step graph's extras."""

    latents: np.ndarray | DeviceRows
    conditioning: dict[str, np.ndarray | DeviceRows]  # network inputs other than sample / timestep (host or device)
    step_extras: dict[str, np.ndarray | DeviceRows]  # e.g. ``conditioning`` of the inpaint step graph
    noise: np.ndarray | None  # (stochastic steps, *latents.shape)
    guidance_scale: float
    first_input: DeviceRows | None = None  # each row's first network input (one group's), when on the device


def chunk_rows(inputs: LoopInputs, table: SchedulerTable) -> list[LoopRow]:
    """A chunk's rows as the loop of slots takes them: row ``j`` gets network rows ``j, B + j, ...``
    of each conditioning array, its latents, its noise rows and the chunk's table and guidance."""
    batch = len(inputs.latents)

    def per_row(arrays: Mapping[str, np.ndarray | DeviceRows], j: int) -> dict[str, np.ndarray | DeviceRows]:
        return {name: (array if isinstance(array, DeviceRows) else np.asarray(array))[j::batch]
                for name, array in arrays.items()}

    noise = None if inputs.noise is None else np.asarray(inputs.noise)
    latents = inputs.latents if isinstance(inputs.latents, DeviceRows) else np.asarray(inputs.latents)
    first = inputs.first_input
    return [LoopRow(latents[[j]] if isinstance(latents, DeviceRows) else latents[j], per_row(inputs.conditioning, j),
                    table, inputs.guidance_scale, None if noise is None else noise[:, j],
                    per_row(inputs.step_extras, j), None if first is None else first[[j]]) for j in range(batch)]
