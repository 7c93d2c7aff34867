"""
Share Mixture-of-Experts reward models on the Hugging Face Hub, and load them back without unpickling anything.

- [`push_moe_reward_model`] uploads, as **one commit**, everything needed to use a trained model: the weights
  (safetensors) and the config with its `auto_map`, the code files (`configuration_moe_reward.py`,
  `modeling_moe_reward.py`) so that `trust_remote_code=True` works without `trl_moe_rm`, the tokenizer, the users'
  profiles (`profiles/`), the expert descriptions (`experts.json`), the routing heatmap and a generated model card
  (`README.md`). `MoERewardModel.push_to_hub` and `MoERewardTrainer.push_to_hub` call it.
- [`prepare_hub_folder`] writes that exact folder locally (to inspect it, or to upload it yourself).
- [`load_from_hub`] loads a repository or a local folder: the model, its tokenizer, profiles and expert descriptions.
  Only safetensors and JSON are read: a folder or repository holding pickle-capable files (`.bin`, `.pt`, `.pkl`, ...)
  is refused, and so is a repository whose config is not a `moe_reward` one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import logging

from .configuration_moe_reward import MoERewardModelConfig, config_fingerprint
from .model_card import (
    EXPERTS_FILENAME,
    ROUTING_HEATMAP_FILENAME,
    eval_metrics,
    expert_load_from_metrics,
    expert_records,
    experts_file_content,
    read_experts_file,
    render_model_card,
)


logger = logging.get_logger(__name__)

__all__ = [
    "CODE_FILES",
    "MoERewardBundle",
    "UnsafeFilesError",
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

MODEL_TYPE = MoERewardModelConfig.model_type
CODE_FILES: tuple[str, ...] = ("configuration_moe_reward.py", "modeling_moe_reward.py")
"""The model code uploaded with the weights, so that `trust_remote_code=True` works without `trl_moe_rm`."""
AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_moe_reward.MoERewardModelConfig",
    "AutoModelForSequenceClassification": "modeling_moe_reward.MoERewardModel",
}
PROFILES_DIRNAME = "profiles"
DEFAULT_COMMIT_MESSAGE = "Upload MoE reward model with trl_moe_rm"

PICKLE_SUFFIXES: tuple[str, ...] = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".npy", ".npz")
"""Suffixes of files that may hold a pickle. Loading refuses them; nothing is ever unpickled."""

# Files of `Trainer` checkpoints that no loader reads (the training arguments and optimizer / scheduler / RNG states):
# they are skipped (never opened, never uploaded) rather than refused, so that a trainer's `output_dir` stays loadable.
_TRAINER_STATE_FILE = re.compile(
    r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$"
)
# DeepSpeed's partitioned shards (`global_stepN/`) are only read by `zero_to_fp32.py`, which the user runs on purpose.
_SKIPPED_DIRS = re.compile(r"^(global_step\d+|checkpoint-\d+|runs)$")

_WEIGHT_FILE = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json)$")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
_TOKENIZER_FILE = re.compile(
    r"^(tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(txt|json)|"
    r"merges\.txt|tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json))$"
)
_SNAPSHOT_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.py",
    "*.md",
    "*.png",
    "*.txt",
    "*.model",
    "*.jinja",
    f"{PROFILES_DIRNAME}/*",
]


class UnsafeFilesError(ValueError):
    """A folder or Hub repository holds files that may contain pickles, which `trl_moe_rm` never loads."""


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


def resolve_token(token: str | bool | None = None) -> str:
    """
    The Hub token to push with: `token` when it is a string, else the one of `hf auth login` / `HF_TOKEN`.

    Raises:
        ValueError: when no token is available, saying how to log in.
    """
    if isinstance(token, str) and token:
        return token
    if token is not False:
        found = huggingface_hub.get_token()
        if found:
            return found
    raise ValueError(
        "Pushing to the Hugging Face Hub needs a token with write access, and none was found. Log in with "
        "`hf auth login` (or the older `huggingface-cli login`), set the `HF_TOKEN` environment variable, or pass "
        "`token=...` (`--token` on the command line). Create a token at https://huggingface.co/settings/tokens."
    )


def find_pickle_files(paths: Iterable[str]) -> list[str]:
    r"""
    The paths, among repository-relative `paths`, of files that may hold a pickle.

    Trainer-state files that no loader reads (`training_args.bin`, `optimizer.pt`, `scheduler.pt`, `scaler.pt`,
    `rng_state*.pth`) at the top level, and anything under `global_step*/`, `checkpoint-*/` or `runs/`, are ignored:
    they are never opened nor uploaded.
    """
    found = []
    for path in paths:
        parts = Path(path).parts
        if not parts or _SKIPPED_DIRS.match(parts[0]):
            continue
        if len(parts) == 1 and _TRAINER_STATE_FILE.match(parts[0]):
            continue
        if Path(path).suffix.lower() in PICKLE_SUFFIXES:
            found.append(str(Path(path).as_posix()))
    return sorted(found)


def _local_files(folder: Path) -> list[str]:
    """Repository-relative paths of the files of a local model folder (top level and `profiles/`)."""
    files = [entry.name for entry in folder.iterdir() if entry.is_file()]
    profiles = folder / PROFILES_DIRNAME
    if profiles.is_dir():
        files += [path.relative_to(folder).as_posix() for path in profiles.rglob("*") if path.is_file()]
    return files


def _refuse_pickles(paths: Iterable[str], where: str) -> None:
    unsafe = find_pickle_files(paths)
    if unsafe:
        raise UnsafeFilesError(
            f"Refusing to load {where}: it contains {', '.join(repr(p) for p in unsafe)}, a file type that may hold a "
            "pickle (arbitrary code), and trl_moe_rm only loads safetensors and JSON. Convert the weights to "
            "safetensors (load them once in a trusted environment and `save_pretrained`, which writes "
            "model.safetensors) and remove the pickle files."
        )


def check_moe_config(config: Mapping[str, Any] | str | os.PathLike, where: str | None = None) -> dict[str, Any]:
    """
    Checks that a `config.json` (its path, its folder, or its parsed content) describes a `moe_reward` model.

    Raises:
        FileNotFoundError: no `config.json`.
        ValueError: the config's `model_type` is not `"moe_reward"`.
    """
    if not isinstance(config, Mapping):
        path = Path(config)
        path = path / "config.json" if path.is_dir() else path
        where = where or str(path.parent)
        if not path.is_file():
            raise FileNotFoundError(f"{where!r} has no config.json: it is not a saved model.")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON ({error.msg}).") from None
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"{where or 'The model'} is not a MoE reward model: its config.json has model_type={model_type!r}, "
            f"expected {MODEL_TYPE!r}. To turn a backbone into a MoE reward model, use "
            "`MoERewardModel.from_backbone(...)` and train it with `MoERewardTrainer`."
        )
    return dict(config)


# ----------------------------------------------------------------------------------------------------------------------
# Staging the repository folder
# ----------------------------------------------------------------------------------------------------------------------


def _copy_model_folder(source: Path, folder: Path) -> None:
    """Copies the weights, config, code and tokenizer files of a saved model folder (never pickles)."""
    if not source.is_dir():
        raise FileNotFoundError(
            f"{str(source)!r} is not a model folder: pass a MoERewardModel or the folder written by `save_model` / "
            "`save_pretrained`."
        )
    files = _local_files(source)
    _refuse_pickles(files, repr(str(source)))
    check_moe_config(source)
    copied = []
    for name in sorted(entry for entry in files if "/" not in entry):
        if (
            name == "config.json"
            or _WEIGHT_FILE.match(name)
            or name in _ADAPTER_FILES
            or name in CODE_FILES
            or _TOKENIZER_FILE.match(name)
        ):
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    if not any(_WEIGHT_FILE.match(name) for name in copied) and "adapter_model.safetensors" not in copied:
        raise FileNotFoundError(
            f"{str(source)!r} holds no safetensors weights (model.safetensors or adapter_model.safetensors). Save the "
            "model with `save_pretrained` / `trainer.save_model`, which write safetensors."
        )


def _ensure_remote_code(folder: Path) -> None:
    """Adds the code files and the config's `auto_map` when they are missing (e.g. a folder saved elsewhere)."""
    package = Path(__file__).resolve().parent
    for name in CODE_FILES:
        if not (folder / name).is_file():
            shutil.copy2(package / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    if any(auto_map.get(key) != value for key, value in AUTO_MAP.items()):
        auto_map.update(AUTO_MAP)
        config["auto_map"] = auto_map
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _open_profiles(profiles: Any) -> Any:
    from .profiles import ProfileStore

    if profiles is None or isinstance(profiles, ProfileStore):
        return profiles
    if isinstance(profiles, (str, os.PathLike)):
        return ProfileStore.from_pretrained(profiles)
    raise TypeError(f"`profiles` must be a ProfileStore or the path of one, got {type(profiles).__name__}.")


def _guess_base_model(config: MoERewardModelConfig) -> str | None:
    """The backbone's Hub id, when the config records one (not a local path)."""
    for candidate in (
        getattr(config.backbone_config, "_name_or_path", None),
        getattr(config, "_name_or_path", None),
    ):
        if not candidate or not isinstance(candidate, str) or os.path.exists(candidate):
            continue
        if candidate.count("/") == 1 and not candidate.startswith((".", "/", "~")):
            try:
                validate_repo_id(candidate)
            except HFValidationError:
                continue
            return candidate
    return None


def _heatmap_file(routing_heatmap: Any, folder: Path) -> str | None:
    """Copies (or draws, from a routing matrix) the routing heatmap into the folder."""
    if routing_heatmap is None:
        return None
    target = folder / ROUTING_HEATMAP_FILENAME
    if isinstance(routing_heatmap, Mapping):
        from .plots import plot_routing_heatmap

        if "matrix" not in routing_heatmap or "categories" not in routing_heatmap:
            raise ValueError(
                "A routing heatmap given as a mapping needs `matrix` and `categories` (as in "
                "`analysis_report(...)['routing_matrix']`)."
            )
        plot_routing_heatmap(routing_heatmap["matrix"], routing_heatmap["categories"], target)
        return ROUTING_HEATMAP_FILENAME
    source = Path(routing_heatmap)
    if not source.is_file():
        raise FileNotFoundError(f"Routing heatmap {str(source)!r} does not exist.")
    if source.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"Routing heatmap {str(source)!r} is not a PNG file.")
    shutil.copy2(source, target)
    return ROUTING_HEATMAP_FILENAME


def prepare_hub_folder(
    model: Any,
    folder: str | os.PathLike,
    *,
    repo_id: str | None = None,
    tokenizer: Any = None,
    profiles: Any = None,
    descriptions: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | None = None,
    routing_heatmap: str | os.PathLike | Mapping[str, Any] | None = None,
    expert_load: Sequence[float] | None = None,
    report: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    model_name: str | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    max_shard_size: int | str | None = "50GB",
) -> list[str]:
    r"""
    Writes into `folder` exactly what [`push_moe_reward_model`] uploads, and returns the repository-relative paths.

    Args:
        model ([`MoERewardModel`] or `str` or `os.PathLike`):
            The model, or a folder written by `save_pretrained` / `MoERewardTrainer.save_model` (its weights,
            config, code and tokenizer files are copied; trainer-state files such as `training_args.bin` are left
            out).
        folder (`str` or `os.PathLike`):
            Destination; created if needed, and must be empty.
        repo_id (`str`, *optional*):
            The repository named in the card's usage snippets. Defaults to the folder name.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Saved next to the model (it replaces the tokenizer files of a model folder).
        profiles ([`ProfileStore`] or `str`, *optional*):
            User profiles (a store, or a path opened with [`ProfileStore.from_pretrained`]), written to `profiles/`
            in their format. Every profile is checked against the model (number of experts, config fingerprint).
        descriptions (*optional*):
            Expert descriptions, written to `experts.json` and to the card (see
            [`~trl_moe_rm.model_card.expert_records`] for the accepted forms, e.g. the output of
            [`~trl_moe_rm.analysis.describe_experts`] or `analysis_report(...)["descriptions"]`).
        eval_results (`Mapping[str, float]` or `Sequence[huggingface_hub.EvalResult]`, *optional*):
            Evaluation metrics, e.g. `trainer.evaluate()` (the `eval_` prefix and bookkeeping entries are dropped),
            written to the card and its `model-index` metadata. Per-expert `moe/load/expert_k` entries give the load.
        routing_heatmap (`str` or `os.PathLike` or `Mapping`, *optional*):
            A PNG (e.g. from [`~trl_moe_rm.plots.plot_routing_heatmap`]), or a routing matrix
            `{"matrix": ..., "categories": ...}` to draw, uploaded as `routing_heatmap.png` and shown in the card.
        expert_load (`Sequence[float]`, *optional*):
            Mean routing weight of each expert, for the card's table.
        report (`Mapping`, *optional*):
            An [`~trl_moe_rm.analysis.analysis_report`]: supplies the descriptions, the load, the routing heatmap and
            the evaluation metrics that are not given explicitly.
        base_model (`str`, *optional*):
            Hub id of the backbone. Defaults to the backbone's recorded `_name_or_path` when it is a Hub id.
        dataset_name (`str`, *optional*):
            Dataset the model was trained / evaluated on, for the card's metadata.
        model_name (`str`, *optional*):
            Title of the card.
        tags (`Sequence[str]`, *optional*):
            Extra card tags (`trl`, `reward-model`, `mixture-of-experts` and `personalization` are always there).
        license (`str`, *optional*):
            License identifier for the card's metadata.
        max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`):
            Passed to `save_pretrained`.

    Returns:
        `list[str]`: The sorted repository-relative paths of the files written.
    """
    files, _ = _stage(
        model,
        Path(folder),
        repo_id,
        tokenizer=tokenizer,
        profiles=profiles,
        descriptions=descriptions,
        eval_results=eval_results,
        routing_heatmap=routing_heatmap,
        expert_load=expert_load,
        report=report,
        base_model=base_model,
        dataset_name=dataset_name,
        model_name=model_name,
        tags=tags,
        license=license,
        max_shard_size=max_shard_size,
    )
    return files


def _stage(
    model: Any,
    folder: Path,
    repo_id: str | None,
    *,
    tokenizer: Any = None,
    profiles: Any = None,
    descriptions: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | None = None,
    routing_heatmap: str | os.PathLike | Mapping[str, Any] | None = None,
    expert_load: Sequence[float] | None = None,
    report: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    model_name: str | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    max_shard_size: int | str | None = "50GB",
) -> tuple[list[str], Callable[[str], str]]:
    """Writes the upload into `folder`; returns its files and a function rendering the card for a repository id."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{str(folder)!r} must be a new or empty folder, so that it holds exactly the upload.")
    folder.mkdir(parents=True, exist_ok=True)

    if isinstance(model, (str, os.PathLike)):
        _copy_model_folder(Path(model), folder)
    else:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != MODEL_TYPE or not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"Expected a MoERewardModel (config.model_type={MODEL_TYPE!r}) or a saved model folder, got "
                f"{type(model).__name__}."
            )
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            # A PEFT adapter folder does not describe the MoE head: save its config too (as MoERewardTrainer does).
            model.get_base_model().config.save_pretrained(folder)
    _ensure_remote_code(folder)
    config = MoERewardModelConfig.from_pretrained(folder)
    is_adapter = (folder / "adapter_config.json").is_file()

    if tokenizer is not None:
        for path in folder.iterdir():
            if _TOKENIZER_FILE.match(path.name):
                path.unlink()
        tokenizer.save_pretrained(folder)
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    if not has_tokenizer:
        logger.warning(
            "No tokenizer is uploaded with the model: pass `tokenizer=` so that the repository can score text on its "
            "own."
        )

    store = _open_profiles(profiles)
    num_profiles = None
    if store is not None:
        fingerprint = config_fingerprint(config)
        all_profiles = store.as_dict()
        for profile in all_profiles.values():
            profile.check_compatible(config.num_experts, fingerprint)
        store.save_pretrained(folder)
        num_profiles = len(all_profiles)

    report = report or {}
    if descriptions is None:
        descriptions = report.get("descriptions")
    metrics_source = eval_results if isinstance(eval_results, Mapping) else None
    if expert_load is None:
        expert_load = report.get("expert_load") or expert_load_from_metrics(metrics_source, config.num_experts)
    records = expert_records(config.num_experts, descriptions, expert_load)
    (folder / EXPERTS_FILENAME).write_text(experts_file_content(records, config.top_k), encoding="utf-8")

    if routing_heatmap is None and report.get("routing_matrix"):
        routing_heatmap = report["routing_matrix"]
    heatmap = _heatmap_file(routing_heatmap, folder)

    if eval_results is None:
        results: Any = eval_metrics(report)
    elif isinstance(eval_results, Mapping):
        results = eval_metrics(eval_results)
    else:
        results = list(eval_results)

    def card(final_repo_id: str) -> str:
        return render_model_card(
            final_repo_id,
            config,
            records,
            base_model=base_model or _guess_base_model(config),
            dataset_name=dataset_name,
            eval_results=results,
            routing_heatmap=heatmap,
            has_profiles=store is not None,
            num_profiles=num_profiles,
            has_tokenizer=has_tokenizer,
            is_adapter=is_adapter,
            model_name=model_name,
            tags=tags,
            license=license,
        )

    (folder / "README.md").write_text(card(repo_id or folder.name), encoding="utf-8")

    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    unsafe = find_pickle_files(files)
    if unsafe:  # e.g. a custom `save_pretrained`: never upload a pickle
        raise UnsafeFilesError(f"Refusing to upload pickle-capable files {unsafe}; save the model as safetensors.")
    return files, card


# ----------------------------------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------------------------------


def _stale_profile_files(api: HfApi, repo_id: str, revision: str | None, staged: set[str], token: str) -> list[str]:
    """Files under `profiles/` in the repository that the new upload does not contain (deleted in the same commit)."""
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        existing = api.list_repo_files(repo_id, revision=revision, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
        return []
    return sorted(p for p in existing if p.startswith(f"{PROFILES_DIRNAME}/") and p not in staged)


def push_moe_reward_model(
    model: Any,
    repo_id: str,
    tokenizer: Any = None,
    profiles: Any = None,
    descriptions: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | None = None,
    routing_heatmap: str | os.PathLike | Mapping[str, Any] | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = DEFAULT_COMMIT_MESSAGE,
    *,
    commit_description: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    expert_load: Sequence[float] | None = None,
    report: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    model_name: str | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    max_shard_size: int | str | None = "50GB",
    run_as_future: bool = False,
) -> Any:
    r"""
    Uploads a MoE reward model and everything around it to the Hub, as one commit.

    The commit holds the weights (`model.safetensors`) and `config.json` with its `auto_map`, the code files
    (`configuration_moe_reward.py`, `modeling_moe_reward.py`), the tokenizer, `profiles/` when `profiles` is given
    (stale files of a previous `profiles/` are deleted in the same commit), `experts.json`, `routing_heatmap.png` when
    given, and a generated `README.md` (see [`~trl_moe_rm.model_card.render_model_card`]). Nothing is a pickle.

    Example:

    ```python
    >>> from trl_moe_rm.hub import push_moe_reward_model
    >>> push_moe_reward_model(model, "your-name/qwen-moe-rm", tokenizer=tokenizer, profiles="my_profiles/")
    ```

    Args:
        model ([`MoERewardModel`] or `str` or `os.PathLike`):
            The model, or a folder written by `save_pretrained` / `MoERewardTrainer.save_model`.
        repo_id (`str`):
            `"name"` or `"namespace/name"`. The repository is created if needed.
        token (`str`, *optional*):
            A token with write access. Defaults to the one of `hf auth login` / `HF_TOKEN`.
        private (`bool`, *optional*):
            Visibility of a newly created repository (an existing one is not changed).
        commit_message (`str`, *optional*, defaults to `"Upload MoE reward model with trl_moe_rm"`):
            Message of the commit.
        commit_description (`str`, *optional*):
            Description of the commit.
        revision (`str`, *optional*):
            Branch to commit to (created if needed).
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        run_as_future (`bool`, *optional*, defaults to `False`):
            Return a `concurrent.futures.Future` instead of waiting for the upload.
        tokenizer, profiles, descriptions, eval_results, routing_heatmap, expert_load, report, base_model,
        dataset_name, model_name, tags, license, max_shard_size:
            As in [`prepare_hub_folder`].

    Returns:
        `huggingface_hub.CommitInfo` (or a `Future` of it with `run_as_future=True`).

    Raises:
        ValueError: an invalid `repo_id`, no token (the message says how to log in), profiles fitted for another
            model, or a model folder that is not a `moe_reward` model.
    """
    repo_id = validate_hub_repo_id(repo_id)
    token = resolve_token(token)
    staging = Path(tempfile.mkdtemp(prefix="trl_moe_rm_push_"))
    cleanup = True
    try:
        folder = staging / "repo"
        files, card = _stage(
            model,
            folder,
            repo_id,
            tokenizer=tokenizer,
            profiles=profiles,
            descriptions=descriptions,
            eval_results=eval_results,
            routing_heatmap=routing_heatmap,
            expert_load=expert_load,
            report=report,
            base_model=base_model,
            dataset_name=dataset_name,
            model_name=model_name,
            tags=tags,
            license=license,
            max_shard_size=max_shard_size,
        )
        api = HfApi(token=token)
        full_repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        if full_repo_id != repo_id:  # "name" became "user/name": the usage snippets name the real repository
            (folder / "README.md").write_text(card(full_repo_id), encoding="utf-8")
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(full_repo_id, branch=revision, token=token, exist_ok=True)

        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in files
        ]
        if profiles is not None:
            stale = _stale_profile_files(api, full_repo_id, revision, set(files), token)
            operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
        logger.info(f"Uploading {len(files)} files to {full_repo_id} in one commit: {', '.join(files)}")
        result = api.create_commit(
            full_repo_id,
            operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            token=token,
            revision=revision,
            create_pr=create_pr,
            run_as_future=run_as_future,
        )
        if run_as_future and hasattr(result, "add_done_callback"):
            cleanup = False
            result.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
        return result
    finally:
        if cleanup:
            shutil.rmtree(staging, ignore_errors=True)


def _last_logged(log_history: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    return next((entry for entry in reversed(log_history) if key in entry), None)


def _last_evaluation(log_history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The metrics of the last evaluation in a trainer's log history (`eval_loss`, `eval_accuracy`, ...)."""
    entry = _last_logged(log_history, "eval_loss")
    return dict(entry) if entry is not None else None


def push_trainer_to_hub(
    trainer: Any,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    private: bool | None = None,
    profiles: Any = None,
    descriptions: Any = None,
    eval_results: Mapping[str, Any] | Sequence[Any] | None = None,
    routing_heatmap: str | os.PathLike | Mapping[str, Any] | None = None,
    **kwargs,
) -> Any:
    r"""
    The body of `MoERewardTrainer.push_to_hub`: saves the model to `args.output_dir` (on every process, so that
    DeepSpeed ZeRO-3 gathers the weights) and, on the main process, pushes that folder with
    [`push_moe_reward_model`] to `args.hub_model_id` (default: the name of `output_dir`).

    Defaults taken from the trainer: `token=args.hub_token`, `private=args.hub_private_repo`,
    `revision=args.hub_revision`, the tokenizer (`processing_class`), the profiles that `save_model` wrote to
    `<output_dir>/profiles/`, the last evaluation metrics of `state.log_history` and the last logged per-expert loads
    (`moe/load/expert_k`). `kwargs` may hold TRL's card arguments (`model_name`, `dataset_name`, `tags`) and any
    argument of [`push_moe_reward_model`].

    Returns:
        `huggingface_hub.CommitInfo` (or a `Future` with `blocking=False`); `None` on the other processes.
    """
    args = trainer.args
    repo_id = kwargs.pop("repo_id", None) or getattr(trainer, "hub_model_id", None) or args.hub_model_id
    repo_id = validate_hub_repo_id(repo_id or Path(args.output_dir).name)
    token = token if token is not None else args.hub_token
    if trainer.is_world_process_zero():
        token = resolve_token(token)
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None

    output_dir = Path(args.output_dir)
    history = list(trainer.state.log_history)
    if eval_results is None:
        eval_results = _last_evaluation(history)
    model_config = getattr(getattr(trainer, "_moe_model", trainer.model), "config", None)
    num_experts = getattr(model_config, "num_experts", None)
    if kwargs.get("expert_load") is None and num_experts:
        entry = _last_logged(history, "eval_moe/load/expert_0") or _last_logged(history, "moe/load/expert_0")
        kwargs["expert_load"] = expert_load_from_metrics(entry, num_experts)
    if profiles is None and (output_dir / PROFILES_DIRNAME).is_dir():
        profiles = output_dir / PROFILES_DIRNAME
    tags = list(kwargs.pop("tags", None) or [])
    if isinstance(tags, str):
        tags = [tags]
    tags += [tag for tag in getattr(trainer, "_tag_names", []) if tag not in tags]
    tokenizer = kwargs.pop("tokenizer", None) or trainer.processing_class
    return push_moe_reward_model(
        output_dir,
        repo_id,
        tokenizer=tokenizer,
        profiles=profiles,
        descriptions=descriptions,
        eval_results=eval_results,
        routing_heatmap=routing_heatmap,
        token=token,
        private=private if private is not None else args.hub_private_repo,
        commit_message=commit_message,
        revision=revision if revision is not None else args.hub_revision,
        tags=tags,
        run_as_future=not blocking,
        **kwargs,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def snapshot_moe_repo(
    repo_id: str, revision: str | None = None, token: str | bool | None = None, cache_dir: str | None = None
) -> Path:
    r"""
    Downloads a MoE reward model repository after checking it, and returns the local snapshot folder.

    The repository's file list is checked first: a pickle-capable file (`.bin`, `.pt`, `.pkl`, ...) is refused
    ([`UnsafeFilesError`]); only JSON, safetensors, code, tokenizer, Markdown, PNG and `profiles/` files are downloaded;
    then `config.json` must be a `moe_reward` config. In offline mode (`HF_HUB_OFFLINE=1`) the cached snapshot's files
    are checked instead of the repository's list.
    """
    from huggingface_hub import constants as hub_constants

    repo_id = validate_hub_repo_id(repo_id)
    where = f"the Hub repository {repo_id!r}"
    if not hub_constants.HF_HUB_OFFLINE:  # offline (HF_HUB_OFFLINE=1), the cached snapshot is checked below
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token)
        _refuse_pickles(files, where)
        if "config.json" not in files:
            raise FileNotFoundError(f"The Hub repository {repo_id!r} has no config.json: it is not a saved model.")
    local = Path(
        huggingface_hub.snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=_SNAPSHOT_PATTERNS,
        )
    )
    _refuse_pickles(_local_files(local), where)
    check_moe_config(local, where=f"The Hub repository {repo_id!r}")
    return local


def check_local_model_folder(path: str | os.PathLike) -> None:
    """
    Refuses a local model folder that holds pickle-capable files, or whose `config.json` is not a `moe_reward` one.

    Used by [`~trl_moe_rm.checkpoints.load_moe_reward_model`] before any weight is read.
    """
    path = Path(path)
    _refuse_pickles(_local_files(path), repr(str(path)))
    if (path / "config.json").is_file():
        check_moe_config(path)


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

    Only safetensors and JSON are read: pickle-capable files are refused, and so is a config that is not `moe_reward`.

    Example:

    ```python
    >>> from trl_moe_rm.hub import load_from_hub
    >>> bundle = load_from_hub("your-name/qwen-moe-rm")
    >>> bundle.model.for_user(bundle.profiles.load("alice"))
    ```

    Args:
        repo_or_dir (`str` or `os.PathLike`):
            A Hub repository id, or a local folder (e.g. written by [`prepare_hub_folder`] or `save_pretrained`).
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

    from .checkpoints import load_moe_reward_model
    from .profiles import ProfileStore

    path = Path(os.path.expanduser(os.fspath(repo_or_dir)))
    if not path.exists():
        if os.fspath(repo_or_dir).startswith((".", "/", "~")):
            raise FileNotFoundError(f"Model folder {os.fspath(repo_or_dir)!r} does not exist.")
        path = snapshot_moe_repo(os.fspath(repo_or_dir), revision=revision, token=token, cache_dir=cache_dir)
    elif not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a file; pass the model folder or a Hub repository id.")
    check_local_model_folder(path)
    check_moe_config(path)
    model = load_moe_reward_model(path, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    profiles = ProfileStore.from_pretrained(path) if (path / PROFILES_DIRNAME).is_dir() else None
    experts = read_experts_file(path)["experts"] if (path / EXPERTS_FILENAME).is_file() else []
    return MoERewardBundle(model=model, tokenizer=tokenizer, profiles=profiles, experts=experts, path=path)
