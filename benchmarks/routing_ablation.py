"""
Ablation of the routing remedies on the controlled data (frozen all-MiniLM-L6-v2 features, cached once).

Each configuration trains a MoE head with `MoERewardTrainer(freeze_backbone=True, cache_features=True)` for several
seeds and reports held-out accuracy, accuracy on the conflicting pairs, routing NMI / purity against the hidden
category and the expert-attribute specialization (mean and min-max over seeds; the data seed is fixed at 0).

    python -m benchmarks.routing_ablation --num_pairs_per_category 400 --seeds 0 1 2
"""

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch
from transformers import AutoTokenizer, PrinterCallback
from transformers.utils import logging

from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
from trl_moe_rm.data.controlled import ATTRIBUTES, make_controlled_dataset, train_test_split_by_prompt
from trl_moe_rm.demo import minilm_path
from trl_moe_rm.report import analysis_report
from trl_moe_rm.scoring import scores_from_features


# The former defaults (sparse router gradient, switch balance 0.01), which every row below modifies.
BASE = {"num_experts": 8, "top_k": 2, "router_gradient": "sparse", "balance_coef": 0.01, "balance_type": "switch"}
ENTROPY = {"balance_coef": 0.1, "balance_type": "entropy"}
STRAIGHT_THROUGH = {**ENTROPY, "router_gradient": "dense"}
CONFIGS: dict[str, dict] = {
    "dense (top_k=K)": {"top_k": 8, "balance_coef": 0.0},
    "dense, likelihood mixture (MiCRo form)": {"top_k": 8, "balance_coef": 0.0, "loss_type": "likelihood_mixture"},
    "top-2, switch balance 0.01": {},
    "top-1, switch balance 0.01": {"top_k": 1},
    "top-2, switch balance 0.1": {"balance_coef": 0.1},
    "top-2, entropy balance 0.1": ENTROPY,
    "  + local sparsity 0.001": {**ENTROPY, "sparsity_coef": 0.001},
    "  + local sparsity 0.01": {**ENTROPY, "sparsity_coef": 0.01},
    "  + cosine diversity 0.1": {**ENTROPY, "diversity_coef": 0.1},
    "  + redundancy diversity 0.1": {**ENTROPY, "diversity_coef": 0.1, "diversity_type": "redundancy"},
    "  + correlation diversity 0.1": {**ENTROPY, "diversity_coef": 0.1, "diversity_type": "correlation"},
    "  + correlation diversity 0.03": {**ENTROPY, "diversity_coef": 0.03, "diversity_type": "correlation"},
    "  + noisy gating (std 0.5)": {**ENTROPY, "router_noise_std": 0.5},
    "  + router lr x10": {**ENTROPY, "router_learning_rate": 0.2},
    "  + assignment loss (tau 0.5)": {**ENTROPY, "loss_type": "assignment"},
    "  + dense router gradient (straight-through)": STRAIGHT_THROUGH,
    "top-1, entropy balance 0.1": {**ENTROPY, "top_k": 1},
    "top-1, entropy balance 0.1 + dense router gradient": {**STRAIGHT_THROUGH, "top_k": 1},
    "demo `sparse_moe_no_diversity`": {**STRAIGHT_THROUGH, "sparsity_coef": 0.001},
    "demo `sparse_moe`": {
        **STRAIGHT_THROUGH,
        "sparsity_coef": 0.001,
        "diversity_coef": 0.03,
        "diversity_type": "correlation",
    },
}
MODEL_KEYS = ("num_experts", "top_k", "router_noise_std", "router_gradient")
METRICS = ("accuracy", "conflict_accuracy", "nmi", "purity", "specialization")


def run(settings, split, tokenizer, backbone, seed, epochs, learning_rate, cache_dir):
    settings = {**BASE, **settings}
    model_kwargs = {key: settings.pop(key) for key in MODEL_KEYS if key in settings}
    torch.manual_seed(seed)
    model = MoERewardModel.from_backbone(backbone, **model_kwargs)
    with tempfile.TemporaryDirectory() as output_dir:
        args = MoERewardConfig(
            output_dir=output_dir,
            num_train_epochs=epochs,
            learning_rate=learning_rate,
            per_device_train_batch_size=32,
            seed=seed,
            data_seed=seed,
            save_strategy="no",
            report_to="none",
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            disable_tqdm=True,
            logging_steps=50,
            freeze_backbone=True,
            cache_features=True,
            feature_cache_dir=cache_dir,
            router_z_loss_coef=1e-3,
            **settings,
        )
        trainer = MoERewardTrainer(
            model=model,
            args=args,
            train_dataset=split["train"],
            eval_dataset=split["test"],
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        scores = scores_from_features(trainer.model, trainer.cached_features(trainer.eval_dataset))
    report = analysis_report(scores, split["test"], metrics=list(METRICS), attribute_names=ATTRIBUTES)
    return {key: report[key] for key in METRICS}


def _cell(runs: list[dict], key: str) -> str:
    values = np.array([r[key] for r in runs])
    return f"{values.mean():.3f} ({values.min():.2f}–{values.max():.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_pairs_per_category", type=int, default=400)
    parser.add_argument("--num_train_epochs", type=float, default=6)
    parser.add_argument("--learning_rate", type=float, default=2e-2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cache_dir", default=None, help="Feature cache (default: a temporary directory).")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these configuration names.")
    args = parser.parse_args()
    logging.set_verbosity_error()
    backbone = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    data = make_controlled_dataset(num_pairs_per_category=args.num_pairs_per_category, seed=0)
    split = train_test_split_by_prompt(data, test_size=0.25, seed=0)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="moe-features-")
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"train {len(split['train'])} pairs, test {len(split['test'])}; seeds {args.seeds}"
    )
    print("| configuration | accuracy | conflict accuracy | routing NMI | purity | specialization |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, settings in CONFIGS.items():
        if args.only and name.strip() not in [o.strip() for o in args.only]:
            continue
        start = time.perf_counter()
        runs = [
            run(dict(settings), split, tokenizer, backbone, seed, args.num_train_epochs, args.learning_rate, cache_dir)
            for seed in args.seeds
        ]
        results[name] = runs

        cells = " | ".join(_cell(runs, key) for key in METRICS)
        print(f"| {name} | {cells} |  <!-- {time.perf_counter() - start:.0f} s -->", flush=True)
    print(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
