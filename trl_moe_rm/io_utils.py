"""Crash-safe file writing helpers."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


__all__ = ["TEMP_SUFFIX", "atomic_write_bytes", "atomic_write_text", "fsync_directory", "is_temp_file"]

#: Suffix of the temporary files created by [`atomic_write_bytes`]. Readers must ignore files ending with it: they are
#: the leftovers of a writer that was killed before `os.replace`.
TEMP_SUFFIX = ".tmp"
_TEMP_PREFIX = "."
# Keep temp names below the usual 255-byte file-name limit even for long target names.
_MAX_TEMP_STEM = 200


def is_temp_file(name: str | os.PathLike) -> bool:
    """
    Returns whether `name` looks like a temporary file left by [`atomic_write_bytes`].

    Args:
        name (`str` or `os.PathLike`):
            File name or path.

    Returns:
        `bool`: `True` for names of the form `.<target>.<random>.tmp`.
    """
    base = os.path.basename(os.fspath(name))
    return base.startswith(_TEMP_PREFIX) and base.endswith(TEMP_SUFFIX)


def fsync_directory(directory: str | os.PathLike) -> None:
    """
    Flushes a directory entry to disk so that a preceding create/rename/unlink in it survives a power loss.

    This is a no-op on platforms that cannot open directories (Windows) and silently ignores file systems that do not
    support fsync on directories.

    Args:
        directory (`str` or `os.PathLike`):
            Directory to flush.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """
    Atomically replaces the file at `path` with `data`.

    The data is written to a temporary file in the same directory (`.<name>.<random>.tmp`, created with the process
    umask), flushed and fsynced, moved over `path` with `os.replace` (atomic on POSIX and Windows) and finally the
    directory is fsynced. Readers therefore see either the complete old file or the complete new file, never a partial
    one, even if the writer is killed at any point; a killed writer can at worst leave a temporary file behind, which
    [`is_temp_file`] recognises.

    Args:
        path (`str` or `os.PathLike`):
            Destination file. Its parent directory must exist.
        data (`bytes`):
            Full new content of the file.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"`data` must be bytes, got {type(data).__name__}; use `atomic_write_text` for str.")
    path = Path(path)
    directory = path.parent
    tmp_path = directory / f"{_TEMP_PREFIX}{path.name[:_MAX_TEMP_STEM]}.{secrets.token_hex(8)}{TEMP_SUFFIX}"
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path)
        raise
    fsync_directory(directory)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """
    Atomically replaces the file at `path` with `text` (see [`atomic_write_bytes`]).

    Args:
        path (`str` or `os.PathLike`):
            Destination file. Its parent directory must exist.
        text (`str`):
            Full new content of the file.
        encoding (`str`, *optional*, defaults to `"utf-8"`):
            Text encoding.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a str, got {type(text).__name__}; use `atomic_write_bytes` for bytes.")
    atomic_write_bytes(path, text.encode(encoding))
