"""Where generated images go: checked before any work starts, written so nothing is half-done.

:func:`image_targets` refuses a path that is a directory, has no known image extension, or lies
under a file or an unwritable directory, before a network runs. :func:`save_images` writes every
image to a unique temporary name in its target directory (``tempfile``, so two processes writing
the same path never collide), moves them into place with ``os.replace`` only when all were
written, and on failure removes its temporary files and the directories it created.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.integrity import follow_umask

# RGB formats PIL writes without optional plug-ins (WebP / TIFF when PIL was built with them).
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
            ".tiff": "TIFF", ".gif": "GIF", ".ppm": "PPM"}


def _writable_formats() -> dict[str, str]:
    from PIL import Image

    Image.init()
    return {ext: fmt for ext, fmt in _FORMATS.items() if fmt in Image.SAVE}


def _existing_ancestor(directory: Path) -> Path:
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory


def check_writable_directory(directory: str | os.PathLike, name: str) -> Path:
    """``directory`` exists as a writable directory or can be created (its nearest existing
    ancestor is one); nothing is created here."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise PipelineInputError(f"{name}: expected a directory, found the file {directory}")
    ancestor = _existing_ancestor(directory)
    if not ancestor.is_dir():
        raise PipelineInputError(f"{name}: expected a directory for {directory}, found the file {ancestor} on its path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PipelineInputError(f"{name}: expected a writable directory, found {ancestor} not writable")
    return directory


def image_targets(out: str | os.PathLike, count: int, name: str = "--out") -> list[Path]:
    """The files ``count`` images will be written to: ``out``, or ``stem-<i>.ext`` for several."""
    path = Path(out)
    if str(out) == "" or path.is_dir():
        raise PipelineInputError(f"{name}: expected an image file path such as out.png, found the directory {path}")
    formats = _writable_formats()
    if path.suffix.lower() not in formats:
        raise PipelineInputError(
            f"{name}: expected a file name ending in one of {' '.join(sorted(formats))}, found {path.name!r}")
    check_writable_directory(path.parent, name)
    targets = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for target in targets:
        if target.is_dir():
            raise PipelineInputError(f"{name}: expected {target} to be a file, found a directory there")
    return targets


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; returns the ones created, deepest first."""
    created = []
    probe = directory
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    return created


def save_images(images: list, targets: list[Path], name: str = "--out") -> list[Path]:
    """Write PIL ``images`` to ``targets`` (from :func:`image_targets`) atomically, mode per umask."""
    formats = _writable_formats()
    created = _make_parents(targets[0].parent)
    temps: list[str] = []
    try:
        for image, target in zip(images, targets):
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as handle:
                image.save(handle, format=formats[target.suffix.lower()])
            follow_umask(tmp)  # mkstemp makes 0600; an image is ordinary output
        for tmp, target in zip(temps, targets):
            os.replace(tmp, target)
    except OSError as err:
        raise PipelineInputError(f"{name}: expected to write {targets[0]}, failed ({err})") from None
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)  # moved ones are gone already
        if any(not t.exists() for t in targets):
            for directory in created:
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
    return list(targets)
