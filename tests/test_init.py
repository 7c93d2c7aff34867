"""Initialisation of the experts from embedding differences: principal directions and response clusters."""

import pytest
import torch
from tiny import tiny_moe

from trl_moe_rm.init import (
    apply_expert_init,
    feature_scale,
    pca_cluster_expert_init,
    pca_expert_init,
    principal_directions,
    response_cluster_directions,
)


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


def test_feature_scale_does_not_blow_up_dead_features():
    differences = torch.randn(200, 8, dtype=torch.float64)
    differences[:, 3] *= 1e-30  # a dead feature of a frozen backbone
    scale = feature_scale(differences)
    rms = differences.pow(2).mean(dim=0).sqrt()
    assert scale[3] == pytest.approx(1e-2 * float(rms.median()))
    assert torch.allclose(scale[[0, 1, 2, 4, 5, 6, 7]], rms[[0, 1, 2, 4, 5, 6, 7]])


def test_standardized_principal_directions_ignore_feature_units():
    """A planted axis on features with tiny units: raw PCA misses it, standardised PCA finds it (in raw space)."""
    generator = torch.Generator().manual_seed(0)
    differences = torch.randn(2000, 6, generator=generator, dtype=torch.float64)
    differences[:, :2] *= 100.0  # two loud but independent (isotropic) features
    shared = 3.0 * torch.randn(2000, generator=generator, dtype=torch.float64).abs()  # agrees with the labels
    differences[:, 4] += shared
    differences[:, 5] += shared
    differences[:, 2:] *= 0.01  # the structure lives on features with small units
    zeros = torch.zeros_like(differences)
    raw, _ = principal_directions(differences, zeros, 1)
    standardized, _ = principal_directions(differences, zeros, 1, standardize=True)
    planted = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64) / 2**0.5
    assert abs(float(raw[0].double() @ planted)) < 0.1
    assert float(standardized[0].double() @ planted) > 0.9
    assert float(standardized[0].norm()) == pytest.approx(1.0, rel=1e-5)


def _clustered_responses(num_prompts: int = 60, hidden_size: int = 12, seed: int = 0):
    """Every prompt has one response of each of 3 styles (a prompt offset + a style centre + noise)."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(3, hidden_size, generator=generator, dtype=torch.float64)
    chosen, rejected, prompts = [], [], []
    for prompt in range(num_prompts):
        offset = 10.0 * torch.randn(hidden_size, generator=generator, dtype=torch.float64)
        responses = offset + centres + 0.1 * torch.randn(3, hidden_size, generator=generator, dtype=torch.float64)
        for first, second in ((0, 1), (1, 2), (2, 0)):
            chosen.append(responses[first])
            rejected.append(responses[second])
            prompts.append(f"prompt {prompt}")
    return torch.stack(chosen), torch.stack(rejected), prompts, centres - centres.mean(dim=0)


def test_response_cluster_directions_point_at_the_planted_styles():
    chosen, rejected, prompts, centred = _clustered_responses()
    directions = response_cluster_directions(chosen, rejected, 3, 2, prompt_ids=prompts)
    assert directions.shape == (3, 12) and directions.dtype == torch.float32
    # Each planted style is the best-scoring response of exactly one direction.
    best = (directions.double() @ centred.T).argmax(dim=1)
    assert sorted(best.tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="prompt_ids"):
        response_cluster_directions(chosen, rejected, 3, 2, prompt_ids=prompts[:5])


def test_pca_cluster_expert_init_halves_and_scales():
    chosen, rejected, prompts, _ = _clustered_responses()
    weights = pca_cluster_expert_init(chosen, rejected, 5, prompt_ids=prompts)
    assert weights.shape == (5, 12) and weights.dtype == torch.float32
    assert torch.allclose(weights[0], -weights[1]) and weights[2].abs().sum() > 0  # signed principal experts first
    assert torch.allclose(weights[:3], pca_expert_init(chosen, rejected, 3, standardize=True))
    deltas = (chosen - rejected).float() @ weights.T
    assert deltas.pow(2).mean(dim=0).sqrt().tolist() == pytest.approx([1.0] * 5, rel=1e-3)
    with pytest.raises(ValueError, match="num_experts"):
        pca_cluster_expert_init(chosen, rejected, 1)


def test_trainer_expert_init_pca_clusters(tmp_path):
    """`expert_init="pca_clusters"` sets the experts from the cached features, grouping responses by prompt tokens."""
    from datasets import Dataset
    from tiny import tiny_args, tiny_tokenizer

    from trl_moe_rm import MoERewardConfig, MoERewardTrainer

    rows = [
        {"prompt": f"tell me about {topic}", "chosen": f"{first} answer", "rejected": f"{second} answer"}
        for topic in ("cat", "dog", "sun", "moon")
        for first, second in (("yes", "no"), ("no", "fine"), ("fine", "yes"))
    ]
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2)
    trainer = MoERewardTrainer(
        model=model,
        args=tiny_args(tmp_path, freeze_backbone=True, cache_features=True, expert_init="pca_clusters", seed=3),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    dataset = trainer.train_dataset
    features = trainer.cached_features(dataset)
    prompts = [tuple(ids[:length]) for ids, length in zip(dataset["chosen_ids"], dataset["prompt_length"])]
    assert len(set(prompts)) == 4
    expected = pca_cluster_expert_init(
        features["chosen_features"], features["rejected_features"], 4, prompt_ids=prompts, seed=3
    )
    assert torch.allclose(model.experts.weight.detach(), expected, atol=1e-4)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        MoERewardConfig(output_dir=str(tmp_path), use_cpu=True, expert_init="pca_clusters", num_experts=1)
