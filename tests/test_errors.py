"""
The bad-input matrix of `docs/errors.md`: every user-facing entry point (the trainer, `MoERewardModel.from_backbone`,
`fit_user_weights`, `ProfileStore`, `PersonalizedReward`, the CLI) against a missing column, wrong types, empty
strings, sequences that are too long, an unknown user, a corrupt file, a read-only output directory and a tokenizer
that does not match the model. One test per row of the table (the test names are in the table); each asserts the
error's text or the documented fallback, and that saved state is left byte for byte unchanged.

Read-only directories: the tests run as root, for whom `chmod` does not block writes, so a read-only location is
simulated either by a path under a regular file (`NotADirectoryError` from the OS) or by patching `os.access` (the
check the library makes before writing).
"""

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny import separable_dataset, tiny_args, tiny_bert_config, tiny_llama_config, tiny_moe, tiny_tokenizer
from transformers import LlamaForSequenceClassification
from trl import RewardConfig

from trl_moe_rm import (
    MoERewardModel,
    MoERewardModelConfig,
    MoERewardTrainer,
    ProfileStore,
    UserProfile,
    fit_user_weights,
    fit_users,
    score,
    score_pairs,
)
from trl_moe_rm.checkpoints import load_moe_reward_model
from trl_moe_rm.cli import main
from trl_moe_rm.profiles import ProfileStoreError, ProfileStoreNotWritableError, UnknownUserError
from trl_moe_rm.rewards import PersonalizedReward
from trl_moe_rm.scoring import NonFiniteRewardError


PAIR = {"prompt": "what is the sun", "chosen": "good answer", "rejected": "bad answer"}
LONG_PROMPT = " ".join(["tell me about the cat"] * 60)  # 300 words: beyond the tiny BERT's 128 positions


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def small_vocab_model(num_experts: int = 4) -> MoERewardModel:
    """A model whose backbone embeds only 10 token ids: any real text of `tiny_tokenizer` goes beyond."""
    return MoERewardModel(MoERewardModelConfig(backbone_config=tiny_llama_config(10), num_experts=num_experts))


def bert_model() -> tuple[MoERewardModel, object]:
    tokenizer = tiny_tokenizer(bert_style=True)
    return tiny_moe("bert", tokenizer), tokenizer


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Saved models (weights, config and tokenizer) for the CLI: a Llama, a BERT and one with a mismatched tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for name, (model, tok) in {
        "llama": (tiny_moe("llama", tiny_tokenizer()), tiny_tokenizer()),
        "bert": bert_model(),
        "small_vocab": (small_vocab_model(), tiny_tokenizer()),
    }.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_trainer(tmp_path, tokenizer, dataset, model=None, **overrides):
    return MoERewardTrainer(
        model=model if model is not None else tiny_moe("llama", tokenizer),
        args=tiny_args(tmp_path / "run", **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def deny_writes_to(monkeypatch, target: Path) -> None:
    """`os.access(target, W_OK)` is False, as for a read-only directory of a non-root user."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).resolve() == target.resolve() and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI, expect the usage-error exit (code 2), return its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ======================================================================================================================
# MoERewardTrainer
# ======================================================================================================================


def test_trainer_missing_column(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"has no 'rejected' column .*needs preference data"):
        make_trainer(tmp_path, tokenizer, Dataset.from_list([{"prompt": "what", "chosen": "good"}]))


def test_trainer_wrong_types(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"`chosen` must be a string or a list of chat messages .*got int"):
        make_trainer(tmp_path, tokenizer, Dataset.from_list([{**PAIR, "chosen": 3}]))
    with pytest.raises(ValueError, match=r"The `margin` column has type Value\('string'\); a margin is a number"):
        make_trainer(tmp_path, tokenizer, Dataset.from_list([{**PAIR, "margin": "big"}]))
    with pytest.raises(ValueError, match="user ids must all be strings or all be integers"):
        make_trainer(tmp_path, tokenizer, Dataset.from_list([{**PAIR, "user_id": 1.5}]))
    with pytest.raises(TypeError, match="`args` must be a MoERewardConfig, got RewardConfig"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=RewardConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none"),
            train_dataset=separable_dataset(2),
            processing_class=tokenizer,
        )
    classifier = LlamaForSequenceClassification(tiny_llama_config(len(tokenizer)))
    classifier.config.num_labels = 1
    with pytest.raises(
        TypeError, match="MoERewardTrainer trains a MoERewardModel, got LlamaForSequenceClassification"
    ):
        make_trainer(tmp_path, tokenizer, separable_dataset(2), model=classifier)


def test_trainer_empty_strings(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="Found an empty `rejected` response"):
        make_trainer(tmp_path, tokenizer, Dataset.from_list([{**PAIR, "rejected": "  "}]))


def test_trainer_longer_than_max_length(tmp_path, tokenizer, caplog):
    data = Dataset.from_list([PAIR, {**PAIR, "chosen": " ".join(["good"] * 40)}])
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(tmp_path, tokenizer, data, max_length=20)
    assert len(trainer.train_dataset) == 1  # documented fallback: dropped, with a warning
    assert any("Dropped 1 of the 2 pairs of the train dataset" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match=r"All 2 pairs of the train dataset are longer than `max_length=3` tokens"):
        make_trainer(tmp_path, tokenizer, data, max_length=3)


def test_trainer_unknown_user(tmp_path, tokenizer):
    # Per-user weights are learned for the training users; an unseen user in the eval data uses the routing.
    train = Dataset.from_list([{**row, "user_id": user} for row in separable_dataset(8) for user in ("a", "b")])
    trainer = MoERewardTrainer(
        model=tiny_moe("llama", tokenizer),
        args=tiny_args(tmp_path / "run", learn_user_weights=True, max_steps=2),
        train_dataset=train,
        eval_dataset=Dataset.from_list([{**PAIR, "user_id": "zed"}] * 2),
        processing_class=tokenizer,
    )
    trainer.train()
    assert set(trainer.user_weights()) == {"a", "b"}
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_trainer_corrupt_file(tmp_path, tokenizer, caplog):
    cache = tmp_path / "cache"
    common = {"freeze_backbone": True, "cache_features": True, "feature_cache_dir": str(cache)}
    torch.manual_seed(0)
    first = make_trainer(tmp_path, tokenizer, separable_dataset(4), **common)
    (path,) = cache.iterdir()
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a truncated cache file (killed writer, full disk)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        second = make_trainer(tmp_path, tokenizer, separable_dataset(4), **common)
    # Documented fallback: the cache is derived data; it is ignored with a warning, re-encoded and rewritten.
    assert any("Ignoring the feature cache" in record.getMessage() for record in caplog.records)
    assert path.read_bytes() == good
    torch.testing.assert_close(
        second.cached_features(second.train_dataset), first.cached_features(first.train_dataset)
    )


def test_trainer_read_only_output_dir(tmp_path, tokenizer, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="Not a directory"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(blocker / "out"),
            train_dataset=separable_dataset(2),
            processing_class=tokenizer,
        )
    assert blocker.read_text() == "keep me"
    output_dir = tmp_path / "read_only"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"previous run")
    deny_writes_to(monkeypatch, output_dir)
    with pytest.raises(PermissionError, match="is not writable, so no checkpoint or model could be saved"):
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=tiny_args(output_dir),
            train_dataset=separable_dataset(2),
            processing_class=tokenizer,
        )
    assert snapshot(output_dir) == {"model.safetensors": b"previous run"}


@pytest.mark.parametrize("cache_features", [False, True], ids=["uncached", "cached"])
def test_trainer_mismatched_tokenizer(tmp_path, tokenizer, cache_features):
    match = r"Token id \d+ is outside the backbone's vocabulary \(ids 0 to 9\): the tokenizer does not match the model"
    with pytest.raises(ValueError, match=match):
        trainer = make_trainer(
            tmp_path,
            tokenizer,
            separable_dataset(4),
            model=small_vocab_model(),
            max_steps=1,
            freeze_backbone=cache_features,
            cache_features=cache_features,  # the cache encodes at construction, the uncached path at the first step
        )
        trainer.train()


# ======================================================================================================================
# MoERewardModel.from_backbone (and the model's forward)
# ======================================================================================================================


def test_from_backbone_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Backbone path '.*no_such_model' does not exist"):
        MoERewardModel.from_backbone(str(tmp_path / "no_such_model"))


def test_from_backbone_wrong_types(tokenizer):
    backbone = tiny_moe("llama", tokenizer).backbone
    with pytest.raises(TypeError, match="`backbone` must be a model id, a local path or a PreTrainedModel, got int"):
        MoERewardModel.from_backbone(123)
    with pytest.raises(TypeError, match="already a MoERewardModel"):
        MoERewardModel.from_backbone(tiny_moe("llama", tokenizer))
    with pytest.raises(ValueError, match="`num_experts` must be a positive integer, got '8'"):
        MoERewardModel.from_backbone(backbone, num_experts="8")
    with pytest.raises(ValueError, match=r"`top_k` must be an integer between 1 and `num_experts` \(4\), got 5"):
        MoERewardModel.from_backbone(backbone, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="`router_input` must be one of"):
        MoERewardModel.from_backbone(backbone, router_input="response")


def test_from_backbone_empty_string():
    with pytest.raises(ValueError, match="`backbone` is an empty string"):
        MoERewardModel.from_backbone("")


def test_from_backbone_longer_than_positions():
    model, _ = bert_model()
    with pytest.raises(
        ValueError, match="The input has 200 tokens, but the backbone's position embeddings take at most 128"
    ):
        model(input_ids=torch.full((2, 200), 7))
    model(input_ids=torch.full((2, 128), 7))  # the limit itself is fine
    llama = tiny_moe("llama", tiny_tokenizer())  # rotary positions: no fixed limit, no error
    llama(input_ids=torch.full((2, 200), 7))


def test_from_backbone_corrupt_file(tmp_path, tokenizer):
    folder = tmp_path / "backbone"
    tiny_moe("llama", tokenizer).backbone.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 32)
    before = snapshot(folder)
    with pytest.raises(Exception, match="Error while deserializing header"):  # safetensors' own SafetensorError
        MoERewardModel.from_backbone(str(folder))
    assert snapshot(folder) == before
    (folder / "config.json").write_text("{not json")
    before = snapshot(folder)
    with pytest.raises(OSError, match="is not a valid JSON file"):
        MoERewardModel.from_backbone(str(folder))
    assert snapshot(folder) == before


def test_from_backbone_mismatched_tokenizer(tokenizer):
    model = small_vocab_model()
    ids = torch.tensor(tokenizer(["tell me about the sun"])["input_ids"] * 2)
    with pytest.raises(ValueError, match=r"Token id \d+ is outside the backbone's vocabulary \(ids 0 to 9\)"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"Token id -100 is outside the backbone's vocabulary"):
        model(input_ids=torch.tensor([[1, 2, -100]]))  # e.g. label ids passed as input ids


# ======================================================================================================================
# fit_user_weights
# ======================================================================================================================


def test_fit_user_weights_missing_column(tokenizer):
    with pytest.raises(ValueError, match=r"`pairs` has no \['rejected'\] column\(s\)"):
        fit_user_weights(tiny_moe("llama", tokenizer), [{"prompt": "what", "chosen": "good"}], tokenizer=tokenizer)


def test_fit_user_weights_wrong_types(tokenizer):
    model = tiny_moe("llama", tokenizer)
    with pytest.raises(TypeError, match="`pairs` must be a datasets.Dataset, a list of dicts or a dict of lists"):
        fit_user_weights(model, 42, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"`chosen` must be a string or a list of chat messages .*got int"):
        fit_user_weights(model, [{**PAIR, "chosen": 5}], tokenizer=tokenizer)
    with pytest.raises(
        ValueError, match=r"`method` must be one of \['gradient', 'hedge', 'hyre', 'hyre_gradient'\], got 'magic'"
    ):
        fit_user_weights(model, [PAIR], tokenizer=tokenizer, method="magic")
    for static_only in ("hyre", "hyre_gradient"):
        with pytest.raises(ValueError, match=rf"`method='{static_only}'` fits static weights; use `mode='static'`"):
            fit_user_weights(model, [PAIR], tokenizer=tokenizer, method=static_only, mode="routed")
    with pytest.raises(TypeError, match="user_id must be a str or an int, got float"):
        fit_user_weights(model, [PAIR], tokenizer=tokenizer, user_id=1.5)
    with pytest.raises(ValueError, match="Pass `tokenizer=`"):
        fit_user_weights(model, [PAIR])


def test_fit_user_weights_empty_strings(tokenizer):
    model = tiny_moe("llama", tokenizer)
    with pytest.raises(ValueError, match="Found an empty `chosen` response"):
        fit_user_weights(model, [{**PAIR, "chosen": ""}], tokenizer=tokenizer)
    with pytest.raises(ValueError, match="`pairs` is empty: fitting a user needs at least one labelled pair"):
        fit_user_weights(model, [], tokenizer=tokenizer)


def test_fit_user_weights_longer_than_positions():
    model, bert_tokenizer = bert_model()
    with pytest.raises(ValueError, match="position embeddings take at most 128"):
        fit_user_weights(model, [{**PAIR, "prompt": LONG_PROMPT}], tokenizer=bert_tokenizer)


def test_fit_user_weights_corrupt_scores(tokenizer):
    from trl_moe_rm.analysis import PairScores

    scores = PairScores.from_expert_rewards([[1.0, 0.0, 0.5]], [[0.0, 1.0, 0.5]], [[0.5, 0.5, 0.0]])
    with pytest.raises(ValueError, match=r"`scores` have K=3 experts but the model has K=4"):
        fit_user_weights(tiny_moe("llama", tokenizer), [PAIR], scores=scores)


def test_fit_user_weights_mismatched_tokenizer(tokenizer):
    with pytest.raises(ValueError, match=r"Token id \d+ is outside the backbone's vocabulary"):
        fit_user_weights(small_vocab_model(), [PAIR], tokenizer=tokenizer)


# ======================================================================================================================
# ProfileStore
# ======================================================================================================================


@pytest.fixture
def store(tmp_path) -> ProfileStore:
    store = ProfileStore(tmp_path / "profiles")
    store.save(UserProfile(user_id="alice", expert_weights=[0.5, 0.5]))
    return store


def test_profile_store_missing_field(store):
    (path,) = store.directory.iterdir()
    data = json.loads(path.read_text())
    del data["expert_weights"]
    path.write_text(json.dumps(data))
    before = snapshot(store.directory)
    with pytest.raises(ProfileStoreError, match=r"missing required field\(s\) \['expert_weights'\]"):
        store.load("alice")
    assert snapshot(store.directory) == before


def test_profile_store_wrong_types(store, tmp_path):
    before = snapshot(store.directory)
    with pytest.raises(TypeError, match="user_id must be a str or an int, got float"):
        UserProfile(user_id=1.5, expert_weights=[1.0])
    with pytest.raises(TypeError, match="got the bool True"):
        store.load(True)
    with pytest.raises(ValueError, match=r"expert_weights must sum to 1 \(got 2\)"):
        UserProfile(user_id="bob", expert_weights=[1.0, 1.0])
    with pytest.raises(TypeError, match="expected UserProfile objects, got dict"):
        store.save({"user_id": "bob", "expert_weights": [1.0]})
    with pytest.raises(ValueError, match=r"format must be one of \('json', 'safetensors'\), got 'pickle'"):
        ProfileStore(tmp_path / "other", format="pickle")
    assert snapshot(store.directory) == before


def test_profile_store_empty_strings():
    with pytest.raises(ValueError, match="user_id must be a non-empty string"):
        UserProfile(user_id="", expert_weights=[1.0])
    with pytest.raises(ValueError, match="expert_weights is empty"):
        UserProfile(user_id="bob", expert_weights=[])


def test_profile_store_too_long_id(store):
    before = snapshot(store.directory)
    with pytest.raises(ValueError, match="is too long to be stored as a file name"):
        store.save(UserProfile(user_id="x" * 1000, expert_weights=[1.0, 0.0]))
    assert snapshot(store.directory) == before


def test_profile_store_unknown_user(store):
    with pytest.raises(UnknownUserError, match="no profile for user 'bob'") as error:
        store.load("bob")
    assert isinstance(error.value, KeyError)
    assert store.get("bob") is None and store.get("bob", "default") == "default"
    with pytest.raises(UnknownUserError, match="int and str ids are distinct"):
        store.delete(7)


@pytest.mark.parametrize("store_format", ["json", "safetensors"])
def test_profile_store_corrupt_file(tmp_path, store_format):
    store = ProfileStore(tmp_path / "profiles", format=store_format)
    store.save(UserProfile(user_id="alice", expert_weights=[0.5, 0.5]))
    (path,) = (p for p in store.directory.iterdir() if p.name != ".profiles.lock")  # the table's writer lock
    path.write_bytes(path.read_bytes()[:20])  # truncated
    before = snapshot(store.directory)
    expected = "corrupt profile file" if store_format == "json" else "corrupt profile table"
    with pytest.raises(ProfileStoreError, match=rf"{expected} .*\(the file was left unchanged\)"):
        store.load("alice")
    if store_format == "safetensors":  # a write must not overwrite (and lose) the other users of a corrupt table
        with pytest.raises(ProfileStoreError, match="corrupt profile table"):
            store.save(UserProfile(user_id="bob", expert_weights=[1.0, 0.0]))
    assert snapshot(store.directory) == before


def test_profile_store_read_only_dir(store, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    with pytest.raises(ProfileStoreNotWritableError, match="is an existing file, not a directory"):
        ProfileStore(blocker)
    below = ProfileStore(blocker / "profiles")
    with pytest.raises(ProfileStoreNotWritableError, match="cannot create profile store directory"):
        below.save(UserProfile(user_id="bob", expert_weights=[1.0]))
    assert blocker.read_text() == "keep me"
    before = snapshot(store.directory)
    deny_writes_to(monkeypatch, store.directory)
    with pytest.raises(ProfileStoreNotWritableError, match="is not writable; fix its permissions"):
        store.save(UserProfile(user_id="alice", expert_weights=[1.0, 0.0]))
    with pytest.raises(ProfileStoreNotWritableError, match="is not writable"):
        store.delete("alice")
    assert snapshot(store.directory) == before
    assert isinstance(ProfileStoreNotWritableError("x"), PermissionError)


def test_profile_store_mismatched_model(store, tokenizer):
    profile = store.load("alice")  # fitted for K=2; the model has K=4
    with pytest.raises(ValueError, match="was fitted for a model with K=2 experts, this model has K=4: refit"):
        tiny_moe("llama", tokenizer).for_user(profile)
    other = UserProfile(user_id="carol", expert_weights=[0.25] * 4, config_hash="0" * 16)
    with pytest.raises(ValueError, match="config fingerprint 0000000000000000"):
        tiny_moe("llama", tokenizer).for_user(other)


# ======================================================================================================================
# PersonalizedReward
# ======================================================================================================================


@pytest.fixture
def reward(tokenizer) -> PersonalizedReward:
    profiles = {"alice": UserProfile(user_id="alice", expert_weights=[0.25] * 4)}
    return PersonalizedReward(tiny_moe("llama", tokenizer), profiles, tokenizer=tokenizer)


def test_personalized_reward_missing_column(reward):
    with pytest.raises(ValueError, match=r"reads each row's user from the `user_id` column, .*passed \['category'\]"):
        reward(prompts=["what"], completions=["good"], category=["x"])


def test_personalized_reward_wrong_types(reward, tokenizer):
    with pytest.raises(TypeError, match="`model` must be a MoERewardModel"):
        PersonalizedReward(42, {}, tokenizer=tokenizer)
    with pytest.raises(TypeError, match="`profiles` must be a ProfileStore or a dict"):
        PersonalizedReward(tiny_moe("llama", tokenizer), 42, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"`batch_size` must be a positive int \(>= 1\), got 0"):
        PersonalizedReward(tiny_moe("llama", tokenizer), {}, tokenizer=tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="Got 2 prompts, 1 completions and 1 user ids"):
        reward.score(["a", "b"], ["c"], ["alice"])
    # A non-text prompt or completion is refused (it was silently scored as its `str()` before).
    with pytest.raises(ValueError, match="`prompt` must be a string or a list of chat messages"):
        reward(prompts=[5], completions=["6"], user_id=["alice"])
    with pytest.raises(ValueError, match="mixes plain text"):
        reward(prompts=["a"], completions=[[{"role": "assistant", "content": "b"}]], user_id=["alice"])


def test_personalized_reward_empty_strings(reward):
    (value,) = reward(prompts=[""], completions=[""], user_id=["alice"])  # documented: one eos token is scored
    assert isinstance(value, float) and value == value


def test_personalized_reward_too_long(tokenizer):
    model, bert_tokenizer = bert_model()
    unlimited = PersonalizedReward(model, {}, tokenizer=bert_tokenizer)
    with pytest.raises(ValueError, match="position embeddings take at most 128.*PersonalizedReward"):
        unlimited(prompts=[LONG_PROMPT], completions=["good"], user_id=["x"])
    truncated = PersonalizedReward(model, {}, tokenizer=bert_tokenizer, max_length=64)  # documented fallback
    assert len(truncated(prompts=[LONG_PROMPT], completions=["good"], user_id=["x"])) == 1


def test_personalized_reward_unknown_user(reward, tokenizer):
    logged = {}
    rewards = reward(
        prompts=["what", "what"],
        completions=["good", "good"],
        user_id=["alice", "bob"],
        log_metric=lambda key, value: logged.__setitem__(key, value),
    )
    assert len(rewards) == 2 and reward.num_fallbacks == 1 and reward.fallbacks_by_user == {"bob": 1}
    assert logged["personalized_reward/fallbacks"] == 1.0
    strict = PersonalizedReward(tiny_moe("llama", tokenizer), {}, tokenizer=tokenizer, strict=True)
    with pytest.raises(UnknownUserError, match="No profile for user 'bob'"):
        strict(prompts=["what"], completions=["good"], user_id=["bob"])


def test_personalized_reward_corrupt_file(tmp_path, tokenizer):
    store = ProfileStore(tmp_path / "profiles")
    store.save(UserProfile(user_id="alice", expert_weights=[0.25] * 4))
    (path,) = store.directory.iterdir()
    path.write_text("{corrupt")
    before = snapshot(store.directory)
    reward = PersonalizedReward(tiny_moe("llama", tokenizer), str(store.directory), tokenizer=tokenizer)
    with pytest.raises(ProfileStoreError, match=r"corrupt profile file .*\(the file was left unchanged\)"):
        reward(prompts=["what"], completions=["good"], user_id=["alice"])
    assert snapshot(store.directory) == before
    with pytest.raises(FileNotFoundError, match=r"Model path '\./no_such_model' does not exist"):
        PersonalizedReward("./no_such_model", {}, tokenizer=tokenizer)


def test_personalized_reward_mismatched_tokenizer(tokenizer):
    reward = PersonalizedReward(small_vocab_model(), {}, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"Token id \d+ is outside the backbone's vocabulary"):
        reward(prompts=["what is the sun"], completions=["good"], user_id=["x"])
    wrong_k = {"alice": UserProfile(user_id="alice", expert_weights=[0.5, 0.5])}
    reward = PersonalizedReward(tiny_moe("llama", tokenizer), wrong_k, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="was fitted for a model with K=2 experts, this model has K=4"):
        reward(prompts=["what"], completions=["good"], user_id=["alice"])


# ======================================================================================================================
# CLI
# ======================================================================================================================


def test_cli_missing_column(model_dirs, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what"}])
    assert "The rows have no response column" in cli_error(
        capsys, ["score", "--model", str(model_dirs["llama"]), "--input", rows, "--output", str(tmp_path / "out.jsonl")]
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "what", "chosen": "good"}])
    error = cli_error(capsys, ["personalize", "--model", str(model_dirs["llama"]), "--pairs", pairs, "--user_id", "u"])
    assert "it has no 'rejected' column" in error
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_wrong_types(model_dirs, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": 5, "response": "good"}])
    out = str(tmp_path / "out.jsonl")
    assert "`prompt` must be a string or a list of chat messages" in cli_error(
        capsys, ["score", "--model", str(model_dirs["llama"]), "--input", rows, "--output", out]
    )
    assert "'abc' is not an integer" in cli_error(
        capsys, ["score", "--model", str(model_dirs["llama"]), "--input", rows, "--output", out, "--batch_size", "abc"]
    )
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "chosen": 5}])
    error = cli_error(capsys, ["personalize", "--model", str(model_dirs["llama"]), "--pairs", pairs, "--user_id", "u"])
    assert "`chosen` must be a string or a list of chat messages" in error and "got int" in error


def test_cli_empty_strings(model_dirs, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{**PAIR, "chosen": ""}])
    error = cli_error(capsys, ["personalize", "--model", str(model_dirs["llama"]), "--pairs", pairs, "--user_id", "u"])
    assert "Found an empty `chosen` response" in error
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "", "response": ""}])  # documented: scored
    assert (
        main(["score", "--model", str(model_dirs["llama"]), "--input", rows, "--output", str(tmp_path / "o.jsonl")])
        == 0
    )
    assert isinstance(json.loads((tmp_path / "o.jsonl").read_text())["reward"], float)


def test_cli_too_long(model_dirs, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": LONG_PROMPT, "response": "good"}])
    error = cli_error(
        capsys, ["score", "--model", str(model_dirs["bert"]), "--input", rows, "--output", str(tmp_path / "o.jsonl")]
    )
    assert "position embeddings take at most 128" in error
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_unknown_user(model_dirs, tmp_path, capsys):
    store = tmp_path / "store"
    ProfileStore(store).save(UserProfile(user_id="alice", expert_weights=[0.25] * 4))
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "response": "good", "user_id": "bob"}])
    out = tmp_path / "o.jsonl"
    argv = [
        "score",
        "--model",
        str(model_dirs["llama"]),
        "--input",
        rows,
        "--output",
        str(out),
        "--profiles",
        str(store),
    ]
    assert main(argv) == 0  # documented fallback: the default routing, reported on stderr
    assert "1 row(s) had no profile and used the default routing" in capsys.readouterr().err
    scored = out.read_bytes()
    assert "No profile for user 'bob'" in cli_error(capsys, argv + ["--strict"])
    assert out.read_bytes() == scored


def test_cli_corrupt_file(model_dirs, tmp_path, capsys):
    llama = str(model_dirs["llama"])
    out = tmp_path / "out.jsonl"
    out.write_text("previous output\n")
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"prompt": "what", "response": "good"}\n{"prompt": \n')
    assert "in.jsonl:2: not valid JSON" in cli_error(
        capsys, ["score", "--model", llama, "--input", str(rows), "--output", str(out)]
    )
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen"\n')
    assert "Cannot read" in cli_error(
        capsys, ["personalize", "--model", llama, "--pairs", str(pairs), "--user_id", "u"]
    )
    broken = tmp_path / "broken_model"
    broken.mkdir()
    for name in os.listdir(llama):
        (broken / name).write_bytes((Path(llama) / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 32)
    good_rows = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "what", "response": "good"}])
    error = cli_error(capsys, ["score", "--model", str(broken), "--input", good_rows, "--output", str(out)])
    assert "cannot be read" in error and "corrupt or truncated" in error
    store = tmp_path / "store"
    ProfileStore(store).save(UserProfile(user_id="bob", expert_weights=[0.25] * 4))
    (profile,) = store.iterdir()
    profile.write_text("{corrupt")
    before = snapshot(store)
    user_rows = write_jsonl(tmp_path / "users.jsonl", [{"prompt": "what", "response": "good", "user_id": "bob"}])
    error = cli_error(
        capsys, ["score", "--model", llama, "--input", user_rows, "--output", str(out), "--profiles", str(store)]
    )
    assert "corrupt profile file" in error
    assert snapshot(store) == before and out.read_text() == "previous output\n"


def test_cli_read_only_output(model_dirs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    llama = str(model_dirs["llama"])
    error = cli_error(
        capsys, ["personalize", "--model", llama, "--pairs", pairs, "--user_id", "u", "--store", str(blocker / "s")]
    )
    assert "cannot create profile store directory" in error
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "response": "good"}])
    assert "is a file, not a folder" in cli_error(
        capsys, ["score", "--model", llama, "--input", rows, "--output", str(blocker / "out.jsonl")]
    )
    assert blocker.read_text() == "keep me"


def test_cli_mismatched_tokenizer(model_dirs, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what is the sun", "response": "good"}])
    out = tmp_path / "o.jsonl"
    error = cli_error(
        capsys, ["score", "--model", str(model_dirs["small_vocab"]), "--input", rows, "--output", str(out)]
    )
    assert "is outside the backbone's vocabulary (ids 0 to 9): the tokenizer does not match the model" in error
    assert not out.exists()
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [PAIR])
    error = cli_error(
        capsys, ["personalize", "--model", str(model_dirs["small_vocab"]), "--pairs", pairs, "--user_id", "u"]
    )
    assert "the tokenizer does not match the model" in error


def test_bert_config_fixture_is_short():
    # The "too long" rows rely on the tiny BERT's 128 positions and on LONG_PROMPT exceeding them.
    assert tiny_bert_config(10).max_position_embeddings == 128
    assert len(tiny_tokenizer(bert_style=True)(LONG_PROMPT)["input_ids"]) > 128


# ======================================================================================================================
# Non-finite rewards, unvalidated numbers, and the other cases of issue 13
# ======================================================================================================================


def overflowing_fp16_model(tokenizer) -> MoERewardModel:
    """A float16 model whose expert rewards overflow float16's range (|x| <= 65504)."""
    model = tiny_moe("llama", tokenizer)
    with torch.no_grad():
        for parameter in model.experts.parameters():
            parameter.fill_(3e4)
    return model.half()


def test_nonfinite_rewards_raise_with_the_rows_and_the_cause(tokenizer):
    model = overflowing_fp16_model(tokenizer)
    reward = PersonalizedReward(model, {}, tokenizer=tokenizer)
    with pytest.raises(NonFiniteRewardError, match=r"row\(s\) 0, 1: the model runs in float16.*bfloat16 or float32"):
        reward(prompts=["what is the sun", "why"], completions=["good", "bad"], user_id=[None, None])
    with pytest.raises(NonFiniteRewardError, match="float16"):
        score(model, tokenizer, ["what"], ["good"])
    with pytest.raises(NonFiniteRewardError):
        score_pairs(model, tokenizer, Dataset.from_list([PAIR]))
    # The documented opt-in: a fixed replacement value, also under normalization (no NaN from inf - inf).
    replaced = PersonalizedReward(model, {}, tokenizer=tokenizer, nonfinite_value=0.0, normalize=True)
    values = replaced(prompts=["what", "why"], completions=["good", "bad"], user_id=[None, None])
    assert all(torch.isfinite(torch.tensor(values)))


def test_cli_score_refuses_nonfinite_rewards(tmp_path, tokenizer, capsys):
    folder = tmp_path / "nan"
    model = tiny_moe("llama", tokenizer)
    with torch.no_grad():
        next(model.experts.parameters()).fill_(float("nan"))  # a diverged run: NaN in any dtype
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "completion": "good"}])
    error = cli_error(capsys, ["score", "--model", str(folder), "--input", rows, "--output", str(tmp_path / "o.jsonl")])
    assert "NaN or infinite" in error and not (tmp_path / "o.jsonl").exists()


def test_numbers_are_validated_at_the_boundary(tmp_path, tokenizer):
    model = tiny_moe("llama", tokenizer)
    with pytest.raises(ValueError, match="`beta` .* must be a finite number >= 0, got -5.0"):
        model.for_user(UserProfile(user_id="u", expert_weights=[0.25] * 4), mode="routed", beta=-5.0)
    with pytest.raises(ValueError, match="`beta`"):
        model.for_user([0.25] * 4, beta=float("nan"))
    config = model.config.to_dict()
    config["router_temperature"] = float("nan")
    with pytest.raises(ValueError, match="`router_temperature` must be a finite number > 0, got nan"):
        MoERewardModelConfig(**{k: v for k, v in config.items() if k != "model_type"})
    with pytest.raises(ValueError, match="`max_length` must be an int >= 2"):
        PersonalizedReward(model, {}, tokenizer=tokenizer, max_length=0)
    with pytest.raises(ValueError, match="`batch_size` must be a positive int"):
        score(model, tokenizer, ["a"], ["b"], batch_size=-1)
    # TRL's configs default to bf16; without bf16 support (this CPU machine) the config falls back to float32.
    from transformers.utils import is_torch_bf16_gpu_available

    from trl_moe_rm import MoERewardConfig

    if not is_torch_bf16_gpu_available():
        assert MoERewardConfig(output_dir=str(tmp_path / "out")).bf16 is False


def test_unknown_backbone_model_type_and_missing_tokenizer(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="model_type 'no_such_arch' is unknown to this transformers version"):
        MoERewardModelConfig(backbone_config={"model_type": "no_such_arch"})
    folder = tmp_path / "no_tokenizer"
    tiny_moe("llama", tokenizer).save_pretrained(folder)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        PersonalizedReward(load_moe_reward_model(folder), {})


def test_empty_inputs_give_clear_errors(tmp_path, tokenizer, capsys):
    with pytest.raises(ValueError, match="The train dataset is empty"):
        make_trainer(tmp_path, tokenizer, Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    model_dir = tmp_path / "model"
    tiny_moe("llama", tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    error = cli_error(capsys, ["personalize", "--model", str(model_dir), "--pairs", str(empty), "--user_id", "u"])
    assert "is empty" in error
    error = cli_error(capsys, ["analyze", "--model", str(model_dir), "--dataset", str(empty), "--output_dir",
                               str(tmp_path / "a")])
    assert "is empty" in error
    with pytest.raises(ValueError, match="mix types"):
        fit_users(tiny_moe("llama", tokenizer), [{**PAIR, "user_id": 1}, {**PAIR, "user_id": "x"}], tokenizer=tokenizer)


def test_demo_checks_its_backbone_before_writing(tmp_path, capsys):
    output = tmp_path / "demo"
    error = cli_error(capsys, ["demo", "--backbone", "no-such/backbone", "--output_dir", str(output), "--quick"])
    assert "is not a folder" in error and not output.exists()
