"""
Model cards and expert descriptions (`experts.json`) of Mixture-of-Experts reward models shared on the Hugging Face Hub.

[`render_model_card`] renders the `README.md` of a Hub repository (and of a trainer's `output_dir`) from the template
`templates/model_card.md`: YAML metadata (tags, base model, datasets and a `model-index` with the evaluation results),
a table of the experts with their description and routing load, the routing heatmap, the evaluation results,
copy-paste usage (scoring with `trl_moe_rm.score`, personalization with `fit_user_weights`, RLOO with
`trl_moe_rm.rewards.PersonalizedReward`) and the citation of the paper.

[`expert_records`] normalises the expert descriptions accepted by
[`~trl_moe_rm.publishing.push_moe_reward_model`] into the JSON-serialisable records written to `experts.json`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCardData


__all__ = [
    "CARD_TAGS",
    "CITATION",
    "EXPERTS_FILENAME",
    "EXPERTS_FORMAT",
    "MODEL_CARD_TEMPLATE",
    "PAPER_ARXIV_ID",
    "PAPER_TITLE",
    "ROUTING_HEATMAP_FILENAME",
    "eval_metrics",
    "expert_load_from_metrics",
    "expert_records",
    "experts_file_content",
    "read_experts_file",
    "render_model_card",
]

PAPER_TITLE = (
    "Sparse Mixture-of-Experts Reward Models Learn Interpretable and Specialized Experts for Personalized Preference "
    "Modeling"
)
PAPER_ARXIV_ID = "2606.04284"
CITATION = f"""@misc{{sparse_moe_reward_models_2026,
  title         = {{{PAPER_TITLE}}},
  year          = {{2026}},
  eprint        = {{{PAPER_ARXIV_ID}}},
  archivePrefix = {{arXiv}},
  url           = {{https://arxiv.org/abs/{PAPER_ARXIV_ID}}},
}}"""

CARD_TAGS: tuple[str, ...] = ("trl", "trl_moe_rm", "reward-model", "mixture-of-experts", "personalization")
"""Tags every card carries (user tags are added after them)."""

EXPERTS_FILENAME = "experts.json"
EXPERTS_FORMAT = "trl_moe_rm.experts"
EXPERTS_SCHEMA_VERSION = 1
ROUTING_HEATMAP_FILENAME = "routing_heatmap.png"
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "templates" / "model_card.md"
"""The Jinja2 template of the card (shipped as package data)."""

# Keys of `trainer.evaluate()` / `analysis_report` that are bookkeeping rather than model quality.
_NON_METRIC_KEYS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "step", "num_tokens", "num_pairs")
_REPORT_METRICS = (
    "accuracy",
    "conflict_accuracy",
    "nmi",
    "purity",
    "posterior_nmi",
    "posterior_purity",
    "specialization",
    "description_accuracy",
)
_RECORD_KEYS = ("top_words", "bottom_words", "features")


# ----------------------------------------------------------------------------------------------------------------------
# Expert records (experts.json)
# ----------------------------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Converts NumPy scalars, tuples and non-finite floats (to `None`) into plain JSON values."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return str(value)


def _record_from(entry: Any, expert: int) -> dict[str, Any]:
    """One expert record from an `ExpertDescription`, a summary string or a record mapping."""
    if entry is None:
        return {"expert": expert, "description": None}
    if isinstance(entry, str):
        return {"expert": expert, "description": entry}
    if isinstance(entry, Mapping):
        description = entry.get("description", entry.get("summary"))
        record = {"expert": expert, "description": None if description is None else str(description)}
        if entry.get("load") is not None:
            record["load"] = entry["load"]
        for key in _RECORD_KEYS:
            if key in entry:
                record[key] = entry[key]
        return record
    if hasattr(entry, "summary"):  # ExpertDescription (the example pairs are left out: they quote the data)
        record = {"expert": expert, "description": str(entry.summary)}
        for key in _RECORD_KEYS:
            if hasattr(entry, key):
                record[key] = getattr(entry, key)
        return record
    raise TypeError(
        f"Cannot describe expert {expert} with a {type(entry).__name__}: use a string, a mapping with a `description`, "
        "or an ExpertDescription from `trl_moe_rm.analysis.describe_experts`."
    )


def _expert_index(key: Any, num_experts: int) -> int:
    try:
        index = int(key)
    except (TypeError, ValueError):
        raise ValueError(f"Expert descriptions are keyed by expert index, got the key {key!r}.") from None
    if isinstance(key, bool) or not 0 <= index < num_experts:
        raise ValueError(f"Expert index {key!r} is out of range for a model with {num_experts} experts.")
    return index


def expert_records(
    num_experts: int,
    descriptions: Any = None,
    expert_load: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    r"""
    One JSON-serialisable record per expert: `expert`, `description`, `load` and, when known, `top_words`,
    `bottom_words` and `features`.

    Args:
        num_experts (`int`):
            Number of experts `K` of the model.
        descriptions (*optional*):
            Any of: a list of [`~trl_moe_rm.analysis.ExpertDescription`] (from
            [`~trl_moe_rm.analysis.describe_experts`]; their example pairs are not kept, since they quote the data), a
            list of `K` strings, a mapping from expert index (int or str, as in `analysis_report(...)["descriptions"]`)
            to a string or a record, a list of records (as in `experts.json`), or the path of an `experts.json` file.
        expert_load (`Sequence[float]`, *optional*):
            Mean routing weight of each expert (e.g. `analysis_report(...)["expert_load"]`). Overrides the loads of
            the records.

    Returns:
        `list[dict]`: `K` records in expert order; experts without a description have `description=None`.
    """
    if isinstance(descriptions, (str, os.PathLike)):
        descriptions = read_experts_file(descriptions)
    by_expert: dict[int, Any] = {}
    if descriptions is None:
        pass
    elif isinstance(descriptions, Mapping):
        if "experts" in descriptions and isinstance(descriptions["experts"], list):  # a parsed experts.json
            return expert_records(num_experts, descriptions["experts"], expert_load)
        for key, entry in descriptions.items():
            by_expert[_expert_index(key, num_experts)] = entry
    elif isinstance(descriptions, Sequence):
        entries = list(descriptions)
        if len(entries) > num_experts:
            raise ValueError(f"Got {len(entries)} expert descriptions for a model with {num_experts} experts.")
        for position, entry in enumerate(entries):
            if isinstance(entry, Mapping) and "expert" in entry:
                index = _expert_index(entry["expert"], num_experts)
            elif hasattr(entry, "expert") and not isinstance(entry, str):
                index = _expert_index(entry.expert, num_experts)
            else:
                index = position
            by_expert[index] = entry
    else:
        raise TypeError(f"Unsupported expert descriptions of type {type(descriptions).__name__}.")

    if expert_load is not None:
        expert_load = [float(value) for value in expert_load]
        if len(expert_load) != num_experts:
            raise ValueError(f"Got {len(expert_load)} expert loads for a model with {num_experts} experts.")
    records = []
    for expert in range(num_experts):
        record = _record_from(by_expert.get(expert), expert)
        if expert_load is not None:
            record["load"] = expert_load[expert]
        record.setdefault("load", None)
        records.append(_json_safe(record))
    return records


def experts_file_content(records: Sequence[Mapping[str, Any]], top_k: int | None = None) -> str:
    """The text of `experts.json` for the given records."""
    data = {
        "format": EXPERTS_FORMAT,
        "schema_version": EXPERTS_SCHEMA_VERSION,
        "num_experts": len(records),
        "top_k": top_k,
        "experts": [dict(record) for record in records],
    }
    return json.dumps(_json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def read_experts_file(path: str | os.PathLike) -> dict[str, Any]:
    """
    Reads an `experts.json` (the file itself, or the folder that holds it).

    Returns:
        `dict` with `num_experts`, `top_k` and `experts` (the records of [`expert_records`]).
    """
    path = Path(path)
    if path.is_dir():
        path = path / EXPERTS_FILENAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"No expert descriptions at {str(path)!r}.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error.msg}).") from None
    if not isinstance(data, dict) or data.get("format") != EXPERTS_FORMAT or not isinstance(data.get("experts"), list):
        raise ValueError(f"{str(path)!r} is not a trl_moe_rm experts file (format {EXPERTS_FORMAT!r}).")
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation results
# ----------------------------------------------------------------------------------------------------------------------


def eval_metrics(results: Mapping[str, Any] | None) -> dict[str, float]:
    r"""
    The model-quality metrics of `trainer.evaluate()` output or of an `analysis_report`, as `{name: value}`.

    The `eval_` prefix is removed; bookkeeping entries (`*runtime`, `*per_second`, `epoch`, `num_tokens`, ...),
    per-expert `moe/...` logs, non-numeric and non-finite values are dropped. For an `analysis_report`, only its scalar
    metrics (`accuracy`, `conflict_accuracy`, `nmi`, `purity`, `posterior_nmi`, `posterior_purity`, `specialization`,
    `description_accuracy`) are kept.
    """
    if not results:
        return {}
    is_report = "num_experts" in results and "expert_load" in results
    metrics = {}
    for key, value in results.items():
        name = key[len("eval_") :] if key.startswith("eval_") else key
        if is_report and name not in _REPORT_METRICS:
            continue
        if "/" in name or any(name.endswith(suffix) for suffix in _NON_METRIC_KEYS):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            continue
        metrics[name] = float(value)
    return metrics


def expert_load_from_metrics(results: Mapping[str, Any] | None, num_experts: int) -> list[float] | None:
    """The per-expert load logged by `MoERewardTrainer` (`moe/load/expert_k`, with or without `eval_`), if present."""
    if not results:
        return None
    loads = []
    for expert in range(num_experts):
        value = results.get(f"eval_moe/load/expert_{expert}", results.get(f"moe/load/expert_{expert}"))
        if value is None:
            return None
        loads.append(float(value))
    return loads


# ----------------------------------------------------------------------------------------------------------------------
# Card
# ----------------------------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _metric_label(name: str) -> str:
    return name.replace("_", " ")


def _card_results(
    eval_results: Mapping[str, float] | Sequence[EvalResult] | None, dataset_name: str | None
) -> tuple[list[EvalResult], dict[str, float]]:
    """The `model-index` entries and the `{metric: value}` table of the card."""
    if not eval_results:
        return [], {}
    if not isinstance(eval_results, Mapping):
        results = list(eval_results)
        return results, {result.metric_name or result.metric_type: float(result.metric_value) for result in results}
    results = [
        EvalResult(
            task_type="text-classification",
            task_name="Reward modeling (pairwise preferences)",
            dataset_type=dataset_name or "custom",
            dataset_name=dataset_name or "preference pairs",
            metric_type=name,
            metric_name=_metric_label(name),
            metric_value=value,
        )
        for name, value in eval_results.items()
    ]
    return results, dict(eval_results)


def render_model_card(
    repo_id: str,
    config: Any,
    experts: Sequence[Mapping[str, Any]],
    *,
    base_model: str | None = None,
    dataset_name: str | None = None,
    eval_results: Mapping[str, float] | Sequence[EvalResult] | None = None,
    routing_heatmap: str | None = None,
    has_profiles: bool = False,
    num_profiles: int | None = None,
    has_tokenizer: bool = True,
    is_adapter: bool = False,
    model_name: str | None = None,
    tags: Sequence[str] | None = None,
    license: str | None = None,
) -> str:
    r"""
    The `README.md` of a MoE reward model repository, rendered from the Jinja2 template [`MODEL_CARD_TEMPLATE`]
    (`trl_moe_rm/templates/model_card.md`), as TRL renders its own cards from `trl/templates/`.

    Args:
        repo_id (`str`):
            The repository, used in the usage snippets.
        config ([`MoERewardModelConfig`]):
            The model's configuration (number of experts, top-k, backbone type).
        experts (`Sequence[Mapping]`):
            The records of [`expert_records`].
        base_model (`str`, *optional*):
            Hub id of the backbone, for the `base_model` metadata.
        dataset_name (`str`, *optional*):
            Training / evaluation dataset (Hub id or name), for the `datasets` metadata and the `model-index`.
        eval_results (`Mapping[str, float]` or `Sequence[EvalResult]`, *optional*):
            `{metric: value}` (see [`eval_metrics`]) or `huggingface_hub.EvalResult`s, written to the `model-index`
            metadata and to an evaluation table.
        routing_heatmap (`str`, *optional*):
            Path, inside the repository, of the routing heatmap PNG.
        has_profiles (`bool`, *optional*, defaults to `False`):
            Whether the repository holds a `profiles/` folder.
        num_profiles (`int`, *optional*):
            Number of user profiles in it.
        has_tokenizer (`bool`, *optional*, defaults to `True`):
            Whether the repository holds the tokenizer.
        is_adapter (`bool`, *optional*, defaults to `False`):
            Whether the weights are a PEFT adapter (load them with `load_from_hub`).
        model_name (`str`, *optional*):
            Title of the card. Defaults to the repository name.
        tags (`Sequence[str]`, *optional*):
            Extra tags.
        license (`str`, *optional*):
            License identifier for the metadata.

    Returns:
        `str`: The card, YAML front matter included.
    """
    model_name = model_name or repo_id.split("/")[-1]
    results, metrics = _card_results(eval_results, dataset_name)
    card_data = ModelCardData(
        model_name=model_name if results else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=list(dict.fromkeys([*CARD_TAGS, *(tags or [])])),
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        license=license,
        eval_results=results or None,
    )
    environment = jinja2.Environment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )
    template = environment.from_string(MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"))
    return template.render(
        card_data=card_data.to_yaml(),
        model_name=model_name,
        repo_id=repo_id,
        num_experts=int(config.num_experts),
        top_k=int(config.top_k),
        backbone_type=getattr(getattr(config, "backbone_config", None), "model_type", "unknown"),
        base_model=base_model,
        dataset_name=dataset_name,
        expert_rows=[
            (record["expert"], _cell(record.get("load")), _cell(record.get("description") or "not described"))
            for record in experts
        ],
        experts_filename=EXPERTS_FILENAME,
        routing_heatmap=routing_heatmap,
        metric_rows=[(_metric_label(name), _cell(value)) for name, value in metrics.items()],
        is_adapter=is_adapter,
        has_tokenizer=has_tokenizer,
        has_profiles=has_profiles,
        num_profiles=num_profiles,
        paper_title=PAPER_TITLE,
        paper_arxiv_id=PAPER_ARXIV_ID,
        citation=CITATION,
    )
