r"""
The demo's single-head baseline two ways, side by side on the demo's data: TRL's own `RewardTrainer` (the frozen
MiniLM in the loop at every step; its pooler and linear head train) against the demo's single head (one Bradley-Terry
head, `num_experts=1`, trained by `MoERewardTrainer` on the cached frozen features). `make demo` uses the second, which
is many times faster; this script shows that the comparison the demo draws does not depend on that choice: it prints
both heads' test and conflict accuracy next to the demo's sparse MoE check (conflict accuracy at least 0.15 above the
single head).

Usage:

```bash
python -m benchmarks.single_head --output_dir /tmp/single_head_bench [--quick]
```
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback, set_seed
from trl import RewardConfig, RewardTrainer

from trl_moe_rm.data.controlled import ATTRIBUTES, make_controlled_dataset, train_test_split_by_prompt
from trl_moe_rm.demo import DemoConfig, _common_args, _train_moe, minilm_path
from trl_moe_rm.report import analysis_report
from trl_moe_rm.scoring import PairScores, score, scores_from_features


def train_trl_single_head(config: DemoConfig, output_dir: Path, backbone: str, tokenizer, split) -> tuple[PairScores, float]:
    """TRL's `RewardTrainer` on the frozen backbone (only the pooler and the linear head train)."""
    set_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("classifier", "score", "bert.pooler"))
    args = _common_args(config, output_dir, "trl_single_head")
    args["eos_token"] = tokenizer.eos_token or tokenizer.sep_token
    start = time.perf_counter()
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**args),
        train_dataset=split["train"].select_columns(["prompt", "chosen", "rejected"]),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds = time.perf_counter() - start
    test = split["test"]
    model.eval()
    rewards = {}
    for column in ("chosen", "rejected"):
        # TRL's RewardTrainer trains on prompt + response + eos as one text.
        texts = [prompt + response + args["eos_token"] for prompt, response in zip(test["prompt"], test[column])]
        values = []
        with torch.inference_mode():
            for start in range(0, len(texts), 64):
                batch = tokenizer(texts[start : start + 64], padding=True, return_tensors="pt").to(model.device)
                values.append(model(**batch).logits[:, 0].float().cpu())
        rewards[column] = torch.cat(values).numpy().astype(np.float64)
    ones = np.ones((len(test), 1))
    return PairScores.from_expert_rewards(rewards["chosen"][:, None], rewards["rejected"][:, None], ones), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="/tmp/single_head_bench")
    parser.add_argument("--quick", action="store_true", help="The demo's quick sizes (for a smoke run).")
    parser.add_argument("--seed", type=int, default=0)
    cli = parser.parse_args()
    config = DemoConfig(output_dir=cli.output_dir, quick=cli.quick, seed=cli.seed)
    output_dir = Path(cli.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    backbone = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    data = make_controlled_dataset(num_pairs_per_category=config.num_pairs_per_category, seed=config.seed)
    split = train_test_split_by_prompt(data, test_size=0.25, seed=config.seed)
    metrics = ["accuracy", "conflict_accuracy"]
    rows = {}
    scores, seconds = train_trl_single_head(config, output_dir, backbone, tokenizer, split)
    rows["trl_reward_trainer"] = {**analysis_report(scores, split["test"], metrics=metrics), "seconds": seconds}
    for name in ("single_head", "sparse_moe"):
        trainer, seconds = _train_moe(name, config, output_dir, backbone, tokenizer, split)
        scores = scores_from_features(trainer.model, trainer.cached_features(trainer.eval_dataset))
        rows[name] = {**analysis_report(scores, split["test"], metrics=metrics), "seconds": seconds}
        if name == "single_head":  # the public scoring call gives the cached head's rewards from text too
            text = score(trainer.model, tokenizer, split["test"]["prompt"][:4], split["test"]["chosen"][:4])
            assert np.allclose(text.numpy(), scores.chosen_rewards[:4], atol=1e-4)
    sparse_conflict = rows["sparse_moe"]["conflict_accuracy"]
    for name in ("trl_reward_trainer", "single_head"):
        rows[name]["sparse_conflict_check_passes"] = sparse_conflict >= rows[name]["conflict_accuracy"] + 0.15
    print(f"{'model':<20} {'accuracy':>9} {'conflict':>9} {'seconds':>9}  sparse check")
    for name, row in rows.items():
        check = row.get("sparse_conflict_check_passes", "")
        print(f"{name:<20} {row['accuracy']:>9.3f} {row['conflict_accuracy']:>9.3f} {row['seconds']:>9.1f}  {check}")
    print(f"speed ratio (TRL / cached head): {rows['trl_reward_trainer']['seconds'] / rows['single_head']['seconds']:.1f}x")
    (output_dir / "single_head.json").write_text(json.dumps({"models": rows, "attributes": list(ATTRIBUTES)}, indent=2))


if __name__ == "__main__":
    main()
