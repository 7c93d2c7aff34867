"""
End-to-end proof that `PersonalizedReward` personalizes online RL with TRL (RLOO, GRPO, RLOO under DeepSpeed ZeRO-3).

The reward model is built by hand so that the two users' rewards are known exactly: a `MoERewardModel` whose backbone
(a tiny Llama with its attention and MLP outputs zeroed) maps every word token to the same unit direction and every
special token to another, so that the mean-pooled feature is the share of word tokens in the sequence, a strictly
increasing function of the completion length for a fixed prompt length. Expert 0 scores `-a * (share - c)` (short is
good), expert 1 scores `+a * (share - c)` (long is good). User A's profile is one-hot on expert 0, user B's on
expert 1. The policy is a tiny random Llama whose prompts end with the user's tag ("alpha" for A, "beta" for B).

Wall times on the development machine (2 CPU cores shared with other jobs, one torch thread): RLOO ~4 s, GRPO ~1 s,
each recipe ~1 s, ZeRO-3 launch ~31 s.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny import WORDS, tiny_llama_config, tiny_tokenizer
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from trl_moe_rm import MoERewardModel, MoERewardModelConfig, PersonalizedReward, ProfileStore, UserProfile
from trl_moe_rm.configuration_moe_reward import config_fingerprint


REPO = Path(__file__).resolve().parents[1]
TAGS = {"A": "alpha", "B": "beta"}
TOPICS = WORDS[30:]
TRAIN_TOPICS, HELD_OUT_TOPICS = TOPICS[:14], TOPICS[14:20]
MAX_COMPLETION_LENGTH = 8
LENGTH_SCALE, LENGTH_CENTER = 10.0, 0.8
TIMES: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------------------- helpers
def length_reward_model(tokenizer: PreTrainedTokenizerBase) -> MoERewardModel:
    """Two experts scoring `-/+ LENGTH_SCALE * (share of word tokens - LENGTH_CENTER)`: short vs long answers."""
    config = MoERewardModelConfig(
        backbone_config=tiny_llama_config(len(tokenizer)), num_experts=2, top_k=2, pooling="mean"
    )
    config.name_or_path = "length-moe"
    torch.manual_seed(0)
    model = MoERewardModel(config)
    hidden_size = config.hidden_size
    special = set(tokenizer.all_special_ids)
    with torch.no_grad():
        for layer in model.backbone.layers:  # every block adds nothing: the output is the normalized embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.backbone.embed_tokens.weight
        embeddings.zero_()
        for token_id in range(len(tokenizer)):
            embeddings[token_id, 1 if token_id in special else 0] = 1.0
        model.backbone.norm.weight.fill_(1.0)
        # After RMSNorm a one-hot embedding is sqrt(H) e_i: the mean-pooled feature 0 is sqrt(H) * share of words.
        model.experts.weight.zero_()
        model.experts.weight[0, 0] = -LENGTH_SCALE / math.sqrt(hidden_size)
        model.experts.weight[1, 0] = LENGTH_SCALE / math.sqrt(hidden_size)
        model.experts.bias.copy_(torch.tensor([LENGTH_SCALE * LENGTH_CENTER, -LENGTH_SCALE * LENGTH_CENTER]))
    return model.eval()


def length_profiles(model: MoERewardModel) -> dict[str, UserProfile]:
    fingerprint = config_fingerprint(model.config)
    return {
        "A": UserProfile("A", [1.0, 0.0], config_hash=fingerprint),  # short answers
        "B": UserProfile("B", [0.0, 1.0], config_hash=fingerprint),  # long answers
    }


def suppressed_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the policy must not sample (eos stays allowed: it ends the completion)."""
    return [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id] + tokenizer.convert_tokens_to_ids(
        ["[CLS]", "[SEP]"]
    )


def tagged_policy(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """
    A tiny random Llama policy whose completions end at eos after ~4-5 tokens on average (a shared embedding component
    read by the eos row of the head), and whose two user tags differ along one embedding direction.
    """
    torch.manual_seed(seed)
    policy = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    alpha, beta = tokenizer.convert_tokens_to_ids([TAGS["A"], TAGS["B"]])
    with torch.no_grad():
        policy.model.embed_tokens.weight[:, 0] = 0.05
        policy.lm_head.weight[tokenizer.eos_token_id, 0] = 1.0
        policy.model.embed_tokens.weight[alpha, 1] = 0.05
        policy.model.embed_tokens.weight[beta, 1] = -0.05
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.generation_config.bos_token_id = tokenizer.bos_token_id
    return policy


def prompt_for(user: str, topic: str) -> str:
    """The prompt of a user ends with the user's tag; users without a profile get "gamma"."""
    return f"tell me about {topic} {TAGS.get(user, 'gamma')}"


def user_dataset(topics, users=("A", "B")) -> Dataset:
    return Dataset.from_list(
        [{"prompt": prompt_for(user, topic), "user_id": user} for user in users for topic in topics]
    )


@torch.no_grad()
def sample_completions(policy, tokenizer, prompts: list[str], num_samples: int, seed: int) -> list[str]:
    torch.manual_seed(seed)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    outputs = policy.generate(
        **inputs,
        max_new_tokens=MAX_COMPLETION_LENGTH,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        suppress_tokens=suppressed_tokens(tokenizer),
        num_return_sequences=num_samples,
    )
    return tokenizer.batch_decode(outputs[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def held_out_stats(policy, tokenizer, reward: PersonalizedReward, num_samples: int = 8, seed: int = 1) -> dict:
    """Per user: mean personalized reward and mean length (in words) of sampled completions on held-out prompts."""
    was_training = policy.training
    policy.eval()
    stats = {}
    for user in TAGS:
        prompts = [prompt_for(user, topic) for topic in HELD_OUT_TOPICS]
        completions = sample_completions(policy, tokenizer, prompts, num_samples, seed)
        repeated = [prompt for prompt in prompts for _ in range(num_samples)]
        rewards = reward(prompts=repeated, completions=completions, user_id=[user] * len(completions))
        stats[user] = {
            "reward": sum(rewards) / len(rewards),
            "length": sum(len(text.split()) for text in completions) / len(completions),
        }
    policy.train(was_training)
    return stats


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and do not fight over the cores of a busy CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def reward_model(tokenizer):
    return length_reward_model(tokenizer)


def test_the_hand_built_experts_score_length(reward_model, tokenizer):
    """Sanity check of the construction: A's reward falls and B's rises with every extra completion token."""
    reward = PersonalizedReward(reward_model, length_profiles(reward_model), tokenizer=tokenizer)
    completions = [" ".join(["cat"] * n) for n in range(MAX_COMPLETION_LENGTH + 1)]
    prompts = [prompt_for("A", "dog")] * len(completions)
    short = reward(prompts=prompts, completions=completions, user_id=["A"] * len(completions))
    long = reward(prompts=prompts, completions=completions, user_id=["B"] * len(completions))
    assert all(later < earlier for earlier, later in zip(short, short[1:])), short
    assert long == pytest.approx([-value for value in short], abs=1e-5)
    assert short[0] > 0.5 and short[-1] < -0.5


# ------------------------------------------------------------------------------------------------------------ RLOO
@pytest.mark.slow
def test_rloo_personalizes_each_user(reward_model, tokenizer, tmp_path):
    from trl import RLOOConfig, RLOOTrainer

    start = time.perf_counter()
    reward = PersonalizedReward(reward_model, length_profiles(reward_model), tokenizer=tokenizer)
    policy = tagged_policy(tokenizer, seed=0)
    before = held_out_stats(policy, tokenizer, reward)
    args = RLOOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        num_generations=4,
        max_completion_length=MAX_COMPLETION_LENGTH,
        learning_rate=3e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=2,
        beta=0.0,
        max_steps=12,
        temperature=1.0,
        top_k=0,
        generation_kwargs={"suppress_tokens": suppressed_tokens(tokenizer)},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = RLOOTrainer(
        model=policy,
        reward_funcs=reward,
        args=args,
        train_dataset=user_dataset(TRAIN_TOPICS),
        processing_class=tokenizer,
    )
    trainer.train()
    after = held_out_stats(policy, tokenizer, reward)
    TIMES["rloo"] = time.perf_counter() - start
    print(f"RLOO: before {before}, after {after}, {TIMES['rloo']:.1f}s")

    # Each user's reward on held-out prompts rose, and the policy answers A short and B long.
    assert after["A"]["reward"] > before["A"]["reward"] + 0.3, (before, after)
    assert after["B"]["reward"] > before["B"]["reward"] + 0.2, (before, after)
    assert after["A"]["length"] + 3 < after["B"]["length"], after
    assert after["A"]["length"] < before["A"]["length"] - 2 and after["B"]["length"] > before["B"]["length"] + 1.5
    # The per-user metrics were logged at every step, and no user fell back to the default routing.
    steps = [entry for entry in trainer.state.log_history if "personalized_reward/fallbacks" in entry]
    assert len(steps) == 12 and all(entry["personalized_reward/fallbacks"] == 0 for entry in steps)
    for user in TAGS:  # 8 of the 28 prompts per step: both users show up in nearly every step
        assert sum(f"personalized_reward/user/{user}" in entry for entry in steps) >= 10
    assert reward.num_fallbacks == 0


# ------------------------------------------------------------------------------------------------------------ GRPO
@pytest.mark.slow
def test_grpo_logs_per_user_metrics(reward_model, tokenizer, tmp_path):
    """The same callable in GRPO, next to `for_user(profile)` as an nn.Module reward; user C has no profile."""
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()
    profiles = length_profiles(reward_model)
    reward = PersonalizedReward(reward_model, profiles, tokenizer=tokenizer, name="user_length")
    user_model = reward_model.for_user(profiles["A"])
    dataset = user_dataset(TRAIN_TOPICS[:4], users=("A", "B")).add_item(
        {"prompt": prompt_for("C", "cat"), "user_id": "C"}
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=12,
        num_generations=4,
        max_completion_length=MAX_COMPLETION_LENGTH,
        learning_rate=1e-3,
        max_steps=3,
        reward_weights=[1.0, 0.0],
        generation_kwargs={"suppress_tokens": suppressed_tokens(tokenizer)},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=tagged_policy(tokenizer),
        reward_funcs=[reward, user_model],
        reward_processing_classes=[None, tokenizer],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    TIMES["grpo"] = time.perf_counter() - start

    logs = [entry for entry in trainer.state.log_history if "rewards/user_length/mean" in entry]
    assert len(logs) == 3
    seen_users = {key.rsplit("/", 1)[-1] for entry in logs for key in entry if key.startswith("user_length/user/")}
    assert seen_users == {"A", "B", "C"}  # all users of the 9 prompts appear over 3 steps of 3 prompts
    for entry in logs:
        assert "user_length/fallbacks" in entry
        assert all(math.isfinite(value) for key, value in entry.items() if key.startswith("user_length/"))
        assert math.isfinite(entry["rewards/length-moe/mean"])  # the nn.Module reward ran too
    # User C's rows (4 completions of 1 prompt) fell back to the default routing, and were logged as such.
    assert reward.num_fallbacks == 4 and reward.fallbacks_by_user == {"C": 4}
    assert sum(entry["user_length/fallbacks"] for entry in logs) > 0


# ---------------------------------------------------------------------------------------------------- ZeRO-3 (RLOO)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PROBE_ROWS = [
    ("A", "cat", ""),
    ("B", "dog", "one two three"),
    ("A", "sun", "one two three four five"),
    ("Z", "moon", "a"),
]


@pytest.mark.slow
@pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed (pip install 'trl-moe-rm[deepspeed]')")
def test_rloo_runs_under_deepspeed_zero3(reward_model, tokenizer, tmp_path):
    """
    Two CPU processes, `trl_moe_rm/accelerate_configs/cpu_zero3.yaml` (`zero3_init_flag: true`). The worker loads the reward
    model after creating `RLOOConfig`, so `from_pretrained` builds it partitioned inside `deepspeed.zero.Init`;
    `PersonalizedReward` gathers it back and scores as the unpartitioned model does, then RLOO trains 3 steps.
    """
    inputs = tmp_path / "inputs"
    reward_model.save_pretrained(inputs / "reward_model")
    tokenizer.save_pretrained(inputs / "reward_model")
    store = ProfileStore(inputs / "store")
    store.save_many(list(length_profiles(reward_model).values()))
    store.save_pretrained(inputs / "reward_model")
    policy = tagged_policy(tokenizer)
    policy.save_pretrained(inputs / "policy")
    tokenizer.save_pretrained(inputs / "policy")
    user_dataset(TRAIN_TOPICS[:8]).to_json(str(inputs / "prompts.jsonl"))
    probe = {
        "prompts": [prompt_for("A" if user == "Z" else user, topic) for user, topic, _ in PROBE_ROWS],
        "completions": [completion for _, _, completion in PROBE_ROWS],
        "user_id": [user for user, _, _ in PROBE_ROWS],
    }
    (inputs / "probe.json").write_text(json.dumps(probe))
    expected = PersonalizedReward(reward_model, length_profiles(reward_model), tokenizer=tokenizer)(**probe)

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "trl_moe_rm" / "accelerate_configs" / "cpu_zero3.yaml"),
        "--main_process_port", str(_free_port()),
        str(REPO / "tests" / "rl_zero3_worker.py"), "--inputs", str(inputs), "--output_dir", str(out),
    ]  # fmt: skip
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    TIMES["zero3"] = time.perf_counter() - start
    if result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}")
    records = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}

    for rank, record in records.items():
        assert record["world_size"] == 2 and record["zero_stage"] == 3, record
        assert record["policy_partitioned"], "the policy is not partitioned: DeepSpeed ZeRO-3 was not used"
        # Loaded inside zero.Init, the reward model was partitioned; PersonalizedReward gathered it into full copies.
        assert record["reward_partitioned_on_load"] and not record["reward_partitioned_after"], record
        assert record["probe_scores"] == pytest.approx(expected, abs=1e-5), (rank, record["probe_scores"], expected)
        assert record["global_step"] == 3
    logs = [entry for entry in records[0]["log_history"] if "rewards/personalized_reward/mean" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["rewards/personalized_reward/mean"])
        assert {"personalized_reward/user/A", "personalized_reward/user/B"} & set(entry)


# --------------------------------------------------------------------------------------------------------- recipes
def _load_recipe(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rloo_personalized", "grpo_personalized"])
def test_recipes_run_one_step(recipe, reward_model, tokenizer, tmp_path):
    """The RLOO / GRPO recipes: local prompt file with a user column, a reward model folder with its profiles."""
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    store = ProfileStore(tmp_path / "store")
    store.save_many(list(length_profiles(reward_model).values()))
    store.save_pretrained(tmp_path / "rm")
    tagged_policy(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    user_dataset(TRAIN_TOPICS[:4], users=("A", "B", "C")).to_json(str(tmp_path / "prompts.jsonl"))

    module = _load_recipe(recipe)
    argv = [
        "--model_name_or_path", str(tmp_path / "policy"), "--dataset_name", str(tmp_path / "prompts.jsonl"),
        "--reward_model_path", str(tmp_path / "rm"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4",
        "--max_steps", "1", "--logging_steps", "1", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
        "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    trainer = module.main(*module.make_parser().parse_args_and_config(args=argv))
    assert trainer.state.global_step == 1
    assert (tmp_path / "out" / "model.safetensors").is_file()
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["rewards/personalized_reward/mean"]) and "personalized_reward/fallbacks" in logged

    bad = argv[:3] + [str(tmp_path / "missing.jsonl")] + argv[4:]
    with pytest.raises(FileNotFoundError):
        module.main(*module.make_parser().parse_args_and_config(args=bad))
    with pytest.raises(ValueError, match="remove_unused_columns"):
        module.main(*module.make_parser().parse_args_and_config(args=argv + ["--remove_unused_columns", "true"]))


def test_the_ppo_recipe_explains_the_trl_version_it_needs():
    """With TRL >= 1.13 (no `trl.experimental.ppo`), the PPO recipe stops with an error naming the versions."""
    from importlib.metadata import version

    from packaging.version import Version

    if Version(version("trl")) < Version("1.13"):
        pytest.skip("this TRL still has PPOTrainer (tests/test_ppo.py runs the recipe)")
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "ppo_personalized.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    assert "trl 1.0 to 1.12" in result.stderr and "removed it in 1.13" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_times():
    """Not a check: prints the wall time of the end-to-end tests of this module (run with `-s` to see it)."""
    for name, seconds in TIMES.items():
        print(f"{name}: {seconds:.1f}s")
