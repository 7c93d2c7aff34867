import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_moe_rm.fitting import (
    FIT_METHODS,
    fit_gradient,
    fit_hedge,
    fit_hyre,
    fit_hyre_gradient,
    mixture_scores,
    pairwise_accuracy,
    routed_weights,
)


METHODS = sorted(FIT_METHODS)
STATIC_ONLY = ("hyre", "hyre_gradient")  # no routed mode


def make_user_deltas(n: int = 32, k: int = 8, good: int = 2, seed: int = 0) -> torch.Tensor:
    """Expert `good` agrees with every label, expert `good + 1` confidently disagrees, the others are noise."""
    gen = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, k, generator=gen)
    deltas[:, good] = 0.5 + torch.rand(n, generator=gen)
    deltas[:, (good + 1) % k] = -2.0 - torch.rand(n, generator=gen)
    return deltas


def random_simplex(k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(k, generator=gen) + 0.1
    return w / w.sum()


def assert_on_simplex(w: torch.Tensor, k: int, batch: int | None = None) -> None:
    assert w.dtype == torch.float32
    assert w.shape == ((k,) if batch is None else (batch, k))
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)


def fit(method: str, deltas, **kwargs) -> torch.Tensor:
    if method in ("gradient", "hyre_gradient"):
        kwargs.setdefault("steps", 60)
    return FIT_METHODS[method](deltas, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_the_only_agreeing_expert(method, seed):
    deltas = make_user_deltas(seed=seed)
    uniform = torch.full((8,), 1 / 8)
    assert pairwise_accuracy(deltas, uniform) < 0.5

    w = FIT_METHODS[method](deltas)
    assert_on_simplex(w, 8)
    assert int(w.argmax()) == 2
    assert w[2] > 0.8
    assert w[3] < 0.05  # the confidently wrong expert is switched off
    assert pairwise_accuracy(deltas, w) == 1.0


def test_fit_methods_registry():
    assert FIT_METHODS == {
        "hedge": fit_hedge,
        "hyre": fit_hyre,
        "gradient": fit_gradient,
        "hyre_gradient": fit_hyre_gradient,
    }


def test_hedge_small_eta_returns_prior():
    deltas = make_user_deltas()
    prior = random_simplex(8)
    torch.testing.assert_close(fit_hedge(deltas, prior=prior, eta=1e-9), prior, atol=1e-6, rtol=0)
    # ...while a normal eta moves away from it
    assert (fit_hedge(deltas, prior=prior, eta=1.0) - prior).abs().max() > 0.3


def test_hedge_is_sequential_multiplicative_weights():
    deltas = make_user_deltas(n=5, k=4)
    prior = random_simplex(4, seed=3)
    w = prior.double()
    for i in range(5):
        w = w * torch.exp(-0.7 * -torch.nn.functional.logsigmoid(deltas[i].double()))
        w = w / w.sum()
    torch.testing.assert_close(fit_hedge(deltas, prior=prior, eta=0.7), w.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", [True, False])
def test_hyre_large_temperature_returns_prior(normalize):
    deltas = make_user_deltas()
    torch.testing.assert_close(
        fit_hyre(deltas, temperature=1e9, normalize=normalize), torch.full((8,), 1 / 8), atol=1e-6, rtol=0
    )
    prior = random_simplex(8, seed=5)
    torch.testing.assert_close(
        fit_hyre(deltas, temperature=1e9, normalize=normalize, prior=prior), prior, atol=1e-6, rtol=0
    )


def test_hyre_matches_formula():
    deltas = make_user_deltas(n=6, k=4)
    expected = torch.softmax(torch.nn.functional.logsigmoid(deltas.double()).sum(0) / 2.0, dim=0).float()
    torch.testing.assert_close(fit_hyre(deltas, temperature=2.0, normalize=False), expected, atol=1e-6, rtol=0)


def test_hyre_normalize_compares_experts_on_different_scales():
    gen = torch.Generator().manual_seed(0)
    n = 32
    deltas = torch.empty(n, 3)
    deltas[:, 0] = 0.01 * (0.5 + torch.rand(n, generator=gen))  # tiny scale, always right
    deltas[:, 1] = 5.0 * (1.0 + torch.randn(n, generator=gen))  # huge scale, often right, sometimes badly wrong
    deltas[:, 2] = -3.0 - torch.rand(n, generator=gen)  # always wrong
    raw = fit_hyre(deltas, normalize=False)
    normalized = fit_hyre(deltas, normalize=True)
    assert int(raw.argmax()) == 1
    assert int(normalized.argmax()) == 0
    # the mean is not subtracted: the always-wrong expert stays switched off after normalisation
    assert normalized[2] < 1e-3


def test_gradient_huge_l2_stays_at_prior():
    deltas = make_user_deltas()
    prior = random_simplex(8, seed=1)
    w = fit_gradient(deltas, prior=prior, l2=1e4)
    assert (w - prior).abs().max() < 0.02
    torch.testing.assert_close(fit_gradient(deltas, prior=prior, steps=0), prior, atol=1e-6, rtol=0)


def test_gradient_works_under_inference_mode_and_no_grad():
    deltas = make_user_deltas()
    reference = fit_gradient(deltas, steps=30)
    with torch.inference_mode():
        inference_deltas = deltas.clone()
        w_inference = fit_gradient(inference_deltas, steps=30)
    with torch.no_grad():
        w_no_grad = fit_gradient(deltas, steps=30)
    torch.testing.assert_close(w_inference, reference)
    torch.testing.assert_close(w_no_grad, reference)


def _rms_margin(deltas: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (deltas.double() @ w.double()).pow(2).mean().sqrt()


@pytest.mark.parametrize("steps", [0, 100])
def test_hyre_gradient_averages_the_two_fits_on_a_common_scale(steps):
    deltas = make_user_deltas(n=6, k=5, seed=3) * torch.tensor([1.0, 3.0, 0.2, 1.0, 5.0])
    prior = random_simplex(5, seed=2)
    w_hyre = fit_hyre(deltas, temperature=2.0, prior=prior)
    w_gradient = fit_gradient(deltas, prior=prior, l2=0.5, steps=steps)
    # the average of the two rewards, each divided by the root-mean-square of its margins over the shots
    expected = w_hyre.double() / _rms_margin(deltas, w_hyre) + w_gradient.double() / _rms_margin(deltas, w_gradient)
    expected = (expected / expected.sum()).float()
    w = fit_hyre_gradient(deltas, prior=prior, temperature=2.0, l2=0.5, steps=steps)
    assert_on_simplex(w, 5)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)
    # a convex combination of the two fits, strictly between them
    share = (w - w_gradient).dot(w_hyre - w_gradient) / (w_hyre - w_gradient).pow(2).sum()
    assert 0.0 < share < 1.0
    torch.testing.assert_close(w, share * w_hyre + (1 - share) * w_gradient, atol=1e-6, rtol=0)


def test_hyre_gradient_defaults_are_those_of_its_components():
    deltas = make_user_deltas(n=5, k=4, seed=7)
    w_hyre, w_gradient = fit_hyre(deltas), fit_gradient(deltas)
    expected = w_hyre.double() / _rms_margin(deltas, w_hyre) + w_gradient.double() / _rms_margin(deltas, w_gradient)
    torch.testing.assert_close(fit_hyre_gradient(deltas), (expected / expected.sum()).float(), atol=1e-6, rtol=0)


def test_hyre_gradient_has_the_best_worst_case_over_kinds_of_users():
    # A user equal to one expert (HyRe's model: it wins) and a user mixing three experts (the gradient fit wins): the
    # ensemble lies between the two on each kind and is the best of the three on the worse served kind.
    gen = torch.Generator().manual_seed(0)
    k, n_shots, n_test = 6, 8, 2000
    single = torch.zeros(k)
    single[1] = 1.0
    mixed = torch.zeros(k)
    mixed[:3] = 1 / 3
    worst = {"ensemble": 1.0, "hyre": 1.0, "gradient": 1.0}
    for truth in (single, mixed):
        accuracy = {name: 0.0 for name in worst}
        for _ in range(10):
            heads = torch.randn(n_shots + n_test, k, generator=gen)
            labels = torch.sign(heads @ truth + 0.1 * torch.randn(n_shots + n_test, generator=gen))
            deltas = heads * labels.unsqueeze(-1)  # the user's chosen response first
            shots, test = deltas[:n_shots], deltas[n_shots:]
            fits = {
                "ensemble": fit_hyre_gradient(shots, l2=1.0),
                "hyre": fit_hyre(shots),
                "gradient": fit_gradient(shots, l2=1.0),
            }
            for name, weights in fits.items():
                accuracy[name] += pairwise_accuracy(test, weights) / 10
        low, high = sorted((accuracy["hyre"], accuracy["gradient"]))
        assert low < accuracy["ensemble"] < high
        worst = {name: min(worst[name], value) for name, value in accuracy.items()}
    assert worst["ensemble"] > max(worst["hyre"], worst["gradient"]) + 0.01


def test_hyre_gradient_is_static_only_and_validates_its_hyperparameters():
    deltas = make_user_deltas(n=4, k=3)
    with pytest.raises(ValueError, match="static weights"):
        fit_hyre_gradient(deltas, routing=torch.full((4, 3), 1 / 3))
    for value in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            fit_hyre_gradient(deltas, temperature=value)
        with pytest.raises(ValueError, match="lr"):
            fit_hyre_gradient(deltas, lr=value)
    with pytest.raises(ValueError, match="l2"):
        fit_hyre_gradient(deltas, l2=-1.0)
    with pytest.raises(ValueError, match="steps"):
        fit_hyre_gradient(deltas, steps=-1)
    with pytest.raises(TypeError, match="normalize"):
        fit_hyre_gradient(deltas, normalize=1)


def test_hyre_gradient_zero_margins_give_the_plain_average():
    # Every expert indifferent on every shot: both fits stay at the prior and the scales are zero (no 0/0).
    prior = random_simplex(4, seed=4)
    w = fit_hyre_gradient(torch.zeros(3, 4), prior=prior)
    torch.testing.assert_close(w, prior, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_zero_prior_expert_keeps_zero_weight(method):
    deltas = make_user_deltas(k=4, good=0) * 1e4  # expert 0 is perfect but excluded by the prior
    prior = torch.tensor([0.0, 0.2, 0.3, 0.5])
    w = fit(method, deltas, prior=prior)
    assert_on_simplex(w, 4)
    assert w[0] == 0.0


@pytest.mark.parametrize("method", ["hedge", "gradient"])
def test_uniform_routing_equals_static(method):
    deltas = make_user_deltas(n=10, k=4)
    routing = torch.full((10, 4), 0.25)
    torch.testing.assert_close(fit(method, deltas, routing=routing), fit(method, deltas), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["hedge", "gradient"])
def test_routed_fit_ignores_experts_the_router_never_uses(method):
    # Expert 1 is always wrong but the router never sends these prompts to it: in routed mode it is not blamed.
    n = 16
    deltas = torch.stack([torch.full((n,), 1.0), torch.full((n,), -3.0), torch.full((n,), 0.5)], dim=1)
    routing = torch.tensor([[0.5, 0.0, 0.5]]).repeat(n, 1)
    routed = fit(method, deltas, routing=routing)
    static = fit(method, deltas)
    assert routed[1] > static[1] + 0.05
    assert pairwise_accuracy(deltas, routed, routing=routing) == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Batching and masking
# ----------------------------------------------------------------------------------------------------------------------


def _ragged_batch(k: int = 5, lengths=(7, 3, 1, 5), pad_value: float = 123.0):
    users = [make_user_deltas(n=n, k=k, good=i % k, seed=10 + i) for i, n in enumerate(lengths)]
    routing = [
        torch.softmax(torch.randn(n, k, generator=torch.Generator().manual_seed(i)), -1) for i, n in enumerate(lengths)
    ]
    n_max = max(lengths)
    deltas = torch.full((len(lengths), n_max, k), pad_value)
    g = torch.full((len(lengths), n_max, k), pad_value)
    mask = torch.zeros(len(lengths), n_max, dtype=torch.bool)
    for u, (d, r) in enumerate(zip(users, routing)):
        deltas[u, : len(d)] = d
        g[u, : len(d)] = r
        mask[u, : len(d)] = True
    return users, routing, deltas, g, mask


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_user(method):
    users, _, deltas, _, mask = _ragged_batch()
    priors = torch.stack([random_simplex(5, seed=s) for s in range(len(users))])
    batched = fit(method, deltas, mask=mask, prior=priors)
    assert_on_simplex(batched, 5, batch=len(users))
    for u, d in enumerate(users):
        torch.testing.assert_close(batched[u], fit(method, d, prior=priors[u]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["hedge", "gradient"])
def test_batched_routed_equals_per_user(method):
    users, routing, deltas, g, mask = _ragged_batch()
    batched = fit(method, deltas, mask=mask, routing=g, beta=0.5)
    for u, (d, r) in enumerate(zip(users, routing)):
        torch.testing.assert_close(batched[u], fit(method, d, routing=r, beta=0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_padding_values_do_not_matter(method):
    _, _, deltas_a, g_a, mask = _ragged_batch(pad_value=0.0)
    _, _, deltas_b, g_b, _ = _ragged_batch(pad_value=1e4)
    deltas_c = deltas_b.clone()
    deltas_c[~mask] = float("nan")  # even NaN padding is ignored
    reference = fit(method, deltas_a, mask=mask)
    torch.testing.assert_close(fit(method, deltas_b, mask=mask), reference)
    torch.testing.assert_close(fit(method, deltas_c, mask=mask), reference)
    if method not in STATIC_ONLY:
        torch.testing.assert_close(
            fit(method, deltas_a, mask=mask, routing=g_a), fit(method, deltas_b, mask=mask, routing=g_b)
        )


def test_one_dimensional_mask_for_single_user():
    deltas = make_user_deltas(n=6, k=3)
    mask = torch.tensor([True, True, True, False, False, True])
    torch.testing.assert_close(fit_hedge(deltas, mask=mask), fit_hedge(deltas[mask]))


# ----------------------------------------------------------------------------------------------------------------------
# Numerical robustness
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "deltas",
    [
        torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [1e4, 1e4, -1e4]]),
        torch.full((4, 3), 2.5),  # all equal
        torch.zeros(4, 3),
        torch.tensor([[3.0]]),  # K=1, n=1
        torch.tensor([[0.3, -0.2, 5.0, -1e4]]),  # n=1
        torch.randn(5, 1),  # K=1
    ],
    ids=["extreme", "all-equal", "zeros", "k1-n1", "n1", "k1"],
)
def test_degenerate_inputs_give_finite_simplex_weights(method, deltas):
    w = fit(method, deltas)
    assert_on_simplex(w, deltas.shape[1])
    if deltas.shape[1] == 1:
        assert w.tolist() == [1.0]
    if bool((deltas == deltas[0, 0]).all()):  # indistinguishable experts stay at the uniform prior
        torch.testing.assert_close(w, torch.full_like(w, 1 / deltas.shape[1]))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(1, 5),
    k=st.integers(1, 4),
    method=st.sampled_from(METHODS),
)
def test_fuzz_weights_always_on_simplex(data, n, k, method):
    values = data.draw(
        st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32), min_size=n * k, max_size=n * k)
    )
    deltas = torch.tensor(values, dtype=torch.float32).reshape(n, k)
    kwargs = {"steps": 15} if method in ("gradient", "hyre_gradient") else {}
    if method == "hedge":
        kwargs["eta"] = data.draw(st.floats(1e-6, 1e300))
    elif method in STATIC_ONLY:
        kwargs["temperature"] = data.draw(st.floats(1e-300, 1e300))
        kwargs["normalize"] = data.draw(st.booleans())
    if method not in STATIC_ONLY and data.draw(st.booleans()):
        routing = torch.tensor(
            data.draw(st.lists(st.floats(0, 1, width=32), min_size=n * k, max_size=n * k)), dtype=torch.float32
        ).reshape(n, k)
        kwargs["routing"] = routing
        kwargs["beta"] = data.draw(st.floats(0, 4))
    w = FIT_METHODS[method](deltas, **kwargs)
    assert_on_simplex(w, k)


def test_extreme_hyperparameters_stay_finite():
    deltas = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
    routing = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.0, 0.9]])
    best = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(fit_hedge(deltas, eta=1e300), best)
    assert_on_simplex(fit_hedge(deltas, eta=1e300, routing=routing), 3)
    torch.testing.assert_close(fit_hyre(deltas, temperature=5e-324), best)  # no 0/0 even when T underflows
    torch.testing.assert_close(
        fit_hyre(deltas, temperature=1e-300, prior=torch.tensor([0.5, 0.5, 0.0]))[2], torch.tensor(0.0)
    )
    torch.testing.assert_close(fit_gradient(deltas, l2=1e300), torch.full((3,), 1 / 3))
    assert_on_simplex(fit_gradient(deltas, lr=1e300), 3)
    with pytest.raises(ValueError, match="diverged.*lower `lr`"):
        fit_gradient(deltas, lr=1.7e308)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_deltas_are_accepted(method, dtype):
    deltas = make_user_deltas()
    w = fit(method, deltas.to(dtype))
    assert_on_simplex(w, 8)
    torch.testing.assert_close(w, fit(method, deltas.to(dtype).float()), atol=1e-5, rtol=0)
    assert int(w.argmax()) == 2


# ----------------------------------------------------------------------------------------------------------------------
# Using the weights
# ----------------------------------------------------------------------------------------------------------------------


def test_routed_weights_values_and_zero_fallback():
    routing = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.25, 0.25, 0.5]])
    w = torch.tensor([0.2, 0.8, 0.0])
    out = routed_weights(routing, w)
    torch.testing.assert_close(out[0], torch.tensor([0.2, 0.8, 0.0]))
    torch.testing.assert_close(out[1], w)  # product is all zero -> falls back to the user's weights
    torch.testing.assert_close(out[2], torch.tensor([0.2, 0.8, 0.0]))
    sharp = routed_weights(torch.tensor([[0.8, 0.2, 0.0]]), torch.tensor([0.5, 0.5, 0.0]), beta=2.0)
    torch.testing.assert_close(sharp[0], torch.tensor([0.64, 0.04, 0.0]) / 0.68)
    torch.testing.assert_close(routed_weights(routing, w, beta=0.0), w.expand(3, 3))


def test_routing_underflow_is_handled():
    # g^beta underflows to 0 in floating point, but normalize(g^beta * w) is still well defined: the tiny expert wins.
    routing = torch.tensor([[1e-100, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        routed_weights(routing, torch.tensor([0.2, 0.4, 0.4], dtype=torch.float64), beta=4.0),
        torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64),
    )
    # regression (found by hypothesis): a float32 denormal-range router weight used to give NaN gradients
    deltas = torch.zeros(2, 5)
    deltas[1, 4] = 1.0
    routing = torch.zeros(2, 5)
    routing[1, 4] = 1.1754943508222875e-38
    for method in ("hedge", "gradient"):
        assert_on_simplex(fit(method, deltas, routing=routing), 5)


def test_mixture_scores_and_accuracy():
    scores = torch.tensor([[1.0, -2.0], [-1.0, 3.0], [0.5, 0.5]])
    w = torch.tensor([0.75, 0.25])
    torch.testing.assert_close(mixture_scores(scores, w), torch.tensor([0.25, 0.0, 0.5]))
    assert pairwise_accuracy(scores, w) == pytest.approx(2.5 / 3)  # a tie counts as half a correct pair
    routing = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    torch.testing.assert_close(mixture_scores(scores, w, routing=routing), torch.tensor([1.0, 3.0, 0.5]))
    assert pairwise_accuracy(scores, w, routing=routing) == 1.0
    batched = mixture_scores(scores.expand(2, 3, 2), torch.stack([w, w.flip(0)]))
    torch.testing.assert_close(batched[0], mixture_scores(scores, w))


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_raise_clear_errors(method):
    f = FIT_METHODS[method]
    good = make_user_deltas(n=4, k=3)
    with pytest.raises(ValueError, match="zero shots"):
        f(torch.empty(0, 3))
    with pytest.raises(ValueError, match=r"batch index \[1\] have zero shots"):
        f(good.expand(2, 4, 3), mask=torch.tensor([[True] * 4, [False] * 4]))
    bad = good.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        f(bad)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        f(bad)
    with pytest.raises(ValueError, match="K=3 experts"):
        f(good, prior=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="sum to 1"):
        f(good, prior=torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="negative"):
        f(good, prior=torch.tensor([1.5, -0.5, 0.0]))
    with pytest.raises(ValueError, match=r"shape \(n, K\)"):
        f(torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(n, K\)"):
        f(torch.ones(1, 2, 3, 4))
    with pytest.raises(ValueError, match="`mask` must have shape"):
        f(good.expand(2, 4, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="real numbers"):
        f(torch.ones(2, 2, dtype=torch.complex64))


def test_bad_hyperparameters_raise():
    d = make_user_deltas(n=4, k=3)
    for value in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            fit_hyre(d, temperature=value)
        with pytest.raises(ValueError, match="eta"):
            fit_hedge(d, eta=value)
        with pytest.raises(ValueError, match="lr"):
            fit_gradient(d, lr=value)
    with pytest.raises(ValueError, match="l2"):
        fit_gradient(d, l2=-1.0)
    with pytest.raises(ValueError, match="steps"):
        fit_gradient(d, steps=-1)
    with pytest.raises(ValueError, match="routing"):
        fit_hedge(d, routing=torch.ones(3, 3))
    with pytest.raises(ValueError, match="negative"):
        fit_gradient(d, routing=-torch.ones(4, 3))
    with pytest.raises(ValueError, match="beta"):
        routed_weights(torch.ones(2, 3), torch.ones(3) / 3, beta=-1.0)
