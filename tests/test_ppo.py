"""
`MoERewardModel.for_user(profile)` as the reward model of TRL's `PPOTrainer`.

`trl.experimental.ppo` exists in trl 1.0-1.12 only (it was removed in 1.13), so this module runs in its own virtual
environment: `make test-ppo` creates `.venv-trl-1.12.0` with `trl==1.12.0` and runs it there. Elsewhere it is skipped.

Wall times on the development machine (2 CPU cores shared with other jobs, one torch thread): PPO run ~13 s, recipe
~4 s.
"""

import math
import time

import pytest
import torch


ppo = pytest.importorskip(
    "trl.experimental.ppo",
    reason="trl.experimental.ppo exists in trl<=1.12 only; run `make test-ppo` (a .venv-trl-1.12.0 with trl==1.12.0)",
)

from datasets import Dataset  # noqa: E402
from tiny import WORDS, tiny_llama_config, tiny_moe, tiny_tokenizer  # noqa: E402
from transformers import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402
from trl.experimental.utils import get_reward  # noqa: E402

from trl_moe_rm import MoERewardModel, MoERewardModelConfig, UserProfile  # noqa: E402
from trl_moe_rm.configuration_moe_reward import config_fingerprint  # noqa: E402


RESPONSE_LENGTH = 3


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and do not fight over the cores of a busy CI machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _exclusive_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return attention_mask.cumsum(1) - attention_mask.long()


def test_get_reward_of_trl_reads_the_user_reward(tmp_path):
    """
    trl's `get_reward` (backbone via `base_model_prefix`, then `score` at the last non-pad token) gives exactly the
    user's reward `for_user(profile)(...).logits`, with left-padded queries and right-padded responses.
    """
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2).eval()
    assert model.config.pooling == "last"
    with torch.no_grad():
        model.experts.weight.normal_(0, 1.0)
        model.experts.bias.normal_(0, 1.0)
    profile = UserProfile("u", [0.6, 0.0, 0.3, 0.1], config_hash=config_fingerprint(model.config))
    user_model = model.for_user(profile)
    assert getattr(user_model, user_model.base_model_prefix) is model.backbone

    pad = tokenizer.pad_token_id
    queries = torch.tensor([[pad, 5, 30, 31, 32], [5, 33, 34, 35, 36], [pad, pad, 5, 37, 38]])
    responses = torch.tensor([[40, 41, 2, pad], [42, 43, 44, 45], [46, pad, pad, pad]])
    query_responses = torch.cat([queries, responses], dim=1)
    with torch.no_grad():
        _, scores, sequence_lengths = get_reward(user_model, query_responses, pad, queries.shape[1])
        attention_mask = query_responses != pad
        expected = user_model(
            input_ids=query_responses.masked_fill(~attention_mask, 0),
            attention_mask=attention_mask.long(),
            position_ids=_exclusive_position_ids(attention_mask),
        ).logits[:, 0]
        expert_rewards = model(
            input_ids=query_responses.masked_fill(~attention_mask, 0),
            attention_mask=attention_mask.long(),
            position_ids=_exclusive_position_ids(attention_mask),
        ).expert_rewards
    assert sequence_lengths.tolist() == [7, 8, 5]
    assert torch.allclose(scores, expected, atol=1e-5), (scores, expected)
    assert torch.allclose(scores, expert_rewards @ torch.tensor(profile.expert_weights), atol=1e-5)


def _token_reward_model(tokenizer) -> MoERewardModel:
    """
    A MoE whose backbone blocks add nothing (attention and MLP outputs zeroed), so that with `pooling="last"` the
    reward depends on the last token only: expert 0 gives +1 to "good", -1 to "bad"; expert 1 the opposite.
    """
    config = MoERewardModelConfig(backbone_config=tiny_llama_config(len(tokenizer)), num_experts=2, top_k=2)
    torch.manual_seed(0)
    model = MoERewardModel(config)
    good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = model.backbone.embed_tokens.weight
        embeddings.zero_()
        embeddings[:, 2] = 1.0
        embeddings[good] = torch.nn.functional.one_hot(torch.tensor(0), config.hidden_size).float()
        embeddings[bad] = torch.nn.functional.one_hot(torch.tensor(1), config.hidden_size).float()
        model.backbone.norm.weight.fill_(1.0)
        scale = 1.0 / math.sqrt(config.hidden_size)  # a normalized one-hot embedding is sqrt(H) e_i
        model.experts.weight.zero_()
        model.experts.weight[0, :2] = torch.tensor([scale, -scale])
        model.experts.weight[1, :2] = torch.tensor([-scale, scale])
        model.experts.bias.zero_()
    return model.eval()


def _policy(tokenizer) -> LlamaForCausalLM:
    """A tiny random Llama that says "good" or "bad" about 15% of the time each."""
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    good, bad = tokenizer.convert_tokens_to_ids(["good", "bad"])
    with torch.no_grad():
        policy.model.embed_tokens.weight[:, 0] = 0.05
        policy.lm_head.weight[good, 0] = 1.2
        policy.lm_head.weight[bad, 0] = 1.2
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    return policy


@torch.no_grad()
def _mean_user_reward(policy, user_model, tokenizer, prompts, seed: int) -> float:
    torch.manual_seed(seed)
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    outputs = policy.generate(
        **inputs, max_new_tokens=RESPONSE_LENGTH, min_new_tokens=RESPONSE_LENGTH, do_sample=True, top_k=0,
        num_return_sequences=8,
    )  # fmt: skip
    _, scores, _ = get_reward(user_model, outputs, tokenizer.pad_token_id, inputs["input_ids"].shape[1])
    return scores.mean().item()


@pytest.mark.slow
def test_ppo_raises_the_user_reward(tmp_path):
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    start = time.perf_counter()
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    reward_model = _token_reward_model(tokenizer)
    profile = UserProfile("alice", [0.9, 0.1], config_hash=config_fingerprint(reward_model.config))
    user_model = reward_model.for_user(profile)  # alice likes completions that end with "good"

    prompts = [f"tell me about {topic}" for topic in WORDS[30:46]]
    held_out = [f"tell me about {topic}" for topic in WORDS[46:52]]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(prompt)["input_ids"] for prompt in prompts]})
    policy = _policy(tokenizer)
    value_config = tiny_llama_config(len(tokenizer))
    value_config.num_labels = 1
    value_model = LlamaForSequenceClassification(value_config)
    before = _mean_user_reward(policy, user_model, tokenizer, held_out, seed=1)

    args = PPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        local_rollout_forward_batch_size=16,
        num_mini_batches=1,
        num_ppo_epochs=4,
        total_episodes=16 * 8,
        response_length=RESPONSE_LENGTH,
        stop_token=None,
        learning_rate=5e-3,
        kl_coef=0.01,
        temperature=1.0,
        num_sample_generations=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=user_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
    )
    trainer.train()
    after = _mean_user_reward(policy, user_model, tokenizer, held_out, seed=1)
    scores = [entry["objective/scores"] for entry in trainer.state.log_history if "objective/scores" in entry]
    print(f"PPO: held-out reward {before:.3f} -> {after:.3f}; scores {scores}; {time.perf_counter() - start:.1f}s")

    assert len(scores) == 8 and all(math.isfinite(score) for score in scores)
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2, scores
    assert after > before + 0.2, (before, after)


@pytest.mark.slow
def test_ppo_recipe_runs(tmp_path):
    """`recipes/ppo_personalized.py` from local folders: one user's rows of a prompt file, that user's profile."""
    import importlib.util
    from pathlib import Path

    from trl_moe_rm import ProfileStore

    tokenizer = tiny_tokenizer()
    reward_model = _token_reward_model(tokenizer)
    reward_model.save_pretrained(tmp_path / "rm")
    store = ProfileStore(tmp_path / "store")
    fingerprint = config_fingerprint(reward_model.config)
    store.save_many([UserProfile("alice", [1.0, 0.0], config_hash=fingerprint), UserProfile(7, [0.0, 1.0])])
    store.save_pretrained(tmp_path / "rm")
    _policy(tokenizer).save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    rows = [{"prompt": f"tell me about {topic}", "user_id": user} for topic in WORDS[30:42] for user in ("alice", "7")]
    Dataset.from_list(rows).to_json(str(tmp_path / "prompts.jsonl"))

    path = Path(__file__).resolve().parents[1] / "recipes" / "ppo_personalized.py"
    spec = importlib.util.spec_from_file_location("recipe_ppo_personalized", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = [
        "--model_name_or_path", str(tmp_path / "policy"), "--dataset_name", str(tmp_path / "prompts.jsonl"),
        "--reward_model_path", str(tmp_path / "rm"), "--user_id", "alice", "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8", "--local_rollout_forward_batch_size", "8", "--total_episodes", "16",
        "--response_length", "3", "--num_sample_generations", "0", "--num_ppo_epochs", "1", "--report_to", "none",
        "--use_cpu", "true", "--bf16", "false", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    trainer = recipe.main(*recipe.make_parser().parse_args_and_config(args=argv))
    assert trainer.state.global_step == 2
    assert len(trainer.train_dataset) == 12  # alice's rows only
    assert trainer.reward_model.user_weights.tolist() == [1.0, 0.0]
    assert (tmp_path / "out" / "model.safetensors").is_file()

    # An int user id given on the command line is found; a model that does not pool the last token is refused.
    assert recipe.load_user_reward_model(str(tmp_path / "rm"), recipe.UserRewardArguments(user_id="7")) is not None
    mean_pooled = tiny_moe("llama", tokenizer, num_experts=2, top_k=1, pooling="mean")
    mean_pooled.save_pretrained(tmp_path / "mean_rm")
    with pytest.raises(ValueError, match="last token"):
        recipe.load_user_reward_model(str(tmp_path / "mean_rm"), recipe.UserRewardArguments(user_id="alice"))
