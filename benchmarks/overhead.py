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
  optimizer, metrics and logging included). The ratio is `moe / trl` per repeat. On a shared CPU the wall time
  mostly measures the other processes, so the CPU time of the training thread over the same steps
  (`time.thread_time`, with `--threads 1` all the work runs in that thread) is reported too, as
  `cpu_time_throughput_ratio_vs_trl = cpu_step(trl) / cpu_step(moe)`.
- **Memory**: the peak growth of the process's resident set size during `trainer.train()` (RSS sampled every 2 ms by
  a thread, minus the RSS just before `train()`), i.e. activations, gradients, optimizer states and the allocator's
  working set. PyTorch has no allocator statistics for CPU tensors and `tracemalloc` does not see them (they are not
  allocated through Python's allocator), so RSS growth is the meaningful CPU measure; large tensors are `mmap`-ed by
  glibc and returned on free, so it tracks the live tensors closely. Model weights, created before `train()`, are not
  counted: the head adds `2 * K * hidden` parameters, reported separately. The workers run with a fixed glibc mmap
  threshold (`MALLOC_MMAP_THRESHOLD_=131072`) so that freed tensors leave the resident set.

On a GPU (`--device cuda`, see `benchmarks/gpu_throughput.sh`) the memory is the peak growth of
`torch.cuda.max_memory_allocated()` during `train()`, bf16 mixed precision is on, and `--backbone` takes a real
checkpoint (e.g. `Qwen/Qwen2.5-0.5B`; the classifier of the `trl` run is
`AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)`, whose backbone weights are the same).

```bash
python -m benchmarks.overhead --repeats 5 --output benchmarks/results/overhead.json          # trl vs moe (K=8)
python -m benchmarks.overhead --scaling 4 8 16 32 --repeats 3 --output benchmarks/results/scaling.json
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


def build_dataset(
    num_pairs: int, vocab_size: int, seed: int, prompt_len=(16, 32), response_len=(32, 96), low: int = 3, eos: int = 2
):
    """Pre-tokenized pairs: a shared prompt, then two responses whose first tokens differ, each ending with eos."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        prompt = [rng.randrange(low, vocab_size) for _ in range(rng.randint(*prompt_len))]
        chosen = [rng.randrange(low, vocab_size) for _ in range(rng.randint(*response_len))]
        rejected = [rng.randrange(low, vocab_size) for _ in range(rng.randint(*response_len))]
        while rejected[0] == chosen[0]:
            rejected[0] = rng.randrange(low, vocab_size)
        rows.append(
            {
                "chosen_ids": prompt + chosen + [eos],
                "rejected_ids": prompt + rejected + [eos],
                "prompt_length": len(prompt),
            }
        )
    return Dataset.from_list(rows)


class StepClock:
    """Stamps the end of every optimizer step (after a device synchronisation on GPU)."""

    def __init__(self, synchronize=None):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if synchronize is not None:
                    synchronize()
                clock.stamps.append(time.perf_counter())
                clock.cpu_stamps.append(time.thread_time())

        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []  # CPU time of the training thread: insensitive to other processes
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


class CudaPeak:
    """Peak growth of the CUDA allocator's allocated bytes while running (`torch.cuda.max_memory_allocated`)."""

    def __enter__(self) -> "CudaPeak":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def build_models(options: argparse.Namespace, set_seed):
    """`(tokenizer, vocabulary size for the data, backbone factory, classifier factory)`."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
        LlamaModel,
    )

    if options.backbone is None:  # a random Llama: the same weights for both trainers
        config = LlamaConfig(
            vocab_size=options.vocab_size,
            hidden_size=options.hidden_size,
            intermediate_size=options.intermediate_size or options.hidden_size * 8 // 3,
            num_hidden_layers=options.num_layers,
            num_attention_heads=options.num_heads,
            num_key_value_heads=options.num_kv_heads or options.num_heads,
            max_position_embeddings=1024,
            pad_token_id=0,
            num_labels=1,
        )
        set_seed(options.seed)
        backbone = LlamaModel(config)

        def classifier():
            model = LlamaForSequenceClassification(config)
            model.model.load_state_dict(backbone.state_dict())
            return model

        return build_tokenizer(options.vocab_size), options.vocab_size, lambda: backbone, classifier

    dtype = getattr(torch, options.dtype)
    tokenizer = AutoTokenizer.from_pretrained(options.backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Random ids below the tokenizer's base vocabulary: no added special token (pad, chat markers) inside the text.
    vocab_size = min(tokenizer.vocab_size, AutoConfig.from_pretrained(options.backbone).vocab_size)

    def classifier():
        set_seed(options.seed)
        model = AutoModelForSequenceClassification.from_pretrained(options.backbone, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model

    return tokenizer, vocab_size, lambda: AutoModel.from_pretrained(options.backbone, dtype=dtype), classifier


def worker(options: argparse.Namespace) -> dict[str, Any]:
    """One training run in this process; returns its throughput and memory."""
    import torch
    from transformers import set_seed
    from transformers.utils import logging
    from trl import RewardConfig, RewardTrainer

    from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer

    logging.set_verbosity_error()
    torch.set_num_threads(options.threads)
    cuda = options.device == "cuda"
    tokenizer, vocab_size, make_backbone, make_classifier = build_models(options, set_seed)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 2
    dataset = build_dataset(
        options.batch_size * options.steps,
        vocab_size,
        options.seed,
        tuple(options.prompt_len),
        tuple(options.response_len),
        low=3 if options.backbone is None else 100,
        eos=eos,
    )
    common = {
        "output_dir": tempfile.mkdtemp(prefix=f"bench_{options.kind}_"),
        "max_steps": options.steps,
        "per_device_train_batch_size": options.batch_size,
        "learning_rate": 1e-5 if options.backbone else 1e-4,
        "seed": options.seed,
        "data_seed": options.seed,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": cuda and options.bf16,
        "gradient_checkpointing": options.gradient_checkpointing,
        "use_cpu": not cuda,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "max_length": None,
    }
    clock = StepClock(torch.cuda.synchronize if cuda else None)
    if options.kind == "trl":
        model = make_classifier()
        head = getattr(model, "score", None) or model.classifier
        head_parameters = sum(p.numel() for p in head.parameters())
        trainer = RewardTrainer(
            model=model,
            args=RewardConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[clock.callback],
        )
    else:
        set_seed(options.seed)
        routing = {"router_input": options.router_input, "prompt_encoding": options.prompt_encoding}
        model = MoERewardModel.from_backbone(
            make_backbone(),
            num_experts=options.num_experts,
            top_k=options.top_k,
            **{key: value for key, value in routing.items() if value is not None},
        )
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
    with CudaPeak() if cuda else RssSampler() as memory:
        trainer.train()
    stamps = clock.stamps
    measured = stamps[options.warmup_steps - 1 :]
    seconds = measured[-1] - measured[0]
    steps = len(measured) - 1
    cpu_measured = clock.cpu_stamps[options.warmup_steps - 1 :]
    return {
        "kind": options.kind,
        "num_experts": options.num_experts if options.kind == "moe" else None,
        "step_seconds": seconds / steps,
        "pairs_per_second": steps * options.batch_size / seconds,
        "cpu_step_seconds": (cpu_measured[-1] - cpu_measured[0]) / steps,
        "peak_memory_growth_mib": (memory.peak - memory.baseline) / 2**20,
        "baseline_memory_mib": memory.baseline / 2**20,
        "memory_measure": "cuda_max_memory_allocated" if cuda else "process_rss",
        "parameters": sum(p.numel() for p in model.parameters()),
        "head_parameters": head_parameters,
        "final_loss": next((log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
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
    command += ["--threads", str(options.threads), "--device", options.device, "--dtype", options.dtype]
    command += ["--prompt_len", *map(str, options.prompt_len), "--response_len", *map(str, options.response_len)]
    command += ["--bf16", str(options.bf16).lower(), "--gradient_checkpointing", str(options.gradient_checkpointing)]
    if options.backbone is not None:
        command += ["--backbone", options.backbone]
    for name in ("router_input", "prompt_encoding", "num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(options, name) is not None:
            command += [f"--{name}", str(getattr(options, name))]
    # A fixed mmap threshold: glibc then serves every allocation above 128 KiB (all but tiny tensors) with mmap and
    # returns it on free, so the resident set tracks the live tensors instead of the allocator's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"worker failed ({' '.join(command)}):\n{result.stderr[-4000:]}")
    line = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def str_to_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


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
    parser.add_argument("--num_heads", type=int, default=4, help="Attention heads of the random Llama.")
    parser.add_argument("--num_kv_heads", type=int, default=None, help="Key-value heads (default: --num_heads).")
    parser.add_argument("--intermediate_size", type=int, default=None, help="MLP width (default: 8/3 x hidden).")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every worker.")
    parser.add_argument("--prompt_len", type=int, nargs=2, default=[16, 32], help="Min and max prompt tokens.")
    parser.add_argument("--response_len", type=int, nargs=2, default=[32, 96], help="Min and max response tokens.")
    parser.add_argument("--backbone", default=None, help="Hub id or path of a real backbone (default: random Llama).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", default="float32", help="Weights dtype of a --backbone (e.g. bfloat16).")
    parser.add_argument("--bf16", type=str_to_bool, default=True, help="Mixed precision (cuda only).")
    parser.add_argument("--gradient_checkpointing", type=str_to_bool, default=False)
    parser.add_argument("--router_input", choices=["prompt", "sequence"], default=None, help="MoE router input.")
    parser.add_argument(
        "--prompt_encoding",
        choices=["shared", "separate", "separate_no_grad"],
        default=None,
        help="MoE prompt encoding (default: separate for encoders, shared for decoders).",
    )
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
            "cpu_step_seconds": summarize([r["cpu_step_seconds"] for r in trl.values()]),
            "peak_memory_growth_mib": summarize([r["peak_memory_growth_mib"] for r in trl.values()]),
        }
    }
    for _, num_experts in configurations:
        moe = {r["repeat"]: r for r in runs_of("moe", num_experts)}
        summary[f"moe_k{num_experts}"] = {
            "step_seconds": summarize([r["step_seconds"] for r in moe.values()]),
            "peak_memory_growth_mib": summarize([r["peak_memory_growth_mib"] for r in moe.values()]),
            "throughput_ratio_vs_trl": summarize(
                [moe[i]["pairs_per_second"] / trl[i]["pairs_per_second"] for i in moe]
            ),
            "cpu_time_throughput_ratio_vs_trl": summarize(
                [trl[i]["cpu_step_seconds"] / moe[i]["cpu_step_seconds"] for i in moe]
            ),
            "cpu_step_seconds": summarize([r["cpu_step_seconds"] for r in moe.values()]),
            "memory_ratio_vs_trl": summarize(
                [moe[i]["peak_memory_growth_mib"] / trl[i]["peak_memory_growth_mib"] for i in moe]
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
