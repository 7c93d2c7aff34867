import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from tiny import (
    CHAT_TEMPLATE,
    flipped_dataset,
    separable_dataset,
    tiny_args,
    tiny_llama_config,
    tiny_moe,
    tiny_tokenizer,
)
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
from trl_moe_rm.trainer import DataCollatorForMoEPreference


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


def _train(tmp_path, tokenizer, dataset, eval_dataset=None, model=None, peft_config=None, **overrides):
    torch.manual_seed(overrides.get("seed", 42))
    trainer = MoERewardTrainer(
        model=model if model is not None else tiny_moe("llama", tokenizer),
        args=tiny_args(tmp_path, **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def test_learns_a_separable_dataset(tmp_path, tokenizer):
    trainer = _train(tmp_path, tokenizer, separable_dataset(64), separable_dataset(32, seed=1), num_train_epochs=3)
    metrics = trainer.evaluate()
    assert metrics["eval_accuracy"] >= 0.9
    logged = trainer.state.log_history[0]
    loads = [logged[f"moe/load/expert_{k}"] for k in range(4)]
    assert sum(loads) == pytest.approx(1.0, abs=1e-5)
    fractions = [logged[f"moe/token_fraction/expert_{k}"] for k in range(4)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    assert {"moe/preference_loss", "moe/balance_loss", "moe/routing_entropy", "moe/accuracy/expert_0"} <= set(logged)
    assert "eval_moe/load/expert_0" in metrics


def test_explicit_prompts_are_tokenized_separately(tmp_path, tokenizer):
    trainer = MoERewardTrainer(
        model=tiny_moe("llama", tokenizer),
        args=tiny_args(tmp_path),
        train_dataset=separable_dataset(4),
        processing_class=tokenizer,
    )
    row = trainer.train_dataset[0]
    prompt_ids = tokenizer(separable_dataset(4)[0]["prompt"])["input_ids"]
    assert row["prompt_length"] == len(prompt_ids)
    assert row["chosen_ids"][: len(prompt_ids)] == prompt_ids == row["rejected_ids"][: len(prompt_ids)]
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id


def test_collator_carries_prompt_lengths_and_user_ids():
    collator = DataCollatorForMoEPreference(pad_token_id=0)
    batch = collator(
        [
            {"chosen_ids": [1, 2, 3], "rejected_ids": [1, 4], "prompt_length": 1, "user_id": "a"},
            {"chosen_ids": [5, 6], "rejected_ids": [5, 7, 8], "prompt_length": 2, "user_id": "b"},
        ]
    )
    assert batch["prompt_lengths"].tolist() == [1, 2, 1, 2]
    assert batch["user_ids"] == ["a", "b"]
    assert batch["paired"] is True
    assert batch["input_ids"].shape == (4, 3)


def test_implicit_prompt_uses_common_prefix_and_warns(tmp_path, tokenizer, caplog):
    implicit = separable_dataset(8).map(
        lambda x: {"chosen": x["prompt"] + " " + x["chosen"], "rejected": x["prompt"] + " " + x["rejected"]},
        remove_columns=["prompt"],
    )
    with caplog.at_level("WARNING"):
        trainer = MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(tmp_path),
            train_dataset=implicit,
            processing_class=tokenizer,
        )
    assert any("common token prefix" in r.getMessage() for r in caplog.records)
    row = trainer.train_dataset[0]
    prompt_ids = tokenizer(separable_dataset(8)[0]["prompt"])["input_ids"]
    assert row["prompt_length"] == len(prompt_ids)
    trainer.train()


def test_conversational_data_margin_and_center_rewards(tmp_path, tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    rows = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
            "margin": 0.5,
        }
        for row in separable_dataset(16)
    ]
    trainer = _train(tmp_path, tokenizer, Dataset.from_list(rows), center_rewards_coefficient=0.01)
    row = trainer.train_dataset[0]
    prompt_text = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert row["prompt_length"] == len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    assert "moe/center_loss" in trainer.state.log_history[0]


def test_eval_dataset_dict_and_save_model_round_trip(tmp_path, tokenizer):
    trainer = _train(
        tmp_path, tokenizer, separable_dataset(16), {"a": separable_dataset(8, 1), "b": separable_dataset(8, 2)}
    )
    metrics = trainer.evaluate()
    assert "eval_a_accuracy" in metrics and "eval_b_accuracy" in metrics
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert isinstance(reloaded, MoERewardModel)
    for name, param in trainer.model.state_dict().items():
        assert torch.equal(param, reloaded.state_dict()[name]), name


def _routing_stats(trainer, dataset):
    model = trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "user_ids"})
    probs = torch.softmax(out.router_logits, -1)
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    load = out.routing_weights.mean(0)
    return entropy, load, out


def test_regularizers_change_what_they_should(tmp_path, tokenizer):
    data = flipped_dataset(32)
    common = {"num_train_epochs": 4, "learning_rate": 5e-3, "balance_coef": 0.0, "router_z_loss_coef": 0.0}
    plain = _train(tmp_path / "plain", tokenizer, data, **common)
    sparse = _train(tmp_path / "sparse", tokenizer, data, **{**common, "sparsity_coef": 1.0})
    assert _routing_stats(sparse, data)[0] < _routing_stats(plain, data)[0] - 0.05

    balanced = _train(
        tmp_path / "balanced", tokenizer, data, **{**common, "balance_coef": 1.0, "balance_type": "entropy"}
    )
    unbalanced = _train(tmp_path / "unbalanced", tokenizer, data, **{**common, "sparsity_coef": 1.0})
    assert _routing_stats(balanced, data)[1].max() < _routing_stats(unbalanced, data)[1].max()

    from trl_moe_rm.losses import cosine_diversity_loss

    diverse = _train(tmp_path / "diverse", tokenizer, data, **{**common, "diversity_coef": 1.0})
    assert cosine_diversity_loss(diverse.model.experts.weight_vectors()) < cosine_diversity_loss(
        plain.model.experts.weight_vectors()
    )
    from trl_moe_rm.losses import redundancy_diversity_loss

    redundant = _train(
        tmp_path / "redundancy", tokenizer, data, **{**common, "diversity_coef": 1.0, "diversity_type": "redundancy"}
    )
    assert redundancy_diversity_loss(redundant.model.experts.weight_vectors()) < redundancy_diversity_loss(
        plain.model.experts.weight_vectors()
    )


def test_router_learning_rate_creates_a_separate_group(tmp_path, tokenizer):
    trainer = _train(tmp_path, tokenizer, separable_dataset(8), router_learning_rate=0.5, num_train_epochs=1)
    groups = trainer.optimizer.param_groups
    router = [g for g in groups if any(p is trainer.model.router.weight for p in g["params"])]
    assert len(router) == 1 and router[0]["initial_lr"] == 0.5


def test_freeze_backbone_trains_only_the_head(tmp_path, tokenizer):
    model = tiny_moe("llama", tokenizer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _train(tmp_path, tokenizer, separable_dataset(16), model=model, freeze_backbone=True, learning_rate=1e-2)
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (not name.startswith("backbone.")), name


def test_lora_trains_adapter_and_head(tmp_path, tokenizer):
    model = tiny_moe("llama", tokenizer)
    head_before = model.experts.weight.detach().clone()
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = _train(
        tmp_path, tokenizer, separable_dataset(16), model=model, peft_config=peft_config, learning_rate=1e-2
    )
    peft_model = trainer.model
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable)
    assert any("experts" in name for name in trainable) and any("router" in name for name in trainable)
    assert not any("embed_tokens" in name for name in trainable)
    merged_head = peft_model.base_model.model.experts
    assert not torch.equal(head_before, merged_head.modules_to_save["default"].weight.detach())
    trainer.save_model(str(tmp_path / "adapter"))
    from peft import PeftModel

    fresh = tiny_moe("llama", tokenizer)
    fresh.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items()
            if "lora" not in k and "modules_to_save" not in k and "original_module" not in k
        },
        strict=False,
    )
    reloaded = PeftModel.from_pretrained(tiny_moe("llama", tokenizer), str(tmp_path / "adapter"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    batch.pop("user_ids", None)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits
        assert reloaded.eval()(**batch).logits.shape == expected.shape


@pytest.mark.slow
def test_flipped_labels_need_the_mixture(tmp_path, tokenizer):
    """Same response pair, opposite labels per hidden category: the MoE fits it, one linear head cannot."""
    train, test = flipped_dataset(64), flipped_dataset(32, seed=1)
    common = {
        "num_train_epochs": 12,
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 16,
        "freeze_backbone": True,
    }
    single, mixture = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = tiny_moe("llama", tokenizer, num_experts=1, top_k=1)
        single.append(
            _train(tmp_path / f"s{seed}", tokenizer, train, test, model=model, seed=seed, **common).evaluate()[
                "eval_accuracy"
            ]
        )
        torch.manual_seed(seed)
        model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2)
        mixture.append(
            _train(tmp_path / f"m{seed}", tokenizer, train, test, model=model, seed=seed, **common).evaluate()[
                "eval_accuracy"
            ]
        )
    assert min(mixture) >= 0.9, mixture
    assert sum(single) / len(single) <= 0.6, single


def test_bad_inputs_give_clear_errors(tmp_path, tokenizer):
    args = tiny_args(tmp_path)
    with pytest.raises(ValueError, match="'rejected'"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": "what", "chosen": "good"}]),
        )
    with pytest.raises(ValueError, match="empty `rejected`"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": "what", "chosen": "good", "rejected": "  "}]),
        )
    with pytest.raises(ValueError, match="user ids must all be strings or all be integers"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=args,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list([{"prompt": "what", "chosen": "good", "rejected": "bad", "user_id": 1.5}]),
        )
    classifier = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer)))
    classifier.config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels"):
        MoERewardTrainer(model=classifier, args=args, processing_class=tokenizer, train_dataset=separable_dataset(4))
    with pytest.raises(TypeError, match="MoERewardModel"):
        classifier.config.num_labels = 1
        MoERewardTrainer(model=classifier, args=args, processing_class=tokenizer, train_dataset=separable_dataset(4))
    with pytest.raises(ValueError, match="top_k"):
        tiny_args(tmp_path, num_experts=2, top_k=3)


def test_model_arguments_of_the_config_are_reported_when_a_built_model_ignores_them(tmp_path, tokenizer, caplog):
    model = tiny_moe("llama", tokenizer)  # top_k=2, no router noise
    with caplog.at_level("WARNING"):
        MoERewardTrainer(
            model=model,
            args=tiny_args(tmp_path, router_noise_std=1.0, top_k=model.config.top_k),
            train_dataset=separable_dataset(8),
            processing_class=tokenizer,
        )
    messages = [record.getMessage() for record in caplog.records if "ignored" in record.getMessage()]
    assert len(messages) == 1
    # Only the setting that disagrees with the built model is named, with the fix.
    assert "router_noise_std=1.0" in messages[0] and "top_k" not in messages[0]
    assert "MoERewardModel.from_backbone" in messages[0]
    assert model.config.router_noise_std == 0.0
    caplog.clear()
    with caplog.at_level("WARNING"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(tmp_path),
            train_dataset=separable_dataset(8),
            processing_class=tokenizer,
        )
    assert not any("ignored" in record.getMessage() for record in caplog.records)


def test_config_passes_the_checkpointing_flag_on_without_a_deprecation_warning(tmp_path):
    # TRL's RewardConfig sets the deprecated `gradient_checkpointing=True`; transformers 5.x warned on every run.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = MoERewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        off = MoERewardConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=False)
    assert default.gradient_checkpointing is True and off.gradient_checkpointing is False
    if hasattr(default, "activation_checkpointing"):
        assert (default.activation_checkpointing, off.activation_checkpointing) == (True, False)
