"""Unit tests of `PersonalizedReward`: TRL's calling convention, tokenization, per-user mixing, logging, bad input."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATE, tiny_moe, tiny_tokenizer
from transformers import AutoTokenizer

from trl_moe_rm import MoEUserRewardModel, PersonalizedReward, ProfileStore, UserProfile
from trl_moe_rm.configuration_moe_reward import config_fingerprint
from trl_moe_rm.processing import tokenize_preference as _tokenize_preference
from trl_moe_rm.profiles import UnknownUserError
from trl_moe_rm.rewards import RunningMeanStd, unpartition_zero3


PROMPTS = ["tell me about cat", "explain the moon", "what is alpha", "tell me about cat"]
COMPLETIONS = ["good one two", "bad three", "good", "bad five six seven"]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # spread the expert scores so that mixtures differ visibly
        model.experts.weight.normal_(0, 1.0)
        model.experts.bias.copy_(torch.tensor([0.5, -0.5, 1.0, -1.0]))
        model.router.weight.normal_(0, 1.0)
    return model


def _profile(model, user_id, weights, mode="static", beta=1.0):
    return UserProfile(user_id, weights, mode=mode, beta=beta, config_hash=config_fingerprint(model.config))


@pytest.fixture(scope="module")
def profiles(model):
    return {
        "alice": _profile(model, "alice", [0.7, 0.1, 0.1, 0.1]),
        "bob": _profile(model, "bob", [0.0, 0.0, 0.2, 0.8]),
        7: _profile(model, 7, [0.25, 0.25, 0.25, 0.25], mode="routed", beta=2.0),
    }


def _batch(tokenizer, rows):
    """Right-padded `input_ids`, `attention_mask` and `prompt_lengths` of `(ids, prompt_length)` rows."""
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        "prompt_lengths": torch.tensor([length for _, length in rows]),
    }


# ------------------------------------------------------------------------------------------------------ tokenization
def test_standard_rows_are_tokenized_as_in_reward_training(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        expected = _tokenize_preference({"prompt": prompt, "chosen": completion, "rejected": "x"}, tokenizer)
        ids, prompt_length = reward.encode(prompt, completion)
        assert ids == expected["chosen_ids"]
        assert prompt_length == expected["prompt_length"] == len(tokenizer(prompt)["input_ids"])
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


def test_conversational_rows_use_the_chat_template_with_the_generation_prompt(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    prompt = [{"role": "user", "content": "tell me about cat"}]
    completion = [{"role": "assistant", "content": "good one two"}]
    expected = _tokenize_preference({"prompt": prompt, "chosen": completion, "rejected": completion}, tokenizer)
    ids, prompt_length = reward.encode(prompt, completion)
    assert ids == expected["chosen_ids"]
    assert prompt_length == expected["prompt_length"]
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert rendered_prompt.endswith("assistant ")
    assert ids[:prompt_length] == tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[prompt_length:]) == ["good", "one", "two", "[EOS]"]


def test_the_router_reads_exactly_the_prompt(model, tokenizer, profiles):
    """`prompt_lengths` reach the model: rows sharing a prompt share their routing, whatever the completion."""
    seen = {}

    def hook(module, args, kwargs, output):
        seen["prompt_lengths"] = kwargs["prompt_lengths"].tolist()
        seen["routing"] = output.routing_weights

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
        prompts = ["tell me about cat"] * 3
        reward(prompts=prompts, completions=["good", "bad one two three", ""], user_id=["alice"] * 3)
    finally:
        handle.remove()
    assert seen["prompt_lengths"] == [len(tokenizer(prompts[0])["input_ids"])] * 3
    assert torch.allclose(seen["routing"][0], seen["routing"][1]) and torch.allclose(
        seen["routing"][0], seen["routing"][2]
    )


# ------------------------------------------------------------------------------------------------------- scores
def test_each_row_is_scored_for_its_own_user(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, batch_size=3)
    users = ["alice", "bob", 7, "alice"]
    scores = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=users)
    assert isinstance(scores, list) and len(scores) == 4 and all(isinstance(s, float) for s in scores)

    inputs = _batch(tokenizer, [reward.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    with torch.no_grad():
        for row, user in enumerate(users):
            expected = model.for_user(profiles[user])(**inputs).logits[row, 0]
            assert scores[row] == pytest.approx(expected.item(), abs=1e-5), (row, user)
    # The users really get different rewards for the same completion.
    alice = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=["alice"] * 4)
    bob = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=["bob"] * 4)
    assert max(abs(a - b) for a, b in zip(alice, bob)) > 0.1
    assert reward.num_fallbacks == 0


def test_scores_do_not_depend_on_batching_or_padding(model, tokenizer, profiles):
    users = ["alice", "bob", 7, "bob"]
    one = PersonalizedReward(model, profiles, tokenizer=tokenizer, batch_size=1)
    many = PersonalizedReward(model, profiles, tokenizer=tokenizer, batch_size=32)
    expected = one(prompts=PROMPTS, completions=COMPLETIONS, user_id=users)
    assert many(prompts=PROMPTS, completions=COMPLETIONS, user_id=users) == pytest.approx(expected, abs=1e-5)
    # Reversed inputs give reversed outputs (rows are sorted by length inside, then put back in order).
    reversed_scores = many(prompts=PROMPTS[::-1], completions=COMPLETIONS[::-1], user_id=users[::-1])
    assert reversed_scores == pytest.approx(expected[::-1], abs=1e-5)


def test_unknown_users_fall_back_to_the_default_routing(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    scores = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=["carol", "alice", "carol", 99])
    inputs = _batch(tokenizer, [reward.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    with torch.no_grad():
        default = model(**inputs).logits[:, 0]
    for row in (0, 2, 3):
        assert scores[row] == pytest.approx(default[row].item(), abs=1e-5)
    assert reward.num_fallbacks == 3
    assert reward.fallbacks_by_user == {"carol": 2, 99: 1}


@pytest.mark.parametrize("as_store", [False, True])
def test_rows_without_a_user_id_use_the_default_routing(model, tokenizer, profiles, as_store, tmp_path):
    """`None`, empty and NaN user ids (an empty dataset cell) are users without a profile, also with a ProfileStore."""
    if as_store:
        profiles = ProfileStore(tmp_path / "store")
        profiles.save(_profile(model, "alice", [0.7, 0.1, 0.1, 0.1]))
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    scores = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=[None, "", float("nan"), "alice"])
    inputs = _batch(tokenizer, [reward.encode(p, c) for p, c in zip(PROMPTS, COMPLETIONS)])
    with torch.no_grad():
        default = model(**inputs).logits[:, 0]
        alice = model.for_user(_profile(model, "alice", [0.7, 0.1, 0.1, 0.1]))(**inputs).logits[:, 0]
    assert scores[:3] == pytest.approx(default[:3].tolist(), abs=1e-5)
    assert scores[3] == pytest.approx(alice[3].item(), abs=1e-5)
    assert reward.num_fallbacks == 3
    logged = {}
    reward(prompts=PROMPTS[:2], completions=COMPLETIONS[:2], user_id=[None, "alice"], log_metric=logged.__setitem__)
    assert set(logged) == {
        "personalized_reward/user/_missing",
        "personalized_reward/user/alice",
        "personalized_reward/fallbacks",
    }
    with pytest.raises(UnknownUserError):
        PersonalizedReward(model, profiles, tokenizer=tokenizer, strict=True)(
            prompts=PROMPTS[:1], completions=COMPLETIONS[:1], user_id=[None]
        )


def test_a_peft_wrapped_model_scores_like_the_model(model, tokenizer, profiles):
    from peft import LoraConfig, get_peft_model

    users = ["alice", "bob", 7, "carol"]
    expected = PersonalizedReward(model, profiles, tokenizer=tokenizer)(
        prompts=PROMPTS, completions=COMPLETIONS, user_id=users
    )
    torch.manual_seed(0)
    config = LoraConfig(
        task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"], modules_to_save=["router", "experts"]
    )
    wrapped = get_peft_model(copy.deepcopy(model), config)  # LoRA starts as the identity
    scores = PersonalizedReward(wrapped, profiles, tokenizer=tokenizer)(
        prompts=PROMPTS, completions=COMPLETIONS, user_id=users
    )
    assert scores == pytest.approx(expected, abs=1e-5)


def test_strict_mode_raises_on_unknown_users(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, strict=True)
    assert reward.strict
    with pytest.raises(UnknownUserError, match="carol"):
        reward(prompts=PROMPTS[:2], completions=COMPLETIONS[:2], user_id=["alice", "carol"])


@pytest.mark.parametrize("conversational", [False, True])
def test_empty_completions_get_finite_scores(model, tokenizer, profiles, conversational):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    if conversational:
        prompts = [[{"role": "user", "content": "tell me about cat"}], [{"role": "user", "content": ""}]]
        completions = [[{"role": "assistant", "content": ""}], [{"role": "assistant", "content": ""}]]
    else:
        prompts, completions = ["tell me about cat", ""], ["", ""]
    scores = reward(prompts=prompts, completions=completions, user_id=["alice", "unknown"])
    assert len(scores) == 2 and all(math.isfinite(score) for score in scores)


def test_an_empty_batch_gives_no_rewards(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    assert reward(prompts=[], completions=[], user_id=[]) == []


def test_max_length_keeps_the_completion(model, tokenizer, profiles, caplog):
    """Truncation cuts the prompt from the left (keeping [BOS]) and never drops the completion (issue 13)."""
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, max_length=8)
    ids, prompt_length = reward.encode("tell me about the cat", "good one")
    vocab = tokenizer.get_vocab()
    assert ids == [vocab[t] for t in ("[BOS]", "about", "the", "cat", "good", "one", "[EOS]")] or len(ids) == 8
    assert ids[0] == vocab["[BOS]"] and ids[-3:] == [vocab["good"], vocab["one"], vocab["[EOS]"]]
    assert ids[prompt_length - 1] == vocab["cat"]
    # A long prompt: every completion keeps its own tokens, so the rewards differ (they were all equal before).
    long_prompt = "tell me about " + "the " * 40 + "cat"
    with caplog.at_level("WARNING"):
        rewards = reward(prompts=[long_prompt] * 2, completions=["good good", "bad bad"], user_id=["bob", "bob"])
    assert rewards[0] != rewards[1]
    assert "truncated" in caplog.text and "3 of 3 prompts lost tokens from the left" in caplog.text
    # A completion longer than max_length alone: cut on the right, its end token kept, one prompt token left.
    ids, prompt_length = reward.encode("tell me", "good " * 50)
    assert len(ids) == 8 and ids[-1] == vocab["[EOS]"] and prompt_length == 2
    assert math.isfinite(reward(prompts=["tell me about cat"], completions=["good " * 50], user_id=["bob"])[0])


# ------------------------------------------------------------------------------------------------- normalization
def test_running_mean_std_matches_numpy():
    rng = np.random.default_rng(0)
    stats = RunningMeanStd()
    seen = []
    for size in (1, 5, 17, 3):
        values = rng.normal(3.0, 2.0, size)
        seen.extend(values)
        stats.update(torch.tensor(values))
        assert stats.count == len(seen)
        assert stats.mean == pytest.approx(np.mean(seen), abs=1e-12)
        assert stats.std == pytest.approx(np.std(seen), abs=1e-12)


def test_normalized_rewards_use_the_running_statistics(model, tokenizer, profiles):
    raw = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    normalized = PersonalizedReward(model, profiles, tokenizer=tokenizer, normalize=True)
    seen = []
    for users in (["alice", "bob", "alice", "bob"], ["bob", 7, 7, "alice"]):
        scores = raw(prompts=PROMPTS, completions=COMPLETIONS, user_id=users)
        seen.extend(scores)
        expected = (np.array(scores) - np.mean(seen)) / np.std(seen)
        got = normalized(prompts=PROMPTS, completions=COMPLETIONS, user_id=users)
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
    # A single value has no spread: it is only centred, never divided by zero.
    single = PersonalizedReward(model, profiles, tokenizer=tokenizer, normalize=True)
    assert single(prompts=PROMPTS[:1], completions=COMPLETIONS[:1], user_id=["alice"]) == [0.0]


# -------------------------------------------------------------------------------------------------- TRL contract
def test_trl_name_and_extra_kwargs(model, tokenizer, profiles):
    try:
        from trl.trainer.utils import get_callable_name
    except ImportError:  # trl < 1.x where the trainers read `__name__` directly

        def get_callable_name(function):
            return function.__name__

    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    assert get_callable_name(reward) == reward.__name__ == "personalized_reward"
    named = PersonalizedReward(model, profiles, tokenizer=tokenizer, name="rm_alice_bob")
    assert get_callable_name(named) == "rm_alice_bob"
    assert not isinstance(reward, torch.nn.Module)  # TRL passes dataset columns to callables only
    # Everything TRL adds is accepted; unrelated columns are ignored.
    scores = reward(
        prompts=PROMPTS,
        completions=COMPLETIONS,
        completion_ids=[[1, 2]] * 4,
        user_id=["alice"] * 4,
        category=[0, 1, 0, 1],
        trainer_state=SimpleNamespace(global_step=3),
        log_extra=lambda column, values: None,
    )
    assert len(scores) == 4


def test_a_missing_user_column_names_the_column_and_the_fix(model, tokenizer, profiles):
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, user_column="user")
    with pytest.raises(ValueError, match="`user` column") as error:
        reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=["alice"] * 4, trainer_state=None)
    assert "remove_unused_columns=False" in str(error.value)
    assert "user_id" in str(error.value)  # lists the columns it did get


def test_log_metric_gets_per_user_means_and_fallbacks(model, tokenizer, profiles):
    logged: dict[str, list[float]] = {}

    def log_metric(name, value):
        logged.setdefault(name, []).append(value)

    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, max_logged_users=2)
    users = ["alice", "bob", "alice", "carol"]
    scores = reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=users, log_metric=log_metric)
    assert logged["personalized_reward/user/alice"] == [pytest.approx((scores[0] + scores[2]) / 2)]
    assert logged["personalized_reward/user/bob"] == [pytest.approx(scores[1])]
    assert logged["personalized_reward/user/_other"] == [pytest.approx(scores[3])]  # over max_logged_users
    assert logged["personalized_reward/fallbacks"] == [1.0]
    assert len(logged) == 4

    # Later calls keep the same bounded set of keys.
    reward(prompts=PROMPTS, completions=COMPLETIONS, user_id=["dave", "erin", "bob", "bob"], log_metric=log_metric)
    assert len(logged) == 4
    assert logged["personalized_reward/fallbacks"] == [1.0, 2.0]
    assert len(logged["personalized_reward/user/_other"]) == 2


def test_user_reward_model_works_as_a_trl_module_reward(model, tokenizer, profiles):
    """`for_user(profile)` scores text the way TRL's nn.Module path calls it: logits (N, 1), the static mixture."""
    user_model = model.for_user(profiles["bob"])
    assert isinstance(user_model, MoEUserRewardModel)
    texts = [p + " " + c for p, c in zip(PROMPTS, COMPLETIONS)]
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.inference_mode():
        logits = user_model(**inputs).logits
        expert_rewards = model(**inputs).expert_rewards
    assert logits.shape == (4, 1)
    expected = expert_rewards @ torch.tensor(profiles["bob"].expert_weights)
    assert torch.allclose(logits[:, 0], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ construction
def test_model_and_profiles_load_from_directories(model, tokenizer, profiles, tmp_path):
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    store = ProfileStore(tmp_path / "store")
    store.save_many([profiles["alice"], profiles["bob"]])
    store.save_pretrained(tmp_path / "rm")

    loaded = PersonalizedReward(
        str(tmp_path / "rm"), str(tmp_path / "rm"), tokenizer=AutoTokenizer.from_pretrained(tmp_path / "rm")
    )
    in_memory = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    users = ["alice", "bob", "bob", "alice"]
    expected = in_memory(prompts=PROMPTS, completions=COMPLETIONS, user_id=users)
    assert loaded(prompts=PROMPTS, completions=COMPLETIONS, user_id=users) == pytest.approx(expected, abs=1e-5)
    assert not any(param.requires_grad for param in loaded.model.parameters())
    # The same in one call: model, tokenizer and profiles from the model folder.
    saved = PersonalizedReward.from_pretrained(tmp_path / "rm", name="saved_rm")
    assert saved.__name__ == "saved_rm" and saved.tokenizer.eos_token == tokenizer.eos_token
    assert saved(prompts=PROMPTS, completions=COMPLETIONS, user_id=users) == pytest.approx(expected, abs=1e-5)


def test_device_placement(model, tokenizer, profiles):
    from accelerate import PartialState

    explicit = PersonalizedReward(model, profiles, tokenizer=tokenizer, device="cpu")
    assert explicit.device == torch.device("cpu")
    from_accelerator = PersonalizedReward(
        model, profiles, tokenizer=tokenizer, device=SimpleNamespace(device=torch.device("cpu"))
    )
    assert from_accelerator._device == torch.device("cpu")
    lazy = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    assert lazy._device is None
    lazy(prompts=PROMPTS[:1], completions=COMPLETIONS[:1], user_id=["alice"])
    assert lazy.device == PartialState().device


def test_bad_arguments_are_rejected(model, tokenizer, profiles):
    with pytest.raises(TypeError, match="not one user's model"):
        PersonalizedReward(model.for_user(profiles["alice"]), profiles, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="MoERewardModel"):
        PersonalizedReward(torch.nn.Linear(2, 2), profiles, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="ProfileStore"):
        PersonalizedReward(model, [profiles["alice"]], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        PersonalizedReward(model, profiles, tokenizer=tokenizer, batch_size=0)
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="same length"):
        reward(prompts=PROMPTS, completions=COMPLETIONS[:2], user_id=["alice"] * 4)
    # A profile fitted for another number of experts is refused when its user shows up.
    wrong = UserProfile("zed", [0.5, 0.5])
    with pytest.raises(ValueError, match="K=2"):
        PersonalizedReward(model, {"zed": wrong}, tokenizer=tokenizer)(
            prompts=["a"], completions=["b"], user_id=["zed"]
        )


def test_partitioned_parameters_without_a_process_group_give_a_clear_error(model, tokenizer):
    module = torch.nn.Linear(2, 2)
    module.weight.ds_id = 0  # what deepspeed.zero.Init leaves on a partitioned parameter
    with pytest.raises(RuntimeError, match="before creating the training arguments"):
        unpartition_zero3(module)
    plain = torch.nn.Linear(2, 2)
    assert unpartition_zero3(plain) is plain


def _normalize_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import json as json_module
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        stats = RunningMeanStd()
        # Each rank sees different rewards, and rank 1 an empty batch once: the statistics must still agree.
        stats.update(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1))
        stats.update(torch.tensor([10.0 * rank]) if rank == 0 else torch.zeros(0))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json_module.dump({"count": stats.count, "mean": stats.mean, "std": stats.std}, file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_normalization_statistics_are_shared_across_processes(tmp_path):
    """Issue 15: `normalize=True` all-gathers the batch statistics, so every rank applies the same scale."""
    import json as json_module
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_normalize_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [json_module.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    everything = np.array([1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 0.0])
    for result in results:
        assert result["count"] == 7
        assert result["mean"] == pytest.approx(everything.mean(), abs=1e-12)
        assert result["std"] == pytest.approx(everything.std(), abs=1e-12)
