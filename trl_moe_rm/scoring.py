"""
Scoring: run a Mixture-of-Experts reward model over text and return the rewards that training optimised.

- [`score`] is the public scoring call: `score(model, tokenizer, prompts, responses, user=None)` returns one reward per
  (prompt, response), for the default routing or for one user's profile.
- [`score_pairs`] scores preference pairs and keeps everything the analysis and the personalization fit need
  ([`PairScores`]); [`scores_from_features`] does the same from cached backbone features.
- [`run_model`] is the batched forward pass under all of them (length-sorted batches, eval mode, inference mode), and
  [`check_finite`] refuses a NaN or infinite reward at every output.

Text becomes token ids only through [`~trl_moe_rm.processing.RowEncoder`], exactly as in training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate.utils import is_peft_model
from tqdm.auto import tqdm

from .accuracy import pairwise_accuracy
from .data.columns import column_names, num_rows, require_columns
from .processing import PREFERENCE_COLUMNS, PROMPT_COLUMN, RowEncoder, pad_batch


__all__ = [
    "NonFiniteRewardError",
    "PairScores",
    "check_finite",
    "model_device",
    "model_dtype",
    "progress_disabled",
    "run_model",
    "score",
    "score_pairs",
    "scores_from_features",
]

OUTPUT_KEYS = ("logits", "expert_rewards", "routing_weights", "router_logits")


class NonFiniteRewardError(ValueError):
    """A reward model produced a NaN or infinite reward."""


def check_positive_int(value: Any, name: str) -> int:
    """`value` if it is an int >= 1 (not a bool), else a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int (>= 1), got {value!r}.")
    return value


def progress_disabled(disable: bool | None = None) -> bool:
    """Whether to hide a progress bar: `disable` (e.g. the trainer's `disable_tqdm`), or `TQDM_DISABLE=1` set."""
    return bool(disable) or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _config(model: torch.nn.Module) -> Any:
    return (model.get_base_model() if is_peft_model(model) else model).config


def check_finite(
    rewards: torch.Tensor, where: str, dtype: torch.dtype | None = None, nonfinite_value: float | None = None
) -> torch.Tensor:
    r"""
    Refuse NaN and infinite rewards: in RL a single one silently corrupts the policy.

    Args:
        rewards (`torch.Tensor`):
            Rewards, any shape.
        where (`str`):
            Who produced them, for the error message.
        dtype (`torch.dtype`, *optional*):
            The model's dtype; float16 is named as the likely cause (its largest value is 65504).
        nonfinite_value (`float`, *optional*):
            Opt in to replacing each NaN or infinite reward by this value instead of raising.

    Returns:
        `torch.Tensor`: `rewards`, with the replacement applied when `nonfinite_value` is set.

    Raises:
        [`NonFiniteRewardError`]: naming the rows, unless `nonfinite_value` is set.
    """
    bad = ~torch.isfinite(rewards)
    if not bool(bad.any()):
        return rewards
    if nonfinite_value is not None:
        return torch.where(bad, torch.as_tensor(nonfinite_value, dtype=rewards.dtype), rewards)
    rows = torch.nonzero(bad.reshape(len(rewards), -1).any(dim=-1)).flatten().tolist() if rewards.dim() else [0]
    cause = (
        "the model runs in float16, whose range (|x| <= 65504) the rewards overflowed: load it in bfloat16 or float32"
        if dtype == torch.float16
        else "check the model's weights for NaN/Inf (e.g. a diverged training run)"
    )
    shown = ", ".join(str(row) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise NonFiniteRewardError(
        f"{where} produced {len(rows)} NaN or infinite reward(s), at row(s) {shown}: {cause}. To replace them with a "
        "fixed value instead, pass `nonfinite_value=` (e.g. 0.0)."
    )


@torch.inference_mode()
def run_model(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    prompt_lengths: Sequence[int],
    padding_value: int,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    paired: bool = False,
    progress: str | None = None,
) -> dict[str, torch.Tensor]:
    r"""
    Batched forward pass of a MoE reward model over tokenized rows, in eval mode (no router noise).

    Rows are batched by length to limit padding and right-padded with `trl.trainer.utils.pad`; the outputs come back in
    input order. The model's previous train/eval mode is restored.

    Args:
        model ([`MoERewardModel`], [`MoEUserRewardModel`] or a PEFT wrapper of them):
            The reward model.
        sequences (`Sequence[Sequence[int]]`):
            Token ids of each row, from [`~trl_moe_rm.processing.RowEncoder`]. With `paired=True`, the `n` chosen rows
            then the `n` rejected rows.
        prompt_lengths (`Sequence[int]`):
            Number of prompt tokens of each row.
        padding_value (`int`):
            The pad token id.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows (pairs with `paired=True`) per forward pass.
        device (`str` or `torch.device`, *optional*):
            Where the inputs go. Defaults to the model's device.
        paired (`bool`, *optional*, defaults to `False`):
            Run pairs together (`paired=True` of the model: both rows of a pair share one routing).
        progress (`str`, *optional*):
            Show a progress bar with this label when there is more than one batch (`TQDM_DISABLE=1` hides it).

    Returns:
        `dict[str, torch.Tensor]`: `logits` `(N,)`, `expert_rewards`, `routing_weights` and `router_logits` `(N, K)`,
        float32 on the CPU, in input order.
    """
    check_positive_int(batch_size, "batch_size")
    if len(sequences) != len(prompt_lengths):
        raise ValueError(f"Got {len(sequences)} sequences and {len(prompt_lengths)} prompt lengths.")
    total = len(sequences)
    num_items = total // 2 if paired else total
    if paired and total % 2:
        raise ValueError(f"`paired=True` needs the chosen rows then the rejected rows (an even count), got {total}.")
    device = torch.device(device) if device is not None else model_device(model)
    members = (lambda item: (item, item + num_items)) if paired else (lambda item: (item,))
    length = [max(len(sequences[row]) for row in members(item)) for item in range(num_items)]
    order = sorted(range(num_items), key=lambda item: -length[item])
    outputs: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        starts = range(0, num_items, batch_size)
        hidden = progress is None or len(starts) < 2 or progress_disabled()
        for start in tqdm(starts, desc=progress, unit="batch", disable=hidden):
            items = order[start : start + batch_size]
            rows = list(items) + ([item + num_items for item in items] if paired else [])
            input_ids, attention_mask = pad_batch([sequences[row] for row in rows], padding_value)
            output = model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                prompt_lengths=torch.tensor([prompt_lengths[row] for row in rows], dtype=torch.long, device=device),
                paired=paired,
            )
            index = torch.tensor(rows)
            for key in OUTPUT_KEYS:
                value = getattr(output, key).detach().float().cpu()
                value = value.reshape(len(rows)) if key == "logits" else value
                if key not in outputs:
                    outputs[key] = torch.zeros((total, *value.shape[1:]), dtype=torch.float32)
                outputs[key][index] = value
    finally:
        model.train(was_training)
    return outputs


def score(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    responses: Sequence[Any],
    user: Any = None,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    nonfinite_value: float | None = None,
) -> torch.Tensor:
    r"""
    Rewards of (prompt, response) rows: the rewards [`MoERewardTrainer`] optimised, for the default routing or a user.

    Text is tokenized as in training ([`~trl_moe_rm.processing.RowEncoder`]): plain text or chat messages, the prompt
    with the tokenizer's special tokens, the response closed by the end token, and the router reads the prompt only.

    Args:
        model ([`MoERewardModel`] or a PEFT wrapper of it):
            The trained reward model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Its tokenizer (saved with the model).
        prompts (`Sequence[str | list[dict]]`):
            One prompt per response: text, or a list of chat messages.
        responses (`Sequence[str | list[dict]]`):
            The responses: text, or lists of chat messages (the assistant's turn).
        user ([`UserProfile`], *optional*):
            Score for this user (see [`MoERewardModel.for_user`]); `None` uses the default routing.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows per forward pass.
        max_length (`int`, *optional*):
            Truncate longer rows: the prompt from the left first, never the whole response.
        device (`str` or `torch.device`, *optional*):
            Where the inputs go. Defaults to the model's device.
        nonfinite_value (`float`, *optional*):
            Replace NaN/Inf rewards by this value instead of raising [`NonFiniteRewardError`].

    Returns:
        `torch.Tensor` of shape `(len(prompts),)`, float32, on the CPU.

    Example:

    ```python
    >>> from trl_moe_rm import score

    >>> score(model, tokenizer, ["How do I bake bread?"], ["Knead, proof, bake."])
    tensor([0.4312])
    ```
    """
    if isinstance(prompts, str) or isinstance(responses, str):
        raise TypeError("`prompts` and `responses` must be lists (one entry per row), not a single string.")
    encoder = RowEncoder(tokenizer, max_length=max_length)
    encoded = encoder.encode_many(list(prompts), list(responses))
    encoder.truncation.warn("score")
    if not encoded:
        return torch.zeros(0)
    scorer = model.for_user(user) if user is not None else model
    outputs = run_model(
        scorer,
        [ids for ids, _ in encoded],
        [length for _, length in encoded],
        encoder.pad_token_id,
        batch_size,
        device,
    )
    return check_finite(outputs["logits"], "score", model_dtype(model), nonfinite_value)


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of a model's first parameter (`None` for a model without parameters)."""
    try:
        return next(model.parameters()).dtype
    except StopIteration:
        return None


def _as_array(values: Any, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-dimensional, got shape {array.shape}.")
    return array


@dataclass
class PairScores:
    r"""
    Everything a trained MoE reward model says about a set of preference pairs, as NumPy arrays (row `i` is pair `i`
    of the scored dataset). Produced by [`score_pairs`]; can also be built by hand (e.g. with
    [`PairScores.from_expert_rewards`]) to test the metrics on planted structure.

    Args:
        chosen_rewards (`np.ndarray` of shape `(n,)`):
            Routed reward `sum_k g_k(x) r_k(x, y_chosen)` of the chosen responses.
        rejected_rewards (`np.ndarray` of shape `(n,)`):
            Routed reward of the rejected responses.
        chosen_expert_rewards (`np.ndarray` of shape `(n, K)`):
            Reward `r_k(x, y_chosen)` of every expert, routed to or not.
        rejected_expert_rewards (`np.ndarray` of shape `(n, K)`):
            Reward `r_k(x, y_rejected)` of every expert.
        routing_weights (`np.ndarray` of shape `(n, K)`):
            Sparse top-k routing weights `g(x)` of the pair (shared by its chosen and rejected responses).
        router_probs (`np.ndarray` of shape `(n, K)`, *optional*):
            Dense router probabilities `softmax(router_logits / router_temperature)`. Defaults to a copy of
            `routing_weights`.
    """

    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    chosen_expert_rewards: np.ndarray
    rejected_expert_rewards: np.ndarray
    routing_weights: np.ndarray
    router_probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.chosen_rewards = _as_array(self.chosen_rewards, "chosen_rewards", 1)
        self.rejected_rewards = _as_array(self.rejected_rewards, "rejected_rewards", 1)
        self.chosen_expert_rewards = _as_array(self.chosen_expert_rewards, "chosen_expert_rewards", 2)
        self.rejected_expert_rewards = _as_array(self.rejected_expert_rewards, "rejected_expert_rewards", 2)
        self.routing_weights = _as_array(self.routing_weights, "routing_weights", 2)
        if self.router_probs is None:
            self.router_probs = self.routing_weights.copy()
        self.router_probs = _as_array(self.router_probs, "router_probs", 2)
        num_pairs, num_experts = self.routing_weights.shape
        if num_pairs == 0 or num_experts == 0:
            raise ValueError(
                f"PairScores needs at least one pair and one expert, got shape {(num_pairs, num_experts)}."
            )
        for name in ("chosen_rewards", "rejected_rewards"):
            if getattr(self, name).shape != (num_pairs,):
                raise ValueError(f"`{name}` must have shape ({num_pairs},), got {getattr(self, name).shape}.")
        for name in ("chosen_expert_rewards", "rejected_expert_rewards", "router_probs"):
            if getattr(self, name).shape != (num_pairs, num_experts):
                raise ValueError(
                    f"`{name}` must have shape {(num_pairs, num_experts)} like `routing_weights`, got "
                    f"{getattr(self, name).shape}."
                )

    @classmethod
    def from_expert_rewards(
        cls,
        chosen_expert_rewards: Any,
        rejected_expert_rewards: Any,
        routing_weights: Any,
        router_probs: Any | None = None,
    ) -> PairScores:
        r"""
        Builds scores whose routed rewards are `sum_k g_k r_k`, as the model computes them.

        Args:
            chosen_expert_rewards (`array-like` of shape `(n, K)`):
                Expert rewards of the chosen responses.
            rejected_expert_rewards (`array-like` of shape `(n, K)`):
                Expert rewards of the rejected responses.
            routing_weights (`array-like` of shape `(n, K)`):
                Routing weights of each pair.
            router_probs (`array-like` of shape `(n, K)`, *optional*):
                Dense router probabilities; defaults to `routing_weights`.

        Returns:
            [`PairScores`]
        """
        chosen = _as_array(chosen_expert_rewards, "chosen_expert_rewards", 2)
        rejected = _as_array(rejected_expert_rewards, "rejected_expert_rewards", 2)
        weights = _as_array(routing_weights, "routing_weights", 2)
        if not chosen.shape == rejected.shape == weights.shape:
            raise ValueError(
                f"Expert rewards and routing weights must have the same shape, got {chosen.shape}, {rejected.shape} "
                f"and {weights.shape}."
            )
        return cls(
            chosen_rewards=(weights * chosen).sum(-1),
            rejected_rewards=(weights * rejected).sum(-1),
            chosen_expert_rewards=chosen,
            rejected_expert_rewards=rejected,
            routing_weights=weights,
            router_probs=router_probs,
        )

    def __len__(self) -> int:
        return self.routing_weights.shape[0]

    @property
    def num_experts(self) -> int:
        """Number of experts `K`."""
        return self.routing_weights.shape[1]

    @property
    def expert_deltas(self) -> np.ndarray:
        """`(n, K)` per-expert reward differences `Delta_k = r_k(chosen) - r_k(rejected)`."""
        return self.chosen_expert_rewards - self.rejected_expert_rewards

    @property
    def reward_deltas(self) -> np.ndarray:
        """`(n,)` routed reward differences `r(chosen) - r(rejected)`."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> float:
        """Pairwise accuracy of the routed reward ([`~trl_moe_rm.accuracy.pairwise_accuracy`]: a tie counts 0.5)."""
        return pairwise_accuracy(self.chosen_rewards, self.rejected_rewards)

    @property
    def top1_experts(self) -> np.ndarray:
        """`(n,)` expert with the largest routing weight of each pair (the first one on ties)."""
        return self.routing_weights.argmax(axis=1)

    def select(self, indices: Any) -> PairScores:
        """
        Scores of a subset of the pairs.

        Args:
            indices (`array-like`):
                Integer indices or a boolean mask of length `n`.

        Returns:
            [`PairScores`]: The selected rows, in the order of `indices`.
        """
        indices = np.asarray(indices)
        if indices.dtype == bool and indices.shape != (len(self),):
            raise ValueError(f"A boolean mask must have shape ({len(self)},), got {indices.shape}.")
        return PairScores(
            chosen_rewards=self.chosen_rewards[indices],
            rejected_rewards=self.rejected_rewards[indices],
            chosen_expert_rewards=self.chosen_expert_rewards[indices],
            rejected_expert_rewards=self.rejected_expert_rewards[indices],
            routing_weights=self.routing_weights[indices],
            router_probs=self.router_probs[indices],
        )


def score_pairs(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    allow_empty: bool = True,
) -> PairScores:
    r"""
    Runs a MoE reward model once over a preference dataset and collects what the analysis metrics need.

    Pairs are tokenized as [`MoERewardTrainer`] tokenizes them ([`~trl_moe_rm.processing.RowEncoder`]): both rows of
    a pair start with the same prompt tokens, and rows without a `prompt` column use the common token prefix of the two
    responses. Both responses of a pair run in one batch with `paired=True`, so they share one routing. An empty
    response is scored (as its end token), so that real data with a few empty answers can be analysed; pass
    `allow_empty=False` to refuse it as training does.

    Args:
        model ([`MoERewardModel`] or a PEFT wrapper of it):
            The reward model.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The tokenizer used in training.
        dataset ([`~datasets.Dataset`] or `Mapping[str, Sequence]`):
            Preference data with `chosen` and `rejected` columns and, usually, `prompt`.
        batch_size (`int`, *optional*, defaults to `32`):
            Number of pairs per forward pass (the model sees `2 * batch_size` sequences).
        max_length (`int`, *optional*):
            Longer sequences are truncated, the prompt from the left first (see
            [`~trl_moe_rm.processing.Truncation`]). Rows are never dropped (unlike training, which filters them out),
            so that the scores stay aligned with the dataset's labels; a warning reports the counts.
        device (`str` or `torch.device`, *optional*):
            Where the inputs are sent. Defaults to the device of the model's first parameter.
        allow_empty (`bool`, *optional*, defaults to `True`):
            Score empty responses (as their end token); `False` refuses them, as training does.

    Returns:
        [`PairScores`]: One row per dataset row, as float64 NumPy arrays. `router_probs` is
        `softmax(router_logits / config.router_temperature)`.

    Raises:
        [`NonFiniteRewardError`]: a reward is NaN or infinite.
    """
    require_columns(dataset, list(PREFERENCE_COLUMNS), "score_pairs")
    check_positive_int(batch_size, "batch_size")
    count = num_rows(dataset)
    if count == 0:
        raise ValueError("score_pairs got an empty dataset; it needs at least one preference pair.")
    columns = [column for column in (PROMPT_COLUMN, *PREFERENCE_COLUMNS) if column in column_names(dataset)]
    values = {column: list(dataset[column]) for column in columns}
    encoder = RowEncoder(tokenizer, max_length=max_length)
    pairs = [
        encoder.encode_preference({column: values[column][row] for column in columns}, allow_empty=allow_empty)
        for row in range(count)
    ]
    encoder.truncation.warn("score_pairs")
    lengths = [pair["prompt_length"] for pair in pairs]
    outputs = run_model(
        model,
        [pair["chosen_ids"] for pair in pairs] + [pair["rejected_ids"] for pair in pairs],
        lengths + lengths,
        encoder.pad_token_id,
        batch_size,
        device,
        paired=True,
        progress=f"Scoring {count} pairs",
    )
    check_finite(outputs["logits"], "score_pairs", model_dtype(model))
    return _pair_scores(outputs, count, float(_config(model).router_temperature))


def scores_from_features(model: torch.nn.Module, features: Mapping[str, torch.Tensor]) -> PairScores:
    r"""
    [`PairScores`] from cached backbone features (see [`MoERewardTrainer.cached_features`]), running only the router and
    the experts: the frozen-backbone counterpart of [`score_pairs`].

    Args:
        model ([`MoERewardModel`]):
            The reward model whose head scores the features.
        features (`Mapping[str, torch.Tensor]`):
            `chosen_features`, `rejected_features` and `router_features`, each `(n, hidden_size)`.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model(
                sequence_features=torch.cat([features["chosen_features"], features["rejected_features"]]),
                router_features=features["router_features"],
                paired=True,
            )
    finally:
        model.train(was_training)
    outputs = {key: getattr(output, key).detach().float().cpu() for key in OUTPUT_KEYS}
    outputs["logits"] = outputs["logits"][:, 0]
    check_finite(outputs["logits"], "scores_from_features", model_dtype(model))
    return _pair_scores(outputs, features["chosen_features"].shape[0], float(_config(model).router_temperature))


def _pair_scores(outputs: Mapping[str, torch.Tensor], size: int, temperature: float) -> PairScores:
    """[`PairScores`] from [`run_model`]'s outputs of `size` chosen rows followed by `size` rejected rows."""

    def array(value: torch.Tensor) -> np.ndarray:
        return value.numpy().astype(np.float64)

    return PairScores(
        chosen_rewards=array(outputs["logits"][:size]),
        rejected_rewards=array(outputs["logits"][size:]),
        chosen_expert_rewards=array(outputs["expert_rewards"][:size]),
        rejected_expert_rewards=array(outputs["expert_rewards"][size:]),
        routing_weights=array(outputs["routing_weights"][:size]),
        router_probs=array(torch.softmax(outputs["router_logits"][:size] / temperature, dim=-1)),
    )
