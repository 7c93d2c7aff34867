"""
Test-time personalisation of a sparse Mixture-of-Experts reward model.

A reward model with `K` frozen expert heads gives, for every labelled pair `i` of a user (chosen vs. rejected), a
vector of reward *differences* `deltas[i, k] = r_k(chosen_i) - r_k(rejected_i)`. The functions in this module fit a
per-user weight vector `w` on the probability simplex from a handful of such pairs ("shots"), so that the user's reward
is `r_u = sum_k w_k r_k` (static mode) or `r_u = sum_k normalize(g(x)^beta * w)_k r_k` (routed mode, where `g(x)` are
the router's per-prompt expert weights).

All fitting functions accept a single user, `deltas` of shape `(n, K)`, or a batch of users, `deltas` of shape
`(U, n, K)` together with a boolean `mask` of shape `(U, n)` marking the real (non-padding) shots of each user. They
return float32 weights of shape `(K,)` or `(U, K)` that are finite, non-negative and sum to one. The fit runs on CPU
(the problems are tiny); the weights are returned on the device of `deltas`.

Every method scores an expert on a pair with the Bradley-Terry (BT) loss `-logsigmoid(delta)`, i.e. the negative
log-likelihood that the expert prefers the chosen response. It is the loss the reward model was trained with, it is
bounded below by zero, smooth, and grows only linearly for badly wrong experts (so a single outlier pair cannot
annihilate an expert the way a 0/1 or exponential loss would).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .accuracy import pairwise_outcomes
from .modeling_moe_reward import log_routing, mix_log_weights, softmax_rows, user_mixture_weights


__all__ = [
    "FIT_METHODS",
    "STATIC_ONLY_METHODS",
    "fit_gradient",
    "fit_hedge",
    "fit_hyre",
    "fit_hyre_gradient",
    "mixture_scores",
    "pairwise_accuracy",
    "routed_weights",
]

_SIMPLEX_ATOL = 1e-4
# Routed mass `sum_k g~_k w_k` below which `fit_gradient` treats a shot as unrouted (keeps 1/mass^2 finite).
_MIN_ROUTED_MASS = 1e-100
# Lower bound on the scale used by `fit_hyre(normalize=True)`.
_NORM_EPS = 1e-6

TensorLike = torch.Tensor | Sequence[float] | Sequence[Sequence[float]]


# ----------------------------------------------------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------------------------------------------------


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_float_tensor(x: TensorLike, name: str) -> torch.Tensor:
    """Returns `x` as a detached CPU tensor of a real dtype (not converted yet)."""
    if isinstance(x, torch.Tensor):
        tensor = x
    else:
        try:
            tensor = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"`{name}` must be a torch.Tensor or a nested list of floats, got {type(x).__name__}."
            ) from exc
    if not (tensor.is_floating_point() or tensor.dtype in _INT_DTYPES):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {tensor.dtype}; cast it with `.float()`.")
    return tensor.detach().cpu()


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a positive number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}; pass a positive value.")
    return float(value)


def _check_non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a non-negative number, got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


def _prepare_deltas(
    deltas: TensorLike, mask: torch.Tensor | Sequence[bool] | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """
    Validates `deltas`/`mask` and returns `(deltas, mask, batched)` with `deltas` of shape `(U, n, K)` in float64 (padding
    zeroed) and `mask` of shape `(U, n)` bool.
    """
    d = _as_float_tensor(deltas, "deltas")
    if d.dim() == 2:
        batched = False
        d = d.unsqueeze(0)
    elif d.dim() == 3:
        batched = True
    else:
        raise ValueError(
            f"`deltas` must have shape (n, K) for one user or (U, n, K) for a batch of users, got shape "
            f"{tuple(d.shape)}."
        )
    num_users, n, k = d.shape
    if k == 0:
        raise ValueError("`deltas` has K=0 experts; the last dimension must index the reward model's experts.")
    if num_users == 0:
        raise ValueError("`deltas` has a batch of U=0 users; pass at least one user.")
    if n == 0:
        raise ValueError(
            "`deltas` has zero shots (n == 0): at least one labelled pair per user is needed to fit weights; "
            "use the model's default routing weights (the prior) for users without labelled pairs."
        )

    if mask is None:
        m = torch.ones(num_users, n, dtype=torch.bool)
    else:
        m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
        m = m.detach().cpu()
        if m.dtype != torch.bool:
            if m.is_floating_point() or not bool(((m == 0) | (m == 1)).all()):
                raise TypeError(
                    f"`mask` must be a boolean tensor, got dtype {m.dtype}; build it with `lengths > idx`."
                )
            m = m.bool()
        if not batched and m.dim() == 1:
            m = m.unsqueeze(0)
        if tuple(m.shape) != (num_users, n):
            expected = f"({num_users}, {n})" if batched else f"({n},)"
            raise ValueError(
                f"`mask` must have shape {expected} to match `deltas` {tuple(deltas.shape)}, got {tuple(m.shape)}."
            )
    counts = m.sum(dim=1)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(
            f"user(s) at batch index {empty[:10]} have zero shots (all-False `mask` row); at least one labelled pair "
            "per user is needed: drop these users from the batch or give them the prior weights directly."
        )

    d = d.to(torch.float64)
    finite = torch.isfinite(d) | ~m.unsqueeze(-1)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(
            f"`deltas` contains {bad} NaN/Inf value(s) in unmasked shots; drop or fix these pairs (or mask them out) "
            "before fitting."
        )
    d = torch.where(m.unsqueeze(-1), d, torch.zeros((), dtype=d.dtype))
    return d, m, batched


def _prepare_prior(prior: TensorLike | None, num_users: int, k: int, batched: bool) -> torch.Tensor:
    """Returns the prior as a float64 tensor of shape `(U, K)` on the simplex."""
    if prior is None:
        return torch.full((num_users, k), 1.0 / k, dtype=torch.float64)
    p = _as_float_tensor(prior, "prior").to(torch.float64)
    if p.dim() == 1:
        if p.shape[0] != k:
            raise ValueError(
                f"`prior` has {p.shape[0]} entries but `deltas` has K={k} experts; pass one prior weight per expert."
            )
        p = p.unsqueeze(0).expand(num_users, k)
    elif p.dim() == 2 and batched:
        if tuple(p.shape) != (num_users, k):
            raise ValueError(f"`prior` must have shape ({k},) or ({num_users}, {k}), got {tuple(p.shape)}.")
    else:
        expected = f"({k},) or ({num_users}, {k})" if batched else f"({k},)"
        raise ValueError(f"`prior` must have shape {expected}, got {tuple(p.shape)}.")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(
            "`prior` contains NaN/Inf; pass a finite weight vector on the simplex (e.g. mean router weights)."
        )
    if bool((p < 0).any()):
        raise ValueError(
            "`prior` has negative entries; it must be a point on the simplex (non-negative, summing to 1)."
        )
    sums = p.sum(dim=-1)
    if bool(((sums - 1).abs() > _SIMPLEX_ATOL).any()):
        raise ValueError(
            f"`prior` must sum to 1 (got sum(s) {sums[:5].tolist()}); normalise it first, e.g. `prior / prior.sum()`."
        )
    return p / sums.unsqueeze(-1)


def _prepare_routing(routing: TensorLike, shape: tuple[int, int, int], batched: bool) -> torch.Tensor:
    """Returns routing as float64 `(U, n, K)`, validated non-negative and finite."""
    g = _as_float_tensor(routing, "routing").to(torch.float64)
    if not batched and g.dim() == 2:
        g = g.unsqueeze(0)
    if tuple(g.shape) != shape:
        expected = shape if batched else shape[1:]
        raise ValueError(
            f"`routing` must have the same shape as `deltas` {tuple(expected)} (per-shot router weights), got "
            f"{tuple(routing.shape) if isinstance(routing, torch.Tensor) else tuple(g.shape)}."
        )
    return g


def _check_routing_values(g: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    valid = mask.unsqueeze(-1) if mask is not None else torch.ones((), dtype=torch.bool)
    bad = ~torch.isfinite(g) & valid
    if bool(bad.any()):
        raise ValueError("`routing` contains NaN/Inf values; pass the router's (softmax) weights for each shot.")
    if bool(((g < 0) & valid).any()):
        raise ValueError("`routing` has negative entries; pass non-negative router weights (e.g. softmax outputs).")
    if mask is not None:
        g = torch.where(valid, g, torch.ones((), dtype=g.dtype))
    return g


def _device_of(x: TensorLike) -> torch.device:
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _finalize(log_w: torch.Tensor, batched: bool, device: torch.device) -> torch.Tensor:
    """Normalises log-weights `(U, K)` into float32 simplex weights, squeezing the batch dim for a single user."""
    w = softmax_rows(log_w.to(torch.float64))
    w = torch.nan_to_num(w, nan=0.0).clamp_min(0.0)
    w = w / w.sum(dim=-1, keepdim=True)
    w = w.to(torch.float32)
    # float32 rounding can leave the sum a few ulps away from one: fold the residual into the largest entry.
    residual = 1.0 - w.sum(dim=-1, keepdim=True)
    top = w.argmax(dim=-1, keepdim=True)
    w = w.scatter_add(-1, top, residual).clamp_min(0.0)
    w = w if batched else w.squeeze(0)
    return w.to(device)


def _bt_loss(deltas: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss `-logsigmoid(delta)` (elementwise, numerically stable)."""
    return F.softplus(-deltas)


def _log_prior(prior: torch.Tensor) -> torch.Tensor:
    # log(0) = -inf on purpose: an expert with zero prior weight must keep exactly zero weight whatever its losses
    # (a finite stand-in could be overtaken by the others' accumulated losses). The prior sums to one, so every row
    # keeps at least one finite entry and the softmax stays well defined.
    return torch.log(prior)


def _shift_to_best(total_loss: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """
    Subtracts, per user, the smallest loss among experts with non-zero prior weight. The softmax is unchanged, but the
    best expert gets exactly 0 so that dividing by a tiny temperature (or multiplying by a huge `eta`) can only send the
    *other* experts to -inf, never every expert (which would give NaN).
    """
    supported = torch.isfinite(log_prior)
    best = torch.where(supported, total_loss, torch.full_like(total_loss, math.inf)).amin(dim=-1, keepdim=True)
    return (total_loss - best).clamp_min(0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Fitting methods
# ----------------------------------------------------------------------------------------------------------------------


def fit_hedge(
    deltas: TensorLike,
    prior: TensorLike | None = None,
    eta: float = 1.0,
    mask: torch.Tensor | None = None,
    routing: TensorLike | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """
    Fits user weights with multiplicative weights (Hedge) over the labelled pairs.

    Starting from `prior`, each shot `i` multiplies every expert's weight by `exp(-eta * loss[i, k])` and renormalises,
    where `loss[i, k] = -logsigmoid(deltas[i, k])` is the Bradley-Terry loss of expert `k` on pair `i` (see the module
    docstring for why this loss is used). Without routing the result does not depend on the order of the shots and
    equals `softmax(log(prior) - eta * sum_i loss[i])`; it is computed in log space (float64) so that extreme deltas or a
    huge `eta` cannot produce `0/0`.

    With `routing`, the update is the "sleeping experts" variant of Hedge matched to the routed mode: on shot `i` expert
    `k` is awake with probability `a[i, k] = g[i, k]^beta / max_j g[i, j]^beta`, and its weight is multiplied by
    `exp(-eta * a[i, k] * (loss[i, k] - loss_hat[i]))` where `loss_hat[i] = sum_k p[i, k] loss[i, k]` is the expected
    loss under the current routed weights `p[i] = normalize(g[i]^beta * w)`. Experts the router does not use on a prompt
    are not blamed (or credited) for it. Shots are then processed in order. With uniform routing this reduces exactly
    to plain Hedge. A routing row that is all zero is treated as uniform.

    Experts with zero prior weight keep zero weight.

    Args:
        deltas (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert reward differences `r_k(chosen) - r_k(rejected)` of the user's labelled pairs. Any floating dtype
            (fp16/bf16 included) is accepted; computations run in float64.
        prior (`torch.Tensor` of shape `(K,)` or `(U, K)`, *optional*):
            Starting weights on the simplex, e.g. the mean router weights. Uniform if `None`.
        eta (`float`, *optional*, defaults to `1.0`):
            Learning rate of the multiplicative update. `eta -> 0` returns the prior; large `eta` concentrates the
            weight on the expert with the lowest cumulative loss.
        mask (`torch.Tensor` of shape `(n,)` or `(U, n)`, *optional*):
            Boolean mask of the real shots; `False` entries (padding) are ignored. All `True` if `None`.
        routing (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`, *optional*):
            Per-shot router weights `g(x_i)` for the routed mode (see above). Static Hedge if `None`.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent applied to the routing weights. Only used with `routing`.

    Returns:
        `torch.Tensor`: float32 weights of shape `(K,)` (or `(U, K)` for batched input) on the simplex.

    Raises:
        ValueError: on zero shots, NaN/Inf deltas, a prior off the simplex or of the wrong size, mismatched shapes or
            `eta <= 0`.
    """
    eta = _check_positive(eta, "eta")
    d, m, batched = _prepare_deltas(deltas, mask)
    num_users, n, k = d.shape
    log_w = _log_prior(_prepare_prior(prior, num_users, k, batched))
    loss = _bt_loss(d) * m.unsqueeze(-1)

    if routing is None:
        return _finalize(log_w - eta * _shift_to_best(loss.sum(dim=1), log_w), batched, _device_of(deltas))

    beta = _check_non_negative(beta, "beta")
    g = _check_routing_values(_prepare_routing(routing, (num_users, n, k), batched), m)
    log_g = log_routing(g, beta)
    all_zero = torch.isneginf(log_g).all(dim=-1, keepdim=True)
    awake = torch.where(all_zero, torch.ones_like(log_g), torch.exp(log_g))  # g^beta / max_j g^beta
    awake = awake * m.unsqueeze(-1)  # padding shots are asleep for everybody -> no update
    log_g = torch.where(all_zero, torch.zeros_like(log_g), log_g)
    for i in range(n):
        p = mix_log_weights(log_g[:, i], log_w)
        expected = (p * loss[:, i]).sum(dim=-1, keepdim=True)
        step = eta * awake[:, i] * (loss[:, i] - expected)
        # A huge `eta` may overflow the step: cap it (an expert's log-weight is <= 0 after normalisation, so capping at
        # +-1e300 keeps the best expert finite and the others can only fall to -inf).
        log_w = log_w - torch.nan_to_num(step, nan=0.0, posinf=1e300, neginf=-1e300)
        shift = log_w.amax(dim=-1, keepdim=True)  # finite: the best expert's log-weight
        log_w = log_w - (shift + torch.log(torch.exp(log_w - shift).sum(dim=-1, keepdim=True)))
    return _finalize(log_w, batched, _device_of(deltas))


def fit_hyre(
    deltas: TensorLike,
    temperature: float = 1.0,
    normalize: bool = True,
    prior: TensorLike | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Fits user weights with HyRe (test-time ensemble reweighting), as used by Decomposed Reward Models (DRMs).

    The weights are `softmax(log(prior) - sum_i loss[i, k] / temperature)` where `loss[i, k] = -logsigmoid(deltas[i, k])`
    is the Bradley-Terry loss of expert `k` on shot `i`, i.e. a posterior over "which expert is the user's reward" under a
    tempered BT likelihood. With a uniform prior (`prior=None`) the log-prior term is a constant and drops out.

    With `normalize=True`, each expert's deltas are first divided by that expert's standard deviation over the user's
    (unmasked) shots so that experts whose reward heads live on different scales are compared fairly. The mean is
    deliberately *not* subtracted: centring would flip the sign of some deltas and hence change which response the
    expert prefers. When the standard deviation is (numerically) zero - a single shot, or identical deltas - the expert's
    root-mean-square delta is used instead, so the normalised deltas become `+-1` (the sign of the expert's preference),
    and the scale is floored at `1e-6` (an expert with all-zero deltas stays at zero: no preference, loss `log 2`).

    Args:
        deltas (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert reward differences `r_k(chosen) - r_k(rejected)` of the user's labelled pairs.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature `T > 0`. `T -> inf` returns the prior (uniform if `None`); `T -> 0` puts all the weight
            on the expert(s) with the lowest total loss.
        normalize (`bool`, *optional*, defaults to `True`):
            Whether to scale each expert's deltas by their standard deviation over the shots (see above).
        prior (`torch.Tensor` of shape `(K,)` or `(U, K)`, *optional*):
            Prior weights on the simplex; `log(prior)` is added to the logits. Uniform if `None`.
        mask (`torch.Tensor` of shape `(n,)` or `(U, n)`, *optional*):
            Boolean mask of the real shots; `False` entries (padding) are ignored.

    Returns:
        `torch.Tensor`: float32 weights of shape `(K,)` (or `(U, K)`) on the simplex.

    Raises:
        ValueError: on zero shots, NaN/Inf deltas, a bad prior, mismatched shapes or `temperature <= 0`.
    """
    temperature = _check_positive(temperature, "temperature")
    if not isinstance(normalize, bool):
        raise TypeError(f"`normalize` must be a bool, got {normalize!r}.")
    d, m, batched = _prepare_deltas(deltas, mask)
    num_users, _, k = d.shape
    log_prior = _log_prior(_prepare_prior(prior, num_users, k, batched))
    mf = m.unsqueeze(-1).to(d.dtype)
    if normalize:
        counts = mf.sum(dim=1, keepdim=True)  # (U, 1, 1)
        mean = (d * mf).sum(dim=1, keepdim=True) / counts
        var = (((d - mean) * mf) ** 2).sum(dim=1, keepdim=True) / counts
        std = var.sqrt()
        rms = ((d * mf) ** 2).sum(dim=1, keepdim=True).div(counts).sqrt()
        degenerate = std <= torch.clamp(1e-6 * rms, min=_NORM_EPS)
        scale = torch.where(degenerate, rms, std).clamp_min(_NORM_EPS)
        d = d / scale
    total_loss = (_bt_loss(d) * mf).sum(dim=1)  # (U, K)
    return _finalize(log_prior - _shift_to_best(total_loss, log_prior) / temperature, batched, _device_of(deltas))


def fit_gradient(
    deltas: TensorLike,
    prior: TensorLike | None = None,
    l2: float = 0.1,
    lr: float = 0.1,
    steps: int = 100,
    mask: torch.Tensor | None = None,
    routing: TensorLike | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """
    Fits user weights by gradient descent on the Bradley-Terry loss of the mixture reward (as in LoRe).

    The weights are parameterised as `w = softmax(theta)` with `theta` initialised to `log(prior)`, and `theta` is
    optimised with Adam to minimise

        mean_i -logsigmoid(sum_k p[i, k] * deltas[i, k]) + l2 * ||w - prior||^2

    where `p[i] = w` in static mode, or `p[i] = normalize(routing[i]^beta * w)` when `routing` is given (routed mode;
    a shot whose routed mass `sum_k routing[i, k]^beta w_k` is zero - below `1e-100` after scaling the row's largest
    routing weight to 1 - uses `w`, as [`routed_weights`] does). The optimisation runs in float64.

    A batch of users is optimised jointly with a single Adam over a `(U, K)` parameter; since Adam is elementwise and the
    objective is a sum of per-user terms, each user's result equals a single-user call. Experts with zero prior weight
    keep zero weight (their logit starts at `-inf` and receives no gradient). Since Adam is invariant to the scale of
    the objective, it is divided by `max(1, l2)` internally so that a huge `l2` cannot overflow.

    Gradients are enabled internally, so the function also works inside `torch.no_grad()` / `torch.inference_mode()`.

    Args:
        deltas (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert reward differences `r_k(chosen) - r_k(rejected)` of the user's labelled pairs.
        prior (`torch.Tensor` of shape `(K,)` or `(U, K)`, *optional*):
            Prior weights on the simplex (initialisation and anchor of the L2 penalty). Uniform if `None`.
        l2 (`float`, *optional*, defaults to `0.1`):
            Strength of the `||w - prior||^2` penalty. Large values keep the weights at the prior.
        lr (`float`, *optional*, defaults to `0.1`):
            Adam learning rate.
        steps (`int`, *optional*, defaults to `100`):
            Number of Adam steps. `0` returns the prior.
        mask (`torch.Tensor` of shape `(n,)` or `(U, n)`, *optional*):
            Boolean mask of the real shots; `False` entries (padding) are ignored.
        routing (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`, *optional*):
            Per-shot router weights for the routed mode. Static mixture if `None`.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent applied to the routing weights. Only used with `routing`.

    Returns:
        `torch.Tensor`: float32 weights of shape `(K,)` (or `(U, K)`) on the simplex.

    Raises:
        ValueError: on zero shots, NaN/Inf deltas, a bad prior, mismatched shapes, `lr <= 0`, `l2 < 0`, `steps < 0`, or
            if the optimisation diverges (absurdly large `lr`).
    """
    l2 = _check_non_negative(l2, "l2")
    lr = _check_positive(lr, "lr")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0, got {steps!r}.")
    with torch.inference_mode(False), torch.enable_grad():
        d, m, batched = _prepare_deltas(deltas, mask)
        num_users, n, k = d.shape
        prior_t = _prepare_prior(prior, num_users, k, batched)
        g_tilde = None
        if routing is not None:
            beta = _check_non_negative(beta, "beta")
            g = _check_routing_values(_prepare_routing(routing, (num_users, n, k), batched), m)
            # g^beta / max_j g^beta per shot: in [0, 1] with a 1 on every row that has any routing mass.
            g_tilde = torch.exp(log_routing(g, beta)).clone()
        # Everything is float64 (as cheap as float32 at these sizes, and it keeps the routed gradients finite) and
        # created here, so these are normal tensors even if the caller is in inference mode.
        d64 = d.clone()
        gd = g_tilde * d64 if g_tilde is not None else None
        weight = (m.to(torch.float64) / m.sum(dim=1, keepdim=True).to(torch.float64)).clone()  # per-shot 1/n_u
        prior64 = prior_t.clone()
        theta = _log_prior(prior_t).clone().requires_grad_(True)
        objective_scale = max(1.0, l2)
        if steps > 0:
            optimizer = torch.optim.Adam([theta], lr=lr, foreach=False)
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                w = softmax_rows(theta)
                w_col = w.unsqueeze(-1)  # (U, K, 1)
                # Sums over experts are written as batched matmuls: last-dim reductions on small tensors are slow
                # when intra-op threads compete for a busy CPU.
                reward_diff = torch.bmm(d64, w_col).squeeze(-1)  # (U, n): static mixture
                if g_tilde is not None:
                    # sum_k normalize(g^beta * w)_k d_k = (sum_k g~_k w_k d_k) / (sum_k g~_k w_k)
                    numerator = torch.bmm(gd, w_col).squeeze(-1)
                    denominator = torch.bmm(g_tilde, w_col).squeeze(-1)
                    # (numerically) all-zero routed mass: fall back to the static weights, as `routed_weights` does
                    safe = denominator > _MIN_ROUTED_MASS
                    ones = torch.ones((), dtype=denominator.dtype)
                    reward_diff = torch.where(safe, numerator / torch.where(safe, denominator, ones), reward_diff)
                bt = (F.softplus(-reward_diff) * weight).sum()
                penalty = ((w - prior64) ** 2).sum()
                # Adam is invariant to the scale of the objective: dividing by max(1, l2) changes nothing but keeps a
                # huge `l2` from overflowing.
                (bt / objective_scale + (l2 / objective_scale) * penalty).backward()
                try:
                    optimizer.step()
                except RuntimeError as exc:
                    raise ValueError(f"`lr`={lr!r} is too large for an Adam step; use e.g. lr=0.1.") from exc
        log_w = theta.detach()
        if bool(torch.isnan(log_w).any() | (log_w == math.inf).any()):
            raise ValueError("fit_gradient diverged (non-finite logits); lower `lr` or `l2`, or check the deltas.")
    return _finalize(log_w, batched, _device_of(deltas))


def fit_hyre_gradient(
    deltas: TensorLike,
    prior: TensorLike | None = None,
    temperature: float = 1.0,
    normalize: bool = True,
    l2: float = 0.1,
    lr: float = 0.1,
    steps: int = 100,
    mask: torch.Tensor | None = None,
    routing: TensorLike | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """
    Fits user weights with an ensemble of HyRe ([`fit_hyre`]) and the gradient fit ([`fit_gradient`]).

    Both fits are run on the same shots and their reward margins are averaged after putting each on a common scale: the
    user's reward is `r_u = (r_hyre / s_hyre + r_gradient / s_gradient) / 2`, where `s` is the root-mean-square of a
    fit's reward differences `sum_k w_k deltas[i, k]` over the user's (unmasked) shots. Since both fits act on the same
    expert rewards, this is again a convex combination of the experts:

        w = a * w_hyre + (1 - a) * w_gradient,    a = s_gradient / (s_hyre + s_gradient)

    (equal weights when both scales are zero; each scale is floored at `1e-6` times the larger one). HyRe is a posterior
    over *which single expert* is the user's reward and excels when one expert fits the user; the gradient fit
    optimises a *mixture* of experts and excels for users who mix several. Their errors differ, and the common scale
    keeps the fit with larger margins from dominating the average. Everything uses only the user's own shots.

    The defaults of each fit are those of [`fit_hyre`] and [`fit_gradient`]. Experts with zero prior weight keep zero
    weight. Only static weights are fitted (HyRe has no routed mode): passing `routing` raises a `ValueError`.

    Args:
        deltas (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert reward differences `r_k(chosen) - r_k(rejected)` of the user's labelled pairs.
        prior (`torch.Tensor` of shape `(K,)` or `(U, K)`, *optional*):
            Prior weights on the simplex, used by both fits. Uniform if `None`.
        temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of HyRe.
        normalize (`bool`, *optional*, defaults to `True`):
            Whether HyRe scales each expert's deltas by their standard deviation over the shots.
        l2 (`float`, *optional*, defaults to `0.1`):
            Strength of the gradient fit's `||w - prior||^2` penalty (the few-shot benchmark's hidden-context recipe
            uses `l2=1.0`).
        lr (`float`, *optional*, defaults to `0.1`):
            Adam learning rate of the gradient fit.
        steps (`int`, *optional*, defaults to `100`):
            Number of Adam steps of the gradient fit.
        mask (`torch.Tensor` of shape `(n,)` or `(U, n)`, *optional*):
            Boolean mask of the real shots; `False` entries (padding) are ignored.
        routing (`torch.Tensor`, *optional*):
            Not supported (static weights only); accepted so that a routed call fails with a clear message.
        beta (`float`, *optional*, defaults to `1.0`):
            Not used (static weights only).

    Returns:
        `torch.Tensor`: float32 weights of shape `(K,)` (or `(U, K)`) on the simplex.

    Raises:
        ValueError: on zero shots, NaN/Inf deltas, a bad prior, mismatched shapes, `routing` given, or an invalid
            hyperparameter of either fit (`temperature <= 0`, `l2 < 0`, `lr <= 0`, `steps < 0`).
    """
    if routing is not None:
        raise ValueError(
            "`fit_hyre_gradient` fits static weights (HyRe has no routed mode); use `mode='static'`, or "
            "'hedge'/'gradient' for routed weights."
        )
    w_hyre = fit_hyre(deltas, temperature=temperature, normalize=normalize, prior=prior, mask=mask)
    w_gradient = fit_gradient(deltas, prior=prior, l2=l2, lr=lr, steps=steps, mask=mask)
    d, m, batched = _prepare_deltas(deltas, mask)
    num_users, _, k = d.shape
    weights = torch.stack([w_hyre, w_gradient]).cpu().to(torch.float64).reshape(2, num_users, k)
    mf = m.to(d.dtype)  # (U, n)
    margins = torch.einsum("unk,fuk->fun", d, weights) * mf  # (2, U, n): each fit's reward differences on the shots
    margins = torch.nan_to_num(margins, nan=0.0, posinf=torch.finfo(d.dtype).max, neginf=-torch.finfo(d.dtype).max)
    # root-mean-square over the shots, computed on margins divided by their largest magnitude so squares cannot overflow
    peak = margins.abs().amax(dim=-1)  # (2, U)
    ratio = margins / torch.where(peak > 0, peak, 1.0).unsqueeze(-1)
    scales = peak * ratio.pow(2).sum(dim=-1).div(mf.sum(dim=-1)).sqrt()  # (2, U)
    scales = torch.maximum(scales, _NORM_EPS * scales.amax(dim=0, keepdim=True))
    total = scales.sum(dim=0)
    share_hyre = torch.where(total > 0, scales[1] / torch.where(total > 0, total, 1.0), 0.5)  # (U,)
    combined = share_hyre.unsqueeze(-1) * weights[0] + (1 - share_hyre.unsqueeze(-1)) * weights[1]
    return _finalize(torch.log(combined), batched, _device_of(deltas))


# ----------------------------------------------------------------------------------------------------------------------
# Using fitted weights
# ----------------------------------------------------------------------------------------------------------------------


def _check_per_user_shapes(values: torch.Tensor, weights: torch.Tensor, name: str) -> None:
    """`values` is `(n, K)` or `(U, n, K)` and `weights` is `(K,)` or `(U, K)` to match; else a `ValueError`."""
    if values.dim() not in (2, 3):
        raise ValueError(f"`{name}` must have shape (n, K) or (U, n, K), got {tuple(values.shape)}.")
    if (
        weights.dim() != values.dim() - 1
        or weights.shape[-1] != values.shape[-1]
        or (values.dim() == 3 and weights.shape[0] != values.shape[0])
    ):
        raise ValueError(
            f"`weights` of shape {tuple(weights.shape)} does not match `{name}` of shape {tuple(values.shape)}; "
            f"expected {tuple(values.shape[:-2]) + (values.shape[-1],)}."
        )


def routed_weights(routing: TensorLike, weights: TensorLike, beta: float = 1.0) -> torch.Tensor:
    """
    Combines per-prompt router weights with a user's profile: `normalize(routing^beta * weights)` row by row.

    When the product is all zero on a row (the router gives zero weight to every expert the user uses), the row falls
    back to the user's `weights`: the user's preferences are the only information left, and this keeps the result on
    the simplex instead of producing `0/0`.

    Args:
        routing (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Non-negative router weights `g(x)` per prompt.
        weights (`torch.Tensor` of shape `(K,)` or `(U, K)`):
            User weights on the simplex.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent `>= 0` applied to the routing weights; `0` ignores the router (static mode).

    Returns:
        `torch.Tensor`: per-prompt weights of the same shape as `routing`, in `routing`'s floating dtype (float32 for
        non-float input).
    """
    beta = _check_non_negative(beta, "beta")
    g = _as_float_tensor(routing, "routing")
    w = _as_float_tensor(weights, "weights")
    out_dtype = g.dtype if g.is_floating_point() else torch.float32
    _check_per_user_shapes(g, w, "routing")
    g = _check_routing_values(g.to(torch.float64))
    w64 = w.to(torch.float64)
    if not bool(torch.isfinite(w64).all()) or bool((w64 < 0).any()):
        raise ValueError("`weights` must be finite and non-negative (a point on the simplex).")
    if not bool((w64.sum(dim=-1) > 0).all()):
        raise ValueError("`weights` must have positive mass on every row (a point on the simplex).")
    return user_mixture_weights(g, w64, beta).to(device=_device_of(routing), dtype=out_dtype)


def mixture_scores(
    expert_scores: TensorLike, weights: TensorLike, routing: TensorLike | None = None, beta: float = 1.0
) -> torch.Tensor:
    """
    Computes the user's reward from the per-expert rewards.

    Args:
        expert_scores (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert rewards `r_k(x)` (or reward differences).
        weights (`torch.Tensor` of shape `(K,)` or `(U, K)`):
            User weights on the simplex.
        routing (`torch.Tensor` of the same shape as `expert_scores`, *optional*):
            Per-prompt router weights. If given, the routed weights `normalize(routing^beta * weights)` are used.
        beta (`float`, *optional*, defaults to `1.0`):
            Routing exponent (routed mode only).

    Returns:
        `torch.Tensor`: combined rewards of shape `(n,)` (or `(U, n)`), in float32 (float64 if the scores are float64).
    """
    s = _as_float_tensor(expert_scores, "expert_scores")
    out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    w = _as_float_tensor(weights, "weights").to(torch.float64)
    _check_per_user_shapes(s, w, "expert_scores")
    s = s.to(torch.float64)
    if routing is None:
        per_row = w.unsqueeze(-2)
    else:
        r = _as_float_tensor(routing, "routing")
        if tuple(r.shape) != tuple(s.shape):
            raise ValueError(
                f"`routing` must have the same shape as `expert_scores` {tuple(s.shape)}, got {tuple(r.shape)}."
            )
        per_row = routed_weights(r.to(torch.float64), w, beta=beta)
    return (s * per_row.cpu()).sum(dim=-1).to(device=_device_of(expert_scores), dtype=out_dtype)


def pairwise_accuracy(
    deltas: TensorLike, weights: TensorLike, routing: TensorLike | None = None, beta: float = 1.0
) -> float:
    """
    Pairwise accuracy of the user's combined reward differences ([`~trl_moe_rm.accuracy.pairwise_accuracy`]: a tie
    counts as half a correct pair).

    Args:
        deltas (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Per-expert reward differences `r_k(chosen) - r_k(rejected)`.
        weights (`torch.Tensor` of shape `(K,)` or `(U, K)`):
            User weights on the simplex.
        routing (`torch.Tensor`, *optional*):
            Per-prompt router weights (routed mode), same shape as `deltas`.
        beta (`float`, *optional*, defaults to `1.0`):
            Routing exponent (routed mode only).

    Returns:
        `float`: accuracy in `[0, 1]` over all pairs (of all users for batched input).
    """
    combined = mixture_scores(deltas, weights, routing=routing, beta=beta)
    if combined.numel() == 0:
        raise ValueError("`deltas` has zero pairs; accuracy is undefined. Pass at least one labelled pair.")
    margins = combined.detach().to(torch.float64).cpu().reshape(-1).numpy()
    return float(pairwise_outcomes(margins, 0.0 * margins).mean())


FIT_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "hedge": fit_hedge,
    "hyre": fit_hyre,
    "gradient": fit_gradient,
    "hyre_gradient": fit_hyre_gradient,
}

STATIC_ONLY_METHODS: frozenset[str] = frozenset({"hyre", "hyre_gradient"})
"""The methods of [`FIT_METHODS`] that fit static weights only (no routed mode)."""
