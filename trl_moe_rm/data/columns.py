"""Columns of a preference dataset, whatever holds it: a `datasets.Dataset`, a mapping of columns or a DataFrame."""

from collections.abc import Mapping, Sequence
from typing import Any


def column_names(dataset: Any) -> list[str]:
    """Column names of a `datasets.Dataset`, a mapping of columns or a pandas DataFrame."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, Mapping):  # a DatasetDict
        raise TypeError(
            f"Expected a single dataset split, got a dataset dictionary with splits {list(names)}; pass e.g. "
            "`dataset['test']`."
        )
    if names is not None:
        return list(names)
    if isinstance(dataset, Mapping):
        return list(dataset.keys())
    if hasattr(dataset, "columns"):
        return [str(column) for column in dataset.columns]
    raise TypeError(
        f"Expected a `datasets.Dataset` or a mapping from column names to sequences, got {type(dataset).__name__}."
    )


def num_rows(dataset: Any) -> int:
    if isinstance(dataset, Mapping):
        columns = list(dataset.values())
        return len(columns[0]) if columns else 0
    return len(dataset)


def require_columns(dataset: Any, columns: Sequence[str], needed_by: str) -> None:
    """Raises a `ValueError` naming the first missing column and the function or metric that needs it."""
    available = column_names(dataset)
    for column in columns:
        if column not in available:
            raise ValueError(f"{needed_by} needs a `{column}` column; the dataset has {available}.")


def get_column(dataset: Any, column: str, needed_by: str) -> list:
    require_columns(dataset, [column], needed_by)
    return list(dataset[column])


__all__ = ["column_names", "get_column", "num_rows", "require_columns"]
