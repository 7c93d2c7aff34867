"""
Training overhead of [`MoERewardTrainer`] over TRL's `RewardTrainer`, and how the MoE cost scales with `K`.

Both trainers fine-tune the same randomly initialised Llama backbone (by default hidden 256, 4 layers, 4 heads, vocab
4096) on the same pre-tokenized preference pairs (random token ids, a shared prompt of 16-32 tokens and responses of
32-96 tokens), with the same batch size, seed, data order, optimizer and logging interval:

- `trl`: `LlamaForSequenceClassification(num_labels=1)` with `trl.RewardTrainer` (Bradley-Terry on one scalar head);
- `moe`: `MoERewardModel.from_backbone(<the same backbone weights>, num_experts=K, top_k=2)` with `MoERewardTrainer` and
  every regularizer on (local sparsity, switch balance, cosine diversity, router z-loss), full MoE logging included.

Every measurement runs in a fresh subprocess (`--worker`), alternating `trl` / `moe` (which goes first alternates too),
so that neither the allocator state nor the import warm-up of one run leaks into the other.

- **Throughput**: pairs per second over the training steps after `--warmup_steps` (wall time from the end of the
  warm-up step to the end of the last step, as stamped by a `TrainerCallback`: data collation, forward, backward,
  optimizer, metrics and logging included). The ratio is `moe / trl` per repeat.
- **Memory**: the peak growth of the process's resident set size during `trainer.train()` (RSS sampled every 2 ms by
  a thread, minus the RSS just before `train()`), i.e. activations, gradients, optimizer states and the allocator's
  working set. PyTorch has no allocator statistics for CPU tensors and `tracemalloc` does not see them (they are not
  allocated through Python's allocator), so RSS growth is the meaningful CPU measure; large tensors are `mmap`-ed by
  glibc and returned on free, so it tracks the live tensors closely. Model weights, created before `train()`, are not
  counted: the head adds `2 * K * hidden` parameters, reported separately.

```bash
python benchmarks/overhead.py --repeats 5 --output benchmarks/results/overhead.json          # trl vs moe (K=8)
python benchmarks/overhead.py --scaling 4 8 16 32 --repeats 3 --output benchmarks/results/scaling.json
```
"""

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"t{index}": index for index in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_dataset(num_pairs: int, vocab_size: int, seed: int):
    """Pre-tokenized pairs: a shared prompt, then two responses whose first tokens differ, each ending with eos."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(16, 32))]
        chosen = [rng.randrange(3, vocab_size) for _ in range(rng.randint(32, 96))]
        rejected = [rng.randrange(3, vocab_size) for _ in range(rng.randint(32, 96))]
        while rejected[0] == chosen[0]:
            rejected[0] = rng.randrange(3, vocab_size)
        rows.append(
            {
                "chosen_ids": prompt + chosen + [2],
                "rejected_ids": prompt + rejected + [2],
                "prompt_length": len(prompt),
            }
        )
    return Dataset.from_list(rows)


class StepClock:
    """Stamps the end of every optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.stamps.append(time.perf_counter())

        self.stamps: list[float] = []
        self.callback = _Callback()


class RssSampler:
    """Peak resident set size of this process while running, sampled from a thread."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> "RssSampler":
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def worker(options: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its throughput and memory."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, set_seed
    from transformers.utils import logging
    from trl import RewardConfig, RewardTrainer

    from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer

    logging.set_verbosity_error()
    torch.set_num_threads(options.threads)
    tokenizer = build_tokenizer(options.vocab_size)
    num_pairs = options.batch_size * options.steps
    dataset = build_dataset(num_pairs, options.vocab_size, options.seed)
    config = LlamaConfig(
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=options.hidden_size * 8 // 3,
        num_hidden_layers=options.num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
        num_labels=1,
    )
    set_seed(options.seed)
    backbone = LlamaModel(config)
    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench_{options.kind}_"),
        "max_steps": options.steps,
        "per_device_train_batch_size": options.batch_size,
        "learning_rate": 1e-4,
        "seed": options.seed,
        "data_seed": options.seed,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": 512,
    }
    clock = StepClock()
    if options.kind == "trl":
        model = LlamaForSequenceClassification(config)
        model.model.load_state_dict(backbone.state_dict())
        head_parameters = model.score.weight.numel()
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
    else:
        model = MoERewardModel.from_backbone(backbone, num_experts=options.num_experts, top_k=options.top_k)
        head_parameters = sum(p.numel() for p in model.router.parameters()) + sum(
            p.numel() for p in model.experts.parameters()
        )
        trainer = MoERewardTrainer(
            model=model,
            args=MoERewardConfig(
                **common,
                num_experts=options.num_experts,
                top_k=options.top_k,
                sparsity_coef=0.01,
                balance_coef=0.01,
                balance_type="switch",
                diversity_coef=0.01,
                diversity_type="cosine",
                router_z_loss_coef=1e-3,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
    with RssSampler() as rss:
        trainer.train()
    stamps = clock.stamps
    measured = stamps[options.warmup_steps - 1 :]
    seconds = measured[-1] - measured[0]
    steps = len(measured) - 1
    return {
        "kind": options.kind,
        "num_experts": options.num_experts if options.kind == "moe" else None,
        "step_seconds": seconds / steps,
        "pairs_per_second": steps * options.batch_size / seconds,
        "peak_rss_growth_mib": (rss.peak - rss.baseline) / 2**20,
        "baseline_rss_mib": rss.baseline / 2**20,
        "parameters": sum(p.numel() for p in model.parameters()),
        "head_parameters": head_parameters,
        "final_loss": next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None),
    }


def spawn(options: argparse.Namespace, kind: str, num_experts: int) -> dict[str, Any]:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--kind",
        kind,
        "--num_experts",
        str(num_experts),
    ]
    for name in ("top_k", "batch_size", "steps", "warmup_steps", "hidden_size", "num_layers", "vocab_size", "seed"):
        command += [f"--{name}", str(getattr(options, name))]
    command += ["--threads", str(options.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--scaling", type=int, nargs="*", default=None, help="Measure these K (with a trl baseline).")
    parser.add_argument("--batch_size", type=int, default=8, help="Pairs per step (2x sequences).")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup_steps", type=int, default=5)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=["trl", "moe"], default="moe", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)

    if options.worker:
        print("RESULT " + json.dumps(worker(options)), flush=True)
        return None

    configurations = [("moe", k) for k in options.scaling] if options.scaling else [("moe", options.num_experts)]
    runs: list[dict[str, Any]] = []
    for repeat in range(options.repeats):
        order = [("trl", 0)] + configurations
        if repeat % 2:
            order = order[::-1]  # alternate which kind runs first
        for kind, num_experts in order:
            result = spawn(options, kind, num_experts)
            result["repeat"] = repeat
            runs.append(result)
            print(json.dumps(result), flush=True)

    def runs_of(kind: str, num_experts: int | None = None) -> list[dict[str, Any]]:
        return [r for r in runs if r["kind"] == kind and (num_experts is None or r["num_experts"] == num_experts)]

    trl = {r["repeat"]: r for r in runs_of("trl")}
    summary: dict[str, Any] = {
        "trl": {
            "step_seconds": summarize([r["step_seconds"] for r in trl.values()]),
            "peak_rss_growth_mib": summarize([r["peak_rss_growth_mib"] for r in trl.values()]),
        }
    }
    for _, num_experts in configurations:
        moe = {r["repeat"]: r for r in runs_of("moe", num_experts)}
        summary[f"moe_k{num_experts}"] = {
            "step_seconds": summarize([r["step_seconds"] for r in moe.values()]),
            "peak_rss_growth_mib": summarize([r["peak_rss_growth_mib"] for r in moe.values()]),
            "throughput_ratio_vs_trl": summarize(
                [moe[i]["pairs_per_second"] / trl[i]["pairs_per_second"] for i in moe]
            ),
            "memory_ratio_vs_trl": summarize(
                [moe[i]["peak_rss_growth_mib"] / trl[i]["peak_rss_growth_mib"] for i in moe]
            ),
            "head_parameters": next(iter(moe.values()))["head_parameters"],
            "parameters": next(iter(moe.values()))["parameters"],
        }
    summary["trl"]["parameters"] = next(iter(trl.values()))["parameters"]
    report = {
        "config": {k: v for k, v in vars(options).items() if k not in ("worker", "kind", "output")},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "summary": summary,
        "runs": runs,
    }
    print(json.dumps(summary, indent=2))
    if options.output:
        os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
        with open(options.output, "w") as file:
            json.dump(report, file, indent=2)
    return report


if __name__ == "__main__":
    main()
