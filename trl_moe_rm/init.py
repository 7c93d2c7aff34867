r"""
Data-driven initialisation of the expert heads from principal directions of embedding differences.

On hidden-context data (the prompt does not tell what a pair is judged on, e.g. DSP), pooled Bradley-Terry training
gives randomly initialised experts no reason to differ: they all drift toward the same consensus direction. The
principal directions of the differences `z_i = h(x_i, y_chosen) - h(x_i, y_rejected)` of the training pairs, on the
other hand, are exactly the axes along which annotators disagree (this is what DRMs use as reward heads). Starting the
experts at `+v_1, -v_1, +v_2, -v_2, ...` gives each of them a distinct, opposite-signed hypothesis that the training loss
(best: `loss_type="assignment"`) then refines, and lets a user's simplex weights express either sign of each axis.

`expert_init="pca_clusters"` ([`pca_cluster_expert_init`]) keeps half of the experts as such signed principal
directions (of standardised features) and makes the other half *response-cluster* heads: the responses, centred within
their prompt, are clustered (k-means) in the principal subspace, and expert `c` rewards a response by its projection on
centroid `c`. A user who wants "answers like cluster c" (a DSP domain, a style) is then one expert rather than a
combination of principal axes, which a fit from a few shots finds more easily.

Example:

```python
>>> from trl_moe_rm.init import apply_expert_init, pca_expert_init

>>> features = trainer.cached_features(trainer.train_dataset)
>>> weights = pca_expert_init(features["chosen_features"], features["rejected_features"], num_experts=8)
>>> apply_expert_init(model, weights)
```
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn as nn


__all__ = [
    "EXPERT_INITS",
    "apply_expert_init",
    "feature_scale",
    "pca_cluster_expert_init",
    "pca_expert_init",
    "principal_directions",
    "response_cluster_directions",
]

EXPERT_INITS = ("pca", "pca_clusters")
"""Expert initialisations [`MoERewardTrainer`] supports (`MoERewardConfig.expert_init`)."""

# A feature whose differences have less than this fraction of the median root-mean-square is not scaled up to unit
# scale by `feature_scale` (frozen backbones have dead dimensions, constant up to 1e-33, which would be blown up).
_SCALE_FLOOR = 1e-2


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


def feature_scale(differences: torch.Tensor) -> torch.Tensor:
    r"""
    Per-feature scale of embedding differences for standardisation: the root-mean-square of each feature's
    differences, floored at 1% of their median so that (near-)constant features are not blown up.

    Args:
        differences (`torch.Tensor` of shape `(n, H)`):
            Differences `chosen - rejected` of the pairs' features.

    Returns:
        `torch.Tensor` of shape `(H,)`, float64, positive.
    """
    rms = torch.as_tensor(differences).to(torch.float64).pow(2).mean(dim=0).sqrt()
    return rms.clamp_min(_SCALE_FLOOR * float(rms.median())).clamp_min(torch.finfo(torch.float64).tiny)


def _check_count(value: int, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an int in [{low}, {high}], got {value!r}.")
    return value


def principal_directions(
    chosen_features: torch.Tensor,
    rejected_features: torch.Tensor,
    num_components: int,
    center: bool = False,
    standardize: bool = False,
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
        standardize (`bool`, *optional*, defaults to `False`):
            Decompose the differences divided by their per-feature scale ([`feature_scale`]), so that no feature
            dominates by its units, and map the directions back to the original feature space (as DRMs do).

    Returns:
        `tuple(torch.Tensor, torch.Tensor)`: unit directions `(C, H)` (float32, ordered by decreasing variance) and the
        variance of the differences along each of them `(C,)` (of the standardised differences with `standardize`).
    """
    differences = _differences(chosen_features, rejected_features)
    _check_count(num_components, "num_components", 1, differences.shape[1])
    scale = feature_scale(differences) if standardize else torch.ones(differences.shape[1], dtype=torch.float64)
    scaled = differences / scale
    centred = scaled - scaled.mean(dim=0, keepdim=True) if center else scaled
    moment = centred.T @ centred / centred.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    order = torch.argsort(eigenvalues, descending=True)[:num_components]
    # A direction u of the scaled differences scores a pair by u . (z / scale) = (u / scale) . z.
    directions = nn.functional.normalize((eigenvectors[:, order] / scale[:, None]).T, dim=1).contiguous()  # (C, H)
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
    standardize: bool = False,
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
        standardize (`bool`, *optional*, defaults to `False`):
            Principal directions of the standardised differences (see [`principal_directions`]).

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
    directions, _ = principal_directions(
        chosen_features, rejected_features, num_components, center=center, standardize=standardize
    )
    scaled = _unit_rms(directions, _differences(chosen_features, rejected_features), target_scale)
    weights = torch.stack(
        [sign * scaled[index // 2] for index, sign in zip(range(num_experts), [1.0, -1.0] * num_experts)]
    )
    return weights


def _unit_rms(directions: torch.Tensor, differences: torch.Tensor, target_scale: float) -> torch.Tensor:
    """Scale each direction so that its reward differences on the pairs have root-mean-square `target_scale`."""
    differences = differences.float()
    rms = (differences @ directions.float().T).pow(2).mean(dim=0).sqrt().clamp_min(1e-12)  # (C,)
    return directions.float() * (target_scale / rms)[:, None]


def response_cluster_directions(
    chosen_features: torch.Tensor,
    rejected_features: torch.Tensor,
    num_clusters: int,
    num_components: int,
    prompt_ids: Sequence[Hashable] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    r"""
    Reward directions toward clusters of responses: the distinct responses of the pairs, centred within their prompt
    (each minus the mean of its prompt's responses, which removes what the prompt is about) and standardised
    ([`feature_scale`]), are projected on the `num_components` principal directions of the standardised differences
    and clustered by k-means; direction `c` scores a response by its dot product with centroid `c` in that space.

    Args:
        chosen_features, rejected_features (`torch.Tensor` of shape `(n, H)`):
            Features of the chosen and of the rejected responses of the `n` pairs.
        num_clusters (`int`):
            Number of clusters (directions) `C`.
        num_components (`int`):
            Dimension of the principal subspace the responses are clustered in.
        prompt_ids (sequence of hashables, *optional*):
            The prompt of each pair (any hashable: the prompt text, its token ids as a tuple, ...). `None`: every pair
            is its own prompt (its two responses are centred against each other).
        seed (`int`, *optional*, defaults to `0`):
            Seed of k-means.

    Returns:
        `torch.Tensor` of shape `(C, H)`, float32: unit directions in the original feature space.
    """
    from sklearn.cluster import KMeans  # imported lazily: only this initialisation needs it

    differences = _differences(chosen_features, rejected_features)
    num_pairs, hidden_size = differences.shape
    _check_count(num_components, "num_components", 1, hidden_size)
    prompts = list(range(num_pairs)) if prompt_ids is None else list(prompt_ids)
    if len(prompts) != num_pairs:
        raise ValueError(f"`prompt_ids` has {len(prompts)} entries for {num_pairs} pairs.")
    responses = torch.cat([torch.as_tensor(chosen_features), torch.as_tensor(rejected_features)]).to(torch.float64)
    index: dict[Hashable, int] = {}
    groups = np.asarray([index.setdefault(prompt, len(index)) for prompt in prompts] * 2)
    # One row per distinct (prompt, response): a response shared by several pairs counts once.
    keyed = np.concatenate([groups[:, None].astype(np.float64), responses.numpy()], axis=1)
    _, first = np.unique(keyed, axis=0, return_index=True)
    responses, groups = responses[np.sort(first)], groups[np.sort(first)]
    counts = np.bincount(groups)
    sums = np.zeros((counts.size, hidden_size))
    np.add.at(sums, groups, responses.numpy())
    centred = responses - torch.from_numpy(sums[groups] / counts[groups, None])
    centred = centred[torch.from_numpy(counts[groups] > 1)]
    _check_count(num_clusters, "num_clusters", 1, centred.shape[0])
    scale = feature_scale(differences)
    eigenvalues, eigenvectors = torch.linalg.eigh((differences / scale).T @ (differences / scale))
    basis = eigenvectors[:, torch.argsort(eigenvalues, descending=True)[:num_components]].T  # (m, H), scaled space
    coordinates = ((centred / scale) @ basis.T).numpy()
    centroids = KMeans(num_clusters, n_init=10, random_state=seed).fit(coordinates).cluster_centers_
    directions = (torch.from_numpy(centroids) @ basis) / scale  # w . h = centroid . (basis (h / scale))
    return nn.functional.normalize(directions, dim=1).float()


def pca_cluster_expert_init(
    chosen_features: torch.Tensor,
    rejected_features: torch.Tensor,
    num_experts: int,
    prompt_ids: Sequence[Hashable] | None = None,
    seed: int = 0,
    target_scale: float = 1.0,
) -> torch.Tensor:
    r"""
    Expert weights `(K, H)`: `ceil(K / 2)` signed principal directions of the standardised differences (as
    [`pca_expert_init`] with `standardize=True`), then `floor(K / 2)` response-cluster directions
    ([`response_cluster_directions`], clustered in a `floor(K / 2)`-dimensional principal subspace). Each expert's
    reward differences on the given pairs have root-mean-square `target_scale`.

    Args:
        chosen_features (`torch.Tensor` of shape `(n, H)`):
            Backbone features of the chosen responses of the training pairs.
        rejected_features (`torch.Tensor` of shape `(n, H)`):
            Backbone features of the rejected responses.
        num_experts (`int`):
            Number of experts `K >= 2`.
        prompt_ids (sequence of hashables, *optional*):
            The prompt of each pair (see [`response_cluster_directions`]).
        seed (`int`, *optional*, defaults to `0`):
            Seed of k-means.
        target_scale (`float`, *optional*, defaults to `1.0`):
            Root-mean-square of each expert's reward differences on the given pairs.

    Returns:
        `torch.Tensor` of shape `(K, H)`, float32.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(
            f"`num_experts` must be an int >= 2 (half principal, half cluster experts), got {num_experts!r}."
        )
    num_clusters = num_experts // 2
    principal = pca_expert_init(
        chosen_features, rejected_features, num_experts - num_clusters, target_scale=target_scale, standardize=True
    )
    clusters = response_cluster_directions(
        chosen_features, rejected_features, num_clusters, num_clusters, prompt_ids=prompt_ids, seed=seed
    )
    differences = _differences(chosen_features, rejected_features)
    return torch.cat([principal, _unit_rms(clusters, differences, target_scale)])


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
