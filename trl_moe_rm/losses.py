r"""
Losses of the sparse Mixture-of-Experts reward model.

All functions are pure: they take tensors and return a scalar tensor, and are safe for extreme inputs (logits of
+-1e4, constant scores, `K=1`, a batch of one). Notation: `B` pairs, `K` experts, `p = softmax(router_logits / T)` the
dense router probabilities, `g` the sparse (top-k) routing weights and `Delta_k = r_k(x, y_chosen) - r_k(x, y_rejected)`
the reward difference of expert `k`.
"""

import math

import torch
import torch.nn.functional as F


def _entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=dim)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Bradley-Terry loss of the routed reward: `mean(-log sigma(r(chosen) - r(rejected) - margin))`.

    Args:
        chosen_rewards (`torch.Tensor` of shape `(B,)`):
            Rewards of the chosen responses.
        rejected_rewards (`torch.Tensor` of shape `(B,)`):
            Rewards of the rejected responses.
        margin (`torch.Tensor` of shape `(B,)`, *optional*):
            Required reward gap per pair, as in TRL's `RewardTrainer`.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


def likelihood_mixture_loss(
    routing_weights: torch.Tensor, expert_deltas: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    r"""
    Mixture likelihood loss (the dense MiCRo form): `mean(-log sum_k g_k * sigma(Delta_k - margin))`.

    Computed as a log-sum-exp of `log g_k + log sigma(Delta_k)`; experts with `g_k = 0` contribute nothing.

    Args:
        routing_weights (`torch.Tensor` of shape `(B, K)`):
            Mixture weights of each pair (rows on the simplex).
        expert_deltas (`torch.Tensor` of shape `(B, K)`):
            Reward difference chosen - rejected of every expert.
        margin (`torch.Tensor` of shape `(B,)`, *optional*):
            Required reward gap per pair.
    """
    deltas = expert_deltas.float()
    if margin is not None:
        deltas = deltas - margin.float()[:, None]
    weights = routing_weights.float()
    log_weights = torch.where(weights > 0, torch.log(weights.clamp_min(1e-38)), torch.full_like(weights, -math.inf))
    return -torch.logsumexp(log_weights + F.logsigmoid(deltas), dim=-1).mean()


def assignment_responsibilities(
    prior_probs: torch.Tensor, expert_deltas: torch.Tensor, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    r"""
    EM-style responsibilities of the experts for each labelled pair: `q_k ∝ p_k * sigma(Delta_k)^(1 / tau)`.

    A temperature `tau < 1` sharpens the assignment, which breaks the symmetry between near-equal experts: the expert
    that explains a pair slightly better takes more of it and specialises further. With `top_k`, only the `top_k`
    largest responsibilities are kept (renormalised).

    Args:
        prior_probs (`torch.Tensor` of shape `(B, K)`):
            Prior over experts (the dense router probabilities).
        expert_deltas (`torch.Tensor` of shape `(B, K)`):
            Reward difference chosen - rejected of every expert.
        temperature (`float`, *optional*, defaults to `1.0`):
            The temperature `tau`.
        top_k (`int`, *optional*):
            Keep only the `top_k` largest responsibilities per pair.

    Returns:
        `torch.Tensor` of shape `(B, K)` with rows on the simplex. Differentiable in both inputs.
    """
    log_q = torch.log(prior_probs.float().clamp_min(1e-12)) + F.logsigmoid(expert_deltas.float()) / temperature
    if top_k is not None and top_k < log_q.shape[-1]:
        threshold = log_q.topk(top_k, dim=-1).values[..., -1:]
        log_q = log_q.masked_fill(log_q < threshold, -math.inf)
    return torch.softmax(log_q, dim=-1)


def assignment_expert_loss(responsibilities: torch.Tensor, expert_deltas: torch.Tensor) -> torch.Tensor:
    r"""
    Each expert's Bradley-Terry loss weighted by its (fixed) responsibility: `mean_b sum_k q_bk * -log sigma(Delta_bk)`.

    The responsibilities are detached: this is the M-step for the experts.
    """
    return (responsibilities.detach() * -F.logsigmoid(expert_deltas.float())).sum(dim=-1).mean()


def router_assignment_loss(router_logits: torch.Tensor, responsibilities: torch.Tensor, temperature: float = 1.0):
    r"""
    Cross-entropy of the router against the (detached) responsibilities: `mean_b -sum_k q_bk log p_bk`. The router
    learns to predict from the prompt which expert will explain the pair.
    """
    log_probs = torch.log_softmax(router_logits.float() / temperature, dim=-1)
    return -(responsibilities.detach() * log_probs).sum(dim=-1).mean()


def local_sparsity_loss(router_probs: torch.Tensor) -> torch.Tensor:
    r"""
    Local sparsity: the mean per-sample entropy of the routing, `mean_b H(p_b)`, to be minimised. It is 0 for one-hot
    routing and `log K` for uniform routing.

    Args:
        router_probs (`torch.Tensor` of shape `(B, K)`):
            Routing distribution of each sample.
    """
    return _entropy(router_probs.float()).mean()


def switch_balance_loss(router_probs: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    r"""
    Switch-Transformer load balance: `K * sum_k f_k * P_k`, where `f_k` is the fraction of top-k slots dispatched to
    expert `k` (not differentiable) and `P_k` the mean router probability of expert `k`. Equal to 1 at a uniform load,
    larger when the load concentrates.

    Args:
        router_probs (`torch.Tensor` of shape `(B, K)`):
            Dense router probabilities.
        routing_weights (`torch.Tensor` of shape `(B, K)`):
            Sparse routing weights; their non-zeros define the dispatch.
    """
    dispatch = (routing_weights > 0).float()
    fraction = dispatch.sum(dim=0) / dispatch.sum().clamp_min(1.0)
    return router_probs.shape[-1] * (fraction * router_probs.float().mean(dim=0)).sum()


def entropy_balance_loss(probs: torch.Tensor) -> torch.Tensor:
    r"""
    Global balance as the entropy gap of the batch-mean routing: `log K - H(mean_b p_b)`. It is 0 exactly when the
    experts are used equally across the batch, and `log K` when one expert takes everything.

    Args:
        probs (`torch.Tensor` of shape `(B, K)`):
            Routing distribution (or assignment responsibilities) of each sample.
    """
    num_experts = probs.shape[-1]
    return math.log(num_experts) - _entropy(probs.float().mean(dim=0))


def _mean_abs_off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    size = matrix.shape[0]
    if size < 2:
        return matrix.new_zeros(())
    off_diagonal = ~torch.eye(size, dtype=torch.bool, device=matrix.device)
    return matrix.abs()[off_diagonal].mean()


def cosine_diversity_loss(weight_vectors: torch.Tensor) -> torch.Tensor:
    r"""
    Expert diversity by orthogonality: mean `|cos(w_i, w_j)|` over pairs of distinct experts. 0 for orthogonal experts,
    1 for parallel ones.

    Args:
        weight_vectors (`torch.Tensor` of shape `(K, D)`):
            One weight vector per expert.
    """
    normalized = F.normalize(weight_vectors.float(), dim=-1, eps=1e-8)
    return _mean_abs_off_diagonal(normalized @ normalized.T)


def redundancy_diversity_loss(weight_vectors: torch.Tensor) -> torch.Tensor:
    r"""
    Expert diversity by non-redundancy: mean `max(cos(w_i, w_j), 0)` over pairs of distinct experts. Like
    [`cosine_diversity_loss`] it is 0 for orthogonal experts and 1 for identical ones, but it does not penalise
    *opposite* experts (`cos = -1`), which preferences with opposite directions (concise vs detailed) need.

    Args:
        weight_vectors (`torch.Tensor` of shape `(K, D)`):
            One weight vector per expert.
    """
    normalized = F.normalize(weight_vectors.float(), dim=-1, eps=1e-8)
    return _mean_abs_off_diagonal((normalized @ normalized.T).clamp_min(0.0))


def correlation_diversity_loss(expert_deltas: torch.Tensor) -> torch.Tensor:
    r"""
    Expert diversity by decorrelation: mean `|corr(Delta_i, Delta_j)|` over pairs of distinct experts, the correlation
    taken across the pairs of the batch. 0 for uncorrelated experts; constant scores (zero variance) count as 0.

    Args:
        expert_deltas (`torch.Tensor` of shape `(B, K)`):
            Reward difference chosen - rejected of every expert.
    """
    deltas = expert_deltas.float()
    if deltas.shape[0] < 2:
        return deltas.new_zeros(())
    centered = deltas - deltas.mean(dim=0, keepdim=True)
    normalized = centered / centered.norm(dim=0, keepdim=True).clamp_min(1e-6)
    return _mean_abs_off_diagonal(normalized.T @ normalized)


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    r"""
    Router z-loss (ST-MoE): `mean_b (log sum_k exp(l_bk))^2`, which keeps the router logits small and the softmax
    numerically stable.
    """
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


__all__ = [
    "assignment_expert_loss",
    "assignment_responsibilities",
    "bradley_terry_loss",
    "correlation_diversity_loss",
    "cosine_diversity_loss",
    "entropy_balance_loss",
    "likelihood_mixture_loss",
    "local_sparsity_loss",
    "router_assignment_loss",
    "redundancy_diversity_loss",
    "router_z_loss",
    "switch_balance_loss",
]
