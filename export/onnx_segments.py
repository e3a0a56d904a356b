"""Run an ONNX graph in ONNX Runtime (CPU) one segment at a time, seeing every intermediate tensor.

Marking every tensor of a full-size UNet as a graph output would keep all of them alive at once
(tens of GB at 512x512). Instead the graph's nodes, in their topological order, are cut into
consecutive segments whose outputs plus weights fit ``budget_bytes`` (sizes from ONNX shape
inference; a segment also stops at ``max_nodes``). Each segment becomes a small model — inputs:
the tensors it reads from earlier segments, initializers: only the weights it uses (external data
read per tensor), outputs: everything its nodes produce — run by its own ``InferenceSession``.
Tensors still needed later stay in a ``live`` dict and are dropped after their last use, so memory
is bounded by one segment's outputs and weights plus the live set (skip connections), never by the
whole graph. :meth:`SegmentedGraph.run` yields ``(index, node, outputs)`` node by node.

Segments run with ONNX Runtime's graph optimizations off: every value is an output anyway, and the
numbers are those of the graph's own nodes. Nodes with subgraphs (If/Loop) read their outer-scope
names as inputs.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper, helper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentLimits:
    budget_bytes: int = 512 << 20  # outputs + weights of one segment
    max_nodes: int = 400


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Names ``node`` reads, including the outer-scope names its subgraphs use."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for graph in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            inner = {o for sub in graph.node for o in sub.output} | {i.name for i in graph.input}
            inner |= {t.name for t in graph.initializer}
            names += [n for sub in graph.node for n in node_inputs(sub) if n not in inner]
    return names


def _value_bytes(value_info: onnx.ValueInfoProto) -> int:
    tensor = value_info.type.tensor_type
    dims = [d.dim_value for d in tensor.shape.dim]
    if not tensor.HasField("shape") or any(d <= 0 for d in dims):
        return 0
    return int(np.prod(dims)) * helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize


def _make_static(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]]) -> None:
    """Give the inputs named in ``shapes`` those static shapes (a graph's profile dims are symbolic),
    so that shape inference knows every intermediate's size and the segment budget holds."""
    for value in graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, ())):
            dim.Clear()
            dim.dim_value = size


class SegmentedGraph:
    """One ONNX graph (weights read lazily), run segment by segment on ``feeds``."""

    def __init__(self, onnx_path: Path, limits: SegmentLimits = SegmentLimits(),
                 input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        self.path, self.limits = Path(onnx_path), limits
        self.model = onnx.load(str(onnx_path), load_external_data=False)
        graph = self.model.graph
        _make_static(graph, input_shapes or {})
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        inferred = onnx.shape_inference.infer_shapes(self.model).graph
        self.types = {v.name: v for v in (*inferred.value_info, *inferred.output, *inferred.input)}
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(self.nodes):
            for name in node_inputs(node):
                self.last_use[name] = index
        for value in graph.output:
            self.last_use[value.name] = len(self.nodes)
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node_inputs(node):
                self.consumers.setdefault(name, []).append(index)
        self.graph_outputs = {v.name for v in graph.output}

    def segments(self) -> list[tuple[int, int]]:
        """``[start, stop)`` node ranges, each within the budget (a single oversize node stands alone)."""
        ranges, start, size = [], 0, 0
        for index, node in enumerate(self.nodes):
            cost = sum(_value_bytes(self.types[o]) for o in node.output if o in self.types)
            cost += sum(self._weight_bytes(n) for n in node_inputs(node) if n in self.initializers)
            if index > start and (size + cost > self.limits.budget_bytes or index - start >= self.limits.max_nodes):
                ranges.append((start, index))
                start, size = index, 0
            size += cost
        ranges.append((start, len(self.nodes)))
        return ranges

    def _weight_bytes(self, name: str) -> int:
        tensor = self.initializers[name]
        return int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize

    def _initializer(self, name: str) -> onnx.TensorProto:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(self.initializers[name])
        if external_data_helper.uses_external_data(tensor):
            external_data_helper.load_external_data_for_tensor(tensor, str(self.path.parent))
        return tensor

    def _segment_model(self, start: int, stop: int, live: dict[str, np.ndarray]) -> onnx.ModelProto:
        nodes = self.nodes[start:stop]
        produced = {o for n in nodes for o in n.output if o}
        reads = list(dict.fromkeys(n for node in nodes for n in node_inputs(node) if n not in produced))
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(live[n].dtype), live[n].shape)
                  for n in reads if n in live]
        weights = [self._initializer(n) for n in reads if n not in live and n in self.initializers]
        outputs = [self.types.get(o) or onnx.ValueInfoProto(name=o) for n in nodes for o in n.output if o]
        graph = helper.make_graph(nodes, f"{self.model.graph.name}_{start}_{stop}", inputs, outputs, weights)
        model = helper.make_model(graph, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        return model

    def _run_segment(self, start: int, stop: int, live: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3  # fp16 graphs warn about CPU fallbacks; not errors
        options.enable_cpu_mem_arena = False  # give each segment's memory back when it ends
        options.enable_mem_pattern = False
        model = self._segment_model(start, stop, live)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del model
        feeds = {i.name: live[i.name] for i in session.get_inputs()}
        names = [o.name for o in session.get_outputs()]
        results = dict(zip(names, session.run(names, feeds)))
        del session
        gc.collect()
        return results

    def run(self, feeds: dict[str, np.ndarray]) -> Iterator[tuple[int, onnx.NodeProto, dict[str, np.ndarray]]]:
        """Yield ``(index, node, {output name: array})`` for every node in topological order."""
        live = dict(feeds)
        for start, stop in self.segments():
            log.debug("%s: nodes %d..%d", self.path.name, start, stop - 1)
            results = self._run_segment(start, stop, live)
            for index in range(start, stop):
                node = self.nodes[index]
                yield index, node, {o: results[o] for o in node.output if o in results}
            live.update({k: v for k, v in results.items() if self.last_use.get(k, -1) >= stop})
            for name in [k for k in live if self.last_use.get(k, -1) < stop]:
                del live[name]
            del results
