"""
Test-time personalization: fit a user's weights over the frozen experts from a few labelled pairs.

The expert rewards of the user's pairs are computed once (batched, under `torch.inference_mode`); the fit itself
([`~trl_moe_rm.fitting`]) then takes milliseconds. The result is a [`UserProfile`] that a [`ProfileStore`] saves,
`MoERewardModel.for_user` turns into a reward model, and [`weight_shift`] explains.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .fitting import FIT_METHODS, STATIC_ONLY_METHODS, routed_weights
from .processing import load_tokenizer
from .profiles import ProfileStore, UnknownUserError, UserProfile, config_fingerprint, lookup_profile
from .scoring import PairScores, check_finite, model_dtype, score_pairs


Pairs = Dataset | Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
PRIORS = ("routing", "uniform")


def _as_dataset(pairs: Pairs, name: str = "pairs") -> Dataset:
    if isinstance(pairs, Dataset):
        dataset = pairs
    elif isinstance(pairs, Mapping):
        dataset = _table(Dataset.from_dict, dict(pairs), name)
    elif isinstance(pairs, Sequence) and not isinstance(pairs, str):
        if len(pairs) == 0:
            raise ValueError(f"`{name}` is empty: fitting a user needs at least one labelled pair.")
        dataset = _table(Dataset.from_list, [dict(pair) for pair in pairs], name)
    else:
        raise TypeError(
            f"`{name}` must be a datasets.Dataset, a list of dicts or a dict of lists with prompt/chosen/rejected, got "
            f"{type(pairs).__name__}."
        )
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty: fitting a user needs at least one labelled pair.")
    missing = [column for column in ("chosen", "rejected") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"`{name}` has no {missing} column(s) (it has {dataset.column_names}); each pair needs `prompt`, `chosen` "
            "and `rejected`."
        )
    return dataset


def _table(build: Any, data: Any, name: str) -> Dataset:
    """A `Dataset` from Python rows, with a clear error when a column mixes value types (e.g. int and str ids)."""
    import pyarrow as pa

    try:
        return build(data)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise ValueError(
            f"`{name}` has a column whose values mix types ({error}). Use one type per column: e.g. all user ids "
            "as strings (`str(user_id)`) or all as integers."
        ) from None


def _tokenizer_for(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase:
    if tokenizer is not None:
        return tokenizer
    name = getattr(model.config, "name_or_path", "")
    if not name:
        raise ValueError("Pass `tokenizer=`: the model does not record where its tokenizer lives (`name_or_path`).")
    return load_tokenizer(name)


def expert_pair_scores(
    model: torch.nn.Module, pairs: Pairs, tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 32
) -> PairScores:
    """Expert rewards, routing and routed rewards of labelled pairs: the one model pass personalization needs."""
    # Labelled pairs teach the fit which response is better: an empty one is refused, as in training.
    dataset = _as_dataset(pairs)
    return score_pairs(model, _tokenizer_for(model, tokenizer), dataset, batch_size=batch_size, allow_empty=False)


def _prior(routing: np.ndarray, prior: str | Sequence[float] | None, mode: str, smoothing: float) -> np.ndarray:
    num_experts = routing.shape[-1]
    uniform = np.full(num_experts, 1.0 / num_experts)
    if prior is None:
        prior = "uniform" if mode == "routed" else "routing"
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(f"`prior` must be one of {list(PRIORS)} or a weight vector, got {prior!r}.")
        if prior == "uniform":
            return uniform
        return (1 - smoothing) * routing.mean(axis=0) + smoothing * uniform
    return np.asarray(prior, dtype=np.float64)


def _fit(method: str, deltas: torch.Tensor, prior: torch.Tensor, mask, routing, mode: str, beta: float, kwargs):
    if method not in FIT_METHODS:
        raise ValueError(f"`method` must be one of {sorted(FIT_METHODS)}, got {method!r}.")
    if mode not in ("static", "routed"):
        raise ValueError(f"`mode` must be 'static' or 'routed', got {mode!r}.")
    if method in STATIC_ONLY_METHODS:
        if mode == "routed":
            raise ValueError(
                f"`method={method!r}` fits static weights; use `mode='static'`, or 'hedge'/'gradient' for routed."
            )
        return FIT_METHODS[method](deltas, prior=prior, mask=mask, **kwargs)
    extra = {"routing": routing, "beta": beta} if mode == "routed" else {}
    return FIT_METHODS[method](deltas, prior=prior, mask=mask, **extra, **kwargs)


def fit_user_weights(
    model: torch.nn.Module,
    pairs: Pairs,
    method: str = "hedge",
    user_id: str | int = "user",
    tokenizer: PreTrainedTokenizerBase | None = None,
    mode: str = "static",
    beta: float = 1.0,
    *,
    prior: str | Sequence[float] | None = None,
    prior_smoothing: float = 0.1,
    scores: PairScores | None = None,
    batch_size: int = 32,
    **method_kwargs,
) -> UserProfile:
    r"""
    Fit one user's weights over the frozen experts from `k` labelled pairs.

    Args:
        model ([`MoERewardModel`]):
            The trained MoE reward model (kept frozen).
        pairs ([`~datasets.Dataset`], list of dicts or dict of lists):
            The user's labelled pairs: `prompt`, `chosen`, `rejected`.
        method (`str`, *optional*, defaults to `"hedge"`):
            `"hedge"` (multiplicative weights, `eta`), `"hyre"` (softmax of minus the summed per-expert
            Bradley-Terry losses over `temperature`, on z-normalised scores), `"gradient"` (softmax-parameterised
            weights fitted by Adam with an L2 pull toward the prior: `l2`, `lr`, `steps`), or `"hyre_gradient"` (the
            average of the HyRe and gradient fits on a common scale, static only; with `l2=1.0` the fit of the
            `hidden_context` preset).
        user_id (`str` or `int`, *optional*, defaults to `"user"`):
            Who the profile belongs to.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Defaults to `AutoTokenizer.from_pretrained(model.config.name_or_path)`.
        mode (`str`, *optional*, defaults to `"static"`):
            `"static"`: `r_u = sum_k w_k r_k`. `"routed"`: the weights are `normalize(g(x)^beta * w_u)`.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent of the routing in `"routed"` mode.
        prior (`str` or sequence of floats, *optional*):
            Starting point of the fit: `"routing"` (the mean default routing of the user's prompts, mixed with
            `prior_smoothing` of the uniform distribution so that no expert is unreachable; the default in static
            mode), `"uniform"` (the default in routed mode), or explicit weights.
        scores ([`~trl_moe_rm.analysis.PairScores`], *optional*):
            Precomputed expert scores of `pairs` (from [`expert_pair_scores`]); skips the model pass.
        **method_kwargs:
            Passed to the fitting method, e.g. `eta=0.5`, `temperature=2.0`, `l2=0.1`.

    Returns:
        [`UserProfile`] with the fitted weights, the number of shots and the model's configuration fingerprint.
    """
    if scores is None:
        scores = expert_pair_scores(model, pairs, tokenizer, batch_size)
    num_experts = model.config.num_experts
    if scores.num_experts != num_experts:
        raise ValueError(f"`scores` have K={scores.num_experts} experts but the model has K={num_experts}.")
    prior_weights = torch.from_numpy(_prior(scores.routing_weights, prior, mode, prior_smoothing))
    weights = _fit(
        method,
        torch.from_numpy(scores.expert_deltas),
        prior_weights,
        None,
        torch.from_numpy(scores.routing_weights),
        mode,
        beta,
        method_kwargs,
    )
    return UserProfile(
        user_id=user_id,
        expert_weights=weights.tolist(),
        mode=mode,
        beta=beta,
        method=method,
        num_shots=len(scores),
        config_hash=config_fingerprint(model.config),
    )


def fit_users(
    model: torch.nn.Module,
    dataset: Pairs,
    user_column: str = "user_id",
    method: str = "hedge",
    tokenizer: PreTrainedTokenizerBase | None = None,
    mode: str = "static",
    beta: float = 1.0,
    prior: str | Sequence[float] | None = None,
    prior_smoothing: float = 0.1,
    scores: PairScores | None = None,
    batch_size: int = 64,
    **method_kwargs,
) -> dict[str | int, UserProfile]:
    r"""
    Fit many users in one pass over the model: the expert rewards of all rows are computed once, then every user is
    fitted together (the fitting methods are vectorised over users).

    Args:
        dataset ([`~datasets.Dataset`], list of dicts or dict of lists):
            Labelled pairs of all users, with a `user_column`.
        user_column (`str`, *optional*, defaults to `"user_id"`):
            Column holding each row's user id (str or int).
        Other arguments:
            As in [`fit_user_weights`].

    Returns:
        `dict` from user id to [`UserProfile`], in order of first appearance.
    """
    dataset = _as_dataset(dataset, "dataset")
    if user_column not in dataset.column_names:
        raise ValueError(f"`dataset` has no `{user_column}` column (it has {dataset.column_names}).")
    user_ids = list(dataset[user_column])
    for user_id in user_ids:
        if isinstance(user_id, bool) or not isinstance(user_id, (str, int)):
            raise TypeError(f"User ids must be str or int, got {user_id!r} ({type(user_id).__name__}).")
    if scores is None:
        scores = expert_pair_scores(model, dataset, tokenizer, batch_size)
    rows_of: dict[str | int, list[int]] = {}
    for row, user_id in enumerate(user_ids):
        rows_of.setdefault(user_id, []).append(row)
    users = list(rows_of)
    longest = max(len(rows) for rows in rows_of.values())
    num_experts = scores.num_experts
    deltas = np.zeros((len(users), longest, num_experts))
    routing = np.full((len(users), longest, num_experts), 1.0 / num_experts)
    mask = np.zeros((len(users), longest), dtype=bool)
    priors = np.zeros((len(users), num_experts))
    for index, user_id in enumerate(users):
        rows = rows_of[user_id]
        deltas[index, : len(rows)] = scores.expert_deltas[rows]
        routing[index, : len(rows)] = scores.routing_weights[rows]
        mask[index, : len(rows)] = True
        priors[index] = _prior(scores.routing_weights[rows], prior, mode, prior_smoothing)
    weights = _fit(
        method,
        torch.from_numpy(deltas),
        torch.from_numpy(priors),
        torch.from_numpy(mask),
        torch.from_numpy(routing),
        mode,
        beta,
        method_kwargs,
    )
    fingerprint = config_fingerprint(model.config)
    return {
        user_id: UserProfile(
            user_id=user_id,
            expert_weights=weights[index].tolist(),
            mode=mode,
            beta=beta,
            method=method,
            num_shots=len(rows_of[user_id]),
            config_hash=fingerprint,
        )
        for index, user_id in enumerate(users)
    }


def default_routing(scores: PairScores) -> np.ndarray:
    """The model's default mixture weights on a set of prompts: the mean routing weights `mean_x g(x)`."""
    return scores.routing_weights.mean(axis=0)


def weight_shift(
    profile: UserProfile,
    model: torch.nn.Module | None = None,
    dataset: Pairs | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    default_weights: Sequence[float] | None = None,
    expert_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    r"""
    How a user departs from the model's default routing: `w_u - mean_x g(x)`.

    Args:
        profile ([`UserProfile`]):
            The fitted user.
        model, dataset, tokenizer:
            Used to compute the default routing on `dataset`'s prompts when `default_weights` is not given.
        default_weights (sequence of floats, *optional*):
            The default routing to compare with.
        expert_names (sequence of `str`, *optional*):
            Names of the experts, e.g. the `summary` of [`~trl_moe_rm.analysis.describe_experts`]. Defaults to
            `expert_0`, `expert_1`, ...

    Returns:
        `dict` with `user_id`, `expert_names`, `user_weights`, `default_weights`, `shift` (all lists of length K) and
        `top_gain` / `top_loss` (the names of the experts the user favours most / least relative to the default).
    """
    user = np.asarray(profile.expert_weights)
    if default_weights is None:
        if model is None or dataset is None:
            raise ValueError("Pass `default_weights`, or `model` and `dataset` to compute the default routing.")
        default_weights = default_routing(expert_pair_scores(model, dataset, tokenizer))
    default = np.asarray(default_weights, dtype=np.float64)
    if default.shape != user.shape:
        raise ValueError(f"`default_weights` has {default.shape[0]} experts, the profile has {user.shape[0]}.")
    names = list(expert_names) if expert_names is not None else [f"expert_{k}" for k in range(len(user))]
    shift = user - default
    return {
        "user_id": profile.user_id,
        "expert_names": names,
        "user_weights": user.tolist(),
        "default_weights": default.tolist(),
        "shift": shift.tolist(),
        "top_gain": names[int(shift.argmax())],
        "top_loss": names[int(shift.argmin())],
    }


class UserRewards:
    r"""
    Score (prompt, response) rows for the users who wrote them, from a [`ProfileStore`] or a dict of profiles.

    An unknown user falls back to the model's default routing and is counted in `num_fallbacks` (and
    `fallbacks_by_user`); with `strict=True` it raises [`UnknownUserError`] instead.

    Args:
        model ([`MoERewardModel`]):
            The trained model.
        profiles ([`ProfileStore`] or `dict`):
            The users' profiles.
        strict (`bool`, *optional*, defaults to `False`):
            Raise on unknown users instead of falling back.
    """

    def __init__(self, model: torch.nn.Module, profiles: "ProfileStore | Mapping[Any, UserProfile]", strict=False):
        self.model = model
        self.profiles = profiles
        self.strict = strict
        self.num_fallbacks = 0
        self.fallbacks_by_user: dict[Any, int] = {}
        self._weights: dict[Any, tuple[torch.Tensor | None, str, float]] = {}
        self._fingerprint = config_fingerprint(model.config)

    def weights_for(self, user_id: Any) -> tuple[torch.Tensor | None, str, float]:
        """The user's `(weights, mode, beta)`; `(None, "routed", 1.0)` means the default routing."""
        key = (type(user_id), user_id)  # exact ids: 1, "1", 1.0 and True never share a cache entry
        if key in self._weights:
            return self._weights[key]
        profile = lookup_profile(self.profiles, user_id)  # refuses bool / float ids rather than aliasing them
        if profile is None:
            if self.strict:
                raise UnknownUserError(
                    f"No profile for user {user_id!r}. Fit one with fit_user_weights, or pass strict=False to fall "
                    "back to the default routing."
                )
            self.num_fallbacks += 1
            self.fallbacks_by_user[user_id] = self.fallbacks_by_user.get(user_id, 0) + 1
            return None, "routed", 1.0
        profile.check_compatible(self.model.config.num_experts, self._fingerprint)
        entry = (profile.weights_tensor(), profile.mode, profile.beta)
        self._weights[key] = entry
        return entry

    def combine(
        self,
        expert_rewards: torch.Tensor,
        routing_weights: torch.Tensor,
        user_ids: Sequence[Any],
        nonfinite_value: float | None = None,
    ) -> torch.Tensor:
        """
        Per-row user rewards from the model's expert rewards `(N, K)` and routing `(N, K)`. A NaN or infinite reward
        raises [`~trl_moe_rm.scoring.NonFiniteRewardError`], unless `nonfinite_value` replaces it.
        """
        mixtures = []
        for row, user_id in enumerate(user_ids):
            weights, mode, beta = self.weights_for(user_id)
            if weights is None:
                mixtures.append(routing_weights[row].float().cpu())
            elif mode == "routed":
                mixtures.append(routed_weights(routing_weights[row : row + 1].float().cpu(), weights, beta)[0])
            else:
                mixtures.append(weights)
        rewards = (torch.stack(mixtures).to(expert_rewards) * expert_rewards).sum(dim=-1)
        return check_finite(rewards, "UserRewards", model_dtype(self.model), nonfinite_value)
