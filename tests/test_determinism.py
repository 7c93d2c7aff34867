"""
Determinism and equivalence on CPU:

- two runs with the same seed give bitwise-equal routing, losses and weights (router noise on, so the RNG matters);
- a run interrupted after a checkpoint and resumed from it ends with the same weights as an uninterrupted run;
- the frozen-backbone fast path (`cache_features=True`) follows the same trajectory as the uncached frozen path, and
  what it saves is an ordinary `MoERewardModel` that reloads with identical scores.

Nothing here is timed (the speed of the fast path is measured by `benchmarks/feature_cache.py`).
"""

import pytest
import torch
from safetensors import safe_open
from tiny import separable_dataset, tiny_args, tiny_moe, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, TrainerCallback

from trl_moe_rm import MoERewardModel, MoERewardTrainer
from trl_moe_rm.analysis import score_pairs


ROUTER_NOISE = {"router_noise_std": 0.5}


def make_trainer(
    output_dir, backbone="llama", model_seed=0, train=None, eval_dataset=None, callbacks=None, **overrides
):
    tokenizer = tiny_tokenizer(bert_style=backbone == "bert")
    torch.manual_seed(model_seed)
    model = tiny_moe(backbone, tokenizer, **{k: overrides.pop(k) for k in list(overrides) if k in ROUTER_NOISE})
    defaults = {
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "seed": 7,
        "data_seed": 7,
        "sparsity_coef": 0.01,
        "diversity_coef": 0.01,
    }
    defaults.update(overrides)
    return MoERewardTrainer(
        model=model,
        args=tiny_args(output_dir, **defaults),
        train_dataset=train if train is not None else separable_dataset(16),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def losses_of(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def head_state(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def fixed_batch(trainer):
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(4)])
    return {key: value for key, value in batch.items() if key != "user_ids"}


def assert_states_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"tensors differ: {different[:5]}"


# ----------------------------------------------------------------------------------------------------------------------
# Same seed, same result
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["reward_mixture", "assignment"])
def test_two_runs_with_the_same_seed_are_bitwise_equal(tmp_path, loss_type):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tmp_path / name, loss_type=loss_type, max_steps=6, **ROUTER_NOISE)
        trainer.train()
        model = trainer.model
        batch = fixed_batch(trainer)
        model.train()  # noisy routing: it must repeat under the same seed too
        torch.manual_seed(123)
        with torch.no_grad():
            noisy = model(**batch).routing_weights
        model.eval()
        with torch.no_grad():
            output = model(**batch)
        runs.append((losses_of(trainer), head_state(model), noisy, output.routing_weights, output.logits))
    (losses_a, state_a, noisy_a, routing_a, logits_a), (losses_b, state_b, noisy_b, routing_b, logits_b) = runs
    assert len(losses_a) == 6 and losses_a == losses_b  # exact float equality, step by step
    assert_states_equal(state_a, state_b)
    assert torch.equal(noisy_a, noisy_b) and torch.equal(routing_a, routing_b) and torch.equal(logits_a, logits_b)
    assert ((routing_a > 0).sum(-1) == 2).all()


def test_a_different_seed_changes_the_run(tmp_path):
    # The converse, so that the equality above is not vacuous.
    first = make_trainer(tmp_path / "a", max_steps=3, **ROUTER_NOISE)
    second = make_trainer(tmp_path / "b", max_steps=3, seed=8, data_seed=8, **ROUTER_NOISE)
    first.train()
    second.train()
    assert losses_of(first) != losses_of(second)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoint and resume
# ----------------------------------------------------------------------------------------------------------------------


class StopAfter(TrainerCallback):
    """Simulates an interruption: stop right after the step whose checkpoint is written."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("cache_features", [False, True], ids=["uncached", "cached"])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path, cache_features):
    # 16 pairs, 4 per step: 4 steps per epoch, so the interruption (step 3) is in the middle of an epoch and the
    # resumed run must skip the batches already seen and restore the optimizer, the scheduler and the RNG (noise).
    common = {"max_steps": 7, "freeze_backbone": cache_features, "cache_features": cache_features, **ROUTER_NOISE}
    reference = make_trainer(tmp_path / "full", **common)
    reference.train()

    interrupted = make_trainer(
        tmp_path / "interrupted", save_strategy="steps", save_steps=3, callbacks=[StopAfter(3)], **common
    )
    interrupted.train()
    assert interrupted.state.global_step == 3
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file()

    # A fresh process rebuilds the trainer from the same (pretrained, here seeded) backbone; the head is re-initialised
    # differently, so the equality below proves that the trained weights come from the checkpoint. (With
    # `cache_features=True` the features are encoded when the trainer is built, from the backbone it is given: the
    # frozen backbone of the checkpoint is that same backbone.)
    resumed = make_trainer(tmp_path / "interrupted", **common)
    with torch.no_grad():
        for parameter in [*resumed.model.router.parameters(), *resumed.model.experts.parameters()]:
            parameter.normal_(0.0, 1.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 7
    assert_states_equal(head_state(reference.model), head_state(resumed.model))
    assert losses_of(reference)[3:] == losses_of(resumed)[-4:]


def test_resume_with_cached_features_re_encodes_when_the_backbone_differs(tmp_path, caplog):
    # The trainer is rebuilt on another backbone (seed 1) than the checkpoint's (seed 0): the features it cached at
    # construction are stale once the checkpoint is loaded, so they must be encoded again with the checkpoint's backbone.
    common = {"max_steps": 7, "freeze_backbone": True, "cache_features": True, "eval_strategy": "no"}
    held_out = separable_dataset(8, seed=3)
    reference = make_trainer(tmp_path / "full", eval_dataset=held_out, **common)
    reference.train()
    interrupted = make_trainer(
        tmp_path / "interrupted", eval_dataset=held_out, save_strategy="steps", save_steps=3, callbacks=[StopAfter(3)],
        **common,
    )
    interrupted.train()

    resumed = make_trainer(tmp_path / "interrupted", model_seed=1, eval_dataset=held_out, **common)
    stale = resumed.cached_features(resumed.eval_dataset)["chosen_features"].clone()
    with caplog.at_level("WARNING"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "interrupted" / "checkpoint-3"))
    assert any("encoding the train and eval data again" in record.getMessage() for record in caplog.records)
    assert losses_of(reference)[3:] == losses_of(resumed)[-4:]
    assert_states_equal(head_state(reference.model), head_state(resumed.model))
    for dataset in ("train_dataset", "eval_dataset"):
        expected = reference.cached_features(getattr(reference, dataset))
        got = resumed.cached_features(getattr(resumed, dataset))
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    assert not torch.equal(stale, resumed.cached_features(resumed.eval_dataset)["chosen_features"])


# ----------------------------------------------------------------------------------------------------------------------
# The frozen-backbone fast path follows the uncached path
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_cached_and_uncached_frozen_paths_agree(tmp_path, backbone):
    """
    Same seed, same data order: the cached path must reproduce the uncached frozen path up to float rounding (the
    cache encodes in bigger, differently padded batches). Dropout is off (TRL's `disable_dropout=True` default), as the
    cache encodes in eval mode; the BERT backbone also checks the separate prompt encoding of encoders.
    """
    train = separable_dataset(16)
    test = separable_dataset(8, seed=3)
    trainers = {}
    for cached in (False, True):
        trainer = make_trainer(
            tmp_path / str(cached),
            backbone=backbone,
            train=train,
            eval_dataset=test,
            num_train_epochs=2,
            freeze_backbone=True,
            cache_features=cached,
            logging_steps=1,
        )
        trainer.train()
        trainers[cached] = trainer
    uncached, cached = trainers[False], trainers[True]
    assert len(losses_of(cached)) == len(losses_of(uncached)) == 8
    torch.testing.assert_close(losses_of(cached), losses_of(uncached), rtol=1e-5, atol=1e-6)
    state_cached, state_uncached = head_state(cached.model), head_state(uncached.model)
    steps, learning_rate = 8, cached.args.learning_rate
    for name in state_cached:
        if name == "experts.bias":
            # The expert bias cancels in r(chosen) - r(rejected): its Bradley-Terry gradient is exactly 0, and what
            # reaches it is float32 rounding (~1e-9) of opposite sign on the two paths. Adam divides each coordinate by
            # its own gradient scale, so that noise moves it by up to `lr` per step on either path: the bias may differ
            # by at most 2 * lr * steps, and carries no signal to compare.
            bound = 2 * learning_rate * steps
            assert (state_cached[name] - state_uncached[name]).abs().max() <= bound, name
            continue
        # The weights get real gradients; the two paths differ by float32 rounding of features encoded in differently
        # padded batches (~1e-6 relative), which 8 Adam steps keep within 1e-4 relative.
        torch.testing.assert_close(state_cached[name], state_uncached[name], rtol=1e-4, atol=1e-6, msg=name)
    initial = head_state(make_trainer(tmp_path / "init", backbone=backbone).model)
    assert not torch.equal(initial["experts.weight"], state_cached["experts.weight"])  # the head trained ...
    backbone_names = [name for name in initial if name.startswith("backbone.")]
    assert all(torch.equal(initial[name], state_cached[name]) for name in backbone_names)  # ... the backbone did not

    # Logging and evaluation work on the fast path, with the same metrics as the uncached path.
    logged = cached.state.log_history[0]
    assert {"loss", "moe/preference_loss", "moe/load/expert_0", "moe/routing_entropy"} <= set(logged)
    metrics_cached, metrics_uncached = cached.evaluate(), uncached.evaluate()
    assert metrics_cached.keys() == metrics_uncached.keys()
    for key in ("eval_loss", "eval_accuracy", "eval_moe/load/expert_0"):
        assert metrics_cached[key] == pytest.approx(metrics_uncached[key], rel=1e-4, abs=1e-6), key

    # The saved model is an ordinary MoERewardModel (backbone included) that reloads with identical scores.
    cached.save_model(str(tmp_path / "saved"))
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), framework="pt") as file:
        keys = set(file.keys())
    assert any(key.startswith("backbone.") for key in keys) and {"router.weight", "experts.weight"} <= keys
    reloaded = MoERewardModel.from_pretrained(str(tmp_path / "saved")).eval()
    auto = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved")).eval()
    assert type(reloaded) is MoERewardModel and type(auto) is MoERewardModel
    tokenizer = cached.processing_class
    before = score_pairs(cached.model, tokenizer, test)
    after = score_pairs(reloaded, tokenizer, test)
    assert (before.chosen_rewards == after.chosen_rewards).all()
    assert (before.routing_weights == after.routing_weights).all()
    # ... and they are the scores of the cached features it was trained on.
    features = cached.cached_features(cached.eval_dataset)
    with torch.no_grad():
        from_cache = reloaded(
            sequence_features=torch.cat([features["chosen_features"], features["rejected_features"]]),
            router_features=features["router_features"],
            paired=True,
        ).logits[: len(test), 0]
    torch.testing.assert_close(from_cache.double().numpy(), before.chosen_rewards, rtol=1e-4, atol=1e-5)


def test_cache_features_warns_that_it_encodes_without_dropout(tmp_path, caplog):
    # The cache encodes in eval mode: it matches the uncached path only with TRL's default `disable_dropout=True`.
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, backbone="bert", freeze_backbone=True, cache_features=True, disable_dropout=False)
    assert any("the backbone's dropout is not applied" in record.getMessage() for record in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, backbone="bert", freeze_backbone=True, cache_features=True)
    assert not any("dropout" in record.getMessage() for record in caplog.records)
