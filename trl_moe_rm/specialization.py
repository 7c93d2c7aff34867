# Copyright 2025 The trl_moe_rm authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Expert specialization: how each expert's preferences line up with known attributes of the responses.

- [`attribute_deltas`]: the attribute differences (chosen minus rejected) of a labelled dataset;
- [`expert_attribute_correlation`]: Spearman correlation of every expert's reward differences with every attribute;
- [`specialization_score`]: the one-to-one (Hungarian) matching of experts to attributes and its mean `|rho|`.

The attributes are whatever the dataset's `chosen_attributes` / `rejected_attributes` vectors hold (e.g. the planted
attributes of [`~trl_moe_rm.data.make_controlled_dataset`]); this module does not know their names.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata

from .data.columns import get_column


__all__ = ["attribute_deltas", "expert_attribute_correlation", "specialization_score"]


def attribute_deltas(
    dataset: Any, chosen_column: str = "chosen_attributes", rejected_column: str = "rejected_attributes"
) -> np.ndarray:
    r"""
    Attribute differences `attributes(chosen) - attributes(rejected)` of every pair of a labelled dataset.

    Args:
        dataset ([`~datasets.Dataset`] or `Mapping[str, Sequence]`):
            Dataset with one attribute vector per response, e.g. from [`~trl_moe_rm.data.make_controlled_dataset`].
        chosen_column (`str`, *optional*, defaults to `"chosen_attributes"`):
            Column holding the attribute vectors of the chosen responses.
        rejected_column (`str`, *optional*, defaults to `"rejected_attributes"`):
            Column holding the attribute vectors of the rejected responses.

    Returns:
        `np.ndarray` of shape `(n, A)`: float64 attribute deltas. For the controlled dataset the values are in
        `{-2, 0, 2}`.
    """
    chosen = np.asarray(get_column(dataset, chosen_column, "attribute_deltas"), dtype=np.float64)
    rejected = np.asarray(get_column(dataset, rejected_column, "attribute_deltas"), dtype=np.float64)
    if chosen.ndim == 1:
        chosen, rejected = chosen[:, None], rejected[:, None]
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise ValueError(
            f"`{chosen_column}` and `{rejected_column}` must hold vectors of one common length, got shapes "
            f"{chosen.shape} and {rejected.shape}."
        )
    return chosen - rejected


def expert_attribute_correlation(expert_deltas: Any, attribute_deltas: Any) -> np.ndarray:
    r"""
    Spearman rank correlation between every expert's reward differences and every attribute's differences.

    `rho[k, a]` is the Pearson correlation of the ranks (`scipy.stats.rankdata`, average ranks for ties) of
    `expert_deltas[:, k]` and `attribute_deltas[:, a]`, i.e. exactly `scipy.stats.spearmanr`, computed for all pairs
    of columns at once. Both inputs must use the same orientation (chosen minus rejected), so `rho > 0` means the
    expert prefers the response with the higher attribute value. A constant column (e.g. a dead expert, or an attribute
    that never differs) gets `rho = 0` instead of NaN.

    Args:
        expert_deltas (`array-like` of shape `(n, K)`):
            `Delta_k` of every pair, e.g. `scores.expert_deltas`.
        attribute_deltas (`array-like` of shape `(n, A)` or `(n,)`):
            Attribute differences of every pair, e.g. from [`attribute_deltas`].

    Returns:
        `np.ndarray` of shape `(K, A)`: Correlations in `[-1, 1]`, never NaN.
    """
    experts = np.asarray(expert_deltas, dtype=np.float64)
    attributes = np.asarray(attribute_deltas, dtype=np.float64)
    if attributes.ndim == 1:
        attributes = attributes[:, None]
    if experts.ndim != 2 or attributes.ndim != 2:
        raise ValueError(
            f"`expert_deltas` must be (n, K) and `attribute_deltas` (n, A), got {experts.shape} and {attributes.shape}."
        )
    if experts.shape[0] != attributes.shape[0]:
        raise ValueError(f"Got {experts.shape[0]} expert deltas but {attributes.shape[0]} attribute deltas.")
    if experts.shape[0] < 2:
        raise ValueError("A rank correlation needs at least 2 pairs.")
    if not (np.isfinite(experts).all() and np.isfinite(attributes).all()):
        raise ValueError("`expert_deltas` and `attribute_deltas` must be finite (found NaN or inf).")
    expert_ranks = rankdata(experts, axis=0)
    attribute_ranks = rankdata(attributes, axis=0)
    expert_ranks -= expert_ranks.mean(axis=0)
    attribute_ranks -= attribute_ranks.mean(axis=0)
    norms = np.outer(np.linalg.norm(expert_ranks, axis=0), np.linalg.norm(attribute_ranks, axis=0))
    covariance = expert_ranks.T @ attribute_ranks
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(norms > 0, covariance / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(corr, -1.0, 1.0)


def specialization_score(corr: Any) -> tuple[float, list[tuple[int, int, float]]]:
    r"""
    One-to-one matching of experts to attributes that maximises the total absolute correlation, and its mean.

    Solves the assignment problem with `scipy.optimize.linear_sum_assignment` on `-|rho|`. With more experts than
    attributes only `A` experts are matched (the others are unused); with fewer, only `K` attributes are matched.
    NaN entries count as 0.

    Args:
        corr (`array-like` of shape `(K, A)`):
            Expert x attribute correlations, e.g. from [`expert_attribute_correlation`].

    Returns:
        `tuple[float, list[tuple[int, int, float]]]`: The specialization score, the mean `|rho|` over the
        `min(K, A)` matched pairs (1.0 when every matched expert is a monotone function of its attribute), and the
        matching as `(expert, attribute, rho)` triples sorted by expert, `rho` keeping its sign (the direction the
        expert prefers).
    """
    corr = np.nan_to_num(np.asarray(corr, dtype=np.float64), nan=0.0)
    if corr.ndim != 2 or corr.size == 0:
        raise ValueError(f"`corr` must be a non-empty (K, A) matrix, got shape {corr.shape}.")
    experts, attributes = linear_sum_assignment(-np.abs(corr))
    matching = [(int(k), int(a), float(corr[k, a])) for k, a in zip(experts, attributes)]
    return float(np.mean(np.abs(corr[experts, attributes]))), matching
