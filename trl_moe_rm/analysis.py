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
Interpretability analysis of trained Mixture-of-Experts reward models.

The workflow has one expensive step, [`score_pairs`], which runs the model once over a preference dataset and stores
every quantity the metrics need in a [`PairScores`] object of NumPy arrays. Every other function is a cheap, pure
function of those arrays (and of the dataset's label columns):

- routing structure: [`routing_matrix`], [`routing_nmi`], [`routing_purity`], [`category_recovery`] and
  [`posterior_assignment`];
- expert specialization: [`expert_attribute_correlation`] (Spearman) and [`specialization_score`] (Hungarian matching
  of experts to attributes);
- expert descriptions without a language model: [`describe_experts`] (informative-Dirichlet log-odds of words and
  bigrams, simple surface features, example pairs) and [`description_accuracy`];
- steering: [`steer`] and [`steering_shift`];
- [`analysis_report`], which bundles everything into a JSON-serializable dictionary.

Notation: `n` pairs, `K` experts, `A` attributes, `Delta_k = r_k(x, y_chosen) - r_k(x, y_rejected)`.

Example:

```python
>>> from trl_moe_rm.analysis import analysis_report, score_pairs
>>> from trl_moe_rm.data import make_controlled_dataset

>>> test_set = make_controlled_dataset(num_pairs_per_category=50, seed=1)
>>> scores = score_pairs(model, tokenizer, test_set, batch_size=64)
>>> report = analysis_report(scores, test_set)
>>> report["nmi"], report["specialization"], report["description_accuracy"]
```
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.stats import rankdata
from sklearn.metrics import normalized_mutual_info_score
from transformers.utils import logging

from .data.columns import column_names as _column_names
from .data.columns import get_column as _get_column
from .data.columns import num_rows as _num_rows
from .data.columns import require_columns as _require_columns
from .data.controlled import ATTRIBUTE_MARKERS, ATTRIBUTES
from .scoring import PairScores, _as_array, score_pairs


logger = logging.get_logger(__name__)

__all__ = [
    "ExpertDescription",
    "PairScores",
    "analysis_report",
    "attribute_deltas",
    "category_recovery",
    "describe_experts",
    "description_accuracy",
    "expert_attribute_correlation",
    "log_odds_z_scores",
    "posterior_assignment",
    "routing_matrix",
    "routing_matrix_from_model",
    "routing_nmi",
    "routing_purity",
    "score_pairs",
    "specialization_score",
    "steer",
    "steering_shift",
]

REPORT_METRICS: tuple[str, ...] = (
    "accuracy",
    "conflict_accuracy",
    "nmi",
    "purity",
    "specialization",
    "description_accuracy",
    "steering",
)
"""Metrics [`analysis_report`] can compute, in the order they appear in the report."""

_WORD_RE = re.compile(r"[a-z]+")
_LIST_MARKER_RE = re.compile(r"^[ \t]*(?:[-*]|\d+\.)(?:\s|$)", re.MULTILINE)
_FEATURE_NAMES: tuple[str, ...] = ("length_words", "list_markers", "code_blocks", "question_marks")


# ----------------------------------------------------------------------------------------------------------------------
# Dataset helpers
# ----------------------------------------------------------------------------------------------------------------------


def _labels(categories: Any, num_rows: int | None, needed_by: str, column: str = "category") -> list:
    """Labels from a sequence, or from the `column` of a dataset; checks the length against `num_rows`."""
    if isinstance(categories, Mapping) or hasattr(categories, "column_names"):
        labels = _get_column(categories, column, needed_by)
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


def _response_text(response: Any) -> str:
    """The text of a standard (string) or conversational (list of messages) response."""
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence):
        return "\n".join(str(message.get("content", "")) for message in response if isinstance(message, Mapping))
    return str(response)


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
    chosen = np.asarray(_get_column(dataset, chosen_column, "attribute_deltas"), dtype=np.float64)
    rejected = np.asarray(_get_column(dataset, rejected_column, "attribute_deltas"), dtype=np.float64)
    if chosen.ndim == 1:
        chosen, rejected = chosen[:, None], rejected[:, None]
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise ValueError(
            f"`{chosen_column}` and `{rejected_column}` must hold vectors of one common length, got shapes "
            f"{chosen.shape} and {rejected.shape}."
        )
    return chosen - rejected


# ----------------------------------------------------------------------------------------------------------------------
# Routing structure
# ----------------------------------------------------------------------------------------------------------------------


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
        scores_or_routing ([`PairScores`] or `array-like` of shape `(n, K)`):
            Scores from [`score_pairs`], or routing weights directly.
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
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    category_column: str = "category",
) -> tuple[np.ndarray, list]:
    r"""
    Convenience wrapper: [`score_pairs`] followed by [`routing_matrix`] on the dataset's category column.

    Args:
        model ([`MoERewardModel`]):
            The reward model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer.
        dataset ([`~datasets.Dataset`]):
            Preference data with `prompt`, `chosen`, `rejected` and `category_column` columns.
        batch_size, max_length, device:
            As in [`score_pairs`].
        category_column (`str`, *optional*, defaults to `"category"`):
            Column holding the hidden category of each pair.

    Returns:
        `tuple[np.ndarray, list]`: As [`routing_matrix`].
    """
    _require_columns(dataset, [category_column], "routing_matrix_from_model")  # fail before the expensive pass
    scores = score_pairs(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length, device=device)
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
        scores ([`PairScores`] or `array-like` of shape `(n, K)`):
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
        scores ([`PairScores`]):
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


# ----------------------------------------------------------------------------------------------------------------------
# Expert specialization
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Expert descriptions
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ExpertDescription:
    r"""
    What one expert prefers, in words, computed from the data without a language model.

    Args:
        expert (`int`):
            Expert index.
        top_words (`list[tuple[str, float]]`):
            Words and bigrams most over-represented in the responses the expert prefers, with their log-odds z-score
            (positive), largest first.
        features (`dict[str, float]`):
            Mean difference, preferred minus not preferred, of `length_words`, `list_markers`, `code_blocks` and
            `question_marks`; `num_pairs` (pairs used) and `label_agreement` (fraction of them where the expert
            prefers the labelled chosen response, NaN when no pair is used); and `rho/<attribute>` (Spearman correlation with each attribute, over
            all pairs) when the dataset has attribute columns.
        examples (`list[dict]`):
            The pairs with the largest `|Delta_k|` (tied pairs excluded): `index`, `prompt`, `preferred`,
            `not_preferred`, `delta` and `agrees_with_label`.
        summary (`str`):
            One-line description, templated (e.g. `"prefers: furthermore, moreover, regards; longer (+42 words)"`) or
            produced by the `describe_fn` of [`describe_experts`].
        bottom_words (`list[tuple[str, float]]`):
            Words and bigrams most over-represented in the responses the expert does not prefer (negative z-scores),
            most negative first.
    """

    expert: int
    top_words: list[tuple[str, float]]
    features: dict[str, float]
    examples: list[dict]
    summary: str = ""
    bottom_words: list[tuple[str, float]] = field(default_factory=list)


def _ngrams(text: str, max_n: int) -> list[str]:
    words = _WORD_RE.findall(text.lower())
    grams = list(words)
    for n in range(2, max_n + 1):
        grams.extend(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return grams


def _count_matrix(texts: Sequence[str], max_n: int) -> tuple[sparse.csr_matrix, list[str]]:
    """Sparse `(len(texts), V)` n-gram count matrix and its vocabulary."""
    vocabulary: dict[str, int] = {}
    indptr, indices = [0], []
    for text in texts:
        for gram in _ngrams(text, max_n):
            indices.append(vocabulary.setdefault(gram, len(vocabulary)))
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float64)
    matrix = sparse.csr_matrix(
        (data, np.array(indices, dtype=np.int64), np.array(indptr)), (len(texts), len(vocabulary))
    )
    matrix.sum_duplicates()
    return matrix, list(vocabulary)


def log_odds_z_scores(counts: np.ndarray, other_counts: np.ndarray, prior: np.ndarray) -> np.ndarray:
    r"""
    Log-odds ratios with an informative Dirichlet prior, as z-scores (Monroe, Colaresi & Quinn, 2008, "Fightin' Words").

    For word `w` with counts `y_w` in group 1 (total `n`) and `y'_w` in group 2 (total `n'`) and prior pseudo-counts
    `alpha_w` (total `alpha_0`):

    `delta_w = log((y_w + alpha_w) / (n + alpha_0 - y_w - alpha_w)) - log((y'_w + alpha_w) / (n' + alpha_0 - y'_w - alpha_w))`,
    `var(delta_w) ~ 1 / (y_w + alpha_w) + 1 / (y'_w + alpha_w)` and `z_w = delta_w / sqrt(var(delta_w))`.

    Args:
        counts (`np.ndarray` of shape `(V,)`):
            Counts of each word in group 1.
        other_counts (`np.ndarray` of shape `(V,)`):
            Counts in group 2.
        prior (`np.ndarray` of shape `(V,)`):
            Positive prior pseudo-counts, typically the counts of the whole corpus.

    Returns:
        `np.ndarray` of shape `(V,)`: Positive where the word is over-represented in group 1.
    """
    counts, other_counts, prior = (np.asarray(x, dtype=np.float64) for x in (counts, other_counts, prior))
    if (prior <= 0).any():
        raise ValueError("The Dirichlet prior pseudo-counts must all be positive.")
    total, other_total, prior_total = counts.sum(), other_counts.sum(), prior.sum()
    log_odds = np.log(counts + prior) - np.log(total + prior_total - counts - prior)
    other_log_odds = np.log(other_counts + prior) - np.log(other_total + prior_total - other_counts - prior)
    variance = 1.0 / (counts + prior) + 1.0 / (other_counts + prior)
    return (log_odds - other_log_odds) / np.sqrt(variance)


def _surface_features(texts: Sequence[str]) -> np.ndarray:
    """`(len(texts), 4)` array of [`_FEATURE_NAMES`] per text."""
    rows = []
    for text in texts:
        fences = text.count("```")
        rows.append(
            (
                len(_WORD_RE.findall(text.lower())),
                len(_LIST_MARKER_RE.findall(text)),
                math.ceil(fences / 2),
                text.count("?"),
            )
        )
    return np.array(rows, dtype=np.float64).reshape(len(texts), len(_FEATURE_NAMES))


def _template_summary(description: ExpertDescription, mean_length: float) -> str:
    parts = []
    if description.top_words:
        parts.append("prefers: " + ", ".join(word for word, _ in description.top_words[:3]))
    if description.bottom_words:
        parts.append("avoids: " + ", ".join(word for word, _ in description.bottom_words[:3]))
    length = description.features.get("length_words", 0.0)
    if abs(length) >= max(1.0, 0.1 * mean_length):
        parts.append(f"{'longer' if length > 0 else 'shorter'} ({length:+.0f} words)")
    for name, label in (
        ("list_markers", "list items"),
        ("code_blocks", "code blocks"),
        ("question_marks", "questions"),
    ):
        value = description.features.get(name, 0.0)
        if abs(value) >= 0.5:
            parts.append(f"{'more' if value > 0 else 'fewer'} {label} ({value:+.1f})")
    if not parts:
        return "no clear preference" if description.features.get("num_pairs", 0) else "no preference (all pairs tied)"
    return "; ".join(parts)


def describe_experts(
    scores: PairScores,
    dataset: Any,
    top_n_words: int = 10,
    top_n_pairs: int = 3,
    describe_fn: Callable[[ExpertDescription], str] | None = None,
    attribute_names: Sequence[str] | None = None,
    max_ngram: int = 2,
) -> list[ExpertDescription]:
    r"""
    Describes what every expert prefers, from the responses it ranks first, without a language model.

    For expert `k`, each pair with `Delta_k != 0` and `|Delta_k|` at least the median of the non-zero `|Delta_k|` (the
    top half, for a cleaner signal) contributes its response with the higher `r_k` to the "preferred" group and the
    other response to the "not preferred" group. Responses are lower-cased and split with the regex `[a-z]+`; words
    and bigrams (up to `max_ngram`-grams) are ranked by the z-score of their log-odds ratio between the two groups with
    an informative Dirichlet prior whose pseudo-counts are the n-gram counts of all responses of the dataset (Monroe,
    Colaresi & Quinn, 2008; see [`log_odds_z_scores`]). Surface features compare the two groups: length in words,
    list markers (lines starting with `-`, `*` or `<digits>.`), fenced code blocks and question marks.

    Args:
        scores ([`PairScores`]):
            Scores of the dataset's pairs, in dataset order.
        dataset ([`~datasets.Dataset`] or `Mapping[str, Sequence]`):
            The scored dataset, with `chosen` and `rejected` (text or conversational) and optionally `prompt`,
            `chosen_attributes` and `rejected_attributes` columns.
        top_n_words (`int`, *optional*, defaults to `10`):
            Number of n-grams kept in `top_words` and `bottom_words`.
        top_n_pairs (`int`, *optional*, defaults to `3`):
            Number of example pairs kept per expert.
        describe_fn (`Callable[[ExpertDescription], str]`, *optional*):
            Called with each finished description (templated `summary` included); its return value replaces the
            summary. Use it to plug in an LLM.
        attribute_names (`Sequence[str]`, *optional*):
            Names of the attribute vector entries, for the `rho/<name>` features. Defaults to [`ATTRIBUTES`] when the
            vectors have that length, else `attribute_0`, `attribute_1`, ... Ignored without attribute columns.
        max_ngram (`int`, *optional*, defaults to `2`):
            Longest n-gram considered.

    Returns:
        `list[ExpertDescription]`: One description per expert, in expert order.
    """
    _require_columns(dataset, ["chosen", "rejected"], "describe_experts")
    num_pairs = len(scores)
    if _num_rows(dataset) != num_pairs:
        raise ValueError(
            f"describe_experts got scores of {num_pairs} pairs for a dataset of {_num_rows(dataset)} rows."
        )
    if top_n_words < 1 or top_n_pairs < 0 or max_ngram < 1:
        raise ValueError("`top_n_words` and `max_ngram` must be >= 1 and `top_n_pairs` >= 0.")
    chosen = [_response_text(x) for x in dataset["chosen"]]
    rejected = [_response_text(x) for x in dataset["rejected"]]
    columns = _column_names(dataset)
    prompts = [_response_text(x) for x in dataset["prompt"]] if "prompt" in columns else [None] * num_pairs

    counts, vocabulary = _count_matrix(chosen + rejected, max_ngram)
    chosen_counts, rejected_counts = counts[:num_pairs], counts[num_pairs:]
    prior = np.asarray(counts.sum(axis=0)).ravel()
    features = _surface_features(chosen + rejected)
    feature_deltas = features[:num_pairs] - features[num_pairs:]
    mean_length = float(features[:, 0].mean())

    correlations, names = None, None
    if "chosen_attributes" in columns and "rejected_attributes" in columns:
        deltas = attribute_deltas(dataset)
        if attribute_names is not None and len(attribute_names) != deltas.shape[1]:
            raise ValueError(f"Got {len(attribute_names)} attribute names for {deltas.shape[1]} attributes.")
        names = list(attribute_names or (ATTRIBUTES if deltas.shape[1] == len(ATTRIBUTES) else []))
        names = names or [f"attribute_{a}" for a in range(deltas.shape[1])]
        correlations = expert_attribute_correlation(scores.expert_deltas, deltas) if num_pairs > 1 else None

    descriptions = []
    for expert in range(scores.num_experts):
        delta = scores.expert_deltas[:, expert]
        nonzero = np.flatnonzero(delta != 0)
        selected = nonzero[np.abs(delta[nonzero]) >= np.median(np.abs(delta[nonzero]))] if nonzero.size else nonzero
        sign = np.sign(delta[selected])
        prefers_chosen = selected[sign > 0]
        prefers_rejected = selected[sign < 0]
        expert_features = {name: 0.0 for name in _FEATURE_NAMES}
        top_words: list[tuple[str, float]] = []
        bottom_words: list[tuple[str, float]] = []
        if selected.size:
            preferred = np.asarray(
                chosen_counts[prefers_chosen].sum(axis=0) + rejected_counts[prefers_rejected].sum(axis=0)
            ).ravel()
            other = np.asarray(
                rejected_counts[prefers_chosen].sum(axis=0) + chosen_counts[prefers_rejected].sum(axis=0)
            ).ravel()
            z = log_odds_z_scores(preferred, other, prior)
            ranking = np.argsort(-z, kind="stable")
            top_words = [(vocabulary[i], float(z[i])) for i in ranking[:top_n_words] if z[i] > 0]
            bottom_words = [(vocabulary[i], float(z[i])) for i in ranking[::-1][:top_n_words] if z[i] < 0]
            mean_deltas = (sign[:, None] * feature_deltas[selected]).mean(axis=0)
            expert_features = {name: float(value) for name, value in zip(_FEATURE_NAMES, mean_deltas)}
        expert_features["num_pairs"] = float(selected.size)
        expert_features["label_agreement"] = float(np.mean(sign > 0)) if selected.size else float("nan")
        if correlations is not None:
            for a, name in enumerate(names):
                expert_features[f"rho/{name}"] = float(correlations[expert, a])

        examples = []
        for row in nonzero[np.argsort(-np.abs(delta[nonzero]), kind="stable")][:top_n_pairs]:
            first = delta[row] > 0
            examples.append(
                {
                    "index": int(row),
                    "prompt": prompts[row],
                    "preferred": chosen[row] if first else rejected[row],
                    "not_preferred": rejected[row] if first else chosen[row],
                    "delta": float(delta[row]),
                    "agrees_with_label": bool(delta[row] > 0),
                }
            )
        description = ExpertDescription(
            expert=expert, top_words=top_words, features=expert_features, examples=examples, bottom_words=bottom_words
        )
        description.summary = _template_summary(description, mean_length)
        if describe_fn is not None:
            summary = describe_fn(description)
            if not isinstance(summary, str):
                raise TypeError(f"`describe_fn` must return a string, got {type(summary).__name__}.")
            description.summary = summary
        descriptions.append(description)
    return descriptions


def _attribute_position(attribute: int | str, attributes: Sequence[str]) -> int:
    if isinstance(attribute, str):
        if attribute not in attributes:
            raise ValueError(f"Unknown attribute {attribute!r}; expected one of {list(attributes)}.")
        return list(attributes).index(attribute)
    if not 0 <= int(attribute) < len(attributes):
        raise ValueError(f"Attribute index {attribute} is out of range for attributes {list(attributes)}.")
    return int(attribute)


def description_accuracy(
    descriptions: Sequence[ExpertDescription],
    matching: Sequence[tuple[int, int | str, float]],
    markers: Mapping[str, Mapping[int, Sequence[str]]] = ATTRIBUTE_MARKERS,
    attributes: Sequence[str] = ATTRIBUTES,
    top_n: int = 10,
) -> float:
    r"""
    Fraction of matched experts whose description names the attribute they were matched to, in the right direction.

    For each `(expert, attribute, rho)` of `matching` (from [`specialization_score`]), the expert prefers attribute
    value `+1` when `rho > 0` and `-1` when `rho < 0` (`rho == 0` is a miss). The description is a hit when at least one
    planted marker word `markers[attribute][direction]` is among the first `top_n` entries of its `top_words` (a bigram
    entry counts when one of its words is a marker). For the `length` attribute, a `length_words` feature whose sign
    equals the direction is also a hit.

    Args:
        descriptions (`Sequence[ExpertDescription]`):
            Output of [`describe_experts`].
        matching (`Sequence[tuple[int, int | str, float]]`):
            `(expert, attribute index or name, rho)` triples.
        markers (`Mapping[str, Mapping[int, Sequence[str]]]`, *optional*, defaults to [`ATTRIBUTE_MARKERS`]):
            Marker words per attribute name and value.
        attributes (`Sequence[str]`, *optional*, defaults to [`ATTRIBUTES`]):
            Attribute names, indexed by the attribute indices of `matching`.
        top_n (`int`, *optional*, defaults to `10`):
            Number of top words searched.

    Returns:
        `float`: Accuracy in `[0, 1]`.
    """
    if not matching:
        raise ValueError("`matching` is empty; compute it with `specialization_score`.")
    by_expert = {description.expert: description for description in descriptions}
    hits = 0
    for expert, attribute, rho in matching:
        if int(expert) not in by_expert:
            raise ValueError(f"No description for expert {expert}; describe every matched expert.")
        description = by_expert[int(expert)]
        name = attributes[_attribute_position(attribute, attributes)]
        if name not in markers:
            raise ValueError(f"No marker words for attribute {name!r}; `markers` has {list(markers)}.")
        if rho == 0 or not np.isfinite(rho):
            continue
        direction = 1 if rho > 0 else -1
        planted = set(markers[name][direction])
        named = any(planted.intersection(word.split()) for word, _ in description.top_words[:top_n])
        if name == "length" and np.sign(description.features.get("length_words", 0.0)) == direction:
            named = True
        hits += int(named)
    return hits / len(matching)


# ----------------------------------------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------------------------------------


def steer(scores: PairScores, weights: Any) -> np.ndarray:
    r"""
    Reward margins of the pairs under hand-set mixture weights instead of the router's.

    The steered reward is the static mixture `r_w(x, y) = sum_k w_k r_k(x, y)`; this returns
    `r_w(x, y_chosen) - r_w(x, y_rejected) = sum_k w_k Delta_k` for every pair (positive: the steered model prefers the
    chosen response).

    Args:
        scores ([`PairScores`]):
            Scores of the pairs.
        weights (`array-like` of shape `(K,)` or `(n, K)`):
            Mixture weights, shared by all pairs or one vector per pair. They are used as given (not normalised).

    Returns:
        `np.ndarray` of shape `(n,)`: Steered reward margins.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape not in ((scores.num_experts,), (len(scores), scores.num_experts)):
        raise ValueError(
            f"`weights` must have shape ({scores.num_experts},) or ({len(scores)}, {scores.num_experts}), got "
            f"{weights.shape}."
        )
    return (scores.expert_deltas * weights).sum(axis=-1)


def _preference_rate(margins: np.ndarray, target: np.ndarray) -> float:
    """Fraction of pairs whose margin has the target sign; ties count one half."""
    agreement = np.sign(margins) * target
    return float(np.mean(np.where(agreement > 0, 1.0, np.where(agreement == 0, 0.5, 0.0))))


def steering_shift(
    scores: PairScores, attribute_deltas: Any, expert: int, attribute_index: int, direction: int | None = None
) -> float:
    r"""
    How much steering all the weight onto one expert moves the preferences along one attribute.

    Only pairs whose two responses differ on the attribute (`attribute_deltas[:, attribute_index] != 0`) are used; call
    it on held-out pairs. The target response of a pair is the one with the higher value of `direction * attribute`.
    With the one-hot weights `w = e_expert` ([`steer`]), let `P_steered` be the fraction of those pairs whose steered
    margin prefers the target response, and `P_default` the same fraction for the model's own routed reward
    (`chosen_rewards - rejected_rewards`); a zero margin counts one half. The shift is `P_steered - P_default`, in
    `[-1, 1]`: positive when steering toward the expert moves preferences in the direction it stands for.

    Args:
        scores ([`PairScores`]):
            Scores of (held-out) pairs.
        attribute_deltas (`array-like` of shape `(n, A)` or `(n,)`):
            Attribute differences, chosen minus rejected (e.g. from [`attribute_deltas`]).
        expert (`int`):
            Expert receiving all the weight.
        attribute_index (`int`):
            Column of `attribute_deltas` (ignored for a 1-D array).
        direction (`int`, *optional*):
            `+1` or `-1`: the attribute direction the expert stands for, usually the sign of its matched `rho` from
            [`specialization_score`]. Defaults to the sign of the Spearman correlation between `Delta_expert` and the
            attribute over the used pairs (`+1` when it is 0).

    Returns:
        `float`: `P_steered - P_default`.
    """
    deltas = np.asarray(attribute_deltas, dtype=np.float64)
    column = deltas if deltas.ndim == 1 else deltas[:, attribute_index]
    if column.shape != (len(scores),):
        raise ValueError(f"`attribute_deltas` has {column.shape[0]} rows for {len(scores)} scored pairs.")
    if not 0 <= expert < scores.num_experts:
        raise ValueError(f"`expert` must be in [0, {scores.num_experts}), got {expert}.")
    used = column != 0
    if not used.any():
        raise ValueError(f"No pair differs on attribute {attribute_index}; steering along it cannot be measured.")
    if direction is None:
        if used.sum() > 1:
            rho = expert_attribute_correlation(scores.expert_deltas[used][:, [expert]], column[used])[0, 0]
        else:
            rho = float(np.sign(scores.expert_deltas[used, expert][0] * column[used][0]))
        direction = -1 if rho < 0 else 1
    if direction not in (1, -1):
        raise ValueError(f"`direction` must be +1 or -1, got {direction!r}.")
    target = direction * np.sign(column[used])
    one_hot = np.zeros(scores.num_experts)
    one_hot[expert] = 1.0
    steered = _preference_rate(steer(scores, one_hot)[used], target)
    default = _preference_rate(scores.reward_deltas[used], target)
    return steered - default


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------

_METRIC_COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "accuracy": ("accuracy", ()),
    "conflict_accuracy": ("conflict_accuracy", ("conflict",)),
    "nmi": ("routing_nmi", ("category",)),
    "purity": ("routing_purity", ("category",)),
    "specialization": ("specialization_score", ("chosen_attributes", "rejected_attributes")),
    "description_accuracy": (
        "description_accuracy",
        ("chosen", "rejected", "chosen_attributes", "rejected_attributes"),
    ),
    "steering": ("steering_shift", ("chosen_attributes", "rejected_attributes")),
}


def analysis_report(
    scores: PairScores,
    dataset: Any,
    metrics: Sequence[str] | None = None,
    attribute_names: Sequence[str] | None = None,
    markers: Mapping[str, Mapping[int, Sequence[str]]] = ATTRIBUTE_MARKERS,
    top_n_words: int = 10,
    describe_fn: Callable[[ExpertDescription], str] | None = None,
    category_column: str = "category",
) -> dict[str, Any]:
    r"""
    All the analysis metrics of one scored dataset, as a JSON-serializable dictionary.

    Keys (present when their metric is computed):

    - `num_pairs`, `num_experts`, `expert_load` (mean routing weight of each expert);
    - `accuracy`: pairwise accuracy of the routed reward;
    - `conflict_accuracy`, `num_conflict_pairs`: accuracy on the rows with `conflict=True` (`None` when there are none);
    - `nmi`, `purity`: [`routing_nmi`] / [`routing_purity`] of the top-1 routed expert against the category column;
      `posterior_nmi`, `posterior_purity`: the same for [`posterior_assignment`]; `routing_matrix`
      (`{"categories": [...], "matrix": [[...]]}`, see [`routing_matrix`]);
    - `specialization`, `matching` (list of `{"expert", "attribute", "rho"}`), `expert_attribute_correlation`
      (`(K, A)` nested list): see [`specialization_score`];
    - `description_accuracy` and `descriptions` (expert index as a string -> summary): see [`describe_experts`];
    - `steering`: for each matched expert, `{"expert", "attribute", "rho", "shift"}` with the [`steering_shift`] along
      its attribute, oriented by the sign of its `rho`. Pass held-out pairs for an honest steering evaluation.

    Args:
        scores ([`PairScores`]):
            Scores of `dataset`, from [`score_pairs`].
        dataset ([`~datasets.Dataset`] or `Mapping[str, Sequence]`):
            The scored dataset with its label columns (e.g. from [`~trl_moe_rm.data.make_controlled_dataset`]).
        metrics (`Sequence[str]`, *optional*):
            Metrics to compute, among [`REPORT_METRICS`]. Defaults to all of them; `conflict_accuracy` is then skipped
            silently when the dataset has no `conflict` column. Any other metric whose columns are missing raises a
            `ValueError` naming the column.
        attribute_names (`Sequence[str]`, *optional*):
            Names of the attribute vector entries. Defaults to [`ATTRIBUTES`].
        markers (`Mapping[str, Mapping[int, Sequence[str]]]`, *optional*, defaults to [`ATTRIBUTE_MARKERS`]):
            Planted marker words, for `description_accuracy`.
        top_n_words (`int`, *optional*, defaults to `10`):
            Number of top words per expert description.
        describe_fn (`Callable[[ExpertDescription], str]`, *optional*):
            Summary override, see [`describe_experts`].
        category_column (`str`, *optional*, defaults to `"category"`):
            Column with the hidden category of each pair.

    Returns:
        `dict[str, Any]`: The report.
    """
    explicit = metrics is not None
    requested = list(REPORT_METRICS if metrics is None else metrics)
    unknown = [metric for metric in requested if metric not in REPORT_METRICS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; choose from {list(REPORT_METRICS)}.")
    num_pairs = len(scores)
    if _num_rows(dataset) != num_pairs:
        raise ValueError(
            f"analysis_report got scores of {num_pairs} pairs for a dataset of {_num_rows(dataset)} rows."
        )
    columns = _column_names(dataset)
    if not explicit and "conflict" not in columns:
        requested.remove("conflict_accuracy")
    for metric in requested:  # check every requirement before computing anything
        needed_by, needed = _METRIC_COLUMNS[metric]
        needed = tuple(category_column if column == "category" else column for column in needed)
        _require_columns(dataset, needed, needed_by)

    report: dict[str, Any] = {
        "num_pairs": num_pairs,
        "num_experts": scores.num_experts,
        "expert_load": scores.routing_weights.mean(axis=0).tolist(),
    }
    if "accuracy" in requested:
        report["accuracy"] = scores.accuracy
    if "conflict_accuracy" in requested:
        conflict = np.asarray(_get_column(dataset, "conflict", "conflict_accuracy"), dtype=bool)
        report["num_conflict_pairs"] = int(conflict.sum())
        report["conflict_accuracy"] = scores.select(conflict).accuracy if conflict.any() else None
    if "nmi" in requested or "purity" in requested:
        categories = _get_column(dataset, category_column, "routing_nmi")
        top1, posterior = scores.top1_experts, posterior_assignment(scores)
        if "nmi" in requested:
            report["nmi"] = routing_nmi(top1, categories)
            report["posterior_nmi"] = routing_nmi(posterior, categories)
        if "purity" in requested:
            report["purity"] = routing_purity(top1, categories)
            report["posterior_purity"] = routing_purity(posterior, categories)
        matrix, names = routing_matrix(scores, categories)
        report["routing_matrix"] = {"categories": [str(name) for name in names], "matrix": matrix.tolist()}
    if {"specialization", "description_accuracy", "steering"} & set(requested):
        deltas = attribute_deltas(dataset)
        names = list(attribute_names) if attribute_names is not None else list(ATTRIBUTES)
        if len(names) != deltas.shape[1]:
            raise ValueError(
                f"The attribute vectors have {deltas.shape[1]} entries but there are {len(names)} attribute names "
                f"({names}); pass `attribute_names`."
            )
        corr = expert_attribute_correlation(scores.expert_deltas, deltas)
        specialization, matching = specialization_score(corr)
        if "specialization" in requested:
            report["specialization"] = specialization
            report["matching"] = [{"expert": k, "attribute": names[a], "rho": rho} for k, a, rho in matching]
            report["expert_attribute_correlation"] = corr.tolist()
        if "description_accuracy" in requested:
            descriptions = describe_experts(
                scores, dataset, top_n_words=top_n_words, describe_fn=describe_fn, attribute_names=names
            )
            report["description_accuracy"] = description_accuracy(
                descriptions, matching, markers=markers, attributes=names, top_n=top_n_words
            )
            report["descriptions"] = {str(d.expert): d.summary for d in descriptions}
        if "steering" in requested:
            report["steering"] = [
                {
                    "expert": k,
                    "attribute": names[a],
                    "rho": rho,
                    "shift": steering_shift(scores, deltas, k, a, direction=-1 if rho < 0 else 1)
                    if (deltas[:, a] != 0).any()
                    else None,
                }
                for k, a, rho in matching
            ]
    return report
