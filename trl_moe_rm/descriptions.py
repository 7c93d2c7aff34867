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
Expert descriptions without a language model: what each expert prefers, in words, computed from the data.

- [`describe_experts`]: informative-Dirichlet log-odds of words and bigrams ([`log_odds_z_scores`]), simple surface
  features ([`surface_features`]) and example pairs, summarised in an [`ExpertDescription`];
- [`description_accuracy`]: how often those descriptions name the marker words planted for the attribute each expert
  is matched to (for data with known markers, e.g. the controlled data's `ATTRIBUTE_MARKERS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from .data.columns import column_names, num_rows, require_columns
from .scoring import PairScores
from .specialization import attribute_deltas, expert_attribute_correlation


__all__ = [
    "ExpertDescription",
    "SURFACE_FEATURES",
    "describe_experts",
    "description_accuracy",
    "log_odds_z_scores",
    "surface_features",
]

SURFACE_FEATURES: tuple[str, ...] = ("length_words", "list_markers", "code_blocks", "question_marks")
"""Names of the columns of [`surface_features`], in order."""

_WORD_RE = re.compile(r"[a-z]+")
_LIST_MARKER_RE = re.compile(r"^[ \t]*(?:[-*\u2022]|\d+[.)])(?:\s|$)", re.MULTILINE)


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


def _response_text(response: Any) -> str:
    """The text of a standard (string) or conversational (list of messages) response."""
    if isinstance(response, str):
        return response
    if isinstance(response, Sequence):
        return "\n".join(str(message.get("content", "")) for message in response if isinstance(message, Mapping))
    return str(response)


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


def surface_features(texts: Sequence[str]) -> np.ndarray:
    r"""
    Simple surface features of texts: length in words (`[a-z]+` after lower-casing), list markers (lines starting with
    `-`, `*`, `•`, `<digits>.` or `<digits>)`), fenced code blocks (pairs of ```` ``` ````, rounded up) and question
    marks.

    Args:
        texts (`Sequence[str]`):
            The texts, e.g. responses.

    Returns:
        `np.ndarray` of shape `(len(texts), 4)`: float64 features, columns in the order of [`SURFACE_FEATURES`].
    """
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
    return np.array(rows, dtype=np.float64).reshape(len(texts), len(SURFACE_FEATURES))


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
    list markers, fenced code blocks and question marks ([`surface_features`]).

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
            Names of the attribute vector entries, for the `rho/<name>` features (e.g. `trl_moe_rm.data.ATTRIBUTES` for
            the controlled data). Defaults to `attribute_0`, `attribute_1`, ... Ignored without attribute columns.
        max_ngram (`int`, *optional*, defaults to `2`):
            Longest n-gram considered.

    Returns:
        `list[ExpertDescription]`: One description per expert, in expert order.
    """
    require_columns(dataset, ["chosen", "rejected"], "describe_experts")
    num_pairs = len(scores)
    if num_rows(dataset) != num_pairs:
        raise ValueError(
            f"describe_experts got scores of {num_pairs} pairs for a dataset of {num_rows(dataset)} rows."
        )
    if top_n_words < 1 or top_n_pairs < 0 or max_ngram < 1:
        raise ValueError("`top_n_words` and `max_ngram` must be >= 1 and `top_n_pairs` >= 0.")
    chosen = [_response_text(x) for x in dataset["chosen"]]
    rejected = [_response_text(x) for x in dataset["rejected"]]
    columns = column_names(dataset)
    prompts = [_response_text(x) for x in dataset["prompt"]] if "prompt" in columns else [None] * num_pairs

    counts, vocabulary = _count_matrix(chosen + rejected, max_ngram)
    chosen_counts, rejected_counts = counts[:num_pairs], counts[num_pairs:]
    prior = np.asarray(counts.sum(axis=0)).ravel()
    features = surface_features(chosen + rejected)
    feature_deltas = features[:num_pairs] - features[num_pairs:]
    mean_length = float(features[:, 0].mean())

    correlations, names = None, None
    if "chosen_attributes" in columns and "rejected_attributes" in columns:
        deltas = attribute_deltas(dataset)
        if attribute_names is not None and len(attribute_names) != deltas.shape[1]:
            raise ValueError(f"Got {len(attribute_names)} attribute names for {deltas.shape[1]} attributes.")
        names = list(attribute_names or [f"attribute_{a}" for a in range(deltas.shape[1])])
        correlations = expert_attribute_correlation(scores.expert_deltas, deltas) if num_pairs > 1 else None

    descriptions = []
    for expert in range(scores.num_experts):
        delta = scores.expert_deltas[:, expert]
        nonzero = np.flatnonzero(delta != 0)
        selected = nonzero[np.abs(delta[nonzero]) >= np.median(np.abs(delta[nonzero]))] if nonzero.size else nonzero
        sign = np.sign(delta[selected])
        prefers_chosen = selected[sign > 0]
        prefers_rejected = selected[sign < 0]
        expert_features = {name: 0.0 for name in SURFACE_FEATURES}
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
            expert_features = {name: float(value) for name, value in zip(SURFACE_FEATURES, mean_deltas)}
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
    markers: Mapping[str, Mapping[int, Sequence[str]]],
    attributes: Sequence[str],
    top_n: int = 10,
) -> float:
    r"""
    Fraction of matched experts whose description names the attribute they were matched to, in the right direction.

    For each `(expert, attribute, rho)` of `matching` (from [`~trl_moe_rm.specialization.specialization_score`]), the expert prefers attribute
    value `+1` when `rho > 0` and `-1` when `rho < 0` (`rho == 0` is a miss). The description is a hit when at least one
    planted marker word `markers[attribute][direction]` is among the first `top_n` entries of its `top_words` (a bigram
    entry counts when one of its words is a marker). For the `length` attribute, a `length_words` feature whose sign
    equals the direction is also a hit.

    Args:
        descriptions (`Sequence[ExpertDescription]`):
            Output of [`describe_experts`].
        matching (`Sequence[tuple[int, int | str, float]]`):
            `(expert, attribute index or name, rho)` triples.
        markers (`Mapping[str, Mapping[int, Sequence[str]]]`):
            Marker words per attribute name and value (`+1` / `-1`), e.g. `trl_moe_rm.data.ATTRIBUTE_MARKERS` for the
            controlled data.
        attributes (`Sequence[str]`):
            Attribute names, indexed by the attribute indices of `matching` (e.g. `trl_moe_rm.data.ATTRIBUTES`).
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
