"""From a precision report to the fp32 islands that repair it (``export --fp32-nodes NETWORK:MODULE``).

An fp16 tensor overflows when its fp32 reference reaches 65504. Computing only the overflowing
node in fp32 does not help — its output is cast back to fp16 and overflows there — so the island
must be a module whose boundary the large values never cross. For each overflow candidate (in
topological order) the module scopes around it are tried from the innermost outwards; the first
whose inputs and outputs (the tensors that cross its boundary, read through Casts to their
reference; a tensor without reference by its own fp16 range if finite) all stay below the limit in
the fp32 reference is suggested. Without an overflow, the
innermost module of the first node over tolerance is suggested. Islands are module paths of the
network's model, applied at export by :func:`~kandinsky_trt.export.precision.apply_policy`.
"""

from __future__ import annotations

from kandinsky_trt.export.graph_alignment import origins
from kandinsky_trt.export.onnx_segments import SegmentedGraph, node_inputs
from kandinsky_trt.export.precision_debug import FP16_MAX, NetworkReport, NodeResult


def _inside(scope: str, module: str) -> bool:
    return scope == module or scope.startswith(module + ".")


def _parents(scope: str) -> list[str]:
    parts = scope.split(".") if scope else []
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


class _Boundary:
    """The fp16 graph's dataflow with each tensor's reference range."""

    def __init__(self, report: NetworkReport, graph: SegmentedGraph) -> None:
        self.graph, self.scopes = graph, [o.scope if o else "" for o in origins(graph.model)]
        self.results = {r.output: r for r in report.nodes}
        self.producer = {o: i for i, n in enumerate(graph.nodes) for o in n.output}

    def reference_range(self, value: str) -> float | None:
        """The reference's max |x| for ``value``, read through Casts (which the reference lacks); else
        the fp16 tensor's own range if it is finite (it did not overflow); else None (unknown)."""
        start = self.results.get(value)
        for _ in range(8):
            result = self.results.get(value)
            if result is not None and result.ref_max_abs is not None:
                return result.ref_max_abs
            node = self.graph.nodes[self.producer[value]] if value in self.producer else None
            if node is None or node.op_type != "Cast":
                break
            value = node.input[0]
        return start.max_abs if start is not None and not (start.non_finite or start.saturated) else None

    def crossing(self, module: str) -> list[str]:
        """Float tensors entering or leaving ``module`` (produced by a node, not weights or graph inputs)."""
        values = []
        for index, node in enumerate(self.graph.nodes):
            if not _inside(self.scopes[index], module):
                continue
            values += [v for v in node_inputs(node) if v in self.producer
                       and not _inside(self.scopes[self.producer[v]], module)]
            for value in node.output:
                users = self.graph.consumers.get(value, [])
                if value in self.graph.graph_outputs or any(not _inside(self.scopes[u], module) for u in users):
                    values.append(value)
        return [v for v in dict.fromkeys(values) if v in self.results]

    def contains_overflow(self, module: str) -> bool:
        ranges = [self.reference_range(v) for v in self.crossing(module)]
        return any(r is None or r >= FP16_MAX for r in ranges)


def _island_for(candidate: NodeResult, boundary: _Boundary) -> str | None:
    for module in _parents(candidate.scope):
        if not boundary.contains_overflow(module):
            return module
    return None


def suggest_islands(report: NetworkReport, graph: SegmentedGraph) -> tuple[list[str], list[str]]:
    """(module paths to keep fp32, notes for what no island can fix)."""
    boundary, islands, notes = _Boundary(report, graph), [], []
    candidates = [c for c in report.overflow_candidates if (boundary.reference_range(c.output) or 0) >= FP16_MAX]
    for candidate in candidates:
        if any(_inside(candidate.scope, island) for island in islands):
            continue
        island = _island_for(candidate, boundary)
        if island is None:
            notes.append(f"{candidate.node} ({candidate.scope or 'wrapper'}): no module around it keeps its "
                         f"values inside the fp16 range; export {report.network} with --precision fp32")
        else:
            islands = [i for i in islands if not _inside(i, island)] + [island]
    reference_overflow = [c for c in report.nodes if c.rel_error is not None and c.rel_error != c.rel_error]
    if reference_overflow:
        notes.append(f"{reference_overflow[0].node}: the fp32 reference itself is not finite there")
    first = report.first_over_tolerance
    if not candidates and first is not None and first.scope:
        islands.append(first.scope)
    return islands, notes
