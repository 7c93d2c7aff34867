"""Training configuration of [`MoERewardTrainer`]."""

from dataclasses import dataclass, field
from typing import Any

from trl import RewardConfig

from .configuration_moe_reward import (
    EXPERT_TYPES,
    HEAD_FIELDS,
    POOLINGS,
    PROMPT_ENCODINGS,
    ROUTER_GRADIENTS,
    ROUTER_INPUTS,
    check_head_fields,
)
from .init import EXPERT_INITS
from .presets import PRESETS, apply_preset


LOSS_TYPES = ("reward_mixture", "likelihood_mixture", "assignment")
BALANCE_TYPES = ("switch", "entropy")
DIVERSITY_TYPES = ("cosine", "redundancy", "correlation")


@dataclass
class MoERewardConfig(RewardConfig):
    r"""
    Configuration class for [`MoERewardTrainer`].

    Extends TRL's [`~trl.RewardConfig`] (all of whose arguments keep working) with the Mixture-of-Experts losses and
    the model arguments used when the trainer's `model` is a backbone checkpoint name.

    The MoE defaults (top-2 of 8 experts, the straight-through router gradient, entropy balance 0.1, no local sparsity,
    no diversity) are the recipe measured best or near-best on four visible-context datasets, with fewer and more
    latent preference types than experts (the defaults table of `docs/benchmarks.md`). For data whose prompt does not
    reveal how a pair is judged, use `preset="hidden_context"`; `trl-moe-rm diagnose` tells which case a dataset is in.

    Parameters:
        > Preset

        preset (`str`, *optional*):
            Named preset of measured settings; it sets each of its fields that is still at its default.
            `"hidden_context"`: 32 experts, the assignment loss and `expert_init="pca_clusters"`, for data whose prompt
            does not reveal how a pair is judged (see `docs/presets.md`).

        > Parameters of the MoE model (used when `model` is a string)

        num_experts (`int`, *optional*, defaults to `8`):
            Number of expert heads `K`.
        top_k (`int`, *optional*, defaults to `2`):
            Experts per sample. `top_k == num_experts` is a dense softmax mixture.
        router_input (`str`, *optional*, defaults to `"prompt"`):
            `"prompt"` (the router reads the prompt only) or `"sequence"` (prompt + response).
        router_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature of the router softmax.
        router_noise_std (`float`, *optional*, defaults to `0.0`):
            Std of the noise added to the router logits in training (noisy top-k gating).
        router_gradient (`str`, *optional*, defaults to `"dense"`):
            `"sparse"` (the router learns from the top-k weights only) or `"dense"` (it also gets the gradient of its
            full softmax, straight-through; needed for `top_k=1`).
        expert_type (`str`, *optional*, defaults to `"linear"`):
            `"linear"` or `"mlp"` experts.
        expert_hidden_size (`int`, *optional*, defaults to `256`):
            Hidden width of `"mlp"` experts.
        pooling (`str`, *optional*):
            `"last"`, `"cls"` or `"mean"`; defaults to `"last"` for decoders and `"mean"` for encoders.
        prompt_encoding (`str`, *optional*):
            How the router's prompt features are computed: `"shared"` (the hidden state at the prompt's last token of
            the full pass; exact for causal decoders), `"separate"` (a second backbone pass over the prompt alone) or
            `"separate_no_grad"` (that pass without gradient: the router's loss does not train the backbone). Defaults
            to `"shared"` for decoders and `"separate"` for encoders.
        freeze_backbone (`bool`, *optional*, defaults to `False`):
            Train only the router and the experts (the backbone is frozen), as MiCRo, DRMs and LoRe do.
        cache_features (`bool`, *optional*, defaults to `False`):
            With `freeze_backbone=True`: encode every (prompt, response) and prompt once, batched under
            `inference_mode`, and train the router and experts on the cached features. Logging, evaluation and saving
            are unchanged, and the saved model is an ordinary `MoERewardModel`.
        feature_cache_dir (`str`, *optional*):
            Also keep the cached features on disk (safetensors), keyed by a hash of the backbone and the data.
        expert_init (`str`, *optional*):
            `"pca"`: before training, set the linear experts to `+v_1, -v_1, +v_2, -v_2, ...`, the principal directions
            of the differences of the training pairs' (chosen - rejected) backbone features, each scaled so that the
            expert's reward differences have unit root-mean-square (see [`~trl_moe_rm.init.pca_expert_init`]). It
            reads the cached features with `cache_features=True`, else encodes up to 4,096 training pairs once. Use
            it with `loss_type="assignment"` when the prompt does not reveal what a pair is judged on.
            `"pca_clusters"`: half of the experts are signed principal directions of the standardised differences,
            the other half reward the projection on k-means centroids of the responses, centred within their prompt (see
            [`~trl_moe_rm.init.pca_cluster_expert_init`]); it needs at least 2 experts.

        > Parameters of the per-user weights (seen users)

        learn_user_weights (`bool`, *optional*, defaults to `False`):
            When the training rows carry a `user_id`, learn one weight vector `w_u = softmax(theta_u)` over the experts
            per training user, jointly with the model. The preference loss of a row of a known user uses `w_u` in place
            of the routing: `r_u = sum_k w_uk r_k` (`"reward_mixture"`), `-log sum_k w_uk sigma(Delta_k)`
            (`"likelihood_mixture"`), or `w_u` as the prior of the responsibilities, with `w_u` fitted to them by
            cross-entropy (`"assignment"`). `trainer.export_user_profiles()` returns the users' profiles
            (`method="joint"`), and `save_model` writes them to `<output_dir>/profiles/`. Single process only.
        user_weights_learning_rate (`float`, *optional*):
            Learning rate of the user weight logits. Defaults to `learning_rate`.

        > Parameters of the preference loss

        loss_type (`str`, *optional*, defaults to `"reward_mixture"`):
            `"reward_mixture"`: Bradley-Terry on the routed reward. `"likelihood_mixture"`: `-log sum_k g_k
            sigma(Delta_k)` (the MiCRo form). `"assignment"`: EM-style responsibilities `q_k ∝ p_k sigma(Delta_k)^(1/tau)`;
            each expert minimises its q-weighted Bradley-Terry loss, the router learns to predict `q`, and a balance
            term keeps every expert in use. Use it when the prompt does not reveal what a pair is judged on.
        assignment_temperature (`float`, *optional*, defaults to `0.5`):
            The temperature `tau` of the responsibilities (below 1 sharpens them).
        assignment_top_k (`int`, *optional*):
            Keep only the top-k responsibilities per pair.
        assignment_balance_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the balance of the batch-mean responsibilities (`"assignment"` only).
        router_assignment_coef (`float`, *optional*, defaults to `1.0`):
            Weight of the router's cross-entropy against the responsibilities (`"assignment"` only).

        > Regularizers

        sparsity_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the local sparsity loss (mean per-sample routing entropy).
        balance_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the global balance loss.
        balance_type (`str`, *optional*, defaults to `"entropy"`):
            `"switch"` (`K sum_k f_k P_k`) or `"entropy"` (`log K - H(mean routing)`).
        diversity_coef (`float`, *optional*, defaults to `0.0`):
            Weight of the expert diversity loss.
        diversity_type (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"` (orthogonality of the expert weights: mean `|cos|`), `"redundancy"` (mean `max(cos, 0)`: like
            `"cosine"` but opposite experts are not penalised, which suits preferences with opposite directions; see
            the ablation in `docs/benchmarks.md`) or `"correlation"` (decorrelation of the experts' reward differences
            in the batch).
        router_z_loss_coef (`float`, *optional*, defaults to `0.001`):
            Weight of the router z-loss.
        router_learning_rate (`float`, *optional*):
            Separate learning rate for the router. Defaults to `learning_rate`.
    """

    preset: str | None = field(
        default=None,
        metadata={
            "help": "Named preset of measured settings; it sets each of its fields that is still at its default. "
            "'hidden_context': 32 experts, the assignment loss and expert_init='pca_clusters', for data whose prompt "
            "does not reveal how a pair is judged (see docs/presets.md).",
            "choices": [*PRESETS, None],
        },
    )
    num_experts: int = field(default=HEAD_FIELDS["num_experts"], metadata={"help": "Number of expert heads K."})
    top_k: int = field(
        default=HEAD_FIELDS["top_k"], metadata={"help": "Experts per sample; num_experts gives a dense mixture."}
    )
    router_input: str = field(
        default=HEAD_FIELDS["router_input"],
        metadata={"help": "What the router reads.", "choices": list(ROUTER_INPUTS)},
    )
    router_temperature: float = field(
        default=HEAD_FIELDS["router_temperature"], metadata={"help": "Temperature of the router softmax."}
    )
    router_noise_std: float = field(
        default=HEAD_FIELDS["router_noise_std"], metadata={"help": "Noisy top-k gating std (training only)."}
    )
    router_gradient: str = field(
        default=HEAD_FIELDS["router_gradient"],
        metadata={
            "help": "Router gradient: 'sparse' (top-k only) or 'dense' (straight-through).",
            "choices": list(ROUTER_GRADIENTS),
        },
    )
    expert_type: str = field(
        default=HEAD_FIELDS["expert_type"], metadata={"help": "Expert head type.", "choices": list(EXPERT_TYPES)}
    )
    expert_hidden_size: int = field(
        default=HEAD_FIELDS["expert_hidden_size"], metadata={"help": "Hidden width of MLP experts."}
    )
    pooling: str | None = field(
        default=HEAD_FIELDS["pooling"],
        metadata={
            "help": "Sequence pooling (default: last for decoders, mean for encoders).",
            "choices": [*POOLINGS, None],
        },
    )
    prompt_encoding: str | None = field(
        default=HEAD_FIELDS["prompt_encoding"],
        metadata={
            "help": "How the router's prompt features are computed: 'shared' (the prompt's last token of the full "
            "pass), 'separate' (a second pass over the prompt) or 'separate_no_grad' (that pass without gradient). "
            "Default: shared for decoders, separate for encoders.",
            "choices": [*PROMPT_ENCODINGS, None],
        },
    )
    freeze_backbone: bool = field(default=False, metadata={"help": "Train only the router and the experts."})
    cache_features: bool = field(default=False, metadata={"help": "Encode the data once (needs freeze_backbone)."})
    feature_cache_dir: str | None = field(default=None, metadata={"help": "On-disk cache for the features."})
    expert_init: str | None = field(
        default=None,
        metadata={
            "help": "Expert initialisation: 'pca' (principal directions of the pairs' feature differences) or "
            "'pca_clusters' (half of the experts are signed principal directions of the standardised differences, the "
            "other half reward the projection on k-means centroids of the responses, centred within their prompt).",
            "choices": [*EXPERT_INITS, None],
        },
    )
    learn_user_weights: bool = field(
        default=False, metadata={"help": "Learn a weight vector over the experts per training user (`user_id`)."}
    )
    user_weights_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the user weights (default: learning_rate)."}
    )

    loss_type: str = field(
        default="reward_mixture", metadata={"help": "Preference loss.", "choices": list(LOSS_TYPES)}
    )
    assignment_temperature: float = field(default=0.5, metadata={"help": "Temperature tau of the responsibilities."})
    assignment_top_k: int | None = field(default=None, metadata={"help": "Keep the top-k responsibilities."})
    assignment_balance_coef: float = field(default=0.1, metadata={"help": "Balance of the responsibilities."})
    router_assignment_coef: float = field(default=1.0, metadata={"help": "Router cross-entropy to the assignment."})

    sparsity_coef: float = field(default=0.0, metadata={"help": "Local sparsity (routing entropy) weight."})
    balance_coef: float = field(default=0.1, metadata={"help": "Global balance weight."})
    balance_type: str = field(default="entropy", metadata={"help": "Balance loss.", "choices": list(BALANCE_TYPES)})
    diversity_coef: float = field(default=0.0, metadata={"help": "Expert diversity weight."})
    diversity_type: str = field(
        default="cosine", metadata={"help": "Diversity loss.", "choices": list(DIVERSITY_TYPES)}
    )
    router_z_loss_coef: float = field(default=1e-3, metadata={"help": "Router z-loss weight."})
    router_learning_rate: float | None = field(default=None, metadata={"help": "Separate router learning rate."})

    def __post_init__(self):
        if self.preset is not None:
            apply_preset(self, self.preset)
        if self.ddp_backend is None and _deepspeed_launch_without_gpu():
            # accelerate initialises no process group of its own for DeepSpeed on CPU processes: without gloo each
            # process believes it runs alone, and DeepSpeed stops with "Check batch related parameters ... 8 != 8 * 1
            # * 2" (accelerate 1.x with deepspeed 0.1x, CPU accelerator).
            self.ddp_backend = "gloo"
        if self.bf16 is None and not self.fp16 and not _bf16_available(self.use_cpu):
            # TRL's configs default to bf16 (trl>=1.0), which transformers refuses on a machine without bf16 support
            # ("Your setup doesn't support bf16/gpu"); default to float32 there instead.
            self.bf16 = False
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is not None:
            # transformers 5.x (5.24 here) renamed `gradient_checkpointing` to `activation_checkpointing` and warns
            # (FutureWarning) when only the old name is set, which TRL's `RewardConfig` does by default (trl 1.0-1.16:
            # `gradient_checkpointing=True`): every run printed it. Pass the value on under the new name.
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()
        for name, choices in (
            ("loss_type", LOSS_TYPES),
            ("balance_type", BALANCE_TYPES),
            ("diversity_type", DIVERSITY_TYPES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {list(choices)}, got {getattr(self, name)!r}.")
        if self.expert_init is not None:
            if self.expert_init not in EXPERT_INITS:
                raise ValueError(
                    f"`expert_init` must be None or one of {list(EXPERT_INITS)}, got {self.expert_init!r}."
                )
            if self.expert_type != "linear":
                raise ValueError(
                    f"`expert_init={self.expert_init!r}` initialises linear experts; got `expert_type="
                    f"{self.expert_type!r}`."
                )
            if self.expert_init == "pca_clusters" and self.num_experts < 2:
                raise ValueError(f"`expert_init='pca_clusters'` needs `num_experts >= 2`, got {self.num_experts}.")
        if self.user_weights_learning_rate is not None and self.user_weights_learning_rate <= 0:
            raise ValueError(f"`user_weights_learning_rate` must be > 0, got {self.user_weights_learning_rate}.")
        check_head_fields(self.moe_model_kwargs)
        if self.assignment_temperature <= 0:
            raise ValueError(f"`assignment_temperature` must be > 0, got {self.assignment_temperature}.")
        for name in (
            "sparsity_coef",
            "balance_coef",
            "diversity_coef",
            "router_z_loss_coef",
            "assignment_balance_coef",
            "router_assignment_coef",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")

    @property
    def moe_model_kwargs(self) -> dict[str, Any]:
        """The [`MoERewardModelConfig`] arguments carried by this configuration."""
        return {name: getattr(self, name) for name in HEAD_FIELDS}


def _bf16_available(use_cpu: bool) -> bool:
    """Whether transformers accepts `bf16=True` here: a bf16-capable accelerator that `use_cpu` does not disable."""
    import torch
    from transformers.utils import is_torch_bf16_gpu_available

    if use_cpu:
        return False
    return is_torch_bf16_gpu_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _deepspeed_launch_without_gpu() -> bool:
    """Whether this process was started by `accelerate launch` with a DeepSpeed config on a machine without a GPU."""
    import os

    import torch

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available()
