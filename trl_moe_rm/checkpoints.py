"""
The loaders' former home, kept so that `from trl_moe_rm.checkpoints import load_moe_reward_model` keeps working: they
live in [`trl_moe_rm.loading`] now, with the checks they run before reading a weight.
"""

from .loading import (
    ADAPTER_CONFIG_FILE,
    MOE_CONFIG_FIELDS,
    WEIGHTS_FILES,
    ZERO_SHARD_DIR_PATTERN,
    ZeroCheckpointError,
    check_consolidated,
    find_zero_shard_dirs,
    has_consolidated_weights,
    load_moe_reward_model,
)


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "MOE_CONFIG_FIELDS",
    "WEIGHTS_FILES",
    "ZERO_SHARD_DIR_PATTERN",
    "ZeroCheckpointError",
    "check_consolidated",
    "find_zero_shard_dirs",
    "has_consolidated_weights",
    "load_moe_reward_model",
]
