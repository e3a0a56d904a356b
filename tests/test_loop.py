"""The loop of slots (``runtime/loops/slots.py``) through its host storage, on the tiny fp32 artifacts.

What every storage inherits: the linked-tensor check at construction, the row checks before a row
takes a slot, one network and one step-graph run per step (no identity-row run), one callback per
step with diffusers' (i, t, latents), refusal once closed. The device storage is compared with the
host storage in ``test_ort_cuda.py`` and ``test_trt_loop.py``; rows mixed in one batch in ``test_slots.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP, LoopSpec
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.loops.host import HostStorage
from kandinsky_trt.runtime.loops.slots import LoopRow, SlotLoop


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


def _table(steps: int = 3):
    return scheduler_table({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                            "variance_type": "learned_range", "clip_sample": True}, steps)


def _row(backend, table, seed: int = 0) -> LoopRow:
    rng = np.random.default_rng(seed)
    net, step = backend.load("unet").network, backend.load("unet_step").network
    conditioning = {t.name: rng.standard_normal((2, *t.shape[1:])).astype(np.float32)
                    for t in net.inputs if t.name not in UNET_LOOP.network_fed}
    latents = rng.standard_normal(step.tensor("latents").shape[1:]).astype(np.float32)
    noise = rng.standard_normal((int(table.stochastic.sum()), *latents.shape)).astype(np.float32)
    return LoopRow(latents, conditioning, table, 4.0, noise)


def test_linked_tensors_must_fit(backend):
    wrong = LoopSpec("unet", "unet_inpaint_step", "sample", "noise_pred")
    with pytest.raises(BackendError, match=r"unet_inpaint_step.model_input: expected float32\[2, 4, 8, 8\] like "
                                           r"unet.sample, found float32\[2, 9, 8, 8\]"):
        HostStorage(wrong, backend.load("unet"), backend.load("unet_inpaint_step"))


def test_bad_rows_are_refused_before_anything_runs(backend):
    table = _table()
    network, step = _Counting(backend.load("unet")), _Counting(backend.load("unet_step"))
    loop, good = SlotLoop(UNET_LOOP, HostStorage(UNET_LOOP, network, step)), _row(backend, table)
    bad = {r"row conditioning: expected \['encoder_hidden_states', 'image_embeds', 'text_embeds'\], "
           r"found \['conditioning', 'encoder_hidden_states', 'image_embeds', 'text_embeds'\]":
           LoopRow(good.latents, good.conditioning, table, 4.0, good.noise, {"conditioning": good.latents}),
           r"conditioning\['image_embeds'\]: expected float32\[2, 32\], found float64\[2, 32\]":
           LoopRow(good.latents, dict(good.conditioning, image_embeds=np.zeros((2, 32))), table, 4.0, good.noise),
           r"noise: expected float32\[2, 4, 8, 8\], found float32\[2, 8, 8\]":
           LoopRow(good.latents, good.conditioning, table, 4.0, good.noise[0]),
           r"noise: expected 2 rows \(one per stochastic step\), found 0":
           LoopRow(good.latents, good.conditioning, table, 4.0, None)}
    for message, row in bad.items():
        with pytest.raises(BackendError, match=message):
            loop.run([row])
        assert loop.free == [0]
    assert network.runs == step.runs == 0
    seen = []
    loop.run([good], lambda i, t, x: seen.append((i, t, x.shape)))
    assert seen == [(i, int(t), (1, 4, 8, 8)) for i, t in enumerate(table.timesteps)]
    assert (network.runs, step.runs) == (3, 3)  # one of each per step: the first input is written at admission
    loop.close()
    with pytest.raises(BackendError, match=r"SlotLoop\(unet\): expected an open loop, found it closed"):
        loop.run([good])


def test_a_stop_between_steps_frees_every_slot(backend):
    from kandinsky_trt.runtime.loops.slots import LoopStopped

    loop = SlotLoop(UNET_LOOP, HostStorage(UNET_LOOP, backend.load("unet"), backend.load("unet_step")))
    calls = []
    with pytest.raises(LoopStopped, match="stopped after step 2 of 3"):
        loop.run([_row(backend, _table())], should_stop=lambda: calls.append(1) or len(calls) == 2)
    assert loop.free == [0] and not loop.storage.read_latents().any()
