"""The component spec: profiles, symbolic dims and their resolution."""

import pytest

from kandinsky_trt.runtime.contract import spec
from kandinsky_trt.runtime.contract.spec import ModelDims, Profile, SpecError, resolve


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=-64), "height: expected a positive integer.*found -64"),
    (dict(width=0), "width: expected a positive integer.*found 0"),
    (dict(width=96.0), "width.*found 96.0"),
    (dict(height=True), "height.*found True"),
    (dict(batch=0), "batch: expected an integer >= 1, found 0"),
    (dict(batch=1.5), "batch.*found 1.5"),
])
def test_profile_rejects_bad_values(kwargs, match):
    with pytest.raises(SpecError, match=match):
        Profile(**kwargs)


@pytest.mark.parametrize("latent_scale, size, ok", [(8, 512, True), (8, 500, False), (8, 96, False),
                                                     (2, 500, True), (2, 48, True), (2, 46, False), (4, 48, True)])
def test_profile_size_follows_the_movq_scale_factor(latent_scale, size, ok):
    """Sizes are multiples of f**2, as diffusers' get_new_h_w rounds them; latents are size / f."""
    dims, profile = ModelDims(latent_scale=latent_scale), Profile(height=size, width=size)
    if ok:
        assert spec.dim_values(profile, dims)["h"] == size // latent_scale
        assert resolve("movq_decoder", profile, dims).tensor("latents").shape == (1, 4, size // latent_scale, size // latent_scale)
    else:
        with pytest.raises(SpecError, match=f"height: expected a multiple of {latent_scale**2} .*found {size}"):
            resolve("unet", profile, dims)


def test_profile_name_and_dims():
    profile = Profile(batch=2, height=512, width=768, cfg=True)
    assert profile.name == "b2_512x768_cfg"
    values = spec.dim_values(profile, ModelDims())
    assert values == {"B": 2, "B2": 4, "L": 77, "H": 512, "W": 768, "h": 64, "w": 96, "E": 768, "X": 1024, "S": 224}
    assert spec.dim_values(Profile(batch=2, cfg=False), ModelDims())["B2"] == 2


def test_unet_resolves_to_real_shapes():
    unet = resolve("unet", Profile(batch=1, height=768, width=768))
    assert [(t.name, t.dtype, t.shape) for t in unet.inputs] == [
        ("sample", "float32", (2, 4, 96, 96)),
        ("timestep", "float32", (2,)),  # per row: [uncond; cond] of the one image
        ("encoder_hidden_states", "float32", (2, 77, 1024)),
        ("text_embeds", "float32", (2, 768)),
        ("image_embeds", "float32", (2, 768)),
    ]
    assert unet.outputs[0].shape == (2, 8, 96, 96)


def test_inpaint_and_step_graphs_follow_the_same_dims():
    profile, dims = Profile(batch=2, height=64, width=128), ModelDims(clip_dim=32, text_dim=48)
    assert resolve("unet_inpaint", profile, dims).tensor("sample").shape == (4, 9, 8, 16)
    step = resolve("unet_inpaint_step", profile, dims)
    assert step.tensor("latents").shape == (2, 4, 8, 16)
    assert step.tensor("model_output").shape == (4, 8, 8, 16)
    assert step.tensor("conditioning").shape == (4, 5, 8, 16)
    assert step.tensor("model_input").shape == (4, 9, 8, 16)
    assert step.tensor("coefficients").shape == (2, len(spec.COEFFICIENT_COLUMNS))
    assert step.tensor("guidance_scale").shape == (2, 1)
    assert resolve("prior_step", profile, dims).tensor("model_input").shape == (4, 32)


def test_every_per_step_value_is_per_row():
    """The per-row contract: the loop networks' timestep has one value per network row (B2), the step
    graphs' coefficients and guidance one row per latents row (B), with and without guidance."""
    for profile in (Profile(batch=3, height=64, width=64), Profile(batch=3, height=64, width=64, cfg=False)):
        b2 = 6 if profile.cfg else 3
        for name in ("prior", "unet", "unet_inpaint"):
            assert resolve(name, profile).tensor("timestep").shape == (b2,)
        for name in spec.STEP_NETWORKS:
            step = resolve(name, profile)
            assert step.tensor("coefficients").shape == (3, spec.K)
            assert step.tensor("guidance_scale").shape == (3, 1)
            assert step.tensor("noise").shape[0] == 3


def test_every_network_resolves_and_has_a_source():
    for name in list(spec.NETWORKS) + list(spec.STEP_NETWORKS):
        network = resolve(name, Profile())
        assert network.inputs and network.outputs
        assert all(all(isinstance(d, int) and d > 0 for d in t.shape) for t in network.inputs + network.outputs)
    assert set(spec.NETWORK_SOURCE) == set(spec.NETWORKS)


def test_unknown_network_is_named():
    with pytest.raises(SpecError, match="network: expected one of .*found 'vae'"):
        resolve("vae", Profile())
