"""``kandinsky-trt``: the parser, the runtime's own commands (``generate``, ``interpolate``) and ``main``.

Each command turns its arguments into the library's calls at once. The export, engine and
benchmark layers add their commands through the ``kandinsky_trt.commands`` entry points and import
their heavy modules inside their handlers, so a runtime-only install can still ``generate``
without torch, and nothing here imports an upper layer.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass


def _open_image(path: str | None, name: str):
    """The file as ``kandinsky-trt client`` reads it too (``processing.images.load_image_file``):
    ``--image`` as RGB, ``--mask`` as L (255 = repaint)."""
    if path is None:
        return None
    from kandinsky_trt.runtime.processing.images import load_image_file

    return load_image_file(path, "L" if name == "--mask" else "RGB", name)


def _size(args: argparse.Namespace, components) -> tuple[int, int]:
    """--height/--width, or the artifacts' size when neither is given; refused before any network runs."""
    from kandinsky_trt.runtime.pipelines.inputs import check_size

    height, width = check_size(args.height, args.width, components.loaded.sizes, components.loaded.latent_scale)
    if args.height is None and args.width is None:
        print(f"size: width {width}, height {height} (the artifacts' size; --width/--height for another)", file=sys.stderr)
    return height, width


def _cmd_generate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.cli import checks as cli_checks
    from kandinsky_trt.runtime.pipelines import inputs

    with inputs.renamed(cli_checks.FLAGS):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.cli import checks as cli_checks
    from kandinsky_trt.runtime.pipelines import inputs
    from kandinsky_trt.runtime.pipelines import combined as cp
    from kandinsky_trt.runtime.contract.errors import PipelineInputError
    from kandinsky_trt.runtime.pipelines.components import Components
    from kandinsky_trt.runtime.pipelines.decoder import img2img_steps
    from kandinsky_trt.runtime.cli.output_paths import save_images

    prompts = inputs.check_prompts(args.prompt, args.negative_prompt, args.num_images)
    targets = cli_checks.run_args(args, prompts.per_prompt)
    if args.mask is not None and args.image is None:
        raise PipelineInputError("--mask: expected --image as well (the image to inpaint), found only --mask")
    if args.image is not None and args.mask is None:
        inputs.check_strength(args.strength, args.steps)
    image, mask = _open_image(args.image, "--image"), _open_image(args.mask, "--mask")
    task = "inpaint" if mask is not None else "img2img" if image is not None else "text2img"
    pipeline = {"text2img": cp.KandinskyCombinedPipeline, "img2img": cp.KandinskyImg2ImgCombinedPipeline,
                "inpaint": cp.KandinskyInpaintCombinedPipeline}[task]
    with Components(args.artifacts, args.backend, args.device, not args.no_cuda_graph) as components:
        size = _size(args, components)
        steps = img2img_steps(args.steps, args.strength) if task == "img2img" else args.steps
        with cli_checks.Progress(steps * args.num_images, "decoder") as callback:
            request = _combined_request(args, components.loaded, prompts, _GenerateInputs(size, image, mask, callback))
            out = pipeline(components=components).run(request)
    for path in save_images(out.images, targets):
        print(f"wrote {path}")
    return 0


@dataclass(frozen=True)
class _GenerateInputs:
    """What ``generate`` adds to its flags: the size, the opened image and mask, the progress callback."""

    size: tuple[int, int]
    image: object
    mask: object
    callback: object


def _combined_request(args: argparse.Namespace, loaded, prompts, given: _GenerateInputs):
    """``generate``'s flags as the combined pipelines' request (their defaults are the flags' defaults)."""
    from kandinsky_trt.runtime.pipelines import inputs
    from kandinsky_trt.runtime.pipelines import requests as rq

    rng = inputs.rng(args.seed)
    if given.mask is not None:
        own = rq.InpaintInputs(rq.images_per_row(given.image, prompts), rq.images_per_row(given.mask, prompts))
    elif given.image is not None:
        own = rq.Img2ImgInputs(rq.images_per_row(given.image, prompts), args.strength)
    else:
        own = rq.Text2ImgInputs()
    decoder = rq.DecoderSettings(num_inference_steps=args.steps, guidance_scale=args.guidance, height=given.size[0],
                                 width=given.size[1], callback=given.callback, scheduler=args.scheduler, inputs=own)
    prior = rq.PriorSettings(num_inference_steps=args.prior_steps, guidance_scale=args.prior_guidance)
    return rq.combined_request(loaded, prompts, prior, decoder, rng)


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.cli import checks as cli_checks
    from kandinsky_trt.runtime.pipelines import inputs

    with inputs.renamed(cli_checks.FLAGS):
        return _interpolate(args)


def _interpolate(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.cli import checks as cli_checks
    from kandinsky_trt.runtime.pipelines import inputs
    from kandinsky_trt.runtime.contract.errors import PipelineInputError
    from kandinsky_trt.runtime.pipelines.components import Components
    from kandinsky_trt.runtime.pipelines.decoder import KandinskyPipeline
    from kandinsky_trt.runtime.cli.output_paths import save_images
    from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline
    from kandinsky_trt.runtime.pipelines import requests as rq

    targets = cli_checks.run_args(args, 1)
    texts = [(text, cli_checks.weight(w, "--text", text)) for text, w in args.text or []]
    if texts:
        inputs.check_conditions([text for text, _ in texts])
    images = [(path, cli_checks.weight(w, "--image", path)) for path, w in args.image or []]
    conditions = texts + [(_open_image(path, "--image").convert("RGB"), w) for path, w in images]
    if not conditions:
        raise PipelineInputError("--text/--image: expected at least one condition with a weight, found none")
    with Components(args.artifacts, args.backend, args.device, not args.no_cuda_graph) as components:
        loaded = components.loaded
        height, width = _size(args, components)
        mix_request = rq.interpolate_request(loaded, [c for c, _ in conditions], [w for _, w in conditions],
                                             rq.InterpolateSettings(num_inference_steps=args.prior_steps),
                                             inputs.rng(args.seed))
        mix = KandinskyPriorPipeline(components=components).run_interpolate(mix_request)
        with cli_checks.Progress(args.steps, "decoder") as callback:
            settings = rq.DecoderSettings(num_inference_steps=args.steps, height=height, width=width, callback=callback)
            request = rq.decoder_request(loaded, inputs.check_prompts("", None, 1), settings, inputs.rng(args.seed))
            request = rq.with_embeddings(loaded, request, mix.image_embeds, mix.negative_image_embeds)
            out = KandinskyPipeline(components=components).run(request)
    for path in save_images(out.images, targets):
        print(f"wrote {path}")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by the commands that generate images."""
    from kandinsky_trt.runtime.backends.registry import backend_names

    p.add_argument("--artifacts", required=True, help="artifacts directory from `export`")
    p.add_argument("--out", default="out.png", help="output image path (several images: out-0.png, ...)")
    p.add_argument("--backend", choices=backend_names(), default="ort", help="default ort (ONNX Runtime)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="on CUDA, run the denoising loops eagerly instead of replaying CUDA graphs (to compare)")
    p.add_argument("--steps", type=int, default=100, help="decoder steps (default 100)")
    p.add_argument("--prior-steps", type=int, default=25, help="prior steps (default 25)")
    p.add_argument("--seed", type=int, help="random seed (default: fresh entropy)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the artifacts' size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the artifacts' size)")


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


COMMAND_ENTRY_POINTS = "kandinsky_trt.commands"


def build_parser() -> argparse.ArgumentParser:
    """The runtime's commands, then each package's (``kandinsky_trt.commands`` entry points)."""
    from importlib.metadata import entry_points

    from kandinsky_trt.runtime.serve.commands import add_commands as add_serve_commands

    parser = argparse.ArgumentParser(
        prog="kandinsky-trt",
        description="Kandinsky 2.1 on ONNX Runtime / TensorRT. Start with `kandinsky-trt demo`.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the third-party libraries' own messages (hidden otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(sub)  # argparse only: each package imports its heavy modules inside its handlers
    _add_image_commands(sub)
    add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kandinsky_trt.runtime.cli import console
    from kandinsky_trt.runtime.contract.errors import USER_ERRORS

    console.configure(args.verbose)

    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are written atomically, so nothing half-written is left
        print("interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
