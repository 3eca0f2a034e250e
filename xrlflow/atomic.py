"""Files written atomically: everything goes to a temporary file beside the target, which then replaces the
target in one rename, so a reader (or a crash) never sees a half-written file. A file with a companion (an ONNX
model and its external data) is written as a pair, the companion renamed into place first."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _new_file_beside(path: Path, suffix: str) -> Path:
    """A new empty file beside `path` with the mode `open()` gives a new file (0666 less the umask, 0644 under
    the usual 022). tempfile.mkstemp makes it 0600, and the rename would keep that for the finished file."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextmanager
def replacing(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path` to write; it replaces `path` when the block succeeds and is removed
    when it fails. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically, flushed to disk before the rename."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


@contextmanager
def replacing_with_companion(path: str | os.PathLike[str], companion_name: str) -> Iterator[Path]:
    """A temporary path to write `path` to, in a new folder beside `path`, under `path`'s own name; a file
    written beside it under `companion_name` is the companion (an ONNX model's external data, which the model
    names relative to itself, so both keep their final names).

    When the block succeeds the companion, if one was written, replaces `path.parent / companion_name` first,
    then `path` is replaced: a reader that sees the new `path` sees its complete companion. When it fails
    neither target is touched. The folder is removed either way, and created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = folder / path.name
        yield tmp
        companion = folder / companion_name
        if companion.exists():
            os.replace(companion, path.parent / companion_name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
