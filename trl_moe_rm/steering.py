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
Steering: the reward of a hand-set mixture of experts instead of the router's, and how far it moves preferences.

- [`steer`]: the reward margins of pairs under fixed mixture weights;
- [`steering_shift`]: how much putting all the weight on one expert moves the preferences along one attribute.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .accuracy import pairwise_accuracy
from .scoring import PairScores
from .specialization import expert_attribute_correlation


__all__ = ["steer", "steering_shift"]


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
    """Fraction of pairs whose margin has the target sign `+1` / `-1` ([`pairwise_accuracy`]: a tie counts one half)."""
    return pairwise_accuracy(margins * target, np.zeros_like(margins))


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
            Attribute differences, chosen minus rejected (e.g. from
            [`~trl_moe_rm.specialization.attribute_deltas`]).
        expert (`int`):
            Expert receiving all the weight.
        attribute_index (`int`):
            Column of `attribute_deltas` (ignored for a 1-D array).
        direction (`int`, *optional*):
            `+1` or `-1`: the attribute direction the expert stands for, usually the sign of its matched `rho` from
            [`~trl_moe_rm.specialization.specialization_score`]. Defaults to the sign of the Spearman correlation
            between `Delta_expert` and the attribute over the used pairs (`+1` when it is 0).

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
