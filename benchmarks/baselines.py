r"""
Baselines for test-time personalization, on fixed backbone features.

- [`DecomposedRewardHeads`] (DRMs, Luo et al. 2025): the principal directions of the embedding differences
  `z = h(chosen) - h(rejected)` of the training pairs are `K` linear reward heads; a user is fitted by HyRe-style
  reweighting of the heads on their labelled shots ([`~trl_moe_rm.fitting.fit_hyre`]).
- [`fit_bradley_terry_head`]: one linear Bradley-Terry head (logistic regression on the differences). Trained on
  everybody's pairs it is the *single head* (unadapted) baseline; trained on all of one user's training pairs it is
  that user's *oracle*.

Everything works on feature tensors `(n, H)`, e.g. the cached features of a frozen backbone.

Example:

```python
>>> from benchmarks.baselines import DecomposedRewardHeads, fit_bradley_terry_head

>>> drm = DecomposedRewardHeads.fit(train["chosen_features"], train["rejected_features"], num_heads=8)
>>> weights = drm.adapt(drm.deltas(shots["chosen_features"], shots["rejected_features"]))
>>> accuracy = drm.accuracy(test["chosen_features"], test["rejected_features"], weights)
```
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trl_moe_rm.accuracy import pairwise_accuracy
from trl_moe_rm.fitting import fit_hyre
from trl_moe_rm.init import principal_directions


__all__ = ["DecomposedRewardHeads", "bradley_terry_accuracy", "cross_validated_l2", "fit_bradley_terry_head"]


def _as_float64(features) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).to(
        "cpu", torch.float64
    )


@dataclass
class DecomposedRewardHeads:
    r"""
    `K` linear reward heads `r_k(x, y) = v_k . h(x, y)` given by the principal directions `v_k` of the embedding
    differences of the training pairs (DRMs). Each direction is oriented so that most training pairs agree with it.

    Args:
        directions (`torch.Tensor` of shape `(K, H)`):
            Unit reward directions, by decreasing variance of the differences along them.
        variances (`torch.Tensor` of shape `(K,)`):
            Variance of the training differences along each direction.
    """

    directions: torch.Tensor
    variances: torch.Tensor

    @classmethod
    def fit(
        cls, chosen_features, rejected_features, num_heads: int = 8, center: bool = False
    ) -> DecomposedRewardHeads:
        """
        Principal directions of the training pairs' differences (see
        [`~trl_moe_rm.init.principal_directions`]; `center=False` decomposes the preference covariance `E[z z^T]`).
        """
        directions, variances = principal_directions(
            _as_float64(chosen_features), _as_float64(rejected_features), num_heads, center=center
        )
        return cls(directions=directions.double(), variances=variances.double())

    @property
    def num_heads(self) -> int:
        return self.directions.shape[0]

    def deltas(self, chosen_features, rejected_features, signed: bool = False) -> np.ndarray:
        """
        Per-head reward differences `(n, K)` of pairs. With `signed=True`, `(n, 2K)`: each head and its opposite
        (`+v_1, -v_1, +v_2, -v_2, ...`), so that simplex weights can use either sign of every direction.
        """
        differences = _as_float64(chosen_features) - _as_float64(rejected_features)
        deltas = (differences @ self.directions.T).numpy()
        if signed:
            deltas = np.stack([deltas, -deltas], axis=-1).reshape(deltas.shape[0], -1)
        return deltas

    def adapt(self, deltas, temperature: float = 1.0, mask=None) -> np.ndarray:
        r"""
        HyRe reweighting of the heads on a user's shots: `softmax(-sum_i BT-loss(z-normalised delta_ik) / T)`.

        Args:
            deltas (`array-like` of shape `(k, K)` or `(U, k, K)`):
                Head reward differences of the shots ([`~DecomposedRewardHeads.deltas`]).
            temperature (`float`, *optional*, defaults to `1.0`):
                HyRe temperature.
            mask (`array-like` of shape `(U, k)`, *optional*):
                Real (non-padding) shots of a batch of users.

        Returns:
            `np.ndarray` of shape `(K,)` or `(U, K)`: weights on the simplex.
        """
        mask_t = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.bool)
        return fit_hyre(torch.as_tensor(np.asarray(deltas)), temperature=temperature, mask=mask_t).double().numpy()

    def accuracy(self, chosen_features, rejected_features, weights, signed: bool = False) -> float:
        """Pairwise accuracy of the weighted heads `sum_k w_k r_k`; a tie counts as half a correct pair."""
        combined = self.deltas(chosen_features, rejected_features, signed) @ np.asarray(weights, dtype=np.float64)
        return pairwise_accuracy(combined, np.zeros_like(combined))


def fit_bradley_terry_head(
    chosen_features, rejected_features, l2: float = 1e-3, max_iter: int = 200, standardize: bool = True
) -> torch.Tensor:
    r"""
    One linear Bradley-Terry reward head: `argmin_w mean_i -log sigmoid(w . z_i) + l2 / 2 ||w||^2` with
    `z_i = h(chosen_i) - h(rejected_i)` (a bias would cancel in the differences), solved with L-BFGS in float64.

    Args:
        chosen_features (`array-like` of shape `(n, H)`):
            Features of the chosen responses.
        rejected_features (`array-like` of shape `(n, H)`):
            Features of the rejected responses.
        l2 (`float`, *optional*, defaults to `1e-3`):
            Ridge penalty (on the standardised scale when `standardize=True`).
        max_iter (`int`, *optional*, defaults to `200`):
            L-BFGS iterations.
        standardize (`bool`, *optional*, defaults to `True`):
            Divide each feature's differences by their root-mean-square before fitting (the returned weights are in the
            original feature space), so that `l2` means the same for any backbone.

    Returns:
        `torch.Tensor` of shape `(H,)`, float64: the head's weights (`r(x, y) = w . h(x, y)`).
    """
    differences = _as_float64(chosen_features) - _as_float64(rejected_features)
    if differences.dim() != 2 or differences.shape[0] == 0:
        raise ValueError(f"Expected features of shape (n >= 1, H), got {tuple(differences.shape)}.")
    scale = differences.pow(2).mean(dim=0).sqrt().clamp_min(1e-8) if standardize else torch.ones(differences.shape[1])
    z = differences / scale
    weights = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.softplus(-(z @ weights)).mean() + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (weights.detach() / scale).to(torch.float64)


def cross_validated_l2(
    chosen_features,
    rejected_features,
    grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
    num_folds: int = 5,
    seed: int = 0,
) -> float:
    """
    The ridge penalty of [`fit_bradley_terry_head`] with the best `num_folds`-fold cross-validated pairwise accuracy
    (ties broken toward the larger penalty), using only the given (training) pairs.
    """
    chosen, rejected = _as_float64(chosen_features), _as_float64(rejected_features)
    num_pairs = chosen.shape[0]
    if num_pairs < num_folds:
        return max(grid)
    folds = np.array_split(np.random.default_rng(seed).permutation(num_pairs), num_folds)
    scores = []
    for l2 in grid:
        correct = 0.0
        for fold in folds:
            train = np.setdiff1d(np.arange(num_pairs), fold)
            head = fit_bradley_terry_head(chosen[train], rejected[train], l2=l2)
            correct += bradley_terry_accuracy(head, chosen[fold], rejected[fold]) * len(fold)
        scores.append(correct / num_pairs)
    best = max(scores)
    return max(l2 for l2, score in zip(grid, scores) if score >= best - 1e-12)


def bradley_terry_accuracy(head: torch.Tensor, chosen_features, rejected_features) -> float:
    """Pairwise accuracy of a linear head `w`; a tie (equal rewards) counts as half a correct pair (a coin flip)."""
    differences = _as_float64(chosen_features) - _as_float64(rejected_features)
    margins = (differences @ head.to(torch.float64)).numpy()
    return pairwise_accuracy(margins, np.zeros_like(margins))
