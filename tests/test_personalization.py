
import pytest
import torch
from datasets import Dataset
from tiny import flipped_dataset, tiny_args, tiny_moe, tiny_tokenizer

from trl_moe_rm import (
    MoERewardTrainer,
    ProfileStore,
    UserProfile,
    UserRewards,
    fit_user_weights,
    fit_users,
    weight_shift,
)
from trl_moe_rm.analysis import score_pairs
from trl_moe_rm.profiles import UnknownUserError


@pytest.fixture(scope="module")
def trained():
    """A tiny MoE trained on two hidden categories with opposite labels (frozen backbone)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = MoERewardTrainer(
            model=model,
            args=tiny_args(tmp, num_train_epochs=12, learning_rate=1e-2, per_device_train_batch_size=16,
                           freeze_backbone=True, logging_steps=100),
            train_dataset=flipped_dataset(64),
            processing_class=tokenizer,
        )
        trainer.train()
    return model.eval(), tokenizer


def _user_pairs(category: int, n: int, seed: int) -> Dataset:
    data = flipped_dataset(64, seed=seed)
    return data.filter(lambda row: row["category"] == category).select(range(n))


def _accuracy_under(model, tokenizer, profile, pairs):
    user_model = model.for_user(profile)
    scores = score_pairs(user_model, tokenizer, pairs)
    return float((scores.chosen_rewards > scores.rejected_rewards).mean())


@pytest.mark.parametrize("method", ["hedge", "hyre", "gradient"])
def test_few_shots_recover_each_users_preference(trained, method):
    """A user who only ever sees category-0 prompts but judges like category 1 is served by the right experts."""
    model, tokenizer = trained
    # Users judge the *same* prompts with opposite labels: only the fitted weights can tell them apart.
    pairs_a = _user_pairs(0, 8, seed=3)
    pairs_b = pairs_a.map(lambda row: {"chosen": row["rejected"], "rejected": row["chosen"]})
    held_a = _user_pairs(0, 24, seed=4)
    held_b = held_a.map(lambda row: {"chosen": row["rejected"], "rejected": row["chosen"]})
    kwargs = {"temperature": 0.5} if method == "hyre" else {}
    profile_a = fit_user_weights(model, pairs_a, method=method, user_id="a", tokenizer=tokenizer, **kwargs)
    profile_b = fit_user_weights(model, pairs_b, method=method, user_id="b", tokenizer=tokenizer, **kwargs)
    assert profile_a.num_shots == 8 and profile_a.method == method and profile_a.config_hash
    assert sum(profile_a.expert_weights) == pytest.approx(1.0, abs=1e-5)
    assert _accuracy_under(model, tokenizer, profile_a, held_a) >= 0.8
    assert _accuracy_under(model, tokenizer, profile_b, held_b) >= 0.8


def test_fit_users_matches_single_user_fits(trained):
    model, tokenizer = trained
    pairs = _user_pairs(0, 6, seed=5)
    flipped = pairs.map(lambda row: {"chosen": row["rejected"], "rejected": row["chosen"]})
    both = Dataset.from_list([{**r, "user_id": 3} for r in pairs] + [{**r, "user_id": 7} for r in flipped.select(range(4))])
    profiles = fit_users(model, both, method="gradient", tokenizer=tokenizer)
    assert list(profiles) == [3, 7]
    assert profiles[7].num_shots == 4
    single = fit_user_weights(model, pairs, method="gradient", user_id=3, tokenizer=tokenizer)
    assert profiles[3].expert_weights == pytest.approx(single.expert_weights, abs=1e-4)


def test_for_user_static_equals_weighted_experts_and_folds_score(trained):
    model, tokenizer = trained
    weights = [0.1, 0.2, 0.3, 0.4]
    user_model = model.for_user(weights)
    batch = tokenizer(["short question about cat yes one", "long question no"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch)
        user = user_model(**batch)
        expected = (base.expert_rewards * torch.tensor(weights)).sum(-1, keepdim=True)
        assert torch.allclose(user.logits, expected, atol=1e-6)
        # PPO contract: per-token score from the backbone's hidden states, read at the last token.
        hidden = getattr(user_model, user_model.base_model_prefix)(**batch).last_hidden_state
        per_token = user_model.score(hidden)
        assert per_token.shape == (2, batch["input_ids"].shape[1], 1)
        last = batch["attention_mask"].sum(-1) - 1
        assert torch.allclose(per_token[torch.arange(2), last, 0], user.logits[:, 0], atol=1e-5)
    # The user model shares the modules: no copy, and the base model is untouched.
    assert user_model.experts is model.experts
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base.logits)


def test_for_user_rejects_mismatched_profiles(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="K=3"):
        model.for_user(UserProfile("u", [0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="fingerprint"):
        model.for_user(UserProfile("u", [0.25] * 4, config_hash="0" * 16))
    with pytest.raises(ValueError, match="NaN"):
        UserProfile("u", [float("nan"), 0.5, 0.25, 0.25])


def test_weight_shift_and_store_round_trip(trained, tmp_path):
    model, tokenizer = trained
    pairs = _user_pairs(0, 8, seed=6)
    profile = fit_user_weights(model, pairs, method="hedge", user_id="a", tokenizer=tokenizer)
    shift = weight_shift(profile, model, pairs, tokenizer=tokenizer)
    assert sum(shift["shift"]) == pytest.approx(0.0, abs=1e-5)
    assert shift["top_gain"] in shift["expert_names"]
    store = ProfileStore(tmp_path / "profiles")
    store.save(profile)
    loaded = store.load("a")
    assert loaded.expert_weights == pytest.approx(profile.expert_weights)
    assert loaded.config_hash == profile.config_hash


def test_unknown_user_falls_back_or_raises(trained):
    model, tokenizer = trained
    rewards = UserRewards(model, {"a": UserProfile("a", [1.0, 0.0, 0.0, 0.0])})
    expert_rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    routing = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    values = rewards.combine(expert_rewards, routing, ["a", "stranger"])
    assert values.tolist() == pytest.approx([1.0, 1.5])
    assert rewards.num_fallbacks == 1 and rewards.fallbacks_by_user == {"stranger": 1}
    with pytest.raises(UnknownUserError, match="stranger"):
        UserRewards(model, {}, strict=True).combine(expert_rewards, routing, ["stranger"])


def test_bad_inputs(trained):
    model, tokenizer = trained
    with pytest.raises(ValueError, match="empty"):
        fit_user_weights(model, [], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="empty `chosen`"):
        fit_user_weights(model, [{"prompt": "what", "chosen": "", "rejected": "no"}], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="user_id must be a str or an int"):
        fit_user_weights(model, _user_pairs(0, 2, 1), user_id=1.5, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="method"):
        fit_user_weights(model, _user_pairs(0, 2, 1), method="magic", tokenizer=tokenizer)


def test_fit_from_precomputed_scores_does_not_run_the_model(trained, monkeypatch):
    """With the experts' scores computed once, fitting runs no model pass (its speed is in benchmarks/, not here)."""
    model, tokenizer = trained
    pairs = _user_pairs(0, 32, seed=7)
    scores = score_pairs(model, tokenizer, pairs)
    expected = fit_user_weights(model, pairs, method="hyre", tokenizer=tokenizer)

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran although the scores were given")

    monkeypatch.setattr(model, "forward", no_forward)
    profile = fit_user_weights(model, pairs, method="hyre", scores=scores)
    assert profile.expert_weights == pytest.approx(expected.expert_weights)
