"""
Personalized rewards for TRL's online trainers (RLOO, GRPO): one MoE reward model, each completion scored for the user
who wrote its prompt.

[`PersonalizedReward`] is a plain callable (not an `nn.Module`), because TRL passes the dataset's extra columns (here,
the user id) only to callables:

```python
>>> from trl import RLOOConfig, RLOOTrainer
>>> from trl_moe_rm import PersonalizedReward, ProfileStore
>>> from trl_moe_rm.checkpoints import load_moe_reward_model

>>> reward = PersonalizedReward(load_moe_reward_model("my-moe-rm"), ProfileStore.from_pretrained("my-moe-rm"))
>>> trainer = RLOOTrainer(model=policy, reward_funcs=reward, args=RLOOConfig(...), train_dataset=dataset)
```

The dataset needs a `prompt` column and a user column (`user_id` by default), kept by `remove_unused_columns=False`
(the default of `RLOOConfig` and `GRPOConfig`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging

from .modeling_moe_reward import MoEUserRewardModel
from .personalization import UserRewards, _tokenizer_for
from .processing import RowEncoder
from .profiles import ProfileStore, UserProfile, lookup_profile
from .scoring import check_positive_int, run_model


logger = logging.get_logger(__name__)

DEFAULT_NAME = "personalized_reward"
OTHER_USERS_KEY = "_other"
MISSING_USER_KEY = "_missing"


class RunningMeanStd:
    r"""
    Running mean and standard deviation of a stream of values (Welford's algorithm, with Chan et al.'s merge of a
    whole batch at once), in float64.

    Under `torch.distributed` (an `accelerate` or `torchrun` run), every process's batch statistics are gathered at
    each update and merged in rank order, so all ranks hold the same statistics and normalize on the same scale. Every
    rank must then call [`RunningMeanStd.update`] the same number of times (as each rank of a TRL trainer calls its
    reward function once per step).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self._m2 = 0.0

    def update(self, values: torch.Tensor) -> None:
        """Add a batch of values (of this process; the batches of all processes under `torch.distributed`)."""
        values = values.detach().double().flatten().cpu()
        batch_mean = float(values.mean()) if values.numel() else 0.0
        local = (values.numel(), batch_mean, float(((values - batch_mean) ** 2).sum()))
        for batch_count, batch_mean, batch_m2 in _gather_statistics(local):
            if batch_count == 0:
                continue
            total = self.count + batch_count
            delta = batch_mean - self.mean
            self.mean += delta * batch_count / total
            self._m2 += batch_m2 + delta * delta * self.count * batch_count / total
            self.count = int(total)

    @property
    def var(self) -> float:
        """Population variance of the values seen so far (0 before two values)."""
        return self._m2 / self.count if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation of the values seen so far."""
        return math.sqrt(self.var)


def _gather_statistics(local: tuple[int, float, float]) -> list[tuple[int, float, float]]:
    """`(count, mean, m2)` of every process, in rank order (just this process's outside `torch.distributed`)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.tensor(local, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [(int(row[0]), float(row[1]), float(row[2])) for row in (entry.cpu() for entry in gathered)]


class PersonalizedReward:
    r"""
    A TRL reward function that scores each completion for its own user with a Mixture-of-Experts reward model.

    The expert rewards `r_k(x, y)` and the default routing `g(x)` of every (prompt, completion) come from one batched
    pass of the MoE model; [`UserRewards`] then mixes them with the weights of the row's user (from `profiles`). A user
    without a profile, or a row without a user id (`None`, `""` or NaN), falls back to the default routing
    `sum_k g_k(x) r_k(x, y)` and is counted in `num_fallbacks`, unless `strict=True`, which raises
    [`~trl_moe_rm.profiles.UnknownUserError`].

    TRL calls it as `reward(prompts=..., completions=..., completion_ids=..., **columns)` where `columns` holds the
    dataset's other columns (one value per completion), plus `trainer_state`, `log_metric` and `log_extra`. The user of
    each row is read from `columns[user_column]`: keep that column in the dataset, with `remove_unused_columns=False`
    (the default of `RLOOConfig` and `GRPOConfig`).

    Text is tokenized exactly as [`MoERewardTrainer`] tokenized the reward model's training pairs, so that the scores
    match the trained model: a standard prompt is tokenized alone with special tokens, the completion without them,
    and eos (sep for BERT-style tokenizers) is appended; a conversational prompt goes through the tokenizer's chat
    template with the generation prompt, the completion is the rest of the rendered conversation (as in TRL's
    `apply_chat_template`), and both are tokenized without special tokens. `prompt_lengths` is the exact number of
    prompt tokens, so a router with `router_input="prompt"` reads the prompt only. The completion text is re-tokenized
    (`completion_ids` are ignored), so the policy and the reward model may use different tokenizers.

    Device placement: with `device` (a device, or an `accelerate.Accelerator`, whose `device` is used) the model is
    moved there when the reward is built. Otherwise the model is moved on the first call, if it is still on the CPU,
    to the device of the running process, `accelerate.PartialState().device`: the trainer's `accelerator.device` (each
    process of a multi-GPU run gets its own copy). A model already on an accelerator is left where it is.

    DeepSpeed ZeRO-3: the reward model is used for inference only and is never wrapped by DeepSpeed, so every process
    holds a full copy. A model loaded after the training config was created under a ZeRO-3 `accelerate` config with
    `zero3_init_flag: true` is built inside `deepspeed.zero.Init` and its parameters are partitioned (empty on each
    rank); it is then gathered once, here, into ordinary parameters (all ranks must build the reward, as they do in a
    training script). Loading it before the training arguments are parsed avoids the partitioning altogether.

    Args:
        model ([`MoERewardModel`], `str` or `os.PathLike`):
            The trained MoE reward model (or a PEFT model around it), or a path / Hub id loaded with
            [`~trl_moe_rm.checkpoints.load_moe_reward_model`]. It is put in eval mode and frozen.
        profiles ([`ProfileStore`], `dict`, `str` or `os.PathLike`):
            The users' profiles: a store, a `dict` from user id to [`UserProfile`], or a directory / Hub id opened
            with [`ProfileStore.from_pretrained`].
        user_column (`str`, *optional*, defaults to `"user_id"`):
            The dataset column holding each row's user id.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            The reward model's tokenizer. Defaults to `AutoTokenizer.from_pretrained(model.config.name_or_path)`.
        batch_size (`int`, *optional*, defaults to `32`):
            Number of completions per forward pass (rows are sorted by length to limit padding).
        strict (`bool`, *optional*, defaults to `False`):
            Raise on users without a profile instead of falling back to the default routing.
        normalize (`bool`, *optional*, defaults to `False`):
            Return `(r - mean) / std`, with a running mean and standard deviation over all rewards scored so far
            (updated with each batch before it is normalized). Under `torch.distributed` the statistics are shared:
            every rank merges all ranks' batches, so all apply the same scale.
        name (`str`, *optional*):
            The function's `__name__`, under which TRL logs it (`rewards/<name>/mean`). Defaults to
            `"personalized_reward"`.
        device (`str`, `torch.device` or `accelerate.Accelerator`, *optional*):
            Where to run the model; see above.
        max_length (`int`, *optional*):
            Truncate longer sequences: the prompt loses tokens from the left first, and the completion is never cut
            to nothing (see [`~trl_moe_rm.processing.Truncation`]); a warning gives the counts.
        max_logged_users (`int`, *optional*, defaults to `8`):
            With TRL's `log_metric`, the mean reward of the first `max_logged_users` users seen is logged as
            `<name>/user/<user_id>`, and that of all later users together as `<name>/user/_other`, so that the
            number of logged keys stays bounded (rows without a user id are logged as `_missing`). `<name>/fallbacks` is the number of rows of the call scored with the
            default routing (TRL averages it over the calls of a logging step). `0` logs only the fallbacks.
        nonfinite_value (`float`, *optional*):
            A NaN or infinite reward raises [`~trl_moe_rm.scoring.NonFiniteRewardError`] (naming the rows and the
            likely cause, e.g. float16 overflow). Set this to replace such rewards by a fixed value instead.

    Example:

    ```python
    >>> reward = PersonalizedReward(model, {"alice": alice_profile}, tokenizer=tokenizer)
    >>> reward(prompts=["tell me about cats"], completions=["cats purr"], user_id=["alice"])
    [0.73...]
    ```
    """

    def __init__(
        self,
        model: nn.Module | str | os.PathLike,
        profiles: ProfileStore | Mapping[Any, UserProfile] | str | os.PathLike,
        user_column: str = "user_id",
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 32,
        strict: bool = False,
        normalize: bool = False,
        name: str | None = None,
        device: str | torch.device | Any | None = None,
        max_length: int | None = None,
        max_logged_users: int = 8,
        nonfinite_value: float | None = None,
    ) -> None:
        check_positive_int(batch_size, "batch_size")
        if isinstance(max_logged_users, bool) or not isinstance(max_logged_users, int) or max_logged_users < 0:
            raise ValueError(f"`max_logged_users` must be an int >= 0, got {max_logged_users!r}.")
        if not isinstance(user_column, str) or not user_column:
            raise ValueError(f"`user_column` must be a non-empty column name, got {user_column!r}.")
        if isinstance(model, (str, os.PathLike)):
            from .loading import load_moe_reward_model

            model = load_moe_reward_model(model)
        if isinstance(model, MoEUserRewardModel):
            raise TypeError(
                "PersonalizedReward needs the MoERewardModel itself (it mixes the experts per user), not one user's "
                "model from `for_user`; pass the model `for_user` was called on."
            )
        if not isinstance(model, nn.Module) or not hasattr(getattr(model, "config", None), "num_experts"):
            raise TypeError(
                f"`model` must be a MoERewardModel (or a PEFT model around one), got {type(model).__name__}."
            )
        if isinstance(profiles, (str, os.PathLike)):
            profiles = ProfileStore.from_pretrained(profiles)
        if not hasattr(profiles, "get"):
            raise TypeError(
                f"`profiles` must be a ProfileStore or a dict from user id to UserProfile, got {type(profiles).__name__}."
            )

        unpartition_zero3(model)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self.tokenizer = _tokenizer_for(model, tokenizer)
        self.encoder = RowEncoder(self.tokenizer, max_length=max_length)
        self.profiles = profiles
        self.user_rewards = UserRewards(model, _ProfileLookup(profiles), strict=strict)
        self.user_column = user_column
        self.batch_size = batch_size
        self.normalize = normalize
        self.max_length = max_length
        self.max_logged_users = max_logged_users
        self.__name__ = name or DEFAULT_NAME
        self.stats = RunningMeanStd()
        self._logged_users: set[str] = set()
        self.nonfinite_value = nonfinite_value
        self._device: torch.device | None = None
        if device is not None:
            device = getattr(device, "device", device)  # an accelerate.Accelerator
            self._device = torch.device(device)
            self.model.to(self._device)

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike,
        profiles: ProfileStore | Mapping[Any, UserProfile] | str | os.PathLike | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs: Any,
    ) -> PersonalizedReward:
        r"""
        Build the reward from a saved MoE reward model (a local folder or a Hub id) and its users' profiles.

        Args:
            model_name_or_path (`str` or `os.PathLike`):
                Loaded with [`~trl_moe_rm.checkpoints.load_moe_reward_model`] (full model, checkpoint or adapter).
            profiles ([`ProfileStore`], `dict`, `str` or `os.PathLike`, *optional*):
                Defaults to the store saved next to the model (`<model>/profiles/`, see
                [`ProfileStore.save_pretrained`]).
            tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
                Defaults to the tokenizer saved with the model, else the one of its backbone (`name_or_path`).
            **kwargs:
                The other arguments of [`PersonalizedReward`] (`user_column`, `strict`, `normalize`, ...).
        """
        from .loading import load_moe_reward_model

        model = load_moe_reward_model(model_name_or_path)
        if profiles is None:
            profiles = ProfileStore.from_pretrained(model_name_or_path)
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            except (OSError, ValueError, TypeError):
                tokenizer = None  # no tokenizer saved with the model: use the backbone's
        return cls(model, profiles, tokenizer=tokenizer, **kwargs)

    def __repr__(self) -> str:
        return (
            f"PersonalizedReward(name={self.__name__!r}, user_column={self.user_column!r}, "
            f"num_experts={self.model.config.num_experts}, strict={self.user_rewards.strict}, "
            f"normalize={self.normalize})"
        )

    @property
    def strict(self) -> bool:
        """Whether unknown users raise instead of falling back to the default routing."""
        return self.user_rewards.strict

    @property
    def num_fallbacks(self) -> int:
        """Number of rows scored so far with the default routing because their user had no profile."""
        return self.user_rewards.num_fallbacks

    @property
    def fallbacks_by_user(self) -> dict[Any, int]:
        """Per unknown user, the number of rows scored with the default routing."""
        return self.user_rewards.fallbacks_by_user

    @property
    def device(self) -> torch.device:
        """The device the model runs on (after the first call, or when `device` was given)."""
        try:
            return next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def _place_model(self) -> torch.device:
        if self._device is None:
            current = self.device
            if current.type == "cpu":
                from accelerate import PartialState

                target = PartialState().device
                if target != current:
                    self.model.to(target)
            self._device = self.device
        return self._device

    # ------------------------------------------------------------------------------------------------ tokenization

    def encode(self, prompt: Any, completion: Any, prompt_cache: Any = None) -> tuple[list[int], int]:
        """
        Token ids of one (prompt, completion) row and its number of prompt tokens, as the reward model was trained
        ([`~trl_moe_rm.processing.RowEncoder.encode`]). `prompt_cache` is accepted for compatibility and unused: the
        encoder caches tokenized prompts itself.
        """
        return self.encoder.encode(prompt, completion)

    # ------------------------------------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        user_ids: Sequence[Any],
        progress: str | None = None,
    ) -> torch.Tensor:
        r"""
        Raw (un-normalized) personalized rewards, without TRL's calling convention.

        Args:
            prompts (`Sequence`):
                Prompts, as text or as lists of chat messages.
            completions (`Sequence`):
                Completions, as text or as lists of chat messages (one per prompt).
            user_ids (`Sequence`):
                The user of each row.
            progress (`str`, *optional*):
                Show a progress bar with this label (the CLI does; TRL's calls do not).

        Returns:
            `torch.Tensor` of shape `(len(prompts),)`, float32, on the CPU.
        """
        if not len(prompts) == len(completions) == len(user_ids):
            raise ValueError(
                f"Got {len(prompts)} prompts, {len(completions)} completions and {len(user_ids)} user ids; they must "
                "have the same length (one per completion)."
            )
        if len(prompts) == 0:
            return torch.zeros(0)
        device = self._place_model()
        encoded = self.encoder.encode_many(list(prompts), list(completions))
        self.encoder.truncation.warn("PersonalizedReward")
        outputs = run_model(
            self.model,
            [ids for ids, _ in encoded],
            [length for _, length in encoded],
            self.encoder.pad_token_id,
            self.batch_size,
            device,
            progress=progress,
        )
        rewards = self.user_rewards.combine(
            outputs["expert_rewards"], outputs["routing_weights"], list(user_ids), self.nonfinite_value
        )
        return rewards.float()

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """
        Score completions for their users, with TRL's reward-function calling convention.

        Args:
            prompts (`Sequence`):
                One prompt per completion (text, or a list of chat messages).
            completions (`Sequence`):
                The completions (text, or a list of chat messages).
            completion_ids (`Sequence[Sequence[int]]`, *optional*):
                Ignored: the completion text is re-tokenized with the reward model's tokenizer.
            **kwargs:
                The dataset's other columns, one value per completion (`user_column` among them), and TRL's
                `trainer_state`, `log_metric` and `log_extra`.

        Returns:
            `list[float]`: one reward per completion.
        """
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        user_ids = user_ids_from_columns(kwargs, self.user_column, self.__name__)
        fallbacks_before = self.user_rewards.num_fallbacks
        rewards = self.score(prompts, completions, user_ids)
        if log_metric is not None:
            self._log(log_metric, rewards, user_ids, self.user_rewards.num_fallbacks - fallbacks_before)
        if self.normalize:
            self.stats.update(rewards)
            std = self.stats.std
            rewards = (rewards - self.stats.mean) / (std if std > 1e-8 else 1.0)
        return rewards.tolist()

    def _log(
        self, log_metric: Callable[[str, float], None], rewards: torch.Tensor, user_ids: list[Any], fallbacks: int
    ) -> None:
        groups: dict[str, list[int]] = {}
        for row, user_id in enumerate(user_ids):
            key = MISSING_USER_KEY if is_missing_user(user_id) else str(user_id)
            if key not in self._logged_users:
                if len(self._logged_users) < self.max_logged_users:
                    self._logged_users.add(key)
                else:
                    key = OTHER_USERS_KEY
            groups.setdefault(key, []).append(row)
        for key in sorted(groups):
            log_metric(f"{self.__name__}/user/{key}", float(rewards[groups[key]].mean()))
        log_metric(f"{self.__name__}/fallbacks", float(fallbacks))


TRL_CALL_KEYWORDS = ("trainer_state", "log_metric", "log_extra")
"""What TRL passes to a reward function next to the dataset's columns."""


def user_ids_from_columns(columns: Mapping[str, Any], user_column: str, name: str) -> list[Any]:
    """
    The user id of each row, from the dataset columns TRL passes to a reward function; a clear error when the column
    is missing (usually dropped by `remove_unused_columns=True`).
    """
    if user_column not in columns:
        passed = sorted(key for key in columns if key not in TRL_CALL_KEYWORDS and not key.startswith("_"))
        raise ValueError(
            f"{name} reads each row's user from the `{user_column}` column, but the trainer passed no such column (it "
            f"passed {passed}). Add it to the dataset and keep it with `remove_unused_columns=False` in the trainer "
            "config (the default of RLOOConfig / GRPOConfig), or set `user_column=` to the column that holds the user "
            "ids."
        )
    return list(columns[user_column])


def is_missing_user(user_id: Any) -> bool:
    """Whether a user id is missing: `None`, an empty string or a float NaN (e.g. an empty cell of a table)."""
    return (
        user_id is None
        or (isinstance(user_id, str) and not user_id.strip())
        or (isinstance(user_id, float) and math.isnan(user_id))
    )


class _ProfileLookup:
    """`profiles.get(user_id)` that treats a missing user id as a user without a profile (default routing)."""

    def __init__(self, profiles: Any) -> None:
        self.profiles = profiles

    def get(self, user_id: Any, default: Any = None) -> Any:
        if is_missing_user(user_id):
            return default
        return lookup_profile(self.profiles, user_id, default)


def unpartition_zero3(model: nn.Module) -> nn.Module:
    r"""
    Replace, in place, the DeepSpeed ZeRO-3 partitioned parameters of a model built inside `deepspeed.zero.Init` by
    ordinary, full parameters (a no-op for an ordinary model).

    A model that is only used for inference next to a ZeRO-3 training run (a reward model) is not managed by a DeepSpeed
    engine, so its partitioned parameters are never gathered for its forward pass. Each parameter is gathered once with
    `deepspeed.zero.GatheredParameters` (a collective: every rank must call this) and copied. Tied parameters stay tied.

    Raises:
        `RuntimeError`: the model is partitioned but `torch.distributed` is not initialized, so it cannot be gathered.
    """
    partitioned = [param for param in model.parameters() if hasattr(param, "ds_id")]
    if not partitioned:
        return model
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            "The reward model's parameters are partitioned by DeepSpeed ZeRO-3 (it was built inside "
            "`deepspeed.zero.Init`, e.g. loaded after the training arguments of a ZeRO-3 run with "
            "`zero3_init_flag: true`), and torch.distributed is not initialized, so they cannot be gathered. Load the "
            "reward model before creating the training arguments, or in the same processes as the ZeRO-3 training run "
            "(every rank must build the PersonalizedReward)."
        )
    import deepspeed

    replacements: dict[int, nn.Parameter] = {}
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        for module in model.modules():
            for param_name, param in list(module._parameters.items()):
                if param is None or not hasattr(param, "ds_id"):
                    continue
                if id(param) not in replacements:
                    replacements[id(param)] = nn.Parameter(param.data.detach().clone(), requires_grad=False)
                module._parameters[param_name] = replacements[id(param)]
    logger.info(f"Gathered {len(replacements)} ZeRO-3 partitioned parameters of the reward model into full copies.")
    return model


__all__ = [
    "PersonalizedReward",
    "RunningMeanStd",
    "is_missing_user",
    "unpartition_zero3",
    "user_ids_from_columns",
]
