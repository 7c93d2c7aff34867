"""
Per-user expert-weight profiles for Mixture-of-Experts reward models, and a crash-safe store to keep them next to a
model (`<model_dir>/profiles/`) or on the Hugging Face Hub.

Two on-disk formats are supported, neither of which ever unpickles anything:

- `"json"`: one small JSON file per user, named from an injective, case-insensitive-safe encoding of the user id
  (`i-<int>.json` for int ids, `s-<base32 of the UTF-8 bytes>.json` for str ids), so that no id can name a path outside
  the store.
- `"safetensors"`: a single table `profiles.safetensors` holding a `(U, K)` float32 tensor `expert_weights`; the other
  fields of every profile live, as a JSON list in the same order, in the file's metadata.

Every write goes through [`~io_utils.atomic_write_bytes`]: a reader sees the complete old or the complete new file even
if the writer is killed mid-write. Writers of the `"safetensors"` table hold a file lock (`.profiles.lock`, in the
store's directory) around their read-modify-write, so that concurrent processes never lose each other's users.

User ids are exact: a `str` or an `int` (never a `bool` or a `float`), and `1`, `"1"`, `1.0` and `True` never name the
same user ([`normalize_user_id`], [`lookup_profile`]).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import math
import numbers
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .configuration_moe_reward import config_fingerprint
from .io_utils import atomic_write_bytes, atomic_write_text, fsync_directory, is_temp_file
from .paths import is_local_path
from .safety import is_pickle_capable


__all__ = [
    "PROFILES_DIRNAME",
    "PROFILE_SCHEMA_VERSION",
    "ProfileStore",
    "ProfileStoreError",
    "ProfileStoreNotWritableError",
    "UnknownUserError",
    "UserProfile",
    "config_fingerprint",
    "lookup_profile",
    "normalize_user_id",
]

#: Version of the on-disk profile schema, written into every file. Files with a newer version are refused.
PROFILE_SCHEMA_VERSION = 1

PROFILES_DIRNAME = "profiles"
"""The folder of a model directory (and of its Hub repository) that holds its users' profiles."""
TABLE_FILENAME = "profiles.safetensors"
LOCK_FILENAME = ".profiles.lock"
_TABLE_FORMAT_TAG = "trl_moe_rm.profiles"
_JSON_FORMAT_TAG = "trl_moe_rm.user_profile"
_FORMATS = ("json", "safetensors")
_MODES = ("static", "routed")
_SIMPLEX_ATOL = 1e-4
_MAX_FILENAME_BYTES = 255
# Deepest nesting of a profile's `metadata`: deeper input would exhaust Python's recursion limit in `json` or
# `copy.deepcopy` instead of failing with a clear error.
_MAX_METADATA_DEPTH = 32
_MAX_INT_DIGITS = 4300
_INT_NAME = re.compile(r"^i-(-?[0-9]+)\.json$")
_STR_NAME = re.compile(r"^s-([a-z2-7]+)\.json$")


UserId = str | int


class ProfileStoreError(ValueError):
    """A profile file is corrupt, of an unsupported schema version, or otherwise cannot be used."""


class ProfileStoreNotWritableError(ProfileStoreError, PermissionError):
    """The store's directory cannot be written (read-only, not creatable, or an existing file)."""


class UnknownUserError(KeyError):
    """No profile is stored for the requested user."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------------------------------------------
# Config fingerprint
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# UserProfile
# ----------------------------------------------------------------------------------------------------------------------


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat()


def normalize_user_id(user_id: Any) -> UserId:
    r"""
    Checks a user id and returns it as a plain `str` or `int` (e.g. a `numpy.int64` becomes an `int`).

    Ids are exact: `1` and `"1"` are two users, and a `bool` or a `float` is refused rather than taken for an `int`
    (with a dict, `True` and `1.0` would otherwise find user `1`).

    Raises:
        TypeError: a `bool`, a `float` or any other type.
        ValueError: an empty string, or one that is not valid UTF-8 text.
    """
    if isinstance(user_id, bool):
        raise TypeError(f"user_id must be a str or an int, got the bool {user_id!r}; use e.g. str(user_id).")
    if isinstance(user_id, str):
        if not user_id:
            raise ValueError("user_id must be a non-empty string; give every user a stable, non-empty id.")
        try:
            user_id.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"user_id {user_id!r} is not valid UTF-8 text (lone surrogate?); clean the id.") from exc
        return user_id
    if isinstance(user_id, numbers.Integral):
        return int(user_id)
    raise TypeError(
        f"user_id must be a str or an int, got {type(user_id).__name__} ({user_id!r}); convert it, e.g. "
        "int(user_id) for whole-number floats or str(user_id)."
    )


def _validate_weights(weights: Any) -> list[float]:
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"expert_weights must be a 1-D vector of K weights, got shape {tuple(weights.shape)}.")
        values = weights.detach().cpu().to(torch.float64).tolist()
    elif hasattr(weights, "tolist") and not isinstance(weights, (list, tuple)):  # numpy arrays
        values = weights.tolist()
    elif isinstance(weights, (list, tuple)):
        values = list(weights)
    else:
        raise TypeError(f"expert_weights must be a list of floats or a 1-D tensor, got {type(weights).__name__}.")
    if not values:
        raise ValueError("expert_weights is empty; a profile needs one weight per expert (K >= 1).")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"expert_weights must contain only numbers, got {value!r} ({type(value).__name__}).")
        out.append(float(value))
    if any(math.isnan(v) for v in out):
        raise ValueError(
            f"expert_weights contains NaN ({out}); the fit diverged or the deltas contained NaN: refit the profile."
        )
    if any(math.isinf(v) for v in out):
        raise ValueError(f"expert_weights contains Inf ({out}); refit the profile.")
    if any(v < -1e-7 for v in out):
        raise ValueError(f"expert_weights must be non-negative (a point on the simplex), got {out}.")
    out = [max(v, 0.0) for v in out]
    total = math.fsum(out)
    if abs(total - 1.0) > _SIMPLEX_ATOL:
        raise ValueError(f"expert_weights must sum to 1 (got {total:.6g}); normalise them first, e.g. `w / w.sum()`.")
    return [v / total for v in out]


def _nests_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists and dicts nest more than `limit` levels deep in `value` (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _parse_int(text: str) -> int:
    # Python >= 3.11 (and 3.10.7) refuses to convert longer integers (sys.set_int_max_str_digits); the same limit on
    # every version, with the message of a profile file.
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"it holds an integer of {len(text.lstrip('-'))} digits (at most {_MAX_INT_DIGITS})")
    return int(text)


def _load_json(text: str | bytes) -> Any:
    """`json.loads` that raises `ValueError` (never `RecursionError`) for documents too deep or large for a profile."""
    try:
        data = json.loads(text, parse_int=_parse_int)
    except RecursionError:
        raise ValueError("it nests lists / objects deeper than Python's recursion limit") from None
    # A table's list and a record's object hold the metadata: two levels more than the metadata may have.
    if _nests_deeper_than(data, _MAX_METADATA_DEPTH + 2):
        raise ValueError(f"it nests lists / objects more than {_MAX_METADATA_DEPTH + 2} levels deep")
    return data


def _check_json_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}.")
    if any(not isinstance(key, str) for key in metadata):
        raise TypeError("metadata keys must be strings (they are stored as JSON object keys).")
    if _nests_deeper_than(metadata, _MAX_METADATA_DEPTH):
        raise ValueError(f"metadata nests lists / dicts more than {_MAX_METADATA_DEPTH} levels deep; flatten it.")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"metadata must be JSON-serialisable (str/int/float/bool/None/list/dict, finite floats): {exc}"
        ) from exc
    return metadata


@dataclass
class UserProfile:
    """
    Expert weights fitted for one user of a Mixture-of-Experts reward model.

    The user's reward is `sum_k w_k r_k(x)` in `"static"` mode, or `sum_k normalize(g(x)^beta * w)_k r_k(x)` in
    `"routed"` mode, where `g(x)` are the router's weights for prompt `x`.

    Args:
        user_id (`str` or `int`):
            Stable id of the user. `bool` and `float` ids are rejected; strings must be non-empty.
        expert_weights (`list[float]`):
            `K` non-negative weights summing to 1 (a drift up to `1e-4` is renormalised away). A 1-D tensor is accepted
            and converted.
        mode (`str`, *optional*, defaults to `"static"`):
            `"static"` or `"routed"`.
        beta (`float`, *optional*, defaults to `1.0`):
            Routing exponent used in `"routed"` mode (`>= 0`).
        method (`str`, *optional*):
            Name of the fitting method (e.g. `"hedge"`, `"hyre"`, `"gradient"`).
        num_shots (`int`, *optional*, defaults to `0`):
            Number of labelled pairs the weights were fitted on.
        fitted_at (`str`, *optional*):
            ISO-8601 timestamp of the fit; defaults to the current UTC time.
        config_hash (`str`, *optional*):
            [`config_fingerprint`] of the model the profile was fitted for.
        metadata (`dict`, *optional*):
            Free-form JSON-serialisable information.
    """

    user_id: str | int
    expert_weights: list[float]
    mode: str = "static"
    beta: float = 1.0
    method: str | None = None
    num_shots: int = 0
    fitted_at: str = field(default_factory=_utc_now)
    config_hash: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.user_id = normalize_user_id(self.user_id)
        self.expert_weights = _validate_weights(self.expert_weights)
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}.")
        if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
            raise TypeError(f"beta must be a number, got {self.beta!r}.")
        self.beta = float(self.beta)
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}.")
        if self.method is not None and not isinstance(self.method, str):
            raise TypeError(f"method must be a str or None, got {type(self.method).__name__}.")
        if isinstance(self.num_shots, bool) or not isinstance(self.num_shots, numbers.Integral) or self.num_shots < 0:
            raise ValueError(f"num_shots must be an int >= 0, got {self.num_shots!r}.")
        self.num_shots = int(self.num_shots)
        if not isinstance(self.fitted_at, str):
            raise TypeError(f"fitted_at must be an ISO-8601 string, got {type(self.fitted_at).__name__}.")
        try:
            datetime.fromisoformat(self.fitted_at)
        except ValueError as exc:
            raise ValueError(f"fitted_at must be an ISO-8601 timestamp, got {self.fitted_at!r}.") from exc
        if self.config_hash is not None and not isinstance(self.config_hash, str):
            raise TypeError(f"config_hash must be a str or None, got {type(self.config_hash).__name__}.")
        self.metadata = _check_json_metadata(self.metadata)

    @property
    def num_experts(self) -> int:
        """Number of experts `K` the profile was fitted for."""
        return len(self.expert_weights)

    def weights_tensor(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """
        Returns the expert weights as a tensor.

        Args:
            dtype (`torch.dtype`, *optional*, defaults to `torch.float32`):
                Dtype of the tensor.
            device (`torch.device` or `str`, *optional*):
                Device of the tensor (CPU if `None`).

        Returns:
            `torch.Tensor`: weights of shape `(K,)`.
        """
        return torch.tensor(self.expert_weights, dtype=dtype, device=device)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict of the profile, including `schema_version`."""
        return {
            "schema_version": PROFILE_SCHEMA_VERSION,
            "user_id": self.user_id,
            "expert_weights": list(self.expert_weights),
            "mode": self.mode,
            "beta": self.beta,
            "method": self.method,
            "num_shots": self.num_shots,
            "fitted_at": self.fitted_at,
            "config_hash": self.config_hash,
            "metadata": copy.deepcopy(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UserProfile:
        """
        Builds a profile from the output of [`UserProfile.to_dict`].

        Args:
            data (`dict`):
                Profile fields. `schema_version` defaults to the current version when absent.

        Returns:
            [`UserProfile`]: the validated profile.

        Raises:
            ValueError: if the schema version is newer or unknown, fields are missing or unknown keys are present.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"profile data must be a dict, got {type(data).__name__}.")
        fields = dict(data)
        version = fields.pop("schema_version", PROFILE_SCHEMA_VERSION)
        _check_schema_version(version)
        missing = [name for name in ("user_id", "expert_weights") if name not in fields]
        if missing:
            raise ValueError(f"profile data is missing required field(s) {missing}.")
        known = {
            "user_id",
            "expert_weights",
            "mode",
            "beta",
            "method",
            "num_shots",
            "fitted_at",
            "config_hash",
            "metadata",
        }
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"profile data has unknown field(s) {unknown} for schema_version {version}.")
        fields["metadata"] = copy.deepcopy(_check_json_metadata(fields.get("metadata", {})))
        return cls(**fields)

    def check_compatible(self, num_experts: int, config_hash: str | None = None) -> None:
        """
        Checks that the profile can be used with a model.

        Args:
            num_experts (`int`):
                Number of experts `K` of the model.
            config_hash (`str`, *optional*):
                [`config_fingerprint`] of the model's config. Only compared when both it and the profile's
                `config_hash` are set.

        Raises:
            ValueError: if the number of experts or the config fingerprint differ.
        """
        if self.num_experts != num_experts:
            raise ValueError(
                f"profile of user {self.user_id!r} was fitted for a model with K={self.num_experts} experts, this "
                f"model has K={num_experts}: refit with fit_user_weights"
            )
        if config_hash is not None and self.config_hash is not None and config_hash != self.config_hash:
            raise ValueError(
                f"profile of user {self.user_id!r} was fitted for a model with config fingerprint {self.config_hash}, "
                f"this model has {config_hash} (a different architecture or expert set): refit with fit_user_weights"
            )


def _check_schema_version(version: Any, where: str = "profile data") -> int:
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{where} has an invalid schema_version {version!r} (expected an int).")
    if version > PROFILE_SCHEMA_VERSION:
        raise ValueError(
            f"{where} was written with profile schema_version={version}, newer than the supported "
            f"{PROFILE_SCHEMA_VERSION}: upgrade trl_moe_rm to read it."
        )
    if version < 1:
        raise ValueError(f"{where} has an unknown profile schema_version={version}.")
    return version


# ----------------------------------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------------------------------


def _user_filename(user_id: UserId) -> str:
    """Injective, reversible and path-safe file name for a user id (case-insensitive file systems included)."""
    if isinstance(user_id, int):
        name = f"i-{user_id}.json"
    else:
        encoded = base64.b32encode(user_id.encode("utf-8")).decode("ascii").rstrip("=").lower()
        name = f"s-{encoded}.json"
    if len(name.encode("ascii")) > _MAX_FILENAME_BYTES:
        raise ValueError(
            f"user id {str(user_id)[:40]!r}... is too long to be stored as a file name ({len(name)} bytes > "
            f"{_MAX_FILENAME_BYTES}); use a shorter id (e.g. a hash of it) or format='safetensors'."
        )
    return name


def _user_id_from_filename(name: str) -> UserId | None:
    """Inverse of `_user_filename`; `None` for names that are not (canonical) profile files."""
    match = _INT_NAME.match(name)
    if match:
        user_id = int(match.group(1))
        return user_id if f"i-{user_id}.json" == name else None
    match = _STR_NAME.match(name)
    if match:
        encoded = match.group(1)
        try:
            raw = base64.b32decode(encoded.upper() + "=" * (-len(encoded) % 8))
            user_id = raw.decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        return user_id if user_id and _user_filename(user_id) == name else None
    return None


def _format_id(user_id: UserId) -> str:
    return repr(user_id)


# ----------------------------------------------------------------------------------------------------------------------
# ProfileStore
# ----------------------------------------------------------------------------------------------------------------------


def _id_sort_key(user_id: UserId) -> tuple[int, Any]:
    return (0, user_id, "") if isinstance(user_id, int) else (1, 0, user_id)


class ProfileStore:
    """
    Directory of [`UserProfile`]s, written crash-safely.

    Example:

    ```python
    >>> store = ProfileStore("my_model/profiles")
    >>> store.save(UserProfile(user_id="alice", expert_weights=[0.7, 0.2, 0.1]))
    >>> store.load("alice").expert_weights
    [0.7, 0.2, 0.1]
    ```

    Args:
        directory (`str` or `os.PathLike`):
            Directory of the store. It is created on the first write; reading never creates or modifies anything.
        format (`str`, *optional*, defaults to `"json"`):
            `"json"` (one file per user) or `"safetensors"` (a single `profiles.safetensors` table; all profiles must
            then have the same number of experts). With `"json"`, [`save_many`] writes each file atomically but the
            batch as a whole is not atomic; with `"safetensors"` it is a single atomic write.

    Raises:
        ProfileStoreNotWritableError: if `directory` is an existing file.
        ProfileStoreError: if `directory` holds only profiles of the other format.

    Iterating over a store yields user ids (like a mapping); use [`as_dict`] for the profiles. Writes are atomic, and
    with the `"safetensors"` format every [`save_many`] / [`delete`] holds a file lock (`.profiles.lock` in the
    directory, left in place) around its read-modify-write: processes saving at the same time all keep their users.
    """

    def __init__(self, directory: str | os.PathLike, format: str = "json") -> None:
        self._init(directory, format, check_format=True)

    def _init(self, directory: str | os.PathLike, format: str, check_format: bool) -> None:
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS}, got {format!r}.")
        self.directory = Path(directory)
        self.format = format
        if self.directory.exists() and not self.directory.is_dir():
            raise ProfileStoreNotWritableError(
                f"profile store directory {str(self.directory)!r} is an existing file, not a directory; choose "
                "another directory (a model directory's stores live in `<model_dir>/profiles/`)."
            )
        if check_format and self.directory.is_dir():
            detected = _detect_format(self.directory)
            if detected is not None and detected != format:
                raise ProfileStoreError(
                    f"{str(self.directory)!r} holds profiles in the {detected!r} format, not {format!r}: open it with "
                    f"ProfileStore(directory, format={detected!r}) or ProfileStore.from_pretrained(directory)."
                )

    @classmethod
    def _unchecked(cls, directory: str | os.PathLike, format: str) -> ProfileStore:
        store = cls.__new__(cls)
        store._init(directory, format, check_format=False)
        return store

    def __repr__(self) -> str:
        return f"ProfileStore({str(self.directory)!r}, format={self.format!r})"

    # ------------------------------------------------------------------ paths & checks

    @property
    def table_path(self) -> Path:
        """Path of the `profiles.safetensors` table (used by the `"safetensors"` format)."""
        return self.directory / TABLE_FILENAME

    def _user_path(self, user_id: UserId) -> Path:
        name = _user_filename(user_id)
        path = self.directory / name
        # Defence in depth: the encoding cannot produce separators or dot names, but never let a name leave the
        # directory. The parent is resolved rather than the file itself, whose symlink (e.g. into the Hub cache's blob
        # store) may legitimately point elsewhere.
        inside = os.path.realpath(os.path.dirname(os.path.join(self.directory, name))) == os.path.realpath(
            self.directory
        )
        if os.path.basename(name) != name or name in (".", "..") or not inside:
            raise ValueError(f"user id {user_id!r} maps outside the profile store directory; refusing to use it.")
        return path

    def _ensure_writable(self) -> None:
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise ProfileStoreNotWritableError(
                f"profile store directory {str(directory)!r} is an existing file, not a directory; choose another one."
            )
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ProfileStoreNotWritableError(
                f"cannot create profile store directory {str(directory)!r} ({exc.strerror or exc}); choose a writable "
                "location or fix the permissions of its parent."
            ) from exc
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ProfileStoreNotWritableError(
                f"profile store directory {str(directory)!r} is not writable; fix its permissions (e.g. chmod u+w) or "
                "save the profiles to another directory."
            )

    def _write(self, path: Path, data: bytes | str) -> None:
        try:
            if isinstance(data, str):
                atomic_write_text(path, data)
            else:
                atomic_write_bytes(path, data)
        except PermissionError as exc:
            raise ProfileStoreNotWritableError(
                f"cannot write {str(path)!r}: permission denied; fix the permissions of {str(self.directory)!r} or "
                "save the profiles to another directory."
            ) from exc

    def _remove(self, path: Path) -> None:
        try:
            os.remove(path)
        except PermissionError as exc:
            raise ProfileStoreNotWritableError(
                f"cannot delete {str(path)!r}: permission denied; fix the permissions of {str(self.directory)!r}."
            ) from exc
        fsync_directory(self.directory)

    def _unknown(self, user_id: UserId) -> UnknownUserError:
        return UnknownUserError(
            f"no profile for user {_format_id(user_id)} in {self!r}; fit one (e.g. with fit_user_weights) and save it, "
            "or check store.list() for the stored ids (int and str ids are distinct: 1 != '1')."
        )

    # ------------------------------------------------------------------ json format

    def _read_json(self, path: Path, expected_id: UserId | None) -> UserProfile:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ProfileStoreError(f"cannot read profile file {str(path)!r}: {exc}") from exc
        fix = "delete it or re-save the profile (the file was left unchanged)"
        try:
            data = _load_json(raw.decode("utf-8"))
        except ValueError as exc:  # not UTF-8, not JSON, an integer of more than 4300 digits, or nested too deeply
            raise ProfileStoreError(f"corrupt profile file {str(path)!r} (invalid JSON: {exc}); {fix}.") from exc
        if not isinstance(data, dict):
            raise ProfileStoreError(f"corrupt profile file {str(path)!r} (expected a JSON object); {fix}.")
        if "schema_version" not in data:
            raise ProfileStoreError(f"profile file {str(path)!r} has no schema_version; {fix}.")
        try:
            _check_schema_version(data["schema_version"], where=f"profile file {str(path)!r}")
        except ValueError as exc:
            raise ProfileStoreError(str(exc)) from exc
        if data.pop("format", _JSON_FORMAT_TAG) != _JSON_FORMAT_TAG:
            raise ProfileStoreError(f"{str(path)!r} is not a trl_moe_rm user profile (unexpected `format`); {fix}.")
        try:
            profile = UserProfile.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ProfileStoreError(f"invalid profile file {str(path)!r} ({exc}); {fix}.") from exc
        if expected_id is not None and (
            type(profile.user_id) is not type(expected_id) or profile.user_id != expected_id
        ):
            raise ProfileStoreError(
                f"profile file {str(path)!r} holds user {_format_id(profile.user_id)}, but its name is for user "
                f"{_format_id(expected_id)} (renamed or copied by hand?); {fix}."
            )
        return profile

    def _json_ids(self) -> list[UserId]:
        if not self.directory.is_dir():
            return []
        ids = []
        for entry in os.scandir(self.directory):
            if is_temp_file(entry.name) or not entry.is_file():
                continue
            user_id = _user_id_from_filename(entry.name)
            if user_id is not None:
                ids.append(user_id)
        return ids

    # ------------------------------------------------------------------ safetensors format

    def _read_table(self) -> dict[tuple[type, UserId], UserProfile]:
        path = self.table_path
        if not path.is_file():
            return {}
        return _read_table_file(path)

    def _encode_table(self, profiles: list[UserProfile]) -> bytes:
        from safetensors.torch import save as safetensors_save

        if profiles:
            k = profiles[0].num_experts
            for profile in profiles:
                if profile.num_experts != k:
                    raise ValueError(
                        f"the safetensors profile table stores one (U, K) matrix, so all profiles need the same number "
                        f"of experts: user {_format_id(profiles[0].user_id)} has K={k}, user "
                        f"{_format_id(profile.user_id)} has K={profile.num_experts}; use format='json' or one store per "
                        "model."
                    )
            weights = torch.tensor([p.expert_weights for p in profiles], dtype=torch.float32)
        else:
            weights = torch.zeros((0, 0), dtype=torch.float32)
        records = []
        for profile in profiles:
            record = profile.to_dict()
            del record["expert_weights"], record["schema_version"]
            records.append(record)
        metadata = {
            "format": _TABLE_FORMAT_TAG,
            "schema_version": str(PROFILE_SCHEMA_VERSION),
            "profiles": json.dumps(records, allow_nan=False, sort_keys=True),
        }
        return safetensors_save({"expert_weights": weights.contiguous()}, metadata=metadata)

    def _table_lock(self) -> FileLock:
        """The lock that writers of the table hold around their read-modify-write (the directory must exist)."""
        return FileLock(self.directory / LOCK_FILENAME)

    def _write_table(self, profiles: list[UserProfile]) -> None:
        if not profiles:
            if self.table_path.exists():
                self._remove(self.table_path)
            return
        data = self._encode_table(profiles)  # may raise before anything is written
        self._write(self.table_path, data)

    # ------------------------------------------------------------------ public API

    def save(self, profile: UserProfile) -> None:
        """
        Saves (creates or replaces) one profile atomically.

        Args:
            profile ([`UserProfile`]):
                Profile to save.

        Raises:
            ProfileStoreNotWritableError: if the directory cannot be written (nothing is written).
            ProfileStoreError: if an existing safetensors table is corrupt (it is left untouched).
        """
        self.save_many([profile])

    def save_many(self, profiles: Iterable[UserProfile]) -> None:
        """
        Saves several profiles. With the `"safetensors"` format this is a single atomic write of the table.

        Args:
            profiles (iterable of [`UserProfile`]):
                Profiles to save; user ids must be unique.

        Raises:
            ValueError: on duplicate user ids (or differing `K` with the `"safetensors"` format).
            ProfileStoreNotWritableError: if the directory cannot be written (nothing is written).
        """
        profiles = list(profiles)
        seen: set[tuple[type, UserId]] = set()
        for profile in profiles:
            if not isinstance(profile, UserProfile):
                raise TypeError(f"expected UserProfile objects, got {type(profile).__name__}.")
            key = (type(profile.user_id), profile.user_id)
            if key in seen:
                raise ValueError(f"duplicate user id {_format_id(profile.user_id)} in save_many; save each user once.")
            seen.add(key)
        if not profiles:
            return
        if self.format == "json":
            payloads = [(self._user_path(p.user_id), _profile_json(p)) for p in profiles]
            self._ensure_writable()
            for path, text in payloads:
                self._write(path, text)
        else:
            self._ensure_writable()
            with self._table_lock():
                table = self._read_table()
                for profile in profiles:
                    table[_table_key(profile.user_id)] = profile
                self._write(self.table_path, self._encode_table(list(table.values())))

    def load(self, user_id: UserId) -> UserProfile:
        """
        Loads the profile of a user. Never modifies anything on disk.

        Args:
            user_id (`str` or `int`):
                Id of the user.

        Returns:
            [`UserProfile`]: the stored profile.

        Raises:
            UnknownUserError: (a `KeyError`) if no profile is stored for this user.
            ProfileStoreError: if the file is corrupt or of a newer schema version.
        """
        user_id = normalize_user_id(user_id)
        if self.format == "json":
            try:
                path = self._user_path(user_id)
            except ValueError:  # an id too long for a file name cannot have been saved
                raise self._unknown(user_id) from None
            if not path.is_file():
                raise self._unknown(user_id)
            return self._read_json(path, expected_id=user_id)
        table = self._read_table()
        try:
            return table[_table_key(user_id)]
        except KeyError:
            raise self._unknown(user_id) from None

    def get(self, user_id: UserId, default: Any = None) -> UserProfile | Any:
        """
        Like [`load`], but returns `default` for an unknown user (corrupt files still raise).

        Args:
            user_id (`str` or `int`):
                Id of the user.
            default (`Any`, *optional*):
                Value returned when the user has no profile.
        """
        try:
            return self.load(user_id)
        except UnknownUserError:
            return default

    def list(self) -> list[UserId]:
        """
        Returns the stored user ids, ints first (numerically sorted) then strings (sorted). Temporary files left by an
        interrupted write are ignored.
        """
        if self.format == "json":
            ids = self._json_ids()
        else:
            ids = [profile.user_id for profile in self._read_table().values()]
        return sorted(ids, key=_id_sort_key)

    def delete(self, user_id: UserId) -> None:
        """
        Deletes the profile of a user.

        Args:
            user_id (`str` or `int`):
                Id of the user.

        Raises:
            UnknownUserError: if no profile is stored for this user.
            ProfileStoreNotWritableError: if the directory cannot be written.
        """
        user_id = normalize_user_id(user_id)
        if self.format == "json":
            path = self._user_path(user_id)
            if not path.is_file():
                raise self._unknown(user_id)
            self._ensure_writable()
            self._remove(path)
            return
        if _table_key(user_id) not in self._read_table():
            raise self._unknown(user_id)
        self._ensure_writable()
        with self._table_lock():
            table = self._read_table()
            if table.pop(_table_key(user_id), None) is None:  # deleted by another process meanwhile
                raise self._unknown(user_id)
            self._write_table(list(table.values()))

    def __contains__(self, user_id: object) -> bool:
        try:
            user_id = normalize_user_id(user_id)
            if self.format == "json":
                return self._user_path(user_id).is_file()
        except (TypeError, ValueError):
            return False
        return _table_key(user_id) in self._read_table()

    def __len__(self) -> int:
        return len(self.list())

    def __iter__(self) -> Iterator[UserId]:
        return iter(self.list())

    def as_dict(self) -> dict[UserId, UserProfile]:
        """Returns all profiles as `{user_id: profile}`, in [`list`] order."""
        if self.format == "json":
            return {user_id: self.load(user_id) for user_id in self.list()}
        table = self._read_table()
        return {profile.user_id: profile for profile in sorted(table.values(), key=lambda p: _id_sort_key(p.user_id))}

    # ------------------------------------------------------------------ model directories & Hub

    def save_pretrained(self, model_dir: str | os.PathLike) -> Path:
        """
        Writes a copy of the store to `<model_dir>/profiles/` in the same format.

        The destination mirrors this store: profiles stored there but absent here (and files of the other format) are
        removed after the new files are written. It is replaced as a whole (no read-modify-write, so no lock file is
        created there: a staged Hub upload holds only profile files).

        Args:
            model_dir (`str` or `os.PathLike`):
                Model directory (e.g. the one passed to `model.save_pretrained`).

        Returns:
            `Path`: the profiles directory.
        """
        target = Path(model_dir) / PROFILES_DIRNAME
        if target.exists() and self.directory.exists() and os.path.samefile(target, self.directory):
            return target
        profiles = list(self.as_dict().values())
        dest = ProfileStore._unchecked(target, self.format)
        dest._ensure_writable()
        if self.format == "json":
            dest.save_many(profiles)
            keep = {(type(p.user_id), p.user_id) for p in profiles}
            for user_id in dest._json_ids():
                if (type(user_id), user_id) not in keep:
                    dest._remove(dest._user_path(user_id))
            if dest.table_path.exists():
                dest._remove(dest.table_path)
        else:
            dest._write_table(profiles)
            for user_id in dest._json_ids():
                dest._remove(dest._user_path(user_id))
        return target

    @classmethod
    def from_pretrained(
        cls, repo_or_dir: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
    ) -> ProfileStore:
        """
        Opens the profiles of a model, from a local directory or a Hugging Face Hub repository.

        The format is detected from the files. Files that could hold pickles (`.pkl`, `.pickle`, `.bin`, `.pt`, `.pth`,
        `.joblib`) in the profiles directory are refused: profiles are never unpickled.

        Args:
            repo_or_dir (`str` or `os.PathLike`):
                A local model directory containing `profiles/`, a local profiles directory, or a Hub repo id (only
                `profiles/*` is downloaded).
            revision (`str`, *optional*):
                Hub revision (branch, tag or commit).
            token (`str` or `bool`, *optional*):
                Hub token.

        Returns:
            [`ProfileStore`]: the store.

        Raises:
            FileNotFoundError: if no profiles directory is found.
            ProfileStoreError: if a pickle-capable file is present or both formats are present.
        """
        path = Path(repo_or_dir)
        if path.is_dir():
            if (path / PROFILES_DIRNAME).is_dir():
                profiles_dir = path / PROFILES_DIRNAME
            elif path.name == PROFILES_DIRNAME or _has_profile_files(path):
                profiles_dir = path
            else:
                raise FileNotFoundError(
                    f"no profiles found in {str(path)!r}: expected {str(path / PROFILES_DIRNAME)!r} (written by "
                    "ProfileStore.save_pretrained) or a directory of profile files."
                )
        elif path.exists():
            raise ProfileStoreError(
                f"{str(path)!r} is a file; pass a model directory, a profiles directory or a repo id."
            )
        elif is_local_path(repo_or_dir):
            raise FileNotFoundError(f"local directory {os.fspath(repo_or_dir)!r} does not exist.")
        else:
            from huggingface_hub import snapshot_download

            root = snapshot_download(
                repo_id=os.fspath(repo_or_dir),
                revision=revision,
                token=token,
                allow_patterns=[f"{PROFILES_DIRNAME}/*"],
            )
            profiles_dir = Path(root) / PROFILES_DIRNAME
            if not profiles_dir.is_dir():
                raise FileNotFoundError(
                    f"Hub repo {os.fspath(repo_or_dir)!r} (revision {revision or 'main'}) has no {PROFILES_DIRNAME}/ "
                    "folder; write one with ProfileStore.save_pretrained(model_dir) and upload it."
                )
        _refuse_pickle_files(profiles_dir)
        fmt = _detect_format(profiles_dir, strict=True) or "json"
        return cls(profiles_dir, format=fmt)


def lookup_profile(
    profiles: ProfileStore | Mapping[Any, UserProfile], user_id: Any, default: Any = None
) -> UserProfile | Any:
    r"""
    The profile of `user_id` in a [`ProfileStore`] or a dict of profiles, or `default`; ids are matched exactly.

    A dict lookup alone aliases equal keys: `{1: profile}.get(True)` and `.get(1.0)` both find user `1`. Here a `bool`
    or `float` id is refused ([`normalize_user_id`]), and a profile is only returned for a key of the same kind (`str`
    or integer) and value as `user_id` (or, for an aliasing key such as `1.0`, when the profile's own `user_id` is
    exactly `user_id`). Any other object with a `get(user_id, default)` method is asked directly.

    Example:

    ```python
    >>> profiles = {1: alice}
    >>> lookup_profile(profiles, 1) is alice, lookup_profile(profiles, "1")
    (True, None)
    >>> lookup_profile(profiles, True)  # TypeError: user_id must be a str or an int, got the bool True
    ```

    Raises:
        TypeError: `user_id` is a `bool`, a `float` or another type that is not an id.
    """
    if isinstance(profiles, ProfileStore):
        return profiles.get(user_id, default)
    if not isinstance(profiles, Mapping):
        return profiles.get(user_id, default)
    user_id = normalize_user_id(user_id)
    profile = profiles.get(user_id, default)
    if profile is default or _same_id(getattr(profile, "user_id", None), user_id):
        return profile
    # An equal key of another kind (`True` or `1.0` for user 1) answered: look for the exact key instead.
    return next((profiles[key] for key in profiles if _same_id(key, user_id)), default)


# ----------------------------------------------------------------------------------------------------------------------
# Module helpers
# ----------------------------------------------------------------------------------------------------------------------


def _table_key(user_id: UserId) -> tuple[type, UserId]:
    # int 1 and str "1" are different users; bool never reaches here.
    return (type(user_id), user_id)


def _same_id(key: Any, user_id: UserId) -> bool:
    """Whether a dict key (or a profile's id) is exactly the normalized `user_id`: same kind, same value."""
    kind = str if isinstance(user_id, str) else numbers.Integral
    return isinstance(key, kind) and not isinstance(key, bool) and key == user_id


def _profile_json(profile: UserProfile) -> str:
    data = {"format": _JSON_FORMAT_TAG, **profile.to_dict()}
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


def _has_profile_files(directory: Path) -> bool:
    return _detect_format(directory) is not None


def _detect_format(directory: Path, strict: bool = False) -> str | None:
    """Returns the format of the profiles in `directory` (`None` if there are none)."""
    has_json = False
    has_table = False
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return None
    for entry in entries:
        if is_temp_file(entry.name):
            continue
        if entry.name == TABLE_FILENAME:
            has_table = True
        elif _user_id_from_filename(entry.name) is not None:
            has_json = True
    if has_json and has_table:
        if strict:
            raise ProfileStoreError(
                f"{str(directory)!r} holds both JSON profile files and {TABLE_FILENAME}; delete the stale format "
                "(or re-export with ProfileStore.save_pretrained, which mirrors one format)."
            )
        return None
    if has_table:
        return "safetensors"
    if has_json:
        return "json"
    return None


def _refuse_pickle_files(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if is_pickle_capable(path):
            raise ProfileStoreError(
                f"refusing to load profiles from {str(directory)!r}: it contains {str(path.name)!r}, a file type that may "
                "hold a pickle, and profiles are never unpickled. Remove the file and store profiles with ProfileStore "
                "(JSON or safetensors)."
            )


def _read_table_file(path: Path) -> dict[tuple[type, UserId], UserProfile]:
    fix = "delete it or re-save the profiles (the file was left unchanged)"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileStoreError(f"cannot read profile table {str(path)!r}: {exc}") from exc
    try:
        if len(raw) < 8:
            raise ValueError("file too short")
        (header_len,) = struct.unpack("<Q", raw[:8])
        if header_len > len(raw) - 8:
            raise ValueError("header length exceeds file size")
        header = json.loads(raw[8 : 8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        metadata = header.get("__metadata__") or {}
        from safetensors.torch import load as safetensors_load

        tensors = safetensors_load(raw)
    except Exception as exc:  # safetensors raises its own error types
        raise ProfileStoreError(f"corrupt profile table {str(path)!r} ({exc}); {fix}.") from exc
    if metadata.get("format") != _TABLE_FORMAT_TAG or "schema_version" not in metadata:
        raise ProfileStoreError(
            f"{str(path)!r} is not a trl_moe_rm profile table (missing format/schema_version metadata); {fix}."
        )
    try:
        version = int(metadata["schema_version"])
    except ValueError as exc:
        raise ProfileStoreError(f"profile table {str(path)!r} has an invalid schema_version; {fix}.") from exc
    try:
        _check_schema_version(version, where=f"profile table {str(path)!r}")
    except ValueError as exc:
        raise ProfileStoreError(str(exc)) from exc
    try:
        records = _load_json(metadata.get("profiles", ""))
        weights = tensors.get("expert_weights")
        if not isinstance(records, list) or weights is None:
            raise ValueError("missing `profiles` metadata or `expert_weights` tensor")
        if weights.dim() != 2 or weights.shape[0] != len(records):
            raise ValueError(
                f"`expert_weights` has shape {tuple(weights.shape)} but the metadata lists {len(records)} profiles"
            )
        table: dict[tuple[type, UserId], UserProfile] = {}
        for record, row in zip(records, weights.to(torch.float64).tolist()):
            if not isinstance(record, dict):
                raise ValueError("profile records must be JSON objects")
            profile = UserProfile.from_dict({**record, "expert_weights": row, "schema_version": version})
            key = _table_key(profile.user_id)
            if key in table:
                raise ValueError(f"duplicate user id {_format_id(profile.user_id)}")
            table[key] = profile
    except (TypeError, ValueError) as exc:
        raise ProfileStoreError(f"invalid profile table {str(path)!r} ({exc}); {fix}.") from exc
    return table
