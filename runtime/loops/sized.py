"""Slots that step at the smallest profile batch holding them (occupancy-sized steps).

A loop of slots always runs its whole profile batch: with one row in an 8-slot loop a step costs
what 8 rows cost. :class:`SizedSlots` keeps one :class:`~kandinsky_trt.runtime.loops.slots.SlotLoop`
per exported batch of one network and size (made when first needed) and steps only the smallest
that holds the occupied rows: before a step it shrinks to it, and an admission that does not fit
grows it. Rows move between the loops with their whole state (``SlotLoop.move``: on a device a
device-to-device copy, so captured graphs stay valid), so a row's steps are the same maths whatever
batch runs them. Whether its *bits* are the same depends on the backend's kernels giving a row the
same result at every batch size: measured so for ONNX Runtime CPU on the tiny export
(tests/test_step_executor.py, tests/test_slots.py); TensorRT picks tactics per profile, so there a
row's bits may depend on how many rows shared its steps (within the fp16 tolerances).

Slots are named by stable keys ``0 .. capacity - 1`` (what the caller sees: ``admit`` returns one,
``Retired.slot`` is one), whichever loop holds the row now.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.loops.slots import LoopRow, Retired, SlotLoop


class SizedSlots:
    """Rows of one pool over loops of the profile ``batches`` (ascending); ``make(batch)`` opens one."""

    def __init__(self, batches: Sequence[int], make: Callable[[int], SlotLoop]) -> None:
        self.batches = sorted(set(batches))
        if not self.batches or self.batches[0] < 1:
            raise BackendError(f"batches: expected profile batches >= 1, found {list(batches)}")
        self._make, self._loops = make, {}
        self._active = self._loop(self.batches[0])
        self._where: dict[int, int] = {}  # key -> slot in the active loop
        self.moves = 0  # rows moved between loops (a cost worth watching)

    @property
    def capacity(self) -> int:
        return self.batches[-1]

    @property
    def batch(self) -> int:
        """The batch the next step runs at."""
        return self._active.batch

    @property
    def occupied(self) -> list[int]:
        return sorted(self._where)

    def _loop(self, batch: int) -> SlotLoop:
        if batch not in self._loops:
            self._loops[batch] = self._make(batch)
        return self._loops[batch]

    def _resize(self, rows: int) -> None:
        """Make the active loop the smallest batch holding ``rows`` (moving every running row)."""
        batch = next((b for b in self.batches if b >= rows), None)
        if batch is None:
            raise BackendError(f"rows: expected at most {self.capacity} (the largest profile batch), found {rows}")
        if batch == self._active.batch:
            return
        target = self._loop(batch)
        self._where = {key: self._active.move(slot, target) for key, slot in self._where.items()}
        self.moves += len(self._where)
        self._active = target

    def admit(self, row: LoopRow) -> int:
        """Write ``row`` into a slot (growing the batch if none is free); returns its key."""
        key = next((k for k in range(self.capacity) if k not in self._where), None)
        if key is None:
            raise BackendError(f"{self._active.spec.network} slots: expected a free slot, found all "
                               f"{self.capacity} occupied")
        if not self._active.free:
            self._resize(len(self._where) + 1)
        self._where[key] = self._active.admit(row)
        return key

    def step(self) -> list[Retired]:
        """Shrink to the smallest batch holding the rows, step it once; the finished rows by key."""
        self._resize(max(len(self._where), 1))
        keys = {slot: key for key, slot in self._where.items()}
        retired = []
        for done in self._active.step():
            key = keys[done.slot]
            del self._where[key]
            retired.append(replace(done, slot=key))
        return retired

    def release(self, key: int) -> None:
        slot = self._where.pop(key, None)
        if slot is not None:
            self._active.release(slot)

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()
        self._where.clear()
