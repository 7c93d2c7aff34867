"""trl_moe_rm: sparse Mixture-of-Experts reward models for TRL, with test-time personalization."""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .config import MoERewardConfig
from .configuration_moe_reward import MoERewardModelConfig
from .modeling_moe_reward import MoERewardModel, MoERewardModelOutput, MoEUserRewardModel
from .personalization import UserRewards, fit_user_weights, fit_users, weight_shift
from .profiles import ProfileStore, UserProfile
from .publishing import push_moe_reward_model
from .rewards import PersonalizedReward
from .scoring import score, score_pairs
from .trainer import MoERewardTrainer


__version__ = "0.1.0"

AutoConfig.register(MoERewardModelConfig.model_type, MoERewardModelConfig, exist_ok=True)
AutoModel.register(MoERewardModelConfig, MoERewardModel, exist_ok=True)
AutoModelForSequenceClassification.register(MoERewardModelConfig, MoERewardModel, exist_ok=True)
MoERewardModelConfig.register_for_auto_class()
MoERewardModel.register_for_auto_class("AutoModelForSequenceClassification")
# `model.push_to_hub` then uploads the tokenizer, profiles, expert descriptions and card too; the remote-code copy of the
# class (trust_remote_code=True) is not hooked and keeps the standard upload.
MoERewardModel._push_to_hub_hook = push_moe_reward_model

__all__ = [
    "MoERewardConfig",
    "MoERewardModel",
    "MoERewardModelConfig",
    "MoERewardModelOutput",
    "MoERewardTrainer",
    "MoEUserRewardModel",
    "PersonalizedReward",
    "ProfileStore",
    "UserProfile",
    "UserRewards",
    "fit_user_weights",
    "fit_users",
    "score",
    "score_pairs",
    "weight_shift",
]
