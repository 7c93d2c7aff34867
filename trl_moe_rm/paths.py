"""Tell a local path from a Hugging Face Hub repository id: the one rule every loader of `trl_moe_rm` follows."""

from __future__ import annotations

import os
import re


__all__ = ["is_local_path"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def is_local_path(name_or_path: str | os.PathLike) -> bool:
    r"""
    Whether `name_or_path` names a local file or folder rather than a Hub repository id.

    It does when it is an `os.PathLike` (e.g. a `pathlib.Path`), when it exists on disk (`~` expanded), or when it
    cannot be a repository id (`"name"` or `"namespace/name"`): it starts with `.`, `/`, `~` or `\`, holds a `\` or a
    Windows drive (`C:`), or has more than one `/`. Anything else (`"org/model"`, `"model"`) is a Hub id, so a missing
    local folder should be written `./folder` to get a "does not exist" error instead of a Hub lookup.

    Example:

    ```python
    >>> is_local_path("./my_model"), is_local_path("Qwen/Qwen2.5-0.5B")
    (True, False)
    ```

    Args:
        name_or_path (`str` or `os.PathLike`):
            What the user passed as a model, dataset or profiles location.

    Returns:
        `bool`: `True` for a local path, `False` for a Hub repository id.
    """
    if not isinstance(name_or_path, str):
        return True
    if os.path.exists(os.path.expanduser(name_or_path)):
        return True
    return (
        name_or_path.startswith((".", "/", "~", "\\"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
        or bool(_DRIVE.match(name_or_path))
    )
