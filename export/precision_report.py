"""``debug-precision`` output: a terminal table per network and one JSON report for all of them."""

from __future__ import annotations

import json
import math
from pathlib import Path

from kandinsky_trt.export.precision_debug import FP16_MAX, DebugConfig, NetworkReport, NodeResult
from kandinsky_trt.runtime.contract.manifest import write_bytes_atomic


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if not math.isfinite(value) else f"{value:.2e}"


def _row(label: str, node: NodeResult) -> str:
    where = node.scope or "(wrapper)"
    return (f"  {label:<9} #{node.index:<5} {node.node[:34]:<34} {node.op[:21]:<21} {where[:40]:<40} "
            f"{_num(node.rel_error):>9} {_num(node.ref_max_abs):>9} {_num(node.max_abs):>9} {node.non_finite:>6}")


def format_report(report: NetworkReport) -> str:
    """The readable summary of one network (topological positions, worst nodes, overflow candidates)."""
    verdict = "ok" if report.passed else "FAIL"
    lines = [f"{report.network}: {verdict}  ({len(report.compared)} of {len(report.nodes)} fp16 tensors compared "
             f"with fp32; tolerance {report.tolerance:.0e} relative; fp16 limit {FP16_MAX:.0f})",
             f"  {'':<9} {'node':<6} {'name':<34} {'op':<21} {'module':<40} {'rel err':>9} {'|fp32|':>9} "
             f"{'|fp16|':>9} {'nonfin':>6}"]
    first, non_finite = report.first_over_tolerance, report.first_non_finite
    lines.append(_row("first>tol", first) if first else "  first>tol none")
    lines.append(_row("first NaN", non_finite) if non_finite else "  first NaN none (every fp16 tensor is finite)")
    lines += [_row(f"top {i + 1}", n) for i, n in enumerate(report.top_errors)]
    lines += [_row("max |x|", n) for n in report.top_activations[:3]]
    overflow = report.overflow_candidates
    lines.append(f"  overflow candidates (fp16 tensors whose fp32 value reaches {FP16_MAX:.0f}): "
                 + (", ".join(f"#{n.index} {n.node}" for n in overflow[:8]) + (" ..." if len(overflow) > 8 else "")
                    if overflow else "none"))
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)


def fix_option(reports: list[NetworkReport]) -> str | None:
    """``--fp32-nodes unet:down_blocks.0.resnets.0 ...`` for the suggested islands, or None."""
    nodes = [f"{r.network}:{module}" for r in reports for module in r.suggestion]
    return "--fp32-nodes " + " ".join(nodes) if nodes else None


def write_report(reports: list[NetworkReport], config: DebugConfig, path: Path) -> None:
    """All networks' reports as one JSON file, written atomically."""
    payload = {
        "fp16_artifacts": str(config.fp16_artifacts), "reference": str(config.reference), "seed": config.seed,
        "inputs": "kandinsky_trt.runtime.backends.base.sample_inputs(network, seed)",
        "relative_error": "max|fp16 - fp32| / max|fp32| per tensor", "fix": fix_option(reports),
        "networks": [r.to_dict() for r in reports],
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(Path(path), (json.dumps(payload, indent=1) + "\n").encode())
