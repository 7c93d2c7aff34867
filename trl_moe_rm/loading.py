"""
Load trained Mixture-of-Experts reward models (`save_model` outputs, Trainer checkpoints, PEFT adapters, Hub
repositories) reading nothing but JSON and safetensors files whose content was checked first.

- [`load_moe_reward_model`] returns the model; [`load_from_hub`] returns it with its tokenizer, users' profiles and
  expert descriptions ([`MoERewardBundle`]).
- [`snapshot_moe_repo`] downloads a Hub repository after checking its file list, and only the files a model needs
  ([`HUB_FILE_PATTERNS`]).
- [`check_local_model_folder`] is what every loader runs before reading a weight: no pickle-capable file, a
  `moe_reward` config, and valid safetensors behind every weights file, index entry and symlink
  ([`~trl_moe_rm.safety.check_weight_files`]).
- [`check_consolidated`] explains how to consolidate a DeepSpeed ZeRO checkpoint that only holds partitioned shards.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError

from .configuration_moe_reward import MoERewardModelConfig
from .model_card import EXPERTS_FILENAME, read_experts_file
from .modeling_moe_reward import MoERewardModel
from .paths import is_local_path
from .profiles import PROFILES_DIRNAME, ProfileStore
from .safety import check_weight_files, refuse_pickle_files


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "CODE_FILES",
    "HUB_FILE_PATTERNS",
    "MODEL_FILE_PATTERNS",
    "MOE_CONFIG_FIELDS",
    "MoERewardBundle",
    "WEIGHTS_FILES",
    "ZeroCheckpointError",
    "check_consolidated",
    "check_local_model_folder",
    "check_moe_config",
    "find_zero_shard_dirs",
    "has_consolidated_weights",
    "load_from_hub",
    "load_moe_reward_model",
    "snapshot_moe_repo",
    "validate_hub_repo_id",
]

MODEL_TYPE = MoERewardModelConfig.model_type
CODE_FILES: tuple[str, ...] = ("configuration_moe_reward.py", "modeling_moe_reward.py")
"""The model code kept with the weights, so that `trust_remote_code=True` works without `trl_moe_rm`."""
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILE_PATTERNS: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    *CODE_FILES,
    *TOKENIZER_FILES,
)
"""The files of a saved model that `trl_moe_rm` reads or uploads (`fnmatch` patterns): config, safetensors weights and
their index, PEFT adapter, model code and tokenizer."""
HUB_FILE_PATTERNS: tuple[str, ...] = (*MODEL_FILE_PATTERNS, EXPERTS_FILENAME, "README.md", f"{PROFILES_DIRNAME}/*")
"""What [`snapshot_moe_repo`] downloads: [`MODEL_FILE_PATTERNS`], the expert descriptions, the card and the profiles."""
_BACKBONE_FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")

WEIGHTS_FILES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
"""Files holding consolidated model weights, as written by `save_pretrained` (the `.bin` ones are refused)."""
ZERO_SHARD_DIR_PATTERN = re.compile(r"^global_step\d+$")

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


class ZeroCheckpointError(FileNotFoundError):
    """A DeepSpeed ZeRO checkpoint holds partitioned shards but no consolidated model weights."""


# ----------------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------------


def validate_hub_repo_id(repo_id: Any) -> str:
    """
    Checks that `repo_id` is a valid Hub repository id (`"name"` or `"namespace/name"`) and returns it.

    Raises:
        ValueError: with the rules a repository id must follow.
    """
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"`repo_id` must be a non-empty string like 'your-name/my-moe-rm', got {repo_id!r}.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(
            f"{repo_id!r} is not a valid Hub repository id: use 'name' or 'namespace/name' with letters, digits, '-', "
            f"'_' and '.' (at most 96 characters, no '--' or '..', not starting or ending with '-' or '.'). ({error})"
        ) from None
    return repo_id


def check_moe_config(config: Mapping[str, Any] | str | os.PathLike, where: str | None = None) -> dict[str, Any]:
    """
    Checks that a `config.json` (its path, its folder, or its parsed content) describes a `moe_reward` model.

    Raises:
        FileNotFoundError: no `config.json`.
        ValueError: the file is not JSON, or the config's `model_type` is not `"moe_reward"`.
    """
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        where = where or str(path.parent)
        if not path.is_file():
            raise FileNotFoundError(f"{where!r} has no config.json: it is not a saved model.")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):  # ValueError: not UTF-8, or not JSON
            raise ValueError(f"{str(path)!r} is not valid JSON: save the model again, or download it again.") from None
        if not isinstance(config, Mapping):
            raise ValueError(f"{str(path)!r} is not a JSON object: save the model again, or download it again.")
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{where or 'The model'} is not a MoE reward model: its config.json has model_type={model_type!r}, "
            f"expected {MODEL_TYPE!r}. To turn a backbone into a MoE reward model, use "
            "`MoERewardModel.from_backbone(...)` and train it with `MoERewardTrainer`."
        )
    return dict(config)


def _local_files(folder: Path) -> list[str]:
    """Repository-relative paths of the files of a local model folder (top level and `profiles/`)."""
    files = [entry.name for entry in folder.iterdir() if entry.is_file()]
    profiles = folder / PROFILES_DIRNAME
    if profiles.is_dir():
        files += [path.relative_to(folder).as_posix() for path in profiles.rglob("*") if path.is_file()]
    return files


def check_local_model_folder(path: str | os.PathLike, where: str | None = None) -> None:
    """
    What every loader checks before reading a weight: the folder holds no pickle-capable file (trainer state aside),
    its `config.json` (when it has one) is a `moe_reward` one, and every weights file, every file a weights index
    points to and every symlinked weights file is a valid safetensors file (checked by content, not by name).

    Raises:
        [`~trl_moe_rm.safety.UnsafeFilesError`]: a pickle-capable file, or a weights file that is not safetensors
            ([`~trl_moe_rm.safety.UnsafeWeightsError`]).
        ValueError: a config that is not a `moe_reward` one.
    """
    path = Path(path)
    where = where or repr(str(path))
    refuse_pickle_files(_local_files(path), where)
    if (path / "config.json").is_file():
        check_moe_config(path, where=where)
    check_weight_files(path)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO checkpoints
# ----------------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------------
# Finding the model folder
# ----------------------------------------------------------------------------------------------------------------------


def snapshot_moe_repo(
    repo_id: str, revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None
) -> Path:
    r"""
    Downloads a MoE reward model repository after checking it, and returns the local snapshot folder.

    The repository's file list is checked first: a pickle-capable file (`.bin`, `.pt`, `.pkl`, ...) is refused
    ([`~trl_moe_rm.safety.UnsafeFilesError`]). Only [`HUB_FILE_PATTERNS`] are downloaded (config, safetensors weights
    and index, PEFT adapter, model code, tokenizer, `profiles/`, `experts.json`, `README.md`); then the snapshot is
    checked with [`check_local_model_folder`] (a `moe_reward` config, and weights that are safetensors by content).
    In offline mode (`HF_HUB_OFFLINE=1`) the cached snapshot's files are checked instead of the repository's list.
    """
    repo_id = validate_hub_repo_id(repo_id)
    where = f"the Hub repository {repo_id!r}"
    if not hub_constants.HF_HUB_OFFLINE:  # offline (HF_HUB_OFFLINE=1), the cached snapshot is checked below
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        refuse_pickle_files(files, where)
    local = Path(
        huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=list(HUB_FILE_PATTERNS),
        )
    )
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"The Hub repository {repo_id!r} has no config.json: it is not a saved model.")
    check_local_model_folder(local, where)
    return local


def _model_folder(
    name_or_path: str | os.PathLike, revision: str | None, token: str | bool | None, cache_dir: str | None
) -> Path:
    """The local folder of a model: `name_or_path` itself, or the checked snapshot of a Hub repository."""
    if not is_local_path(name_or_path):
        return snapshot_moe_repo(os.fspath(name_or_path), revision=revision, token=token, cache_dir=cache_dir)
    local = Path(os.path.expanduser(os.fspath(name_or_path)))
    if not local.exists():
        raise FileNotFoundError(f"Model path {os.fspath(name_or_path)!r} does not exist.")
    if not local.is_dir():
        raise FileNotFoundError(f"{str(local)!r} is a file; pass the folder that holds config.json and the weights.")
    return local


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


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
              adapter config is loaded (its weights checked the same way), wrapped with the router and experts, and
              the adapter plus the saved head (`modules_to_save`) are loaded on top;
            - a Hub model id (the repository is checked before anything is downloaded, see [`snapshot_moe_repo`]).

            Only JSON and checked safetensors are read (see [`check_local_model_folder`]): a folder or repository
            holding pickle-capable files (`.bin`, `.pt`, `.pkl`, ...) other than trainer state (`training_args.bin`,
            optimizer / scheduler / RNG states, which are never opened) is refused, and so is a weights file, index
            entry or symlink whose content is not safetensors, and a `config.json` whose `model_type` is not
            `moe_reward`.
        merge_adapter (`bool`, *optional*, defaults to `False`):
            For an adapter folder, merge the LoRA weights into the backbone and return a plain [`MoERewardModel`]
            instead of a [`~peft.PeftModel`].
        moe_kwargs (`dict`, *optional*):
            For an adapter folder without a saved MoE `config.json`: the [`MoERewardModelConfig`] fields the model was
            trained with (e.g. `{"num_experts": 8, "top_k": 2}`).
        **from_pretrained_kwargs:
            Passed to `from_pretrained` (e.g. `dtype`, `revision`). `subfolder` is not supported: pass the folder.

    Returns:
        [`MoERewardModel`] (or [`~peft.PeftModel`] around it for an unmerged adapter), in eval mode.

    Raises:
        [`ZeroCheckpointError`] (a `FileNotFoundError`): `path` is a DeepSpeed ZeRO checkpoint with only partitioned
        shards; the message gives the `zero_to_fp32.py` command that consolidates them.
        `FileNotFoundError`: a local path that does not exist, or a folder without weights or adapter.
        [`~trl_moe_rm.safety.UnsafeFilesError`] (a `ValueError`): pickle-capable files, or weights that are not
        safetensors ([`~trl_moe_rm.safety.UnsafeWeightsError`]), in the folder or repository.
        `ValueError`: a config that is not a `moe_reward` one, or weights that safetensors cannot decode.
    """
    if from_pretrained_kwargs.get("subfolder"):
        raise ValueError("load_moe_reward_model does not take `subfolder=`: pass the path of that folder itself.")
    from_pretrained_kwargs.setdefault("use_safetensors", True)  # never unpickle weights
    hub_kwargs = {key: from_pretrained_kwargs.pop(key, None) for key in ("revision", "token", "cache_dir")}
    local = _model_folder(path, **hub_kwargs)
    check_local_model_folder(local)
    check_consolidated(local)
    if (local / ADAPTER_CONFIG_FILE).is_file():
        return _load_adapter(local, merge_adapter, moe_kwargs, from_pretrained_kwargs, hub_kwargs)
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


def _checked_backbone(base: str, hub_kwargs: dict[str, Any]) -> str:
    """The local folder of an adapter's base backbone, downloaded first for a Hub id, with its weights checked."""
    if is_local_path(base):
        folder = Path(os.path.expanduser(base))
        if not folder.is_dir():
            raise FileNotFoundError(
                f"The adapter's base model {base!r} (`base_model_name_or_path` of {ADAPTER_CONFIG_FILE}) does not "
                "exist: restore that folder, or edit the adapter config to name the backbone's Hub id."
            )
    else:
        folder = Path(
            huggingface_hub.snapshot_download(
                repo_id=validate_hub_repo_id(base),
                token=hub_kwargs.get("token"),
                cache_dir=hub_kwargs.get("cache_dir"),
                allow_patterns=list(_BACKBONE_FILE_PATTERNS),
            )
        )
    check_weight_files(folder)
    return str(folder)


def _load_adapter(
    path: Path,
    merge_adapter: bool,
    moe_kwargs: dict[str, Any] | None,
    from_pretrained_kwargs: dict[str, Any],
    hub_kwargs: dict[str, Any],
) -> Any:
    from peft import PeftModel

    with open(path / ADAPTER_CONFIG_FILE, encoding="utf-8") as file:
        base = json.load(file).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{str(path / ADAPTER_CONFIG_FILE)!r} does not name its `base_model_name_or_path`.")
    if not (path / ADAPTER_WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"The adapter folder {str(path)!r} has no {ADAPTER_WEIGHTS_FILE}: save the adapter again with "
            "`save_pretrained` (which writes safetensors)."
        )
    kwargs = dict(moe_kwargs or {})
    if (path / "config.json").is_file():
        saved = MoERewardModelConfig.from_pretrained(str(path))
        for name in MOE_CONFIG_FIELDS:
            kwargs.setdefault(name, getattr(saved, name))
    elif not kwargs:
        raise FileNotFoundError(
            f"The adapter folder {str(path)!r} has no MoE config.json, so the number of experts and the routing are "
            "unknown. Pass them, e.g. `load_moe_reward_model(path, moe_kwargs={'num_experts': 8, 'top_k': 2})`."
        )
    backbone = _checked_backbone(base, hub_kwargs)
    model = MoERewardModel.from_backbone(backbone, model_init_kwargs=from_pretrained_kwargs, **kwargs)
    model.config.name_or_path = base  # the backbone's id, not the snapshot folder it was read from
    model = PeftModel.from_pretrained(model, str(path))
    if merge_adapter:
        model = model.merge_and_unload()
    return model.eval()


@dataclass
class MoERewardBundle:
    r"""
    What [`load_from_hub`] returns.

    Args:
        model ([`MoERewardModel`] or [`~peft.PeftModel`]):
            The model, in eval mode.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`] or `None`):
            The repository's tokenizer, if it has one.
        profiles ([`ProfileStore`] or `None`):
            The users' profiles (`profiles/`), if any.
        experts (`list[dict]`):
            The expert records of `experts.json` (`expert`, `description`, `load`, ...); empty without the file.
        path (`Path`):
            The local folder (the snapshot, for a Hub repository).
    """

    model: Any
    tokenizer: Any = None
    profiles: Any = None
    experts: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


def load_from_hub(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
    **from_pretrained_kwargs,
) -> MoERewardBundle:
    r"""
    Loads a MoE reward model with its tokenizer, profiles and expert descriptions, from the Hub or a local folder.

    Only JSON and checked safetensors are read, as in [`load_moe_reward_model`].

    Example:

    ```python
    >>> from trl_moe_rm.hub import load_from_hub
    >>> bundle = load_from_hub("your-name/qwen-moe-rm")
    >>> bundle.model.for_user(bundle.profiles.load("alice"))
    ```

    Args:
        repo_or_dir (`str` or `os.PathLike`):
            A Hub repository id, or a local folder (e.g. written by [`~trl_moe_rm.publishing.prepare_hub_folder`] or
            `save_pretrained`).
        revision (`str`, *optional*):
            Hub revision (branch, tag or commit).
        token (`str`, *optional*):
            Hub token, for private repositories.
        cache_dir (`str`, *optional*):
            Hub cache folder.
        **from_pretrained_kwargs:
            Passed to `from_pretrained` (e.g. `dtype`).

    Returns:
        [`MoERewardBundle`]: `model`, `tokenizer`, `profiles`, `experts` and `path`.
    """
    from transformers import AutoTokenizer

    path = _model_folder(repo_or_dir, revision=revision, token=token, cache_dir=cache_dir)
    model = load_moe_reward_model(path, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    profiles = ProfileStore.from_pretrained(path) if (path / PROFILES_DIRNAME).is_dir() else None
    experts = read_experts_file(path)["experts"] if (path / EXPERTS_FILENAME).is_file() else []
    return MoERewardBundle(model=model, tokenizer=tokenizer, profiles=profiles, experts=experts, path=path)
