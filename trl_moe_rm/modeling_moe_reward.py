"""Sparse Mixture-of-Experts reward model.

A backbone encodes (prompt, response); a router reads the prompt and keeps its `top_k` largest probabilities; `K`
expert heads each give a scalar reward. The reward is `sum_k g_k(x) * r_k(x, y)`.

This file only uses relative imports, torch and transformers, so that a saved model loads with
`trust_remote_code=True` where `trl_moe_rm` is not installed.
"""

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .configuration_moe_reward import MoERewardModelConfig, config_fingerprint


logger = logging.get_logger(__name__)


@dataclass
class MoERewardModelOutput(ModelOutput):
    r"""
    Output of [`MoERewardModel`].

    Args:
        loss (`torch.FloatTensor`, *optional*):
            Unused by the model itself (the losses live in the trainer); kept for the `Trainer` contract.
        logits (`torch.FloatTensor` of shape `(batch_size, 1)`):
            The routed reward `sum_k g_k(x) * r_k(x, y)`.
        expert_rewards (`torch.FloatTensor` of shape `(batch_size, num_experts)`):
            The reward `r_k(x, y)` of every expert, routed to or not.
        router_logits (`torch.FloatTensor` of shape `(batch_size, num_experts)`):
            The router logits before temperature, noise and top-k.
        routing_weights (`torch.FloatTensor` of shape `(batch_size, num_experts)`):
            The sparse mixture weights `g(x)`: exactly `top_k` non-zeros per row, summing to 1.
        sequence_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The pooled representation of (prompt, response) that the experts read.
        router_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The representation that the router reads.
        expert_weight_vectors (`torch.FloatTensor` of shape `(num_experts, D)`, *optional*):
            A copy of [`MoEExperts.weight_vectors`] taken inside the experts' forward (only with
            `return_expert_weights=True`), for the cosine diversity loss under DeepSpeed ZeRO-3.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    expert_rewards: torch.FloatTensor | None = None
    router_logits: torch.FloatTensor | None = None
    routing_weights: torch.FloatTensor | None = None
    sequence_features: torch.FloatTensor | None = None
    router_features: torch.FloatTensor | None = None
    expert_weight_vectors: torch.FloatTensor | None = None


def top_k_routing(router_logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> torch.Tensor:
    r"""
    Sparse routing weights from router logits: the softmax over the `top_k` largest logits, zero elsewhere.

    Computed in float32 whatever the input dtype. Each selected weight is floored at the smallest normal float so
    that a row always has exactly `top_k` non-zeros, even for extreme logits (e.g. a gap of 1e4).

    Args:
        router_logits (`torch.Tensor` of shape `(..., num_experts)`):
            Router logits.
        top_k (`int`):
            Number of experts kept per row.
        temperature (`float`, *optional*, defaults to `1.0`):
            Divides the logits before the softmax.

    Returns:
        `torch.Tensor` of the same shape, float32, rows on the simplex with exactly `top_k` non-zeros.
    """
    logits = router_logits.float() / temperature
    top_values, top_indices = logits.topk(top_k, dim=-1)
    top_weights = torch.softmax(top_values, dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return torch.zeros_like(logits).scatter(-1, top_indices, top_weights)


class MoEExperts(nn.Module):
    r"""
    `K` scalar reward heads evaluated together, as batched weights (all experts are computed for every row and the
    router's mask is applied afterwards, which keeps parameter access independent of the data, as DeepSpeed ZeRO-3
    prefers).

    Args:
        hidden_size (`int`):
            Size of the input features.
        num_experts (`int`):
            Number of experts `K`.
        expert_type (`str`):
            `"linear"`: `r_k = w_k . h + b_k`. `"mlp"`: `r_k = v_k . gelu(W_k h + c_k) + b_k`.
        expert_hidden_size (`int`):
            Hidden width of the MLP experts.
    """

    def __init__(self, hidden_size: int, num_experts: int, expert_type: str, expert_hidden_size: int):
        super().__init__()
        self.expert_type = expert_type
        if expert_type == "linear":
            self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.fc_weight = nn.Parameter(torch.empty(num_experts, expert_hidden_size, hidden_size))
            self.fc_bias = nn.Parameter(torch.empty(num_experts, expert_hidden_size))
            self.weight = nn.Parameter(torch.empty(num_experts, expert_hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))

    def forward(
        self, features: torch.Tensor, return_weight_vectors: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """
        Rewards of every expert: `(batch_size, hidden_size)` -> `(batch_size, num_experts)`.

        With `return_weight_vectors=True`, also returns a copy of [`~MoEExperts.weight_vectors`] made here, where
        DeepSpeed ZeRO-3 has gathered the (otherwise partitioned) weights and tracks their gradients.
        """
        features = features.to(self.weight.dtype)
        if self.expert_type == "linear":
            rewards = features @ self.weight.T + self.bias
        else:
            hidden = nn.functional.gelu(torch.einsum("nh,keh->nke", features, self.fc_weight) + self.fc_bias)
            rewards = torch.einsum("nke,ke->nk", hidden, self.weight) + self.bias
        if return_weight_vectors:
            return rewards, self.weight_vectors().clone()
        return rewards

    def weight_vectors(self) -> torch.Tensor:
        """One flattened weight vector per expert, `(num_experts, D)`, for the orthogonality (diversity) loss."""
        if self.expert_type == "linear":
            return self.weight
        return self.fc_weight.flatten(1)


class MoERewardPreTrainedModel(PreTrainedModel):
    config_class = MoERewardModelConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, MoEExperts):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("bias"):
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=std)
        elif isinstance(module, nn.Linear) and getattr(module, "_is_moe_router", False):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        else:
            super()._init_weights(module)


# Arguments of `PreTrainedModel.push_to_hub`: all that `MoERewardModel.push_to_hub` takes when `trl_moe_rm` did not hook
# the class (the copy of this file loaded with `trust_remote_code=True`).
_STANDARD_PUSH_ARGUMENTS = frozenset(
    {"commit_message", "commit_description", "private", "token", "revision", "create_pr", "max_shard_size", "tags"}
)


class MoERewardModel(MoERewardPreTrainedModel):
    r"""
    Sparse Mixture-of-Experts reward model: a backbone, a router and `num_experts` scalar expert heads.

    `forward(input_ids, attention_mask, prompt_lengths=None)` returns a [`MoERewardModelOutput`] whose `logits` (N, 1)
    are the routed reward, so the model is a drop-in sequence-classification reward model for TRL.

    Args:
        config ([`MoERewardModelConfig`]):
            Model configuration.
        backbone ([`~transformers.PreTrainedModel`], *optional*):
            An already built (e.g. pretrained) backbone. When omitted, one is created from `config.backbone_config`
            with random weights. Prefer [`MoERewardModel.from_backbone`] to wrap a pretrained checkpoint.
    """

    _keys_to_ignore_on_load_unexpected = [r"^backbone\.pooler\."]

    def __init__(self, config: MoERewardModelConfig, backbone: PreTrainedModel | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config)
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.router._is_moe_router = True
        self.experts = MoEExperts(
            config.hidden_size, config.num_experts, config.expert_type, config.expert_hidden_size
        )
        self._warned_prompt_fallback = False
        self.post_init()

    @classmethod
    def from_backbone(
        cls,
        backbone: "str | os.PathLike | PreTrainedModel",
        *,
        model_init_kwargs: dict[str, Any] | None = None,
        **moe_kwargs,
    ) -> "MoERewardModel":
        r"""
        Build a MoE reward model around a pretrained backbone (decoder such as Llama/Qwen, or encoder such as BERT).

        The backbone keeps its pretrained weights; the router and the experts are freshly initialised. A model with a
        head (e.g. `*ForCausalLM`) is reduced to its base model.

        Args:
            backbone (`str` or [`~transformers.PreTrainedModel`]):
                A Hub id or local path loadable with `AutoModel.from_pretrained`, or a model instance.
            model_init_kwargs (`dict`, *optional*):
                Keyword arguments for `AutoModel.from_pretrained` (e.g. `dtype`, `revision`, `attn_implementation`).
            **moe_kwargs:
                [`MoERewardModelConfig`] fields such as `num_experts`, `top_k` or `router_input`.

        Example:

        ```python
        >>> model = MoERewardModel.from_backbone("Qwen/Qwen2.5-0.5B", num_experts=8, top_k=2)
        ```
        """
        if isinstance(backbone, (str, os.PathLike)):
            name_or_path = str(backbone)
            if not name_or_path.strip():
                raise ValueError("`backbone` is an empty string: pass a Hub model id or a local checkpoint folder.")
            if name_or_path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name_or_path)):
                raise FileNotFoundError(
                    f"Backbone path {name_or_path!r} does not exist: pass an existing checkpoint folder (config.json "
                    "and weights) or a Hub model id."
                )
            backbone = AutoModel.from_pretrained(backbone, **(model_init_kwargs or {}))
        elif isinstance(backbone, PreTrainedModel):
            name_or_path = backbone.config.name_or_path
            if isinstance(backbone, MoERewardModel):
                raise TypeError("`backbone` is already a MoERewardModel; pass it to the trainer directly.")
            if backbone.base_model is not backbone:
                backbone = backbone.base_model
        else:
            raise TypeError(
                f"`backbone` must be a model id, a local path or a PreTrainedModel, got {type(backbone).__name__}."
            )
        config = MoERewardModelConfig(backbone_config=backbone.config, **moe_kwargs)
        config.name_or_path = name_or_path
        model = cls(config, backbone=backbone)
        return model.to(next(backbone.parameters()).dtype)

    def push_to_hub(self, repo_id: str, **kwargs) -> Any:
        r"""
        Upload the model to the Hugging Face Hub in one commit.

        Importing `trl_moe_rm` sets the class attribute `_push_to_hub_hook` to
        `trl_moe_rm.publishing.push_moe_reward_model`, and this is then `push_moe_reward_model(self, repo_id,
        **kwargs)`: the weights (safetensors), the config and the code files (for `trust_remote_code=True`), plus, when
        given, the `tokenizer`, the users' `profiles`, the expert `descriptions`, `eval_results` and a
        `routing_heatmap`, and the model card. The copy of this class loaded with `trust_remote_code=True` has no hook
        and uses the standard `transformers` upload (weights, config and code only): it never imports `trl_moe_rm`.

        Example:

        ```python
        >>> model.push_to_hub("your-name/qwen-moe-rm", tokenizer=tokenizer, profiles="my_profiles/")
        ```
        """
        hook = getattr(type(self), "_push_to_hub_hook", None)
        if hook is not None:
            return hook(self, repo_id, **kwargs)
        extras = sorted(set(kwargs) - _STANDARD_PUSH_ARGUMENTS)
        if extras:
            raise ImportError(
                f"push_to_hub({', '.join(extras)}=...) needs the trl_moe_rm package: this copy of the model class "
                "(loaded with trust_remote_code=True) only uploads the model. Install it (`pip install trl-moe-rm`) "
                "and call `trl_moe_rm.hub.push_moe_reward_model(model, repo_id, ...)`."
            )
        return super().push_to_hub(repo_id, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_lengths: torch.LongTensor | None = None,
        paired: bool = False,
        inputs_embeds: torch.FloatTensor | None = None,
        sequence_features: torch.FloatTensor | None = None,
        router_features: torch.FloatTensor | None = None,
        return_expert_weights: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MoERewardModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`):
                Token ids of prompt + response, left or right padded.
            attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`, *optional*):
                1 for real tokens, 0 for padding.
            prompt_lengths (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Number of prompt tokens at the start of each (unpadded) sequence. Required for
                `router_input="prompt"`; without it the router falls back to the whole sequence (with a warning).
            paired (`bool`, *optional*, defaults to `False`):
                Whether row `i` and row `i + batch_size // 2` are the chosen and rejected responses of one prompt (the
                layout of TRL's preference collator). The routing is then computed once per pair, so both rows share
                it exactly (including the router noise in training).
            sequence_features, router_features (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*):
                Precomputed backbone features (see [`MoERewardModel.encode`]). When given, the backbone is skipped:
                this is the frozen-backbone fast path of [`MoERewardTrainer`] with `cache_features=True`.
            return_expert_weights (`bool`, *optional*, defaults to `False`):
                Also return `expert_weight_vectors` (for the cosine diversity loss; needed under DeepSpeed ZeRO-3,
                where the expert weights are only materialised inside the experts' forward).
            **kwargs:
                Passed to the backbone (e.g. `position_ids`). `labels` and `use_cache` are accepted and ignored.
        """
        kwargs.pop("labels", None)
        if sequence_features is None:
            sequence_features, router_features = self.encode(
                input_ids, attention_mask, prompt_lengths, paired=paired, inputs_embeds=inputs_embeds, **kwargs
            )
        elif router_features is None:
            router_features = sequence_features
        if paired and sequence_features.shape[0] % 2:
            raise ValueError(
                f"`paired=True` needs an even batch (chosen rows then rejected rows), got {sequence_features.shape[0]}."
            )
        if paired and router_features.shape[0] == sequence_features.shape[0]:
            router_features = router_features[: sequence_features.shape[0] // 2]

        router_logits = self.router(router_features.to(self.router.weight.dtype))
        noisy_logits = router_logits
        if self.training and self.config.router_noise_std > 0:
            noisy_logits = router_logits + torch.randn_like(router_logits) * self.config.router_noise_std
        routing_weights = top_k_routing(noisy_logits, self.config.top_k, self.config.router_temperature)
        if self.config.router_gradient == "dense" and self.config.top_k < self.config.num_experts:
            # Straight-through: `dense - dense.detach()` is exactly 0 in the forward pass (the weights stay top-k), but
            # its gradient is the full softmax's.
            dense = torch.softmax(noisy_logits.float() / self.config.router_temperature, dim=-1)
            routing_weights = routing_weights + (dense - dense.detach())
        if paired:
            router_logits = router_logits.repeat(2, 1)
            routing_weights = routing_weights.repeat(2, 1)
            router_features = router_features.repeat(2, 1)

        expert_weight_vectors = None
        if return_expert_weights:
            expert_rewards, expert_weight_vectors = self.experts(sequence_features, return_weight_vectors=True)
        else:
            expert_rewards = self.experts(sequence_features)
        logits = (routing_weights.to(expert_rewards.dtype) * expert_rewards).sum(dim=-1, keepdim=True)
        return MoERewardModelOutput(
            logits=logits,
            expert_rewards=expert_rewards,
            router_logits=router_logits,
            routing_weights=routing_weights,
            sequence_features=sequence_features,
            router_features=router_features,
            expert_weight_vectors=expert_weight_vectors,
        )

    def encode(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prompt_lengths: torch.LongTensor | None = None,
        *,
        paired: bool = False,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        Run the backbone once and return `(sequence_features, router_features)`: what the experts and the router read.

        With `paired=True`, `router_features` has one row per pair (`batch_size // 2` rows), since both rows of a pair
        share the prompt. Arguments are those of [`MoERewardModel.forward`].
        """
        kwargs.pop("use_cache", None)
        if getattr(self.config.backbone_config, "use_cache", None) is not None:
            kwargs["use_cache"] = False
        if input_ids is None and inputs_embeds is None:
            raise ValueError("MoERewardModel needs `input_ids` (or `inputs_embeds`, or precomputed features).")
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        self._check_inputs(input_ids, reference.shape[-1])
        if attention_mask is None:
            attention_mask = torch.ones_like(reference, dtype=torch.long)
        if paired and reference.shape[0] % 2:
            raise ValueError(
                f"`paired=True` needs an even batch (chosen rows then rejected rows), got {reference.shape[0]}."
            )

        hidden = self.backbone(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        ).last_hidden_state
        sequence_features = pool_hidden_states(hidden, attention_mask, self.config.pooling)

        router_rows = slice(0, reference.shape[0] // 2) if paired else slice(None)
        if self.config.router_input == "prompt" and prompt_lengths is None and not self._warned_prompt_fallback:
            logger.warning(
                "MoERewardModel has `router_input='prompt'` but got no `prompt_lengths`: the router reads the whole "
                "sequence instead. Pass `prompt_lengths` (MoERewardTrainer does) to route on the prompt."
            )
            self._warned_prompt_fallback = True
        if self.config.router_input == "sequence" or prompt_lengths is None:
            return sequence_features, sequence_features[router_rows]
        router_features = self._prompt_features(
            hidden[router_rows],
            input_ids[router_rows] if input_ids is not None else None,
            inputs_embeds[router_rows] if inputs_embeds is not None else None,
            attention_mask[router_rows],
            prompt_lengths[router_rows],
            {key: _rows(value, reference.shape, router_rows) for key, value in kwargs.items()},
        )
        return sequence_features, router_features

    def for_user(self, profile: Any, mode: str | None = None, beta: float | None = None) -> "MoEUserRewardModel":
        r"""
        A reward model for one user: the same backbone and experts, mixed with the user's weights.

        Args:
            profile ([`UserProfile`] or sequence of floats):
                A fitted profile (its `expert_weights`, `mode` and `beta` are used, and it is checked against this
                model's number of experts and configuration fingerprint), or raw weights on the simplex.
            mode (`str`, *optional*):
                Overrides the profile's mode: `"static"` (`r_u = sum_k w_k r_k`) or `"routed"`
                (`normalize(g(x)^beta * w_u)`).
            beta (`float`, *optional*):
                Overrides the profile's routing exponent.

        Returns:
            [`MoEUserRewardModel`]: a `PreTrainedModel` sharing this model's modules (no copy), whose `logits` (N, 1) are
            the user's reward and whose `score(hidden_states)` gives per-token rewards with the weights folded in (the
            contract of TRL's PPO reward model).
        """
        if hasattr(profile, "check_compatible"):
            profile.check_compatible(self.config.num_experts, config_fingerprint(self.config))
        weights = getattr(profile, "expert_weights", profile)
        weights = torch.as_tensor(list(weights), dtype=torch.float32)
        if weights.shape != (self.config.num_experts,):
            raise ValueError(
                f"The user's weights have shape {tuple(weights.shape)}, this model has {self.config.num_experts} "
                "experts: refit the profile for this model."
            )
        if not torch.isfinite(weights).all() or (weights < 0).any() or abs(float(weights.sum()) - 1) > 1e-4:
            raise ValueError("The user's weights must be finite, non-negative and sum to 1 (a point on the simplex).")
        mode = mode or getattr(profile, "mode", "static")
        beta = getattr(profile, "beta", 1.0) if beta is None else beta
        return MoEUserRewardModel(self, weights, mode=mode, beta=beta)

    def _check_inputs(self, input_ids: torch.Tensor | None, length: int) -> None:
        """
        A clear error, instead of an index error deep inside the backbone (a device-side assert on GPU), for token ids
        the backbone cannot embed (a tokenizer that does not match the model) and for sequences longer than its learned
        absolute position embeddings. The id check reads two numbers back from the device.
        """
        if torch.compiler.is_compiling():
            return
        limit = getattr(self, "_position_limit", False)
        if limit is False:  # computed once: the longest sequence learned absolute positions can take, or None
            limit = None
            for name, module in self.backbone.named_modules():
                if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "wpe"):
                    limit = module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
                    break
            self._position_limit = limit
        if limit is not None and length > limit:
            raise ValueError(
                f"The input has {length} tokens, but the backbone's position embeddings take at most {limit}. Truncate "
                "or drop longer sequences (e.g. `max_length` of MoERewardConfig, score_pairs or PersonalizedReward)."
            )
        num_embeddings = getattr(self.get_input_embeddings(), "num_embeddings", None)
        if input_ids is None or num_embeddings is None or input_ids.numel() == 0:
            return
        low, high = (int(value) for value in torch.aminmax(input_ids.detach()))
        if low < 0 or high >= num_embeddings:
            raise ValueError(
                f"Token id {high if high >= num_embeddings else low} is outside the backbone's vocabulary (ids 0 to "
                f"{num_embeddings - 1}): the tokenizer does not match the model. Use the tokenizer saved with the model "
                "(or its backbone's); after adding tokens to a tokenizer, call `model.resize_token_embeddings(len("
                "tokenizer))` before training."
            )

    def _prompt_features(
        self,
        hidden: torch.Tensor,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor,
        prompt_lengths: torch.LongTensor,
        backbone_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Representation of the prompt alone, whatever the padding side."""
        prompt_lengths = prompt_lengths.to(attention_mask.device).long().clamp_min(1)
        start = first_token_index(attention_mask)
        if self.config.prompt_encoding == "shared":
            # Causal backbone: the hidden state at the prompt's last token does not depend on the response.
            last = (start + prompt_lengths - 1).clamp_max(attention_mask.shape[1] - 1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        # Bidirectional backbone: encode the prompt tokens on their own, truncated to the longest prompt.
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        prompt_mask = attention_mask.bool() & (positions[None] < (start + prompt_lengths)[:, None])
        width = int((start + prompt_lengths).max().clamp_max(attention_mask.shape[1]))
        prompt_mask = prompt_mask[:, :width].to(attention_mask.dtype)
        # Per-token inputs the tokenizer returns next to `input_ids` (e.g. BERT's `token_type_ids`) are cut to the
        # prompt's width too.
        per_token = {
            key: value[:, :width] if _is_per_token(value, attention_mask.shape) else value
            for key, value in backbone_kwargs.items()
        }
        with torch.no_grad() if self.config.prompt_encoding == "separate_no_grad" else nullcontext():
            prompt_hidden = self.backbone(
                input_ids=input_ids[:, :width] if input_ids is not None else None,
                inputs_embeds=inputs_embeds[:, :width] if inputs_embeds is not None else None,
                attention_mask=prompt_mask,
                **per_token,
            ).last_hidden_state
        return pool_hidden_states(prompt_hidden, prompt_mask, self.config.pooling)


class MoEUserRewardModel(MoERewardPreTrainedModel):
    r"""
    One user's reward model, made by [`MoERewardModel.for_user`]. It shares the backbone, router and experts of the
    MoE model and holds the user's weights `w_u` as a buffer.

    - `forward(...)` returns `logits` (N, 1): `sum_k w_k r_k` in `"static"` mode, or `sum_k normalize(g(x)^beta * w)_k
      r_k` in `"routed"` mode. It works as an `nn.Module` reward in TRL's RLOO and GRPO trainers.
    - `score(hidden_states)` maps per-token hidden states `(B, L, H)` to per-token rewards `(B, L, 1)` with the static
      weights folded in, and `getattr(model, model.base_model_prefix)` is the backbone: the contract of TRL's PPO
      reward model, which reads the score at the last non-pad token (exact for `pooling="last"`).
    """

    def __init__(self, moe: MoERewardModel, weights: torch.Tensor, mode: str = "static", beta: float = 1.0):
        if mode not in ("static", "routed"):
            raise ValueError(f"`mode` must be 'static' or 'routed', got {mode!r}.")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"`beta` (the routing exponent) must be a finite number >= 0, got {beta!r}.")
        super().__init__(moe.config)
        self.backbone = moe.backbone
        self.router = moe.router
        self.experts = moe.experts
        self.register_buffer("user_weights", weights.to(moe.router.weight.device), persistent=False)
        self.mode = mode
        self.beta = float(beta)
        self._moe = [moe]  # not a submodule: its modules are registered above

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-token user reward of hidden states `(..., H)` -> `(..., 1)`, with the static weights folded in."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        rewards = self.experts(flat) @ self.user_weights.to(flat.dtype)
        return rewards.reshape(*hidden_states.shape[:-1], 1)

    def mixture_weights(self, routing_weights: torch.Tensor) -> torch.Tensor:
        """The user's mixture weights for each row, given the default routing `g(x)` ([`user_mixture_weights`])."""
        weights = self.user_weights.to(routing_weights.dtype)
        if self.mode == "static":
            return weights.expand_as(routing_weights)
        return user_mixture_weights(routing_weights, weights, self.beta).to(routing_weights.dtype)

    def forward(self, *args, **kwargs) -> MoERewardModelOutput:
        """Arguments of [`MoERewardModel.forward`]; `logits` is the user's reward."""
        output = self._moe[0](*args, **kwargs)
        mixture = self.mixture_weights(output.routing_weights.float()).to(output.expert_rewards.dtype)
        output.logits = (mixture * output.expert_rewards).sum(dim=-1, keepdim=True)
        output.routing_weights = mixture
        return output


def _is_per_token(value: Any, shape: torch.Size) -> bool:
    """Whether a backbone input is per token, `(batch_size, seq_len, ...)`, like `input_ids`."""
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == tuple(shape[:2])


def _rows(value: Any, shape: torch.Size, rows: slice) -> Any:
    """The router's rows of a per-token backbone input (all rows of anything else)."""
    return value[rows] if _is_per_token(value, shape) else value


def softmax_rows(x: torch.Tensor) -> torch.Tensor:
    """
    Softmax over the last dim from elementwise ops and simple reductions: the values of `torch.softmax`, without the
    kernels that hand tiny batched inputs to the intra-op thread pool (milliseconds per call on a busy CPU, inside the
    personalization fits' loops). Every row must have a finite entry.
    """
    shift = x.detach().amax(dim=-1, keepdim=True)
    e = torch.exp(x - shift)
    return e / e.sum(dim=-1, keepdim=True)


def log_routing(routing_weights: torch.Tensor, beta: float) -> torch.Tensor:
    """
    `beta * log(g)`, shifted so that every row's maximum is 0 (the shift cancels in the normalisation). Entries are in
    `[-inf, 0]`, `-inf` where `g == 0`; an all-zero row stays all `-inf`; `beta == 0` gives zeros (`0^0 == 1`).
    """
    if beta == 0.0:
        return torch.zeros_like(routing_weights)
    log_g = torch.log(routing_weights)
    row_max = log_g.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return beta * (log_g - row_max)


def mix_log_weights(log_g: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """
    `normalize(g^beta * w) = softmax(beta * log(g) + log(w))` over the last dim, falling back to `softmax(log_w)` on
    rows where the product is all zero. `log_w` must broadcast against `log_g` and have a finite entry on every row.
    """
    logits = log_g + log_w
    has_mass = torch.isfinite(logits).any(dim=-1, keepdim=True)
    return softmax_rows(torch.where(has_mass, logits, log_w.expand_as(logits)))


def user_mixture_weights(routing_weights: torch.Tensor, user_weights: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    r"""
    A user's per-prompt mixture in routed mode: `normalize(g(x)^beta * w_u)` row by row, computed in float64 log space
    so that it stays exact where `g^beta` or the product would underflow. A row where the product is all zero (the
    router gives no weight to any expert the user uses) falls back to `w_u`. This is the one definition of user mixing:
    [`MoEUserRewardModel`], the personalization fits and [`~trl_moe_rm.UserRewards`] all use it.

    Args:
        routing_weights (`torch.Tensor` of shape `(n, K)` or `(U, n, K)`):
            Non-negative default routing `g(x)`.
        user_weights (`torch.Tensor` of shape `(K,)` or `(U, K)`):
            The user's weights on the simplex.
        beta (`float`, *optional*, defaults to `1.0`):
            Exponent `>= 0` of the routing; `0` ignores the router (the static weights).

    Returns:
        `torch.Tensor`: float64 weights of the shape of `routing_weights`.
    """
    weights = user_weights.to(torch.float64)
    log_w = torch.log(weights / weights.sum(dim=-1, keepdim=True)).unsqueeze(-2)
    return mix_log_weights(log_routing(routing_weights.to(torch.float64).clamp_min(0), float(beta)), log_w)


def first_token_index(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Index of the first non-pad token of each row (0 for right padding)."""
    return attention_mask.long().argmax(dim=-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Index of the last non-pad token of each row, for left or right padding."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.long().flip(-1).argmax(dim=-1)


def pool_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    r"""
    Summarise each sequence of hidden states into one vector.

    Args:
        hidden (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`):
            Last hidden states.
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`):
            1 for real tokens, 0 for padding.
        pooling (`str`):
            `"last"` (last non-pad token), `"cls"` (first non-pad token) or `"mean"` (masked mean).
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if pooling == "last":
        return hidden[rows, last_token_index(attention_mask)]
    if pooling == "cls":
        return hidden[rows, first_token_index(attention_mask)]
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


__all__ = [
    "MoERewardModel",
    "MoERewardModelOutput",
    "MoERewardPreTrainedModel",
    "MoEUserRewardModel",
    "top_k_routing",
    "user_mixture_weights",
]
