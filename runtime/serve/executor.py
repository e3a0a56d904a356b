"""The model's work, without Triton: a batch of requests in, one response (or error) per request out.

:class:`Executor` decodes each request, groups the items of the whole batch
(:func:`~kandinsky_trt.runtime.serve.batching.group_key`), runs each group as one pipeline call
and answers every request with its own outputs or its own one-line error. A bad request never
fails the others: a group whose merged call fails is re-run item by item, so each item gets the
pipeline's own message. ``model.py`` is a thin adapter from Triton's tensors to this class.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, PipelineInputError
from kandinsky_trt.runtime.serve.batching import group_key, run_batched
from kandinsky_trt.runtime.loops.template import LoopStopped
from kandinsky_trt.runtime.serve.cancel import RequestCancelled, cancel_scope, requested
from kandinsky_trt.runtime.serve.calls import Pipelines, run_item
from kandinsky_trt.runtime.serve.requests import Item, RequestError, decode_request

log = logging.getLogger(__name__)
DEFAULT_MAX_IMAGES = 16


CLIENT_ERRORS = (RequestError, PipelineInputError)  # the request's fault: 400 / INVALID_ARGUMENT


class Unavailable(Exception):
    """The server cannot take or finish this request now (queue full, timed out, shutting down): 503."""


@dataclass(frozen=True)
class Response:
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    # "client" (bad request), "server" (our failure), "cancelled", "unavailable" (retry later) or "success"
    kind: str = "success"


def error_response(err: BaseException, prefix: str = "") -> Response:
    if isinstance(err, RequestCancelled):
        return Response(error=str(err), kind="cancelled")
    if isinstance(err, Unavailable):
        return Response(error=prefix + str(err), kind="unavailable")
    if isinstance(err, KandinskyTrtError):
        return Response(error=prefix + str(err), kind="client" if isinstance(err, CLIENT_ERRORS) else "server")
    log.error("internal error while serving a request", exc_info=err)
    return Response(error=prefix + f"internal error: {type(err).__name__}: {err}".splitlines()[0], kind="server")


@dataclass(frozen=True)
class ExecutorConfig:
    max_images: int = DEFAULT_MAX_IMAGES  # per item: the limit a request's num_images is checked against
    batching: bool = True  # False: every item runs alone (the benchmark's "batching off")


class Executor:
    """Serves requests on one :class:`Components` (every network loaded once, shared by all pipelines)."""

    def __init__(self, components: Components, config: ExecutorConfig = ExecutorConfig()) -> None:
        components.should_stop = requested  # denoising stops at a step once the call's clients have all gone
        self.pipelines = Pipelines(components)
        self.config = config

    def handle(self, requests: list[dict[str, np.ndarray]],
               cancelled: list[Callable[[], bool]] | None = None) -> list[Response]:
        """One response per request; ``cancelled[r]()`` says whether request ``r``'s client has gone."""
        cancelled = cancelled or [lambda: False] * len(requests)
        decoded: list[list[Item] | Response] = []
        for inputs, gone in zip(requests, cancelled):
            try:
                decoded.append(error_response(RequestCancelled()) if gone() else
                               decode_request(inputs, self.config.max_images))
            except RequestError as err:
                decoded.append(error_response(err))
        flat = [(r, item) for r, items in enumerate(decoded) if isinstance(items, list) for item in items]
        results = self._run_items(flat, cancelled)
        per_request: dict[int, list] = defaultdict(list)
        for (r, _), result in zip(flat, results):
            per_request[r].append(result)
        return [d if isinstance(d, Response) else assemble(per_request[r]) for r, d in enumerate(decoded)]

    def _run_items(self, flat: list[tuple[int, Item]], cancelled: list) -> list[dict | BaseException]:
        groups: dict[object, list[int]] = defaultdict(list)
        for index, (_, item) in enumerate(flat):
            key = group_key(self.pipelines, item) if self.config.batching else None
            groups[key if key is not None else ("alone", index)].append(index)
        results: list = [None] * len(flat)
        for indices in groups.values():
            members = [flat[i] for i in indices]
            for index, result in zip(indices, self._run_group(members, cancelled)):
                results[index] = result
        return results

    def _run_group(self, members: list[tuple[int, Item]], cancelled: list) -> list[dict | BaseException]:
        items = [item for _, item in members]
        if len(items) > 1:
            gone = [cancelled[r] for r in {r for r, _ in members}]
            try:
                with cancel_scope(lambda: all(g() for g in gone)):
                    outputs = run_batched(self.pipelines, items)
                log.debug("served %d %s items in one call", len(items), items[0].task)
                return outputs
            except LoopStopped:
                return [RequestCancelled()] * len(items)
            except Exception as err:  # noqa: BLE001 - re-run alone: each item gets its own error
                log.debug("merged call of %d items failed (%s); running them one at a time", len(items), err)
        return [self._run_one(item, cancelled[r]) for r, item in members]

    def _run_one(self, item: Item, gone: Callable[[], bool]) -> dict | BaseException:
        try:
            with cancel_scope(gone):
                return run_item(self.pipelines, item)
        except LoopStopped:
            return RequestCancelled()
        except Exception as err:  # noqa: BLE001 - a failing item must not take the instance down
            return err


def assemble(results: list[dict | BaseException]) -> Response:
    """One request's items -> outputs stacked on the batch dim, or the first item's error."""
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            return error_response(result, f"item {index}: " if len(results) > 1 else "")
    names = set(results[0])
    shapes = {name: {r[name].shape for r in results} for name in names}
    if any(set(r) != names for r in results) or any(len(s) > 1 for s in shapes.values()):
        return Response(error="outputs: expected every item of one request to give outputs of one shape "
                              "(same task, size and num_images), found different ones; send them as separate requests")
    return Response(outputs={name: np.stack([r[name] for r in results]) for name in names})
