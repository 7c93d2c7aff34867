"""
Loader of DSP, the "Domain-Specific Preference" dataset (Cheng et al. 2023, "Everyone Deserves A Reward"), as
domain-vs-domain preference pairs for few-shot personalization.

Every DSP row holds one query and one response per domain (`academy`, `business`, `entertainment`, `literature`) plus
a generic `normal` response. Under domain `d`, `responses[d]` is preferred over every other response. Treating each
domain as a user gives a *hidden-context* benchmark: the same two responses appear with both labels (under their two
domains), and the query never reveals the domain.

The data is not shipped with the project (its licence is CC BY-NC 4.0): pass its directory, or set the environment
variable `TRL_MOE_RM_DATA` (default `../shared/data`, relative to the repository root; see
[`~benchmarks.real_datasets.resolve_data_dir`]). A missing file raises
[`~benchmarks.real_datasets.RealDataMissingError`] with a clear message, which benchmarks and tests turn into a skip.

Example:

```python
>>> from benchmarks.dsp import load_dsp_pairs, split_dsp_by_query

>>> pairs = load_dsp_pairs()  # 661 x 4 x 3 = 7,932 domain-vs-domain pairs
>>> split = split_dsp_by_query(pairs, test_size=0.2, seed=0)
>>> split["train"].filter(lambda row: row["user_id"] == "academy")
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset, DatasetDict

from benchmarks.real_datasets import real_data_file
from trl_moe_rm.data.controlled import train_test_split_by_prompt


__all__ = ["DSP_DOMAINS", "DSP_FILE", "dsp_path", "load_dsp_pairs", "load_dsp_rows", "split_dsp_by_query"]

DSP_FILE = "dsp/domain_specific_preference.test.json"
"""Path of the DSP test split relative to the data directory."""

DSP_DOMAINS: tuple[str, ...] = ("academy", "business", "entertainment", "literature")
"""The four domains, i.e. the four "users" of the benchmark."""

NORMAL = "normal"


def dsp_path(path: str | os.PathLike | None = None) -> Path:
    """
    Location of `domain_specific_preference.test.json`.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The data directory, or the JSON file itself. Defaults to the data directory of
            [`~benchmarks.real_datasets.resolve_data_dir`].

    Raises:
        [`~benchmarks.real_datasets.RealDataMissingError`]: if the file does not exist.
    """
    if path is not None and Path(path).suffix == ".json":
        return real_data_file(Path(path).name, Path(path).parent)
    return real_data_file(DSP_FILE, path)


def load_dsp_rows(path: str | os.PathLike | None = None) -> list[dict]:
    """
    The raw DSP rows: a list of `{"query": str, "responses": {domain: str}}`.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            The data directory or the JSON file (see [`dsp_path`]).
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
            The data directory or the JSON file (see [`dsp_path`]).
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
    return train_test_split_by_prompt(dataset, test_size=test_size, seed=seed, prompt_column="query_id")
