"""
What `trl_moe_rm` agrees to read from a model folder or repository: never a pickle, and weights only from safetensors
files whose content was checked.

- The pickle policy: [`PICKLE_SUFFIXES`], [`is_pickle_capable`] and [`find_pickle_files`]. Such files are refused,
  never opened.
- The weights check: [`check_safetensors_file`] reads a file's header (8-byte little-endian length, then a JSON object
  describing tensors that fit in the file), whatever its name says; [`check_weight_files`] applies it to every
  `*.safetensors` file of a folder and to every file a `*.index.json` weight map points to, through symlinks.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath


__all__ = [
    "PICKLE_SUFFIXES",
    "UnsafeFilesError",
    "UnsafeWeightsError",
    "check_safetensors_file",
    "check_weight_files",
    "find_pickle_files",
    "is_pickle_capable",
    "refuse_pickle_files",
]

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")
"""Suffixes of files that may hold a pickle. They are refused, never opened."""

# Files of `Trainer` checkpoints that no loader reads (the training arguments and optimizer / scheduler / RNG states):
# they are skipped (never opened, never uploaded) rather than refused, so that a trainer's `output_dir` stays loadable.
_TRAINER_STATE_FILE = re.compile(
    r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
# DeepSpeed's partitioned shards (`global_stepN/`) are only read by `zero_to_fp32.py`, which the user runs on purpose.
_SKIPPED_DIRS = re.compile(r"^(global_step\d+|checkpoint-\d+|runs)$")

# The largest header the safetensors format allows (`MAX_HEADER_SIZE` in safetensors' `src/tensor.rs`).
_MAX_HEADER_BYTES = 100_000_000
# Formats recognisable from their first bytes, named in the error to say what the file is instead.
_FOREIGN_MAGIC = ((b"PK\x03\x04", "it is a zip archive, as written by torch.save"), (b"\x80", "it is a pickle"))


class UnsafeFilesError(ValueError):
    """A folder or Hub repository holds files that may contain pickles, which `trl_moe_rm` never loads."""


class UnsafeWeightsError(UnsafeFilesError):
    """A weights file, or a file a weights index points to, is not a valid safetensors file."""


def is_pickle_capable(path: str | os.PathLike) -> bool:
    """Whether the file's suffix is one of [`PICKLE_SUFFIXES`] (case-insensitive)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def find_pickle_files(paths: Iterable[str]) -> list[str]:
    r"""
    The paths, among repository-relative `paths`, of files that may hold a pickle.

    Trainer-state files that no loader reads (`training_args.bin`, `optimizer.pt`, `scheduler.pt`, `scaler.pt`,
    `rng_state*.pth`) at the top level, and anything under `global_step*/`, `checkpoint-*/` or `runs/`, are ignored:
    they are never opened nor uploaded.
    """
    found = []
    for path in paths:
        parts = Path(path).parts
        if not parts or _SKIPPED_DIRS.match(parts[0]):
            continue
        if len(parts) == 1 and _TRAINER_STATE_FILE.match(parts[0]):
            continue
        if is_pickle_capable(path):
            found.append(Path(path).as_posix())
    return sorted(found)


def refuse_pickle_files(paths: Iterable[str], where: str) -> None:
    """
    Raises [`UnsafeFilesError`] when [`find_pickle_files`] finds any of `paths` (repository-relative) in `where`.
    """
    unsafe = find_pickle_files(paths)
    if unsafe:
        raise UnsafeFilesError(
            f"Refusing to load {where}: it contains {', '.join(repr(p) for p in unsafe)}, a file type that may hold a "
            "pickle (arbitrary code), and trl_moe_rm only loads safetensors and JSON. Convert the weights to "
            "safetensors (load them once in a trusted environment and `save_pretrained`, which writes "
            "model.safetensors) and remove the pickle files."
        )


def _is_tensor_entry(entry: object, data_size: int) -> bool:
    """Whether a header entry is a `dtype`, a `shape` and `data_offsets` inside the `data_size` bytes of data."""
    if not isinstance(entry, dict):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(entry.get("dtype"), str)
        and isinstance(shape, list)
        and all(type(size) is int and size >= 0 for size in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(offset) is int for offset in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    )


def _header_problem(header: object, data_size: int) -> str | None:
    """Why a parsed safetensors header does not describe tensors stored in `data_size` bytes, or `None`."""
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(value, str) for value in entry.values()):
                return "its `__metadata__` is not a mapping of strings"
        elif not _is_tensor_entry(entry, data_size):
            return f"the header entry of tensor {name!r} is not a dtype, a shape and offsets inside the file"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a valid safetensors file, or `None` when its header is sound."""
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            for magic, what in _FOREIGN_MAGIC:
                if prefix.startswith(magic):
                    return what
            if len(prefix) < 8:
                return f"it has {size} bytes, fewer than the 8 of the header length"
            (header_size,) = struct.unpack("<Q", prefix)
            if not 2 <= header_size <= min(_MAX_HEADER_BYTES, size - 8):
                return f"its header length ({header_size} bytes) does not fit in the file ({size} bytes)"
            raw_header = file.read(header_size)
    except OSError as error:
        return f"it cannot be opened ({error.strerror or error})"
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "its header is not JSON"
    return _header_problem(header, size - 8 - header_size)


def check_safetensors_file(path: str | os.PathLike) -> None:
    r"""
    Checks, by content, that `path` is a safetensors file: an 8-byte little-endian header length, then a JSON header
    whose tensors (dtype, shape, data offsets) fit in the file. A symlink is followed and its target checked.

    Raises:
        [`UnsafeWeightsError`] (an [`UnsafeFilesError`], a `ValueError`): the file is missing, truncated, corrupt or of
            another format (a pickle, a `torch.save` archive, ...).
    """
    path = Path(path)
    problem = _safetensors_problem(path)
    if problem is not None:
        raise UnsafeWeightsError(
            f"The weights file {str(path)!r} cannot be read as safetensors ({problem}): it is corrupt or truncated, or "
            "not a safetensors file (e.g. a pickle from torch.save), and trl_moe_rm reads weights only from "
            "safetensors. Save the model again with `save_pretrained`, or download it again."
        )


def _index_targets(index: Path) -> list[str]:
    """The files named by the `weight_map` of a weights index (`model.safetensors.index.json`)."""
    fix = "save the model again with `save_pretrained`, or download it again"
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: not UTF-8, or not JSON
        raise UnsafeWeightsError(f"The weights index {str(index)!r} cannot be read as JSON; {fix}.") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise UnsafeWeightsError(f"The weights index {str(index)!r} has no `weight_map` of file names; {fix}.")
    targets = sorted(set(weight_map.values()))
    for name in targets:
        relative = PurePosixPath(name)
        # transformers picks the reader from the shard's suffix (`modeling_utils.load_state_dict`, transformers 5.x up
        # to 5.24 at least): any other name is read with torch.load, i.e. unpickled.
        if relative.is_absolute() or ".." in relative.parts or "\\" in name or relative.suffix != ".safetensors":
            raise UnsafeWeightsError(
                f"The weights index {str(index)!r} points to {name!r}, which is not a .safetensors file inside the "
                f"model folder, and trl_moe_rm reads weights only from safetensors; {fix}."
            )
    return targets


def check_weight_files(folder: str | os.PathLike) -> None:
    r"""
    Checks every weights file of a model folder by content, before anything reads it: each top-level `*.safetensors`
    file and each file that a `*.index.json` weight map points to must be a valid safetensors file
    ([`check_safetensors_file`]). Symlinks (e.g. of the Hub cache) are followed.

    Raises:
        [`UnsafeWeightsError`]: a weights file is not a valid safetensors file, or an index points to a file that is
            not a `.safetensors` file inside the folder.
    """
    folder = Path(folder)
    names = sorted(entry.name for entry in folder.iterdir())
    targets = {name for name in names if name.endswith(".safetensors")}
    for name in names:
        if name.endswith(".index.json"):
            targets.update(_index_targets(folder / name))
    for name in sorted(targets):
        check_safetensors_file(folder / name)
