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
Routing structure of a Mixture-of-Experts reward model: which expert each pair goes to, and how well that recovers the
hidden categories of the data.

- [`routing_matrix`] (and [`routing_matrix_from_model`]): the category x expert matrix of mean routing weights;
- [`routing_nmi`], [`routing_purity`] and [`category_recovery`]: agreement of an expert assignment with the categories;
- [`posterior_assignment`]: the expert that best explains each labelled pair, for hidden-context data.

Every function is a cheap, pure function of a [`~trl_moe_rm.scoring.PairScores`] (or plain arrays) and of the
category labels. Notation: `n` pairs, `K` experts, `Delta_k = r_k(x, y_chosen) - r_k(x, y_rejected)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from .data.columns import get_column, require_columns
from .scoring import PairScores, _as_array, score_pairs


__all__ = [
    "prompt_clusters",
    "category_recovery",
    "posterior_assignment",
    "routing_matrix",
    "routing_matrix_from_model",
    "routing_nmi",
    "routing_purity",
]


def _labels(categories: Any, num_rows: int | None, needed_by: str, column: str = "category") -> list:
    """Labels from a sequence, or from the `column` of a dataset; checks the length against `num_rows`."""
    if isinstance(categories, Mapping) or hasattr(categories, "column_names"):
        labels = get_column(categories, column, needed_by)
    elif isinstance(categories, (str, bytes)) or not hasattr(categories, "__iter__"):
        raise ValueError(f"{needed_by}: `categories` must be a sequence of labels, got {categories!r}.")
    else:
        labels = categories.tolist() if isinstance(categories, np.ndarray) else list(categories)
    if num_rows is not None and len(labels) != num_rows:
        raise ValueError(f"{needed_by}: got {len(labels)} category labels for {num_rows} pairs.")
    if not labels:
        raise ValueError(f"{needed_by}: got no category labels; at least one pair is needed.")
    if any(isinstance(label, list) for label in labels):
        raise ValueError(f"{needed_by}: `categories` must be one-dimensional (one label per pair).")
    return labels


def _encode(labels: Sequence) -> tuple[np.ndarray, list]:
    """Integer codes of hashable labels and the sorted (or first-seen, if unsortable) label names."""
    unique = list(dict.fromkeys(labels))
    try:
        unique = sorted(unique)
    except TypeError:
        pass
    index = {label: position for position, label in enumerate(unique)}
    return np.array([index[label] for label in labels], dtype=np.int64), unique


def _routing_array(scores_or_routing: PairScores | Any) -> np.ndarray:
    if isinstance(scores_or_routing, PairScores):
        return scores_or_routing.routing_weights
    routing = _as_array(scores_or_routing, "routing_weights", 2)
    if routing.shape[0] == 0:
        raise ValueError("`routing_weights` must contain at least one pair.")
    return routing


def routing_matrix(
    scores_or_routing: PairScores | Any, categories: Any, category_column: str = "category"
) -> tuple[np.ndarray, list]:
    r"""
    Category x expert matrix of mean routing weights.

    Args:
        scores_or_routing ([`~trl_moe_rm.scoring.PairScores`] or `array-like` of shape `(n, K)`):
            Scores from [`~trl_moe_rm.scoring.score_pairs`], or routing weights directly.
        categories (`Sequence` or [`~datasets.Dataset`]):
            One hidden category label per pair, or the scored dataset (its `category_column` is used).
        category_column (`str`, *optional*, defaults to `"category"`):
            Column read when `categories` is a dataset.

    Returns:
        `tuple[np.ndarray, list]`: The `(C, K)` matrix whose row `c` is the mean routing weight vector of the pairs of
        category `c` (rows sum to 1 for simplex routing), and the `C` category names (sorted), in row order.
    """
    routing = _routing_array(scores_or_routing)
    labels = _labels(categories, routing.shape[0], "routing_matrix", category_column)
    codes, names = _encode(labels)
    matrix = np.zeros((len(names), routing.shape[1]))
    np.add.at(matrix, codes, routing)
    matrix /= np.bincount(codes, minlength=len(names))[:, None]
    return matrix, names


def routing_matrix_from_model(
    model: torch.nn.Module, tokenizer: Any, dataset: Any, category_column: str = "category", **score_kwargs: Any
) -> tuple[np.ndarray, list]:
    r"""
    Convenience wrapper: [`~trl_moe_rm.scoring.score_pairs`] followed by [`routing_matrix`] on the dataset's category
    column.

    Args:
        model ([`MoERewardModel`]):
            The reward model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        dataset ([`~datasets.Dataset`]):
            Preference data with `prompt`, `chosen`, `rejected` and `category_column` columns.
        category_column (`str`, *optional*, defaults to `"category"`):
            Column holding the hidden category of each pair.
        **score_kwargs:
            Passed to [`~trl_moe_rm.scoring.score_pairs`]: `batch_size`, `max_length`, `device`.

    Returns:
        `tuple[np.ndarray, list]`: As [`routing_matrix`].
    """
    require_columns(dataset, [category_column], "routing_matrix_from_model")  # fail before the expensive pass
    scores = score_pairs(model, tokenizer, dataset, **score_kwargs)
    return routing_matrix(scores, dataset, category_column=category_column)


def _assignment_and_labels(assignment: Any, categories: Any, needed_by: str) -> tuple[np.ndarray, np.ndarray]:
    assigned = np.asarray(assignment)
    if assigned.ndim != 1 or assigned.size == 0:
        raise ValueError(
            f"{needed_by}: the expert assignment must be a non-empty 1-D array, got shape {assigned.shape}."
        )
    labels = _labels(categories, assigned.size, needed_by)
    return assigned, _encode(labels)[0]


def routing_nmi(top1_experts: Any, categories: Any) -> float:
    r"""
    Normalized mutual information between the expert assignment and the hidden categories.

    Uses `sklearn.metrics.normalized_mutual_info_score` (arithmetic normalization). It is invariant to permutations of
    the expert indices, 1.0 for a perfect recovery (one expert per category, or any relabelling of it) and about 0 for
    an assignment independent of the categories.

    Args:
        top1_experts (`array-like` of shape `(n,)`):
            Expert assigned to each pair (e.g. `scores.top1_experts` or [`posterior_assignment`]).
        categories (`Sequence` or [`~datasets.Dataset`]):
            Hidden category of each pair, or a dataset with a `category` column.

    Returns:
        `float`: NMI in `[0, 1]`.
    """
    assigned, codes = _assignment_and_labels(top1_experts, categories, "routing_nmi")
    return float(normalized_mutual_info_score(codes, assigned))


def routing_purity(top1_experts: Any, categories: Any) -> float:
    r"""
    Cluster purity of the expert assignment with respect to the hidden categories.

    Each expert is labelled with the majority category of the pairs assigned to it; the purity is the fraction of pairs
    whose category equals their expert's majority category, `sum_k max_c n_kc / n` (ties between majority categories
    do not change the value). It is 1.0 when no expert mixes categories; note that it does not penalise splitting one
    category over several experts (NMI does).

    Args:
        top1_experts (`array-like` of shape `(n,)`):
            Expert assigned to each pair.
        categories (`Sequence` or [`~datasets.Dataset`]):
            Hidden category of each pair, or a dataset with a `category` column.

    Returns:
        `float`: Purity in `(0, 1]`.
    """
    assigned, codes = _assignment_and_labels(top1_experts, categories, "routing_purity")
    expert_codes = _encode(assigned.tolist())[0]
    contingency = np.zeros((expert_codes.max() + 1, codes.max() + 1), dtype=np.int64)
    np.add.at(contingency, (expert_codes, codes), 1)
    return float(contingency.max(axis=1).sum() / assigned.size)


def category_recovery(scores: PairScores | Any, categories: Any) -> dict[str, float]:
    r"""
    How well the router recovers the hidden categories: NMI and purity of the top-1 routed expert of each pair.

    Args:
        scores ([`~trl_moe_rm.scoring.PairScores`] or `array-like` of shape `(n, K)`):
            Scores (their `routing_weights` are used) or routing weights.
        categories (`Sequence` or [`~datasets.Dataset`]):
            Hidden category of each pair, or a dataset with a `category` column.

    Returns:
        `dict[str, float]`: `{"nmi": ..., "purity": ...}`.
    """
    top1 = _routing_array(scores).argmax(axis=1)
    return {"nmi": routing_nmi(top1, categories), "purity": routing_purity(top1, categories)}


def posterior_assignment(scores: PairScores, use_router_prior: bool = False) -> np.ndarray:
    r"""
    The expert that best explains each labelled pair, for hidden-context data where the router cannot see the context.

    Each expert's likelihood of the observed label is `sigma(Delta_k)`; the assignment is
    `argmax_k log sigma(Delta_k)` (equivalently `argmax_k Delta_k`), or, with `use_router_prior=True`, the maximum a
    posteriori expert `argmax_k [log p_k(x) + log sigma(Delta_k)]` with the router probabilities as the prior.

    Args:
        scores ([`~trl_moe_rm.scoring.PairScores`]):
            Scores of labelled pairs.
        use_router_prior (`bool`, *optional*, defaults to `False`):
            Whether to weight the likelihoods by the dense router probabilities.

    Returns:
        `np.ndarray` of shape `(n,)`: Integer expert index per pair.
    """
    log_likelihood = -np.logaddexp(0.0, -scores.expert_deltas)
    if use_router_prior:
        log_likelihood = log_likelihood + np.log(np.clip(scores.router_probs, 1e-300, None))
    return log_likelihood.argmax(axis=1)


def prompt_clusters(prompts: Sequence[Any], num_clusters: int, seed: int = 0) -> list[str]:
    r"""
    Cluster labels of prompts, for a routing heatmap on data without a category column: k-means on the TF-IDF vectors
    of the prompts' words and bigrams (chat prompts are read as their messages' text).

    Args:
        prompts (`Sequence[str | list[dict]]`):
            One prompt per pair.
        num_clusters (`int`):
            Number of clusters; fewer when there are fewer distinct prompts.
        seed (`int`, *optional*, defaults to `0`):
            Seed of k-means.

    Returns:
        `list[str]`: `"cluster_<i>"` for each prompt.
    """
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [
        prompt if isinstance(prompt, str) else " ".join(str(m.get("content", "")) for m in prompt or [])
        for prompt in prompts
    ]
    count = max(1, min(int(num_clusters), len(set(texts))))
    if count == 1:
        return ["cluster_0"] * len(texts)
    vectors = TfidfVectorizer(ngram_range=(1, 2), min_df=1).fit_transform(texts)
    labels = KMeans(n_clusters=count, n_init=10, random_state=seed).fit_predict(vectors)
    return [f"cluster_{label}" for label in labels]
