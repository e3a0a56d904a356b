"""The loop of slots: every batch row at its own step (DESIGN §4, issue 19).

A loop holds its profile's ``B`` rows as *slots*. Each occupied slot carries one request row
(:class:`LoopRow`): its latents, its conditioning rows, its own scheduler table (any scheduler, any
step count, an img2img tail), its position in that table, its guidance scale and its noise rows.
The operations:

* :meth:`SlotLoop.admit` a row into a free slot: its latents, ``x0_prev = 0``, its conditioning rows
  and the first network input (``[x; x]`` with guidance, plus the inpaint conditioning: what the
  step graph's identity row used to compute) are written into the rows of the bound buffers that
  belong to the slot — a copy into row offsets, so bound (and captured) buffers stay valid;
* :meth:`SlotLoop.step` every slot once: one network call and one step-graph call for the whole
  batch, each row at its own timestep (``timestep (B2,)``), coefficient row (``coefficients (B, K)``),
  guidance (``guidance_scale (B, 1)``) and noise row — the per-row contract;
* rows whose table is done are *retired* by ``step``: their final latents are read back (or, on a
  device, copied into rows of another device buffer, :class:`DeviceRows`: no download) and the
  slot is free for the next admission.

A row's conditioning may be host arrays or :class:`~kandinsky_trt.runtime.backends.base.DeviceRows`
(a stage output kept on the device: copied into the slot's rows on the device at admission), and
so may its start latents (one device row: img2img's start computed on the device) and, where the
first network input is more than the latents per group (inpainting), that input row
(``LoopRow.first_input``, from the ``inpaint_start`` bridge graph).

The networks' rows are independent, so a row's result does not depend on what the other slots hold
or when it was admitted. An empty slot runs the identity coefficient row on zero latents at
timestep 0 with guidance 1 (finite, no NaN, and it changes no other row); it costs what an
occupied slot costs (static shapes: the network always runs ``B2`` rows).

The row layout of a network batch: with guidance (``B2 = 2B``) slot ``j`` owns rows ``j`` (uncond)
and ``B + j`` (cond); without, row ``j``. A :class:`LoopRow`'s conditioning arrays have one leading
entry per group (``B2 // B``: [uncond, cond] with guidance).

Where the buffers live is the :class:`SlotStorage`'s business (host numpy arrays, or device
buffers bound once); this module holds only the bookkeeping, the checks and the per-step rows.
Imports: numpy, the contract and the backend interface only.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError, DeviceRows
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.contract.spec import COEFFICIENT_COLUMNS, ResolvedNetwork, ResolvedTensor

# x_next = x and nothing else: what an empty slot steps with (its latents stay zero).
_IDENTITY = dict.fromkeys(COEFFICIENT_COLUMNS, 0.0) | {"v": 1.0, "clip_min": -1.0, "clip_max": 1.0}
IDENTITY_ROW = np.array([_IDENTITY[c] for c in COEFFICIENT_COLUMNS], dtype=np.float32)

StepCallback = Callable[[int, int, np.ndarray], None]
StopCheck = Callable[[], bool]


class LoopStopped(Exception):
    """``should_stop()`` was true at a step boundary: the loop stopped there (its slots released)."""


def guided(guidance_scale: float) -> bool:
    """diffusers' rule (``do_classifier_free_guidance = guidance_scale > 1.0``), for the prior and decoders."""
    return guidance_scale > 1.0


@dataclass(frozen=True)
class LoopRow:
    """One request row of a loop: everything it needs, whatever the other slots hold.

    ``conditioning`` (network inputs other than the sample and the timestep) and ``step_extras``
    (step-graph inputs the loop does not write, e.g. the inpaint ``conditioning``) hold one entry per
    group of the network batch: ``[uncond, cond]`` with guidance, ``[cond]`` without.
    """

    latents: np.ndarray | DeviceRows  # (*latent): the initial latents, already scaled / noised; or 1 device row
    conditioning: Mapping[str, np.ndarray | DeviceRows]
    table: SchedulerTable  # the steps this row runs (img2img: the schedule's tail)
    guidance_scale: float
    noise: np.ndarray | None = None  # (stochastic steps of table, *latent)
    step_extras: Mapping[str, np.ndarray | DeviceRows] = field(default_factory=dict)
    first_input: DeviceRows | None = None  # 1 device row of the network's sample input (one group's); None: computed


@dataclass
class _Slot:
    row: LoopRow
    position: int = 0  # the next step of row.table
    noise_used: int = 0  # stochastic steps taken


@dataclass(frozen=True)
class Retired:
    """A row whose table is done: its slot (free again) and its final latents (host, or the device
    rows they were copied into)."""

    slot: int
    row: LoopRow
    latents: np.ndarray | DeviceRows


class SlotStorage(abc.ABC):
    """Where a slot loop's buffers live: one buffer per network and step-graph input, bound once.

    ``network`` / ``step`` are the resolved I/O at the loop's profile. The linked tensors
    (``spec.links``) are one buffer: the step graph writes the network's sample input and reads its
    output. Every buffer starts zeroed.
    """

    def __init__(self, spec: LoopSpec, network: ResolvedNetwork, step: ResolvedNetwork) -> None:
        check_linked(spec, network, step)
        self.spec, self.network_io, self.step_io = spec, network, step

    @abc.abstractmethod
    def write(self, tensor: ResolvedTensor, rows: np.ndarray, values: np.ndarray) -> None:
        """Write ``values`` into rows ``rows`` (indices, ascending) of ``tensor``'s buffer (network
        inputs by their network name, step-graph inputs by theirs; the names do not collide)."""

    @abc.abstractmethod
    def step(self) -> None:
        """Run the network, then the step graph, then carry their outputs into the inputs they feed."""

    @abc.abstractmethod
    def read_latents(self) -> np.ndarray:
        """A host copy of the current latents ``(B, *latent)`` (on a device: the download and its sync)."""

    @abc.abstractmethod
    def rows(self, tensor: ResolvedTensor, rows: np.ndarray) -> np.ndarray | DeviceRows:
        """Rows ``rows`` of ``tensor``'s buffer as it is now, to write into another storage: a host
        copy, or (on a device) the device rows themselves, valid until this buffer is next written."""

    def copy_latents(self, slot: int, into: DeviceRows) -> None:
        """Copy slot ``slot``'s current latents into the one device row ``into`` (ordered, no sync)."""
        raise BackendError(f"{type(self).__name__}: expected a device storage to copy latents on the device, "
                           "found host arrays")

    def close(self) -> None:
        """Free the buffers and bindings; idempotent."""


def check_linked(spec: LoopSpec, network: ResolvedNetwork, step: ResolvedNetwork) -> None:
    """The step graph's model_output / model_input must fit the network's output / sample input."""
    for step_name, net_name in spec.links:
        ours, theirs = step.tensor(step_name), network.tensor(net_name)
        if (ours.shape, ours.dtype) != (theirs.shape, theirs.dtype):
            raise BackendError(
                f"{spec.step}.{step_name}: expected {theirs.dtype}{list(theirs.shape)} like "
                f"{spec.network}.{net_name}, found {ours.dtype}{list(ours.shape)}")


def _rows_of(tensor: ResolvedTensor, batch: int) -> int:
    """Rows per slot of ``tensor``'s batch: 2 for the [uncond; cond] networks with guidance, else 1."""
    groups, left = divmod(tensor.shape[0], batch)
    if left or groups < 1:
        raise BackendError(f"{tensor.name}: expected a batch that is a multiple of {batch}, found {tensor.shape[0]}")
    return groups


class SlotLoop:
    """The loop of slots over one :class:`SlotStorage` (see the module docstring).

    One loop per (loop spec, profile); its calls run one at a time (the caller holds a lock).
    """

    def __init__(self, spec: LoopSpec, storage: SlotStorage) -> None:
        self.spec, self.storage = spec, storage
        net, step, io = storage.network_io, storage.step_io, spec.io
        self.batch = step.tensor(io.latents).shape[0]
        self.latent_shape = step.tensor(io.latents).shape[1:]
        self.groups = _rows_of(net.tensor(spec.sample_input), self.batch)
        self._slots: list[_Slot | None] = [None] * self.batch
        self._fixed = self._fixed_tensors()
        self._closed = False

    def _fixed_tensors(self) -> dict[str, ResolvedTensor]:
        """The inputs a row brings (conditioning, step extras): every input the loop does not write."""
        net, step, spec = self.storage.network_io, self.storage.step_io, self.spec
        fixed = {t.name: t for t in net.inputs if t.name not in spec.network_fed}
        fixed.update({t.name: t for t in step.inputs if t.name not in spec.step_fed})
        return fixed

    # -- slots ---------------------------------------------------------------------------------

    @property
    def occupied(self) -> list[int]:
        return [j for j, slot in enumerate(self._slots) if slot is not None]

    @property
    def free(self) -> list[int]:
        return [j for j, slot in enumerate(self._slots) if slot is None]

    def admit(self, row: LoopRow, slot: int | None = None) -> int:
        """Check ``row``, write it into a free slot (``slot``, or the first free one) and return the slot.

        Raises:
            BackendError: no free slot, or the row does not fit the loop's tensors.
        """
        self._check_open()
        free = self.free
        if slot is None:
            if not free:
                raise BackendError(f"{self.spec.network} loop: expected a free slot, found all {self.batch} occupied")
            slot = free[0]
        elif slot not in free:
            raise BackendError(f"slot: expected a free slot of {free}, found {slot}")
        row = self._checked(row)
        self._write_row(slot, row)
        self._slots[slot] = _Slot(row)
        return slot

    def move(self, slot: int, target: "SlotLoop") -> int:
        """Move the running row of ``slot`` into a free slot of ``target`` (the same networks at another
        profile batch) with its whole state: conditioning, current latents, ``x0_prev``, next network
        input, position and noise taken; the slot here is freed. Returns the slot in ``target``."""
        moving = self._slots[slot]
        if moving is None or target.spec != self.spec:
            raise BackendError(f"slot: expected a running row to move into a {self.spec.network} loop, "
                               f"found {'an empty slot' if moving is None else target.spec.network}")
        into = target.admit(moving.row)
        io, net, step = self.spec.io, self.storage.network_io, self.storage.step_io
        for tensor, theirs, rows, groups in (
                (step.tensor(io.latents), target.storage.step_io.tensor(io.latents), [slot], 1),
                (step.tensor(io.x0_prev), target.storage.step_io.tensor(io.x0_prev), [slot], 1),
                (net.tensor(self.spec.sample_input), target.storage.network_io.tensor(self.spec.sample_input),
                 self._net_rows(slot, self.groups), self.groups)):
            there = [into] if groups == 1 else target._net_rows(into, groups)
            target.storage.write(theirs, np.asarray(there), self.storage.rows(tensor, np.asarray(rows)))
        target._slots[into] = _Slot(moving.row, moving.position, moving.noise_used)
        self.release(slot)  # after the copy: on a device the copy reads these rows in stream order
        return into

    def release(self, slot: int) -> None:
        """Free ``slot`` without finishing its row (a cancelled request); its rows are zeroed."""
        if self._slots[slot] is not None:
            self._slots[slot] = None
            self._zero(slot)

    def _checked(self, row: LoopRow) -> LoopRow:
        """``row`` with exact float32 arrays of the loop's shapes; guidance <= 1 runs the conditional
        prediction alone (both groups get the cond rows, the scale becomes 1), as diffusers does."""
        one = (1, *self.latent_shape)
        latents = (_exact(row.latents, one, "latents") if isinstance(row.latents, DeviceRows)
                   else _exact(row.latents, self.latent_shape, "latents", cast=True))
        sample = self.storage.network_io.tensor(self.spec.sample_input)
        if row.first_input is not None:
            _exact(row.first_input, (1, *sample.shape[1:]), "first_input", sample.dtype)
        elif isinstance(latents, DeviceRows) and row.step_extras:
            raise BackendError("first_input: expected the first network input's device row with device latents "
                               "and step extras, found none")
        given = {**row.conditioning, **row.step_extras}
        if sorted(given) != sorted(self._fixed):
            raise BackendError(f"row conditioning: expected {sorted(self._fixed)}, found {sorted(given)}")
        inputs = {}
        for name, tensor in self._fixed.items():
            groups = _rows_of(tensor, self.batch)
            inputs[name] = _exact(given[name], (groups, *tensor.shape[1:]), f"conditioning[{name!r}]", tensor.dtype)
        scale = float(row.guidance_scale)
        if self.groups == 2 and not guided(scale):
            inputs = {n: _repeat_last(a) if n in row.conditioning else a for n, a in inputs.items()}
            scale = 1.0
        stochastic = int(row.table.stochastic.sum())
        noise = None
        if stochastic:
            if row.noise is None or len(row.noise) < stochastic:
                have = 0 if row.noise is None else len(row.noise)
                raise BackendError(f"noise: expected {stochastic} rows (one per stochastic step), found {have}")
            noise = _exact(row.noise[:stochastic], (stochastic, *self.latent_shape), "noise", cast=True)
        conditioning = {n: inputs[n] for n in row.conditioning}
        extras = {n: inputs[n] for n in row.step_extras}
        return replace(row, latents=latents, conditioning=conditioning, step_extras=extras, noise=noise,
                       guidance_scale=scale)

    def _net_rows(self, slot: int, groups: int) -> np.ndarray:
        return slot + self.batch * np.arange(groups)

    def _write_row(self, slot: int, row: LoopRow) -> None:
        """The slot's conditioning, latents, ``x0_prev = 0`` and first network input."""
        io, spec, write = self.spec.io, self.spec, self.storage.write
        net, step = self.storage.network_io, self.storage.step_io
        for name, values in {**row.conditioning, **row.step_extras}.items():
            write(self._fixed[name], self._net_rows(slot, len(values)), values)
        one = np.array([slot])
        on_device = isinstance(row.latents, DeviceRows)
        write(step.tensor(io.latents), one, row.latents if on_device else row.latents[None])
        write(step.tensor(io.x0_prev), one, np.zeros((1, *self.latent_shape), np.float32))
        write(net.tensor(spec.sample_input), self._net_rows(slot, self.groups), self._first_input(row))

    def _first_input(self, row: LoopRow) -> np.ndarray | DeviceRows:
        """The step graph's ``model_input`` for the row's start: its latents per group, then (inpaint)
        its step-graph ``conditioning`` along the channels; a given ``first_input`` row (or device
        latents) in every group, copied on the device."""
        given = row.first_input if row.first_input is not None else row.latents
        if isinstance(given, DeviceRows):
            return given[[0] * self.groups]
        x = np.stack([row.latents] * self.groups)
        extra = row.step_extras.get("conditioning")
        return x if extra is None else np.concatenate([x, extra], axis=1)

    def _zero(self, slot: int) -> None:
        """An empty slot: zero latents, ``x0_prev`` and network input (its conditioning rows stay finite)."""
        io, net, step = self.spec.io, self.storage.network_io, self.storage.step_io
        sample = net.tensor(self.spec.sample_input)
        self.storage.write(step.tensor(io.latents), np.array([slot]), np.zeros((1, *self.latent_shape), np.float32))
        self.storage.write(step.tensor(io.x0_prev), np.array([slot]), np.zeros((1, *self.latent_shape), np.float32))
        self.storage.write(sample, self._net_rows(slot, self.groups),
                           np.zeros((self.groups, *sample.shape[1:]), np.float32))

    # -- stepping ------------------------------------------------------------------------------

    def step(self, into: Mapping[int, DeviceRows] | None = None) -> list[Retired]:
        """Step every occupied slot once (one network and one step-graph call); return the rows that
        finished, in slot order, their slots now free. A finished slot in ``into`` has its latents
        copied into that device row (no download); the others are read back (one download)."""
        self._check_open()
        into = into or {}
        self._write_step_rows()
        self.storage.step()
        done = []
        for j, slot in enumerate(self._slots):
            if slot is not None:
                slot.noise_used += bool(slot.row.table.stochastic[slot.position])
                slot.position += 1
                if slot.position == len(slot.row.table):
                    done.append(j)
        latents = self.storage.read_latents() if any(j not in into for j in done) else None
        retired = []
        for j in done:
            if j in into:  # ordered before release() zeroes the slot
                self.storage.copy_latents(j, into[j])
            retired.append(Retired(j, self._slots[j].row, into[j] if j in into else latents[j].copy()))
            self.release(j)
        return retired

    def _write_step_rows(self) -> None:
        """This step's per-row inputs: timestep (B2,), coefficients (B, K), guidance (B, 1), noise."""
        io, net, step, write = self.spec.io, self.storage.network_io, self.storage.step_io, self.storage.write
        timestep = np.zeros(self.batch, np.float32)
        coefficients = np.repeat(IDENTITY_ROW[None], self.batch, axis=0)
        guidance = np.ones((self.batch, 1), np.float32)
        noise = None
        for j, slot in enumerate(self._slots):
            if slot is None:
                continue
            table, i = slot.row.table, slot.position
            timestep[j], coefficients[j], guidance[j, 0] = table.timesteps[i], table.coefficients[i], slot.row.guidance_scale
            if table.stochastic[i]:
                noise = np.zeros((self.batch, *self.latent_shape), np.float32) if noise is None else noise
                noise[j] = slot.row.noise[slot.noise_used]
        every = np.arange(self.batch)
        write(net.tensor(self.spec.timestep), np.arange(self.batch * self.groups), np.tile(timestep, self.groups))
        write(step.tensor(io.coefficients), every, coefficients)
        write(step.tensor(io.guidance_scale), every, guidance)
        if noise is not None or self._noisy:
            write(step.tensor(io.noise), every, np.zeros((self.batch, *self.latent_shape), np.float32)
                  if noise is None else noise)
        self._noisy = noise is not None

    _noisy = False  # the noise buffer holds a stochastic step's rows (zeroed before a deterministic step)

    def run(self, rows: Sequence[LoopRow], callback: StepCallback | None = None,
            should_stop: StopCheck | None = None, into: DeviceRows | None = None) -> np.ndarray | DeviceRows:
        """Admit ``rows`` (at most ``B``, one table for all) at once and step until they are done: the
        chunked call of the pipelines. Returns their final latents ``(len(rows), *latent)``; with
        ``into`` (device rows, one per row) they are copied there on the device and ``into`` returned.

        ``callback(i, t, latents)`` after each step gets the batch's latents (diffusers' contract; not
        with ``into``); ``should_stop()`` is checked after every step but the last and raises
        :class:`LoopStopped`.
        """
        self._check_open()
        if not 0 < len(rows) <= len(self.free):
            raise BackendError(f"rows: expected 1 to {len(self.free)} rows (free slots), found {len(rows)}")
        if into is not None and (callback is not None or len(into) != len(rows)):
            raise BackendError(f"into: expected {len(rows)} device rows and no callback, found {len(into)} rows"
                               f"{' and a callback' if callback is not None else ''}")
        table = rows[0].table
        slots = [self.admit(row) for row in rows]
        targets = {} if into is None else {slot: into[[k]] for k, slot in enumerate(slots)}
        results: dict[int, np.ndarray | DeviceRows] = {}
        try:
            for i, t in enumerate(table.timesteps):
                for done in self.step(targets):
                    results[done.slot] = done.latents
                if callback is not None:
                    latents = self.storage.read_latents()
                    for slot, final in results.items():  # retired slots were zeroed: show their result
                        latents[slot] = final
                    callback(i, int(t), latents)
                if should_stop is not None and i + 1 < len(table) and should_stop():
                    raise LoopStopped(f"{self.spec.network} loop: stopped after step {i + 1} of {len(table)}")
        finally:
            for slot in slots:
                self.release(slot)
        missing = [s for s in slots if s not in results]
        if missing:
            raise BackendError(f"rows: expected one table for every row of a chunk, found rows still running in {missing}")
        return into if into is not None else np.stack([results[s] for s in slots])

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"SlotLoop({self.spec.network}): expected an open loop, found it closed")

    def close(self) -> None:
        if not self._closed:
            self._slots = [None] * self.batch
            self.storage.close()
            self._closed = True

    def __enter__(self) -> "SlotLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _repeat_last(values: np.ndarray | DeviceRows) -> np.ndarray | DeviceRows:
    """The last group repeated in every group (guidance <= 1: the cond rows in both halves)."""
    if isinstance(values, DeviceRows):
        return values[[len(values) - 1] * len(values)]
    return np.stack([values[-1]] * len(values))


def _exact(array, shape: tuple, what: str, dtype: str = "float32", cast: bool = False) -> np.ndarray | DeviceRows:
    """``array`` as a contiguous array of exactly ``dtype`` and ``shape``; ``cast``: any real dtype is
    cast to ``dtype`` first (the latents and noise, as draws come), else it must be ``dtype`` already.
    Device rows are checked, never cast or copied."""
    if isinstance(array, DeviceRows):
        if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
            raise BackendError(f"{what}: expected {dtype}{list(shape)}, found {array.dtype}{list(array.shape)}")
        return array
    array = np.asarray(array)
    if cast and array.dtype.kind in "fiu":
        array = array.astype(dtype, copy=False)
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise BackendError(f"{what}: expected {dtype}{list(shape)}, found {array.dtype}{list(array.shape)}")
    return np.ascontiguousarray(array)
