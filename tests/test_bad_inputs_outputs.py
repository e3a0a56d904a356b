"""Output paths (issue 8, kind 4): refused before any work, written through unique temporary names,
nothing left behind on failure, file modes that follow the umask."""

from __future__ import annotations

import os
import re
import stat
import threading

import pytest
from PIL import Image

from kandinsky_trt.runtime.pipelines.components import PipelineInputError
from kandinsky_trt.runtime.cli.output_paths import check_writable_directory, image_targets, save_images


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def no_work(monkeypatch):
    """Generation refuses to start: an output-path error must come before it."""
    from kandinsky_trt.runtime.pipelines import components

    def refuse(*args, **kwargs):
        raise AssertionError("Components were loaded before the output path was checked")

    monkeypatch.setattr(components.Components, "__init__", refuse)


def _generate(tmp_path, out, *extra):
    from kandinsky_trt.runtime.cli.main import main

    return main(["generate", "a cat", "--artifacts", str(tmp_path / "no-artifacts"), "--out", str(out), *extra])


@pytest.mark.parametrize("out, extra, match", [
    ("adir", (), r"--out: expected an image file path such as out.png, found the directory .*adir"),
    ("x.xyz", (), r"--out: expected a file name ending in one of .* \.png .*found 'x\.xyz'"),
    ("noext", (), r"--out: expected a file name ending in one of"),
    ("afile/x.png", (), r"--out: expected a directory, found the file .*afile"),
    ("afile/deeper/x.png", (), r"--out: expected a directory for .*, found the file .*afile on its path"),
    ("many.png", ("--num-images", "2"), r"--out: expected .*many-1\.png to be a file, found a directory there"),
])
def test_generate_refuses_bad_out_before_any_work(tmp_path, capsys, no_work, out, extra, match):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "many-1.png").mkdir()
    before = _listing(tmp_path)
    assert _generate(tmp_path, tmp_path / out, *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(rf"error: {match}", err), err
    assert _listing(tmp_path) == before  # no .tmp, no directory created


def test_unwritable_directory_is_refused(tmp_path, monkeypatch, capsys, no_work):
    """os.access decides (root may write anywhere, so the permission bits alone cannot show it)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real(p, mode))
    assert _generate(tmp_path, tmp_path / "new" / "x.png") == 2
    assert "--out: expected a writable directory, found " + str(tmp_path) + " not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(PipelineInputError, match="not writable"):
        image_targets(locked / "x.png", 1)


def test_interpolate_and_bench_check_out_first(tmp_path, capsys, no_work):
    from kandinsky_trt.runtime.cli.main import main

    (tmp_path / "afile").write_text("x")
    assert main(["interpolate", "--artifacts", str(tmp_path), "--text", "a", "1", "--out", str(tmp_path)]) == 2
    assert "--out: expected an image file path" in capsys.readouterr().err
    assert main(["bench", "--artifacts", str(tmp_path), "--out", str(tmp_path / "afile")]) == 2
    assert "--out: expected a directory, found the file" in capsys.readouterr().err


class _SlowImage:
    """Writes its tag in two halves and waits for the other writer in between."""

    def __init__(self, tag: bytes, barrier: threading.Barrier) -> None:
        self.tag, self.barrier = tag, barrier

    def save(self, handle, format):  # noqa: A002 (PIL's name)
        handle.write(self.tag[:4])
        handle.flush()
        self.barrier.wait()  # both writers hold a temporary file now
        handle.write(self.tag[4:])


def test_two_writers_of_one_path_do_not_collide(tmp_path):
    """A fixed temporary name (``.same.png.tmp``, before issue 8) made the two writers share one file."""
    target = tmp_path / "same.png"
    barrier, errors = threading.Barrier(2), []
    tags = [b"AAAAaaaa", b"BBBBbbbb"]

    def write(tag):
        try:
            save_images([_SlowImage(tag, barrier)], image_targets(target, 1))
        except Exception as err:  # noqa: BLE001 (collected and asserted below)
            errors.append(err)

    threads = [threading.Thread(target=write, args=(t,)) for t in tags]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and target.read_bytes() in tags  # one whole image, never a mix
    assert _listing(tmp_path) == ["same.png"]


class _FailingImage:
    def save(self, handle, format):  # noqa: A002
        handle.write(b"half an image")
        raise OSError(28, "No space left on device")


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    targets = image_targets(tmp_path / "new" / "dir" / "out.png", 2)
    with pytest.raises(PipelineInputError, match=r"--out: expected to write .*out-0\.png, failed .*No space left"):
        save_images([Image.new("RGB", (4, 4)), _FailingImage()], targets)
    assert _listing(tmp_path) == []  # neither temporary files, the first image, nor the created folders


def test_images_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        (path,) = save_images([Image.new("RGB", (4, 4))], image_targets(tmp_path / "a.png", 1))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert Image.open(path).size == (4, 4)


def test_several_images_get_numbered_names(tmp_path):
    paths = save_images([Image.new("RGB", (4, 4))] * 3, image_targets(tmp_path / "cat.jpg", 3))
    assert [p.name for p in paths] == ["cat-0.jpg", "cat-1.jpg", "cat-2.jpg"]
    assert Image.open(paths[2]).format == "JPEG"
    assert check_writable_directory(tmp_path / "x" / "y", "--out") == tmp_path / "x" / "y"
    assert not (tmp_path / "x").exists()  # checking creates nothing
