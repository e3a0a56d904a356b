"""Where does an fp16 graph leave its fp32 reference? Node-by-node comparison on ONNX Runtime (CPU).

For each network, the fp16 graph and the fp32 graph of the same checkpoint run on the same seeded
inputs (:func:`~kandinsky_trt.runtime.backends.base.sample_inputs`, the generator that traces the
exports, checks parity and times stages). Every intermediate tensor is seen
(:mod:`~kandinsky_trt.export.onnx_segments`: each graph runs as consecutive segments whose
nodes' outputs are all marked as outputs, so memory stays bounded by one segment plus the tensors
still needed, never by the whole graph). Tensors are matched by node
(:mod:`~kandinsky_trt.export.graph_alignment`: module scope + operator + occurrence, Casts
excluded). The two graphs advance in lockstep: each fp16 node's tensors are compared with their
reference as soon as both exist, reduced to a few numbers, and dropped.

Per float tensor of the fp16 graph: max finite |activation|, non-finite count, and, where a
reference tensor exists, the relative error ``max|fp16 - fp32| / max|fp32|`` (inf when only the
fp16 tensor has non-finite values) and the reference's max |activation|, which against the fp16
limit 65504 marks the overflow candidates. :class:`NetworkReport` orders the findings
topologically; :mod:`~kandinsky_trt.export.precision_fix` turns them into fp32 islands to add.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kandinsky_trt.export.graph_alignment import align, origins
from kandinsky_trt.export.onnx_segments import SegmentedGraph, SegmentLimits, node_inputs
from kandinsky_trt.runtime.backends.base import sample_inputs
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.manifest import ManifestError, NetworkEntry, load_manifest

log = logging.getLogger(__name__)

FP16_MAX = 65504.0  # largest finite float16
# Relative error (to the tensor's own scale) above which a node counts as departing from fp32: about
# 2.4x the worst tensor of clean fp16 exports measured (tiny checkpoint, every network: 2.1e-2, the
# MoVQ decoder's final Sigmoid at 64x128, whose inputs reach |x| = 17; UNet 2.2e-3 tiny, 4.7e-3 full
# size). fp16 rounds to 4.9e-4 per operation, and the errors accumulate along the graph. An overflow
# gives inf; broken fp16 numerics (a softmax or a variance in fp16) give errors of order 0.1 to 1.
DEFAULT_TOLERANCE = 5e-2


class PrecisionDebugError(KandinskyTrtError, ValueError):
    """Artifacts that cannot be compared: missing, not fp16 / fp32, other networks or exporters."""


@dataclass(frozen=True)
class DebugConfig:
    fp16_artifacts: Path
    reference: Path  # fp32 artifacts of the same checkpoint and profile, same exporter
    networks: tuple[str, ...] | None = None  # None: every network of the fp16 artifacts but the steps
    seed: int = 0
    tolerance: float = DEFAULT_TOLERANCE
    top_k: int = 10
    limits: SegmentLimits = SegmentLimits()


@dataclass(frozen=True)
class NodeResult:
    """One float output of one fp16-graph node."""

    index: int  # topological position of the node in the fp16 graph
    node: str
    op: str  # ONNX op type
    scope: str  # module path in the network's model ("" for the wrapper)
    output: str
    dtype: str
    max_abs: float  # finite values of the fp16 graph's tensor
    non_finite: int
    ref_max_abs: float | None = None  # None: no reference tensor (Casts, differently decomposed scopes)
    rel_error: float | None = None
    saturated: int = 0  # masking constants (+-inf, +-65504) left out of the comparison (see compare_arrays)

    def over(self, tolerance: float) -> bool:
        return self.rel_error is not None and not self.rel_error <= tolerance


@dataclass
class NetworkReport:
    network: str
    tolerance: float
    top_k: int
    nodes: list[NodeResult]
    suggestion: list[str] = field(default_factory=list)  # module paths to add as fp32 islands
    notes: list[str] = field(default_factory=list)

    @property
    def compared(self) -> list[NodeResult]:
        return [n for n in self.nodes if n.rel_error is not None]

    @property
    def first_over_tolerance(self) -> NodeResult | None:
        return next((n for n in self.nodes if n.over(self.tolerance)), None)

    @property
    def first_non_finite(self) -> NodeResult | None:
        return next((n for n in self.nodes if n.non_finite), None)

    @property
    def top_errors(self) -> list[NodeResult]:
        ranked = sorted(self.compared, key=lambda n: (-_sortable(n.rel_error), n.index))
        return ranked[:self.top_k]

    @property
    def overflow_candidates(self) -> list[NodeResult]:
        """fp16 tensors whose fp32 reference reaches the fp16 limit (they cannot be fp16)."""
        return [n for n in self.nodes if n.dtype == "float16" and (n.ref_max_abs or 0.0) >= FP16_MAX]

    @property
    def top_activations(self) -> list[NodeResult]:
        key = lambda n: -(n.ref_max_abs if n.ref_max_abs is not None else n.max_abs)  # noqa: E731
        return sorted((n for n in self.nodes if n.dtype == "float16"), key=key)[:self.top_k]

    @property
    def passed(self) -> bool:
        return self.first_over_tolerance is None and self.first_non_finite is None

    def to_dict(self) -> dict:
        def rows(nodes):
            return [_jsonable(asdict(n)) for n in nodes]

        first = (self.first_over_tolerance, self.first_non_finite)
        return {
            "network": self.network, "passed": self.passed, "tolerance": self.tolerance, "fp16_max": FP16_MAX,
            "tensors": len(self.nodes), "compared": len(self.compared),
            "first_over_tolerance": rows([first[0]])[0] if first[0] else None,
            "first_non_finite": rows([first[1]])[0] if first[1] else None,
            "top_rel_error": rows(self.top_errors), "overflow_candidates": rows(self.overflow_candidates),
            "top_activation": rows(self.top_activations), "suggested_fp32_nodes": self.suggestion,
            "notes": self.notes, "nodes": rows(self.nodes),
        }


def _sortable(value: float | None) -> float:
    return -1.0 if value is None else (math.inf if math.isnan(value) else value)


def _jsonable(row: dict) -> dict:
    """JSON has no inf/NaN: write them as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def tensor_stats(array: np.ndarray) -> tuple[float, int]:
    """(max finite |x|, number of non-finite values)."""
    values = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(values)
    count = int(values.size - np.count_nonzero(finite))
    return float(np.max(np.abs(values), where=finite, initial=0.0)), count


def compare_arrays(found: np.ndarray, reference: np.ndarray) -> tuple[float, float, int, int]:
    """(relative error, reference max |x|, masked elements, unexplained non-finite) for one shape.

    Relative error: ``max|found - reference| / max|reference|``; inf when ``found`` has non-finite
    values the reference lacks, NaN when the reference has some of its own. *Masked* elements are
    left out of both numbers and counted: masking constants — the same +-inf in both tensors (causal
    masks), or exactly +-65504 in an fp16 tensor where the reference is at least as large, same sign
    (``finfo(dtype).min`` masks; a real overflow rounds to inf, never to 65504).
    """
    half = found.dtype == np.float16
    found, reference = np.asarray(found, np.float32), np.asarray(reference, np.float32)
    masked = np.isinf(found) & (found == reference)
    if half:
        masked |= (np.abs(found) == FP16_MAX) & (np.abs(reference) >= FP16_MAX) & (np.sign(found) == np.sign(reference))
    keep = ~masked
    excluded = int(masked.sum())
    unexplained = int(np.count_nonzero(~np.isfinite(found) & keep))
    if not np.isfinite(reference).all(where=keep):
        return math.nan, math.nan, excluded, unexplained
    ref_max = float(np.max(np.abs(reference), where=keep, initial=0.0))
    if unexplained:
        return math.inf, ref_max, excluded, unexplained
    with np.errstate(invalid="ignore"):  # masked infinities subtract to NaN; they are left out
        diff = float(np.max(np.abs(found - reference), where=keep, initial=0.0))
    return (diff / ref_max if ref_max > 0 else (0.0 if diff == 0 else math.inf)), ref_max, excluded, unexplained


def _result(place: tuple, name: str, arrays: tuple, inherited: bool) -> NodeResult:
    """One tensor's numbers. Without a reference, non-finite values count only where this node made
    them: not for literal constants, nor where an input already held non-finite values (masks).
    ``place``: (topological index, node, its :class:`NodeOrigin` or None)."""
    (index, node, origin), (found, reference) = place, arrays
    max_abs, non_finite = tensor_stats(found)
    rel = ref_max = None
    masked = 0
    if reference is not None and reference.shape == found.shape:
        rel, ref_max, masked, non_finite = compare_arrays(found, reference)
    elif inherited:
        masked, non_finite = non_finite, 0
    return NodeResult(index, node.name or name, node.op_type, origin.scope if origin else "", name,
                      found.dtype.name, max_abs, non_finite, ref_max, rel, masked)


def compare_graphs(fp16: SegmentedGraph, reference: SegmentedGraph, feeds: dict[str, np.ndarray]) -> list[NodeResult]:
    """Run both graphs in lockstep on ``feeds``; one :class:`NodeResult` per float fp16 tensor."""
    pairs = align(fp16.model, reference.model)
    wanted = set(pairs.values())
    found16 = origins(fp16.model)
    produced = {o for n in fp16.nodes for o in n.output}
    ahead: dict[str, np.ndarray] = {}  # reference tensors produced before their fp16 counterpart
    holds_non_finite: set[str] = set()  # fp16 tensors with any non-finite value, masks included
    ref_run = reference.run(feeds)

    def reference_of(name: str) -> np.ndarray | None:
        target = pairs.get(name)
        while target is not None and target not in ahead:
            step = next(ref_run, None)
            if step is None:
                return None
            ahead.update({k: v for k, v in step[2].items() if k in wanted})
        return ahead.pop(target) if target is not None else None

    results = []
    for index, node, outputs in fp16.run(feeds):
        inputs = [i for i in node_inputs(node) if i in produced]
        inherited = not inputs or any(i in holds_non_finite for i in inputs)
        for name, array in outputs.items():
            ref = reference_of(name)
            if np.issubdtype(array.dtype, np.floating):
                result = _result((index, node, found16[index]), name, (array, ref), inherited)
                if result.non_finite or result.saturated:
                    holds_non_finite.add(name)
                results.append(result)
    return results


def _entry(directory: Path, name: str, precision: str, what: str) -> NetworkEntry:
    try:
        manifest = load_manifest(directory)
    except ManifestError as err:
        raise PrecisionDebugError(f"{what}: {err}") from None
    entry = manifest.networks.get(name)
    if entry is None:
        raise PrecisionDebugError(f"{what}: expected network {name!r} in {directory}, found "
                                  f"{sorted(manifest.networks)}")
    if entry.precision != precision:
        raise PrecisionDebugError(f"{what}: expected {precision} graphs in {directory}, found {entry.precision} "
                                  f"({name})")
    return entry


def debug_network(config: DebugConfig, name: str) -> NetworkReport:
    """Compare one network of ``config.fp16_artifacts`` with ``config.reference``."""
    from kandinsky_trt.export.precision_fix import suggest_islands

    fp16 = _entry(Path(config.fp16_artifacts), name, "fp16", "--artifacts")
    reference = _entry(Path(config.reference), name, "fp32", "--reference")
    if fp16.inputs != reference.inputs:
        wanted, found = ([t.to_dict() for t in e.inputs] for e in (fp16, reference))
        raise PrecisionDebugError(f"--reference: expected {name}'s inputs of the fp16 artifacts {wanted}, found "
                                  f"{found} (export the reference at the same profile)")
    shapes = {t.name: t.shape for t in fp16.resolved().inputs}  # at the default profile
    graph16 = SegmentedGraph(Path(config.fp16_artifacts) / fp16.onnx, config.limits, shapes)
    graph32 = SegmentedGraph(Path(config.reference) / reference.onnx, config.limits, shapes)
    feeds = sample_inputs(fp16.resolved(), seed=config.seed)
    try:
        nodes = compare_graphs(graph16, graph32, feeds)
    except ValueError as err:  # graphs from different exporters
        raise PrecisionDebugError(str(err)) from None
    report = NetworkReport(name, config.tolerance, config.top_k, nodes)
    report.suggestion, report.notes = suggest_islands(report, graph16)
    return report


def debug_precision(config: DebugConfig) -> list[NetworkReport]:
    """One :class:`NetworkReport` per selected network (see the module docstring)."""
    if not (isinstance(config.tolerance, float | int) and config.tolerance > 0):
        raise PrecisionDebugError(f"--tolerance: expected a number > 0, found {config.tolerance!r}")
    try:
        manifest = load_manifest(Path(config.fp16_artifacts))
    except ManifestError as err:
        raise PrecisionDebugError(f"--artifacts: {err}") from None
    names = config.networks or tuple(n for n, e in manifest.networks.items() if e.precision == "fp16")
    reports = []
    for name in names:
        log.info("%s: comparing fp16 with fp32, node by node", name)
        reports.append(debug_network(config, name))
    return reports
