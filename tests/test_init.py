"""PCA initialisation of the experts from embedding differences."""

import pytest
import torch
from tiny import tiny_moe

from trl_moe_rm.init import apply_expert_init, pca_expert_init, principal_directions


def _planted(num_pairs: int = 2000, hidden_size: int = 16, seed: int = 0):
    """Differences with large variance along two planted orthogonal directions; the labels favour +u1."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden_size, hidden_size, generator=generator, dtype=torch.float64))
    u1, u2 = basis[:, 0], basis[:, 1]
    a = 5.0 * torch.randn(num_pairs, 1, generator=generator, dtype=torch.float64).abs()  # always agrees with +u1
    b = 1.5 * torch.randn(num_pairs, 1, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(num_pairs, hidden_size, generator=generator, dtype=torch.float64)
    differences = a * u1 + b * u2 + noise
    rejected = torch.randn(num_pairs, hidden_size, generator=generator, dtype=torch.float64)
    return rejected + differences, rejected, u1, u2


@pytest.mark.parametrize("center", [False, True])
def test_principal_directions_recover_the_planted_axes(center):
    chosen, rejected, u1, u2 = _planted()
    directions, variances = principal_directions(chosen, rejected, 2, center=center)
    assert directions.shape == (2, 16) and variances.shape == (2,)
    assert variances[0] >= variances[1] > 0
    cosines = directions.double() @ torch.stack([u1, u2]).T
    # Both planted axes are found, in order.
    assert abs(float(cosines[0, 0])) > 0.99 and abs(float(cosines[1, 1])) > 0.99
    assert torch.allclose(directions.norm(dim=1), torch.ones(2), atol=1e-5)
    if not center:  # the first direction is u1, oriented toward the labels
        assert float(cosines[0, 0]) > 0.99


def test_pca_expert_init_gives_opposite_scaled_pairs():
    chosen, rejected, u1, u2 = _planted()
    weights = pca_expert_init(chosen, rejected, num_experts=5)
    assert weights.shape == (5, 16) and weights.dtype == torch.float32
    assert torch.allclose(weights[0], -weights[1]) and torch.allclose(weights[2], -weights[3])
    units = torch.nn.functional.normalize(weights.double(), dim=1)
    assert float(units[0] @ u1) > 0.99  # +u1: agrees with the labels
    assert abs(float(units[2] @ u2)) > 0.99
    deltas = (chosen - rejected).float() @ weights.T
    assert deltas.pow(2).mean(dim=0).sqrt().tolist() == pytest.approx([1.0] * 5, rel=1e-3)
    # The expert along +u1 is right on (almost) every pair, its opposite on (almost) none.
    assert float((deltas[:, 0] > 0).float().mean()) > 0.98 and float((deltas[:, 1] > 0).float().mean()) < 0.02
    scaled = pca_expert_init(chosen, rejected, num_experts=2, target_scale=3.0)
    assert ((chosen - rejected).float() @ scaled[0]).pow(2).mean().sqrt().item() == pytest.approx(3.0, rel=1e-3)


def test_pca_expert_init_validates_its_inputs():
    chosen, rejected, _, _ = _planted(num_pairs=10)
    with pytest.raises(ValueError, match="num_experts"):
        pca_expert_init(chosen, rejected, 0)
    with pytest.raises(ValueError, match="shape"):
        pca_expert_init(chosen, rejected[:, :3], 2)
    with pytest.raises(ValueError, match="2 pairs"):
        pca_expert_init(chosen[:1], rejected[:1], 2)
    with pytest.raises(ValueError, match="hidden_size"):
        pca_expert_init(chosen, rejected, 40)


def test_apply_expert_init_sets_linear_experts_only():
    model = tiny_moe("llama", num_experts=4)
    chosen = torch.randn(50, model.config.hidden_size)
    rejected = torch.randn(50, model.config.hidden_size)
    weights = pca_expert_init(chosen, rejected, 4)
    assert apply_expert_init(model, weights, bias=0.5) == 1
    assert torch.allclose(model.experts.weight, weights)
    assert torch.allclose(model.experts.bias, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="shape"):
        apply_expert_init(model, weights[:2])
    with pytest.raises(ValueError, match="linear"):
        apply_expert_init(tiny_moe("llama", num_experts=4, expert_type="mlp"), weights)
    with pytest.raises(ValueError, match="no MoEExperts"):
        apply_expert_init(torch.nn.Linear(2, 2), weights)
