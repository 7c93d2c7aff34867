"""DRM (PCA heads + HyRe), single Bradley-Terry head and oracle baselines on planted data."""

import numpy as np
import pytest
import torch

from benchmarks.baselines import (
    DecomposedRewardHeads,
    bradley_terry_accuracy,
    cross_validated_l2,
    fit_bradley_terry_head,
)


HIDDEN = 24


def _users(num_pairs: int = 400, seed: int = 0):
    """
    Four users who each prefer one signed planted axis (+u1, -u1, +u2, -u2) on the same kind of pairs: pooled over
    users the labels cancel, so one head is at chance, while the principal axes of the differences are u1 and u2.
    """
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=generator, dtype=torch.float64))
    axes = [basis[:, 0], -basis[:, 0], basis[:, 1], -basis[:, 1]]
    data = []
    for axis in axes:
        rejected = torch.randn(num_pairs, HIDDEN, generator=generator, dtype=torch.float64)
        coefficients = torch.randn(num_pairs, 2, generator=generator, dtype=torch.float64) * 3.0
        differences = coefficients @ basis[:, :2].T + 0.3 * torch.randn(
            num_pairs, HIDDEN, generator=generator, dtype=torch.float64
        )
        differences = differences * torch.sign(differences @ axis)[:, None]  # chosen = the user's preferred side
        data.append((rejected + differences, rejected))
    return data, axes


def _split(pairs, train: int):
    chosen, rejected = pairs
    return (chosen[:train], rejected[:train]), (chosen[train:], rejected[train:])


def test_drm_with_hyre_beats_a_single_head():
    data, _ = _users()
    splits = [_split(pairs, 300) for pairs in data]
    train_chosen = torch.cat([train[0] for train, _ in splits])
    train_rejected = torch.cat([train[1] for train, _ in splits])

    single = fit_bradley_terry_head(train_chosen, train_rejected)
    single_accuracy = np.mean([bradley_terry_accuracy(single, *test) for _, test in splits])

    drm = DecomposedRewardHeads.fit(train_chosen, train_rejected, num_heads=4)
    assert drm.num_heads == 4 and drm.directions.shape == (4, HIDDEN)
    rng = np.random.default_rng(0)
    accuracies = []
    for train, test in splits:
        shots = rng.choice(300, size=8, replace=False)
        weights = drm.adapt(drm.deltas(train[0][shots], train[1][shots]))
        assert weights.shape == (4,) and weights.sum() == pytest.approx(1.0, abs=1e-5)
        accuracies.append(drm.accuracy(*test, weights))
    oracle = np.mean([bradley_terry_accuracy(fit_bradley_terry_head(*train), *test) for train, test in splits])

    assert single_accuracy < 0.65
    # Only users whose axis is a principal direction *with the sign the pooled labels favour* are served exactly; the
    # others still get the best available head. Either way the adapted heads beat the single one by a wide margin.
    assert np.mean(accuracies) > single_accuracy + 0.15
    assert oracle > 0.95


def test_drm_adapt_is_batched_over_users():
    data, _ = _users(num_pairs=100)
    chosen = torch.cat([pairs[0] for pairs in data])
    rejected = torch.cat([pairs[1] for pairs in data])
    drm = DecomposedRewardHeads.fit(chosen, rejected, num_heads=3)
    deltas = np.stack([drm.deltas(pairs[0][:5], pairs[1][:5]) for pairs in data])  # (4, 5, 3)
    batched = drm.adapt(deltas)
    assert batched.shape == (4, 3)
    for user in range(4):
        assert batched[user] == pytest.approx(drm.adapt(deltas[user]), abs=1e-6)


def test_signed_heads_and_cross_validated_penalty():
    data, _ = _users(num_pairs=60)
    chosen = torch.cat([pairs[0] for pairs in data])
    rejected = torch.cat([pairs[1] for pairs in data])
    drm = DecomposedRewardHeads.fit(chosen, rejected, num_heads=2)
    plain, signed = drm.deltas(chosen, rejected), drm.deltas(chosen, rejected, signed=True)
    assert signed.shape == (240, 4)
    assert np.allclose(signed[:, 0::2], plain) and np.allclose(signed[:, 1::2], -plain)
    # Pooled, the four users cancel: the zero head ties on every pair, which scores as a coin flip.
    assert bradley_terry_accuracy(torch.zeros(HIDDEN, dtype=torch.float64), chosen, rejected) == 0.5
    user_chosen, user_rejected = data[0]
    l2 = cross_validated_l2(user_chosen, user_rejected, grid=(1e-3, 1.0, 100.0))
    assert l2 in (1e-3, 1.0)  # a huge penalty flattens the head: it never wins the cross-validation


def test_bradley_terry_head_learns_a_planted_direction():
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(HIDDEN, generator=generator, dtype=torch.float64)
    rejected = torch.randn(500, HIDDEN, generator=generator, dtype=torch.float64)
    differences = torch.randn(500, HIDDEN, generator=generator, dtype=torch.float64)
    differences = differences * torch.sign(differences @ direction)[:, None]
    head = fit_bradley_terry_head(rejected + differences, rejected)
    assert head.shape == (HIDDEN,)
    cosine = torch.nn.functional.cosine_similarity(head, direction, dim=0)
    assert float(cosine) > 0.9
    assert bradley_terry_accuracy(head, rejected + differences, rejected) > 0.95
    with pytest.raises(ValueError, match="shape"):
        fit_bradley_terry_head(torch.zeros(0, HIDDEN), torch.zeros(0, HIDDEN))


def _marker_features(texts):
    """Cheap stand-in for a backbone: counts of each attribute value's marker words, and the number of sentences."""
    from trl_moe_rm.data.controlled import ATTRIBUTE_MARKERS, count_sentences, tokenize_words

    rows = []
    for text in texts:
        words = tokenize_words(text)
        counts = [
            sum(word in markers for word in words)
            for values in ATTRIBUTE_MARKERS.values()
            for markers in values.values()
        ]
        rows.append(counts + [count_sentences(text)])
    return torch.tensor(rows, dtype=torch.float64)


def test_benchmark_kshot_core_adapts_controlled_users():
    from tiny import tiny_moe

    import benchmarks.personalization as bench
    from trl_moe_rm.analysis import PairScores
    from trl_moe_rm.data.controlled import make_user_pairs, make_users

    users = make_users(6, alpha=0.3, seed=0)
    sets = {}
    for name, size, offset in (("train", 40, 0), ("test", 40, 100)):
        chosen, rejected, owners = [], [], []
        for index, user in enumerate(users):
            rows = make_user_pairs(user, size, seed=offset + index)
            chosen += rows["chosen"]
            rejected += rows["rejected"]
            owners += [index] * size
        features = {
            "chosen_features": _marker_features(chosen),
            "rejected_features": _marker_features(rejected),
        }
        features["router_features"] = torch.zeros_like(features["chosen_features"])
        sets[name] = bench.PairSet(np.asarray(owners), features)
    train_rows = [sets["train"].rows_of(user) for user in range(6)]
    test_rows = [sets["test"].rows_of(user) for user in range(6)]

    def diff(name):
        return sets[name].features["chosen_features"] - sets[name].features["rejected_features"]

    single = fit_bradley_terry_head(
        sets["train"].features["chosen_features"], sets["train"].features["rejected_features"]
    )
    unadapted = bench.constant_accuracy([(diff("test")[rows] @ single > 0).numpy() for rows in test_rows])

    drm = DecomposedRewardHeads.fit(
        sets["train"].features["chosen_features"], sets["train"].features["rejected_features"], num_heads=6
    )
    train_deltas = drm.deltas(sets["train"].features["chosen_features"], sets["train"].features["rejected_features"])
    test_deltas = drm.deltas(sets["test"].features["chosen_features"], sets["test"].features["rejected_features"])
    per_user_test = [test_deltas[rows] for rows in test_rows]
    curve = bench.kshot_curves(
        [len(rows) for rows in train_rows],
        per_user_test,
        bench.drm_fitter(train_deltas, train_rows),
        ks=(1, 8),
        num_draws=20,
    )
    assert [entry["k"] for entry in curve] == [1, 8]
    assert bench.correct([1.0, -1.0, 0.0]).tolist() == [1.0, 0.0, 0.5]
    for entry in curve:
        assert entry["low"] <= entry["mean"] <= entry["high"] and len(entry["per_user"]) == 6
    at_8 = curve[1]["mean"]
    assert at_8 > unadapted["mean"] + 0.05
    assert at_8 > curve[0]["mean"]

    # The product path (fit_users on precomputed expert scores) through the same core, with the heads as experts.
    model = tiny_moe("llama", num_experts=6, top_k=2)
    zeros = np.zeros_like(train_deltas)
    scores = PairScores.from_expert_rewards(train_deltas, zeros, np.full_like(train_deltas, 1 / 6))
    moe_curve = bench.kshot_curves(
        [len(rows) for rows in train_rows],
        per_user_test,
        bench.moe_fitter(model, scores, train_rows, "hedge", prior="uniform"),
        ks=(8,),
        num_draws=20,
    )
    assert moe_curve[0]["mean"] > unadapted["mean"] + 0.05
