"""The ``build`` command: its parser and handler (registered by :mod:`kandinsky_trt.runtime.cli.main`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _cmd_build(args: argparse.Namespace) -> int:
    from kandinsky_trt.engine.builder import BuildConfig, build_engines

    config = BuildConfig(
        artifacts=Path(args.artifacts), networks=tuple(args.networks) if args.networks else None,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None, opt_level=args.opt_level,
        workspace_gb=args.workspace, force=args.force,
    )
    for path in build_engines(config):
        print(f"engine: {path}")
    return 0


def add_commands(sub) -> None:
    """Add ``build`` to the ``kandinsky-trt`` subparsers ``sub``."""
    p = sub.add_parser("build", help="build TensorRT engines (one plan per network) from exported artifacts")
    p.add_argument("--artifacts", required=True, help="artifacts directory from `export`")
    p.add_argument("--networks", nargs="+", help="build only these networks (default: all)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file to load and update")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimization level 0-5 (default 3)")
    p.add_argument("--workspace", type=float, help="workspace memory pool limit in GB (default: TensorRT's)")
    p.add_argument("--force", action="store_true", help="rebuild even when a matching plan exists")
    p.set_defaults(func=_cmd_build)
