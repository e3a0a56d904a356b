"""The ``bench`` command: its parser and handler (registered through the ``kandinsky_trt.commands`` entry point).

Nothing heavy is imported here: the harness (and torch, for its baseline) loads inside the handler.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_bench(args: argparse.Namespace) -> int:
    from kandinsky_trt.benchmarks.report import compare_results, write_result

    if args.compare:
        report = compare_results(*args.compare, threshold=args.threshold)
        print(report.to_markdown())
        return 1 if report.regressions else 0
    if not args.artifacts:
        from kandinsky_trt.runtime.contract.errors import PipelineInputError

        raise PipelineInputError("--artifacts: expected an artifacts directory (or --compare A.json B.json), found none")
    from kandinsky_trt.benchmarks.harness import BenchConfig, run_benchmark
    from kandinsky_trt.runtime.cli.console import quiet_libraries
    from kandinsky_trt.runtime.cli.output_paths import check_writable_directory

    quiet_libraries()

    check_writable_directory(args.out, "--out")

    config = BenchConfig(
        artifacts=Path(args.artifacts), backends=tuple(args.backends),
        stages=tuple(args.stages) if args.stages is not None else None, pipelines=tuple(args.pipelines),
        repeat=args.repeat, warmup=args.warmup, steps=args.steps, prior_steps=args.prior_steps, device=args.device,
    )
    paths = write_result(run_benchmark(config), Path(args.out), stem=args.name)
    for path in paths:
        if path is not None:
            print(f"wrote {path}")
    return 0


def add_commands(sub) -> None:
    """Add ``bench`` to the ``kandinsky-trt`` subparsers ``sub``."""
    p = sub.add_parser("bench", help="time stages and pipelines for several backends side by side")
    p.add_argument("--artifacts", help="artifacts directory from `export`")
    p.add_argument("--backends", nargs="+", default=["torch", "ort"], choices=("torch", "ort", "trt"),
                   help="backends to compare in one run; torch (diffusers, eager) is the baseline")
    p.add_argument("--stages", nargs="*", help="networks to time (default: all; give none to skip stages)")
    p.add_argument("--pipelines", nargs="*", default=[], choices=("text2img", "img2img", "inpaint"),
                   help="end-to-end runs (ours vs diffusers)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed rounds per measurement, the backends taking turns in each (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--steps", type=int, default=10, help="decoder steps end to end (default 10)")
    p.add_argument("--prior-steps", type=int, default=5, help="prior steps end to end (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="bench-results",
                   help="where the JSON/Markdown/PNG go (default ./bench-results; the repository's "
                        "benchmarks/results/ holds only the committed figures)")
    p.add_argument("--name", help="file stem (default: device, profile and date)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two result files instead")
    p.add_argument("--threshold", type=float, default=0.05, help="regression threshold for --compare (default 5%%)")
    p.set_defaults(func=_cmd_bench)
