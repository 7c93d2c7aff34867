r"""
Data-driven initialisation of the expert heads from principal directions of embedding differences.

On hidden-context data (the prompt does not tell what a pair is judged on, e.g. DSP), pooled Bradley-Terry training
gives randomly initialised experts no reason to differ: they all drift toward the same consensus direction. The
principal directions of the differences `z_i = h(x_i, y_chosen) - h(x_i, y_rejected)` of the training pairs, on the
other hand, are exactly the axes along which annotators disagree (this is what DRMs use as reward heads). Starting the
experts at `+v_1, -v_1, +v_2, -v_2, ...` gives each of them a distinct, opposite-signed hypothesis that the training loss
(best: `loss_type="assignment"`) then refines, and lets a user's simplex weights express either sign of each axis.

Example:

```python
>>> from trl_moe_rm.init import apply_expert_init, pca_expert_init

>>> features = trainer.cached_features(trainer.train_dataset)
>>> weights = pca_expert_init(features["chosen_features"], features["rejected_features"], num_experts=8)
>>> apply_expert_init(model, weights)
```
"""

from __future__ import annotations

import torch
import torch.nn as nn


__all__ = ["EXPERT_INITS", "apply_expert_init", "pca_expert_init", "principal_directions"]

EXPERT_INITS = ("pca",)
"""Expert initialisations [`MoERewardTrainer`] supports (`MoERewardConfig.expert_init`)."""


def _differences(chosen_features, rejected_features) -> torch.Tensor:
    chosen = torch.as_tensor(chosen_features).detach().to("cpu", torch.float64)
    rejected = torch.as_tensor(rejected_features).detach().to("cpu", torch.float64)
    if chosen.dim() != 2 or chosen.shape != rejected.shape:
        raise ValueError(
            f"`chosen_features` and `rejected_features` must both have shape (num_pairs, hidden_size), got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}."
        )
    if chosen.shape[0] < 2:
        raise ValueError(f"PCA needs at least 2 pairs, got {chosen.shape[0]}.")
    differences = chosen - rejected
    if not bool(torch.isfinite(differences).all()):
        raise ValueError("The features contain NaN/Inf values.")
    return differences


def principal_directions(
    chosen_features: torch.Tensor, rejected_features: torch.Tensor, num_components: int, center: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Principal directions of the embedding differences `z = chosen - rejected`, each oriented so that most training pairs
    project positively on it (the side that agrees with the labels).

    Args:
        chosen_features (`torch.Tensor` of shape `(n, H)`):
            Features of the chosen responses.
        rejected_features (`torch.Tensor` of shape `(n, H)`):
            Features of the rejected responses.
        num_components (`int`):
            Number of directions `C` (at most `H`).
        center (`bool`, *optional*, defaults to `False`):
            `False`: eigenvectors of the second-moment matrix `E[z z^T]`, the "preference covariance" of DRMs (its
            first direction is the consensus preference when there is one). `True`: ordinary PCA of the centred
            differences.

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: unit directions `(C, H)` (float32, ordered by decreasing variance) and the
        variance of the differences along each of them `(C,)`.
    """
    differences = _differences(chosen_features, rejected_features)
    hidden_size = differences.shape[1]
    if (
        isinstance(num_components, bool)
        or not isinstance(num_components, int)
        or not 1 <= num_components <= hidden_size
    ):
        raise ValueError(f"`num_components` must be an int in [1, {hidden_size}], got {num_components!r}.")
    centred = differences - differences.mean(dim=0, keepdim=True) if center else differences
    moment = centred.T @ centred / centred.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    order = torch.argsort(eigenvalues, descending=True)[:num_components]
    directions = eigenvectors[:, order].T.contiguous()  # (C, H)
    projections = differences @ directions.T  # (n, C)
    # Orient each direction toward the labels: most pairs (then the mean) should project positively.
    agreement = (projections > 0).double().mean(dim=0) - 0.5
    tie_break = projections.mean(dim=0)
    signs = torch.where(agreement != 0, agreement.sign(), tie_break.sign())
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    directions = directions * signs[:, None]
    return directions.float(), eigenvalues[order].clamp_min(0.0).float()


def pca_expert_init(
    chosen_features: torch.Tensor,
    rejected_features: torch.Tensor,
    num_experts: int,
    center: bool = False,
    target_scale: float = 1.0,
) -> torch.Tensor:
    r"""
    Expert weights `(K, H)` for linear experts: `+v_1, -v_1, +v_2, -v_2, ...` with `v_c` the principal directions of the
    embedding differences (see [`principal_directions`]), `ceil(K / 2)` of them.

    Each direction is scaled so that the expert's reward differences on the given pairs have a root-mean-square of
    `target_scale`: with the default `1.0`, `sigmoid(Delta)` starts in its responsive range (neither saturated nor flat)
    whatever the scale of the backbone's features, and the opposite-signed experts of an axis start with clearly
    different likelihoods on every pair that varies along it.

    Args:
        chosen_features (`torch.Tensor` of shape `(n, H)`):
            Backbone features of the chosen responses of the training pairs (e.g. from
            `MoERewardTrainer.cached_features`).
        rejected_features (`torch.Tensor` of shape `(n, H)`):
            Backbone features of the rejected responses.
        num_experts (`int`):
            Number of experts `K`. With an odd `K`, the last direction is used with its positive sign only.
        center (`bool`, *optional*, defaults to `False`):
            Centre the differences before the decomposition (see [`principal_directions`]).
        target_scale (`float`, *optional*, defaults to `1.0`):
            Root-mean-square of each expert's reward differences on the given pairs.

    Returns:
        `torch.Tensor` of shape `(K, H)`, float32.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"`num_experts` must be an int >= 1, got {num_experts!r}.")
    if not target_scale > 0:
        raise ValueError(f"`target_scale` must be > 0, got {target_scale!r}.")
    num_components = (num_experts + 1) // 2
    hidden_size = torch.as_tensor(chosen_features).shape[-1]
    if num_components > hidden_size:
        raise ValueError(
            f"{num_experts} experts need {num_components} directions, more than hidden_size={hidden_size}."
        )
    directions, variances = principal_directions(chosen_features, rejected_features, num_components, center=center)
    differences = _differences(chosen_features, rejected_features).float()
    rms = (differences @ directions.T).pow(2).mean(dim=0).sqrt().clamp_min(1e-12)  # (C,)
    scaled = directions * (target_scale / rms)[:, None]
    weights = torch.stack(
        [sign * scaled[index // 2] for index, sign in zip(range(num_experts), [1.0, -1.0] * num_experts)]
    )
    return weights


@torch.no_grad()
def apply_expert_init(model: nn.Module, weights: torch.Tensor, bias: float = 0.0) -> int:
    r"""
    Copy expert weights `(K, H)` into the linear experts of a model (every `MoEExperts` module it contains, so that a
    PEFT wrapper's trainable copy is initialised too) and set their biases to `bias`.

    Args:
        model (`torch.nn.Module`):
            A [`MoERewardModel`], a PEFT wrapper of one, or a [`~trl_moe_rm.modeling_moe_reward.MoEExperts`] module.
        weights (`torch.Tensor` of shape `(K, H)`):
            E.g. from [`pca_expert_init`].
        bias (`float`, *optional*, defaults to `0.0`):
            Value of every expert's bias (it cancels in the reward differences).

    Returns:
        `int`: the number of expert modules initialised.
    """
    from .modeling_moe_reward import MoEExperts

    modules = [module for module in model.modules() if isinstance(module, MoEExperts)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no MoEExperts module to initialise.")
    for module in modules:
        if module.expert_type != "linear":
            raise ValueError(
                f"Expert initialisation from principal directions needs linear experts, got expert_type="
                f"{module.expert_type!r}."
            )
        if tuple(module.weight.shape) != tuple(weights.shape):
            raise ValueError(f"`weights` has shape {tuple(weights.shape)}, the experts {tuple(module.weight.shape)}.")
        module.weight.copy_(weights.to(module.weight))
        module.bias.fill_(bias)
    return len(modules)
