"""
Share Mixture-of-Experts reward models on the Hugging Face Hub, with everything needed to use them.

- [`prepare_hub_folder`] writes the repository locally: the weights (safetensors) and the config with its `auto_map`,
  the code files (`configuration_moe_reward.py`, `modeling_moe_reward.py`) so that `trust_remote_code=True` works
  without `trl_moe_rm`, the tokenizer, the users' profiles (`profiles/`), the expert descriptions (`experts.json`), the
  routing heatmap and the model card (`README.md`, see [`~trl_moe_rm.model_card.render_model_card`]).
- [`push_moe_reward_model`] uploads that folder as **one commit** (`HfApi.create_commit`). `MoERewardModel.push_to_hub`
  calls it once `trl_moe_rm` is imported (the package installs it on the class; the copy of the class uploaded for
  `trust_remote_code=True` keeps the standard `transformers` upload).
- [`push_trainer_to_hub`] and [`write_trainer_model_card`] are the bodies of `MoERewardTrainer.push_to_hub` and
  `MoERewardTrainer.create_model_card`: checkpoints, `save_model` and the push all write the same MoE model card.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from transformers.utils import logging

from .configuration_moe_reward import MoERewardModelConfig, config_fingerprint
from .io_utils import atomic_write_text
from .loading import (
    ADAPTER_CONFIG_FILE,
    CODE_FILES,
    MODEL_FILE_PATTERNS,
    MODEL_TYPE,
    TOKENIZER_FILES,
    check_local_model_folder,
    validate_hub_repo_id,
)
from .model_card import (
    EXPERTS_FILENAME,
    ROUTING_HEATMAP_FILENAME,
    eval_metrics,
    expert_load_from_metrics,
    expert_records,
    experts_file_content,
    render_model_card,
)
from .paths import is_local_path
from .profiles import PROFILES_DIRNAME, ProfileStore
from .safety import UnsafeFilesError, check_weight_files, find_pickle_files


logger = logging.get_logger(__name__)

__all__ = [
    "AUTO_MAP",
    "DEFAULT_COMMIT_MESSAGE",
    "HubOfflineError",
    "ensure_online",
    "prepare_hub_folder",
    "push_moe_reward_model",
    "push_trainer_to_hub",
    "resolve_token",
    "write_trainer_model_card",
]

AUTO_MAP: dict[str, str] = {
    "AutoConfig": "configuration_moe_reward.MoERewardModelConfig",
    "AutoModelForSequenceClassification": "modeling_moe_reward.MoERewardModel",
}
DEFAULT_COMMIT_MESSAGE = "Upload MoE reward model with trl_moe_rm"
_UPLOAD_OPTIONS = ("private", "commit_description", "create_pr", "max_shard_size")
_CARD_OPTIONS = (
    "descriptions",
    "eval_results",
    "expert_load",
    "report",
    "base_model",
    "dataset_name",
    "model_name",
    "tags",
    "license",
)


class HubOfflineError(OfflineModeIsEnabled, ValueError):
    """
    A push while `huggingface_hub` is offline (`HF_HUB_OFFLINE=1`), raised before any work. It is an
    `OfflineModeIsEnabled` (what `huggingface_hub` would raise mid-upload) and a `ValueError` (a setting to change), so
    that `trl-moe-rm push` reports it in one line.
    """


# ----------------------------------------------------------------------------------------------------------------------
# Checks made before any upload
# ----------------------------------------------------------------------------------------------------------------------


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


def ensure_online() -> None:
    """
    Raises [`HubOfflineError`] when `huggingface_hub` is in offline mode (`HF_HUB_OFFLINE=1`), which a push cannot
    work in.
    """
    if hub_constants.HF_HUB_OFFLINE:
        raise HubOfflineError(
            "Cannot push to the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1). Push from a machine with "
            "network access with HF_HUB_OFFLINE unset, or write the upload locally with "
            "`trl_moe_rm.hub.prepare_hub_folder` and upload that folder later."
        )


def _full_repo_id(api: HfApi, repo_id: str) -> str:
    """`namespace/name`: a bare `name` goes to the token's account, as `create_repo` would put it."""
    return repo_id if "/" in repo_id else f"{api.whoami()['name']}/{repo_id}"


# ----------------------------------------------------------------------------------------------------------------------
# Staging the repository folder
# ----------------------------------------------------------------------------------------------------------------------


def _copy_model_folder(source: Path, folder: Path) -> None:
    """Copies the weights, config, code and tokenizer files of a saved model folder, after checking it."""
    if not source.is_dir():
        raise FileNotFoundError(
            f"{str(source)!r} is not a model folder: pass a MoERewardModel or the folder written by `save_model` / "
            "`save_pretrained`."
        )
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} has no config.json: it is not a saved model.")
    check_local_model_folder(source)
    names = sorted(entry.name for entry in source.iterdir() if entry.is_file())
    copied = list(filter_repo_objects(names, allow_patterns=list(MODEL_FILE_PATTERNS)))
    for name in copied:
        shutil.copy2(source / name, folder / name)
    if not {"model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"} & set(copied):
        raise FileNotFoundError(
            f"{str(source)!r} holds no safetensors weights (model.safetensors or adapter_model.safetensors). Save the "
            "model with `save_pretrained` / `trainer.save_model`, which write safetensors."
        )


def _write_model(model: Any, folder: Path, max_shard_size: int | str | None) -> None:
    """Writes the model (or copies a saved model folder) into `folder`, with its code files and `auto_map`."""
    if isinstance(model, (str, os.PathLike)):
        _copy_model_folder(Path(model), folder)
    else:
        if getattr(getattr(model, "config", None), "model_type", None) != MODEL_TYPE or not hasattr(
            model, "save_pretrained"
        ):
            raise TypeError(
                f"Expected a MoERewardModel (config.model_type={MODEL_TYPE!r}) or a saved model folder, got "
                f"{type(model).__name__}."
            )
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        if _is_peft_model(model):
            # A PEFT adapter folder does not describe the MoE head: save its config too (as MoERewardTrainer does).
            model.get_base_model().config.save_pretrained(folder)
    package = Path(__file__).resolve().parent
    for name in CODE_FILES:
        if not (folder / name).is_file():
            shutil.copy2(package / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    auto_map = dict(config.get("auto_map") or {})
    if any(auto_map.get(key) != value for key, value in AUTO_MAP.items()):
        config["auto_map"] = {**auto_map, **AUTO_MAP}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _open_profiles(profiles: Any) -> ProfileStore | None:
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
        if not isinstance(candidate, str) or "/" not in candidate or is_local_path(candidate):
            continue
        try:
            validate_repo_id(candidate)
        except HFValidationError:
            continue
        return candidate
    return None


def _heatmap_source(routing_heatmap: Any, report: Mapping[str, Any] | None) -> Any:
    """The routing heatmap to publish: the one given, else the routing matrix of the report."""
    if routing_heatmap is None and report and report.get("routing_matrix"):
        return report["routing_matrix"]
    return routing_heatmap


def _write_heatmap(routing_heatmap: Any, folder: Path) -> str | None:
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
    with open(source, "rb") as file:
        if file.read(8) != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"Routing heatmap {str(source)!r} is not a PNG file.")
    shutil.copy2(source, target)
    return ROUTING_HEATMAP_FILENAME


def _card(
    config: MoERewardModelConfig,
    repo_id: str,
    *,
    store: ProfileStore | None,
    has_tokenizer: bool,
    is_adapter: bool,
    heatmap: str | None,
    **options: Any,
) -> tuple[list[dict[str, Any]], str]:
    """
    The expert records and the model card, from the facts of the folder and the card options of
    [`prepare_hub_folder`] (`descriptions`, `eval_results`, `expert_load`, `report`, `base_model`, `dataset_name`,
    `model_name`, `tags`, `license`).
    """
    unknown = sorted(set(options) - set(_CARD_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown model card argument(s) {unknown}; the card takes {list(_CARD_OPTIONS)}.")
    report = options.get("report") or {}
    eval_results, expert_load = options.get("eval_results"), options.get("expert_load")
    metrics = eval_results if isinstance(eval_results, Mapping) else None
    if expert_load is None:
        expert_load = report.get("expert_load") or expert_load_from_metrics(metrics, config.num_experts)
    descriptions = options.get("descriptions")
    records = expert_records(
        config.num_experts, report.get("descriptions") if descriptions is None else descriptions, expert_load
    )
    if eval_results is None:
        results: Any = eval_metrics(report)
    else:
        results = eval_metrics(eval_results) if metrics is not None else list(eval_results)
    card = render_model_card(
        repo_id,
        config,
        records,
        base_model=options.get("base_model") or _guess_base_model(config),
        dataset_name=options.get("dataset_name"),
        eval_results=results,
        routing_heatmap=heatmap,
        has_profiles=store is not None,
        num_profiles=None if store is None else len(store),
        has_tokenizer=has_tokenizer,
        is_adapter=is_adapter,
        model_name=options.get("model_name"),
        tags=options.get("tags"),
        license=options.get("license"),
    )
    return records, card


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
            config, code and tokenizer files are copied, after the checks of
            [`~trl_moe_rm.loading.check_local_model_folder`]; trainer-state files such as `training_args.bin` are
            left out).
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

    Raises:
        ValueError: `folder` is not empty, profiles fitted for another model, bad descriptions or heatmap, or a model
            folder that is not a `moe_reward` model.
        [`~trl_moe_rm.safety.UnsafeFilesError`]: a model folder holding pickle-capable files or weights that are not
            safetensors.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{str(folder)!r} must be a new or empty folder, so that it holds exactly the upload.")
    folder.mkdir(parents=True, exist_ok=True)
    _write_model(model, folder, max_shard_size)
    config = MoERewardModelConfig.from_pretrained(folder)

    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            (folder / name).unlink(missing_ok=True)
        tokenizer.save_pretrained(folder)
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    if not has_tokenizer:
        logger.warning(
            "No tokenizer is uploaded with the model: pass `tokenizer=` so that the repository can score text on its "
            "own."
        )

    store = _open_profiles(profiles)
    if store is not None:
        fingerprint = config_fingerprint(config)
        for profile in store.as_dict().values():
            profile.check_compatible(config.num_experts, fingerprint)
        store.save_pretrained(folder)

    records, card = _card(
        config,
        repo_id or folder.name,
        store=store,
        has_tokenizer=has_tokenizer,
        is_adapter=(folder / ADAPTER_CONFIG_FILE).is_file(),
        heatmap=_write_heatmap(_heatmap_source(routing_heatmap, report), folder),
        descriptions=descriptions,
        eval_results=eval_results,
        expert_load=expert_load,
        report=report,
        base_model=base_model,
        dataset_name=dataset_name,
        model_name=model_name,
        tags=tags,
        license=license,
    )
    (folder / EXPERTS_FILENAME).write_text(experts_file_content(records, config.top_k), encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")

    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    unsafe = find_pickle_files(files)
    if unsafe:  # e.g. a custom `save_pretrained`: never upload a pickle
        raise UnsafeFilesError(f"Refusing to upload pickle-capable files {unsafe}; save the model as safetensors.")
    check_weight_files(folder)  # never upload weights that loading would refuse
    return files


# ----------------------------------------------------------------------------------------------------------------------
# Pushing
# ----------------------------------------------------------------------------------------------------------------------


def _commit(
    api: HfApi,
    token: str,
    folder: Path,
    files: list[str],
    repo_id: str,
    *,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    commit_description: str | None,
    run_as_future: bool,
    replace_profiles: bool,
) -> Any:
    """
    Uploads the staged `files` of `folder` as one commit; with `replace_profiles`, the repository's `profiles/` files
    that the upload does not hold are deleted in that commit.

    `HfApi.create_commit` rather than `HfApi.upload_folder(..., delete_patterns=...)`: since huggingface_hub#4331
    (huggingface_hub 2.4, with `hf_xet` installed) `upload_folder` streams a folder in several commits, so a push could
    land half its profiles; it also refuses `create_pr=True` with a `revision`. The deletions are computed as
    `upload_folder` does (`filter_repo_objects` on the repository's files).
    """
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in files
    ]
    if replace_profiles:
        try:
            existing = api.list_repo_files(repo_id, revision=revision, token=token)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            existing = []
        stale = set(filter_repo_objects(existing, allow_patterns=[f"{PROFILES_DIRNAME}/*"])) - set(files)
        operations += [CommitOperationDelete(path_in_repo=path) for path in sorted(stale)]
    logger.info(f"Uploading {len(files)} files to {repo_id} in one commit: {', '.join(files)}")
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
        run_as_future=run_as_future,
    )


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
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    run_as_future: bool = False,
    **options: Any,
) -> Any:
    r"""
    Uploads a MoE reward model and everything around it to the Hub, as one commit.

    The commit holds what [`prepare_hub_folder`] writes: the weights (`model.safetensors`) and `config.json` with its
    `auto_map`, the code files (`configuration_moe_reward.py`, `modeling_moe_reward.py`), the tokenizer, `profiles/`
    when `profiles` is given (stale files of a previous `profiles/` are deleted in the same commit), `experts.json`,
    `routing_heatmap.png` when given, and the model card (`README.md`). Nothing is a pickle.

    Example:

    ```python
    >>> from trl_moe_rm.hub import push_moe_reward_model
    >>> push_moe_reward_model(model, "your-name/qwen-moe-rm", tokenizer=tokenizer, profiles="my_profiles/")
    ```

    Args:
        model ([`MoERewardModel`] or `str` or `os.PathLike`):
            The model, or a folder written by `save_pretrained` / `MoERewardTrainer.save_model`.
        repo_id (`str`):
            `"name"` or `"namespace/name"`. The repository is created if needed; a bare `"name"` goes to the token's
            account, and the card names the full id.
        token (`str`, *optional*):
            A token with write access. Defaults to the one of `hf auth login` / `HF_TOKEN`.
        private (`bool`, *optional*):
            Visibility of a newly created repository (an existing one is not changed).
        commit_message (`str`, *optional*, defaults to `"Upload MoE reward model with trl_moe_rm"`):
            Message of the commit.
        revision (`str`, *optional*):
            Branch to commit to (created if needed).
        create_pr (`bool`, *optional*, defaults to `False`):
            Open a pull request instead of committing to the branch.
        commit_description (`str`, *optional*):
            Description of the commit.
        run_as_future (`bool`, *optional*, defaults to `False`):
            Return a `concurrent.futures.Future` instead of waiting for the upload.
        tokenizer, profiles, descriptions, eval_results, routing_heatmap, **options:
            As in [`prepare_hub_folder`] (`options`: `expert_load`, `report`, `base_model`, `dataset_name`,
            `model_name`, `tags`, `license`, `max_shard_size`).

    Returns:
        `huggingface_hub.CommitInfo` (or a `Future` of it with `run_as_future=True`).

    Raises:
        [`HubOfflineError`] (a `ValueError`): `HF_HUB_OFFLINE=1`.
        ValueError: an invalid `repo_id`, no token (the message says how to log in), or any error of
            [`prepare_hub_folder`]; nothing is uploaded then.
    """
    repo_id = validate_hub_repo_id(repo_id)
    ensure_online()
    token = resolve_token(token)
    api = HfApi(token=token)
    repo_id = _full_repo_id(api, repo_id)
    staging = Path(tempfile.mkdtemp(prefix="trl_moe_rm_push_"))
    try:
        folder = staging / "repo"
        files = prepare_hub_folder(
            model,
            folder,
            repo_id=repo_id,
            tokenizer=tokenizer,
            profiles=profiles,
            descriptions=descriptions,
            eval_results=eval_results,
            routing_heatmap=routing_heatmap,
            **options,
        )
        result = _commit(
            api,
            token,
            folder,
            files,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message,
            commit_description=commit_description,
            run_as_future=run_as_future,
            replace_profiles=profiles is not None,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if run_as_future and hasattr(result, "add_done_callback"):  # the upload reads the staged files until it is done
        result.add_done_callback(lambda _: shutil.rmtree(staging, ignore_errors=True))
    else:
        shutil.rmtree(staging, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# MoERewardTrainer
# ----------------------------------------------------------------------------------------------------------------------


def _last_logged(log_history: Sequence[Mapping[str, Any]], key: str) -> Mapping[str, Any] | None:
    return next((entry for entry in reversed(log_history) if key in entry), None)


def _trainer_repo_id(trainer: Any) -> str:
    """The trainer's repository: the one `push_to_hub=True` created, else `args.hub_model_id`, else `output_dir`'s name."""
    return trainer.hub_model_id or trainer.args.hub_model_id or Path(trainer.args.output_dir).name


def _with_trainer_defaults(trainer: Any, options: dict[str, Any]) -> dict[str, Any]:
    """
    The publishing options of a trainer: the last evaluation of `state.log_history` as `eval_results`, the last
    logged per-expert loads (`moe/load/expert_k`) as `expert_load`, the trainer's tags after the given ones, and the
    profiles that `save_model` wrote to `<output_dir>/profiles/`.
    """
    options = dict(options)
    history = list(trainer.state.log_history)
    if options.get("eval_results") is None:
        entry = _last_logged(history, "eval_loss")
        options["eval_results"] = dict(entry) if entry is not None else None
    num_experts = getattr(getattr(trainer, "_moe_model", trainer.model).config, "num_experts", None)
    if options.get("expert_load") is None and num_experts:
        entry = _last_logged(history, "eval_moe/load/expert_0") or _last_logged(history, "moe/load/expert_0")
        options["expert_load"] = expert_load_from_metrics(entry, num_experts)
    tags = options.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    options["tags"] = tags + [tag for tag in getattr(trainer, "_tag_names", []) if tag not in tags]
    profiles = Path(trainer.args.output_dir) / PROFILES_DIRNAME
    if options.get("profiles") is None and profiles.is_dir():
        options["profiles"] = profiles
    return options


def write_trainer_model_card(trainer: Any, output_dir: str | os.PathLike | None = None, **options: Any) -> Path:
    r"""
    Writes the MoE model card of a [`MoERewardTrainer`] to `<output_dir>/README.md` (default: `args.output_dir`): the
    body of `MoERewardTrainer.create_model_card`, which checkpoints, `save_model` and `push_to_hub` all call.

    The card is the one [`push_moe_reward_model`] uploads, for the same options: the repository is
    `args.hub_model_id` (default: the name of `args.output_dir`); the last evaluation metrics, the last logged
    per-expert loads, the trainer's tags and the profiles of `<args.output_dir>/profiles/` are filled in as in
    [`push_trainer_to_hub`].

    Args:
        trainer ([`MoERewardTrainer`]):
            The trainer.
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to write `README.md`. Defaults to `args.output_dir`.
        **options:
            `repo_id`, `tokenizer` (default: the trainer's `processing_class`), `profiles` and the card arguments of
            [`prepare_hub_folder`] (`descriptions`, `eval_results`, `routing_heatmap`, `expert_load`, `report`,
            `base_model`, `dataset_name`, `model_name`, `tags`, `license`).

    Returns:
        `Path`: The card's path.
    """
    options = _with_trainer_defaults(trainer, options)
    repo_id = options.pop("repo_id", None) or _trainer_repo_id(trainer)
    tokenizer = options.pop("tokenizer", None) or trainer.processing_class
    heatmap = _heatmap_source(options.pop("routing_heatmap", None), options.get("report"))
    model = getattr(trainer, "_moe_model", trainer.model)
    _, card = _card(
        model.config,
        repo_id,
        store=_open_profiles(options.pop("profiles", None)),
        has_tokenizer=tokenizer is not None,
        is_adapter=_is_peft_model(trainer.model),
        heatmap=ROUTING_HEATMAP_FILENAME if heatmap is not None else None,
        **{key: value for key, value in options.items() if key not in _UPLOAD_OPTIONS},
    )
    path = Path(output_dir if output_dir is not None else trainer.args.output_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, card)
    return path


def push_trainer_to_hub(
    trainer: Any,
    commit_message: str | None = "End of training",
    blocking: bool = True,
    token: str | None = None,
    revision: str | None = None,
    **kwargs: Any,
) -> Any:
    r"""
    The body of `MoERewardTrainer.push_to_hub`: saves the model to `args.output_dir` (on every process, so that
    DeepSpeed ZeRO-3 gathers the weights) and, on the main process, writes its model card there and pushes that folder
    with [`push_moe_reward_model`] to `args.hub_model_id` (default: the name of `output_dir`). The card in
    `output_dir/README.md` is the uploaded one.

    Defaults taken from the trainer: `token=args.hub_token`, `private=args.hub_private_repo`,
    `revision=args.hub_revision`, the tokenizer (`processing_class`), the profiles that `save_model` wrote to
    `<output_dir>/profiles/`, the last evaluation metrics of `state.log_history` and the last logged per-expert loads
    (`moe/load/expert_k`). `kwargs` takes any argument of [`push_moe_reward_model`] (`profiles`, `descriptions`,
    `eval_results`, `routing_heatmap`, `private`, `dataset_name`, `model_name`, `tags`, ...).

    Returns:
        `huggingface_hub.CommitInfo` (or a `Future` with `blocking=False`); `None` on the other processes.
    """
    args = trainer.args
    repo_id = validate_hub_repo_id(kwargs.pop("repo_id", None) or _trainer_repo_id(trainer))
    ensure_online()
    if trainer.is_world_process_zero():
        token = resolve_token(token if token is not None else args.hub_token)
        repo_id = _full_repo_id(HfApi(token=token), repo_id)
    trainer.callback_handler.on_push_begin(args, trainer.state, trainer.control)
    trainer.save_model(_internal_call=True)
    if not trainer.is_world_process_zero():
        return None

    kwargs = _with_trainer_defaults(trainer, kwargs)
    kwargs["tokenizer"] = kwargs.get("tokenizer") or trainer.processing_class
    trainer.create_model_card(repo_id=repo_id, **kwargs)
    if kwargs.get("private") is None:
        kwargs["private"] = args.hub_private_repo
    return push_moe_reward_model(
        args.output_dir,
        repo_id,
        token=token,
        commit_message=commit_message,
        revision=revision if revision is not None else args.hub_revision,
        run_as_future=not blocking,
        **kwargs,
    )
