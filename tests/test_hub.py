"""Hub upload (one commit), model card, and safe loading, against an in-memory fake of the Hub (no network)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects
from tiny import separable_dataset, tiny_args, tiny_moe, tiny_tokenizer

from trl_moe_rm import MoERewardModel, MoERewardTrainer, ProfileStore, UserProfile
from trl_moe_rm.analysis import describe_experts, score_pairs
from trl_moe_rm.checkpoints import load_moe_reward_model
from trl_moe_rm.configuration_moe_reward import config_fingerprint
from trl_moe_rm.hub import (
    HubOfflineError,
    UnsafeFilesError,
    find_pickle_files,
    load_from_hub,
    prepare_hub_folder,
    push_moe_reward_model,
)
from trl_moe_rm.loading import HUB_FILE_PATTERNS
from trl_moe_rm.model_card import CITATION, PAPER_ARXIV_ID
from trl_moe_rm.plots import plot_routing_heatmap


CODE_AND_MODEL = {"config.json", "model.safetensors", "configuration_moe_reward.py", "modeling_moe_reward.py"}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


class FakeHub:
    """
    Replaces the `HfApi` calls that `trl_moe_rm.hub` makes (and `snapshot_download`) by an in-memory store of
    repositories, so that a push can be inspected and loaded back. A commit's files are read while it is made (the
    staging folder is deleted afterwards), exactly as the real upload would.
    """

    def __init__(self, root: Path, user: str = "test-user"):
        self.root = root
        self.user = user
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.snapshots: list[dict] = []

    def install(self, monkeypatch) -> "FakeHub":
        hub = self

        def whoami(api, token=None, **kwargs):
            return {"name": hub.user}

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            full = repo_id if "/" in repo_id else f"{hub.user}/{repo_id}"
            hub.created.append({"repo_id": full, "private": private, "token": token, "exist_ok": exist_ok})
            hub.repos.setdefault(full, {})
            return SimpleNamespace(repo_id=full)

        def create_commit(api, repo_id, operations, *, commit_message, **kwargs):
            operations = list(operations)
            files = {}
            deleted = []
            for operation in operations:
                if isinstance(operation, CommitOperationAdd):
                    files[operation.path_in_repo] = Path(operation.path_or_fileobj).read_bytes()
                elif isinstance(operation, CommitOperationDelete):
                    deleted.append(operation.path_in_repo)
            hub.commits.append(
                {"repo_id": repo_id, "files": files, "deleted": deleted, "message": commit_message, "kwargs": kwargs}
            )
            repo = hub.repos.setdefault(repo_id, {})
            for path in deleted:
                repo.pop(path, None)
            repo.update(files)
            return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(hub.commits)}")

        def create_branch(api, repo_id, *, branch, **kwargs):
            hub.branches.append((repo_id, branch))

        def list_repo_files(api, repo_id, *, revision=None, token=None, **kwargs):
            if repo_id not in hub.repos:
                from huggingface_hub.errors import RepositoryNotFoundError

                raise RepositoryNotFoundError(f"{repo_id} not found", response=None)
            return sorted(hub.repos[repo_id])

        def snapshot_download(repo_id, *, allow_patterns=None, revision=None, token=None, **kwargs):
            hub.snapshots.append({"repo_id": repo_id, "allow_patterns": allow_patterns})
            target = hub.root / "snapshots" / repo_id.replace("/", "--") / str(len(hub.snapshots))
            for path in filter_repo_objects(sorted(hub.repos[repo_id]), allow_patterns=allow_patterns):
                (target / path).parent.mkdir(parents=True, exist_ok=True)
                (target / path).write_bytes(hub.repos[repo_id][path])
            target.mkdir(parents=True, exist_ok=True)
            return str(target)

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the fake Hub is online
        monkeypatch.setattr(HfApi, "whoami", whoami)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
        return self

    def materialize(self, repo_id: str, folder: Path) -> Path:
        """Writes the files of a repository into a local folder."""
        for path, data in self.repos[repo_id].items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        return folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return FakeHub(tmp_path / "fake_hub").install(monkeypatch)


@pytest.fixture
def no_token(monkeypatch):
    """No token anywhere: not in the environment, not from `hf auth login`."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


@pytest.fixture(scope="module")
def trained():
    """A tiny MoE reward model and tokenizer (random weights: the scores only need to be reproducible)."""
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    return tiny_moe("llama", tokenizer).eval(), tokenizer


PAIRS = {
    "prompt": ["explain the sun", "what is a cat", "tell me about the moon"],
    "chosen": ["good one two", "good cat", "good"],
    "rejected": ["bad one two", "bad dog", "bad five"],
}


def _scores(model, tokenizer):
    return score_pairs(model, tokenizer, PAIRS)


def _store(path, model, users=("alice", 7)):
    store = ProfileStore(path)
    fingerprint = config_fingerprint(model.config)
    for number, user in enumerate(users):
        weights = torch.softmax(torch.arange(model.config.num_experts, dtype=torch.float64) * (number + 1), 0)
        store.save(UserProfile(user, weights.tolist(), method="hedge", num_shots=3, config_hash=fingerprint))
    return store


def _heatmap(path):
    return plot_routing_heatmap([[0.9, 0.1, 0.0, 0.0], [0.0, 0.0, 0.2, 0.8]], ["concise", "formal"], path)


# ----------------------------------------------------------------------------------------------------------------------
# One commit with exactly the expected files, and a model card that says what it should
# ----------------------------------------------------------------------------------------------------------------------


def test_push_is_one_commit_with_everything_and_loads_back_identically(trained, fake_hub, tmp_path):
    model, tokenizer = trained
    store = _store(tmp_path / "store", model)
    scores = _scores(model, tokenizer)
    descriptions = describe_experts(scores, PAIRS, top_n_words=3)
    eval_results = {"eval_loss": 0.41, "eval_accuracy": 0.875, "eval_runtime": 3.2, "epoch": 2.0}
    load = [0.4, 0.3, 0.2, 0.1]

    result = push_moe_reward_model(
        model,
        "me/tiny-moe-rm",
        tokenizer=tokenizer,
        profiles=store,
        descriptions=descriptions,
        eval_results=eval_results,
        routing_heatmap=_heatmap(tmp_path / "heatmap.png"),
        expert_load=load,
        token="hf_test_token",
        private=True,
        dataset_name="trl-lib/ultrafeedback_binarized",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
    )
    assert result.commit_url.startswith("https://huggingface.co/me/tiny-moe-rm/commit/")
    assert fake_hub.created == [
        {"repo_id": "me/tiny-moe-rm", "private": True, "token": "hf_test_token", "exist_ok": True}
    ]
    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    profile_files = {f"profiles/{name}" for name in os.listdir(store.directory)}
    assert len(profile_files) == 2
    assert set(commit["files"]) == (
        CODE_AND_MODEL | TOKENIZER_FILES | profile_files | {"experts.json", "routing_heatmap.png", "README.md"}
    )
    assert commit["deleted"] == []
    assert not find_pickle_files(commit["files"])

    config = json.loads(commit["files"]["config.json"])
    assert config["model_type"] == "moe_reward"
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_moe_reward.MoERewardModel"
    package = Path(sys.modules[MoERewardModel.__module__].__file__).parent
    for name in ("modeling_moe_reward.py", "configuration_moe_reward.py"):
        assert commit["files"][name] == (package / name).read_bytes()
    experts = json.loads(commit["files"]["experts.json"])
    assert experts["num_experts"] == 4 and experts["top_k"] == 2
    assert [e["load"] for e in experts["experts"]] == load
    assert [e["description"] for e in experts["experts"]] == [d.summary for d in descriptions]
    assert all("examples" not in e for e in experts["experts"])  # the data's text is not published

    card_text = commit["files"]["README.md"].decode()
    card = ModelCard(card_text)
    assert {"trl", "reward-model", "mixture-of-experts", "personalization"} <= set(card.data.tags)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert card.data.datasets == ["trl-lib/ultrafeedback_binarized"]
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"loss": 0.41, "accuracy": 0.875}  # bookkeeping (runtime, epoch) is dropped
    assert "| 0 | 0.400 | " + descriptions[0].summary.replace("|", "\\|") + " |" in card_text
    assert "![Mean routing weight of each expert per category](routing_heatmap.png)" in card_text
    assert "| accuracy | 0.875 |" in card_text
    assert 'from_pretrained("me/tiny-moe-rm", trust_remote_code=True)' in card_text
    assert "fit_user_weights(bundle.model, pairs" in card_text
    assert "from trl_moe_rm.rewards import PersonalizedReward" in card_text
    assert 'ProfileStore.from_pretrained("me/tiny-moe-rm")' in card_text
    assert "(2 users)" in card_text
    assert CITATION in card_text and f"arXiv {PAPER_ARXIV_ID}" in card_text
    assert "Sparse Mixture-of-Experts Reward Models Learn Interpretable and Specialized Experts" in card_text

    # What was uploaded is all one needs: load it back, with the same scores, profiles and descriptions.
    folder = fake_hub.materialize("me/tiny-moe-rm", tmp_path / "downloaded")
    bundle = load_from_hub(folder)
    reloaded = _scores(bundle.model, bundle.tokenizer)
    assert (reloaded.chosen_rewards == scores.chosen_rewards).all()
    assert (reloaded.expert_deltas == scores.expert_deltas).all()
    assert (reloaded.routing_weights == scores.routing_weights).all()
    assert sorted(bundle.profiles.list(), key=str) == sorted(store.list(), key=str)
    assert bundle.profiles.load("alice").expert_weights == store.load("alice").expert_weights
    assert bundle.experts == experts["experts"]
    user_scores = _scores(bundle.model.for_user(bundle.profiles.load(7)), bundle.tokenizer)
    assert (user_scores.chosen_rewards == _scores(model.for_user(store.load(7)), tokenizer).chosen_rewards).all()


def test_push_by_hub_id_round_trip_and_profiles_from_pretrained(trained, fake_hub, tmp_path):
    model, tokenizer = trained
    store = _store(tmp_path / "store", model, users=("bob",))
    model.push_to_hub("tiny", tokenizer=tokenizer, profiles=store.directory, token="hf_x")  # the model's own method
    assert [c["repo_id"] for c in fake_hub.commits] == ["test-user/tiny"]  # the namespace comes from the Hub
    card = fake_hub.repos["test-user/tiny"]["README.md"].decode()
    assert 'from_pretrained("test-user/tiny", trust_remote_code=True)' in card  # the card names the full id

    bundle = load_from_hub("test-user/tiny")
    patterns = fake_hub.snapshots[-1]["allow_patterns"]
    assert not any(pattern.endswith((".bin", ".pt", ".pkl")) for pattern in patterns)
    assert (_scores(bundle.model, bundle.tokenizer).chosen_rewards == _scores(model, tokenizer).chosen_rewards).all()
    assert ProfileStore.from_pretrained("test-user/tiny").list() == ["bob"]
    assert isinstance(load_moe_reward_model("test-user/tiny"), MoERewardModel)


def test_push_without_descriptions_still_describes_the_layout(trained, fake_hub):
    model, _ = trained
    push_moe_reward_model(model, "me/bare", token="t")
    files = fake_hub.commits[0]["files"]
    assert set(files) == CODE_AND_MODEL | {"experts.json", "README.md"}
    experts = json.loads(files["experts.json"])["experts"]
    assert [e["description"] for e in experts] == [None] * 4
    card = files["README.md"].decode()
    assert "not described" in card and "model-index" not in card and "## Evaluation" not in card
    assert "This repository holds no tokenizer" in card


def test_repushing_profiles_deletes_stale_ones_in_the_same_commit(trained, fake_hub, tmp_path):
    model, tokenizer = trained
    push_moe_reward_model(
        model, "me/m", tokenizer=tokenizer, profiles=_store(tmp_path / "a", model, ("x", "y")), token="t"
    )
    push_moe_reward_model(
        model, "me/m", tokenizer=tokenizer, profiles=_store(tmp_path / "b", model, ("y",)), token="t"
    )
    assert len(fake_hub.commits) == 2
    second = fake_hub.commits[1]
    assert len(second["deleted"]) == 1 and second["deleted"][0].startswith("profiles/")
    assert ProfileStore.from_pretrained("me/m").list() == ["y"]


def _is_moe_card(text: str, repo_id: str) -> bool:
    return f'from_pretrained("{repo_id}", trust_remote_code=True)' in text and "## Experts" in text


def test_push_from_a_trainer(fake_hub, tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    dataset = separable_dataset(16)
    args = tiny_args(
        tmp_path / "out",
        num_train_epochs=1,
        hub_model_id="me/trained",
        hub_token="hf_args_token",
        save_strategy="steps",
        save_steps=2,
    )
    trainer = MoERewardTrainer(
        model=tiny_moe("llama", tokenizer),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    # Every checkpoint writes the MoE card (TRL's generic one said "fine-tuned version of [None]"), to output_dir and
    # into the checkpoint, which loads on its own (its trainer-state pickles are never opened).
    for folder in (tmp_path / "out", tmp_path / "out" / "checkpoint-2"):
        card = (folder / "README.md").read_text()
        assert _is_moe_card(card, "me/trained") and "[None]" not in card and 'model="None"' not in card
    assert isinstance(load_moe_reward_model(tmp_path / "out" / "checkpoint-2"), MoERewardModel)
    metrics = trainer.evaluate()
    trainer.save_model()
    assert _is_moe_card((tmp_path / "out" / "README.md").read_text(), "me/trained")
    trainer.push_to_hub(descriptions={"1": "likes 'good'"}, dataset_name="separable")

    assert len(fake_hub.commits) == 1
    commit = fake_hub.commits[0]
    assert commit["repo_id"] == "me/trained" and commit["message"] == "End of training"
    assert fake_hub.created[0]["token"] == "hf_args_token"
    assert set(commit["files"]) == CODE_AND_MODEL | TOKENIZER_FILES | {"experts.json", "README.md"}
    assert (tmp_path / "out" / "training_args.bin").exists()  # written by save_model, never uploaded
    experts = json.loads(commit["files"]["experts.json"])["experts"]
    assert experts[1]["description"] == "likes 'good'"
    assert [e["load"] for e in experts] == pytest.approx([metrics[f"eval_moe/load/expert_{k}"] for k in range(4)])
    card = ModelCard(commit["files"]["README.md"].decode())
    assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == pytest.approx(
        metrics["eval_accuracy"]
    )
    assert "moe-reward" in card.data.tags  # the trainer's own tags are kept
    assert (tmp_path / "out" / "README.md").read_bytes() == commit["files"]["README.md"]  # one card, kept locally

    bundle = load_from_hub(fake_hub.materialize("me/trained", tmp_path / "dl"))
    assert (
        _scores(bundle.model, bundle.tokenizer).chosen_rewards == _scores(trainer.model, tokenizer).chosen_rewards
    ).all()


def test_prepare_hub_folder_from_a_saved_folder_matches_the_upload(trained, tmp_path):
    model, tokenizer = trained
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    torch.save({"not": "uploaded"}, tmp_path / "saved" / "training_args.bin")  # a trainer output folder has one
    files = prepare_hub_folder(
        tmp_path / "saved", tmp_path / "repo", repo_id="me/x", descriptions=["a", "b", "c", "d"]
    )
    assert set(files) == CODE_AND_MODEL | TOKENIZER_FILES | {"experts.json", "README.md"}
    assert set(files) == {
        p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*") if p.is_file()
    }
    with pytest.raises(ValueError, match="new or empty folder"):
        prepare_hub_folder(model, tmp_path / "repo")


def test_code_files_and_auto_map_are_added_when_missing(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "saved")
    for name in ("modeling_moe_reward.py", "configuration_moe_reward.py"):
        (tmp_path / "saved" / name).unlink()
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    config.pop("auto_map")
    (tmp_path / "saved" / "config.json").write_text(json.dumps(config))
    prepare_hub_folder(tmp_path / "saved", tmp_path / "repo")
    assert {"modeling_moe_reward.py", "configuration_moe_reward.py"} <= set(os.listdir(tmp_path / "repo"))
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_moe_reward.MoERewardModelConfig"


# ----------------------------------------------------------------------------------------------------------------------
# trust_remote_code without trl_moe_rm
# ----------------------------------------------------------------------------------------------------------------------


def test_uploaded_repo_loads_with_trust_remote_code_without_the_package(trained, fake_hub, tmp_path):
    model, tokenizer = trained
    push_moe_reward_model(model, "me/remote", tokenizer=tokenizer, token="t")
    folder = fake_hub.materialize("me/remote", tmp_path / "remote")
    batch = {
        "input_ids": torch.tensor([tokenizer("explain the sun good one")["input_ids"]]),
        "prompt_lengths": torch.tensor([4]),
    }
    with torch.no_grad():
        expected = model(**batch).logits
    torch.save(batch, tmp_path / "batch.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["trl_moe_rm"] = None  # importing trl_moe_rm now fails
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        try:
            import trl_moe_rm  # noqa: F401
            raise SystemExit("trl_moe_rm should not be importable here")
        except ImportError:
            pass
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        AutoTokenizer.from_pretrained({str(folder)!r})
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, torch.load({str(tmp_path / "expected.pt")!r}))
        try:
            model.push_to_hub("me/again", profiles="profiles")
            raise SystemExit("push_to_hub with trl_moe_rm arguments should need trl_moe_rm")
        except ImportError as error:
            assert "needs the trl_moe_rm package" in str(error), error
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# Loading never unpickles
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pytorch_model.bin", "extra.pkl", "weights.pt", "state.pickle"])
def test_local_folder_with_pickles_is_refused(trained, tmp_path, name):
    model, tokenizer = trained
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeFilesError, match="only loads safetensors and JSON") as error:
        load_moe_reward_model(tmp_path / "model")
    assert name in str(error.value)
    with pytest.raises(UnsafeFilesError, match=name.replace(".", r"\.")):
        load_from_hub(tmp_path / "model")
    with pytest.raises(UnsafeFilesError):  # nor is it uploaded
        prepare_hub_folder(tmp_path / "model", tmp_path / "repo")


def test_loader_refuses_subfolder_and_adapters_without_safetensors(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="does not take `subfolder=`"):
        load_moe_reward_model(tmp_path, subfolder="model")
    (tmp_path / "model" / "model.safetensors").unlink()
    (tmp_path / "model" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    with pytest.raises(FileNotFoundError, match="has no adapter_model.safetensors"):
        load_moe_reward_model(tmp_path / "model")


def test_trainer_state_files_are_ignored_not_refused(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "model")
    torch.save({"x": 1}, tmp_path / "model" / "training_args.bin")
    (tmp_path / "model" / "global_step3").mkdir()
    torch.save({"x": 1}, tmp_path / "model" / "global_step3" / "mp_rank_00_model_states.pt")
    assert isinstance(load_moe_reward_model(tmp_path / "model"), MoERewardModel)
    assert find_pickle_files(["training_args.bin", "global_step3/a.pt", "sub/training_args.bin", "a.PT"]) == [
        "a.PT",
        "sub/training_args.bin",
    ]


def test_hub_repo_with_pickles_is_refused_before_download(trained, fake_hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The online path lists the repo's files before downloading anything (CI exports HF_HUB_OFFLINE=1).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    model, tokenizer = trained
    push_moe_reward_model(model, "me/unsafe", tokenizer=tokenizer, token="t")
    fake_hub.repos["me/unsafe"]["pytorch_model.bin"] = b"\x80\x04K\x01."
    with pytest.raises(UnsafeFilesError, match="pytorch_model.bin"):
        load_from_hub("me/unsafe")
    with pytest.raises(UnsafeFilesError, match="Hub repository 'me/unsafe'"):
        load_moe_reward_model("me/unsafe")
    assert fake_hub.snapshots == []


def test_repo_that_is_not_a_moe_reward_model_is_refused(fake_hub, tmp_path):
    fake_hub.repos["org/llama"] = {
        "config.json": json.dumps({"model_type": "llama"}).encode(),
        "model.safetensors": b"",
    }
    with pytest.raises(ValueError, match="model_type='llama', expected 'moe_reward'"):
        load_from_hub("org/llama")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a MoE reward model"):
        load_moe_reward_model(tmp_path / "llama")
    with pytest.raises(ValueError, match="not a MoE reward model"):
        prepare_hub_folder(tmp_path / "llama", tmp_path / "repo")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_push_without_a_token_says_how_to_log_in(trained, fake_hub, no_token):
    model, _ = trained
    with pytest.raises(ValueError) as error:
        push_moe_reward_model(model, "me/x")
    message = str(error.value)
    assert "hf auth login" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert fake_hub.commits == [] and fake_hub.created == []


def test_token_from_the_environment_is_used(trained, fake_hub, monkeypatch):
    model, _ = trained
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    push_moe_reward_model(model, "me/env")
    assert fake_hub.created[0]["token"] == "hf_from_env"


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad--id", "-dash", "name.git", "with space", ""])
def test_invalid_repo_id(trained, fake_hub, repo_id):
    model, _ = trained
    with pytest.raises(ValueError, match="not a valid Hub repository id|non-empty string"):
        push_moe_reward_model(model, repo_id, token="t")
    assert fake_hub.created == []


def test_profiles_fitted_for_another_model_are_refused(trained, fake_hub, tmp_path):
    model, _ = trained
    store = ProfileStore(tmp_path / "store")
    store.save(UserProfile("carol", [0.5, 0.5, 0.0]))  # 3 experts, the model has 4
    with pytest.raises(ValueError, match="K=3 experts"):
        push_moe_reward_model(model, "me/x", profiles=store, token="t")
    assert fake_hub.commits == []


def test_bad_descriptions_and_heatmap(trained, fake_hub, tmp_path):
    model, _ = trained
    with pytest.raises(ValueError, match="out of range"):
        push_moe_reward_model(model, "me/x", descriptions={"9": "nope"}, token="t")
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(ValueError, match="not a PNG"):
        push_moe_reward_model(model, "me/x", routing_heatmap=tmp_path / "fake.png", token="t")
    assert fake_hub.commits == []


# ----------------------------------------------------------------------------------------------------------------------
# Other shapes of models and repositories
# ----------------------------------------------------------------------------------------------------------------------


def test_lora_model_is_uploaded_as_an_adapter_with_its_moe_config(tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_llama_config
    from transformers import AutoModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    AutoModel.from_config(tiny_llama_config(len(tokenizer))).save_pretrained(tmp_path / "backbone")
    model = MoERewardModel.from_backbone(str(tmp_path / "backbone"), num_experts=4, top_k=2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["router", "experts"])
    peft_model = get_peft_model(model, lora).eval()
    files = prepare_hub_folder(peft_model, tmp_path / "repo", repo_id="me/lora", tokenizer=tokenizer)
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "experts.json", "README.md"} <= set(
        files
    )
    assert "model.safetensors" not in files and not find_pickle_files(files)
    assert json.loads((tmp_path / "repo" / "config.json").read_text())["model_type"] == "moe_reward"
    assert 'load_from_hub("me/lora")' in (tmp_path / "repo" / "README.md").read_text()

    bundle = load_from_hub(tmp_path / "repo")
    assert (
        _scores(bundle.model, bundle.tokenizer).chosen_rewards == _scores(peft_model, tokenizer).chosen_rewards
    ).all()


def test_offline_loading_checks_the_cached_snapshot(trained, fake_hub, monkeypatch):
    from huggingface_hub import constants

    model, tokenizer = trained
    push_moe_reward_model(model, "me/cached", tokenizer=tokenizer, token="t")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "list_repo_files", lambda *args, **kwargs: pytest.fail("no network call offline"))
    bundle = load_from_hub("me/cached")
    assert (_scores(bundle.model, bundle.tokenizer).chosen_rewards == _scores(model, tokenizer).chosen_rewards).all()

    def poisoned_snapshot(repo_id, **kwargs):  # a cache that also holds a pickle (e.g. from another tool)
        folder = fake_hub.materialize("me/cached", fake_hub.root / "poisoned")
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", poisoned_snapshot)
    with pytest.raises(UnsafeFilesError, match="pytorch_model.bin"):
        load_from_hub("me/cached")


def test_hub_downloads_only_the_files_a_model_needs():
    repo = [
        "config.json",
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "adapter_config.json",
        "adapter_model.safetensors",
        "configuration_moe_reward.py",
        "modeling_moe_reward.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "experts.json",
        "README.md",
        "profiles/i-1.json",
        "profiles/profiles.safetensors",
    ]
    unneeded = ["notes.txt", "evil.model", "helper.py", "weights.data", "sub/model.safetensors", "routing_heatmap.png"]
    assert list(filter_repo_objects(repo + unneeded, allow_patterns=list(HUB_FILE_PATTERNS))) == repo


def test_push_offline_is_one_clear_error(trained, fake_hub, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    model, _ = trained
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)") as error:
        model.push_to_hub("me/offline", token="t")
    assert isinstance(error.value, OfflineModeIsEnabled) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    assert fake_hub.created == [] and fake_hub.commits == []


def test_the_model_class_is_hooked_by_the_package_only():
    """The remote-code file imports nothing of the package, not even lazily: the package installs the push."""
    import ast

    import trl_moe_rm.modeling_moe_reward as modeling

    assert MoERewardModel._push_to_hub_hook is push_moe_reward_model
    imported = []
    for node in ast.walk(ast.parse(Path(modeling.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            imported += [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
    assert imported and not [name for name in imported if name.split(".")[0] in ("trl_moe_rm", "importlib")]


def test_card_snippets_use_remote_code_and_the_public_scoring_call(trained, tmp_path):
    model, tokenizer = trained
    prepare_hub_folder(model, tmp_path / "repo", repo_id="me/card", tokenizer=tokenizer)
    card = (tmp_path / "repo" / "README.md").read_text()
    assert 'AutoTokenizer.from_pretrained("me/card", trust_remote_code=True)' in card
    assert "from trl_moe_rm import score\n" in card
    assert 'score(model, tokenizer, ["How do I bake bread?"], ["Mix flour' in card
    assert "{{" not in card and "{%" not in card  # every template field was filled


def test_push_as_a_future_and_to_a_branch(trained, fake_hub):
    model, _ = trained
    push_moe_reward_model(model, "me/f", token="t", run_as_future=True, revision="dev", create_pr=True)
    kwargs = fake_hub.commits[0]["kwargs"]
    assert kwargs["run_as_future"] is True and kwargs["revision"] == "dev" and kwargs["create_pr"] is True
    assert fake_hub.branches == [("me/f", "dev")]


@pytest.mark.slow
def test_card_scoring_snippet_runs_in_a_fresh_process_without_a_prompt(trained, tmp_path):
    """
    Issue 15: the card's usage snippet loads model and tokenizer with `trust_remote_code=True` and scores through
    `trl_moe_rm.score`; run with stdin closed, it must not stop at transformers' "run the custom code? [y/N]" prompt.
    """
    import re
    import subprocess
    import sys

    model, tokenizer = trained
    folder = tmp_path / "repo"
    prepare_hub_folder(model, folder, repo_id=str(folder), tokenizer=tokenizer)
    card = (folder / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "score(model, tokenizer" in snippet and snippet.count("trust_remote_code=True)") == 2
    result = subprocess.run(
        [sys.executable, "-c", snippet],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"tensor\(\[-?\d", result.stdout)
