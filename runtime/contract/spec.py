"""The component spec: every network's tensor contract, declared once.

Export (dummy inputs, ONNX input/output names), the engine build (min = opt = max shapes), runtime
buffer allocation and ``manifest.json`` are all derived from :func:`resolve` (one profile) and
:func:`resolve_graph` (a graph serving every profile) — never restated.

Standard library only: a deployed host, an export machine and C++-side tooling all import it.

Symbolic dims:
    ``B``   images per network call (the profile's batch)
    ``B2``  network batch in the loops: ``2*B`` with classifier-free guidance ([uncond, cond]), else ``B``
    ``L``   text length (both tokenizers pad to 77)
    ``H``/``W``  image size in pixels; ``h``/``w`` latent size (``H/f``, ``W/f``; ``f`` the MoVQ scale factor,
                 8 real, :attr:`ModelDims.latent_scale`)
    ``E``   CLIP embedding width (768 real), ``X`` XLM-R hidden width (1024 real),
    ``S``   CLIP vision input size (224 real)

Every per-step value is per row (the per-row contract): a loop network's ``timestep`` is ``(B2,)``
(with guidance, row ``j`` and row ``j + B`` are one request's [uncond, cond] pair and carry the same
value), a step
graph's ``coefficients`` are ``(B, K)`` (row ``b`` is the scheduler-table row that latents row ``b`` is at)
and its ``guidance_scale`` is ``(B, 1)`` (row ``b`` guides the [uncond; cond] halves' row ``b``), its
``noise`` ``(B, *latent)``. So the rows of one network call may be at different steps of different
schedulers with different guidance; a lockstep batch repeats one row ``B`` times.

Every float input and output is float32 at both precisions: fp16 artifacts compute in fp16 inside
the graph and cast at the boundary, so the loops accumulate latents in fp32 and a host never has
to convert buffers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import prod

from kandinsky_trt.runtime.contract.dtypes import DTYPE_TABLE, DTYPES
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

LATENT_CHANNELS = 4
UNET_OUT_CHANNELS = 8  # 4 noise + 4 learned-variance channels
INPAINT_IN_CHANNELS = 9  # latents 4 + masked-image latents 4 + mask 1


class SpecError(KandinskyTrtError, ValueError):
    """A profile, a dimension or a checkpoint that does not fit the spec."""


@dataclass(frozen=True)
class Profile:
    """A static build point: one shape of every network. An artifacts set holds one or more; one graph
    per network serves them all, its TensorRT plan has one optimization profile per distinct shape.

    Args:
        batch: images per network call (before classifier-free-guidance doubling).
        height, width: output image size in pixels, multiples of the MoVQ scale factor squared (64 for
            Kandinsky 2.1; checked against the checkpoint's :class:`ModelDims` by :func:`check_profile`).
        cfg: whether the loop networks run the [uncond, cond] batch of classifier-free guidance.
    """

    batch: int = 1
    height: int = 512
    width: int = 512
    cfg: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch, int) or self.batch < 1:
            raise SpecError(f"batch: expected an integer >= 1, found {self.batch!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(f"{name}: expected a positive integer (pixels), found {value!r}")

    @property
    def size(self) -> tuple[int, int]:  # (height, width) in pixels
        return self.height, self.width

    @property
    def name(self) -> str:
        """A short label, e.g. ``b1_512x512_cfg``."""
        return f"b{self.batch}_{self.height}x{self.width}_{'cfg' if self.cfg else 'nocfg'}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelDims:
    """Dims that come from the checkpoints' configs (real Kandinsky 2.1, or a tiny test model)."""

    clip_dim: int = 768  # E: CLIP text/image embedding, prior width, UNet cross-attention
    text_dim: int = 1024  # X: XLM-R hidden size (MultilingualCLIP)
    image_size: int = 224  # S: CLIP vision input
    text_len: int = 77  # L
    latent_scale: int = 8  # f: MoVQ scale factor 2 ** (levels - 1); latent = pixels / f

    @property
    def pixel_multiple(self) -> int:
        """Image sizes are multiples of ``f**2``: diffusers' ``get_new_h_w`` rounds up to it."""
        return self.latent_scale**2

    def to_dict(self) -> dict:
        return asdict(self)


KANDINSKY_2_1_DIMS = ModelDims()


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name is the ONNX/TensorRT tensor name and the wrapper's argument."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise SpecError(f"{self.name}: dtype must be one of {DTYPES}, found {self.dtype!r}")


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ResolvedTensor:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # integers at a profile; a graph's profile dims by name (resolve_graph)

    @property
    def nbytes(self) -> int:
        """Bytes of one dense tensor of this shape and dtype."""
        return prod(self.shape) * DTYPE_TABLE[self.dtype].itemsize

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ResolvedNetwork:
    """A network at one profile: every dim is an integer."""

    name: str
    inputs: tuple[ResolvedTensor, ...]
    outputs: tuple[ResolvedTensor, ...] = field(default=())

    def tensor(self, name: str) -> ResolvedTensor:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r}")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


def _t(name: str, dtype: str, *dims: str | int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims))


F32, I64, BOOL = "float32", "int64", "bool"

_UNET_CONDITIONING = (
    _t("timestep", F32, "B2"),
    _t("encoder_hidden_states", F32, "B2", "L", "X"),
    _t("text_embeds", F32, "B2", "E"),
    _t("image_embeds", F32, "B2", "E"),
)

NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            "prior_text_encoder",
            inputs=(_t("input_ids", I64, "B2", "L"),),
            outputs=(_t("text_embeds", F32, "B2", "E"), _t("last_hidden_state", F32, "B2", "L", "E")),
        ),
        NetworkSpec(
            "prior",
            inputs=(
                _t("hidden_states", F32, "B2", "E"),
                _t("timestep", F32, "B2"),
                _t("proj_embedding", F32, "B2", "E"),
                _t("encoder_hidden_states", F32, "B2", "L", "E"),
                _t("attention_mask", BOOL, "B2", "L"),
            ),
            outputs=(_t("predicted_image_embedding", F32, "B2", "E"),),
        ),
        NetworkSpec(
            "image_encoder",
            inputs=(_t("pixel_values", F32, 1, 3, "S", "S"),),
            outputs=(_t("image_embeds", F32, 1, "E"),),
        ),
        NetworkSpec(
            "text_encoder",
            inputs=(_t("input_ids", I64, "B2", "L"), _t("attention_mask", I64, "B2", "L")),
            outputs=(_t("text_embeds", F32, "B2", "E"), _t("last_hidden_state", F32, "B2", "L", "X")),
        ),
        NetworkSpec(
            "unet",
            inputs=(_t("sample", F32, "B2", LATENT_CHANNELS, "h", "w"),) + _UNET_CONDITIONING,
            outputs=(_t("noise_pred", F32, "B2", UNET_OUT_CHANNELS, "h", "w"),),
        ),
        NetworkSpec(
            "unet_inpaint",
            inputs=(_t("sample", F32, "B2", INPAINT_IN_CHANNELS, "h", "w"),) + _UNET_CONDITIONING,
            outputs=(_t("noise_pred", F32, "B2", UNET_OUT_CHANNELS, "h", "w"),),
        ),
        NetworkSpec(
            "movq_decoder",
            inputs=(_t("latents", F32, "B", LATENT_CHANNELS, "h", "w"),),
            outputs=(_t("image", F32, "B", 3, "H", "W"),),
        ),
        NetworkSpec(
            "movq_encoder",
            inputs=(_t("image", F32, "B", 3, "H", "W"),),
            outputs=(_t("latents", F32, "B", LATENT_CHANNELS, "h", "w"),),
        ),
    )
}

# One row of a scheduler's per-step coefficient table (DESIGN §4), in column order:
#   x0     = clip(p*x + q*eps, clip_min, clip_max)
#   std    = s + learned * exp(0.5 * (log_var_min + (var + 1) / 2 * (log_var_max - log_var_min)))
#   x_next = u*x0 + v*x + w*eps + r*x0_prev + std*noise
# eps / var are the guided model output (noise channels / cond half of the learned variance).
COEFFICIENT_COLUMNS = (
    "p", "q", "clip_min", "clip_max", "u", "v", "w", "r", "s", "learned", "log_var_min", "log_var_max",
)
K = len(COEFFICIENT_COLUMNS)


@dataclass(frozen=True)
class StepTensors:
    """The tensor names every step graph shares (guidance + scheduler update, DESIGN §4).

    Inputs: ``latents``, ``model_output`` (the network's output), ``coefficients`` (one table row per
    latents row, ``(B, K)``), ``noise``, ``guidance_scale`` (one per row, ``(B, 1)``), ``x0_prev``; outputs: ``latents_next``, ``x0`` and ``model_input``
    (the next network input).
    """

    latents: str = "latents"
    model_output: str = "model_output"
    coefficients: str = "coefficients"
    noise: str = "noise"
    guidance_scale: str = "guidance_scale"
    x0_prev: str = "x0_prev"
    latents_next: str = "latents_next"
    x0: str = "x0"
    model_input: str = "model_input"


STEP = StepTensors()


def _step_spec(name: str, latent: tuple, output: tuple, model_input: tuple, extra: tuple = ()) -> NetworkSpec:
    """Guidance + scheduler update: a tiny elementwise graph run after each network call."""
    return NetworkSpec(
        name,
        inputs=(
            _t(STEP.latents, F32, "B", *latent),
            _t(STEP.model_output, F32, "B2", *output),
            _t(STEP.coefficients, F32, "B", K),
            _t(STEP.noise, F32, "B", *latent),
            _t(STEP.guidance_scale, F32, "B", 1),
            _t(STEP.x0_prev, F32, "B", *latent),
        )
        + extra,
        outputs=(
            _t(STEP.latents_next, F32, "B", *latent),
            _t(STEP.x0, F32, "B", *latent),
            _t(STEP.model_input, F32, "B2", *model_input),
        ),
    )


_LATENT = (LATENT_CHANNELS, "h", "w")
STEP_NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        _step_spec("prior_step", ("E",), ("E",), ("E",)),
        _step_spec("unet_step", _LATENT, (UNET_OUT_CHANNELS, "h", "w"), _LATENT),
        _step_spec(
            "unet_inpaint_step",
            _LATENT,
            (UNET_OUT_CHANNELS, "h", "w"),
            (INPAINT_IN_CHANNELS, "h", "w"),
            extra=(_t("conditioning", F32, "B2", INPAINT_IN_CHANNELS - LATENT_CHANNELS, "h", "w"),),
        ),
    )
}

# Bridge graphs: the elementwise maths between two stages, as tiny weight-free float32 graphs, so a
# device backend keeps a stage's output on the device instead of doing that maths in host numpy
# (issue 19, item 5), one row per latents row like the step graphs:
# - ``prior_embeds``: the prior loop's final latents as CLIP image embeddings, ``latents * clip_std +
#   clip_mean`` (diffusers' ``post_process_latents``; the constants are inputs, fed from the manifest's);
# - ``img2img_start``: img2img's start from the MoVQ latents of its image, ``signal * (image_latents *
#   sigma) + spread * noise`` with ``coefficients`` ``(B, 3)`` = [init_noise_sigma, signal, spread] per row
#   (``schedulers.img2img_noise_coefficients``);
# - ``inpaint_start``: inpainting's step-graph ``conditioning`` (masked image latents, then the keep-mask,
#   along channels) and the UNet's first input row ``model_input`` (the start latents, then that
#   conditioning).
BRIDGE_NETWORKS: dict[str, NetworkSpec] = {
    spec.name: spec
    for spec in (
        NetworkSpec(
            "prior_embeds",
            inputs=(_t("latents", F32, "B", "E"), _t("clip_std", F32, 1, "E"), _t("clip_mean", F32, 1, "E")),
            outputs=(_t("image_embeds", F32, "B", "E"),),
        ),
        NetworkSpec(
            "img2img_start",
            inputs=(_t("image_latents", F32, "B", *_LATENT), _t("noise", F32, "B", *_LATENT),
                    _t("coefficients", F32, "B", 3)),
            outputs=(_t("latents", F32, "B", *_LATENT),),
        ),
        NetworkSpec(
            "inpaint_start",
            inputs=(_t("image_latents", F32, "B", *_LATENT), _t("keep", F32, "B", 1, "h", "w"),
                    _t("latents", F32, "B", *_LATENT)),
            outputs=(_t("conditioning", F32, "B", INPAINT_IN_CHANNELS - LATENT_CHANNELS, "h", "w"),
                     _t("model_input", F32, "B", INPAINT_IN_CHANNELS, "h", "w")),
        ),
    )
}

# The graphs export builds itself, with no weights (run as ONNX by every backend, torch's included).
WEIGHT_FREE = frozenset(STEP_NETWORKS) | frozenset(BRIDGE_NETWORKS)

# Where each network lives: (checkpoint, subfolder), the checkpoints laid out like the public
# kandinsky-community/kandinsky-2-1-prior (prior), kandinsky-2-1 (decoder), kandinsky-2-1-inpaint.
NETWORK_SOURCE = {
    "prior_text_encoder": ("prior", "text_encoder"),
    "prior": ("prior", "prior"),
    "image_encoder": ("prior", "image_encoder"),
    "text_encoder": ("decoder", "text_encoder"),
    "unet": ("decoder", "unet"),
    "unet_inpaint": ("inpaint", "unet"),
    "movq_decoder": ("decoder", "movq"),
    "movq_encoder": ("decoder", "movq"),
}


def check_profile(profile: Profile, dims: ModelDims) -> None:
    """Refuse a profile size the MoVQ cannot produce: diffusers rounds sizes up to ``f**2``.

    Raises:
        SpecError: ``height`` or ``width`` is not a multiple of ``dims.pixel_multiple``.
    """
    for name in ("height", "width"):
        value = getattr(profile, name)
        if value % dims.pixel_multiple:
            raise SpecError(f"{name}: expected a multiple of {dims.pixel_multiple} (the MoVQ scale factor "
                            f"{dims.latent_scale} squared, as diffusers rounds), found {value}")


def dim_values(profile: Profile, dims: ModelDims) -> dict[str, int]:
    """The integer value of every symbolic dim at ``profile`` for models of widths ``dims``."""
    check_profile(profile, dims)
    return {
        "B": profile.batch,
        "B2": profile.batch * (2 if profile.cfg else 1),
        "L": dims.text_len,
        "H": profile.height,
        "W": profile.width,
        "h": profile.height // dims.latent_scale,
        "w": profile.width // dims.latent_scale,
        "E": dims.clip_dim,
        "X": dims.text_dim,
        "S": dims.image_size,
    }


# The dims a profile sets: symbolic in an ONNX graph (``dim_param``, by these names) so that one
# graph serves every profile; static in TensorRT plans and CUDA graphs (one shape per profile).
PROFILE_DIMS = ("B", "B2", "H", "W", "h", "w")


def resolve_tensors(tensors: tuple[TensorSpec, ...], values: dict[str, int | str]) -> tuple[ResolvedTensor, ...]:
    resolved = []
    for t in tensors:
        try:
            shape = tuple(d if isinstance(d, int) else values[d] for d in t.dims)
        except KeyError as err:
            raise SpecError(f"{t.name}: unknown symbolic dim {err.args[0]!r}") from None
        resolved.append(ResolvedTensor(t.name, t.dtype, shape))
    return tuple(resolved)


def _resolved(name: str, values: dict[str, int | str]) -> ResolvedNetwork:
    spec = NETWORKS.get(name) or STEP_NETWORKS.get(name) or BRIDGE_NETWORKS.get(name)
    if spec is None:
        known = sorted(NETWORKS) + sorted(STEP_NETWORKS) + sorted(BRIDGE_NETWORKS)
        raise SpecError(f"network: expected one of {known}, found {name!r}")
    return ResolvedNetwork(name, resolve_tensors(spec.inputs, values), resolve_tensors(spec.outputs, values))


def resolve(name: str, profile: Profile, dims: ModelDims = KANDINSKY_2_1_DIMS) -> ResolvedNetwork:
    """Resolve network ``name`` to static shapes.

    Raises:
        SpecError: ``name`` is not a network of the spec, or ``profile`` does not fit ``dims``.
    """
    return _resolved(name, dim_values(profile, dims))


def resolve_graph(name: str, dims: ModelDims = KANDINSKY_2_1_DIMS) -> ResolvedNetwork:
    """Network ``name``'s ONNX graph I/O: the model dims as integers, :data:`PROFILE_DIMS` by name."""
    return _resolved(name, {**dim_values(Profile(), dims), **{d: d for d in PROFILE_DIMS}})
