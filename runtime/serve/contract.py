"""The request contract of the ``kandinsky`` Triton model: one declaration, three renderings.

:data:`INPUTS` / :data:`OUTPUTS` name every tensor once (name, KServe-v2 datatype, per-item dims,
optional); ``config.pbtxt`` (:func:`config_pbtxt`), the README's client table
(:func:`contract_markdown`) and the request decoding all read them. Symbolic dims (``E``, the CLIP
embedding width) and ``max_batch_size`` (the profile batch) come from the artifacts' manifest.

Every tensor has a leading batch dim (Triton's ``max_batch_size > 0``): a request holds B items,
each an independent generation, and each output has the same leading B. Scalars are dims ``[1]``,
so one item's ``prompt`` is a ``[1, 1]`` BYTES tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "kandinsky"
TASKS = ("text2img", "img2img", "inpaint", "prior", "interpolate")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 name: BYTES, INT32, INT64, FP32, UINT8
    dims: tuple  # per item (after the batch dim); -1 = any, "E" = the CLIP embedding width
    optional: bool
    doc: str


def _scalar(name: str, datatype: str, doc: str, optional: bool = True) -> TensorSpec:
    return TensorSpec(name, datatype, (1,), optional, doc)


INPUTS = (
    _scalar("task", "BYTES", "one of " + ", ".join(TASKS), optional=False),
    _scalar("prompt", "BYTES", "UTF-8 text", optional=False),
    _scalar("negative_prompt", "BYTES", "UTF-8 text to avoid (prior and decoder); default none"),
    _scalar("seed", "INT64", "random seed: the same image as the Python API's generator=seed; default fresh entropy"),
    _scalar("num_images", "INT32", "images per prompt; default 1"),
    _scalar("guidance_scale", "FP32", "decoder guidance (prior guidance for task prior); pipeline default"),
    _scalar("num_inference_steps", "INT32", "decoder steps; pipeline default"),
    _scalar("prior_steps", "INT32", "prior steps; pipeline default"),
    _scalar("height", "INT32", "pixels; default the artifacts' height"),
    _scalar("width", "INT32", "pixels; default the artifacts' width"),
    _scalar("strength", "FP32", "img2img strength (pipeline default); interpolate: the image's weight, default 0.5"),
    TensorSpec("image", "UINT8", (-1, -1, 3), True, "RGB image, H x W x 3 (img2img, inpaint, interpolate)"),
    TensorSpec("mask", "UINT8", (-1, -1), True, "inpaint mask, H x W: 255 = repaint, 0 = keep (>= 128 repaints)"),
)
OUTPUTS = (
    TensorSpec("images", "UINT8", (-1, -1, -1, 3), False, "N x H x W x 3 RGB (every task but prior)"),
    TensorSpec("image_embeds", "FP32", (-1, "E"), False, "N x E CLIP image embeddings (task prior)"),
    TensorSpec("negative_image_embeds", "FP32", (-1, "E"), False, "N x E negative embeddings (task prior)"),
)
INPUT_NAMES = tuple(t.name for t in INPUTS)
NUMPY_DTYPES = {"BYTES": "object", "INT32": "int32", "INT64": "int64", "FP32": "float32", "UINT8": "uint8"}


def resolve_dims(spec: TensorSpec, embed_dim: int) -> tuple[int, ...]:
    return tuple(embed_dim if d == "E" else d for d in spec.dims)


@dataclass(frozen=True)
class ModelConfig:
    """What ``config.pbtxt`` says beyond the contract: batching, instances and the model's parameters."""

    max_batch_size: int  # the profile batch (manifest) unless overridden
    embed_dim: int  # manifest model_dims.clip_dim
    max_queue_delay_us: int = 2000
    instances: int = 1
    kind: str = "KIND_CPU"  # KIND_GPU: ``instances`` per GPU
    parameters: tuple[tuple[str, str], ...] = ()  # string parameters the model reads at load


def _tensor_block(spec: TensorSpec, embed_dim: int, is_input: bool) -> str:
    dims = ", ".join(str(d) for d in resolve_dims(spec, embed_dim))
    optional = "\n    optional: true" if is_input and spec.optional else ""
    return (f"  {{\n    name: \"{spec.name}\"\n    data_type: TYPE_{'STRING' if spec.datatype == 'BYTES' else spec.datatype}"
            f"\n    dims: [ {dims} ]{optional}\n  }}")


def config_pbtxt(config: ModelConfig) -> str:
    """The model's ``config.pbtxt`` (protobuf text format), generated from :data:`INPUTS` / :data:`OUTPUTS`."""
    inputs = ",\n".join(_tensor_block(t, config.embed_dim, True) for t in INPUTS)
    outputs = ",\n".join(_tensor_block(t, config.embed_dim, False) for t in OUTPUTS)
    params = "".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{_escape(v)}" }}\n}}\n'
                     for k, v in config.parameters)
    return (
        f'name: "{MODEL_NAME}"\nbackend: "python"\nmax_batch_size: {config.max_batch_size}\n'
        f"input [\n{inputs}\n]\noutput [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {config.max_queue_delay_us}\n}}\n"
        f"instance_group [\n  {{\n    count: {config.instances}\n    kind: {config.kind}\n  }}\n]\n{params}"
    )


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def contract_markdown(embed_dim: int | str = "E") -> str:
    """The request contract as a Markdown table (the README's, for Triton's C++ and Python clients)."""
    rows = ["| tensor | direction | datatype | shape | required | meaning |", "|---|---|---|---|---|---|"]
    for direction, specs in (("input", INPUTS), ("output", OUTPUTS)):
        for t in specs:
            dims = ", ".join(str(embed_dim if d == "E" else d) for d in t.dims)
            required = "yes" if direction == "input" and not t.optional else ("no" if direction == "input" else "")
            rows.append(f"| `{t.name}` | {direction} | {t.datatype} | [B, {dims}] | {required} | {t.doc} |")
    return "\n".join(rows)
