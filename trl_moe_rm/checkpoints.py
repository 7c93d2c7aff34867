"""Load trained [`MoERewardModel`]s from `save_model` outputs, Trainer checkpoints, PEFT adapters or the Hub."""

import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from .configuration_moe_reward import MoERewardModelConfig
from .modeling_moe_reward import MoERewardModel


WEIGHTS_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files holding consolidated model weights, as written by `save_pretrained`."""

ADAPTER_CONFIG_FILE = "adapter_config.json"
ZERO_SHARD_DIR_PATTERN = re.compile(r"^global_step\d+$")


class ZeroCheckpointError(FileNotFoundError):
    """A DeepSpeed ZeRO checkpoint holds partitioned shards but no consolidated model weights."""


def find_zero_shard_dirs(path: str | os.PathLike) -> list[Path]:
    """The `global_step*/` folders of DeepSpeed ZeRO shards in `path` (empty when there is none)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(p for p in path.iterdir() if p.is_dir() and ZERO_SHARD_DIR_PATTERN.match(p.name))


def has_consolidated_weights(path: str | os.PathLike) -> bool:
    """Whether `path` holds full model weights (`model.safetensors`, `pytorch_model.bin` or their sharded index)."""
    return any((Path(path) / name).is_file() for name in WEIGHTS_FILES)


def check_consolidated(path: str | os.PathLike) -> None:
    """
    Raise [`ZeroCheckpointError`] when `path` is a DeepSpeed ZeRO checkpoint without consolidated weights.

    ZeRO-3 partitions every weight across the ranks, so a checkpoint written with `zero3_save_16bit_model: false`
    only holds `global_step*/` shards that `from_pretrained` cannot read. The error says how to consolidate them.
    """
    path = Path(path)
    shard_dirs = find_zero_shard_dirs(path)
    if not shard_dirs or has_consolidated_weights(path) or (path / ADAPTER_CONFIG_FILE).is_file():
        return
    ckpt = str(path)
    script = path / "zero_to_fp32.py"
    script_hint = (
        f"python {ckpt}/zero_to_fp32.py {ckpt} {ckpt} --safe_serialization"
        if script.is_file()
        else f"python -m deepspeed.utils.zero_to_fp32 {ckpt} {ckpt} --safe_serialization"
    )
    raise ZeroCheckpointError(
        f"{ckpt!r} is a DeepSpeed ZeRO checkpoint: it holds partitioned shards ({', '.join(p.name for p in shard_dirs)}"
        f"/) but no consolidated weights ({' or '.join(WEIGHTS_FILES[::2])}), so it cannot be loaded as a model. "
        "Consolidate the shards into one fp32 state dict first:\n\n"
        f"    {script_hint}\n\n"
        f"This writes model.safetensors next to {ckpt}/config.json. (With another output folder `<out>`, i.e. "
        f"`python {ckpt}/zero_to_fp32.py {ckpt} <out> --safe_serialization`, also copy config.json into `<out>`.) "
        "To get consolidated weights directly from future runs, set `zero3_save_16bit_model: true` in the accelerate "
        "config (`stage3_gather_16bit_weights_on_model_save: true` in a DeepSpeed JSON config); `save_model` then "
        "gathers the weights at the end of training."
    )


def load_moe_reward_model(
    path: str | os.PathLike,
    *,
    merge_adapter: bool = False,
    moe_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs,
) -> Any:
    r"""
    Load a trained [`MoERewardModel`] for inference.

    Args:
        path (`str` or `os.PathLike`):
            One of:

            - a folder written by `MoERewardTrainer.save_model` / `save_pretrained` (or a `checkpoint-N` folder with
              consolidated weights, e.g. with `zero3_save_16bit_model: true`);
            - a PEFT adapter folder (`adapter_config.json`) written by a LoRA run: the base backbone named in the
              adapter config is loaded, wrapped with the router and experts, and the adapter plus the saved head
              (`modules_to_save`) are loaded on top;
            - a Hub model id (the repository is checked before anything is downloaded, see
              [`~trl_moe_rm.hub.snapshot_moe_repo`]).

            Only safetensors and JSON are read: a folder or repository holding pickle-capable files (`.bin`, `.pt`,
            `.pkl`, ...) other than trainer state (`training_args.bin`, optimizer / scheduler / RNG states, which are
            never opened) is refused, and so is a `config.json` whose `model_type` is not `moe_reward`.
        merge_adapter (`bool`, *optional*, defaults to `False`):
            For an adapter folder, merge the LoRA weights into the backbone and return a plain [`MoERewardModel`]
            instead of a [`~peft.PeftModel`].
        moe_kwargs (`dict`, *optional*):
            For an adapter folder without a saved MoE `config.json`: the [`MoERewardModelConfig`] fields the model was
            trained with (e.g. `{"num_experts": 8, "top_k": 2}`).
        **from_pretrained_kwargs:
            Passed to `from_pretrained` (e.g. `dtype`, `revision`).

    Returns:
        [`MoERewardModel`] (or [`~peft.PeftModel`] around it for an unmerged adapter), in eval mode.

    Raises:
        [`ZeroCheckpointError`] (a `FileNotFoundError`): `path` is a DeepSpeed ZeRO checkpoint with only partitioned
        shards; the message gives the `zero_to_fp32.py` command that consolidates them.
        `FileNotFoundError`: a local folder without weights or adapter.
        [`~trl_moe_rm.hub.UnsafeFilesError`] (a `ValueError`): pickle-capable files in the folder or repository.
        `ValueError`: a config that is not a `moe_reward` one.
    """
    from .hub import check_local_model_folder, snapshot_moe_repo

    from_pretrained_kwargs.setdefault("use_safetensors", True)  # never unpickle weights
    local = Path(os.path.expanduser(os.fspath(path)))
    if not local.exists():
        if os.fspath(path).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Model path {os.fspath(path)!r} does not exist.")
        hub_kwargs = {key: from_pretrained_kwargs.pop(key, None) for key in ("revision", "token", "cache_dir")}
        local = snapshot_moe_repo(os.fspath(path), **hub_kwargs)
    if local.is_file():
        raise FileNotFoundError(
            f"{str(local)!r} is a file; pass the folder that holds config.json and the weights instead."
        )
    check_local_model_folder(local)  # refuses pickle-capable files and configs that are not `moe_reward`
    check_consolidated(local)
    if (local / ADAPTER_CONFIG_FILE).is_file():
        return _load_adapter(local, merge_adapter, moe_kwargs, from_pretrained_kwargs)
    if not has_consolidated_weights(local):
        raise FileNotFoundError(
            f"{str(local)!r} holds no model weights ({', '.join(WEIGHTS_FILES)}) and no PEFT adapter "
            f"({ADAPTER_CONFIG_FILE}). Pass the `output_dir` of a MoERewardTrainer run or one of its checkpoint-N "
            "folders."
        )
    try:
        return MoERewardModel.from_pretrained(str(local), **from_pretrained_kwargs).eval()
    except SafetensorError as error:
        raise ValueError(
            f"The weights in {str(local)!r} cannot be read ({error}): the file is corrupt or truncated. Save the "
            "model again, or download it again."
        ) from error


def _load_adapter(
    path: Path, merge_adapter: bool, moe_kwargs: dict[str, Any] | None, from_pretrained_kwargs: dict[str, Any]
) -> Any:
    from peft import PeftModel

    with open(path / ADAPTER_CONFIG_FILE) as file:
        base = json.load(file).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{str(path / ADAPTER_CONFIG_FILE)!r} does not name its `base_model_name_or_path`.")
    config_file = path / "config.json"
    kwargs = dict(moe_kwargs or {})
    if config_file.is_file():
        saved = MoERewardModelConfig.from_pretrained(str(path))
        for name in MOE_CONFIG_FIELDS:
            kwargs.setdefault(name, getattr(saved, name))
    elif not kwargs:
        raise FileNotFoundError(
            f"The adapter folder {str(path)!r} has no MoE config.json, so the number of experts and the routing are "
            "unknown. Pass them, e.g. `load_moe_reward_model(path, moe_kwargs={'num_experts': 8, 'top_k': 2})`."
        )
    model = MoERewardModel.from_backbone(base, model_init_kwargs=from_pretrained_kwargs, **kwargs)
    model = PeftModel.from_pretrained(model, str(path))
    if merge_adapter:
        model = model.merge_and_unload()
    return model.eval()


MOE_CONFIG_FIELDS: tuple[str, ...] = (
    "num_experts",
    "top_k",
    "router_input",
    "router_temperature",
    "router_noise_std",
    "router_gradient",
    "expert_type",
    "expert_hidden_size",
    "pooling",
    "prompt_encoding",
    "initializer_range",
)
"""The [`MoERewardModelConfig`] fields that describe the head (everything but the backbone)."""


__all__ = [
    "WEIGHTS_FILES",
    "ZeroCheckpointError",
    "check_consolidated",
    "find_zero_shard_dirs",
    "has_consolidated_weights",
    "load_moe_reward_model",
]
