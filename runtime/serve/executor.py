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

import numpy as np

from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.serve.batching import group_key, run_batched
from kandinsky_trt.runtime.serve.calls import Pipelines, run_item
from kandinsky_trt.runtime.serve.requests import Item, RequestError, decode_request

log = logging.getLogger(__name__)
DEFAULT_MAX_IMAGES = 16


@dataclass(frozen=True)
class Response:
    outputs: dict[str, np.ndarray] | None = None
    error: str | None = None


def _error_text(err: BaseException) -> str:
    if isinstance(err, KandinskyTrtError):
        return str(err)
    log.error("internal error while serving a request", exc_info=err)
    return f"internal error: {type(err).__name__}: {err}".splitlines()[0]


@dataclass(frozen=True)
class ExecutorConfig:
    max_images: int = DEFAULT_MAX_IMAGES  # per item: the limit a request's num_images is checked against
    batching: bool = True  # False: every item runs alone (the benchmark's "batching off")


class Executor:
    """Serves requests on one :class:`Components` (every network loaded once, shared by all pipelines)."""

    def __init__(self, components: Components, config: ExecutorConfig = ExecutorConfig()) -> None:
        self.pipelines = Pipelines(components)
        self.config = config

    def handle(self, requests: list[dict[str, np.ndarray]]) -> list[Response]:
        decoded: list[list[Item] | Response] = []
        for inputs in requests:
            try:
                decoded.append(decode_request(inputs, self.config.max_images))
            except RequestError as err:
                decoded.append(Response(error=str(err)))
        flat = [(r, j, item) for r, items in enumerate(decoded) if isinstance(items, list)
                for j, item in enumerate(items)]
        results = self._run_items([item for _, _, item in flat])
        per_request: dict[int, list] = defaultdict(list)
        for (r, _, _), result in zip(flat, results):
            per_request[r].append(result)
        return [d if isinstance(d, Response) else _assemble(per_request[r]) for r, d in enumerate(decoded)]

    def _run_items(self, items: list[Item]) -> list[dict | BaseException]:
        groups: dict[object, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            key = group_key(self.pipelines, item) if self.config.batching else None
            groups[key if key is not None else ("alone", index)].append(index)
        results: list = [None] * len(items)
        for indices in groups.values():
            for index, result in zip(indices, self._run_group([items[i] for i in indices])):
                results[index] = result
        return results

    def _run_group(self, items: list[Item]) -> list[dict | BaseException]:
        if len(items) > 1:
            try:
                outputs = run_batched(self.pipelines, items)
                log.debug("served %d %s items in one call", len(items), items[0].task)
                return outputs
            except Exception as err:  # noqa: BLE001 - re-run alone: each item gets its own error
                log.debug("merged call of %d items failed (%s); running them one at a time", len(items), err)
        return [self._run_one(item) for item in items]

    def _run_one(self, item: Item) -> dict | BaseException:
        try:
            return run_item(self.pipelines, item)
        except Exception as err:  # noqa: BLE001 - a failing item must not take the instance down
            return err


def _assemble(results: list[dict | BaseException]) -> Response:
    """One request's items -> outputs stacked on the batch dim, or the first item's error."""
    for index, result in enumerate(results):
        if isinstance(result, BaseException):
            prefix = f"item {index}: " if len(results) > 1 else ""
            return Response(error=prefix + _error_text(result))
    names = set(results[0])
    shapes = {name: {r[name].shape for r in results} for name in names}
    if any(set(r) != names for r in results) or any(len(s) > 1 for s in shapes.values()):
        return Response(error="outputs: expected every item of one request to give outputs of one shape "
                              "(same task, size and num_images), found different ones; send them as separate requests")
    return Response(outputs={name: np.stack([r[name] for r in results]) for name in names})
