"""The `analyze` and `push` subcommands of `trl-moe-rm` (the Hub is faked, see test_hub.FakeHub)."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from test_hub import fake_hub, no_token  # noqa: F401  (fixtures)
from tiny import tiny_moe, tiny_tokenizer

from trl_moe_rm import ProfileStore, UserProfile
from trl_moe_rm.cli import main
from trl_moe_rm.configuration_moe_reward import config_fingerprint
from trl_moe_rm.data import make_controlled_dataset


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def controlled_file(tmp_path):
    path = tmp_path / "controlled.jsonl"
    make_controlled_dataset(num_pairs_per_category=4, seed=0).to_json(str(path))
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize(
    "command, flags",
    [
        ("analyze", ["--model", "--dataset", "--output_dir", "--category_column", "--dataset_split"]),
        ("push", ["--model", "--repo_id", "--profiles", "--private", "--token", "--analysis_dir"]),
    ],
)
def test_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in flags)


def test_analyze_writes_report_figures_and_descriptions(model_dir, controlled_file, tmp_path, capsys):
    out = tmp_path / "analysis"
    assert (
        main(["analyze", "--model", str(model_dir), "--dataset", str(controlled_file), "--output_dir", str(out)]) == 0
    )
    for name in ("routing_heatmap.png", "expert_attribute.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "report.json").read_text())
    assert report["num_pairs"] == 24 and report["num_experts"] == 4
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["nmi"] <= 1.0
    assert report["routing_matrix"]["categories"] == sorted({row["category"] for row in _rows(controlled_file)})
    assert len(report["steering"]) == 3 and {entry["attribute"] for entry in report["steering"]} <= {
        "length",
        "formality",
        "technicality",
    }
    assert sum(report["expert_load"]) == pytest.approx(1.0)
    experts = json.loads((out / "experts.json").read_text())["experts"]
    assert [e["expert"] for e in experts] == [0, 1, 2, 3]
    assert all(isinstance(e["description"], str) and e["description"] for e in experts)
    assert [e["load"] for e in experts] == pytest.approx(report["expert_load"])
    markdown = (out / "report.md").read_text()
    assert "![Mean routing weight per category](routing_heatmap.png)" in markdown
    assert "## Steering" in markdown and f"| 0 | {experts[0]['load']:.3f} |" in markdown
    assert "Wrote report.json" in capsys.readouterr().out


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_analyze_without_labels_routes_against_prompt_clusters(model_dir, tmp_path, capsys):
    """Issue 15: on data without a category column the heatmap is drawn against prompt clusters; attribute plots are
    skipped with one line saying why."""
    data = _write_jsonl(
        tmp_path / "plain.jsonl",
        [{"prompt": "explain the sun", "chosen": "good one", "rejected": "bad one"}] * 3
        + [{"prompt": "what is a cat", "chosen": "good cat", "rejected": "bad dog"}] * 3,
    )
    out = tmp_path / "analysis"
    assert main(["analyze", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["experts.json", "report.json", "report.md", "routing_heatmap.png"]
    report = json.loads((out / "report.json").read_text())
    assert report["category_column"] == "prompt_cluster" and "nmi" in report
    assert "steering" not in report and list(report["figures"]) == ["routing_heatmap"]
    err = capsys.readouterr().err
    assert "k-means clusters of the prompts" in err and "attribute plot" in err


def test_push_dry_run_writes_and_lists_the_folder(model_dir, tmp_path, fake_hub, capsys):  # noqa: F811
    out = tmp_path / "dry"
    assert main(["push", "--model_name_or_path", str(model_dir), "--hub_model_id", "me/m", "--dry_run", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "model.safetensors" in listed and "README.md" in listed and "Dry run" in listed
    assert (out / "README.md").is_file() and (out / "config.json").is_file()
    assert fake_hub.created == [] and fake_hub.commits == []


def test_analyze_names_the_missing_column(model_dir, controlled_file, tmp_path, capsys):
    data = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "what", "chosen": "good"}])
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--model", str(model_dir), "--dataset", str(data), "--output_dir", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    assert "`rejected`" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "--model", str(model_dir), "--dataset", str(controlled_file), "--category_column", "topic"])
    assert exit_info.value.code == 2
    assert "--category_column 'topic' is not a column" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_push_uploads_model_profiles_and_analysis(model_dir, controlled_file, tmp_path, fake_hub):  # noqa: F811
    from trl_moe_rm.checkpoints import load_moe_reward_model

    model = load_moe_reward_model(model_dir)
    store = ProfileStore(tmp_path / "store")
    store.save(UserProfile("alice", [0.7, 0.1, 0.1, 0.1], config_hash=config_fingerprint(model.config)))
    analysis = tmp_path / "analysis"
    main(["analyze", "--model", str(model_dir), "--dataset", str(controlled_file), "--output_dir", str(analysis)])

    code = main(
        [
            "push",
            "--model",
            str(model_dir),
            "--repo_id",
            "me/cli-model",
            "--profiles",
            str(store.directory),
            "--analysis_dir",
            str(analysis),
            "--private",
            "--token",
            "hf_cli",
            "--dataset_name",
            "controlled",
        ]
    )
    assert code == 0
    assert fake_hub.created == [{"repo_id": "me/cli-model", "private": True, "token": "hf_cli", "exist_ok": True}]
    assert len(fake_hub.commits) == 1
    files = fake_hub.commits[0]["files"]
    assert set(files) == {
        "README.md",
        "config.json",
        "configuration_moe_reward.py",
        "experts.json",
        "model.safetensors",
        "modeling_moe_reward.py",
        "routing_heatmap.png",
        "tokenizer.json",
        "tokenizer_config.json",
        *(f"profiles/{p.name}" for p in store.directory.iterdir()),
    }
    assert files["routing_heatmap.png"] == (analysis / "routing_heatmap.png").read_bytes()
    assert json.loads(files["experts.json"]) == json.loads((analysis / "experts.json").read_text())
    card = ModelCard(files["README.md"].decode())
    report = json.loads((analysis / "report.json").read_text())
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["accuracy"] == pytest.approx(report["accuracy"]) and results["nmi"] == pytest.approx(report["nmi"])
    assert card.data.datasets == ["controlled"]


def test_push_uses_the_model_folders_profiles(model_dir, fake_hub):  # noqa: F811
    from trl_moe_rm.checkpoints import load_moe_reward_model

    fingerprint = config_fingerprint(load_moe_reward_model(model_dir).config)
    ProfileStore(model_dir / "profiles").save(UserProfile(3, [0.25] * 4, config_hash=fingerprint))
    assert main(["push", "--model", str(model_dir), "--repo_id", "me/m", "--token", "t"]) == 0
    assert any(path.startswith("profiles/") for path in fake_hub.commits[0]["files"])
    assert fake_hub.created[0]["private"] is None


def test_push_without_token_or_with_a_bad_repo_id(model_dir, fake_hub, no_token, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--model", str(model_dir), "--repo_id", "me/m"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "hf auth login" in err and "HF_TOKEN" in err and "--token" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--model", str(model_dir), "--repo_id", "me/bad--id", "--token", "t"])
    assert exit_info.value.code == 2
    assert "not a valid Hub repository id" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--model", str(model_dir / "missing"), "--repo_id", "me/m", "--token", "t"])
    assert exit_info.value.code == 2
    assert "is not a directory" in capsys.readouterr().err
    assert fake_hub.commits == []


def test_push_offline_is_one_line(model_dir, fake_hub, monkeypatch, capsys):  # noqa: F811
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--model", str(model_dir), "--repo_id", "me/m", "--token", "t"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline mode is on (HF_HUB_OFFLINE=1)" in err and "Traceback" not in err
    assert fake_hub.created == [] and fake_hub.commits == []
