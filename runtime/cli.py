"""``kandinsky-trt``: the command line.

argparse lives here and only here; each command turns its arguments into the library's frozen
config dataclasses at once. Commands from the export and engine layers are imported inside their
handlers, so a runtime-only install can still ``generate`` without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("kandinsky_trt")


def _cmd_tiny_checkpoint(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    result = write_tiny_checkpoint(Path(args.out), seed=args.seed)
    print(f"tiny Kandinsky 2.1 checkpoint written: {result.prior}, {result.decoder}, {result.inpaint}")
    return 0


def _profile(args: argparse.Namespace):
    from kandinsky_trt.runtime.spec import Profile

    return Profile(batch=args.batch, height=args.height, width=args.width, cfg=not args.no_cfg)


def _cmd_export(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs

    dirs = CheckpointDirs(Path(args.prior), Path(args.decoder), Path(args.inpaint) if args.inpaint else None)
    config = ExportConfig(
        checkpoints=dirs, out_dir=Path(args.out), profile=_profile(args), precision=args.precision,
        exporter=args.exporter, verify=args.verify, networks=tuple(args.networks) if args.networks else None,
    )
    report = export_artifacts(config)
    print(f"manifest: {report.manifest_path}  (exported {len(report.exported)}, reused {len(report.reused)})")
    for parity in report.parity:
        print("  " + parity.line())
    if not report.passed:
        print("parity check FAILED (see the lines marked FAIL)", file=sys.stderr)
        return 1
    return 0


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=512, help="image height in pixels, multiple of 64 (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels, multiple of 64 (default 512)")
    p.add_argument("--batch", type=int, default=1, help="images per network call (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="profile without classifier-free guidance (batch not doubled)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky-trt",
        description="Kandinsky 2.1 on ONNX Runtime / TensorRT. Start with `kandinsky-trt demo`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    p.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy",
                   help="torch.onnx exporter (default legacy: static shapes, fast; see export/onnx_export.py)")
    p.add_argument("--verify", action="store_true", help="check every graph in ONNX Runtime against torch")
    p.add_argument("--networks", nargs="+", help="export only these networks (default: all)")
    _add_profile_args(p)
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from kandinsky_trt.runtime.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
