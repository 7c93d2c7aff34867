"""
Which settings should `MoERewardConfig()` default to? Candidate recipes measured on several visible-context datasets.

Every recipe trains a MoE head (K=8) with [`MoERewardTrainer`] on frozen all-MiniLM-L6-v2 features (cached once), for
several model seeds, on:

- `controlled`: the demo's data (6 types: `make_controlled_dataset(400)`, 25% of the prompts held out);
- `types4`, `types8`, `types12`: the generator of `benchmarks/visible_types.py` with 4, 8 and 12 types (fewer than,
  as many as and more than the K=8 experts; 300, 300 and 200 pairs per type, 25% of the prompts held out);
- `autoj`: the Auto-J pairwise test set (human labels, ties dropped, 9 scenario groups; 20% of the prompts held out),
  read from the real-data directory (`--data_dir`, `$TRL_MOE_RM_DATA` or `../shared/data`; skipped when missing).

Every pair is tokenized by the package's one text-to-ids path and truncated to 256 tokens
(`benchmarks.real_data.PairTokenizer`), and every distinct text is encoded once into the trainer's feature cache
(`benchmarks.real_data.prime_feature_cache`). Reported per run: held-out accuracy, accuracy on the conflicting pairs
(synthetic data), routing NMI and purity of the top-1 routed expert against the type / scenario group, and the number
of experts used (top-1 expert of at least 2% of the held-out pairs). Every recipe sets all its fields, so that the
results do not depend on the library's defaults.

Runs are appended to `--results` (JSON), so the sweep can be split into short commands; `--report` prints the tables:

    python -m benchmarks.defaults_sweep --datasets controlled types4 --seeds 0 1 2 --results /tmp/sweep.json
    python -m benchmarks.defaults_sweep --report --results /tmp/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import DatasetDict
from transformers import AutoTokenizer
from transformers.utils import logging

from benchmarks.real_data import PairTokenizer, RealDataConfig, load_autoj_split, prime_feature_cache, train_head
from benchmarks.real_datasets import RealDataMissingError
from benchmarks.visible_types import make_visible_types_dataset
from trl_moe_rm import MoERewardModel
from trl_moe_rm.data.controlled import make_controlled_dataset, train_test_split_by_prompt
from trl_moe_rm.demo import minilm_path
from trl_moe_rm.report import analysis_report
from trl_moe_rm.scoring import scores_from_features


NUM_EXPERTS = 8
USED_FRACTION = 0.02
"""An expert is "used" when it is the top-1 routed expert of at least this fraction of the held-out pairs."""

_OLD_DEFAULTS: dict[str, Any] = {
    "top_k": 2,
    "router_gradient": "sparse",
    "balance_coef": 0.01,
    "balance_type": "switch",
    "sparsity_coef": 0.0,
    "diversity_coef": 0.0,
    "diversity_type": "cosine",
    "router_z_loss_coef": 1e-3,
}
_ST = {**_OLD_DEFAULTS, "router_gradient": "dense"}

RECIPES: dict[str, dict[str, Any]] = {
    "dense (top_k=K, no balance)": {**_OLD_DEFAULTS, "top_k": NUM_EXPERTS, "balance_coef": 0.0},
    "top-2, switch 0.01 (old default)": _OLD_DEFAULTS,
    "top-2, switch 0.1": {**_OLD_DEFAULTS, "balance_coef": 0.1},
    "top-2 ST, no balance": {**_ST, "balance_coef": 0.0},
    "top-2 ST, switch 0.01": _ST,
    "top-2 ST, switch 0.1": {**_ST, "balance_coef": 0.1},
    "top-2 ST, entropy 0.1 (default)": {**_ST, "balance_coef": 0.1, "balance_type": "entropy"},
    "demo sparse_moe (ST, entropy 0.1, sparsity 0.001, correlation 0.03)": {
        **_ST,
        "balance_coef": 0.1,
        "balance_type": "entropy",
        "sparsity_coef": 0.001,
        "diversity_coef": 0.03,
        "diversity_type": "correlation",
    },
}
"""The candidate recipes (ST: the straight-through router gradient, `router_gradient="dense"`)."""

DATASETS: tuple[str, ...] = ("controlled", "types4", "types8", "types12", "autoj")
NUM_TYPES = {"controlled": 6, "types4": 4, "types8": 8, "types12": 12, "autoj": 9}
"""Latent types of each dataset (for Auto-J, the number of scenario groups; its true number of types is unknown)."""


def load_split(name: str, data_dir: str | None = None) -> DatasetDict:
    r"""
    The train / test split of one dataset of the sweep.

    Args:
        name (`str`):
            One of [`DATASETS`].
        data_dir (`str`, *optional*):
            Directory of the real data (Auto-J).

    Returns:
        [`~datasets.DatasetDict`]: `"train"` and `"test"`, split by prompt.

    Raises:
        [`~benchmarks.real_datasets.RealDataMissingError`]: `autoj` without its file.
    """
    if name == "controlled":
        return train_test_split_by_prompt(make_controlled_dataset(num_pairs_per_category=400, seed=0), 0.25, seed=0)
    if name.startswith("types"):
        num_types = int(name[len("types") :])
        pairs = 200 if num_types > 8 else 300
        data = make_visible_types_dataset(num_types=num_types, num_pairs_per_type=pairs, seed=0)
        return train_test_split_by_prompt(data, 0.25, seed=0)
    if name == "autoj":
        return load_autoj_split(data_dir, test_size=0.2, seed=0)
    raise ValueError(f"Unknown dataset {name!r}; choose from {list(DATASETS)}.")


def run_recipe(
    settings: dict[str, Any],
    split: DatasetDict,
    tokenized: dict[str, Any],
    config: RealDataConfig,
    backbone: str,
    tokenizer: Any,
    run_dir: Path,
) -> dict[str, Any]:
    r"""
    Trains one recipe at `config.seed` on cached features and measures it on the held-out pairs.

    Returns:
        `dict[str, Any]`: `accuracy`, `conflict_accuracy` (`None` without a `conflict` column), `nmi`, `purity`,
        `experts_used` and `expert_load` (share of the held-out pairs whose top-1 expert is each expert).
    """
    trainer, seconds = train_head(
        "run",
        {"num_experts": NUM_EXPERTS, **settings},
        config,
        backbone,
        tokenizer,
        tokenized["train"],
        tokenized["test"],
        run_dir,
    )
    scores = scores_from_features(trainer.model, trainer.cached_features(trainer.eval_dataset))
    test = split["test"]
    metrics = ["accuracy", "nmi", "purity"] + (["conflict_accuracy"] if "conflict" in test.column_names else [])
    report = analysis_report(scores, test, metrics=metrics)
    load = np.bincount(scores.top1_experts, minlength=NUM_EXPERTS) / len(scores)
    return {
        "accuracy": report["accuracy"],
        "conflict_accuracy": report.get("conflict_accuracy"),
        "nmi": report["nmi"],
        "purity": report["purity"],
        "experts_used": int((load >= USED_FRACTION).sum()),
        "expert_load": load.round(4).tolist(),
        "train_seconds": seconds,
    }


def run_sweep(
    datasets: Sequence[str],
    recipes: Sequence[str],
    seeds: Sequence[int],
    results_path: str,
    cache_dir: str,
    data_dir: str | None = None,
    num_train_epochs: float = 6,
    learning_rate: float = 2e-2,
) -> dict[str, Any]:
    r"""
    Runs every (dataset, recipe, seed) not yet in `results_path` and appends it there.

    Returns:
        `dict[str, Any]`: All the results: `runs[dataset][recipe][seed]`, and the settings.
    """
    logging.set_verbosity_error()
    results = read_results(results_path)
    backbone = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    encoder_model = MoERewardModel.from_backbone(backbone, num_experts=NUM_EXPERTS)
    run_dir = Path(tempfile.mkdtemp(prefix="defaults-sweep-"))
    for dataset in datasets:
        try:
            split = load_split(dataset, data_dir)
        except RealDataMissingError as error:
            print(f"skipping {dataset}: {error}")
            continue
        pair_tokenizer = PairTokenizer(tokenizer, max_length=256)
        tokenized = {name: pair_tokenizer(split[name]) for name in ("train", "test")}
        encoding = prime_feature_cache(encoder_model, tokenizer.pad_token_id, tokenized, cache_dir, dataset)
        print(f"{dataset}: {len(split['train'])} train / {len(split['test'])} test pairs; encoding {encoding}")
        for recipe in recipes:
            for seed in seeds:
                runs = results["runs"].setdefault(dataset, {}).setdefault(recipe, {})
                if str(seed) in runs:
                    continue
                config = RealDataConfig(
                    num_experts=NUM_EXPERTS,
                    num_train_epochs=num_train_epochs,
                    learning_rate=learning_rate,
                    batch_size=32,
                    seed=seed,
                    max_length=256,
                    cache_dir=cache_dir,
                    output_dir=str(run_dir),
                )
                runs[str(seed)] = run_recipe(RECIPES[recipe], split, tokenized, config, backbone, tokenizer, run_dir)
                row = runs[str(seed)]
                print(
                    f"  {recipe} seed {seed}: acc {row['accuracy']:.3f} NMI {row['nmi']:.3f} "
                    f"purity {row['purity']:.3f} used {row['experts_used']} ({row['train_seconds']:.0f} s)",
                    flush=True,
                )
                results["settings"] = {
                    "num_experts": NUM_EXPERTS,
                    "num_train_epochs": num_train_epochs,
                    "learning_rate": learning_rate,
                    "batch_size": 32,
                    "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                }
                write_results(results_path, results)
    return results


def read_results(path: str) -> dict[str, Any]:
    """The results JSON at `path` (`{"runs": {}}` when it does not exist yet)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    return {"runs": {}}


def write_results(path: str, results: dict[str, Any]) -> None:
    """Write the results JSON atomically (a crash loses no earlier run)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)
    os.replace(path + ".tmp", path)


def _mean(runs: dict[str, dict], key: str) -> float | None:
    values = [run[key] for run in runs.values() if run.get(key) is not None]
    return float(np.mean(values)) if values else None


def _cell(runs: dict[str, dict], key: str, digits: int = 3) -> str:
    values = np.array([run[key] for run in runs.values() if run.get(key) is not None], dtype=float)
    if values.size == 0:
        return "—"
    return f"{values.mean():.{digits}f} ({values.min():.{digits - 1}f}–{values.max():.{digits - 1}f})"


def markdown_report(results: dict[str, Any]) -> str:
    r"""
    The tables of the sweep: one per dataset (mean and min–max over seeds), then accuracy and NMI across datasets,
    with each recipe's largest accuracy shortfall against the best recipe of each dataset ("worst gap").
    """
    runs = {
        dataset: {recipe: results["runs"][dataset][recipe] for recipe in RECIPES if recipe in results["runs"][dataset]}
        for dataset in DATASETS
        if dataset in results["runs"]
    }
    lines = []
    for dataset, recipes in runs.items():
        seeds = sorted({seed for recipe_runs in recipes.values() for seed in recipe_runs})
        lines += [
            f"#### {dataset} ({NUM_TYPES[dataset]} {'scenario groups' if dataset == 'autoj' else 'types'}, "
            f"K={NUM_EXPERTS}; seeds {', '.join(seeds)})",
            "",
            "| recipe | accuracy | conflict accuracy | routing NMI | purity | experts used |",
            "|---|---|---|---|---|---|",
        ]
        for recipe, recipe_runs in recipes.items():
            cells = [_cell(recipe_runs, key) for key in ("accuracy", "conflict_accuracy", "nmi", "purity")]
            cells.append(_cell(recipe_runs, "experts_used", digits=1))
            lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
        lines.append("")
    datasets = list(runs)
    recipes = [recipe for recipe in RECIPES if any(recipe in runs[dataset] for dataset in datasets)]
    best = {dataset: max(_mean(runs[dataset][recipe], "accuracy") for recipe in runs[dataset]) for dataset in datasets}
    lines += [
        "#### Across datasets: accuracy / routing NMI / experts used (means over seeds)",
        "",
        "| recipe | " + " | ".join(datasets) + " | worst accuracy gap |",
        "|---" * (len(datasets) + 2) + "|",
    ]
    for recipe in recipes:
        cells, gaps = [], []
        for dataset in datasets:
            recipe_runs = runs[dataset].get(recipe)
            if not recipe_runs:
                cells.append("—")
                continue
            accuracy = _mean(recipe_runs, "accuracy")
            gaps.append(best[dataset] - accuracy)
            cells.append(
                f"{accuracy:.3f} / {_mean(recipe_runs, 'nmi'):.3f} / {_mean(recipe_runs, 'experts_used'):.1f}"
            )
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {max(gaps):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="Recipe names (default: all).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default=os.path.join(tempfile.gettempdir(), "defaults_sweep.json"))
    parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "defaults_sweep_cache"))
    parser.add_argument("--data_dir", default=None, help="Real data directory (default: $TRL_MOE_RM_DATA).")
    parser.add_argument("--num_train_epochs", type=float, default=6)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    parser.add_argument("--report", action="store_true", help="Print the tables of --results and exit.")
    args = parser.parse_args(argv)
    if not args.report:
        unknown = [recipe for recipe in args.recipes if recipe not in RECIPES]
        if unknown:
            parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
        run_sweep(
            args.datasets,
            args.recipes,
            args.seeds,
            args.results,
            args.cache_dir,
            args.data_dir,
            args.num_train_epochs,
            args.learning_rate,
        )
    print(markdown_report(read_results(args.results)))


if __name__ == "__main__":
    main()
