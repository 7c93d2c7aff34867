import math

import pytest
import torch

from trl_moe_rm import losses


def test_bradley_terry_matches_formula_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = -torch.nn.functional.logsigmoid(torch.tensor([1.0, -1.0])).mean()
    assert torch.allclose(losses.bradley_terry_loss(chosen, rejected), expected)
    margin = torch.tensor([1.0, 1.0])
    shifted = -torch.nn.functional.logsigmoid(torch.tensor([0.0, -2.0])).mean()
    assert torch.allclose(losses.bradley_terry_loss(chosen, rejected, margin), shifted)


def test_likelihood_mixture_matches_formula_and_ignores_unrouted_experts():
    weights = torch.tensor([[0.25, 0.75, 0.0]])
    deltas = torch.tensor([[1.0, -2.0, 50.0]])
    expected = -torch.log(0.25 * torch.sigmoid(torch.tensor(1.0)) + 0.75 * torch.sigmoid(torch.tensor(-2.0)))
    assert torch.allclose(losses.likelihood_mixture_loss(weights, deltas), expected)


def test_likelihood_mixture_equals_bradley_terry_for_one_hot_routing():
    deltas = torch.randn(6, 3)
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    picked = (deltas * one_hot).sum(-1)
    assert torch.allclose(
        losses.likelihood_mixture_loss(one_hot, deltas), losses.bradley_terry_loss(picked, torch.zeros(6)), atol=1e-6
    )


def test_sparsity_is_zero_for_one_hot_and_log_k_for_uniform():
    one_hot = torch.eye(4)
    assert losses.local_sparsity_loss(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((5, 4), 0.25)
    assert losses.local_sparsity_loss(uniform).item() == pytest.approx(math.log(4), rel=1e-5)


def test_switch_balance_is_minimal_at_uniform_load():
    uniform_probs = torch.full((8, 4), 0.25)
    balanced = torch.eye(4).repeat(2, 1)  # each expert gets 2 of the 8 rows
    assert losses.switch_balance_loss(uniform_probs, balanced).item() == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).repeat(8, 1)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(8, 1)
    assert losses.switch_balance_loss(collapsed_probs, collapsed).item() > 3.5


def test_entropy_balance_zero_at_uniform_and_log_k_when_collapsed():
    assert losses.entropy_balance_loss(torch.eye(4)).item() == pytest.approx(0.0, abs=1e-6)
    collapsed = torch.tensor([[1.0, 0, 0, 0]]).repeat(3, 1)
    assert losses.entropy_balance_loss(collapsed).item() == pytest.approx(math.log(4), rel=1e-5)


def test_cosine_diversity_zero_for_orthogonal_and_one_for_parallel():
    assert losses.cosine_diversity_loss(torch.eye(3, 5)).item() == pytest.approx(0.0, abs=1e-6)
    parallel = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]])
    assert losses.cosine_diversity_loss(parallel).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.cosine_diversity_loss(torch.ones(1, 3)).item() == 0.0  # K=1


def test_redundancy_diversity_ignores_opposite_experts():
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert losses.redundancy_diversity_loss(opposite).item() == pytest.approx(0.0, abs=1e-6)
    assert losses.cosine_diversity_loss(opposite).item() == pytest.approx(1.0, abs=1e-6)
    identical = torch.tensor([[1.0, 2.0], [2.0, 4.0]])
    assert losses.redundancy_diversity_loss(identical).item() == pytest.approx(1.0, abs=1e-6)
    assert losses.redundancy_diversity_loss(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-6)


def test_correlation_diversity_zero_for_uncorrelated_and_one_for_identical():
    uncorrelated = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert losses.correlation_diversity_loss(uncorrelated).item() == pytest.approx(0.0, abs=1e-6)
    column = torch.randn(16, 1)
    assert losses.correlation_diversity_loss(torch.cat([column, 3 * column], 1)).item() == pytest.approx(1.0, abs=1e-5)
    assert losses.correlation_diversity_loss(torch.ones(8, 3)).item() == 0.0  # constant scores
    assert losses.correlation_diversity_loss(torch.randn(1, 3)).item() == 0.0  # batch of one


def test_router_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    assert torch.allclose(losses.router_z_loss(logits), expected)


def test_assignment_responsibilities_follow_the_best_explaining_expert():
    prior = torch.full((2, 3), 1 / 3)
    deltas = torch.tensor([[3.0, -3.0, 0.0], [-3.0, 3.0, 0.0]])
    q = losses.assignment_responsibilities(prior, deltas, temperature=1.0)
    assert torch.allclose(q.sum(-1), torch.ones(2))
    assert q.argmax(-1).tolist() == [0, 1]
    sharper = losses.assignment_responsibilities(prior, deltas, temperature=0.25)
    assert (sharper.max(-1).values > q.max(-1).values).all()
    kept = losses.assignment_responsibilities(prior, deltas, temperature=1.0, top_k=1)
    assert ((kept > 0).sum(-1) == 1).all()


def test_assignment_losses_gradients():
    deltas = torch.randn(4, 3, requires_grad=True)
    logits = torch.randn(4, 3, requires_grad=True)
    q = losses.assignment_responsibilities(torch.softmax(logits, -1), deltas, 0.5)
    expert_loss = losses.assignment_expert_loss(q, deltas)
    (grad_logits,) = torch.autograd.grad(expert_loss, logits, retain_graph=True, allow_unused=True)
    assert grad_logits is None or torch.all(grad_logits == 0)  # responsibilities are detached in the M-step
    router_loss = losses.router_assignment_loss(logits, q)
    (grad,) = torch.autograd.grad(router_loss, logits, retain_graph=True)
    assert grad.abs().sum() > 0
    balance = losses.entropy_balance_loss(q)
    (grad_deltas,) = torch.autograd.grad(balance, deltas)
    assert grad_deltas.abs().sum() > 0  # the balance term acts on the experts through q


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_all_losses_finite_for_extreme_inputs(scale):
    logits = torch.randn(3, 4) * scale
    probs = torch.softmax(logits, -1)
    deltas = torch.randn(3, 4) * scale
    values = [
        losses.bradley_terry_loss(deltas[:, 0], deltas[:, 1]),
        losses.likelihood_mixture_loss(probs, deltas),
        losses.assignment_expert_loss(losses.assignment_responsibilities(probs, deltas, 0.1), deltas),
        losses.local_sparsity_loss(probs),
        losses.switch_balance_loss(probs, probs),
        losses.entropy_balance_loss(probs),
        losses.cosine_diversity_loss(logits),
        losses.correlation_diversity_loss(deltas),
        losses.router_z_loss(logits),
    ]
    assert all(torch.isfinite(value) for value in values)
