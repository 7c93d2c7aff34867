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
Interpretability analysis of trained Mixture-of-Experts reward models: one import for every analysis function.

The analysis lives in one module per job; this module re-exports their public names, so that
`from trl_moe_rm.analysis import X` keeps working:

- [`~trl_moe_rm.scoring`]: [`score_pairs`] runs the model once over a preference dataset and stores every quantity the
  metrics need in a [`PairScores`] of NumPy arrays (the one expensive step);
- [`~trl_moe_rm.routing`]: [`routing_matrix`], [`routing_matrix_from_model`], [`routing_nmi`], [`routing_purity`],
  [`category_recovery`] and [`posterior_assignment`];
- [`~trl_moe_rm.specialization`]: [`attribute_deltas`], [`expert_attribute_correlation`] (Spearman) and
  [`specialization_score`] (Hungarian matching of experts to attributes);
- [`~trl_moe_rm.descriptions`]: [`describe_experts`], [`ExpertDescription`], [`log_odds_z_scores`] and
  [`description_accuracy`];
- [`~trl_moe_rm.steering`]: [`steer`] and [`steering_shift`];
- [`~trl_moe_rm.report`]: [`analysis_report`], which bundles everything into a JSON-serializable dictionary.

The analysis knows nothing of the data that produced the scores: the attribute names and planted marker words are
arguments (for the controlled data, `trl_moe_rm.data.ATTRIBUTES` and `trl_moe_rm.data.ATTRIBUTE_MARKERS`).
"""

from .descriptions import ExpertDescription, describe_experts, description_accuracy, log_odds_z_scores
from .report import REPORT_METRICS, analysis_report
from .routing import (
    category_recovery,
    posterior_assignment,
    routing_matrix,
    routing_matrix_from_model,
    routing_nmi,
    routing_purity,
)
from .scoring import PairScores, score_pairs, scores_from_features
from .specialization import attribute_deltas, expert_attribute_correlation, specialization_score
from .steering import steer, steering_shift


__all__ = [
    "REPORT_METRICS",
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
    "scores_from_features",
    "specialization_score",
    "steer",
    "steering_shift",
]
