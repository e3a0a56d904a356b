"""Issue 8, kinds 3, 6 (export) and 8: transactional exports, clear export errors, file modes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kandinsky_trt.export import artifact_store
from kandinsky_trt.export.artifacts import ExportConfig, _export_key, export_artifacts
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, CheckpointError, read_model_dims
from kandinsky_trt.export.onnx_export import ExportError
from kandinsky_trt.runtime.contract import integrity
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.spec import Profile

NETWORKS = ("movq_decoder", "prior_text_encoder", "movq_encoder", "prior")
_CHILD = """
import sys
from pathlib import Path
from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
from kandinsky_trt.runtime.contract.spec import Profile
prior, decoder, out, precision = sys.argv[1:5]
export_artifacts(ExportConfig(CheckpointDirs(Path(prior), Path(decoder)), Path(out), (Profile(1, 64, 64),), precision,
                              exporter="legacy", networks=tuple(sys.argv[5].split(","))))
"""


def _config(ckpt, out, precision="fp32", networks=NETWORKS) -> ExportConfig:
    return ExportConfig(CheckpointDirs(ckpt.prior, ckpt.decoder), out, (Profile(1, 64, 64),), precision,
                        exporter="legacy", networks=networks)


def _verify_all(out: Path) -> mf.Manifest:
    """Load the manifest and check every file it names, in a fresh cache (as a new process would)."""
    integrity.VERIFIED.clear()
    manifest = mf.load_manifest(out)
    for name in manifest.networks:
        manifest.verified_network(name)
    for constant in manifest.constants.values():
        manifest.verified_path(constant.file, constant.name)
    for which, entry in manifest.tokenizers.items():
        manifest.verified_path(entry["file"], which)
    return manifest


def _kill_when(child: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if child.poll() is not None:
            raise AssertionError(f"the export finished (rc {child.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("the export did not reach the point to kill it in time")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def _pending_networks(out: Path) -> list[str]:
    try:
        return [n["name"] for n in json.loads((out / artifact_store.PENDING_NAME).read_text())["networks"]]
    except (OSError, ValueError, KeyError):
        return []


def test_sigkill_mid_export_keeps_the_old_artifacts_and_the_rerun_resumes(tmp_path, tiny_checkpoint):
    out = tmp_path / "art"
    export_artifacts(_config(tiny_checkpoint, out, "fp32"))
    old = _verify_all(out)
    old_files = set(old.files)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    args = [sys.executable, str(script), str(tiny_checkpoint.prior), str(tiny_checkpoint.decoder), str(out), "fp16",
            ",".join(NETWORKS)]
    # 1) killed before any network finished: only a staging folder is left
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(child, lambda: any(p.name.startswith(artifact_store.STAGING_PREFIX) for p in out.iterdir()))
    assert _verify_all(out).to_dict() == old.to_dict()
    # 2) killed while exporting the next network after the first one finished
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(child, lambda: len(_pending_networks(out)) >= 1)
    done = _pending_networks(out)
    assert _verify_all(out).to_dict() == old.to_dict()  # the old fp32 export still loads and verifies
    with Components(out) as c:
        c.session("movq_decoder")
    # 3) the re-run finishes, reusing what the killed run had finished, and cleans up after both
    report = export_artifacts(_config(tiny_checkpoint, out, "fp16"))
    assert set(done) <= set(report.reused) and set(report.exported) | set(report.reused) == set(NETWORKS)
    new = _verify_all(out)
    assert new.precision == "fp16" and not (old_files - set(new.files)) & {p.name for p in out.iterdir()}
    assert sorted(p.name for p in out.iterdir()) == sorted({*new.files, mf.MANIFEST_NAME})


def test_stale_temporaries_of_killed_runs_are_removed_and_nothing_else(tmp_path, tiny_checkpoint):
    out = tmp_path / "art"
    out.mkdir()
    ours = [out / ".unet.a1b2c3d4", out / ".ktrt-export-x_y1z2w3", out / ".movq_decoder.q9w8e7r6"]
    theirs = [out / ".mydata", out / ".unet.toolong12345", out / ".vae.a1b2c3d4", out / "notes.txt"]
    for path in ours + theirs[:-1]:
        path.mkdir()
        (path / "partial.onnx").write_bytes(b"x")
    theirs[-1].write_text("keep me")
    export_artifacts(_config(tiny_checkpoint, out, networks=("movq_decoder",)))
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert not [p for p in out.iterdir() if p.name.startswith(".ktrt")]


def test_a_second_export_into_the_same_directory_is_refused_while_one_runs(tmp_path):
    with artifact_store.ArtifactStore(tmp_path):
        with pytest.raises(ExportError, match="expected no other export writing into"):
            artifact_store.ArtifactStore(tmp_path)
    with artifact_store.ArtifactStore(tmp_path):  # released: the next one may start
        pass
    assert list(tmp_path.iterdir()) == []


def test_reexport_deletes_only_what_the_old_manifest_alone_named(tmp_path, tiny_checkpoint):
    out = tmp_path / "art"
    export_artifacts(_config(tiny_checkpoint, out, "fp32", ("movq_decoder", "prior")))
    first = mf.load_manifest(out)
    (out / "notes.txt").write_text("mine")
    export_artifacts(_config(tiny_checkpoint, out, "fp32", ("movq_decoder", "prior_text_encoder")))
    second = _verify_all(out)
    assert second.network("movq_decoder") == first.network("movq_decoder")  # reused, same file
    assert (out / "notes.txt").is_file()
    assert not (out / first.network("prior").onnx).exists() or "prior" in second.networks


def test_the_export_key_covers_every_production_setting(tiny_checkpoint, tmp_path):
    """A field added to ExportConfig (e.g. a new precision option) changes the key without special cases."""
    extended = dataclasses.make_dataclass("Extended", [("new_option", tuple, ())], bases=(ExportConfig,), frozen=True)
    base = _config(tiny_checkpoint, tmp_path)
    dims = read_model_dims(base.checkpoints)
    plain = extended(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    nodes = dataclasses.replace(plain, new_option=("x",))
    keys = {_export_key("movq_decoder", c, dims) for c in (plain, nodes)}
    assert len(keys) == 2
    # Settings that do not change a graph do not change its key.
    assert _export_key("movq_decoder", dataclasses.replace(base, verify=True, out_dir=tmp_path / "x"), dims) == \
        _export_key("movq_decoder", base, dims)


# -- kind 6: clear export errors ----------------------------------------------------------------------------------

def test_unknown_networks_are_named_and_no_directory_is_left(tmp_path, tiny_checkpoint):
    out = tmp_path / "new" / "art"
    with pytest.raises(ExportError, match=r"networks: expected names from \['prior_text_encoder', .*'movq_encoder'\]"
                                          r", found unknown \['bogus'\]"):
        export_artifacts(_config(tiny_checkpoint, out, networks=("prior", "bogus")))
    assert not (tmp_path / "new").exists()


def test_cli_export_errors_exit_2_without_traceback(tmp_path, tiny_checkpoint, capsys):
    from kandinsky_trt.runtime.cli.main import main

    common = ["--prior", str(tiny_checkpoint.prior), "--decoder", str(tiny_checkpoint.decoder)]
    assert main(["export", *common, "--out", str(tmp_path / "a"), "--networks", "bogus"]) == 2
    assert "networks: expected names from" in capsys.readouterr().err and not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        assert main(["export", *common, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"out_dir: expected a directory (or a path to create), found {blocker} is a file" in err
        assert "Traceback" not in err
        assert main(["tiny-checkpoint", str(out)]) == 2
        assert f"out: expected a directory (or a path to create), found {blocker} is a file" in capsys.readouterr().err
    assert blocker.read_text() == "x"


def test_tiny_checkpoint_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path):
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    (tmp_path / "decoder").mkdir()
    (tmp_path / "decoder" / "my_notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match=r"out: expected .*decoder to be absent or an earlier checkpoint"):
        write_tiny_checkpoint(tmp_path)
    assert (tmp_path / "decoder" / "my_notes.txt").read_text() == "precious"


def test_a_pickle_checkpoint_is_refused_naming_the_file(tmp_path, tiny_checkpoint):
    import torch
    from safetensors.torch import load_file

    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_checkpoint.decoder, decoder)
    weights = decoder / "movq" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), decoder / "movq" / "diffusion_pytorch_model.bin")
    weights.unlink()
    config = dataclasses.replace(_config(tiny_checkpoint, tmp_path / "out", networks=("movq_decoder",)),
                                 checkpoints=CheckpointDirs(tiny_checkpoint.prior, decoder))
    with pytest.raises(CheckpointError, match=r"movq/diffusion_pytorch_model\.bin: expected safetensors weights "
                                              r"\(.*\) for movq_decoder, found a pickle file"):
        export_artifacts(config)
    assert not (tmp_path / "out").exists()


# -- kind 8: written files follow the umask ------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_written_file_follows_the_umask(tmp_path, tiny_checkpoint, umask):
    from kandinsky_trt.export.step_graphs import write_step_graph

    old = os.umask(umask)
    try:
        out = tmp_path / "art"
        export_artifacts(_config(tiny_checkpoint, out, networks=("movq_decoder",)))
        step = write_step_graph("prior_step", True, read_model_dims(_config(tiny_checkpoint, out).checkpoints),
                                tmp_path / "step.onnx")
        integrity.write_bytes_atomic(tmp_path / "plain.bin", b"x")
    finally:
        os.umask(old)
    files = [p for p in out.iterdir()] + [step, tmp_path / "plain.bin"]
    assert {p.name for p in out.iterdir()} >= {mf.MANIFEST_NAME}
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
