"""The full-size checkpoint writer and the full-size serving benchmark's memory guards.

The writer is run with tiny networks standing in for the full-size ones (a real run writes 12 GB and
takes minutes): what is checked is the layout (each tiny component swapped for the built network,
sharded safetensors that the export's loader reads back to the same weights, widths that agree).
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kandinsky_trt.benchmarks import serve_full_size
from kandinsky_trt.export import full_size_checkpoints
from kandinsky_trt.export.checkpoint_loading import CheckpointError, load_network, read_model_dims
from kandinsky_trt.export.checkpoints import tiny_configs
from kandinsky_trt.export.full_size import instantiate
from kandinsky_trt.export.tokenizer_training import CLIP_VOCAB_SIZE, XLMR_VOCAB_SIZE
from kandinsky_trt.runtime.contract.integrity import FileRecord
from kandinsky_trt.runtime.contract.spec import NETWORK_SOURCE


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A checkpoint written with tiny stand-ins; returns its dirs and the stand-ins' state dicts."""
    built = {}

    configs = tiny_configs(CLIP_VOCAB_SIZE, XLMR_VOCAB_SIZE)

    def stand_in(network, dtype, seed):
        component = "movq" if network == "movq_decoder" else network
        module = instantiate(component, configs[component])
        built[network] = {k: v.clone() for k, v in module.state_dict().items()}
        return module.to(dtype).eval()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(full_size_checkpoints, "build_full_size_model", stand_in)
        mp.setattr(full_size_checkpoints, "SHARD_SIZE", "200KB")  # several shards even for tiny networks
        out = tmp_path_factory.mktemp("full") / "ckpt"
        dirs = full_size_checkpoints.write_full_size_checkpoint(out, seed=0)
    return out, dirs, built


def test_writer_swaps_every_network_for_the_built_one(written):
    out, dirs, built = written
    assert sorted(p.name for p in out.iterdir()) == ["decoder", "prior"]  # no staging left behind
    assert set(built) == set(full_size_checkpoints._NETWORKS)
    shards = {n: len(list((out / NETWORK_SOURCE[n][0] / NETWORK_SOURCE[n][1]).glob("*.safetensors"))) for n in built}
    assert max(shards.values()) > 1, shards  # the sharded layout is what the loader reads back below
    for network, state in built.items():
        loaded = load_network(network, dirs).state_dict()
        assert loaded.keys() == state.keys(), network
        assert all(torch.equal(loaded[k], state[k]) for k in state), network
    assert read_model_dims(dirs).clip_dim == tiny_configs(CLIP_VOCAB_SIZE, XLMR_VOCAB_SIZE)["prior"]["embedding_dim"]


def test_writer_refuses_existing_checkpoints(written):
    out, _, _ = written
    with pytest.raises(CheckpointError, match="out: expected no prior or decoder folder yet"):
        full_size_checkpoints.write_full_size_checkpoint(out)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_writer_refuses_bad_seeds(tmp_path, seed):
    with pytest.raises(CheckpointError, match="seed: expected a non-negative integer"):
        full_size_checkpoints.write_full_size_checkpoint(tmp_path / "ckpt", seed=seed)


def test_sampler_sees_the_memory_of_a_child_process():
    code = "import sys, time; block = bytearray(64 << 20); sys.stdout.write('ready\\n'); sys.stdout.flush(); time.sleep(3)"
    with serve_full_size.ChildTreeRssSampler(root=os.getpid()) as sampler:
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "ready\n"
            child.wait(timeout=30)
        finally:
            child.kill()
    assert sampler.peak_mb >= 64


def test_check_memory_refuses_when_the_graphs_do_not_fit(monkeypatch, tmp_path):
    gib = 2**30
    manifest = SimpleNamespace(
        networks={"unet": SimpleNamespace(onnx="unet.onnx", external_data=("unet.onnx.data",))},
        files={"unet.onnx": FileRecord(gib // 2, "0" * 64), "unet.onnx.data": FileRecord(9 * gib // 2, "0" * 64)})
    monkeypatch.setattr("kandinsky_trt.runtime.contract.manifest.load_manifest", lambda path: manifest)
    monkeypatch.setattr(serve_full_size, "_mem_available_gb", lambda: 7.5)
    with pytest.raises(SystemExit, match=r"memory: expected MemAvailable >= 8.0 GB .* found 7.5 GB"):
        serve_full_size.check_memory(tmp_path)
    monkeypatch.setattr(serve_full_size, "_mem_available_gb", lambda: 8.5)
    assert serve_full_size.check_memory(tmp_path) == 5.0
