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
[`analysis_report`]: every analysis metric of one scored dataset in one JSON-serializable dictionary.

The expensive step, [`~trl_moe_rm.scoring.score_pairs`], runs the model once over a preference dataset; the report then
combines the cheap metrics of [`~trl_moe_rm.routing`], [`~trl_moe_rm.specialization`],
[`~trl_moe_rm.descriptions`] and [`~trl_moe_rm.steering`] with the dataset's label columns.

Example:

```python
>>> from trl_moe_rm.data import ATTRIBUTE_MARKERS, ATTRIBUTES, make_controlled_dataset
>>> from trl_moe_rm.report import analysis_report
>>> from trl_moe_rm.scoring import score_pairs

>>> test_set = make_controlled_dataset(num_pairs_per_category=50, seed=1)
>>> scores = score_pairs(model, tokenizer, test_set, batch_size=64)
>>> report = analysis_report(scores, test_set, attribute_names=ATTRIBUTES, markers=ATTRIBUTE_MARKERS)
>>> report["nmi"], report["specialization"], report["description_accuracy"]
```
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .data.columns import column_names, get_column, num_rows, require_columns
from .descriptions import ExpertDescription, describe_experts, description_accuracy
from .routing import posterior_assignment, routing_matrix, routing_nmi, routing_purity
from .scoring import PairScores
from .specialization import attribute_deltas, expert_attribute_correlation, specialization_score
from .steering import steering_shift


__all__ = ["REPORT_METRICS", "analysis_report"]


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

_ATTRIBUTE_METRICS = ("specialization", "description_accuracy", "steering")

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


def _requested_metrics(
    metrics: Sequence[str] | None, columns: Sequence[str], attribute_names: Any, markers: Any
) -> list[str]:
    """The metrics to compute: `metrics`, or by default every metric the dataset's columns and the arguments allow."""
    if metrics is not None:
        unknown = [metric for metric in metrics if metric not in REPORT_METRICS]
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}; choose from {list(REPORT_METRICS)}.")
        return list(metrics)
    skipped = set()
    if "conflict" not in columns:
        skipped.add("conflict_accuracy")
    if attribute_names is None:
        skipped.update(_ATTRIBUTE_METRICS)
    if markers is None:
        skipped.add("description_accuracy")
    return [metric for metric in REPORT_METRICS if metric not in skipped]


def analysis_report(
    scores: PairScores,
    dataset: Any,
    metrics: Sequence[str] | None = None,
    attribute_names: Sequence[str] | None = None,
    markers: Mapping[str, Mapping[int, Sequence[str]]] | None = None,
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
    - `nmi`, `purity`: [`~trl_moe_rm.routing.routing_nmi`] / [`~trl_moe_rm.routing.routing_purity`] of the top-1
      routed expert against the category column; `posterior_nmi`, `posterior_purity`: the same for
      [`~trl_moe_rm.routing.posterior_assignment`]; `routing_matrix` (`{"categories": [...], "matrix": [[...]]}`, see
      [`~trl_moe_rm.routing.routing_matrix`]);
    - `specialization`, `matching` (list of `{"expert", "attribute", "rho"}`), `expert_attribute_correlation`
      (`(K, A)` nested list): see [`~trl_moe_rm.specialization.specialization_score`];
    - `description_accuracy` and `descriptions` (expert index as a string -> summary): see
      [`~trl_moe_rm.descriptions.describe_experts`];
    - `steering`: for each matched expert, `{"expert", "attribute", "rho", "shift"}` with the
      [`~trl_moe_rm.steering.steering_shift`] along its attribute, oriented by the sign of its `rho`. Pass held-out
      pairs for an honest steering evaluation.

    Args:
        scores ([`~trl_moe_rm.scoring.PairScores`]):
            Scores of `dataset`, from [`~trl_moe_rm.scoring.score_pairs`].
        dataset ([`~datasets.Dataset`] or `Mapping[str, Sequence]`):
            The scored dataset with its label columns (e.g. from [`~trl_moe_rm.data.make_controlled_dataset`]).
        metrics (`Sequence[str]`, *optional*):
            Metrics to compute, among [`REPORT_METRICS`]. Defaults to every metric the inputs allow: all of them, less
            `conflict_accuracy` when the dataset has no `conflict` column, the attribute metrics (`specialization`,
            `description_accuracy`, `steering`) without `attribute_names`, and `description_accuracy` without
            `markers`. A metric whose columns are missing raises a `ValueError` naming the column, and a requested
            attribute metric without its argument a `ValueError` naming the argument.
        attribute_names (`Sequence[str]`, *optional*):
            Names of the entries of the `chosen_attributes` / `rejected_attributes` vectors, e.g.
            `trl_moe_rm.data.ATTRIBUTES` for the controlled data. Needed by the attribute metrics.
        markers (`Mapping[str, Mapping[int, Sequence[str]]]`, *optional*):
            Marker words planted per attribute name and value (`+1` / `-1`), e.g. `trl_moe_rm.data.ATTRIBUTE_MARKERS`
            for the controlled data. Needed by `description_accuracy`.
        top_n_words (`int`, *optional*, defaults to `10`):
            Number of top words per expert description.
        describe_fn (`Callable[[ExpertDescription], str]`, *optional*):
            Summary override, see [`~trl_moe_rm.descriptions.describe_experts`].
        category_column (`str`, *optional*, defaults to `"category"`):
            Column with the hidden category of each pair.

    Returns:
        `dict[str, Any]`: The report.
    """
    num_pairs = len(scores)
    if num_rows(dataset) != num_pairs:
        raise ValueError(f"analysis_report got scores of {num_pairs} pairs for a dataset of {num_rows(dataset)} rows.")
    requested = _requested_metrics(metrics, column_names(dataset), attribute_names, markers)
    for metric in requested:  # check every requirement before computing anything
        needed_by, needed = _METRIC_COLUMNS[metric]
        needed = tuple(category_column if column == "category" else column for column in needed)
        require_columns(dataset, needed, needed_by)
    missing_names = [metric for metric in requested if metric in _ATTRIBUTE_METRICS and attribute_names is None]
    if missing_names:
        raise ValueError(
            f"{missing_names} need `attribute_names`, the names of the entries of the attribute vectors (e.g. "
            "`trl_moe_rm.data.ATTRIBUTES` for the controlled data)."
        )
    if "description_accuracy" in requested and markers is None:
        raise ValueError(
            "description_accuracy needs `markers`, the marker words planted per attribute value (e.g. "
            "`trl_moe_rm.data.ATTRIBUTE_MARKERS` for the controlled data)."
        )

    report: dict[str, Any] = {
        "num_pairs": num_pairs,
        "num_experts": scores.num_experts,
        "expert_load": scores.routing_weights.mean(axis=0).tolist(),
    }
    if "accuracy" in requested:
        report["accuracy"] = scores.accuracy
    if "conflict_accuracy" in requested:
        conflict = np.asarray(get_column(dataset, "conflict", "conflict_accuracy"), dtype=bool)
        report["num_conflict_pairs"] = int(conflict.sum())
        report["conflict_accuracy"] = scores.select(conflict).accuracy if conflict.any() else None
    if "nmi" in requested or "purity" in requested:
        categories = get_column(dataset, category_column, "routing_nmi")
        top1, posterior = scores.top1_experts, posterior_assignment(scores)
        if "nmi" in requested:
            report["nmi"] = routing_nmi(top1, categories)
            report["posterior_nmi"] = routing_nmi(posterior, categories)
        if "purity" in requested:
            report["purity"] = routing_purity(top1, categories)
            report["posterior_purity"] = routing_purity(posterior, categories)
        matrix, names = routing_matrix(scores, categories)
        report["routing_matrix"] = {"categories": [str(name) for name in names], "matrix": matrix.tolist()}
    if set(_ATTRIBUTE_METRICS) & set(requested):
        deltas = attribute_deltas(dataset)
        names = list(attribute_names)
        if len(names) != deltas.shape[1]:
            raise ValueError(
                f"The attribute vectors have {deltas.shape[1]} entries but there are {len(names)} attribute names "
                f"({names}); pass one name per entry in `attribute_names`."
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
