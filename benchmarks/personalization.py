r"""
Few-shot personalization benchmark: k-shot accuracy curves of the sparse MoE (several fitting methods), the dense MoE,
DRMs (PCA heads + HyRe), the single Bradley-Terry head and a per-user oracle, on the same frozen backbone features.

Datasets (all hidden-context: the prompt does not reveal who judges a pair):

- `controlled`: simulated users (`make_users`, Dirichlet mixtures of the six controlled preference directions), each
  labelling random prompts ([`make_user_pairs`]).
- `dsp`: DSP with each domain as a user (domain-vs-domain pairs, split by query, `normal` excluded); needs the data
  (`--data_dir` or `$TRL_MOE_RM_DATA`), otherwise it is skipped with a message.
- `hidden`: [`benchmarks.hidden_users`]: six user types judging one shared pool of everyday-advice prompts by opposite
  attributes (budget, layout, voice), plus users who mix two of them; split by prompt.

Every (prompt, response) text is encoded once with the frozen backbone (all-MiniLM-L6-v2 by default, mean pooling) and
cached on disk (`--cache_dir`, default `$TMPDIR/trl_moe_rm_bench`); the MoE heads are trained by [`MoERewardTrainer`]
on those cached features (`freeze_backbone=True, cache_features=True`): no backbone pass per training step.

For each user and each `k` in `--ks`, `--num_draws` random sets of `k` shots are drawn from the user's training pairs;
each method is adapted on the shots and scored on all of the user's held-out pairs. Each training seed (`--seeds`)
trains the MoE variants and draws its own shots (the same for every method). The table reports, per `k`, the mean over
seeds and draws of the users' mean accuracy and its 95% Student-t interval over the `seeds x draws` values
([`pool_seeds`]); a tie (equal rewards) counts as half a correct pair. It also reports each variant's *expert ceiling*
([`expert_ceiling`]: the best convex combination of its experts fitted on all of a user's training pairs), the gap of
the recommended recipe ([`RECIPE`]) to the oracle split into experts and fit, and, with `--epoch_curve`, the recipe's
k-shot curve against the number of training epochs.

Usage:

```bash
python -m benchmarks.personalization --datasets controlled dsp hidden --seeds 0 1 2 --epoch_curve 0 1 3 6 12 \
    --variants dense sparse_assign_pca hidden_context --methods hyre gradient gradient_l2 hyre_gradient \
    --priors uniform --skip_speed --output_dir /tmp/personalization_bench
python -m benchmarks.personalization --speed_only
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from benchmarks.baselines import DecomposedRewardHeads, cross_validated_l2, fit_bradley_terry_head
from benchmarks.stats import mean_ci
from trl_moe_rm.accuracy import pairwise_outcomes
from trl_moe_rm.presets import preset_values
from trl_moe_rm.processing import RowEncoder, pad_batch
from trl_moe_rm.processing import pad_token_id as tokenizer_pad_token_id
from trl_moe_rm.scoring import PairScores, scores_from_features


DEFAULT_KS = (1, 2, 4, 8, 16, 32)
FEATURE_KEYS = ("chosen_features", "rejected_features", "router_features")


# ----------------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where encoded features go: `$TRL_MOE_RM_CACHE`, else `<tmp>/trl_moe_rm_bench` (never the repository)."""
    return Path(os.environ.get("TRL_MOE_RM_CACHE") or Path(tempfile.gettempdir()) / "trl_moe_rm_bench")


@dataclass
class PairSet:
    r"""
    Preference pairs of several users with their backbone features.

    Args:
        user_index (`np.ndarray` of shape `(n,)`):
            Index of each pair's user in `users`.
        features (`dict[str, torch.Tensor]`):
            `chosen_features`, `rejected_features` and `router_features`, each `(n, H)`.
        tokens (`dict[str, list]`, *optional*):
            `chosen_ids`, `rejected_ids`, `prompt_length` as the trainer tokenizes them (only needed to train on them).
    """

    user_index: np.ndarray
    features: dict[str, torch.Tensor]
    tokens: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.user_index)

    def select(self, rows: np.ndarray) -> PairSet:
        rows = np.asarray(rows)
        tokens = None
        if self.tokens is not None:
            tokens = {key: [values[row] for row in rows] for key, values in self.tokens.items()}
        return PairSet(self.user_index[rows], {key: value[rows] for key, value in self.features.items()}, tokens)

    def rows_of(self, user: int) -> np.ndarray:
        return np.flatnonzero(self.user_index == user)


@dataclass
class Benchmark:
    """A dataset of the benchmark: its users and their train / held-out pairs."""

    name: str
    users: list[str]
    train: PairSet
    test: PairSet
    info: dict[str, Any] = field(default_factory=dict)


def tokenize_sequences(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_length: int = 512):
    """
    Token ids and prompt lengths of (prompt, response) texts, with the package's one text-to-ids path
    ([`~trl_moe_rm.processing.RowEncoder`], as [`MoERewardTrainer`] tokenizes them), truncated to `max_length` tokens
    (the prompt first, from the left).
    """
    encoded = RowEncoder(tokenizer, max_length=max_length).encode_many(list(prompts), list(responses))
    return [ids for ids, _ in encoded], [prompt_length for _, prompt_length in encoded]


@torch.inference_mode()
def encode_sequences(model, ids: list[list[int]], prompt_lengths: list[int], pad_token_id: int, batch_size: int = 32):
    """`(sequence_features, router_features)` of token sequences with the model's (frozen) backbone, by length."""
    order = np.argsort([-len(row) for row in ids], kind="stable")
    hidden = model.config.hidden_size
    sequence = torch.zeros(len(ids), hidden)
    router = torch.zeros(len(ids), hidden)
    model.eval()
    for start in range(0, len(ids), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = pad_batch([ids[row] for row in rows], pad_token_id)
        lengths = torch.tensor([prompt_lengths[row] for row in rows])
        seq, rout = model.encode(input_ids=input_ids, attention_mask=attention_mask, prompt_lengths=lengths)
        sequence[torch.as_tensor(rows)] = seq.float()
        router[torch.as_tensor(rows)] = rout.float()
    return sequence, router


def _backbone_key(model) -> str:
    digest = hashlib.sha256()
    digest.update(str(model.config.name_or_path).encode())
    for name, param in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().float().flatten()[:512].numpy().tobytes())
    return digest.hexdigest()[:16]


def encode_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    cache_dir: Path,
    tag: str,
    max_length: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], list[int]]:
    """Encode unique (prompt, response) texts once, with an on-disk cache keyed by the backbone and the texts."""
    ids, prompt_lengths = tokenize_sequences(tokenizer, prompts, responses, max_length)
    digest = hashlib.sha256(json.dumps([ids, prompt_lengths]).encode()).hexdigest()[:16]
    path = cache_dir / f"{tag}-{_backbone_key(model)}-{digest}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        return tensors["sequence"], tensors["router"], ids, prompt_lengths
    start = time.perf_counter()
    sequence, router = encode_sequences(model, ids, prompt_lengths, tokenizer_pad_token_id(tokenizer))
    print(f"[encode] {tag}: {len(ids)} sequences in {time.perf_counter() - start:.0f} s", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file({"sequence": sequence, "router": router}, str(path))
    return sequence, router, ids, prompt_lengths


def pairs_from_texts(
    model, tokenizer, prompts, chosen, rejected, user_index, cache_dir: Path, tag: str, max_length: int = 512
) -> PairSet:
    """A [`PairSet`] whose texts are encoded once each (a response shared by several pairs is encoded once)."""
    keys: dict[tuple[str, str], int] = {}
    for prompt, response in zip(list(prompts) * 2, list(chosen) + list(rejected)):
        keys.setdefault((prompt, response), len(keys))
    unique = list(keys)
    sequence, router, ids, prompt_lengths = encode_texts(
        model, tokenizer, [p for p, _ in unique], [r for _, r in unique], cache_dir, tag, max_length
    )
    chosen_rows = [keys[(p, r)] for p, r in zip(prompts, chosen)]
    rejected_rows = [keys[(p, r)] for p, r in zip(prompts, rejected)]
    features = {
        "chosen_features": sequence[chosen_rows],
        "rejected_features": sequence[rejected_rows],
        "router_features": router[chosen_rows],
    }
    tokens = {
        "chosen_ids": [ids[row] for row in chosen_rows],
        "rejected_ids": [ids[row] for row in rejected_rows],
        "prompt_length": [prompt_lengths[row] for row in chosen_rows],
    }
    return PairSet(np.asarray(user_index), features, tokens)


def load_backbone(backbone: str | None = None):
    """The frozen backbone wrapped as a MoE model (only its `encode` is used here) and its tokenizer."""
    from transformers import AutoTokenizer

    from trl_moe_rm import MoERewardModel
    from trl_moe_rm.demo import minilm_path

    path = backbone or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = MoERewardModel.from_backbone(path, num_experts=2, top_k=1)
    model.config.name_or_path = path
    return model.eval(), tokenizer


def build_dsp(model, tokenizer, data_dir: str | None, cache_dir: Path, test_size: float = 0.2, seed: int = 0):
    """DSP, one user per domain, split by query. Returns `None` (with a message) when the data is missing."""
    from benchmarks.dsp import DSP_DOMAINS, load_dsp_pairs, split_dsp_by_query
    from benchmarks.real_datasets import RealDataMissingError

    try:
        pairs = load_dsp_pairs(data_dir)
    except RealDataMissingError as error:
        print(f"[dsp] skipped: {error}", flush=True)
        return None
    split = split_dsp_by_query(pairs, test_size=test_size, seed=seed)
    users = list(DSP_DOMAINS)
    sets = {}
    for name in ("train", "test"):
        part = split[name]
        user_index = [users.index(user) for user in part["user_id"]]
        sets[name] = pairs_from_texts(
            model, tokenizer, part["prompt"], part["chosen"], part["rejected"], user_index, cache_dir, "dsp"
        )
    info = {
        "num_queries": len(set(pairs["query_id"])),
        "num_train_queries": len(set(split["train"]["query_id"])),
        "num_test_queries": len(set(split["test"]["query_id"])),
        "num_train_pairs": len(split["train"]),
        "num_test_pairs": len(split["test"]),
        "split_seed": seed,
    }
    return Benchmark("dsp", users, sets["train"], sets["test"], info)


def build_controlled(
    model,
    tokenizer,
    cache_dir: Path,
    num_users: int = 16,
    train_pairs: int = 160,
    test_pairs: int = 80,
    alpha: float = 0.3,
    seed: int = 0,
):
    """Simulated users (`make_users`): each labels its own random prompts; held-out pairs use another seed."""
    from trl_moe_rm.data.controlled import make_user_pairs, make_users

    users = make_users(num_users, alpha=alpha, seed=seed)
    sets = {}
    for name, size, offset in (("train", train_pairs, 0), ("test", test_pairs, 10_000)):
        prompts, chosen, rejected, user_index = [], [], [], []
        for index, user in enumerate(users):
            rows = make_user_pairs(user, size, seed=seed * 100_003 + offset + index)
            prompts += rows["prompt"]
            chosen += rows["chosen"]
            rejected += rows["rejected"]
            user_index += [index] * size
        sets[name] = pairs_from_texts(model, tokenizer, prompts, chosen, rejected, user_index, cache_dir, "controlled")
    info = {
        "num_users": num_users,
        "alpha": alpha,
        "train_pairs_per_user": train_pairs,
        "test_pairs_per_user": test_pairs,
        "user_weights": {user.user_id: user.direction_weights for user in users},
    }
    return Benchmark("controlled", [user.user_id for user in users], sets["train"], sets["test"], info)


def build_hidden(
    model,
    tokenizer,
    cache_dir: Path,
    num_mixed: int = 6,
    train_pairs: int = 200,
    test_pairs: int = 100,
    seed: int = 0,
):
    """
    Hidden users ([`~benchmarks.hidden_users.make_hidden_users`]): six types judging one shared pool of everyday-advice
    prompts by opposite attributes, plus `num_mixed` users mixing two of them; split by prompt.
    """
    from benchmarks.hidden_users import make_hidden_user_pairs, make_hidden_users

    users = make_hidden_users(num_mixed=num_mixed, seed=seed)
    split = make_hidden_user_pairs(users, train_pairs=train_pairs, test_pairs=test_pairs, seed=seed)
    names = [user.user_id for user in users]
    sets = {
        name: pairs_from_texts(
            model,
            tokenizer,
            part["prompt"],
            part["chosen"],
            part["rejected"],
            [names.index(user) for user in part["user_id"]],
            cache_dir,
            "hidden",
        )
        for name, part in split.items()
    }
    info = {
        "num_users": len(users),
        "train_pairs_per_user": train_pairs,
        "test_pairs_per_user": test_pairs,
        "user_weights": {user.user_id: list(user.weights) for user in users},
    }
    return Benchmark("hidden", names, sets["train"], sets["test"], info)


# ----------------------------------------------------------------------------------------------------------------------
# k-shot evaluation (the core of the benchmark)
# ----------------------------------------------------------------------------------------------------------------------


def correct(margins) -> np.ndarray:
    """
    Per-pair outcome of reward margins, in their shape: 1 if positive, 0 if negative, 0.5 for a tie (a coin flip), as
    [`~trl_moe_rm.accuracy.pairwise_outcomes`] scores them.
    """
    margins = np.asarray(margins, dtype=np.float64)
    return pairwise_outcomes(margins.ravel(), np.zeros(margins.size)).reshape(margins.shape)


# `fit(users, shot_rows) -> weights`: `users` (B,) user indices, `shot_rows` (B, k) indices into each user's training
# pairs; returns (B, K) weights over the method's heads.
Fitter = Callable[[np.ndarray, np.ndarray], np.ndarray]


def kshot_curves(
    num_train: Sequence[int],
    test_deltas: Sequence[np.ndarray],
    fit: Fitter,
    ks: Sequence[int] = DEFAULT_KS,
    num_draws: int = 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    r"""
    k-shot accuracy curve of one adaptation method.

    For every `k`, each user gets `num_draws` random sets of `k` distinct shots among its training pairs (the same
    draws for every method with the same `seed`); all `users x draws` fits are done in one batched call of `fit`, and
    each fit is scored on all of that user's held-out pairs.

    Args:
        num_train (sequence of `int`):
            Number of training pairs of each user.
        test_deltas (sequence of `np.ndarray` of shape `(m_u, K)`):
            Per-head reward differences of each user's held-out pairs.
        fit (`Callable`):
            `fit(users (B,), shot_rows (B, k)) -> weights (B, K)`.
        ks (sequence of `int`):
            Shot counts; a `k` larger than a user's training pairs skips that user.
        num_draws (`int`, *optional*, defaults to `20`):
            Random shot sets per user and `k`.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the shot draws.

    Returns:
        `list[dict]`, one per `k`: `k`, `mean`, `low`, `high` (the mean over draws of the users' mean accuracy and its
        95% interval over the draws, [`mean_ci`]), `per_user` (each user's mean accuracy over draws) and `draws` (the
        users' mean accuracy of each draw, which [`pool_seeds`] pools over training seeds).
    """
    results = []
    for k in ks:
        rng = np.random.default_rng([seed, k])
        users = [user for user, count in enumerate(num_train) if count >= k]
        if not users:
            continue
        batch_users = np.repeat(np.asarray(users), num_draws)
        shot_rows = np.stack([rng.choice(num_train[user], size=k, replace=False) for user in batch_users])
        weights = np.asarray(fit(batch_users, shot_rows), dtype=np.float64)
        accuracy = np.zeros((len(users), num_draws))
        for position, user in enumerate(users):
            block = weights[position * num_draws : (position + 1) * num_draws]  # (D, K)
            accuracy[position] = correct(test_deltas[user] @ block.T).mean(axis=0)
        draws = accuracy.mean(axis=0)
        mean, low, high = mean_ci(draws)
        results.append(
            {
                "k": int(k),
                "mean": mean,
                "low": low,
                "high": high,
                "per_user": accuracy.mean(axis=1).tolist(),
                "draws": draws.tolist(),
            }
        )
    return results


def pool_seeds(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    r"""
    Pool the k-shot curves of several training seeds (each from [`kshot_curves`], with that seed's shot draws): per `k`,
    the mean over all `seeds x draws` values with its 95% Student-t interval ([`mean_ci`]), `seed_means` (each seed's
    mean) and `per_user` (averaged over seeds).
    """
    pooled = []
    for k in sorted({entry["k"] for run in runs for entry in run}):
        entries = [entry for run in runs for entry in run if entry["k"] == k]
        mean, low, high = mean_ci(np.concatenate([entry["draws"] for entry in entries]))
        pooled.append(
            {
                "k": k,
                "mean": mean,
                "low": low,
                "high": high,
                "seed_means": [entry["mean"] for entry in entries],
                "per_user": np.mean([entry["per_user"] for entry in entries], axis=0).tolist(),
            }
        )
    return pooled


def pool_constants(outcomes_by_seed: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """[`constant_accuracy`] of the held-out outcomes of every seed together, with each seed's accuracy."""
    pooled = constant_accuracy([np.concatenate(parts) for parts in zip(*outcomes_by_seed)])
    pooled["seed_means"] = [float(np.mean(np.concatenate(outcomes))) for outcomes in outcomes_by_seed]
    return pooled


def _best_convex_combination(deltas: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """
    `argmin` of the Bradley-Terry loss of `c * softmax(theta)` over `(theta, c > 0)`, as weights `softmax(theta)`. Tiny
    penalties on `log c` and `theta` (and a clamp of `log c`) keep separable pairs, where the loss falls forever as `c`
    grows or a weight vanishes, from diverging.
    """
    deltas = torch.from_numpy(np.asarray(deltas, dtype=np.float64))
    scale = deltas.pow(2).mean(dim=0).sqrt().clamp_min(1e-12)  # heads on a common scale: better conditioned
    theta = torch.zeros(deltas.shape[1], dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta, log_scale], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        weights = log_scale.clamp(-30.0, 30.0).exp() * torch.softmax(theta, dim=0)
        penalty = 1e-4 * (log_scale.pow(2) + theta.pow(2).sum())
        loss = torch.nn.functional.softplus(-(deltas / scale) @ weights).mean() + penalty
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (torch.softmax(theta.detach(), dim=0) / scale).numpy()


def expert_ceiling(
    train_deltas: np.ndarray,
    test_deltas: np.ndarray,
    train_rows: Sequence[np.ndarray],
    test_rows: Sequence[np.ndarray],
) -> list[np.ndarray]:
    r"""
    The ceiling of any simplex fit: for each user, the best convex combination of the heads fitted on **all** of the
    user's training pairs (`w = c * softmax(theta)`, Bradley-Terry loss, L-BFGS in float64; the free scale `c > 0`
    lets the combination be as confident as the data allows), scored on the user's held-out pairs.

    Returns:
        `list[np.ndarray]`: each user's held-out outcomes (1, 0, or 0.5 for a tie), as for [`constant_accuracy`].
    """
    return [
        correct(np.asarray(test_deltas[test], dtype=np.float64) @ _best_convex_combination(train_deltas[train]))
        for train, test in zip(train_rows, test_rows)
    ]


def constant_accuracy(correct_by_user: Sequence[np.ndarray]) -> dict[str, Any]:
    """Accuracy of an unadapted method: mean over all held-out pairs, with its 95% interval over the pairs."""
    mean, low, high = mean_ci(np.concatenate([np.asarray(c, dtype=np.float64) for c in correct_by_user]))
    return {"mean": mean, "low": low, "high": high, "per_user": [float(np.mean(c)) for c in correct_by_user]}


def moe_fitter(model, train_scores: PairScores, rows_by_user: Sequence[np.ndarray], method: str, **kwargs) -> Fitter:
    """Adapt a trained MoE with the product API: [`fit_users`] on precomputed expert scores (one pseudo-user per draw)."""
    from trl_moe_rm import fit_users

    def fit(users: np.ndarray, shot_rows: np.ndarray) -> np.ndarray:
        rows = np.stack([rows_by_user[user][shots] for user, shots in zip(users, shot_rows)])  # (B, k) global rows
        batch, k = rows.shape
        owners = np.repeat(np.arange(batch), k).tolist()
        blanks = [""] * (batch * k)
        profiles = fit_users(
            model,
            {"chosen": blanks, "rejected": blanks, "user_id": owners},
            method=method,
            scores=train_scores.select(rows.reshape(-1)),
            **kwargs,
        )
        return np.asarray([profiles[index].expert_weights for index in range(batch)])

    return fit


def drm_fitter(
    train_deltas: np.ndarray,
    rows_by_user: Sequence[np.ndarray],
    temperature: float = 1.0,
    method: str = "hyre",
    **method_kwargs,
) -> Fitter:
    """Adapt DRM heads on the shots: HyRe (the DRM recipe), or another method of `FIT_METHODS` (uniform prior)."""
    from trl_moe_rm.fitting import FIT_METHODS

    if method == "hyre":
        method_kwargs = {"temperature": temperature, **method_kwargs}

    def fit(users: np.ndarray, shot_rows: np.ndarray) -> np.ndarray:
        rows = np.stack([rows_by_user[user][shots] for user, shots in zip(users, shot_rows)])
        deltas = torch.from_numpy(train_deltas[rows])  # (B, k, K)
        return FIT_METHODS[method](deltas, **method_kwargs).double().numpy()

    return fit


FIT_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "hedge": ("hedge", {}),
    "hyre": ("hyre", {}),
    "gradient": ("gradient", {}),
    "gradient_l2": ("gradient", {"l2": 1.0}),
    # HyRe and gradient_l2 fitted on the same shots, their reward margins averaged on a common (RMS) scale.
    "hyre_gradient": ("hyre_gradient", {"l2": 1.0}),
}
"""The fits compared, by row name: `(method of fit_users, its keyword arguments)`."""

RECIPE = {"variant": "hidden_context", "fit": "hyre_gradient", "prior": "uniform"}
"""The recommended hidden-context recipe: the `hidden_context` variant, adapted by `fit_users(method="hyre_gradient",
l2=1.0, prior="uniform")` (the HyRe + gradient ensemble, [`~trl_moe_rm.fitting.fit_hyre_gradient`])."""


# ----------------------------------------------------------------------------------------------------------------------
# Training the MoE heads on cached features
# ----------------------------------------------------------------------------------------------------------------------

# The MoE variants compared (K experts each); everything else (data, backbone, budget, seed) is shared.
MOE_VARIANTS: dict[str, dict[str, Any]] = {
    "dense": {"top_k": "K", "loss_type": "likelihood_mixture", "balance_coef": 0.0},
    "sparse": {
        "top_k": 2,
        "router_gradient": "sparse",  # measured before the straight-through gradient became the default
        "balance_coef": 0.1,
        "balance_type": "entropy",
        "sparsity_coef": 0.001,
        "diversity_coef": 0.1,
        "diversity_type": "cosine",
    },
    "sparse_assign": {"top_k": 2, "loss_type": "assignment", "assignment_temperature": 0.5, "balance_coef": 0.0},
    "sparse_assign_pca": {
        "top_k": 2,
        "loss_type": "assignment",
        "assignment_temperature": 0.5,
        "balance_coef": 0.0,
        "expert_init": "pca",
    },
    "sparse_assign_pca_corr": {
        "top_k": 2,
        "loss_type": "assignment",
        "assignment_temperature": 0.5,
        "balance_coef": 0.0,
        "expert_init": "pca",
        "diversity_coef": 0.1,
        "diversity_type": "correlation",
    },
    # Seen users: the same, trained with the rows' user ids and a weight vector per training user (learn_user_weights).
    "sparse_assign_pca_joint": {
        "top_k": 2,
        "loss_type": "assignment",
        "assignment_temperature": 0.5,
        "balance_coef": 0.0,
        "expert_init": "pca",
        "learn_user_weights": True,
        "user_weights_learning_rate": 0.05,
    },
    "sparse_pca": {
        "top_k": 2,
        "router_gradient": "sparse",
        "balance_coef": 0.1,
        "balance_type": "entropy",
        "sparsity_coef": 0.001,
        "expert_init": "pca",
    },
    # The recommended hidden-context recipe, exactly `preset="hidden_context"`: 32 experts, half signed principal
    # directions of the standardised differences, half response-cluster heads, refined by the assignment loss (its own
    # K, whatever --num_experts).
    "hidden_context": preset_values("hidden_context"),
    # Ablations of the recipe: only signed principal directions (no cluster heads), and 8 experts instead of 32.
    "hidden_context_pca_only": {**preset_values("hidden_context"), "expert_init": "pca"},
    "hidden_context_k8": {**preset_values("hidden_context"), "num_experts": 8},
}


def _write_feature_cache(model, dataset: Dataset, features: dict[str, torch.Tensor], cache_dir: Path) -> None:
    """Pre-fill the trainer's on-disk feature cache (keyed by [`features_fingerprint`]) with features encoded here."""
    from trl_moe_rm.feature_cache import features_fingerprint

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"features-{features_fingerprint(model, dataset)}.safetensors"
    if not path.is_file():
        save_file({key: features[key].contiguous() for key in FEATURE_KEYS}, str(path))


def train_moe(
    train: PairSet,
    users: Sequence[str],
    settings: dict[str, Any],
    backbone: str,
    tokenizer,
    output_dir: Path,
    num_experts: int = 8,
    num_train_epochs: float = 6,
    learning_rate: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
):
    """
    Train a MoE head with [`MoERewardTrainer`] (frozen backbone, cached features) on the pooled training pairs. A
    variant's own `num_experts` overrides the argument; `num_train_epochs=0` returns the trainer untrained (the experts
    as `expert_init` set them).
    """
    from transformers import PrinterCallback, set_seed

    from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer

    settings = dict(settings)
    num_experts = settings.pop("num_experts", num_experts)
    top_k = num_experts if settings.get("top_k") == "K" else settings.pop("top_k", 2)
    settings.pop("top_k", None)
    set_seed(seed)
    model_settings = {name: settings.pop(name) for name in ("router_gradient",) if name in settings}
    model = MoERewardModel.from_backbone(backbone, num_experts=num_experts, top_k=top_k, **model_settings)
    dataset = Dataset.from_dict({**train.tokens, "user_id": [users[index] for index in train.user_index]})
    cache_dir = output_dir / "feature_cache"
    _write_feature_cache(model, dataset, train.features, cache_dir)
    args = MoERewardConfig(
        output_dir=str(output_dir / "runs"),
        num_train_epochs=num_train_epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        seed=seed,
        data_seed=seed,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        max_length=None,
        num_experts=num_experts,
        top_k=top_k,
        freeze_backbone=True,
        cache_features=True,
        feature_cache_dir=str(cache_dir),
        **settings,
    )
    trainer = MoERewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    if num_train_epochs > 0:
        trainer.train()
    return trainer


def finetune_backbone(
    bench: Benchmark,
    backbone: str,
    tokenizer,
    output_dir: Path,
    num_pairs: int = 1000,
    num_train_epochs: float = 1,
    backbone_learning_rate: float = 3e-5,
    head_learning_rate: float = 1e-2,
    batch_size: int = 16,
    num_experts: int = 8,
    seed: int = 0,
) -> str:
    """
    Fine-tune the backbone with [`MoERewardTrainer`] (no freeze) on `num_pairs` random training pairs, with the best
    hidden-context configuration (assignment loss, experts initialised from the principal directions of the frozen
    features), and save it as a plain backbone checkpoint for [`load_backbone`]. Only training pairs are used.
    """
    from transformers import PrinterCallback, set_seed

    from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
    from trl_moe_rm.init import apply_expert_init, pca_expert_init

    target = output_dir / "finetuned_backbone"
    if (target / "config.json").is_file():
        return str(target)
    set_seed(seed)
    rows = np.random.default_rng(seed).choice(len(bench.train), size=min(num_pairs, len(bench.train)), replace=False)
    subset = bench.train.select(np.sort(rows))
    model = MoERewardModel.from_backbone(backbone, num_experts=num_experts, top_k=2)
    # The frozen features are already cached: initialise the experts from them (what `expert_init="pca"` computes).
    apply_expert_init(
        model,
        pca_expert_init(
            bench.train.features["chosen_features"], bench.train.features["rejected_features"], num_experts
        ),
    )
    heads = [param for name, param in model.named_parameters() if not name.startswith("backbone.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.backbone.parameters()), "lr": backbone_learning_rate},
            {"params": heads, "lr": head_learning_rate},
        ],
        weight_decay=0.0,
    )
    args = MoERewardConfig(
        output_dir=str(output_dir / "finetune_run"),
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=batch_size,
        seed=seed,
        data_seed=seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        max_length=None,
        num_experts=num_experts,
        loss_type="assignment",
        assignment_temperature=0.5,
        balance_coef=0.0,
        lr_scheduler_type="constant",
    )
    start = time.perf_counter()
    trainer = MoERewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(subset.tokens),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model.backbone.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    print(f"[finetune] {len(subset)} pairs, {time.perf_counter() - start:.0f} s -> {target}", flush=True)
    return str(target)


# ----------------------------------------------------------------------------------------------------------------------
# Running the comparison
# ----------------------------------------------------------------------------------------------------------------------


def _rows_by_user(pairs: PairSet, num_users: int) -> list[np.ndarray]:
    return [pairs.rows_of(user) for user in range(num_users)]


def evaluate_benchmark(
    bench: Benchmark,
    backbone: str,
    tokenizer,
    output_dir: Path,
    variants: Sequence[str],
    methods: Sequence[str] = ("hedge", "hyre", "gradient"),
    ks: Sequence[int] = DEFAULT_KS,
    num_draws: int = 20,
    num_experts: int = 8,
    num_train_epochs: float = 6,
    seeds: Sequence[int] = (0,),
    priors: Sequence[str] = ("routing",),
    epoch_curve: Sequence[float] = (),
) -> dict[str, Any]:
    r"""
    All methods on one dataset, for each training seed in `seeds` (seed `s` trains the MoE variants and draws the shots
    of every method); the curves are pooled over seeds ([`pool_seeds`]).

    Besides the k-shot curves it measures, per variant, the *expert ceiling* ([`expert_ceiling`]: the best convex
    combination of the experts fitted on all of a user's training pairs) and, with `epoch_curve`, the k-shot curve of
    the [`RECIPE`] variant and fit after each number of training epochs (0: the experts as initialised).

    Returns:
        `{"curves": {row: [...]}, "constant": {row: {...}}, "epoch_curve": {epochs: [...]}, "timings": {...},
        "extra": {...}}`.
    """
    num_users = len(bench.users)
    train_rows = _rows_by_user(bench.train, num_users)
    test_rows = _rows_by_user(bench.test, num_users)
    num_train = [len(rows) for rows in train_rows]
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    outcomes: dict[str, list[list[np.ndarray]]] = {}
    timings: dict[str, float] = {}
    extra: dict[str, Any] = {}

    def features(pairs: PairSet, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
        chosen, rejected = pairs.features["chosen_features"], pairs.features["rejected_features"]
        return (chosen, rejected) if rows is None else (chosen[rows], rejected[rows])

    def curve(name: str, test_deltas: np.ndarray, fit: Fitter, seed: int) -> None:
        per_user = [test_deltas[rows] for rows in test_rows]
        runs.setdefault(name, []).append(kshot_curves(num_train, per_user, fit, ks, num_draws, seed))

    # Single Bradley-Terry head on everybody's pairs (unadapted), and each user's oracle; the ridge penalty of each is
    # chosen by 5-fold cross-validation on its own training pairs (deterministic: computed once).
    start = time.perf_counter()
    l2 = cross_validated_l2(*features(bench.train), seed=seeds[0])
    head = fit_bradley_terry_head(*features(bench.train), l2=l2)
    test_diff = (features(bench.test)[0] - features(bench.test)[1]).double()
    outcomes["single_head"] = [[correct((test_diff[rows] @ head).numpy()) for rows in test_rows]]
    extra["single_head_l2"] = l2
    oracle_correct, oracle_l2 = [], []
    for user in range(num_users):
        user_l2 = cross_validated_l2(*features(bench.train, train_rows[user]), seed=seeds[0])
        user_head = fit_bradley_terry_head(*features(bench.train, train_rows[user]), l2=user_l2)
        oracle_correct.append(correct((test_diff[test_rows[user]] @ user_head).numpy()))
        oracle_l2.append(user_l2)
    outcomes["oracle"] = [oracle_correct]
    extra["oracle_l2"] = oracle_l2
    timings["single_and_oracle_s"] = time.perf_counter() - start

    # DRM: K principal directions of the training differences as heads, HyRe on the shots. `drm_hyre_signed` uses
    # K/2 directions with both signs (the same K heads `expert_init="pca"` gives the MoE, before any training);
    # `drm_signed_<fit>` adapts those heads with the recipe's fit instead of HyRe.
    start = time.perf_counter()
    method, method_kwargs = FIT_SPECS[RECIPE["fit"]]
    for name, num_heads, signed in (("drm_hyre", num_experts, False), ("drm_hyre_signed", num_experts // 2, True)):
        drm = DecomposedRewardHeads.fit(*features(bench.train), num_heads=num_heads)
        drm_train = drm.deltas(*features(bench.train), signed=signed)
        drm_test = drm.deltas(*features(bench.test), signed=signed)
        for seed in seeds:
            curve(name, drm_test, drm_fitter(drm_train, train_rows), seed)
            if signed:
                curve(
                    f"drm_signed_{RECIPE['fit']}",
                    drm_test,
                    drm_fitter(drm_train, train_rows, method=method, **method_kwargs),
                    seed,
                )
        outcomes[f"{name}_ceiling"] = [expert_ceiling(drm_train, drm_test, train_rows, test_rows)]
    timings["drm_s"] = time.perf_counter() - start

    for variant in variants:
        for seed in seeds:
            start = time.perf_counter()
            trainer = train_moe(
                bench.train,
                bench.users,
                MOE_VARIANTS[variant],
                backbone,
                tokenizer,
                output_dir / variant,
                num_experts=num_experts,
                num_train_epochs=num_train_epochs,
                seed=seed,
            )
            timings[f"{variant}_train_s"] = timings.get(f"{variant}_train_s", 0.0) + time.perf_counter() - start
            model = trainer.model.eval()
            train_scores = scores_from_features(model, bench.train.features)
            test_scores = scores_from_features(model, bench.test.features)
            outcomes.setdefault(f"{variant}_unadapted", []).append(
                [correct(test_scores.reward_deltas[rows]) for rows in test_rows]
            )
            outcomes.setdefault(f"{variant}_ceiling", []).append(
                expert_ceiling(train_scores.expert_deltas, test_scores.expert_deltas, train_rows, test_rows)
            )
            if MOE_VARIANTS[variant].get("learn_user_weights"):
                # Seen users: the weights learned jointly with the model on all of each user's training pairs.
                profiles = trainer.export_user_profiles()
                outcomes.setdefault(f"{variant}_joint_profiles", []).append(
                    [
                        correct(
                            test_scores.expert_deltas[rows] @ np.asarray(profiles[bench.users[user]].expert_weights)
                        )
                        for user, rows in enumerate(test_rows)
                    ]
                )
            extra.setdefault(f"{variant}_expert_accuracy_by_user", []).append(
                [(test_scores.expert_deltas[rows] > 0).mean(axis=0).round(3).tolist() for rows in test_rows]
            )
            for fit_name in methods:
                method, method_kwargs = FIT_SPECS[fit_name]
                for prior in priors:
                    name = f"{variant}_{fit_name}" + ("" if prior == "routing" else f"_{prior}")
                    start = time.perf_counter()
                    fit = moe_fitter(model, train_scores, train_rows, method, prior=prior, **method_kwargs)
                    curve(name, test_scores.expert_deltas, fit, seed)
                    timings[f"{name}_fit_s"] = timings.get(f"{name}_fit_s", 0.0) + time.perf_counter() - start
        print(f"[{bench.name}] {variant}: " + _summary(runs, variant), flush=True)

    # The recipe's k-shot curve against the training length (0 epochs: the experts as initialised).
    epoch_runs: dict[float, list[list[dict[str, Any]]]] = {}
    method, method_kwargs = FIT_SPECS[RECIPE["fit"]]
    for epochs in epoch_curve:
        for seed in seeds:
            trainer = train_moe(
                bench.train,
                bench.users,
                MOE_VARIANTS[RECIPE["variant"]],
                backbone,
                tokenizer,
                output_dir / f"{RECIPE['variant']}_epochs",
                num_experts=num_experts,
                num_train_epochs=epochs,
                seed=seed,
            )
            model = trainer.model.eval()
            train_scores = scores_from_features(model, bench.train.features)
            test_deltas = scores_from_features(model, bench.test.features).expert_deltas
            fit = moe_fitter(model, train_scores, train_rows, method, prior=RECIPE["prior"], **method_kwargs)
            per_user = [test_deltas[rows] for rows in test_rows]
            epoch_runs.setdefault(epochs, []).append(kshot_curves(num_train, per_user, fit, ks, num_draws, seed))
        print(
            f"[{bench.name}] {RECIPE['variant']} after {epochs:g} epochs: " + _at_k(pool_seeds(epoch_runs[epochs])),
            flush=True,
        )
    return {
        "curves": {name: pool_seeds(seed_runs) for name, seed_runs in runs.items()},
        "constant": {name: pool_constants(seed_outcomes) for name, seed_outcomes in outcomes.items()},
        "epoch_curve": {f"{epochs:g}": pool_seeds(seed_runs) for epochs, seed_runs in epoch_runs.items()},
        "seeds": list(seeds),
        "timings": timings,
        "extra": extra,
    }


def _at_k(curve: Sequence[dict[str, Any]], k: int = 8) -> str:
    return next((f"{entry['mean']:.3f}@{k}" for entry in curve if entry["k"] == k), "—")


def _summary(runs: dict[str, list[list[dict[str, Any]]]], variant: str, k: int = 8) -> str:
    """The variant's k-shot accuracy at `k` for each fit, pooled over the seeds run so far."""
    return ", ".join(
        f"{name[len(variant) + 1 :]} {_at_k(pool_seeds(seed_runs), k)}"
        for name, seed_runs in runs.items()
        if name.startswith(variant + "_")
        and not any(name.startswith(other + "_") and len(other) > len(variant) for other in MOE_VARIANTS)
    )


# ----------------------------------------------------------------------------------------------------------------------
# Speed of the fitting API
# ----------------------------------------------------------------------------------------------------------------------


def _median_seconds(function: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of `function` (the CPU time discounts a busy machine)."""
    function()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return float(np.median(wall)), float(np.median(cpu))


def measure_speed(num_experts: int = 8, num_shots: int = 32, num_users: int = 1000, repeats: int = 30, seed: int = 0):
    """
    Median wall-clock (and process CPU) times of [`fit_user_weights`] on `num_shots` shots and of [`fit_users`] on
    `num_users` users, with the expert scores precomputed (`scores=`), on a tiny MoE model (the fit never touches the
    model's weights).
    """
    from transformers import BertConfig

    from trl_moe_rm import MoERewardModel, MoERewardModelConfig, fit_user_weights, fit_users

    backbone = BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = MoERewardModel(MoERewardModelConfig(backbone_config=backbone, num_experts=num_experts, top_k=2)).eval()
    rng = np.random.default_rng(seed)

    def scores_of(num_rows: int) -> PairScores:
        chosen = rng.normal(size=(num_rows, num_experts))
        rejected = rng.normal(size=(num_rows, num_experts))
        logits = rng.normal(size=(num_rows, num_experts))
        top = np.argsort(-logits, axis=1)[:, :2]
        routing = np.zeros_like(logits)
        np.put_along_axis(routing, top, 0.5, axis=1)
        return PairScores.from_expert_rewards(chosen, rejected, routing)

    shots = scores_of(num_shots)
    pairs = {"chosen": [""] * num_shots, "rejected": [""] * num_shots}
    result: dict[str, Any] = {"num_experts": num_experts, "num_shots": num_shots, "num_users": num_users}
    for method in ("hedge", "hyre", "gradient"):
        wall, cpu = _median_seconds(
            lambda method=method: fit_user_weights(model, pairs, method=method, scores=shots), repeats
        )
        result[f"fit_user_weights_{method}_ms"] = 1e3 * wall
        result[f"fit_user_weights_{method}_cpu_ms"] = 1e3 * cpu
    many = scores_of(num_users * num_shots)
    dataset = {
        "chosen": [""] * (num_users * num_shots),
        "rejected": [""] * (num_users * num_shots),
        "user_id": [f"user_{index // num_shots}" for index in range(num_users * num_shots)],
    }
    for method in ("hedge", "hyre", "gradient"):
        wall, cpu = _median_seconds(
            lambda method=method: fit_users(model, dataset, method=method, scores=many), max(3, repeats // 10)
        )
        result[f"fit_users_{method}_s"] = wall
        result[f"fit_users_{method}_cpu_s"] = cpu
    return result


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _cell(entry: dict[str, Any]) -> str:
    if entry is None:
        return "—"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def recipe_row() -> str:
    """The row name of the [`RECIPE`] in a result's curves."""
    prior = "" if RECIPE["prior"] == "routing" else f"_{RECIPE['prior']}"
    return f"{RECIPE['variant']}_{RECIPE['fit']}{prior}"


def markdown_table(result: dict[str, Any], ks: Sequence[int]) -> str:
    """
    One row per method, one column per k (mean [95% CI over seeds x draws]); then the methods without shots (95% CI
    over held-out pairs of every seed), the recipe's curve against the training epochs, and the decomposition of its gap
    to the oracle.
    """
    header = ["| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]

    def row(name: str, curve: Sequence[dict[str, Any]]) -> str:
        by_k = {entry["k"]: entry for entry in curve}
        return f"| {name} | " + " | ".join(_cell(by_k.get(k)) for k in ks) + " |"

    lines = header + [row(name, curve) for name, curve in result["curves"].items()]
    lines += ["", "| method without shots | accuracy [95% CI over held-out pairs] |", "|---|---|"]
    lines += [f"| {name} | {_cell(entry)} |" for name, entry in result["constant"].items()]
    if result.get("epoch_curve"):
        lines += ["", f"`{recipe_row()}` after n training epochs:", ""]
        lines += [line.replace("| method |", "| epochs |") for line in header]
        lines += [row(epochs, curve) for epochs, curve in result["epoch_curve"].items()]
    decomposition = gap_decomposition(result, ks)
    if decomposition:
        lines += ["", "Gap to the oracle (points): experts = oracle - ceiling, fit = ceiling - k-shot:", ""]
        lines += ["| | " + " | ".join(f"k={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for part in ("experts", "fit", "total"):
            lines.append(f"| {part} | " + " | ".join(f"{decomposition[k][part]:+.1f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


def gap_decomposition(result: dict[str, Any], ks: Sequence[int]) -> dict[int, dict[str, float]]:
    """
    The recipe's gap to the oracle at each `k`, in points: `experts` (oracle - expert ceiling: what no fit of these
    experts can recover) and `fit` (ceiling - k-shot accuracy: what the few-shot fit leaves); empty without the recipe.
    """
    curve = {entry["k"]: entry["mean"] for entry in result["curves"].get(recipe_row(), [])}
    ceiling = result["constant"].get(f"{RECIPE['variant']}_ceiling")
    if not curve or ceiling is None:
        return {}
    oracle = result["constant"]["oracle"]["mean"]
    return {
        k: {
            "experts": 100 * (oracle - ceiling["mean"]),
            "fit": 100 * (ceiling["mean"] - curve[k]),
            "total": 100 * (oracle - curve[k]),
        }
        for k in ks
        if k in curve
    }


def check_targets(result: dict[str, Any], k: int = 8) -> dict[str, Any]:
    """
    The targets of the recipe ([`RECIPE`]) on one dataset: at or above DRM-HyRe and the signed PCA heads at every
    `k >= 2`, outside their 95% intervals at `k`; a k-shot accuracy at `k` that never falls below the previous training
    length's interval (rises or stays flat); and the oracle, expert ceiling and k-shot accuracy.
    """
    curves = {name: {entry["k"]: entry for entry in curve} for name, curve in result["curves"].items()}
    recipe = curves[recipe_row()]
    targets: dict[str, Any] = {"k": k, "recipe": recipe_row()}
    for baseline in ("drm_hyre", "drm_hyre_signed"):
        other = curves[baseline]
        shared = [shots for shots in recipe if shots >= 2 and shots in other]
        targets[f"at_or_above_{baseline}_every_k"] = {
            "value": {shots: [recipe[shots]["mean"], other[shots]["mean"]] for shots in shared},
            "passed": all(recipe[shots]["mean"] >= other[shots]["mean"] for shots in shared),
        }
        targets[f"outside_{baseline}_interval_at_k"] = {
            "value": [recipe[k]["low"], other[k]["high"]],
            "passed": recipe[k]["low"] > other[k]["high"],
        }
    epochs = [{entry["k"]: entry for entry in curve}[k] for curve in result.get("epoch_curve", {}).values()]
    if epochs:
        targets["epoch_curve_rises_or_flat"] = {
            "value": {name: entry["mean"] for name, entry in zip(result["epoch_curve"], epochs)},
            "passed": all(later["mean"] >= earlier["low"] for earlier, later in zip(epochs, epochs[1:])),
        }
    targets["oracle"] = result["constant"]["oracle"]["mean"]
    targets["expert_ceiling"] = result["constant"][f"{RECIPE['variant']}_ceiling"]["mean"]
    targets["recipe_at_k"] = recipe[k]["mean"]
    return targets


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--datasets", nargs="+", default=["controlled", "dsp", "hidden"], choices=["controlled", "dsp", "hidden"]
    )
    parser.add_argument("--data_dir", default=None, help="Directory of the real data (default: $TRL_MOE_RM_DATA).")
    parser.add_argument("--cache_dir", default=None, help="Feature cache (default: <tmp>/trl_moe_rm_bench).")
    parser.add_argument("--output_dir", default=None, help="Where results.json / results.md go (default: cache).")
    parser.add_argument("--backbone", default=None, help="Backbone path (default: the packaged all-MiniLM-L6-v2).")
    parser.add_argument("--variants", nargs="*", default=list(MOE_VARIANTS), choices=list(MOE_VARIANTS))
    parser.add_argument("--methods", nargs="+", default=["hedge", "hyre", "gradient"], choices=list(FIT_SPECS))
    parser.add_argument("--priors", nargs="+", default=["routing"], choices=["routing", "uniform"])
    parser.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS))
    parser.add_argument("--num_draws", type=int, default=20)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--num_train_epochs", type=float, default=6)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data (DSP split, simulated users).")
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="Training seeds (each also draws its own shots)."
    )
    parser.add_argument(
        "--epoch_curve",
        nargs="*",
        type=float,
        default=[],
        help="Also train the recipe for each of these numbers of epochs (0: as initialised) and report its curve.",
    )
    parser.add_argument("--controlled_users", type=int, default=16)
    parser.add_argument("--controlled_train_pairs", type=int, default=160)
    parser.add_argument("--controlled_test_pairs", type=int, default=80)
    parser.add_argument("--hidden_mixed_users", type=int, default=6)
    parser.add_argument("--hidden_train_pairs", type=int, default=200)
    parser.add_argument("--hidden_test_pairs", type=int, default=100)
    parser.add_argument(
        "--finetune_pairs",
        type=int,
        default=0,
        help="Also fine-tune the backbone on this many DSP training pairs and rerun DSP on its features (0: skip).",
    )
    parser.add_argument(
        "--finetuned_only", action="store_true", help="With --finetune_pairs: skip the frozen-backbone DSP run."
    )
    parser.add_argument("--speed_only", action="store_true", help="Only time the fitting API.")
    parser.add_argument("--skip_speed", action="store_true")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    output_dir = Path(args.output_dir) if args.output_dir else cache_dir / "results"
    output_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine_info(), "args": vars(args), "datasets": {}}
    print(f"[machine] {json.dumps(report['machine'])}", flush=True)

    if not args.skip_speed:
        report["speed"] = measure_speed(num_experts=args.num_experts)
        print(f"[speed] {json.dumps(report['speed'])}", flush=True)
    if not args.speed_only:
        model, tokenizer = load_backbone(args.backbone)
        backbone = model.config.name_or_path
        for name in args.datasets:
            start = time.perf_counter()
            if name == "dsp":
                bench = build_dsp(model, tokenizer, args.data_dir, cache_dir, seed=args.seed)
            elif name == "hidden":
                bench = build_hidden(
                    model,
                    tokenizer,
                    cache_dir,
                    num_mixed=args.hidden_mixed_users,
                    train_pairs=args.hidden_train_pairs,
                    test_pairs=args.hidden_test_pairs,
                    seed=args.seed,
                )
            else:
                bench = build_controlled(
                    model,
                    tokenizer,
                    cache_dir,
                    num_users=args.controlled_users,
                    train_pairs=args.controlled_train_pairs,
                    test_pairs=args.controlled_test_pairs,
                    seed=args.seed,
                )
            if bench is None:
                report["datasets"][name] = {"skipped": "data not found"}
                continue
            finetuned_only = name == "dsp" and args.finetuned_only and args.finetune_pairs > 0
            result = (
                None
                if finetuned_only
                else evaluate_benchmark(
                    bench,
                    backbone,
                    tokenizer,
                    output_dir / name,
                    args.variants,
                    methods=args.methods,
                    ks=args.ks,
                    num_draws=args.num_draws,
                    num_experts=args.num_experts,
                    num_train_epochs=args.num_train_epochs,
                    seeds=args.seeds,
                    priors=args.priors,
                    epoch_curve=args.epoch_curve,
                )
            )
            if result is not None:
                result["info"] = bench.info
                result["seconds"] = time.perf_counter() - start
                if 8 in args.ks and recipe_row() in result["curves"]:
                    result["targets"] = check_targets(result)
                report["datasets"][name] = result
                print(f"\n## {name}\n\n{markdown_table(result, args.ks)}", flush=True)
                if "targets" in result:
                    print(json.dumps(result["targets"], indent=2), flush=True)
            if name == "dsp" and args.finetune_pairs > 0:
                start = time.perf_counter()
                tuned_path = finetune_backbone(
                    bench, backbone, tokenizer, output_dir, args.finetune_pairs, num_experts=args.num_experts
                )
                tuned_model, tuned_tokenizer = load_backbone(tuned_path)
                tuned = build_dsp(tuned_model, tuned_tokenizer, args.data_dir, cache_dir, seed=args.seed)
                result = evaluate_benchmark(
                    tuned,
                    tuned_path,
                    tuned_tokenizer,
                    output_dir / "dsp_finetuned",
                    args.variants,
                    methods=args.methods,
                    ks=args.ks,
                    num_draws=args.num_draws,
                    num_experts=args.num_experts,
                    num_train_epochs=args.num_train_epochs,
                    seeds=args.seeds,
                    priors=args.priors,
                )
                result["info"] = {**tuned.info, "finetune_pairs": args.finetune_pairs, "backbone": tuned_path}
                result["seconds"] = time.perf_counter() - start
                if 8 in args.ks and recipe_row() in result["curves"]:
                    result["targets"] = check_targets(result)
                report["datasets"]["dsp_finetuned"] = result
                print(f"\n## dsp (fine-tuned backbone)\n\n{markdown_table(result, args.ks)}", flush=True)
    (output_dir / "results.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"Results in {output_dir}/results.json", flush=True)
    return report


if __name__ == "__main__":
    main()
