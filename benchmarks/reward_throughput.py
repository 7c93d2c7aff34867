"""
Scoring throughput of [`PersonalizedReward`] against the same backbone used as a plain sequence-classification reward
model, the way TRL's RLOO / GRPO trainers score completions with an `nn.Module` reward.

Both sides score the same completions of the same prompts, in the same process, with the same backbone weights (a
randomly initialised Llama, by default hidden 256, 4 layers, 4 heads, vocab 4096) and the same batch:

- `plain`: `LlamaForSequenceClassification(num_labels=1)`, scored as TRL's `_calculate_rewards` does for an
  `nn.Module`: the `prompt + completion` texts are tokenized together (right padding, no special tokens), one forward
  pass under `torch.inference_mode()`, `logits[:, 0]`;
- `personalized`: `PersonalizedReward(MoERewardModel.from_backbone(<the same backbone>, num_experts=K, top_k=2), ...)`
  called with TRL's signature and a `user_id` column mixing `--num_users` users with profiles (half static, half
  routed) and one unknown user (default routing): tokenization of prompt and completion apart, `prompt_lengths`,
  the router on the prompt, the K expert heads and the per-user mixture included. Its `batch_size` equals the number
  of completions per call, so both sides run one forward pass over the same rows.

The two are timed alternately, batch by batch (which goes first alternates too), for `--repeats` rounds after `--warmup`
rounds; each round scores `--calls` batches of `--batch_size` completions on both sides. The reported ratio is the
median over rounds of `personalized throughput / plain throughput` (completions per second).

```bash
python -m benchmarks.reward_throughput --repeats 9 --output docs/_bench_reward_throughput.md
```
"""

import argparse
import os
import platform
import random
import statistics
import textwrap
import time
from typing import Any

import torch


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{f"t{index}": index for index in range(3, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def build_batches(args: argparse.Namespace) -> list[dict[str, list]]:
    """`calls` batches of TRL reward-function inputs: groups of `num_generations` completions per prompt."""
    rng = random.Random(args.seed)
    users = [f"user{index}" for index in range(args.num_users)] + ["unknown"]

    def text(low: int, high: int) -> str:
        return " ".join(f"t{rng.randrange(3, args.vocab_size)}" for _ in range(rng.randint(low, high)))

    batches = []
    for _ in range(args.calls):
        prompts, completions, user_ids = [], [], []
        for _ in range(args.batch_size // args.num_generations):
            prompt, user = text(16, 32), rng.choice(users)
            for _ in range(args.num_generations):
                prompts.append(prompt)
                completions.append(" " + text(32, 96))
                user_ids.append(user)
        batches.append({"prompts": prompts, "completions": completions, "user_id": user_ids})
    return batches


def build_models(args: argparse.Namespace, tokenizer) -> tuple[Any, Any]:
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel

    from trl_moe_rm import MoERewardModel, PersonalizedReward, UserProfile
    from trl_moe_rm.configuration_moe_reward import config_fingerprint

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    torch.manual_seed(args.seed)
    backbone = LlamaModel(config).eval()
    plain = LlamaForSequenceClassification(config).eval()
    plain.model.load_state_dict(backbone.state_dict())
    moe = MoERewardModel.from_backbone(backbone, num_experts=args.num_experts, top_k=2).eval()

    fingerprint = config_fingerprint(moe.config)
    generator = torch.Generator().manual_seed(args.seed)
    profiles = {}
    for index in range(args.num_users):
        weights = torch.rand(args.num_experts, generator=generator, dtype=torch.float64)
        mode = "static" if index % 2 == 0 else "routed"
        profiles[f"user{index}"] = UserProfile(
            f"user{index}", (weights / weights.sum()).tolist(), mode=mode, config_hash=fingerprint
        )
    reward = PersonalizedReward(moe, profiles, tokenizer=tokenizer, batch_size=args.batch_size, device="cpu")
    return plain, reward


def score_plain(model, tokenizer, batch: dict[str, list]) -> list[float]:
    """TRL's `nn.Module` reward path (`RLOOTrainer._calculate_rewards` / `GRPOTrainer._calculate_rewards`)."""
    texts = [prompt + completion for prompt, completion in zip(batch["prompts"], batch["completions"])]
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].tolist()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def markdown(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> str:
    command = (
        f"python -m benchmarks.reward_throughput --repeats {args.repeats} --batch_size {args.batch_size} "
        f"--calls {args.calls}"
        + (f" --threads {args.threads}" if args.threads else "")
        + " --output docs/_bench_reward_throughput.md"
    )
    setup = (
        f"Completions scored per second by `PersonalizedReward` (MoE reward model, {args.num_experts} experts top-2, "
        f"{args.num_users} users with profiles, half static and half routed, plus one unknown user) and by the same "
        "backbone used as a plain `LlamaForSequenceClassification` reward model, scored the way TRL's RLOO / GRPO "
        "trainers score an `nn.Module` reward. Same process, same backbone weights (random Llama: hidden "
        f"{args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, vocab {args.vocab_size}), same batches "
        f"of {args.batch_size} completions ({args.num_generations} per prompt, prompts of 16-32 tokens, completions of "
        f"32-96 tokens), one forward pass per batch on both sides, timed alternately batch by batch: {args.repeats} "
        f"rounds of {args.calls} batches after {args.warmup} warm-up round(s)."
    )
    machine_line = (
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads, torch {info['torch']}, "
        f"Python {info['python']}. The 1-minute load average was {info.get('load_average_1min', 'n/a')} when the run "
        "ended: the cores were shared with other jobs, which slows both sides alike and spreads the per-round ratios."
    )
    table = "\n".join(
        [
            "| | completions / s (median) |",
            "| --- | --- |",
            f"| plain `LlamaForSequenceClassification` | {results['plain_median']:.1f} |",
            f"| `PersonalizedReward` | {results['personalized_median']:.1f} |",
            f"| **ratio personalized / plain** (median of the per-round ratios) | **{results['ratio_median']:.3f}** "
            f"(min {results['ratio_min']:.3f}, max {results['ratio_max']:.3f}) |",
        ]
    )
    parts = [
        "## Scoring throughput of `PersonalizedReward` (RL rewards)",
        textwrap.fill(setup, 119),
        table,
        textwrap.fill(machine_line, 119),
        f"```bash\n{command}\n```",
    ]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--num_users", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=64, help="completions per reward call (and per forward)")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--calls", type=int, default=4, help="reward calls per timed round")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output", help="write the results as a markdown section to this file")
    args = parser.parse_args()
    if args.batch_size % args.num_generations:
        parser.error("--batch_size must be a multiple of --num_generations")

    tokenizer = build_tokenizer(args.vocab_size)
    plain, reward = build_models(args, tokenizer)
    batches = build_batches(args)
    runners = {
        "plain": lambda batch: score_plain(plain, tokenizer, batch),
        "personalized": lambda batch: reward(**batch),
    }
    if args.threads:
        torch.set_num_threads(args.threads)
    for _ in range(args.warmup):
        for run in runners.values():
            for batch in batches:
                run(batch)

    throughput: dict[str, list[float]] = {"plain": [], "personalized": []}
    for round_index in range(args.repeats):
        # Interleaved batch by batch (which side goes first alternates), so that both see the same machine load.
        seconds = {"plain": 0.0, "personalized": 0.0}
        completions = 0
        for batch_index, batch in enumerate(batches):
            order = ["plain", "personalized"] if (round_index + batch_index) % 2 == 0 else ["personalized", "plain"]
            for name in order:
                start = time.perf_counter()
                runners[name](batch)
                seconds[name] += time.perf_counter() - start
            completions += len(batch["prompts"])
        for name in throughput:
            throughput[name].append(completions / seconds[name])
        print(
            f"round {round_index}: plain {throughput['plain'][-1]:.1f}/s, personalized "
            f"{throughput['personalized'][-1]:.1f}/s, ratio {throughput['personalized'][-1] / throughput['plain'][-1]:.3f}"
        )
    ratios = [mine / base for mine, base in zip(throughput["personalized"], throughput["plain"])]
    results = {
        "plain_median": statistics.median(throughput["plain"]),
        "personalized_median": statistics.median(throughput["personalized"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "fallback_rows": reward.num_fallbacks,
    }
    info = machine()
    print("machine:", info)
    print("results:", results)
    if args.output:
        with open(args.output, "w") as file:
            file.write(markdown(args, info, results))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
