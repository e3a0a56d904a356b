"""The loop template (``runtime/loops/template.py``) through its host strategy, on the tiny fp32 artifacts.

What every strategy inherits: the linked-tensor check at construction, the input checks before
anything runs, the identity-row start, one callback per step, refusal once closed. The device
strategies are compared with this host loop in ``test_ort_cuda.py`` and ``test_trt_loop.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.loops.host import HostLoop
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP, LoopSpec


class _Counting:
    """A session that counts its runs."""

    def __init__(self, session) -> None:
        self.session, self.network, self.runs = session, session.network, 0

    def run(self, feeds):
        self.runs += 1
        return self.session.run(feeds)


@pytest.fixture(scope="module")
def backend(artifacts_fp32):
    with OrtBackend(load_manifest(artifacts_fp32[0])) as b:
        yield b


def _inputs(backend, table, seed: int = 0) -> LoopInputs:
    rng = np.random.default_rng(seed)
    net, step = backend.load("unet").network, backend.load("unet_step").network
    conditioning = {t.name: rng.standard_normal(t.shape).astype(np.float32)
                    for t in net.inputs if t.name not in UNET_LOOP.network_fed}
    latents = rng.standard_normal(step.tensor("latents").shape).astype(np.float32)
    noise = rng.standard_normal((int(table.stochastic.sum()), *latents.shape)).astype(np.float32)
    return LoopInputs(latents, conditioning, {}, noise, 4.0)


def test_linked_tensors_must_fit(backend):
    wrong = LoopSpec("unet", "unet_inpaint_step", "sample", "noise_pred")
    with pytest.raises(BackendError, match=r"unet_inpaint_step.model_input: expected float32\[2, 4, 8, 8\] like "
                                           r"unet.sample, found float32\[2, 9, 8, 8\]"):
        HostLoop(wrong, backend.load("unet"), backend.load("unet_inpaint_step"))


def test_bad_inputs_are_refused_before_anything_runs(backend):
    from kandinsky_trt.runtime.contract.schedulers import scheduler_table

    table = scheduler_table({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                             "variance_type": "learned_range", "clip_sample": True}, 3)
    network, step = _Counting(backend.load("unet")), _Counting(backend.load("unet_step"))
    loop, good = HostLoop(UNET_LOOP, network, step), _inputs(backend, table)
    bad = {r"inputs.step_extras: expected \[\], found \['conditioning'\]":
           LoopInputs(good.latents, good.conditioning, {"conditioning": good.latents}, good.noise, 4.0),
           r"inputs.conditioning\['image_embeds'\]: expected float32\[2, 32\], found float64\[2, 32\]":
           LoopInputs(good.latents, dict(good.conditioning, image_embeds=np.zeros((2, 32))), {}, good.noise, 4.0),
           r"inputs.noise: expected rows of shape \[1, 4, 8, 8\], found \[4, 8, 8\]":
           LoopInputs(good.latents, good.conditioning, {}, good.noise[:, 0], 4.0)}
    for message, inputs in bad.items():
        with pytest.raises(BackendError, match=message):
            loop(table, inputs)
    assert network.runs == step.runs == 0
    seen = []
    loop(table, good, lambda i, t, x: seen.append((i, t)))
    assert seen == [(i, int(t)) for i, t in enumerate(table.timesteps)]
    assert (network.runs, step.runs) == (3, 4)  # the identity-row start is one step-graph run
    loop.close()
    with pytest.raises(BackendError, match=r"HostLoop\(unet\): expected an open loop, found it closed"):
        loop(table, good)
