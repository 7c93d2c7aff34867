"""Seen users learned jointly with the model (`learn_user_weights`) and the PCA initialisation of the experts."""

import random

import pytest
import torch
from datasets import Dataset
from tiny import WORDS, tiny_args, tiny_moe, tiny_tokenizer

from trl_moe_rm import MoERewardConfig, MoERewardTrainer, ProfileStore
from trl_moe_rm.analysis import score_pairs
from trl_moe_rm.configuration_moe_reward import config_fingerprint
from trl_moe_rm.feature_cache import encode_preference_dataset
from trl_moe_rm.init import pca_expert_init


def _two_users(num_pairs: int = 48, seed: int = 0) -> Dataset:
    """Two users judge the same pairs with opposite labels; the prompt does not tell them apart."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        prompt = f"tell me about {rng.choice(WORDS[12:20])}"
        filler = " ".join(rng.choices(WORDS[30:], k=rng.randint(1, 3)))
        rows.append({"prompt": prompt, "chosen": f"yes {filler}", "rejected": f"no {filler}", "user_id": "a"})
        rows.append({"prompt": prompt, "chosen": f"no {filler}", "rejected": f"yes {filler}", "user_id": "b"})
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def _accuracy(model, tokenizer, profile, pairs) -> float:
    scores = score_pairs(model.for_user(profile), tokenizer, pairs)
    return float((scores.chosen_rewards > scores.rejected_rewards).mean())


@pytest.mark.parametrize("loss_type", ["reward_mixture", "assignment"])
def test_learn_user_weights_trains_exports_and_reloads(tmp_path, loss_type):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2)
    data = _two_users()
    trainer = MoERewardTrainer(
        model=model,
        args=tiny_args(
            tmp_path / "run",
            num_train_epochs=15,
            learning_rate=3e-2,
            per_device_train_batch_size=16,
            freeze_backbone=True,
            cache_features=True,
            learn_user_weights=True,
            user_weights_learning_rate=0.1,
            loss_type=loss_type,
            expert_init="pca",
            logging_steps=100,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    logits = trainer.user_weight_logits
    assert logits is not None and tuple(logits.shape) == (2, 4)
    trainer.train()
    assert any(p is logits for group in trainer.optimizer.param_groups for p in group["params"])
    assert not torch.allclose(logits.detach(), torch.zeros_like(logits))

    profiles = trainer.export_user_profiles()
    assert set(profiles) == {"a", "b"}
    for user_id, profile in profiles.items():
        assert profile.method == "joint" and profile.mode == "static"
        assert profile.num_shots == 48
        assert profile.config_hash == config_fingerprint(model.config)
        assert sum(profile.expert_weights) == pytest.approx(1.0, abs=1e-5)
        own = data.filter(lambda row, user=user_id: row["user_id"] == user)
        # The two users label the same pairs oppositely: only their own weights can fit both.
        assert _accuracy(model.eval(), tokenizer, profile, own) >= 0.9
    assert profiles["a"].expert_weights != pytest.approx(profiles["b"].expert_weights, abs=0.05)

    trainer.save_model(str(tmp_path / "saved"))
    reloaded = ProfileStore.from_pretrained(tmp_path / "saved")
    assert sorted(reloaded.list()) == ["a", "b"]
    for user_id, profile in profiles.items():
        loaded = reloaded.load(user_id)
        assert loaded.expert_weights == pytest.approx(profile.expert_weights)
        assert loaded.method == "joint"
        loaded.check_compatible(model.config.num_experts, config_fingerprint(model.config))

    store = ProfileStore(tmp_path / "store")
    trainer.export_user_profiles(store)
    assert sorted(store.list()) == ["a", "b"]


def test_unknown_users_fall_back_to_the_routing(tmp_path):
    tokenizer = tiny_tokenizer()
    trainer = MoERewardTrainer(
        model=tiny_moe("llama", tokenizer),
        args=tiny_args(tmp_path, learn_user_weights=True, freeze_backbone=True),
        train_dataset=_two_users(8),
        processing_class=tokenizer,
    )
    reference = torch.zeros(3, 4)
    weights, known = trainer._user_mixture(["a", "zzz", "b"], reference)
    assert known.tolist() == [True, False, True]
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3))
    assert trainer._user_mixture(["zzz"], reference) is None
    assert trainer._user_mixture(None, reference) is None


def test_learn_user_weights_needs_user_ids(tmp_path):
    tokenizer = tiny_tokenizer()
    data = _two_users(8).remove_columns("user_id")
    with pytest.raises(ValueError, match="user_id"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(tmp_path, learn_user_weights=True),
            train_dataset=data,
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="No user weights"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(tmp_path),
            train_dataset=data,
            processing_class=tokenizer,
        ).export_user_profiles()


@pytest.mark.parametrize("cache_features", [True, False])
def test_expert_init_pca_sets_opposite_principal_experts(tmp_path, cache_features):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2)
    trainer = MoERewardTrainer(
        model=model,
        args=tiny_args(tmp_path, freeze_backbone=True, cache_features=cache_features, expert_init="pca"),
        train_dataset=_two_users(16),
        processing_class=tokenizer,
    )
    if cache_features:
        features = trainer.cached_features(trainer.train_dataset)
    else:
        features = encode_preference_dataset(model, trainer.train_dataset, trainer.data_collator)
    expected = pca_expert_init(features["chosen_features"], features["rejected_features"], 4)
    weights = model.experts.weight.detach()
    assert torch.allclose(weights, expected, atol=1e-4)
    assert torch.allclose(weights[0], -weights[1]) and torch.allclose(weights[2], -weights[3])
    assert torch.count_nonzero(model.experts.bias) == 0
    deltas = (features["chosen_features"] - features["rejected_features"]) @ weights.T
    assert deltas.pow(2).mean(dim=0).sqrt().tolist() == pytest.approx([1.0] * 4, rel=1e-3)


def test_config_validates_the_new_options(tmp_path):
    common = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match="expert_init"):
        MoERewardConfig(**common, expert_init="random")
    with pytest.raises(ValueError, match="linear"):
        MoERewardConfig(**common, expert_init="pca", expert_type="mlp")
    with pytest.raises(ValueError, match="user_weights_learning_rate"):
        MoERewardConfig(**common, learn_user_weights=True, user_weights_learning_rate=0.0)
