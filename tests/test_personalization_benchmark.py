"""The pooling, expert ceiling and targets of the few-shot personalization benchmark (`benchmarks/personalization.py`)."""

import numpy as np
import pytest
import torch

import benchmarks.personalization as bench


def _entry(k: int, draws: list[float]) -> dict:
    return {"k": k, "mean": float(np.mean(draws)), "low": 0.0, "high": 1.0, "per_user": [0.5, 0.7], "draws": draws}


def test_pool_seeds_pools_the_draws_of_every_seed():
    pooled = bench.pool_seeds([[_entry(2, [0.6, 0.7]), _entry(8, [0.8, 0.8])], [_entry(2, [0.5, 0.6])]])
    assert [entry["k"] for entry in pooled] == [2, 8]
    assert pooled[0]["mean"] == pytest.approx(0.6) and pooled[0]["seed_means"] == pytest.approx([0.65, 0.55])
    assert pooled[0]["low"] < 0.6 < pooled[0]["high"]
    assert pooled[1]["low"] == pooled[1]["high"] == pytest.approx(0.8)  # a constant sample


def test_expert_ceiling_finds_the_best_convex_combination():
    rng = np.random.default_rng(0)
    truth = np.array([1.0, 2.0, 0.0])  # the user is a mix of heads 0 and 1; head 2 is noise
    deltas = rng.normal(size=(400, 3))
    deltas *= np.sign(deltas @ truth)[:, None]  # every pair labelled by the user
    train, test = np.arange(300), np.arange(300, 400)
    ceiling = bench.expert_ceiling(deltas, deltas, [train], [test])
    assert len(ceiling) == 1 and ceiling[0].mean() > 0.95
    single_best = max((deltas[test, head] > 0).mean() for head in range(3))
    assert ceiling[0].mean() > single_best + 0.05
    # Separable pairs (the loss falls forever as the scale grows) stay finite.
    separable = np.abs(rng.normal(size=(100, 3))) * np.array([100.0, -1.0, 1.0])
    assert bench.expert_ceiling(separable, separable, [np.arange(100)], [np.arange(100)])[0].mean() == 1.0


def test_check_targets_and_gap_decomposition():
    def curve(means: dict[int, float], width: float = 0.01) -> list[dict]:
        return [{"k": k, "mean": m, "low": m - width, "high": m + width} for k, m in means.items()]

    result = {
        "curves": {
            "drm_hyre": curve({1: 0.55, 2: 0.58, 8: 0.62}),
            "drm_hyre_signed": curve({1: 0.60, 2: 0.60, 8: 0.68}),
            bench.recipe_row(): curve({1: 0.58, 2: 0.63, 8: 0.72}),
        },
        "constant": {"oracle": {"mean": 0.80}, f"{bench.RECIPE['variant']}_ceiling": {"mean": 0.76}},
        "epoch_curve": {"0": curve({8: 0.70}), "6": curve({8: 0.72}), "12": curve({8: 0.695})},
    }
    targets = bench.check_targets(result)
    assert targets["at_or_above_drm_hyre_signed_every_k"]["passed"]  # k=1 is not a target
    assert targets["outside_drm_hyre_signed_interval_at_k"]["passed"]
    assert not targets["epoch_curve_rises_or_flat"]["passed"]  # 0.695 < 0.72 - 0.01
    gap = bench.gap_decomposition(result, [8])[8]
    assert gap == pytest.approx({"experts": 4.0, "fit": 4.0, "total": 8.0})
    assert bench.recipe_row() in bench.markdown_table({**result, "constant": {}}, [2, 8])


def test_every_fit_spec_runs_through_the_product_api_and_matches_its_fitting_function():
    from tiny import tiny_moe

    from trl_moe_rm.fitting import FIT_METHODS
    from trl_moe_rm.scoring import PairScores

    assert bench.RECIPE["fit"] in bench.FIT_SPECS
    assert bench.FIT_SPECS["hyre_gradient"] == ("hyre_gradient", {"l2": 1.0})
    rng = np.random.default_rng(0)
    num_experts, num_pairs = 5, 40
    train_deltas = rng.normal(size=(num_pairs, num_experts))
    rows_by_user = [np.arange(0, 20), np.arange(20, 40)]
    users, shot_rows = np.array([0, 1, 1]), np.array([[0, 3, 7, 9], [1, 2, 5, 8], [0, 4, 6, 19]])
    shots = torch.from_numpy(np.stack([rows_by_user[u][s] for u, s in zip(users, shot_rows)]))
    model = tiny_moe("llama", num_experts=num_experts, top_k=2)
    scores = PairScores.from_expert_rewards(
        train_deltas, np.zeros_like(train_deltas), np.full_like(train_deltas, 1 / num_experts)
    )
    for name, (method, kwargs) in bench.FIT_SPECS.items():
        steps = {"steps": 20} if method in ("gradient", "hyre_gradient") else {}
        expected = FIT_METHODS[method](torch.from_numpy(train_deltas)[shots], **kwargs, **steps).double().numpy()
        product = bench.moe_fitter(model, scores, rows_by_user, method, prior="uniform", **kwargs, **steps)
        np.testing.assert_allclose(product(users, shot_rows), expected, atol=1e-6, err_msg=name)
        if method != "hyre":  # drm_fitter sets HyRe's temperature itself
            drm = bench.drm_fitter(train_deltas, rows_by_user, method=method, **kwargs, **steps)
            np.testing.assert_allclose(drm(users, shot_rows), expected, atol=1e-6, err_msg=name)
