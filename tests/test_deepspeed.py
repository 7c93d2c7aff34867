"""
DeepSpeed ZeRO-2 / ZeRO-3 correctness of MoE reward training, on CPU (gloo), two processes.

Each launch runs the real training script (`trl_moe_rm.scripts.train.main`) under
`accelerate launch --config_file trl_moe_rm/accelerate_configs/cpu_zero{2,3}.yaml` through `tests/deepspeed_worker.py`, which
records what happens inside the run (see its docstring). Five launches cover everything:

- `zero3`: ZeRO-3 with `zero3_init_flag: true`, the model given as a string (a backbone folder), top-2 of 4 experts,
  cosine diversity, 8 steps, `save_steps=8`, `zero3_save_16bit_model: true`;
- `zero2`: the same run under ZeRO-2 (the uninterrupted reference of the resume test);
- `zero2_first_half` then `zero2_resumed`: ZeRO-2 stopped at step 4 (`max_steps=4`, `save_steps=4`), then resumed
  from `checkpoint-4` up to step 8;
- `zero3_lora`: ZeRO-3 with a LoRA backbone (router and experts in `modules_to_save`).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_spec("deepspeed") is None, reason="needs deepspeed (pip install 'trl-moe-rm[deepspeed]')"),
]

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "deepspeed_worker.py"
LAUNCH_TIMEOUT = 600
NUM_EXPERTS, TOP_K, STEPS = 4, 2, 8
COMMON_ARGS = [
    "--dataset_name", "{data}",
    "--model_name_or_path", "{backbone}",
    "--num_experts", str(NUM_EXPERTS),
    "--top_k", str(TOP_K),
    "--diversity_coef", "0.1",
    "--per_device_train_batch_size", "4",
    "--learning_rate", "5e-3",
    "--lr_scheduler_type", "constant",
    "--logging_steps", "1",
    "--seed", "0",
    "--data_seed", "0",
    "--report_to", "none",
    "--disable_tqdm", "true",
    "--use_cpu", "true",
    "--bf16", "false",
]  # fmt: skip
LAUNCH_TIMES: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(name: str, stage: int, workdir: Path, inputs: dict[str, str], *args: str) -> dict[int, dict]:
    """Run the worker on 2 CPU processes under ZeRO-`stage`; return the per-rank records."""
    probe_dir = workdir / f"{name}-probe"
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "trl_moe_rm" / "accelerate_configs" / f"cpu_zero{stage}.yaml"),
        "--main_process_port", str(_free_port()),
        str(WORKER), "--probe_dir", str(probe_dir),
        *[arg.format(**inputs) for arg in COMMON_ARGS], *args,
    ]  # fmt: skip
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    LAUNCH_TIMES[name] = time.perf_counter() - start
    print(f"launch {name}: {LAUNCH_TIMES[name]:.1f}s")
    if result.returncode != 0:
        raise AssertionError(f"launch {name} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}")
    return {rank: json.loads((probe_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def _losses(record: dict) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in record["log_history"] if "loss" in entry}


def _training_logs(record: dict) -> list[dict]:
    return [entry for entry in record["log_history"] if "loss" in entry]


def _scores(model, tokenizer) -> dict[str, list]:
    from deepspeed_worker import probe_batch, probe_scores

    return probe_scores(model, probe_batch(tokenizer), "cpu")


# ---------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama backbone (with its tokenizer) and a separable preference dataset, saved to disk."""
    from tiny import separable_dataset, tiny_llama_config, tiny_tokenizer
    from transformers import LlamaModel

    root = tmp_path_factory.mktemp("ds-inputs")
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    LlamaModel(tiny_llama_config(len(tokenizer))).save_pretrained(root / "backbone")
    tokenizer.save_pretrained(root / "backbone")
    separable_dataset(32, seed=0).to_json(str(root / "pairs.jsonl"))
    return {"backbone": str(root / "backbone"), "data": str(root / "pairs.jsonl"), "root": str(root)}


@pytest.fixture(scope="module")
def tokenizer(inputs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(inputs["backbone"])


@pytest.fixture(scope="module")
def zero3(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero3")
    records = _launch(
        "zero3", 3, workdir, inputs,
        "--output_dir", str(workdir / "out"), "--max_steps", str(STEPS), "--save_steps", str(STEPS),
    )  # fmt: skip
    return records, workdir / "out"


@pytest.fixture(scope="module")
def zero2(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero2")
    records = _launch(
        "zero2", 2, workdir, inputs,
        "--output_dir", str(workdir / "out"), "--max_steps", str(STEPS), "--save_strategy", "no",
    )  # fmt: skip
    return records, workdir / "out"


@pytest.fixture(scope="module")
def zero2_resumed(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero2-resume")
    half = STEPS // 2
    out = workdir / "out"
    first = _launch(
        "zero2_first_half", 2, workdir, inputs,
        "--output_dir", str(out), "--max_steps", str(half), "--save_steps", str(half),
    )  # fmt: skip
    assert (out / f"checkpoint-{half}").is_dir()
    resumed = _launch(
        "zero2_resumed", 2, workdir, inputs,
        "--output_dir", str(out), "--max_steps", str(STEPS), "--save_steps", str(half),
        "--resume_from_checkpoint", str(out / f"checkpoint-{half}"),
    )  # fmt: skip
    return first, resumed


@pytest.fixture(scope="module")
def zero3_lora(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("zero3-lora")
    records = _launch(
        "zero3_lora", 3, workdir, inputs,
        "--output_dir", str(workdir / "out"), "--max_steps", "6", "--save_strategy", "no",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0",
        "--lora_target_modules", "q_proj", "v_proj",
    )  # fmt: skip
    return records, workdir / "out"


# ------------------------------------------------------------------------------------------------------------- tests
def test_zero3_init_gives_real_head_weights_with_a_string_model(zero3, inputs):
    """With `zero3_init_flag: true` and `model` a backbone folder, the router and experts are really initialised."""
    records, _ = zero3
    init = records[0]["init"]
    assert init["zero3"] and init["global_step"] == 0
    head = {name: stats for name, stats in init["params"].items()}
    assert set(head) == {"router.weight", "experts.weight", "experts.bias"}
    for name in ("router.weight", "experts.weight"):
        stats = head[name]
        assert stats["shape"] == [NUM_EXPERTS, 32]
        assert stats["partition_numel"] == NUM_EXPERTS * 32 // 2  # really partitioned over the 2 ranks
        assert 0.01 < stats["std"] < 0.04, stats  # normal(0, initializer_range=0.02), not zeros / empty
    # Both ranks see the same weights.
    for name in head:
        assert records[1]["init"]["params"][name]["values"] == head[name]["values"]
    # The backbone weights are the pretrained ones (gathered under ZeRO-3).
    backbone = load_file(str(Path(inputs["backbone"]) / "model.safetensors"))
    expected = backbone["embed_tokens.weight"].double().abs().sum().item()
    assert init["embedding_checksum"] == pytest.approx(expected, rel=1e-6)
    # At step 0 the experts already disagree on every input.
    expert_rewards = torch.tensor(init["scores"]["expert_rewards"])
    assert expert_rewards.shape == (4, NUM_EXPERTS)
    assert (expert_rewards.std(dim=-1) > 1e-3).all(), expert_rewards
    assert torch.unique(expert_rewards.round(decimals=5), dim=1).shape[1] == NUM_EXPERTS


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_training_lowers_the_loss(run, request):
    records, _ = request.getfixturevalue(run)
    losses = list(_losses(records[0]).values())
    assert len(losses) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses


def test_zero3_sparse_routing_runs_every_step(zero3):
    """Data-dependent top-2-of-4 routing does not trip ZeRO-3's parameter fetching: all steps run, routing stays sparse."""
    records, _ = zero3
    assert records[0]["global_step"] == STEPS
    for rank in (0, 1):
        assert len(records[rank]["local_loads"]) == STEPS
        routing = torch.tensor(records[rank]["final"]["routing_weights"])
        assert ((routing > 0).sum(dim=-1) == TOP_K).all()
        assert torch.allclose(routing.sum(dim=-1), torch.ones(len(routing)))
    diversity = [entry["moe/diversity_loss"] for entry in _training_logs(records[0])]
    assert len(diversity) == STEPS and all(value > 0 for value in diversity)


@pytest.mark.parametrize("run", ["zero2", "zero3"])
def test_expert_metrics_are_gathered_across_ranks(run, request):
    records, _ = request.getfixturevalue(run)
    logs = _training_logs(records[0])
    assert len(logs) == STEPS
    differs = False
    for step, entry in enumerate(logs):
        loads = [entry[f"moe/load/expert_{k}"] for k in range(NUM_EXPERTS)]
        fractions = [entry[f"moe/token_fraction/expert_{k}"] for k in range(NUM_EXPERTS)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-5)
        assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
        # The logged load is the mean of the two ranks' own loads, not rank 0's.
        local = torch.tensor([records[rank]["local_loads"][step] for rank in (0, 1)])
        assert torch.allclose(torch.tensor(loads), local.mean(dim=0), atol=1e-5), (loads, local)
        differs |= not torch.allclose(local[0], local[1], atol=1e-3)
    assert differs, "both ranks saw the same routing at every step; the gathering check is vacuous"


def test_zero3_matches_zero2(zero2, zero3):
    """ZeRO-2 and ZeRO-3 are the same optimisation: same losses (cosine diversity gradients included)."""
    losses2, losses3 = _losses(zero2[0][0]), _losses(zero3[0][0])
    assert losses2.keys() == losses3.keys()
    for step in losses2:
        assert losses3[step] == pytest.approx(losses2[step], rel=1e-3), (step, losses2, losses3)


def test_zero3_saved_model_reloads_with_the_in_run_scores(zero3, tokenizer):
    from trl_moe_rm import MoERewardModel
    from trl_moe_rm.checkpoints import load_moe_reward_model

    records, out = zero3
    model = load_moe_reward_model(out)
    assert isinstance(model, MoERewardModel) and model.dtype == torch.float32
    scores = _scores(model, tokenizer)
    for key in ("logits", "expert_rewards"):
        reloaded, in_run = torch.tensor(scores[key]), torch.tensor(records[0]["final"][key])
        assert (reloaded - in_run).abs().max() <= 1e-4, (key, reloaded, in_run)
    assert records[1]["final"]["logits"] == records[0]["final"]["logits"]
    # Trained: the scores moved away from those at step 0.
    assert (torch.tensor(scores["logits"]) - torch.tensor(records[0]["init"]["scores"]["logits"])).abs().max() > 0.1


def test_zero3_shards_only_checkpoint_gives_a_clear_error_and_its_fix_works(zero3, tokenizer, tmp_path):
    from trl_moe_rm.checkpoints import ZeroCheckpointError, load_moe_reward_model

    records, out = zero3
    checkpoint = tmp_path / f"checkpoint-{STEPS}"
    shutil.copytree(out / f"checkpoint-{STEPS}", checkpoint)
    assert (checkpoint / f"global_step{STEPS}").is_dir()
    (checkpoint / "model.safetensors").unlink()  # as written with `zero3_save_16bit_model: false`
    with pytest.raises(ZeroCheckpointError, match="zero_to_fp32.py") as error:
        load_moe_reward_model(checkpoint)
    message = str(error.value)
    assert "zero3_save_16bit_model: true" in message
    command = next(line.split() for line in message.splitlines() if line.strip().startswith("python "))
    result = subprocess.run([sys.executable, *command[1:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = _scores(load_moe_reward_model(checkpoint), tokenizer)
    in_run = torch.tensor(records[0]["final"]["logits"])
    assert (torch.tensor(scores["logits"]) - in_run).abs().max() <= 1e-4


def test_zero2_resume_matches_the_uninterrupted_run(zero2, zero2_resumed):
    first, resumed = zero2_resumed
    reference = _losses(zero2[0][0])
    assert sorted(_losses(first[0])) == list(range(1, STEPS // 2 + 1))
    resumed_losses = _losses(resumed[0])
    assert resumed[0]["global_step"] == STEPS and max(resumed_losses) == STEPS
    assert resumed_losses[STEPS] == pytest.approx(reference[STEPS], rel=1e-4)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert resumed_losses[step] == pytest.approx(reference[step], rel=1e-4)
    final, expected = torch.tensor(resumed[0]["final"]["logits"]), torch.tensor(zero2[0][0]["final"]["logits"])
    assert torch.allclose(final, expected, atol=1e-5)


def test_zero3_lora_trains_and_the_adapter_with_its_head_reloads(zero3_lora, tokenizer):
    from peft import PeftModel

    from trl_moe_rm import MoERewardModel
    from trl_moe_rm.checkpoints import load_moe_reward_model

    records, out = zero3_lora
    losses = list(_losses(records[0]).values())
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert "base_model.model.router.modules_to_save.default.weight" in records[0]["init"]["params"]

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_A" in key for key in saved)
    assert {
        "base_model.model.router.weight",
        "base_model.model.experts.weight",
        "base_model.model.experts.bias",
    } <= set(saved)
    assert (out / "config.json").is_file()  # the MoE head description, saved next to the adapter

    model = load_moe_reward_model(out)
    assert isinstance(model, PeftModel)
    scores = _scores(model, tokenizer)
    in_run = torch.tensor(records[0]["final"]["logits"])
    assert (torch.tensor(scores["logits"]) - in_run).abs().max() <= 1e-4
    assert (in_run - torch.tensor(records[0]["init"]["scores"]["logits"])).abs().max() > 0.05

    merged = load_moe_reward_model(out, merge_adapter=True)
    assert isinstance(merged, MoERewardModel)
    assert (torch.tensor(_scores(merged, tokenizer)["logits"]) - in_run).abs().max() <= 1e-4


def test_report_launch_times():
    """Not a check: prints the wall time of every launch of this module (run with `-s` to see it)."""
    for name, seconds in LAUNCH_TIMES.items():
        print(f"{name}: {seconds:.1f}s")
