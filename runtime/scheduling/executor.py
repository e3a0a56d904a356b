"""What the scheduler asks of the hardware: the :class:`Executor` protocol.

A *pool* is one set of slots (a loop stage: one ``SlotLoop`` per network and profile, e.g. the UNet
at 512×512; text2img and img2img share it, inpaint has its own) or one kind of batched call (a
one-shot stage, e.g. the MoVQ decoder at 512×512). The executor names the pool of each request at
each stage and says how many rows it holds; the scheduler decides who goes in and when.

A request's intermediate results (embeddings, latents) are the executor's to keep between stages,
keyed by ``request_id``; :meth:`Executor.discard` drops them when a request leaves early.
"""

from __future__ import annotations

from typing import Hashable, Protocol, Sequence

from kandinsky_trt.runtime.scheduling.work import Request


class Executor(Protocol):
    def pool(self, stage: str, request: Request) -> Hashable:
        """The pool ``request`` uses at ``stage`` (equal keys: the same slots or the same call)."""

    def capacity(self, stage: str, pool: Hashable) -> int:
        """Rows the pool holds: slots of a loop stage, rows of one call of a one-shot stage."""

    def call(self, stage: str, pool: Hashable, requests: Sequence[Request]) -> None:
        """Run one batched call of one-shot ``stage`` for ``requests`` (their results kept for the next stage)."""

    def admit(self, stage: str, pool: Hashable, request: Request) -> None:
        """Write ``request``'s rows into free slots of loop ``pool`` (the scheduler checked they are free)."""

    def step(self, stage: str, pool: Hashable) -> list[str]:
        """One step of every occupied slot of ``pool``; the ids of the requests whose rows all finished
        (their slots free again, their latents kept for the next stage)."""

    def release(self, stage: str, pool: Hashable, request_id: str) -> None:
        """Free the slots of a request that leaves a loop unfinished (cancelled, timed out)."""

    def discard(self, request_id: str) -> None:
        """Forget whatever is kept for ``request_id`` (it left early, or its result was delivered)."""
