# Copyright 2025 The trl_moe_rm Authors. All rights reserved.
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
"""Pairwise (preference) accuracy of a reward model, as an `evaluate` metric.

The outcome rule (a tie counts 0.5) and the bootstrap are those of `trl_moe_rm.accuracy` (`pairwise_outcomes`,
`bootstrap_ci`), imported from the installed package: `evaluate.load` copies this script alone into its module cache
and imports it from there, so it uses absolute imports only (no relative imports), and needs `trl_moe_rm` installed.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from trl_moe_rm.accuracy import bootstrap_ci, pairwise_outcomes


_DESCRIPTION = """\
Pairwise accuracy is the fraction of preference pairs for which a reward model scores the chosen (preferred) response
higher than the rejected one. Ties count as half a success (0.5), so a reward model that outputs a constant score gets
exactly the chance level, 0.5. Optionally, the metric reports a percentile bootstrap confidence interval and a
breakdown per group of pairs (e.g. per subset of a benchmark such as "chat", "safety" or "reasoning").
"""

_KWARGS_DESCRIPTION = """
Args:
    chosen_scores (`list[float]`):
        Reward of the chosen (preferred) response of each pair.
    rejected_scores (`list[float]`):
        Reward of the rejected (dispreferred) response of each pair, aligned with `chosen_scores`.
    groups (`list[str]`, *optional*):
        Name of the group of each pair, aligned with the scores. When given, the result has a `"per_group"` entry.
        This is a keyword argument of `compute` only: it is not stored by `add` / `add_batch`, so when accumulating
        scores incrementally, pass the groups of all the pairs added so far to the final `compute` call.
    bootstrap (`bool`, *optional*, defaults to `False`):
        Whether to add a percentile bootstrap confidence interval (`"accuracy_ci_low"`, `"accuracy_ci_high"`), overall
        and per group.
    num_resamples (`int`, *optional*, defaults to `1000`):
        Number of bootstrap resamples.
    confidence (`float`, *optional*, defaults to `0.95`):
        Confidence level of the bootstrap interval, strictly between 0 and 1.
    seed (`int`, *optional*, defaults to `0`):
        Seed of the bootstrap random generator. Each group is resampled with a generator seeded with `seed`.

Returns:
    accuracy (`float`):
        Fraction of pairs where the chosen score is higher than the rejected score, ties counting 0.5. In `[0, 1]`.
    accuracy_ci_low (`float`):
        Lower bound of the bootstrap confidence interval. Only with `bootstrap=True`.
    accuracy_ci_high (`float`):
        Upper bound of the bootstrap confidence interval. Only with `bootstrap=True`.
    per_group (`dict[str, dict]`):
        For each group (sorted by name), a dict with `"accuracy"`, `"count"` (number of pairs) and, with
        `bootstrap=True`, `"accuracy_ci_low"` and `"accuracy_ci_high"`. Only when `groups` is given.

Examples:

    >>> import evaluate
    >>> metric = evaluate.load("path/to/trl_moe_rm/metrics/pairwise_accuracy")
    >>> metric.compute(chosen_scores=[2.0, 1.0, 0.0, 3.0], rejected_scores=[1.0, 2.0, 0.0, 0.5])
    {'accuracy': 0.625}

    >>> results = metric.compute(
    ...     chosen_scores=[2.0, 1.0, 0.0, 3.0],
    ...     rejected_scores=[1.0, 2.0, 0.0, 0.5],
    ...     groups=["chat", "chat", "safety", "safety"],
    ... )
    >>> results["per_group"]
    {'chat': {'accuracy': 0.5, 'count': 2}, 'safety': {'accuracy': 0.75, 'count': 2}}
"""

_CITATION = """\
@misc{trl_moe_rm_pairwise_accuracy,
  title  = {Pairwise accuracy metric for reward models},
  author = {trl_moe_rm authors},
  year   = {2025},
}
"""


def _summarize(
    outcomes: np.ndarray, bootstrap: bool, num_resamples: int, confidence: float, seed: int | None
) -> dict[str, float]:
    summary = {"accuracy": float(outcomes.mean())}
    if bootstrap:
        low, high = bootstrap_ci(outcomes, num_resamples=num_resamples, confidence=confidence, seed=seed)
        summary["accuracy_ci_low"] = low
        summary["accuracy_ci_high"] = high
    return summary


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PairwiseAccuracy(evaluate.Metric):
    """Pairwise accuracy of reward scores on (chosen, rejected) pairs, with optional bootstrap CI and groups."""

    def _info(self) -> evaluate.MetricInfo:
        # `groups` is deliberately not a feature column. In evaluate 0.4.6, with a list of `Features` variants the
        # input names are taken from the first variant only, and `compute()` without an input passes `None` for it,
        # which `add_batch` cannot encode. So an optional per-example input is handled as a `compute` keyword
        # argument, like `sample_weight` in evaluate's own `accuracy` metric.
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    # float64 so that no ties are created (or broken) by rounding the scores
                    "chosen_scores": datasets.Value("float64"),
                    "rejected_scores": datasets.Value("float64"),
                }
            ),
            # No `format="numpy"`: the numpy formatter of `datasets` downcasts floats to float32. Plain lists keep
            # the float64 values.
        )

    def _compute(
        self,
        chosen_scores: list[float],
        rejected_scores: list[float],
        groups: list[str] | None = None,
        bootstrap: bool = False,
        num_resamples: int = 1000,
        confidence: float = 0.95,
        seed: int | None = 0,
    ) -> dict:
        outcomes = pairwise_outcomes(chosen_scores, rejected_scores)
        result: dict = _summarize(outcomes, bootstrap, num_resamples, confidence, seed)

        if groups is not None:
            groups = list(groups)
            if len(groups) != outcomes.size:
                raise ValueError(f"`groups` must have one entry per pair ({outcomes.size}), got {len(groups)}.")
            non_strings = {type(group).__name__ for group in groups if not isinstance(group, str)}
            if non_strings:
                raise ValueError(f"`groups` must contain strings, got values of type {sorted(non_strings)}.")
            group_array = np.asarray(groups, dtype=object)
            per_group = {}
            for group in sorted(set(groups)):
                group_outcomes = outcomes[group_array == group]
                summary = _summarize(group_outcomes, bootstrap, num_resamples, confidence, seed)
                per_group[group] = {"accuracy": summary.pop("accuracy"), "count": int(group_outcomes.size), **summary}
            result["per_group"] = per_group

        return result
