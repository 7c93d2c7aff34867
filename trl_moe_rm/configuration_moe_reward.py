"""Configuration of the sparse Mixture-of-Experts reward model.

This file only imports torch-free parts of transformers and uses no imports from `trl_moe_rm`, so that a saved model
loads with `trust_remote_code=True` on machines where `trl_moe_rm` is not installed.
"""

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


ROUTER_INPUTS = ("prompt", "sequence")
ROUTER_GRADIENTS = ("sparse", "dense")
EXPERT_TYPES = ("linear", "mlp")
POOLINGS = ("last", "cls", "mean")
PROMPT_ENCODINGS = ("shared", "separate", "separate_no_grad")

HEAD_FIELDS: dict[str, Any] = {
    "num_experts": 8,
    "top_k": 2,
    "router_input": "prompt",
    "router_temperature": 1.0,
    "router_noise_std": 0.0,
    "router_gradient": "dense",
    "expert_type": "linear",
    "expert_hidden_size": 256,
    "pooling": None,
    "prompt_encoding": None,
}
"""The model's head fields and their defaults: the one list `MoERewardConfig` derives its model arguments from."""


def check_head_fields(fields: Mapping[str, Any]) -> None:
    """
    Validate head fields (any subset of [`HEAD_FIELDS`]), with one clear `ValueError` naming the field and its allowed
    values. `pooling` and `prompt_encoding` may be `None` (chosen from the backbone).
    """
    num_experts = fields.get("num_experts", HEAD_FIELDS["num_experts"])
    for name in ("num_experts", "top_k", "expert_hidden_size"):
        value = fields.get(name, HEAD_FIELDS[name])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    top_k = fields.get("top_k", HEAD_FIELDS["top_k"])
    if top_k > num_experts:
        raise ValueError(
            f"`top_k` must be an integer between 1 and `num_experts` ({num_experts}), got {top_k!r}. Use "
            f"`top_k={num_experts}` for a dense mixture."
        )
    temperature = fields.get("router_temperature", 1.0)
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`router_temperature` must be a finite number > 0, got {temperature!r}.")
    noise = fields.get("router_noise_std", 0.0)
    if not _is_real(noise) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"`router_noise_std` must be a finite number >= 0, got {noise!r}.")
    for name, choices in (
        ("router_input", ROUTER_INPUTS),
        ("router_gradient", ROUTER_GRADIENTS),
        ("expert_type", EXPERT_TYPES),
        ("pooling", POOLINGS),
        ("prompt_encoding", PROMPT_ENCODINGS),
    ):
        value = fields.get(name)
        if value is not None or name in ("router_input", "router_gradient", "expert_type"):
            _check_choice(name, value if name in fields else HEAD_FIELDS[name], choices)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class MoERewardModelConfig(PretrainedConfig):
    r"""
    Configuration of a [`MoERewardModel`]: a backbone language model, a router that reads the prompt, and `num_experts`
    scalar expert heads. The reward of a (prompt, response) sequence is `sum_k g_k(x) * r_k(x, y)`, where `g(x)` keeps
    the `top_k` largest router probabilities (renormalised) and zeroes the rest.

    Args:
        backbone_config (`dict` or [`~transformers.PretrainedConfig`], *optional*):
            Configuration of the backbone (any `AutoConfig`-loadable model, decoder or encoder). A dict must carry its
            `model_type`. Defaults to a small Llama configuration.
        num_experts (`int`, *optional*, defaults to `8`):
            Number of expert reward heads `K`.
        top_k (`int`, *optional*, defaults to `2`):
            Number of experts each sample is routed to. `top_k == num_experts` gives a dense (softmax) mixture.
        router_input (`str`, *optional*, defaults to `"prompt"`):
            What the router reads: `"prompt"`, the hidden state at the prompt's last token (needs `prompt_lengths` in
            `forward`), or `"sequence"`, the pooled representation of the whole prompt + response.
        router_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature dividing the router logits before the softmax.
        router_noise_std (`float`, *optional*, defaults to `0.0`):
            Standard deviation of the Gaussian noise added to the router logits in training mode only (noisy top-k
            gating). Has no effect in eval mode.
        router_gradient (`str`, *optional*, defaults to `"dense"`):
            What trains the router through the preference loss. `"sparse"`: the gradient of the top-k weights only, so
            an expert outside the top-k gets no signal, and with `top_k=1` the weight is the constant 1 and the router
            learns nothing from the loss. `"dense"`: the forward weights are unchanged (exactly top-k), but the router
            also receives the gradient of its full softmax (a straight-through estimator), using the rewards of every
            expert, which are computed anyway. The routing ablation and the defaults table in `docs/benchmarks.md`
            measure it.
        expert_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"` (one weight vector per expert) or `"mlp"` (a two-layer MLP per expert).
        expert_hidden_size (`int`, *optional*, defaults to `256`):
            Hidden width of each expert when `expert_type="mlp"`.
        pooling (`str`, *optional*):
            How a sequence is summarised for the experts: `"last"` (last non-pad token, for decoders), `"cls"` (first
            token) or `"mean"` (masked mean, for encoders). Defaults to `"last"` for decoders and `"mean"` for encoders.
        prompt_encoding (`str`, *optional*):
            `"shared"` reads the prompt representation from the same forward pass as the sequence, which is exact for
            causal decoders. `"separate"` encodes the prompt on its own (attention restricted to the prompt tokens),
            which bidirectional encoders need so that the routing does not depend on the response. Defaults to
            `"separate"` for encoder-only backbones and `"shared"` otherwise. `"separate_no_grad"` is `"separate"` without
            gradient through the prompt pass: the router still reads the exact prompt representation of the backbone
            being trained, but its loss no longer trains the backbone, which saves the prompt pass's backward and
            activations (the training overhead of `"separate"` on encoders, see `docs/benchmarks.md`).
        initializer_range (`float`, *optional*, defaults to `0.02`):
            Standard deviation of the normal initialisation of the router and the experts.
        num_labels (`int`, *optional*, defaults to `1`):
            Must be 1: the model outputs a single scalar reward.
    """

    model_type = "moe_reward"
    sub_configs = {"backbone_config": AutoConfig}
    keys_to_ignore_at_inference = [
        "expert_rewards",
        "router_logits",
        "routing_weights",
        "sequence_features",
        "router_features",
    ]

    # Declared fields: `top_k` would otherwise be mistaken for a generation parameter by `save_pretrained`.
    backbone_config: Any = None
    num_experts: int = HEAD_FIELDS["num_experts"]
    top_k: int = HEAD_FIELDS["top_k"]
    router_input: str = HEAD_FIELDS["router_input"]
    router_temperature: float = HEAD_FIELDS["router_temperature"]
    router_noise_std: float = HEAD_FIELDS["router_noise_std"]
    router_gradient: str = HEAD_FIELDS["router_gradient"]
    expert_type: str = HEAD_FIELDS["expert_type"]
    expert_hidden_size: int = HEAD_FIELDS["expert_hidden_size"]
    pooling: str | None = HEAD_FIELDS["pooling"]
    prompt_encoding: str | None = HEAD_FIELDS["prompt_encoding"]
    initializer_range: float = 0.02

    def __init__(
        self,
        backbone_config: dict[str, Any] | PretrainedConfig | None = None,
        num_experts: int = HEAD_FIELDS["num_experts"],
        top_k: int = HEAD_FIELDS["top_k"],
        router_input: str = HEAD_FIELDS["router_input"],
        router_temperature: float = HEAD_FIELDS["router_temperature"],
        router_noise_std: float = HEAD_FIELDS["router_noise_std"],
        router_gradient: str = HEAD_FIELDS["router_gradient"],
        expert_type: str = HEAD_FIELDS["expert_type"],
        expert_hidden_size: int = HEAD_FIELDS["expert_hidden_size"],
        pooling: str | None = HEAD_FIELDS["pooling"],
        prompt_encoding: str | None = HEAD_FIELDS["prompt_encoding"],
        initializer_range: float = 0.02,
        num_labels: int = 1,
        **kwargs,
    ):
        if backbone_config is None:
            backbone_config = CONFIG_MAPPING["llama"](
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
            )
        elif isinstance(backbone_config, dict):
            if "model_type" not in backbone_config:
                raise ValueError("`backbone_config` given as a dict must contain its `model_type` (e.g. 'llama').")
            backbone_config = dict(backbone_config)
            model_type = backbone_config.pop("model_type")
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"The backbone's model_type {model_type!r} is unknown to this transformers version: upgrade "
                    "transformers (`pip install -U transformers`) or use a backbone it supports."
                )
            backbone_config = CONFIG_MAPPING[model_type](**backbone_config)
        self.backbone_config = backbone_config

        check_head_fields(
            {
                "num_experts": num_experts,
                "top_k": top_k,
                "router_input": router_input,
                "router_temperature": router_temperature,
                "router_noise_std": router_noise_std,
                "router_gradient": router_gradient,
                "expert_type": expert_type,
                "expert_hidden_size": expert_hidden_size,
                "pooling": pooling,
                "prompt_encoding": prompt_encoding,
            }
        )
        if num_labels != 1:
            raise ValueError(f"`num_labels` must be 1 for a reward model (one scalar per sequence), got {num_labels}.")
        is_encoder = is_encoder_only(backbone_config)
        pooling = pooling or ("mean" if is_encoder else "last")
        prompt_encoding = prompt_encoding or ("separate" if is_encoder else "shared")

        self.num_experts = num_experts
        self.top_k = top_k
        self.router_input = router_input
        self.router_temperature = float(router_temperature)
        self.router_noise_std = float(router_noise_std)
        self.router_gradient = router_gradient
        self.expert_type = expert_type
        self.expert_hidden_size = expert_hidden_size
        self.pooling = pooling
        self.prompt_encoding = prompt_encoding
        self.initializer_range = initializer_range
        kwargs.setdefault("pad_token_id", getattr(backbone_config, "pad_token_id", None))
        # `PretrainedConfig` propagates its attention implementation to its sub-configs: keep the backbone's (resetting
        # it to None would make a live backbone attend without its causal and padding masks).
        kwargs.setdefault("attn_implementation", getattr(backbone_config, "_attn_implementation", None))
        super().__init__(num_labels=1, **kwargs)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    def get_text_config(self, *args, **kwargs) -> PretrainedConfig:
        # The pad and eos token ids that TRL mirrors onto the model live on this config, not on the backbone's.
        return self


_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "auto_map",
        "_commit_hash",
        "_attn_implementation_autoset",
        "name_or_path",
        "pad_token_id",
        "eos_token_id",
        "bos_token_id",
    }
)


def _canonicalize(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(key): _canonicalize(value) for key, value in obj.items() if key not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_canonicalize(value) for value in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canonicalize(value) for value in obj), key=repr)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "to_dict"):
        return _canonicalize(obj.to_dict())
    return str(obj)  # torch.dtype, enums, ...


def config_fingerprint(config: Any) -> str:
    """
    Computes a short, stable fingerprint of a model configuration.

    The fingerprint is the first 16 hex characters of the SHA-256 of the canonical JSON (sorted keys, compact
    separators, dict keys as strings) of `config.to_dict()`, after dropping - at any nesting level - keys that do not
    change what the experts compute: `_name_or_path`, `transformers_version`, `torch_dtype`, `dtype`, `architectures`,
    `auto_map`, `_commit_hash`, `_attn_implementation_autoset`, `name_or_path`, `pad_token_id`, `eos_token_id` and
    `bos_token_id`. Saving/reloading a model, moving it, or casting it to another dtype keeps the fingerprint; changing
    e.g. `num_experts` changes it.

    Args:
        config (`PretrainedConfig`-like or `dict`):
            An object with a `to_dict()` method, or a mapping.

    Returns:
        `str`: 16 lowercase hex characters.
    """
    if hasattr(config, "to_dict"):
        data = config.to_dict()
    elif isinstance(config, Mapping):
        data = config
    else:
        raise TypeError(
            f"`config` must be a PretrainedConfig-like object with `to_dict()` or a dict, got {type(config).__name__}."
        )
    canonical = json.dumps(_canonicalize(data), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def is_encoder_only(config: PretrainedConfig) -> bool:
    """Whether a backbone configuration describes a bidirectional encoder (BERT-style) rather than a causal decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_decoder", False):
        return False
    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in _BIDIRECTIONAL_WITH_LM_HEAD
    )


# Encoders that also ship a (decoder-mode) causal LM head in transformers, but are bidirectional by default.
_BIDIRECTIONAL_WITH_LM_HEAD = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "modernbert"}


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


__all__ = ["HEAD_FIELDS", "MoERewardModelConfig", "check_head_fields", "config_fingerprint"]
