"""[`MoERewardTrainer`]: TRL's `RewardTrainer` for sparse Mixture-of-Experts reward models."""

import logging as logging_std
import os
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, set_seed
from transformers.utils import logging
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from . import losses
from .config import MoERewardConfig
from .configuration_moe_reward import config_fingerprint
from .feature_cache import FeatureBank, backbone_fingerprint, encode_preference_dataset
from .init import apply_expert_init, pca_cluster_expert_init, pca_expert_init
from .modeling_moe_reward import MoERewardModel
from .processing import PREFERENCE_COLUMNS, common_prefix_length, tokenize_preference
from .profiles import PROFILES_DIRNAME, ProfileStore, UserProfile


logger = logging.get_logger(__name__)

TOKENIZED_COLUMNS = ("chosen_ids", "rejected_ids")
# Without cached features, `expert_init="pca"` encodes at most this many (randomly chosen) training pairs.
PCA_INIT_MAX_PAIRS = 4096


@dataclass
class DataCollatorForMoEPreference(DataCollatorForPreference):
    """
    TRL's preference collator, extended with what the MoE router needs.

    On top of `input_ids`, `attention_mask` and the optional `margin` (chosen rows first, then rejected rows), it
    returns `prompt_lengths` (one per row, the same for both rows of a pair), `paired=True`, and `user_ids` (a list)
    when the examples carry a `user_id`. With a `feature_bank` and a `feature_row` column (the frozen-backbone fast
    path), it also returns the cached `sequence_features` and `router_features`.
    """

    feature_bank: FeatureBank | None = None

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        output["paired"] = True
        if self.feature_bank is not None and "feature_row" in examples[0]:
            features = self.feature_bank.lookup(torch.tensor([example["feature_row"] for example in examples]))
            output["sequence_features"] = torch.cat([features["chosen_features"], features["rejected_features"]])
            output["router_features"] = features["router_features"]
        if "prompt_length" in examples[0]:
            prompt_lengths = torch.tensor([example["prompt_length"] for example in examples], dtype=torch.long)
            output["prompt_lengths"] = prompt_lengths.repeat(2)
        if "user_id" in examples[0]:
            output["user_ids"] = [example["user_id"] for example in examples]
        return output


def _unwrap(model: nn.Module) -> nn.Module:
    """The MoE model under a PEFT wrapper, if any."""
    return model.get_base_model() if is_peft_model(model) else model


class MoERewardTrainer(RewardTrainer):
    r"""
    Trainer for sparse Mixture-of-Experts reward models, built on TRL's [`~trl.RewardTrainer`].

    It trains a [`MoERewardModel`] on ordinary binary preference data with a Bradley-Terry (or mixture / assignment)
    loss plus the three regularizers of the paper: local sparsity, global balance and expert diversity. Everything
    `RewardTrainer` accepts keeps working: implicit and explicit prompts, conversational data, `margin`,
    `center_rewards_coefficient`, eval datasets, PEFT and `save_model`.

    Example:

    ```python
    >>> from datasets import load_dataset
    >>> from trl_moe_rm import MoERewardConfig, MoERewardTrainer

    >>> dataset = load_dataset("trl-lib/ultrafeedback_binarized", split="train")
    >>> trainer = MoERewardTrainer(
    ...     model="Qwen/Qwen2.5-0.5B-Instruct",
    ...     args=MoERewardConfig(output_dir="qwen-moe-rm", num_experts=8, top_k=2),
    ...     train_dataset=dataset,
    ... )
    >>> trainer.train()
    ```

    Args:
        model (`str` or [`MoERewardModel`] or [`~peft.PeftModel`]):
            A backbone checkpoint (Hub id or local path; the model is built with [`MoERewardModel.from_backbone`]
            using the MoE fields of `args` and `args.model_init_kwargs`), or a [`MoERewardModel`] instance.
        args ([`MoERewardConfig`], *optional*):
            Training configuration. Defaults to `MoERewardConfig("<model>-MoE-Reward")`.
        data_collator (`DataCollator`, *optional*):
            Defaults to [`DataCollatorForMoEPreference`].
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Preference data: `chosen`/`rejected` (implicit prompt) or `prompt`/`chosen`/`rejected` (explicit prompt),
            standard or conversational, optionally with `margin` and `user_id` columns. Explicit prompts are
            tokenized on their own so that the router sees exactly the prompt.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Evaluation data, in the same format.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer. Loaded from the model's name when omitted.
        compute_metrics, callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics:
            As in [`~trl.RewardTrainer`].
        peft_config ([`~peft.PeftConfig`], *optional*):
            PEFT configuration (e.g. LoRA on the backbone). The router and experts are added to `modules_to_save` so
            that they stay fully trainable.
    """

    _tag_names = ["trl", "reward-trainer", "moe-reward", "mixture-of-experts"]
    _name = "MoE Reward"

    def __init__(
        self,
        model: "str | MoERewardModel | PreTrainedModel",
        args: MoERewardConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: "Any | None" = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config.name_or_path or "model"
            args = MoERewardConfig(f"{name.rstrip('/').split('/')[-1]}-MoE-Reward")
        elif not isinstance(args, MoERewardConfig):
            raise TypeError(
                f"`args` must be a MoERewardConfig, got {type(args).__name__}. Build one with "
                "`MoERewardConfig(output_dir=..., **your_reward_config_kwargs)`."
            )

        built_from_name = isinstance(model, str)
        if built_from_name:
            set_seed(args.seed)
            model_init_kwargs = dict(args.model_init_kwargs or {})
            model_init_kwargs.setdefault("dtype", torch.float32)
            model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                model_init_kwargs["device_map"] = None
            model = MoERewardModel.from_backbone(model, model_init_kwargs=model_init_kwargs, **args.moe_model_kwargs)
        if getattr(_unwrap(model).config, "num_labels", 1) != 1:
            raise ValueError(
                f"The model has `num_labels={_unwrap(model).config.num_labels}`, but a reward model outputs one scalar: "
                "use `num_labels=1` (MoERewardModel always does)."
            )
        if not isinstance(_unwrap(model), MoERewardModel):
            raise TypeError(
                f"MoERewardTrainer trains a MoERewardModel, got {type(_unwrap(model)).__name__}. Pass a backbone name "
                "(e.g. `model='Qwen/Qwen2.5-0.5B'`) or wrap your backbone with `MoERewardModel.from_backbone(...)`. "
                "For a plain single-head reward model use trl.RewardTrainer."
            )
        self._moe_model = _unwrap(model)
        self._moe_config = self._moe_model.config
        _warn_ignored_model_kwargs(args, self._moe_config)
        if args.freeze_backbone:
            _unwrap(model).backbone.requires_grad_(False)
        if peft_config is not None:
            modules_to_save = list(getattr(peft_config, "modules_to_save", None) or [])
            peft_config.modules_to_save = modules_to_save + [
                m for m in ("router", "experts") if m not in modules_to_save
            ]

        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(_unwrap(model).config.name_or_path)
        if processing_class.pad_token is None:
            if processing_class.eos_token is None:
                raise ValueError(
                    "The tokenizer has neither a pad token nor an eos token. Set `tokenizer.pad_token` before creating "
                    "the trainer."
                )
            processing_class.pad_token = processing_class.eos_token
        self._feature_bank = None
        if args.cache_features:
            if not args.freeze_backbone:
                raise ValueError(
                    "`cache_features=True` needs `freeze_backbone=True`: a trained backbone changes its features."
                )
            if peft_config is not None or is_peft_model(model):
                raise ValueError(
                    "`cache_features=True` cannot be combined with PEFT: the adapters change the features."
                )
            if not args.disable_dropout:
                logger.warning(
                    "`cache_features=True` encodes the data once, in eval mode: the backbone's dropout is not applied, "
                    "whereas with `disable_dropout=False` the uncached path would train on dropped-out features. Set "
                    "`disable_dropout=True` (the default) for the two paths to train the same model."
                )
            self._feature_bank = FeatureBank()
        self._encoded_backbone: str | None = None
        if data_collator is None:
            data_collator = DataCollatorForMoEPreference(
                pad_token_id=processing_class.pad_token_id,
                pad_to_multiple_of=args.pad_to_multiple_of,
                feature_bank=self._feature_bank,
            )
        self._cache_collator = data_collator

        with _UsedModelInitKwargsFilter() if built_from_name else nullcontext():
            self._init_reward_trainer(
                model, args, data_collator, train_dataset, eval_dataset, processing_class, compute_metrics,
                callbacks, optimizers, optimizer_cls_and_kwargs, preprocess_logits_for_metrics, peft_config,
            )  # fmt: skip
        if args.should_save and not os.access(args.output_dir, os.W_OK | os.X_OK):
            raise PermissionError(
                f"`output_dir` {args.output_dir!r} is not writable, so no checkpoint or model could be saved: choose "
                "a directory you can write to."
            )
        self.user_weight_logits: nn.Parameter | None = None
        self._user_index: dict[Any, int] = {}
        self._user_counts: dict[Any, int] = {}
        if args.learn_user_weights:
            self._init_user_weights(args)
        if args.expert_init is not None:
            self._init_experts_from_pca(args)

    # ------------------------------------------------------------------ user weights & expert initialisation
    def _init_reward_trainer(self, model, args, *rest) -> None:
        """`RewardTrainer.__init__`, with the trainer's positional arguments after `model` and `args`."""
        names = (
            "data_collator", "train_dataset", "eval_dataset", "processing_class", "compute_metrics", "callbacks",
            "optimizers", "optimizer_cls_and_kwargs", "preprocess_logits_for_metrics", "peft_config",
        )  # fmt: skip
        super().__init__(model=model, args=args, **dict(zip(names, rest)))

    def _init_user_weights(self, args: MoERewardConfig) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or args.world_size > 1:
            raise ValueError(
                "`learn_user_weights=True` runs in a single process (the user weights live outside the model); turn "
                "off DeepSpeed/FSDP/multi-process training, or fit the users after training with `fit_users`."
            )
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or "user_id" not in dataset.column_names:
            raise ValueError(
                "`learn_user_weights=True` needs a map-style train dataset with a `user_id` column (the user who "
                "labelled each pair)."
            )
        user_ids = list(dataset["user_id"])
        self._user_counts = dict(Counter(user_ids))
        self._user_index = {user_id: index for index, user_id in enumerate(self._user_counts)}
        num_experts = self._moe_config.num_experts
        self.user_weight_logits = nn.Parameter(torch.zeros(len(self._user_index), num_experts, device=args.device))

    def _init_experts_from_pca(self, args: MoERewardConfig) -> None:
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or len(dataset) < 2:
            raise ValueError(
                f"`expert_init={args.expert_init!r}` needs a map-style train dataset with at least 2 pairs."
            )
        if self._feature_bank is not None and "feature_row" in dataset.column_names:
            features = self.cached_features(dataset)
        else:
            if len(dataset) > PCA_INIT_MAX_PAIRS:
                dataset = dataset.shuffle(seed=args.seed).select(range(PCA_INIT_MAX_PAIRS))
            features = encode_preference_dataset(
                self._moe_model,
                dataset,
                self._cache_collator,
                batch_size=max(args.per_device_eval_batch_size, 32),
                device=args.device,
            )
        if args.expert_init == "pca_clusters":
            # The prompt of each pair: its token ids before the response.
            prompts = [tuple(ids[:length]) for ids, length in zip(dataset["chosen_ids"], dataset["prompt_length"])]
            weights = pca_cluster_expert_init(
                features["chosen_features"],
                features["rejected_features"],
                self._moe_config.num_experts,
                prompt_ids=prompts,
                seed=args.seed,
            )
        else:
            weights = pca_expert_init(
                features["chosen_features"], features["rejected_features"], self._moe_config.num_experts
            )
        apply_expert_init(self.model, weights)

    def user_weights(self) -> dict[Any, list[float]]:
        """The learned weights `w_u` (on the simplex) of every training user, with `learn_user_weights=True`."""
        if self.user_weight_logits is None:
            raise ValueError("No user weights: train with `learn_user_weights=True` on rows that carry a `user_id`.")
        weights = torch.softmax(self.user_weight_logits.detach().float().cpu(), dim=-1)
        return {user_id: weights[index].tolist() for user_id, index in self._user_index.items()}

    def export_user_profiles(self, store: ProfileStore | None = None) -> dict[Any, UserProfile]:
        """
        The training users' learned weights as [`UserProfile`]s (`method="joint"`, static mode, `num_shots` = the
        user's training pairs), written to `store` when given.
        """
        fingerprint = config_fingerprint(self._moe_config)
        profiles = {
            user_id: UserProfile(
                user_id=user_id,
                expert_weights=weights,
                mode="static",
                method="joint",
                num_shots=self._user_counts[user_id],
                config_hash=fingerprint,
            )
            for user_id, weights in self.user_weights().items()
        }
        if store is not None:
            store.save_many(profiles.values())
        return profiles

    def _user_mixture(
        self, user_ids: list | None, reference: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(weights (B, K), known (B,))` of the batch's rows whose user has learned weights; `None` if none has."""
        if self.user_weight_logits is None or user_ids is None:
            return None
        indices = [self._user_index.get(user_id, -1) for user_id in user_ids]
        known = torch.tensor([index >= 0 for index in indices], device=reference.device)
        if not bool(known.any()):
            return None
        rows = torch.tensor([max(index, 0) for index in indices], device=self.user_weight_logits.device)
        weights = torch.softmax(self.user_weight_logits[rows].float(), dim=-1).to(reference.device)
        return weights, known

    # ------------------------------------------------------------------ data
    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: PreTrainedTokenizerBase,
        args: MoERewardConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        if isinstance(dataset, Dataset) and len(dataset) == 0:
            raise ValueError(
                f"The {dataset_name} dataset is empty: it has no preference pairs to train or evaluate on. Check the "
                "data files (or the filter that emptied them)."
            )
        columns = list(next(iter(dataset)).keys()) if isinstance(dataset, IterableDataset) else dataset.column_names
        if "user_id" in columns and isinstance(dataset, Dataset):
            _check_user_ids(dataset)
        if "margin" in columns and isinstance(dataset, Dataset):
            _check_margins(dataset)
        if all(column in columns for column in TOKENIZED_COLUMNS):
            if "prompt_length" not in columns:
                dataset = dataset.map(
                    _prompt_length_from_common_prefix, **self._map_kwargs(dataset, args, dataset_name)
                )
            return self._maybe_cache_features(self._filter_max_length(dataset, args, dataset_name), args)
        missing = [column for column in PREFERENCE_COLUMNS if column not in columns]
        if missing:
            raise ValueError(
                f"The {dataset_name} dataset has no {' or '.join(repr(c) for c in missing)} column (it has "
                f"{columns}). MoERewardTrainer needs preference data: `chosen` and `rejected`, with an optional "
                "`prompt`. Rename your columns, e.g. `dataset.rename_column('response_a', 'chosen')`."
            )
        if "prompt" not in columns and self._moe_config.router_input == "prompt":
            logger.warning(
                f"The {dataset_name} dataset has no `prompt` column (implicit prompt) but the router reads the prompt: "
                "it will read the longest common token prefix of `chosen` and `rejected` instead. Add a `prompt` "
                "column (e.g. with `trl.extract_prompt`) for exact prompt routing, or set `router_input='sequence'`."
            )
        dataset = dataset.map(
            tokenize_preference,
            fn_kwargs={"processing_class": processing_class},
            remove_columns=[c for c in ("chosen", "rejected", "prompt") if c in columns],
            **self._map_kwargs(dataset, args, dataset_name),
        )
        return self._maybe_cache_features(self._filter_max_length(dataset, args, dataset_name), args)

    def _maybe_cache_features(self, dataset: Dataset | IterableDataset, args: MoERewardConfig) -> Dataset:
        """With `cache_features=True`, encode the dataset once and index its rows into the feature bank."""
        if self._feature_bank is None or "feature_row" in dataset.column_names:
            return dataset
        if isinstance(dataset, IterableDataset):
            raise ValueError("`cache_features=True` needs a map-style `Dataset`, not an `IterableDataset`.")
        if len(dataset) == 0:
            return dataset.add_column("feature_row", [])
        rows = self._feature_bank.add(self._encode(dataset, args))
        return dataset.add_column("feature_row", list(rows))

    def _encode(self, dataset: Dataset, args: MoERewardConfig) -> dict[str, torch.Tensor]:
        self._encoded_backbone = backbone_fingerprint(self._moe_model)
        return encode_preference_dataset(
            self._moe_model,
            dataset,
            self._cache_collator,
            batch_size=max(args.per_device_eval_batch_size, 32),
            device=args.device,
            cache_dir=args.feature_cache_dir,
            disable_tqdm=args.disable_tqdm,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._encoded_backbone is None or backbone_fingerprint(self._moe_model) == self._encoded_backbone:
            return
        # The checkpoint's backbone differs from the one the cache was encoded with: the cached features are stale.
        logger.warning(
            f"The backbone in {resume_from_checkpoint!r} differs from the one the features were cached with: encoding "
            "the train and eval data again with the checkpoint's backbone."
        )
        eval_datasets = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        for dataset in [self.train_dataset, *eval_datasets]:
            if dataset is not None and "feature_row" in dataset.column_names and len(dataset) > 0:
                features = self._encode(dataset.remove_columns("feature_row"), self.args)
                self._feature_bank.overwrite(torch.tensor(dataset["feature_row"]), features)

    @staticmethod
    def _map_kwargs(dataset: Dataset | IterableDataset, args: MoERewardConfig, dataset_name: str) -> dict[str, Any]:
        if isinstance(dataset, IterableDataset):  # `IterableDataset.map` supports neither `num_proc` nor `desc`
            return {}
        return {"num_proc": args.dataset_num_proc, "desc": f"Tokenizing {dataset_name} dataset"}

    def _filter_max_length(
        self, dataset: Dataset | IterableDataset, args: MoERewardConfig, dataset_name: str
    ) -> Dataset | IterableDataset:
        if args.max_length is None:
            return dataset
        kwargs = self._map_kwargs(dataset, args, dataset_name)
        if "desc" in kwargs:
            kwargs["desc"] = f"Filtering {dataset_name} >{args.max_length} tokens"
        filtered = dataset.filter(
            lambda example: max(len(example["chosen_ids"]), len(example["rejected_ids"])) <= args.max_length,
            **kwargs,
        )
        if isinstance(dataset, Dataset) and len(filtered) < len(dataset):
            dropped = len(dataset) - len(filtered)
            if len(filtered) == 0:
                raise ValueError(
                    f"All {dropped} pairs of the {dataset_name} dataset are longer than `max_length={args.max_length}` "
                    "tokens (prompt + response), so none is left. Raise `max_length` (or set it to None) or shorten "
                    "the data."
                )
            logger.warning(
                f"Dropped {dropped} of the {len(dataset)} pairs of the {dataset_name} dataset: longer than "
                f"`max_length={args.max_length}` tokens."
            )
        return filtered

    def cached_features(self, dataset: Dataset) -> dict[str, torch.Tensor]:
        """
        The cached backbone features (`chosen_features`, `rejected_features`, `router_features`) of a dataset this
        trainer prepared with `cache_features=True` (its train or eval dataset).
        """
        if self._feature_bank is None or "feature_row" not in dataset.column_names:
            raise ValueError(
                "No cached features for this dataset: train with `cache_features=True` and pass a dataset the trainer "
                "prepared (`trainer.train_dataset` or `trainer.eval_dataset`)."
            )
        return self._feature_bank.lookup(torch.tensor(dataset["feature_row"]))

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "chosen_ids",
                "rejected_ids",
                "margin",
                "prompt_length",
                "user_id",
                "feature_row",
            ]

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        args: MoERewardConfig = self.args
        inputs = dict(inputs)
        margin = inputs.pop("margin", None)
        user_ids = inputs.pop("user_ids", None)
        # The weight-based diversities read the expert weights, which DeepSpeed ZeRO-3 only gathers inside their forward.
        weight_diversity = bool(args.diversity_coef) and args.diversity_type in ("cosine", "redundancy")
        outputs = model(**inputs, return_expert_weights=True) if weight_diversity else model(**inputs)

        num_pairs = outputs.logits.shape[0] // 2
        rewards_chosen, rewards_rejected = outputs.logits.squeeze(-1).chunk(2)
        expert_chosen, expert_rejected = outputs.expert_rewards.chunk(2)
        expert_deltas = expert_chosen - expert_rejected
        router_logits = outputs.router_logits[:num_pairs]
        routing_weights = outputs.routing_weights[:num_pairs]
        temperature = self._moe_config.router_temperature
        router_probs = torch.softmax(router_logits.float() / temperature, dim=-1)
        # Rows of users with learned weights use them in place of the routing (static mode).
        users = self._user_mixture(user_ids, expert_deltas)

        terms: dict[str, torch.Tensor] = {}
        if args.loss_type == "reward_mixture":
            if users is None:
                terms["preference_loss"] = losses.bradley_terry_loss(rewards_chosen, rewards_rejected, margin)
            else:
                user_weights, known = users
                user_deltas = (user_weights * expert_deltas.float()).sum(dim=-1)
                deltas = torch.where(known, user_deltas, (rewards_chosen - rewards_rejected).float())
                terms["preference_loss"] = losses.bradley_terry_loss(deltas, torch.zeros_like(deltas), margin)
        elif args.loss_type == "likelihood_mixture":
            mixture = routing_weights if users is None else torch.where(users[1][:, None], users[0], routing_weights)
            terms["preference_loss"] = losses.likelihood_mixture_loss(mixture, expert_deltas, margin)
        else:
            shifted = expert_deltas if margin is None else expert_deltas - margin[:, None]
            prior = router_probs if users is None else torch.where(users[1][:, None], users[0], router_probs)
            responsibilities = losses.assignment_responsibilities(
                prior, shifted, args.assignment_temperature, args.assignment_top_k
            )
            if users is not None:
                # M-step of the users' mixing weights: cross-entropy against their rows' responsibilities.
                user_weights, known = users
                cross_entropy = -(responsibilities.detach() * torch.log(user_weights.clamp_min(1e-12))).sum(dim=-1)
                terms["user_assignment_loss"] = (cross_entropy * known).sum() / known.sum()
            terms["preference_loss"] = losses.assignment_expert_loss(responsibilities, shifted)
            terms["assignment_balance_loss"] = args.assignment_balance_coef * losses.entropy_balance_loss(
                responsibilities
            )
            terms["router_assignment_loss"] = args.router_assignment_coef * losses.router_assignment_loss(
                router_logits, responsibilities, temperature
            )
        if args.sparsity_coef:
            terms["sparsity_loss"] = args.sparsity_coef * losses.local_sparsity_loss(router_probs)
        if args.balance_coef:
            if args.balance_type == "switch":
                balance = losses.switch_balance_loss(router_probs, routing_weights)
            else:
                balance = losses.entropy_balance_loss(router_probs)
            terms["balance_loss"] = args.balance_coef * balance
        if args.diversity_coef:
            if args.diversity_type == "cosine":
                diversity = losses.cosine_diversity_loss(outputs.expert_weight_vectors)
            elif args.diversity_type == "redundancy":
                diversity = losses.redundancy_diversity_loss(outputs.expert_weight_vectors)
            else:
                diversity = losses.correlation_diversity_loss(expert_deltas)
            terms["diversity_loss"] = args.diversity_coef * diversity
        if args.router_z_loss_coef:
            terms["router_z_loss"] = args.router_z_loss_coef * losses.router_z_loss(router_logits)
        if args.center_rewards_coefficient is not None:
            terms["center_loss"] = args.center_rewards_coefficient * torch.mean(
                (rewards_chosen.float() + rewards_rejected.float()) ** 2
            )
        loss = sum(terms.values())

        if mode == "train":
            num_tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            # `RewardTrainer._tp_size` (tensor-parallel degree) exists from trl 1.13 on; trl 1.0-1.12 count every token.
            self._total_train_tokens += num_tokens // getattr(self, "_tp_size", 1)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            self._log_metrics(
                mode,
                terms,
                outputs,
                rewards_chosen,
                rewards_rejected,
                expert_deltas,
                router_probs,
                routing_weights,
                inputs["attention_mask"],
            )
        if return_outputs and outputs.expert_weight_vectors is not None:  # not a per-example prediction
            outputs = type(outputs)(**{k: v for k, v in outputs.items() if k != "expert_weight_vectors"})
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(
        self,
        mode: str,
        terms: dict[str, torch.Tensor],
        outputs,
        rewards_chosen: torch.Tensor,
        rewards_rejected: torch.Tensor,
        expert_deltas: torch.Tensor,
        router_probs: torch.Tensor,
        routing_weights: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> None:
        metrics = self._metrics[mode]
        all_rewards = self.accelerator.gather(outputs.logits.detach().float())
        metrics["min_reward"].append(all_rewards.min().item())
        metrics["mean_reward"].append(all_rewards.mean().item())
        metrics["max_reward"].append(all_rewards.max().item())

        # Per-process statistics, gathered across ranks as one vector so that the per-expert load sums to 1.
        num_experts = routing_weights.shape[-1]
        tokens = attention_mask.float().sum(dim=-1).reshape(2, -1).sum(dim=0)  # tokens of each pair
        dispatched = (routing_weights > 0).float()
        local = torch.cat(
            [
                torch.stack(
                    [
                        # TRL's own logged `accuracy` (strict `>`: a tie is an error), kept so that the logs compare
                        # with `RewardTrainer`'s; every other accuracy of the package is `trl_moe_rm.accuracy`'s
                        # (a tie counts 0.5). With float rewards the two differ only on exact ties.
                        (rewards_chosen > rewards_rejected).float().mean(),
                        (rewards_chosen - rewards_rejected).float().mean(),
                    ]
                ),
                torch.stack([term.detach().float() for term in terms.values()]),
                routing_weights.float().mean(dim=0),  # load
                (tokens[:, None] * dispatched).sum(dim=0) / (tokens.sum() * dispatched.sum(dim=1).mean()),
                (expert_deltas > 0).float().mean(dim=0),  # per-expert pairwise accuracy
                -(router_probs * router_probs.clamp_min(1e-12).log()).sum(dim=-1).mean()[None],
            ]
        )
        gathered = self.accelerator.gather(local[None]).mean(dim=0).tolist()
        metrics["accuracy"].append(gathered[0])
        metrics["margin"].append(gathered[1])
        position = 2
        for name in terms:
            metrics[f"moe/{name}"].append(gathered[position])
            position += 1
        for kind in ("load", "token_fraction", "accuracy"):
            for expert in range(num_experts):
                metrics[f"moe/{kind}/expert_{expert}"].append(gathered[position])
                position += 1
        metrics["moe/routing_entropy"].append(gathered[position])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """As `RewardTrainer.log`, but evaluation metrics take the prefix of their dataset (`eval_<name>_...`)."""
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            prefix = next(
                (key[: -len("_loss")] for key in logs if key.startswith("eval") and key.endswith("_loss")), "eval"
            )
            metrics = {f"{prefix}_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super(RewardTrainer, self).log(logs, start_time)
        self._metrics[mode].clear()

    # ------------------------------------------------------------------ saving
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.user_weight_logits is not None and self.args.should_save:
            # The learned users travel with the model: `ProfileStore.from_pretrained(output_dir)` reopens them.
            directory = Path(output_dir if output_dir is not None else self.args.output_dir) / PROFILES_DIRNAME
            self.export_user_profiles(ProfileStore(directory))
        if is_peft_model(self.model) and self.args.should_save:
            # A PEFT adapter folder does not describe the MoE head (number of experts, routing): save its config too,
            # so that the adapter reloads on its own (`trl_moe_rm.loading.load_moe_reward_model`).
            _unwrap(self.model).config.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:
            self.create_model_card(output_dir=output_dir)

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        **kwargs,
    ) -> None:
        r"""
        Write the MoE reward model card to `README.md` in `output_dir` (a keyword argument; default: `args.output_dir`)
        instead of TRL's generic one, which names no base model for a MoE model ("fine-tuned version of [None]").

        TRL calls it at every checkpoint, [`save_model`] and [`push_to_hub`] call it too: the card is the one that
        `push_to_hub` uploads. See [`~trl_moe_rm.publishing.write_trainer_model_card`]; `kwargs` takes `output_dir`,
        `repo_id`, `profiles`, `descriptions`, `eval_results`, `routing_heatmap`, `expert_load`, `report`,
        `base_model` and `license`.
        """
        if not self.is_world_process_zero():
            return
        from .publishing import write_trainer_model_card

        write_trainer_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ):
        r"""
        Upload the trained model to `args.hub_model_id` (default: the name of `output_dir`) in one commit, with its
        tokenizer, the users' `profiles` ([`ProfileStore`] or path; default: `<output_dir>/profiles/` when
        `save_model` wrote one), the expert `descriptions` (`experts.json`), the per-expert load and the last
        evaluation metrics, the code files for `trust_remote_code`, and the model card (also written to
        `output_dir/README.md`). See [`~trl_moe_rm.publishing.push_trainer_to_hub`]; `kwargs` takes `private`,
        `profiles`, `descriptions`, `eval_results`, `routing_heatmap`, `dataset_name`, `model_name`, `tags` and the
        other arguments of [`~trl_moe_rm.publishing.push_moe_reward_model`].
        """
        from .publishing import push_trainer_to_hub

        return push_trainer_to_hub(self, commit_message, blocking, token, revision, **kwargs)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """
        Use `router_learning_rate` for the router parameters when it is set, and add the user weight logits (with
        `learn_user_weights=True`) as their own parameter group.
        """
        optimizer = self._create_model_optimizer(model)
        logits = getattr(self, "user_weight_logits", None)
        if logits is not None and not any(p is logits for group in optimizer.param_groups for p in group["params"]):
            learning_rate = self.args.user_weights_learning_rate or self.args.learning_rate
            optimizer.add_param_group({"params": [logits], "lr": learning_rate, "weight_decay": 0.0})
        return optimizer

    def _create_model_optimizer(self, model=None):
        if self.optimizer is not None or self.args.router_learning_rate is None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = model or self.model
        router_params = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in f".{n}"]
        other_params = [p for n, p in model.named_parameters() if p.requires_grad and ".router." not in f".{n}"]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(
            [
                {"params": other_params, "weight_decay": self.args.weight_decay},
                {"params": router_params, "lr": self.args.router_learning_rate, "weight_decay": 0.0},
            ],
            **optimizer_kwargs,
        )
        return self.optimizer


class _UsedModelInitKwargsFilter(logging_std.Filter):
    """
    Drops TRL's "You passed `model_init_kwargs` ... will be ignored" while the trainer initialises: this trainer builds
    the MoE model from the backbone name with those kwargs itself, then hands `RewardTrainer` the built model, so they
    were used (TRL 1.x warns whenever `args.model_init_kwargs` is set and the model is not a string).
    """

    _LOGGER = "trl.trainer.reward_trainer"

    def filter(self, record: logging_std.LogRecord) -> bool:
        return "`model_init_kwargs` will be ignored" not in record.getMessage()

    def __enter__(self) -> "_UsedModelInitKwargsFilter":
        logging_std.getLogger(self._LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc_info) -> None:
        logging_std.getLogger(self._LOGGER).removeFilter(self)


def _warn_ignored_model_kwargs(args: MoERewardConfig, config: Any) -> None:
    """The model arguments of `args` only build a model from a name: say so when they disagree with a given model."""
    defaults = MoERewardConfig.__dataclass_fields__
    ignored = {
        name: value
        for name, value in args.moe_model_kwargs.items()
        if value != defaults[name].default and value != getattr(config, name, None)
    }
    if ignored:
        settings = ", ".join(f"{name}={value!r}" for name, value in ignored.items())
        logger.warning(
            f"`MoERewardConfig` sets {settings}, but the model was passed already built, so these are ignored (the "
            "model's own configuration applies). Set them on the model, e.g. `MoERewardModel.from_backbone(..., "
            f"{settings})`, or pass the backbone's name as `model`."
        )


def _check_user_ids(dataset: Dataset) -> None:
    feature = dataset.features["user_id"]
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string") and not (isinstance(dtype, str) and dtype.startswith(("int", "uint"))):
        raise ValueError(
            f"The `user_id` column has type {feature}; user ids must all be strings or all be integers. Convert "
            "them, e.g. `dataset.cast_column('user_id', datasets.Value('string'))`."
        )
    if any(user_id is None for user_id in dataset["user_id"]):
        raise ValueError("The `user_id` column contains missing values (None). Every row needs a user id.")


def _check_margins(dataset: Dataset) -> None:
    feature = dataset.features["margin"]
    dtype = getattr(feature, "dtype", None)
    if not (isinstance(dtype, str) and dtype.startswith(("float", "int", "uint"))):
        raise ValueError(
            f"The `margin` column has type {feature}; a margin is a number (the reward gap a pair requires). Convert "
            "it, e.g. `dataset.cast_column('margin', datasets.Value('float32'))`."
        )
    if any(margin is None for margin in dataset["margin"]):
        raise ValueError("The `margin` column contains missing values (None); give every pair a margin (e.g. 0.0).")


def _prompt_length_from_common_prefix(example: dict[str, Any]) -> dict[str, int]:
    return {"prompt_length": common_prefix_length(example["chosen_ids"], example["rejected_ids"])}
