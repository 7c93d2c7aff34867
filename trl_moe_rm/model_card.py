"""
Model cards and expert descriptions (`experts.json`) of Mixture-of-Experts reward models shared on the Hugging Face Hub.

[`render_model_card`] writes the `README.md` of a Hub repository: YAML metadata (tags, base model, datasets and a
`model-index` with the evaluation results), a table of the experts with their description and routing load, the
routing heatmap, the evaluation results, copy-paste usage (scoring, personalization with `fit_user_weights`, RLOO with
`trl_moe_rm.rewards.PersonalizedReward`) and the citation of the paper.

[`expert_records`] normalises the expert descriptions accepted by [`~trl_moe_rm.hub.push_moe_reward_model`] into the
JSON-serialisable records written to `experts.json`.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData


__all__ = [
    "CARD_TAGS",
    "CITATION",
    "EXPERTS_FILENAME",
    "EXPERTS_FORMAT",
    "PAPER_ARXIV_ID",
    "PAPER_TITLE",
    "ROUTING_HEATMAP_FILENAME",
    "eval_metrics",
    "expert_records",
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
    The `README.md` of a MoE reward model repository.

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
    num_experts = int(config.num_experts)
    top_k = int(config.top_k)
    backbone_type = getattr(getattr(config, "backbone_config", None), "model_type", "unknown")
    all_tags = list(dict.fromkeys([*CARD_TAGS, *(tags or [])]))

    results: list[EvalResult] = []
    metrics: dict[str, float] = {}
    if eval_results:
        if isinstance(eval_results, Mapping):
            metrics = dict(eval_results)
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
                for name, value in metrics.items()
            ]
        else:
            results = list(eval_results)
            metrics = {result.metric_name or result.metric_type: float(result.metric_value) for result in results}
    card_data = ModelCardData(
        model_name=model_name if results else None,
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=all_tags,
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        license=license,
        eval_results=results or None,
    )

    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {model_name}",
        "",
        f"A **sparse Mixture-of-Experts reward model** with {num_experts} experts, {top_k} of which are routed to "
        f"for each prompt, on a `{backbone_type}` backbone"
        + (f" ([{base_model}](https://huggingface.co/{base_model}))" if base_model else "")
        + ". It was trained with `trl_moe_rm`, a plugin of [TRL](https://github.com/huggingface/trl), on binary "
        "preference pairs"
        + (f" from `{dataset_name}`" if dataset_name else "")
        + ", following *"
        + PAPER_TITLE
        + f"* ([arXiv {PAPER_ARXIV_ID}](https://arxiv.org/abs/{PAPER_ARXIV_ID})).",
        "",
        "A backbone encodes (prompt, response); each expert head gives a scalar reward `r_k`; a router reads the prompt "
        "and keeps its top-k weights `g(x)`. The reward is `r = sum_k g_k(x) r_k(x, y)` (the `logits` of the model). "
        "The experts can be re-weighted per user from a few labelled pairs (test-time personalization).",
        "",
        "## Experts",
        "",
        "| Expert | Load | Description |",
        "|---:|---:|---|",
    ]
    for record in experts:
        description = record.get("description") or "not described"
        lines.append(f"| {record['expert']} | {_cell(record.get('load'))} | {_cell(description)} |")
    lines += [
        "",
        "*Load* is the expert's mean routing weight over the prompts it was measured on (evaluation data, or the last "
        "training batches); descriptions are computed from the data without a language model "
        f"(`trl_moe_rm.analysis.describe_experts`). Both are also in [`{EXPERTS_FILENAME}`]({EXPERTS_FILENAME}).",
        "",
    ]
    if routing_heatmap:
        lines += [
            "## Routing",
            "",
            f"![Mean routing weight of each expert per category]({routing_heatmap})",
            "",
        ]
    if metrics:
        lines += [
            "## Evaluation",
            "",
            f"On `{dataset_name}`:" if dataset_name else "On held-out preference pairs:",
            "",
            "| Metric | Value |",
            "|---|---:|",
        ]
        lines += [f"| {_metric_label(name)} | {_cell(value)} |" for name, value in metrics.items()]
        lines.append("")

    load_model = (
        'from trl_moe_rm.hub import load_from_hub\n\nbundle = load_from_hub("{repo}")\n'
        "model, tokenizer = bundle.model, bundle.tokenizer"
        if is_adapter
        else "import torch\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        "# trust_remote_code=True runs the modeling code of this repository; not needed with `import trl_moe_rm`.\n"
        'model = AutoModelForSequenceClassification.from_pretrained("{repo}", trust_remote_code=True).eval()\n'
        'tokenizer = AutoTokenizer.from_pretrained("{repo}")'
    ).format(repo=repo_id)
    lines += [
        "## Usage",
        "",
        "### Score a response",
        "",
        "```python",
        load_model,
        "",
        'prompt, response = "How do I bake bread?", "Mix flour, water, salt and yeast, knead, proof, then bake."',
        'prompt_ids = tokenizer(prompt)["input_ids"]',
        'input_ids = prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"]',
        "with torch.no_grad():" if not is_adapter else "import torch\n\nwith torch.no_grad():",
        "    out = model(input_ids=torch.tensor([input_ids]), prompt_lengths=torch.tensor([len(prompt_ids)]))",
        "print(out.logits.item())  # the routed reward",
        "print(out.routing_weights, out.expert_rewards)  # which experts were used, and what each one says",
        "```",
        "",
    ]
    if not has_tokenizer:
        lines += ["This repository holds no tokenizer: use the backbone's.", ""]
    lines += [
        "### Personalize to a user from a few labelled pairs",
        "",
        "```python",
        "# pip install trl-moe-rm",
        "from trl_moe_rm import ProfileStore, fit_user_weights",
        "from trl_moe_rm.hub import load_from_hub",
        "",
        f'bundle = load_from_hub("{repo_id}")',
        "pairs = [  # the user's labelled pairs",
        '    {"prompt": "Explain recursion.", "chosen": "A function that calls itself.", '
        '"rejected": "Recursion is a process in which ..."},',
        "]",
        'profile = fit_user_weights(bundle.model, pairs, method="hedge", user_id="alice", tokenizer=bundle.tokenizer)',
        "user_model = bundle.model.for_user(profile)  # same modules, the user's mixture of experts",
        'ProfileStore("profiles").save(profile)',
        "```",
        "",
    ]
    if has_profiles:
        count = "" if num_profiles is None else f" ({num_profiles} user{'' if num_profiles == 1 else 's'})"
        lines += [
            f"This repository ships fitted user profiles{count} in `profiles/`:",
            "",
            "```python",
            "from trl_moe_rm import ProfileStore",
            "",
            f'profiles = ProfileStore.from_pretrained("{repo_id}")',
            "user_model = bundle.model.for_user(profiles.load(profiles.list()[0]))",
            "```",
            "",
        ]
    lines += [
        "### Use it as the reward of RLOO",
        "",
        "```python",
        "from trl import RLOOConfig, RLOOTrainer",
        "from trl_moe_rm.rewards import PersonalizedReward",
        "",
        (
            f'reward = PersonalizedReward("{repo_id}", profiles="{repo_id}")  # scores each row for its `user_id`'
            if has_profiles
            else f'reward = PersonalizedReward("{repo_id}", profiles="profiles")  # your ProfileStore folder'
        ),
        "trainer = RLOOTrainer(",
        '    model="Qwen/Qwen2.5-0.5B-Instruct",',
        "    reward_funcs=reward,",
        '    args=RLOOConfig(output_dir="rloo-personalized"),',
        "    train_dataset=dataset,  # prompts with a `user_id` column",
        ")",
        "trainer.train()",
        "```",
        "",
        "Each completion is scored for the user of its prompt (`user_id` column); users without a profile get the "
        "default routing. See `trl_moe_rm.rewards.PersonalizedReward` for its options (`strict`, `normalize`, ...).",
        "",
        "## Files",
        "",
        "- `model.safetensors`, `config.json`: the weights and configuration (`model_type: moe_reward`, with its "
        "`auto_map`);",
        "- `configuration_moe_reward.py`, `modeling_moe_reward.py`: the model code, for `trust_remote_code=True`;",
        f"- `{EXPERTS_FILENAME}`: the expert descriptions and loads;",
    ]
    if has_tokenizer:
        lines.append("- the tokenizer files;")
    if has_profiles:
        lines.append("- `profiles/`: the users' expert weights (`trl_moe_rm.ProfileStore`, JSON or safetensors);")
    if routing_heatmap:
        lines.append(f"- `{routing_heatmap}`: the routing heatmap.")
    lines += [
        "",
        "No file of this repository is a pickle: `trl_moe_rm` loads only safetensors and JSON.",
        "",
        "## Citation",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
