"""
Share Mixture-of-Experts reward models on the Hugging Face Hub and load them back, from one import.

This module gathers the public names of [`trl_moe_rm.publishing`] (staging and one-commit upload, model card of a
trainer) and [`trl_moe_rm.loading`] (loading from a folder or a repository, reading only JSON and checked
safetensors), with the pickle and safetensors policy of [`trl_moe_rm.safety`]:

- [`push_moe_reward_model`] uploads, as one commit, the weights, config, model code (for `trust_remote_code=True`),
  tokenizer, profiles, expert descriptions, routing heatmap and model card; [`prepare_hub_folder`] writes that folder
  locally.
- [`load_from_hub`] loads a repository or a local folder: the model, its tokenizer, profiles and expert descriptions.
"""

from .loading import (
    CODE_FILES,
    MoERewardBundle,
    check_local_model_folder,
    check_moe_config,
    load_from_hub,
    snapshot_moe_repo,
    validate_hub_repo_id,
)
from .publishing import (
    HubOfflineError,
    prepare_hub_folder,
    push_moe_reward_model,
    push_trainer_to_hub,
    resolve_token,
)
from .safety import UnsafeFilesError, UnsafeWeightsError, find_pickle_files


__all__ = [
    "CODE_FILES",
    "HubOfflineError",
    "MoERewardBundle",
    "UnsafeFilesError",
    "UnsafeWeightsError",
    "check_local_model_folder",
    "check_moe_config",
    "find_pickle_files",
    "load_from_hub",
    "prepare_hub_folder",
    "push_moe_reward_model",
    "push_trainer_to_hub",
    "resolve_token",
    "snapshot_moe_repo",
    "validate_hub_repo_id",
]
