"""Load preference datasets from the Hugging Face Hub or from local json / jsonl / parquet files."""

import io
import json
import os
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict, load_dataset, load_from_disk
from datasets.exceptions import DatasetGenerationError

from ..paths import is_local_path


LOCAL_SUFFIXES: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""File suffixes read from local paths, mapped to the `datasets` builder that reads them."""

PREFERENCE_COLUMNS: tuple[str, ...] = ("chosen", "rejected")
"""Columns every preference dataset needs (an optional `prompt` column gives an explicit prompt)."""

TOKENIZED_PREFERENCE_COLUMNS: tuple[str, ...] = ("chosen_ids", "rejected_ids")
"""Pre-tokenized alternative to `PREFERENCE_COLUMNS`, accepted by `MoERewardTrainer` as is."""

AnyDataset = Dataset | DatasetDict | IterableDataset | IterableDatasetDict


def looks_like_local_path(name_or_path: str | os.PathLike) -> bool:
    """
    Whether `name_or_path` designates a local file or folder rather than a Hub dataset id.

    A path is local by the package's one rule ([`~trl_moe_rm.paths.is_local_path`]: it exists, or starts with `.`,
    `/` or `~`, ...) or when it ends with a data file suffix (`.json`, `.jsonl`, `.parquet`, `.csv`). Hub ids
    (`"trl-lib/ultrafeedback_binarized"`) match none of these.
    """
    return is_local_path(name_or_path) or Path(os.fspath(name_or_path)).suffix.lower() in LOCAL_SUFFIXES


def load_preference_dataset(
    name_or_path: str | os.PathLike,
    config: str | None = None,
    split: str | None = None,
    streaming: bool = False,
    check_columns: bool = True,
) -> AnyDataset:
    r"""
    Load a preference dataset from the Hub or from disk, and check that it has preference columns.

    Args:
        name_or_path (`str` or `os.PathLike`):
            One of:

            - a Hub dataset id, e.g. `"trl-lib/ultrafeedback_binarized"`;
            - a local `.json`, `.jsonl` or `.parquet` file (loaded as a single `"train"` split);
            - a local folder of such files (`datasets` infers the splits from the file names, e.g. `train.jsonl` and
              `test.jsonl`);
            - a local folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        config (`str`, *optional*):
            Dataset configuration (subset) name, for Hub datasets.
        split (`str`, *optional*):
            Split to return. When `None`, the whole [`~datasets.DatasetDict`] is returned.
        streaming (`bool`, *optional*, defaults to `False`):
            Stream the data instead of downloading / memory-mapping it.
        check_columns (`bool`, *optional*, defaults to `True`):
            Raise a `ValueError` when a split lacks the `chosen` / `rejected` columns (or their pre-tokenized
            `chosen_ids` / `rejected_ids` form).

    Returns:
        [`~datasets.DatasetDict`] (or [`~datasets.Dataset`] when `split` is given; the iterable variants when
        streaming).

    Raises:
        `FileNotFoundError`: `name_or_path` looks like a local path but does not exist, or a folder holds no data file.
        `KeyError`: `split` is not one of the dataset's splits.
        `ValueError`: the preference columns are missing.

    Example:

    ```python
    >>> from trl_moe_rm.data import make_controlled_dataset
    >>> from trl_moe_rm.data.loading import load_preference_dataset

    >>> make_controlled_dataset().to_json("controlled.jsonl")
    >>> dataset = load_preference_dataset("controlled.jsonl", split="train")
    ```
    """
    text = os.fspath(name_or_path)
    if looks_like_local_path(text):
        dataset = _load_local(Path(os.path.expanduser(text)), streaming)
    else:
        dataset = load_dataset(text, name=config, streaming=streaming)

    if split is not None:
        if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
            if split not in dataset:
                raise KeyError(
                    f"The dataset {text!r} has no split {split!r}; its splits are {list(dataset)}. Pick one with "
                    "`--dataset_train_split` / `--dataset_test_split`, or name your local files `train.jsonl` / "
                    "`test.jsonl` so that the splits are inferred."
                )
            dataset = dataset[split]
    if check_columns:
        check_preference_columns(dataset, text)
    return dataset


def check_preference_columns(dataset: AnyDataset, name: str = "dataset") -> None:
    """
    Raise a clear `ValueError` when `dataset` (or any split of it) lacks the `chosen` / `rejected` columns.

    Pre-tokenized data (`chosen_ids` / `rejected_ids`) is accepted too.
    """
    splits = dataset.items() if isinstance(dataset, (DatasetDict, IterableDatasetDict)) else [(None, dataset)]
    for split_name, split in splits:
        columns = split.column_names
        if columns is None:  # an iterable dataset whose features are unknown until it is read
            columns = list(next(iter(split)).keys())
        if all(c in columns for c in PREFERENCE_COLUMNS) or all(c in columns for c in TOKENIZED_PREFERENCE_COLUMNS):
            continue
        missing = [c for c in PREFERENCE_COLUMNS if c not in columns]
        where = f"{name!r}" + (f" (split {split_name!r})" if split_name is not None else "")
        raise ValueError(
            f"The dataset {where} is not a preference dataset: it has no {' / '.join(repr(c) for c in missing)} "
            f"column{'s' if len(missing) > 1 else ''}. Its columns are {columns}. MoE reward training needs the "
            f"preference columns {list(PREFERENCE_COLUMNS)} (plus an optional 'prompt'), standard or conversational. "
            "Rename your columns, e.g. `dataset.rename_columns({'response_a': 'chosen', 'response_b': 'rejected'})`."
        )


def _load_local(path: Path, streaming: bool) -> DatasetDict | IterableDatasetDict:
    if not path.exists():
        raise FileNotFoundError(
            f"Dataset path {str(path)!r} does not exist. `--dataset_name` takes a Hub dataset id (e.g. "
            "'trl-lib/ultrafeedback_binarized') or an existing local .json / .jsonl / .parquet file or folder of such "
            "files. Check the path (relative paths are resolved from the current directory, "
            f"{os.getcwd()!r})."
        )
    if path.is_file():
        builder = LOCAL_SUFFIXES.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read {str(path)!r}: local datasets must be {', '.join(sorted(LOCAL_SUFFIXES))} files."
            )
        if builder != "parquet" and not _has_content(path):
            raise ValueError(f"The dataset file {str(path)!r} is empty: it holds no rows. Pass a file with data.")
        try:
            return load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
        except (DatasetGenerationError, StopIteration) as error:
            raise ValueError(
                f"Cannot read {str(path)!r}: {error.__cause__ or error}. The file is corrupt or not {builder} (a "
                "`.jsonl` file holds one JSON object per line)."
            ) from error
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        dataset = load_from_disk(str(path))
        if isinstance(dataset, Dataset):
            dataset = DatasetDict({"train": dataset})
        if streaming:
            return IterableDatasetDict({name: split.to_iterable_dataset() for name, split in dataset.items()})
        return dataset
    data_files = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES]
    if not data_files:
        raise FileNotFoundError(
            f"The dataset folder {str(path)!r} contains no {', '.join(sorted(LOCAL_SUFFIXES))} file (nor a "
            "`save_to_disk` dataset)."
        )
    builders = {LOCAL_SUFFIXES[p.suffix.lower()] for p in data_files}
    if len(builders) > 1:
        raise ValueError(f"The dataset folder {str(path)!r} mixes json and parquet files; keep one format per folder.")
    return load_dataset(str(path), streaming=streaming)


def read_rows(path: str, split: str | None = None) -> tuple[list[dict], str]:
    """
    Rows of a file (.jsonl/.json/.parquet/.csv), a `save_to_disk` folder or a Hub dataset, as dicts, and the format to
    write them back in (`"jsonl"`, `"parquet"` or `"csv"`). JSONL is read line by line, so that a bad line is named.
    """
    local = Path(path)
    if local.suffix.lower() in (".jsonl", ".json") and local.is_file():
        return _read_jsonl(local), "jsonl"
    dataset = load_preference_dataset(path, check_columns=False)
    if isinstance(dataset, DatasetDict):
        if split is None:
            split = "train" if "train" in dataset or len(dataset) != 1 else next(iter(dataset))
        if split not in dataset:
            raise KeyError(f"{path!r} has no split {split!r}; its splits are {list(dataset)}.")
        dataset = dataset[split]
    suffix = local.suffix.lower()
    return dataset.to_list(), suffix[1:] if suffix in (".parquet", ".csv") else "jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as file:
        text = file.read()
    stripped = text.lstrip()
    if stripped.startswith("["):  # a .json file holding one list of rows
        try:
            lines = [json.dumps(row) for row in json.loads(text)]
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
    else:
        lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: each line must be a JSON object with `prompt` and `completion`.")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty: it holds no rows.")
    return rows


def write_rows(rows: list[dict], path: str | os.PathLike, kind: str) -> None:
    """Write rows atomically as JSONL (no NaN allowed), parquet or CSV."""
    from ..io_utils import atomic_write_bytes, atomic_write_text

    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
        return
    import pandas as pd

    buffer = io.BytesIO()
    frame = pd.DataFrame(rows)
    if kind == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        frame.to_csv(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def _has_content(path: Path) -> bool:
    """Whether a text data file holds anything but whitespace (`datasets` fails with StopIteration on an empty one)."""
    with open(path, "rb") as file:
        while chunk := file.read(1 << 16):
            if chunk.strip():
                return True
    return False


__all__ = [
    "LOCAL_SUFFIXES",
    "PREFERENCE_COLUMNS",
    "TOKENIZED_PREFERENCE_COLUMNS",
    "check_preference_columns",
    "load_preference_dataset",
    "looks_like_local_path",
    "read_rows",
    "write_rows",
]
