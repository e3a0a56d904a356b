"""The ``debug-precision`` command: its parser and handler (registered by :mod:`kandinsky_trt.runtime.cli`).

Nothing heavy is imported here: onnx and ONNX Runtime load inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_debug_precision(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.onnx_segments import SegmentLimits
    from kandinsky_trt.export.precision_debug import DebugConfig, debug_precision
    from kandinsky_trt.export.precision_report import fix_option, format_report, write_report

    config = DebugConfig(
        fp16_artifacts=Path(args.artifacts), reference=Path(args.reference),
        networks=tuple(args.networks) if args.networks else None, seed=args.seed, top_k=args.top,
        limits=SegmentLimits(budget_bytes=int(args.segment_mb * 2**20)),
        **({} if args.tolerance is None else {"tolerance": args.tolerance}),
    )
    reports = debug_precision(config)
    for report in reports:
        print(format_report(report))
    fix = fix_option(reports)
    if fix:
        print(f"suggested fix: re-export with  {fix}")
    if args.out:
        write_report(reports, config, Path(args.out))
        print(f"report: {args.out}")
    return 0 if all(r.passed for r in reports) else 1


def add_commands(sub) -> None:
    """Add ``debug-precision`` to the ``kandinsky-trt`` subparsers ``sub``."""
    p = sub.add_parser(
        "debug-precision",
        help="find the first node where an fp16 export leaves its fp32 reference (ONNX Runtime, CPU)",
        description="Runs the fp16 and the fp32 graphs of the same checkpoint on the same seeded inputs, "
                    "compares every intermediate tensor node by node and suggests fp32 islands "
                    "(`export --fp32-nodes`). Exit status 1 when a node exceeds the tolerance or is not finite.",
    )
    p.add_argument("--artifacts", required=True, help="fp16 artifacts directory from `export`")
    p.add_argument("--reference", required=True,
                   help="fp32 artifacts of the same checkpoint, profile and --exporter (`export --precision fp32`)")
    p.add_argument("--networks", "--network", nargs="+", help="networks to compare (default: every fp16 network)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample inputs (default 0)")
    p.add_argument("--tolerance", type=float,
                   help="relative error per tensor above which a node fails (default: DEFAULT_TOLERANCE in "
                        "export/precision_debug.py, 5e-2)")
    p.add_argument("--top", type=int, default=10, help="how many worst nodes to list (default 10)")
    p.add_argument("--segment-mb", type=float, default=512,
                   help="memory budget of one graph segment's outputs and weights in MiB (default 512)")
    p.add_argument("--out", help="write the JSON report here")
    p.set_defaults(func=_cmd_debug_precision)
