"""`trl-moe-rm diagnose`: the probes on planted features, and the command end to end on a tiny backbone."""

import json

import numpy as np
import pytest
from datasets import Dataset
from tiny import WORDS, tiny_bert_config, tiny_tokenizer
from transformers import BertModel

from trl_moe_rm.cli import main
from trl_moe_rm.diagnose import READABILITY_THRESHOLD, diagnose_features


HIDDEN = 16
DIRECTIONS = np.eye(HIDDEN)[[0, 0, 1, 1]] * np.array([[1.0], [-1.0], [1.0], [-1.0]])  # 4 types, opposite in pairs


def planted(visible: bool, homogeneous: bool = False, num_pairs: int = 300, seed: int = 0):
    """
    Pair differences labelled by their type's direction; the prompt shows the type (`visible`) or is noise. Returns
    the chosen, rejected and prompt features, the prompt groups and the types.
    """
    rng = np.random.default_rng(seed)
    types = rng.integers(0, 4, num_pairs)
    differences = rng.normal(size=(num_pairs, HIDDEN)) * np.where(np.arange(HIDDEN) < 2, 3.0, 1.0)  # as in real data:
    # the pairs differ most along the attributes people judge them on
    directions = DIRECTIONS[np.zeros_like(types)] if homogeneous else DIRECTIONS[types]
    differences *= np.sign((differences * directions).sum(axis=1))[:, None]  # the chosen response is preferred
    prompts = rng.normal(size=(num_pairs, HIDDEN))
    if visible:
        prompts[:, :4] += 4.0 * np.eye(4)[types]
    groups = np.arange(num_pairs) // 2
    return differences, np.zeros_like(differences), prompts, groups, types


def test_visible_context_recommends_the_defaults():
    chosen, rejected, prompts, groups, types = planted(visible=True)
    diagnosis = diagnose_features(chosen, rejected, prompts, groups, types)
    assert diagnosis.preset is None
    assert diagnosis.readability >= READABILITY_THRESHOLD and diagnosis.category_readability > 0.8
    assert diagnosis.prompt_accuracy > diagnosis.pooled_accuracy + 0.1
    without = diagnose_features(chosen, rejected, prompts, groups)
    assert without.preset is None and "visible" in without.reason and without.context_accuracy is None


def test_hidden_context_recommends_the_hidden_context_preset():
    chosen, rejected, prompts, groups, types = planted(visible=False)
    diagnosis = diagnose_features(chosen, rejected, prompts, groups, types)
    assert diagnosis.preset == "hidden_context"
    assert diagnosis.readability < READABILITY_THRESHOLD and abs(diagnosis.category_readability) < 0.2
    assert diagnosis.context_accuracy > diagnosis.pooled_accuracy + 0.2
    # Without the category, both probes sit at chance: the labels depend on something the data does not show.
    without = diagnose_features(chosen, rejected, prompts, groups)
    assert without.preset == "hidden_context" and abs(without.pooled_accuracy - 0.5) < 0.05


def test_one_shared_preference_recommends_the_defaults():
    chosen, rejected, prompts, groups, types = planted(visible=False, homogeneous=True)
    diagnosis = diagnose_features(chosen, rejected, prompts, groups, types)
    assert diagnosis.preset is None and diagnosis.readability is None and "changes little" in diagnosis.reason
    without = diagnose_features(chosen, rejected, prompts, groups)
    assert without.preset is None and "one reward explains" in without.reason


def test_bad_inputs_are_refused():
    chosen, rejected, prompts, groups, types = planted(visible=True, num_pairs=40)
    with pytest.raises(ValueError, match="shapes"):
        diagnose_features(chosen, rejected[:, :3], prompts, groups)
    with pytest.raises(ValueError, match="at least 5 distinct prompts"):
        diagnose_features(chosen, rejected, prompts, np.zeros(40, dtype=int))
    with pytest.raises(ValueError, match="categories"):
        diagnose_features(chosen, rejected, prompts, groups, types[:10])


def test_the_command_end_to_end_on_a_tiny_backbone(tmp_path, capsys):
    tokenizer = tiny_tokenizer(bert_style=True)
    BertModel(tiny_bert_config(len(tokenizer))).save_pretrained(tmp_path / "backbone")
    tokenizer.save_pretrained(tmp_path / "backbone")
    rng = np.random.default_rng(0)
    rows = [
        {
            "prompt": f"tell me about {WORDS[12 + index % 10]}",
            "chosen": "good answer " + rng.choice(WORDS[20:30]),
            "rejected": "bad answer " + rng.choice(WORDS[20:30]),
            "user": f"u{index % 3}",
        }
        for index in range(60)
    ]
    rows[0]["rejected"] = " "  # a pair with an empty response is left out
    Dataset.from_list(rows).to_json(tmp_path / "pairs.jsonl")
    flags = ["--dataset_name", str(tmp_path / "pairs.jsonl"), "--model_name_or_path", str(tmp_path / "backbone")]
    output = tmp_path / "diagnosis.json"
    assert main(["diagnose", *flags, "--category_column", "user", "--output", str(output)]) == 0
    written = json.loads(output.read_text())
    assert written["num_pairs"] == 59 and written["context_accuracy"] is not None
    assert written["preset"] in (None, "hidden_context")
    assert "Recommendation:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["diagnose", *flags, "--category_column", "nope"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "trl-moe-rm diagnose: error: --category_column 'nope' is not a column" in error
    assert "Traceback" not in error


def test_the_command_is_registered_with_hf_names(capsys):
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    usage = capsys.readouterr().out
    assert usage.startswith("usage: trl-moe-rm diagnose")
    for flag in ("--dataset_name", "--category_column", "--model_name_or_path", "--config"):
        assert flag in usage
