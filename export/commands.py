"""The export layer's commands: ``tiny-checkpoint``, ``export``, ``demo`` and ``debug-precision``.

Registered through the ``kandinsky_trt.commands`` entry point (``pyproject.toml``), so the runtime's
CLI never imports this layer. Nothing heavy is imported here: torch, onnx and ONNX Runtime load
inside the handlers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kandinsky_trt.runtime.cli.console import quiet_libraries


def _cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    quiet_libraries()
    result = write_tiny_checkpoint(Path(args.out), seed=args.seed)
    print(f"tiny Kandinsky 2.1 checkpoint written: {result.prior}, {result.decoder}, {result.inpaint}")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` (as image sizes are written) -> (height, width)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 768x512, found {text!r}")
    width, height = (int(p) for p in parts)
    return height, width


def _profiles(args: argparse.Namespace) -> tuple:
    """Every size x batch, sizes in the order given (the first size and batch are the default)."""
    from kandinsky_trt.export.onnx_export import ExportError
    from kandinsky_trt.runtime.contract.spec import Profile

    if args.size and (args.height is not None or args.width is not None):
        raise ExportError("--size: expected either --size (repeatable) or --height/--width, found both")
    sizes = args.size or [(args.height or 512, args.width or 512)]
    return tuple(Profile(batch=b, height=h, width=w, cfg=not args.no_cfg)
                 for h, w in dict.fromkeys(sizes) for b in dict.fromkeys(args.batch))


def _cmd_export(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs

    quiet_libraries()
    dirs = CheckpointDirs(Path(args.prior), Path(args.decoder), Path(args.inpaint) if args.inpaint else None)
    config = ExportConfig(
        checkpoints=dirs, out_dir=Path(args.out), profiles=_profiles(args), precision=args.precision,
        exporter=args.exporter, verify=args.verify, networks=tuple(args.networks) if args.networks else None,
        fp32_nodes=tuple(args.fp32_nodes or ()),
    )
    report = export_artifacts(config)
    print(f"manifest: {report.manifest_path}  (exported {len(report.exported)}, reused {len(report.reused)})")
    for parity in report.parity:
        print("  " + parity.line())
    if not report.passed:
        print("parity check FAILED (see the lines marked FAIL)", file=sys.stderr)
        return 1
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.demo import run_demo

    quiet_libraries()
    result = run_demo(Path(args.out))
    print("ONNX graphs vs torch modules:")
    for parity in result.export.parity:
        print("  " + parity.line())
    print(f"kandinsky-trt vs diffusers, same checkpoint, prompt and draws: max |difference| {result.max_diff:.2e}, "
          f"mean {result.mean_diff:.2e} (images in [0, 1])")
    art = result.artifacts
    print(f"try: {_program()} generate \"a cat\" --artifacts {art} --out cat.png  "
          f"(--image {result.image} --strength 0.5 for img2img; add --mask {result.mask} to inpaint)")
    print(f"files: checkpoint {result.checkpoint.decoder.parent}/  artifacts {art}/  image {result.image}  "
          f"comparison {result.comparison}  mask {result.mask}")
    return 0 if result.export.passed else 1


def _program() -> str:
    """How the user ran us (``.venv/bin/kandinsky-trt`` after the quick start), for lines to copy."""
    import os
    import shlex

    argv0 = sys.argv[0] if sys.argv else ""
    return shlex.quote(argv0) if os.path.basename(argv0) == "kandinsky-trt" else "kandinsky-trt"


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=parse_size, action="append", metavar="WIDTHxHEIGHT",
                   help="an image size to serve, multiples of the MoVQ scale factor squared (64 for Kandinsky "
                        "2.1), e.g. 768x512; repeat for several (every size x batch is a profile; the first is "
                        "the default size)")
    p.add_argument("--height", type=int, help="image height in pixels for one size (default 512)")
    p.add_argument("--width", type=int, help="image width in pixels for one size (default 512)")
    p.add_argument("--batch", type=int, nargs="+", default=[1], metavar="BATCH",
                   help="images per network call, one or more (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="profile without classifier-free guidance (batch not doubled)")


def _add_artifact_commands(sub) -> None:
    p = sub.add_parser("tiny-checkpoint", help="write tiny random-weight Kandinsky 2.1 checkpoints (diffusers format)")
    p.add_argument("out", help="output directory (gets prior/, decoder/, inpaint/)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    p.set_defaults(func=_cmd_tiny_checkpoint)

    p = sub.add_parser("export", help="export checkpoints to ONNX artifacts + manifest.json")
    p.add_argument("--prior", required=True, help="prior checkpoint dir (like kandinsky-2-1-prior)")
    p.add_argument("--decoder", required=True, help="decoder checkpoint dir (like kandinsky-2-1)")
    p.add_argument("--inpaint", help="inpaint checkpoint dir (like kandinsky-2-1-inpaint); enables inpainting")
    p.add_argument("--out", required=True, help="artifacts directory to write")
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16", help="graph precision (default fp16)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.onnx exporter (default dynamo; legacy is faster on tiny models but runs a "
                        "real fp16 forward, very slow on CPU at full size; see export/onnx_export.py)")
    p.add_argument("--verify", action="store_true", help="check every graph in ONNX Runtime against torch")
    p.add_argument("--networks", nargs="+", help="export only these networks (default: all)")
    p.add_argument("--fp32-nodes", nargs="+", metavar="NETWORK:MODULE",
                   help="extra fp32 islands in fp16 graphs, e.g. unet:down_blocks.0.resnets.0 (module paths "
                        "of the network's model, as `debug-precision` suggests them)")
    _add_profile_args(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("demo", help="tiny checkpoint -> ONNX -> image on CPU, no flags needed")
    p.add_argument("--out", default="kandinsky-demo", help="working directory (default ./kandinsky-demo)")
    p.set_defaults(func=_cmd_demo)


def _cmd_debug_precision(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.onnx_segments import SegmentLimits
    from kandinsky_trt.export.precision_debug import DebugConfig, debug_precision
    from kandinsky_trt.export.precision_report import fix_option, format_report, write_report

    quiet_libraries()
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
    """Add this layer's commands to the ``kandinsky-trt`` subparsers ``sub``."""
    _add_artifact_commands(sub)
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
