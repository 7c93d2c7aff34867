import json
import re

import pytest
from tiny import tiny_moe, tiny_tokenizer

from trl_moe_rm.cli import main
from trl_moe_rm.profiles import ProfileStore


@pytest.fixture
def model_dir(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PAIRS = [
    {"prompt": "short question about cat", "chosen": "yes one", "rejected": "no one"},
    {"prompt": "long question about dog", "chosen": "no two", "rejected": "yes two"},
    {"prompt": "short question about sun", "chosen": "yes", "rejected": "no"},
]


@pytest.mark.parametrize(
    ("method", "options"),
    [("hyre", []), ("hyre_gradient", ["--l2", "1.0", "--prior", "uniform"])],  # the second: the preset's fit
)
def test_personalize_prints_weights_and_saves_profile(model_dir, tmp_path, capsys, method, options):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    code = main(["personalize", "--model", str(model_dir), "--pairs", str(pairs), "--user_id", "alice",
                 "--method", method, *options, "--store", str(tmp_path / "store"), "--test", str(pairs)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["user_id"] == "alice" and len(result["user_weights"]) == 4
    assert sum(result["shift"]) == pytest.approx(0.0, abs=1e-5)
    assert 0.0 <= result["test_accuracy_personalized"] <= 1.0
    assert ProfileStore(tmp_path / "store").load("alice").method == method


def test_personalize_l2_and_prior_reach_the_fit(model_dir, tmp_path, capsys):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    flags = ["personalize", "--model_name_or_path", str(model_dir), "--dataset_name", str(pairs), "--user_id", "a"]
    weights = {}
    for l2 in ("0.0", "100"):
        assert main([*flags, "--method", "gradient", "--prior", "uniform", "--l2", l2]) == 0
        weights[l2] = json.loads(capsys.readouterr().out)["user_weights"]
    assert weights["100"] == pytest.approx([0.25] * 4, abs=0.02)  # a strong pull keeps the uniform prior
    assert max(abs(w - 0.25) for w in weights["0.0"]) > 0.05
    with pytest.raises(SystemExit) as stopped:
        main([*flags, "--method", "hedge", "--l2", "1.0"])
    assert stopped.value.code == 2
    assert "--l2 applies to --method gradient or hyre_gradient, not 'hedge'" in capsys.readouterr().err


def test_score_jsonl_for_users_with_fallback(model_dir, tmp_path, capsys):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    main(["personalize", "--model", str(model_dir), "--pairs", str(pairs), "--user_id", "alice",
          "--store", str(tmp_path / "store")])
    rows = [{"prompt": "short question", "response": "yes", "user_id": "alice"},
            {"prompt": "short question", "response": "yes", "user_id": "bob"}]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(model_dir), "--input", str(source), "--output", str(out),
                 "--profiles", str(tmp_path / "store")]) == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["user_id"] for row in scored] == ["alice", "bob"]
    assert all(isinstance(row["reward"], float) for row in scored)
    assert "1 row(s) had no profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["score", "--model", str(model_dir), "--input", str(source), "--output", str(out),
              "--profiles", str(tmp_path / "store"), "--strict"])


def test_score_plain_and_bad_rows(model_dir, tmp_path):
    source = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "response": "good"}])
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(model_dir), "--input", str(source), "--output", str(out)]) == 0
    assert "reward" in json.loads(out.read_text())
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "what"}])
    with pytest.raises(SystemExit, match="2"):
        main(["score", "--model", str(model_dir), "--input", str(bad), "--output", str(out)])


def _score_error(argv, capsys) -> str:
    """Run a `score` command that must fail: exit code 2, one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(["score", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1 and not any("Traceback" in line for line in err)
    return err[-1]


def test_score_bad_inputs_give_one_line(model_dir, tmp_path, capsys):
    """Issue 13: each bad input of `score` exits 2 with one line naming the input and the fix."""
    good = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "completion": "good"}])
    out = tmp_path / "out.jsonl"
    base = ["--model", str(model_dir), "--input", str(good), "--output", str(out)]
    assert "must be >= 1" in _score_error([*base, "--batch_size", "-1"], capsys)
    assert "must be >= 1" in _score_error([*base, "--batch_size", "0"], capsys)
    assert "no response column" in _score_error(
        ["--model", str(model_dir), "--input", str(_write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}])),
         "--output", str(out)], capsys)
    not_object = tmp_path / "list.jsonl"
    not_object.write_text('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    assert "list.jsonl:2: each line must be a JSON object" in _score_error(
        ["--model", str(model_dir), "--input", str(not_object), "--output", str(out)], capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "is empty" in _score_error(["--model", str(model_dir), "--input", str(empty), "--output", str(out)], capsys)
    assert "is a directory" in _score_error(["--model", str(model_dir), "--input", str(good), "--output",
                                              str(tmp_path)], capsys)
    message = _score_error(["--model", str(model_dir), "--input", str(good), "--output",
                            str(tmp_path / "missing" / "out.jsonl")], capsys)
    assert "does not exist" in message and ".tmp" not in message
    assert "not a directory" in _score_error([*base, "--profiles", str(tmp_path / "no_profiles")], capsys)
    assert not out.exists()


def test_score_reads_trl_rows_and_writes_the_input_format(model_dir, tmp_path):
    """Issue 15: TRL's prompt/completion rows, conversational or plain, from JSONL or parquet; null users fall back."""
    from datasets import Dataset

    rows = [
        {"prompt": "tell me about cat", "completion": "good one", "user_id": None},
        {"prompt": "tell me about dog", "completion": "bad two", "user_id": None},
    ]
    source = _write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    store = tmp_path / "store"
    store.mkdir()
    assert main(["score", "--model", str(model_dir), "--input", str(source), "--output", str(out),
                 "--profiles", str(store)]) == 0
    jsonl_rewards = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    parquet = tmp_path / "in.parquet"
    Dataset.from_list(rows).to_parquet(parquet)
    assert main(["score", "--model_name_or_path", str(model_dir), "--dataset_name", str(parquet), "--output",
                 str(tmp_path / "out.parquet"), "--profiles", str(store)]) == 0
    scored = Dataset.from_parquet(str(tmp_path / "out.parquet"))
    assert scored["reward"] == pytest.approx(jsonl_rewards, abs=1e-6)


def test_demo_rejects_an_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output_dir", str(target), "--quick"])
    assert exit_info.value.code == 2
    assert "is an existing file" in capsys.readouterr().err


def test_help_of_every_subcommand(capsys):
    for command in ("demo", "personalize", "score"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--num_experts" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(output_dir)]) == 0
    # The progress bars: the demo's own, and one per model that follows its optimizer steps to the end.
    err = capsys.readouterr().err
    assert "demo: 100%" in err
    for name in ("single_head", "dense_moe", "sparse_moe_no_diversity", "sparse_moe"):
        assert re.search(rf"  {name}: 100%\|[^|]*\| (\d+)/\1 ", err), name
    report = json.loads((output_dir / "report.json").read_text())
    assert set(report) >= {"models", "config"}
    assert list(report["models"]) == ["single_head", "dense_moe", "sparse_moe_no_diversity", "sparse_moe"]
    required = {"test_accuracy", "conflict_accuracy", "routing_nmi", "routing_purity", "specialization",
                "description_accuracy", "train_seconds"}
    for name, row in report["models"].items():
        assert required <= set(row), name
        assert 0.0 <= row["test_accuracy"] <= 1.0
    assert report["models"]["single_head"]["routing_nmi"] is None
    assert report["models"]["sparse_moe"]["routing_nmi"] is not None
    for figure in report["figures"].values():
        assert (output_dir / figure).stat().st_size > 1000
    assert (output_dir / "report.md").read_text().startswith("| model |")
    from transformers import AutoModelForSequenceClassification

    from trl_moe_rm import MoERewardModel

    assert isinstance(AutoModelForSequenceClassification.from_pretrained(output_dir / "sparse_moe"), MoERewardModel)


def test_every_subcommand_takes_hf_names_and_a_config_file(model_dir, tmp_path, capsys):
    """Issue 15: TRL/HF flag names (old names kept as aliases), `--config` YAML, usage lines naming the subcommand."""
    for command in ("demo", "personalize", "score", "analyze", "push", "serve"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: trl-moe-rm {command}") and "--config" in out
        if command != "demo":
            assert "--model_name_or_path" in out
    rows = _write_jsonl(tmp_path / "in.jsonl", [{"prompt": "what", "completion": "good"}])
    config = tmp_path / "score.yaml"
    config.write_text(f"model_name_or_path: {model_dir}\ndataset_name: {rows}\nbatch_size: 2\n")
    assert main(["score", "--config", str(config), "--output_file", str(tmp_path / "out.jsonl")]) == 0
    assert "reward" in json.loads((tmp_path / "out.jsonl").read_text())
    config.write_text("modle: x\n")
    with pytest.raises(SystemExit):
        main(["score", "--config", str(config), "--output", str(tmp_path / "o.jsonl")])
    assert "unknown option(s) ['modle']" in capsys.readouterr().err


def test_python_m_train_prints_its_usage():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "trl_moe_rm.scripts.train", "--help"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m trl_moe_rm.scripts.train")
    assert "--num_experts" in result.stdout and "--datasets" in result.stdout
