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


def _save_images(images: list, out: str) -> list[Path]:
    """``out`` for one image, ``stem-<i>.suffix`` for several; written through unique temporary names."""
    from kandinsky_trt.runtime.output_paths import image_targets, save_images

    return save_images(images, image_targets(out, len(images)))


def _open_image(path: str | None, name: str):
    if path is None:
        return None
    from PIL import Image

    from kandinsky_trt.runtime.components import PipelineInputError

    try:
        image = Image.open(path)
        image.load()  # PIL reads lazily: a truncated file fails here, not deep in a pipeline
        return image.convert("RGB") if name == "--image" else image
    except (OSError, SyntaxError, ValueError) as err:
        raise PipelineInputError(f"{name}: expected a readable image file, found {path!r} ({err})") from None


def _size(args: argparse.Namespace, components) -> tuple[int, int]:
    """--height/--width, or the artifacts' size when neither is given; refused before any network runs."""
    from kandinsky_trt.runtime.inputs import check_size

    height, width = check_size(args.height, args.width, components.profile)
    if args.height is None and args.width is None:
        print(f"size: width {width}, height {height} (the artifacts' size; --width/--height for another)", file=sys.stderr)
    return height, width


def _cmd_generate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime import cli_checks, inputs

    with inputs.renamed(cli_checks.FLAGS):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime import cli_checks, inputs
    from kandinsky_trt.runtime import combined_pipelines as cp
    from kandinsky_trt.runtime.components import Components, PipelineInputError
    from kandinsky_trt.runtime.output_paths import save_images

    n = inputs.check_images_per_prompt(args.num_images, 1)
    targets = cli_checks.run_args(args, n)
    inputs.as_prompt_list(args.prompt)
    if args.mask is not None and args.image is None:
        raise PipelineInputError("--mask: expected --image as well (the image to inpaint), found only --mask")
    if args.image is not None and args.mask is None:
        inputs.check_strength(args.strength, args.steps)
    image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
    common = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.num_images,
                  prior_guidance_scale=args.prior_guidance, prior_num_inference_steps=args.prior_steps,
                  generator=args.seed, scheduler=args.scheduler)
    with Components(args.artifacts, args.backend, args.device, not args.no_cuda_graph) as components:
        common["height"], common["width"] = _size(args, components)
        steps = min(int(args.steps * args.strength), args.steps) if image is not None and mask is None else args.steps
        bar = callback = cli_checks.Progress(steps * args.num_images, "decoder")
        if mask is not None:
            pipe = cp.KandinskyInpaintCombinedPipeline(components=components)
            out = pipe(args.prompt, image, mask, callback=callback, **common)
        elif image is not None:
            pipe = cp.KandinskyImg2ImgCombinedPipeline(components=components)
            out = pipe(args.prompt, image, strength=args.strength, callback=callback, **common)
        else:
            out = cp.KandinskyCombinedPipeline(components=components)(args.prompt, callback=callback, **common)
        bar.close()
    for path in save_images(out.images, targets):
        print(f"wrote {path}")
    return 0


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime import cli_checks, inputs

    with inputs.renamed(cli_checks.FLAGS):
        return _interpolate(args)


def _interpolate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime import cli_checks, inputs
    from kandinsky_trt.runtime.components import Components, PipelineInputError
    from kandinsky_trt.runtime.decoder_pipelines import KandinskyPipeline
    from kandinsky_trt.runtime.output_paths import save_images
    from kandinsky_trt.runtime.prior_pipeline import KandinskyPriorPipeline

    targets = cli_checks.run_args(args, 1)
    texts = [(text, cli_checks.weight(w, "--text", text)) for text, w in args.text or []]
    if texts:
        inputs.check_conditions([text for text, _ in texts])
    images = [(path, cli_checks.weight(w, "--image", path)) for path, w in args.image or []]
    conditions = texts + [(_open_image(path, "--image").convert("RGB"), w) for path, w in images]
    if not conditions:
        raise PipelineInputError("--text/--image: expected at least one condition with a weight, found none")
    with Components(args.artifacts, args.backend, args.device, not args.no_cuda_graph) as components:
        height, width = _size(args, components)
        prior = KandinskyPriorPipeline(components=components)
        mix = prior.interpolate([c for c, _ in conditions], [w for _, w in conditions],
                                num_inference_steps=args.prior_steps, generator=args.seed)
        bar = callback = cli_checks.Progress(args.steps, "decoder")
        out = KandinskyPipeline(components=components)(
            "", mix.image_embeds, mix.negative_image_embeds, height=height, width=width,
            num_inference_steps=args.steps, generator=args.seed, callback=callback)
        bar.close()
    for path in save_images(out.images, targets):
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kandinsky_trt.export.demo import run_demo

    result = run_demo(Path(args.out))
    print(f"kandinsky-trt vs diffusers, same checkpoint, prompt and draws: max |difference| {result.max_diff:.2e}, "
          f"mean {result.mean_diff:.2e} (images in [0, 1])")
    art = result.artifacts
    print(f"try: kandinsky-trt generate \"a cat\" --artifacts {art} --out cat.png  "
          f"(--image {result.image} --strength 0.5 for img2img; add --mask {result.mask} to inpaint)")
    print(f"files: checkpoint {result.checkpoint.decoder.parent}/  artifacts {art}/  image {result.image}  "
          f"comparison {result.comparison}  mask {result.mask}")
    return 0 if result.export.passed else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from kandinsky_trt.benchmarks.report import compare_results, write_result

    if args.compare:
        report = compare_results(*args.compare, threshold=args.threshold)
        print(report.to_markdown())
        return 1 if report.regressions else 0
    if not args.artifacts:
        from kandinsky_trt.runtime.components import PipelineInputError

        raise PipelineInputError("--artifacts: expected an artifacts directory (or --compare A.json B.json), found none")
    from kandinsky_trt.benchmarks.harness import BenchConfig, run_benchmark
    from kandinsky_trt.runtime.output_paths import check_writable_directory

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


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int, default=512, help="image height in pixels, multiple of 64 (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels, multiple of 64 (default 512)")
    p.add_argument("--batch", type=int, default=1, help="images per network call (default 1)")
    p.add_argument("--no-cfg", action="store_true", help="profile without classifier-free guidance (batch not doubled)")


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the commands that generate images."""
    p.add_argument("--artifacts", required=True, help="artifacts directory from `export`")
    p.add_argument("--out", default="out.png", help="output image path (several images: out-0.png, ...)")
    p.add_argument("--backend", choices=("ort", "torch", "trt"), default="ort", help="default ort (ONNX Runtime)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run the denoising loops eagerly instead of replaying CUDA graphs (to compare)")
    p.add_argument("--steps", type=int, default=100, help="decoder steps (default 100)")
    p.add_argument("--prior-steps", type=int, default=25, help="prior steps (default 25)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh entropy)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the artifacts' size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the artifacts' size)")


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


def _add_image_commands(sub) -> None:
    p = sub.add_parser("generate", help="text -> image (with --image: img2img, with --mask: inpaint)")
    p.add_argument("prompt", help="what to draw")
    _add_run_args(p)
    p.add_argument("--negative-prompt", help="what to avoid (prior and decoder)")
    p.add_argument("--guidance", type=float, default=4.0, help="decoder guidance scale (default 4)")
    p.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale (default 4)")
    p.add_argument("--scheduler", choices=("ddim", "ddpm", "dpmpp2m"), help="decoder scheduler (default: ddim)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--image", help="input image: img2img (or the image to inpaint with --mask)")
    p.add_argument("--strength", type=float, default=0.3, help="img2img strength in (0, 1] (default 0.3)")
    p.add_argument("--mask", help="inpaint mask: white = repaint (needs --image and inpaint artifacts)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("interpolate", help="mix text and image conditions, then decode one image")
    _add_run_args(p)
    p.add_argument("--text", nargs=2, action="append", metavar=("TEXT", "WEIGHT"), help="a text condition")
    p.add_argument("--image", nargs=2, action="append", metavar=("PATH", "WEIGHT"), help="an image condition")
    p.set_defaults(func=_cmd_interpolate)

    p = sub.add_parser("demo", help="tiny checkpoint -> ONNX -> image on CPU, no flags needed")
    p.add_argument("--out", default="kandinsky-demo", help="working directory (default ./kandinsky-demo)")
    p.set_defaults(func=_cmd_demo)


def _add_bench_command(sub) -> None:
    p = sub.add_parser("bench", help="time stages and pipelines for several backends side by side")
    p.add_argument("--artifacts", help="artifacts directory from `export`")
    p.add_argument("--backends", nargs="+", default=["torch", "ort"], choices=("torch", "ort", "trt"),
                   help="backends to compare in one run; torch (diffusers, eager) is the baseline")
    p.add_argument("--stages", nargs="*", help="networks to time (default: all; give none to skip stages)")
    p.add_argument("--pipelines", nargs="*", default=[], choices=("text2img", "img2img", "inpaint"),
                   help="end-to-end runs (ours vs diffusers)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--steps", type=int, default=10, help="decoder steps end to end (default 10)")
    p.add_argument("--prior-steps", type=int, default=5, help="prior steps end to end (default 5)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="benchmarks/results", help="where the JSON/Markdown/PNG go")
    p.add_argument("--name", help="file stem (default: device, profile and date)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two result files instead")
    p.add_argument("--threshold", type=float, default=0.05, help="regression threshold for --compare (default 5%%)")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kandinsky-trt",
        description="Kandinsky 2.1 on ONNX Runtime / TensorRT. Start with `kandinsky-trt demo`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_artifact_commands(sub)
    from kandinsky_trt.engine import commands as engine_commands  # argparse only; no TensorRT import
    from kandinsky_trt.export import commands as export_commands  # argparse only; no torch import

    engine_commands.add_commands(sub)
    export_commands.add_commands(sub)
    _add_image_commands(sub)
    _add_bench_command(sub)
    from kandinsky_trt.runtime.serve.commands import add_commands as add_serve_commands
    add_serve_commands(sub)
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
