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
"""
Evaluation metrics for reward models, and the glue to use them in TRL's `RewardTrainer` evaluation loop.

## What `RewardTrainer` hands to `compute_metrics`

`RewardTrainer` (TRL 1.16) feeds the model one batch of `B` pairs as `2B` sequences, the `B` chosen sequences first and
then the `B` rejected ones, so the model's `logits` have shape `(2B, 1)`: `[chosen_1, ..., chosen_B, rejected_1, ...,
rejected_B]`. It sets `label_names = []` and `can_return_loss = True`, so `Trainer.prediction_step` calls
`compute_loss(..., return_outputs=True)` and returns `labels = ()` and, as predictions, the model outputs other than
`loss` (just `logits` for a plain sequence-classification model; a tuple starting with `logits` when the model returns
more, as [`~trl_moe_rm.MoERewardModel`] does). `Trainer.evaluation_loop` then, for every batch, calls
`accelerator.gather_for_metrics` on those predictions and concatenates them along the first dimension.

The concatenated `(sum of 2B_i, 1)` array cannot be split back into chosen and rejected scores by its halves: the
chosen/rejected blocks alternate per batch (and per process). Worse, on the last batch `gather_for_metrics` keeps only
the first `len(eval_dataset) % total_eval_batch_size` *rows*, a count of pairs applied to `2B` rows, so when the
evaluation set is not a multiple of the evaluation batch size the rejected scores of the last batch are silently
dropped (e.g. 10 pairs with `per_device_eval_batch_size=4` give 18 rows instead of 20, even on a single process).

The fix is to reshape each batch into one row per pair *before* the gather, with `preprocess_logits_for_metrics`:
[`pair_rewards_for_metrics`] turns the `(2B, 1)` logits into a `(B, 2)` tensor of `(chosen, rejected)` rewards, so the
gather, its remainder truncation (now counting pairs) and the concatenation are all correct, and
[`reward_compute_metrics`] receives an `(N, 2)` array with one row per evaluation pair, in dataset order.

```python
>>> from trl import RewardTrainer
>>> from trl_moe_rm.metrics import pair_rewards_for_metrics, reward_compute_metrics

>>> trainer = RewardTrainer(
...     model=model,
...     args=args,
...     train_dataset=train_dataset,
...     eval_dataset=eval_dataset,
...     compute_metrics=reward_compute_metrics,
...     preprocess_logits_for_metrics=pair_rewards_for_metrics,
... )
>>> trainer.evaluate()["eval_pairwise_accuracy"]
```

The metric keys are prefixed `pairwise_accuracy` rather than `accuracy`, because `RewardTrainer.log` overwrites
`eval_accuracy` with its own batch-averaged accuracy. `batch_eval_metrics=True` is not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..accuracy import bootstrap_ci, pairwise_outcomes


if TYPE_CHECKING:
    import evaluate
    from transformers import EvalPrediction


__all__ = [
    "PAIRWISE_ACCURACY_PATH",
    "load_pairwise_accuracy",
    "pair_rewards_for_metrics",
    "reward_compute_metrics",
]

PAIRWISE_ACCURACY_PATH: str = str(Path(__file__).resolve().parent / "pairwise_accuracy")
"""Local directory of the `pairwise_accuracy` evaluate metric, to pass to `evaluate.load`."""


def load_pairwise_accuracy(**kwargs: Any) -> evaluate.EvaluationModule:
    """
    Loads the `pairwise_accuracy` metric from its local directory (no network access needed).

    Args:
        **kwargs:
            Passed to `evaluate.load`, e.g. `keep_in_memory=True`, `experiment_id`, `num_process` and `process_id`.

    Returns:
        `evaluate.EvaluationModule`: The metric. See its card (`README.md` next to the script) for the inputs and
        outputs.

    Example:

    ```python
    >>> from trl_moe_rm.metrics import load_pairwise_accuracy

    >>> metric = load_pairwise_accuracy()
    >>> metric.compute(chosen_scores=[2.0, 1.0, 0.0, 3.0], rejected_scores=[1.0, 2.0, 0.0, 0.5])
    {'accuracy': 0.625}
    ```
    """
    import evaluate  # imported lazily: importing evaluate (and datasets) is slow

    return evaluate.load(PAIRWISE_ACCURACY_PATH, **kwargs)


def pair_rewards_for_metrics(logits: torch.Tensor | tuple[torch.Tensor, ...], labels: Any = None) -> torch.Tensor:
    """
    `preprocess_logits_for_metrics` for TRL's `RewardTrainer`: reshapes one batch of rewards to one row per pair.

    Args:
        logits (`torch.Tensor` of shape `(2 * batch_size, 1)` or `(2 * batch_size,)`, or a tuple of tensors):
            The model's rewards for one evaluation batch, the chosen sequences first and then the rejected ones, as
            `RewardTrainer`'s collator builds it. When the model returns several outputs (e.g. `logits`,
            `expert_rewards`, `router_logits`, ...), the `Trainer` passes a tuple; its first element must be the
            rewards, which holds for any `ModelOutput` declaring `logits` right after `loss`.
        labels (`Any`, *optional*):
            Ignored (`RewardTrainer` has no labels and passes an empty tuple).

    Returns:
        `torch.Tensor` of shape `(batch_size, 2)`: float32 rewards, column 0 for the chosen and column 1 for the
        rejected response of each pair. Other model outputs are dropped, which also keeps them out of the evaluation
        loop's memory.

    Raises:
        `ValueError`: If the rewards do not have shape `(2 * batch_size, 1)` or `(2 * batch_size,)`.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    rewards = logits.squeeze(-1) if logits.ndim == 2 and logits.shape[-1] == 1 else logits
    if rewards.ndim != 1 or rewards.shape[0] % 2 != 0:
        raise ValueError(
            "Expected rewards of shape (2 * batch_size, 1) with the chosen rows first, then the rejected rows, got "
            f"shape {tuple(logits.shape)}."
        )
    chosen, rejected = rewards.chunk(2)
    return torch.stack((chosen, rejected), dim=-1).float()


def reward_compute_metrics(
    eval_pred: EvalPrediction,
    *,
    bootstrap: bool = True,
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """
    `compute_metrics` for TRL's `RewardTrainer`: pairwise accuracy of the evaluation pairs, with a bootstrap interval.

    It must be used together with `preprocess_logits_for_metrics=`[`pair_rewards_for_metrics`], which makes the
    predictions one `(chosen, rejected)` row per pair; see the module docstring for why the raw logits cannot be used.
    Ties count as half a success, as in the `pairwise_accuracy` metric. To change the keyword arguments, wrap it with
    `functools.partial`.

    Args:
        eval_pred ([`~transformers.EvalPrediction`]):
            Evaluation predictions; `eval_pred.predictions` must have shape `(num_pairs, 2)` (chosen, rejected).
        bootstrap (`bool`, *optional*, defaults to `True`):
            Whether to add a percentile bootstrap confidence interval (see [`~trl_moe_rm.accuracy.bootstrap_ci`]).
        num_resamples (`int`, *optional*, defaults to `1000`):
            Number of bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`):
            Confidence level of the interval.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the bootstrap. With the same seed, the interval equals the one of the `pairwise_accuracy` metric.

    Returns:
        `dict[str, float]`: `"pairwise_accuracy"`, `"num_pairs"` and, with `bootstrap=True`,
        `"pairwise_accuracy_ci_low"` and `"pairwise_accuracy_ci_high"`. The `Trainer` prefixes them with `eval_`.

    Raises:
        `ValueError`: If the predictions are not shaped `(num_pairs, 2)`, which happens when
        `preprocess_logits_for_metrics` is not set to [`pair_rewards_for_metrics`].
    """
    predictions = eval_pred.predictions
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim != 2 or predictions.shape[1] != 2:
        raise ValueError(
            f"Expected predictions of shape (num_pairs, 2), got {predictions.shape}. Pass "
            "`preprocess_logits_for_metrics=pair_rewards_for_metrics` to the trainer: the raw (2 * batch_size, 1) "
            "logits concatenated over batches cannot be split into chosen and rejected rewards."
        )
    outcomes = pairwise_outcomes(predictions[:, 0], predictions[:, 1])
    metrics: dict[str, float] = {"pairwise_accuracy": float(outcomes.mean()), "num_pairs": int(outcomes.size)}
    if bootstrap:
        low, high = bootstrap_ci(outcomes, num_resamples=num_resamples, confidence=confidence, seed=seed)
        metrics["pairwise_accuracy_ci_low"] = low
        metrics["pairwise_accuracy_ci_high"] = high
    return metrics
