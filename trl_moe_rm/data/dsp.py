"""
Loader of DSP, the "Domain-Specific Preference" dataset (Cheng et al. 2023, "Everyone Deserves A Reward"), as
domain-vs-domain preference pairs for few-shot personalization.

Every DSP row holds one query and one response per domain (`academy`, `business`, `entertainment`, `literature`) plus
a generic `normal` response. Under domain `d`, `responses[d]` is preferred over every other response. Treating each
domain as a user gives a *hidden-context* benchmark: the same two responses appear with both labels (under their two
domains), and the query never reveals the domain.

The data is not shipped with the package (its licence is CC BY-NC 4.0): pass its directory, or set the environment
variable `TRL_MOE_RM_DATA` (default `../shared/data`, relative to the working directory). Missing files raise
[`DSPNotFoundError`] with a clear message, which benchmarks and tests turn into a skip.

Example:

```python
>>> from trl_moe_rm.data.dsp import load_dsp_pairs, split_dsp_by_query

>>> pairs = load_dsp_pairs()  # 661 x 4 x 3 = 7,932 domain-vs-domain pairs
>>> split = split_dsp_by_query(pairs, test_size=0.2, seed=0)
>>> split["train"].filter(lambda row: row["user_id"] == "academy")
```
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from datasets import Dataset, DatasetDict


__all__ = [
    "DATA_ENV_VAR",
    "DSP_DOMAINS",
    "DSP_FILE",
    "DSPNotFoundError",
    "data_dir",
    "dsp_path",
    "load_dsp_pairs",
    "load_dsp_rows",
    "split_dsp_by_query",
]

DATA_ENV_VAR = "TRL_MOE_RM_DATA"
"""Environment variable naming the directory of the real datasets."""

DEFAULT_DATA_DIR = os.path.join("..", "shared", "data")

DSP_FILE = os.path.join("dsp", "domain_specific_preference.test.json")
"""Path of the DSP test split relative to the data directory."""

DSP_DOMAINS: tuple[str, ...] = ("academy", "business", "entertainment", "literature")
"""The four domains, i.e. the four "users" of the benchmark."""

NORMAL = "normal"


class DSPNotFoundError(FileNotFoundError):
    """The DSP file is not where the data directory says it is."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """
    The directory of the real datasets: `path` if given, else `$TRL_MOE_RM_DATA`, else `../shared/data` (relative to
    the working directory, or to the repository root of an editable install).

    Args:
        path (`str` or `os.PathLike`, *optional*):
            An explicit data directory (e.g. a `--data_dir` argument).

    Returns:
        `Path`: the directory (not checked for existence).
    """
    if path is not None:
        return Path(path)
    if os.environ.get(DATA_ENV_VAR):
        return Path(os.environ[DATA_ENV_VAR])
    # `../shared/data` relative to the working directory, else relative to the repository of an editable install.
    candidates = [Path(DEFAULT_DATA_DIR), Path(__file__).resolve().parents[2] / DEFAULT_DATA_DIR]
    return next((candidate for candidate in candidates if candidate.is_dir()), candidates[0])


def dsp_path(path: str | os.PathLike | None = None) -> Path:
    """
    Location of `domain_specific_preference.test.json`.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The data directory, or the JSON file itself. Defaults to [`data_dir`].

    Raises:
        DSPNotFoundError: if the file does not exist.
    """
    candidate = Path(path) if path is not None else None
    if candidate is not None and candidate.suffix == ".json":
        file = candidate
    else:
        file = data_dir(candidate) / DSP_FILE
    if not file.is_file():
        raise DSPNotFoundError(
            f"DSP not found at {str(file)!r}. It is not shipped with trl_moe_rm (CC BY-NC 4.0): get "
            "`data/domain_specific_preference.test.json` from the Linear95/DSP repository and pass its data directory "
            f"(`--data_dir`) or set {DATA_ENV_VAR}."
        )
    return file


def load_dsp_rows(path: str | os.PathLike | None = None) -> list[dict]:
    """
    The raw DSP rows: a list of `{"query": str, "responses": {domain: str}}`.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The data directory or the JSON file. Defaults to [`data_dir`].
    """
    file = dsp_path(path)
    with open(file, encoding="utf-8") as handle:
        rows = json.load(handle)
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{str(file)!r} does not hold a non-empty JSON list of DSP rows.")
    for index, row in enumerate(rows):
        responses = row.get("responses") if isinstance(row, dict) else None
        if not isinstance(responses, dict) or "query" not in row:
            raise ValueError(f"DSP row {index} has no `query`/`responses`: {str(row)[:120]!r}.")
        missing = [domain for domain in (*DSP_DOMAINS, NORMAL) if domain not in responses]
        if missing:
            raise ValueError(f"DSP row {index} has no response for domain(s) {missing}.")
    return rows


def load_dsp_pairs(path: str | os.PathLike | None = None, include_normal: bool = False) -> Dataset:
    r"""
    DSP as preference pairs, one user per domain.

    For each query and each ordered pair of distinct domains `(d, o)`, the row has `prompt = query`,
    `chosen = responses[d]`, `rejected = responses[o]` and `user_id = category = d`: `661 x 4 x 3 = 7,932` pairs.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The data directory or the JSON file. Defaults to [`data_dir`].
        include_normal (`bool`, *optional*, defaults to `False`):
            Also add, for every query and domain `d`, the pair `responses[d]` vs `responses["normal"]`
            (`rejected_domain="normal"`). These pairs are confounded by length (normal responses are about half as
            long), so keep them out of the main metric; pairs with an empty normal response are skipped.

    Returns:
        [`~datasets.Dataset`] with columns `prompt`, `chosen`, `rejected`, `user_id` (the preferred domain),
        `category` (the same), `rejected_domain` and `query_id` (the row index in the file).
    """
    rows = load_dsp_rows(path)
    columns: dict[str, list] = {
        key: [] for key in ("prompt", "chosen", "rejected", "user_id", "category", "rejected_domain", "query_id")
    }
    for query_id, row in enumerate(rows):
        responses = row["responses"]
        for domain in DSP_DOMAINS:
            others = [other for other in DSP_DOMAINS if other != domain]
            if include_normal and responses[NORMAL].strip():
                others.append(NORMAL)
            for other in others:
                columns["prompt"].append(row["query"])
                columns["chosen"].append(responses[domain])
                columns["rejected"].append(responses[other])
                columns["user_id"].append(domain)
                columns["category"].append(domain)
                columns["rejected_domain"].append(other)
                columns["query_id"].append(query_id)
    return Dataset.from_dict(columns)


def split_dsp_by_query(dataset: Dataset, test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    """
    Split DSP pairs by query: every pair of a query goes to the same split, so no query is in both.

    Args:
        dataset ([`~datasets.Dataset`]):
            Pairs from [`load_dsp_pairs`] (any dataset with a `query_id` column).
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction, in `(0, 1)`, of the queries held out (rounded, at least one query per split).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the query shuffle.

    Returns:
        [`~datasets.DatasetDict`] with `"train"` and `"test"`, each in the original row order.
    """
    if not isinstance(test_size, (int, float)) or not 0.0 < test_size < 1.0:
        raise ValueError(f"`test_size` must be a fraction strictly between 0 and 1, got {test_size!r}.")
    if "query_id" not in dataset.column_names:
        raise ValueError(f"`dataset` needs a `query_id` column (from load_dsp_pairs); it has {dataset.column_names}.")
    query_ids = list(dataset["query_id"])
    unique = sorted(set(query_ids))
    if len(unique) < 2:
        raise ValueError(f"`dataset` has {len(unique)} distinct query; at least 2 are needed to split by query.")
    random.Random(seed).shuffle(unique)
    num_test = min(max(round(test_size * len(unique)), 1), len(unique) - 1)
    test_queries = set(unique[:num_test])
    train_rows = [row for row, query in enumerate(query_ids) if query not in test_queries]
    test_rows = [row for row, query in enumerate(query_ids) if query in test_queries]
    return DatasetDict({"train": dataset.select(train_rows), "test": dataset.select(test_rows)})
