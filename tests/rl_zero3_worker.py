"""
Worker side of `test_rloo_runs_under_deepspeed_zero3` (tests/test_rl_e2e.py), run once per rank by `accelerate launch`
with `trl_moe_rm/accelerate_configs/cpu_zero3.yaml`.

It creates the `RLOOConfig` first (which, under the ZeRO-3 accelerate config with `zero3_init_flag: true`, makes
`from_pretrained` build models inside `deepspeed.zero.Init`), then loads the MoE reward model, builds a
`PersonalizedReward` from it, scores fixed probe rows, trains the policy for 3 RLOO steps and writes `rank{R}.json`
into `--output_dir` with what the test checks.

Usage: `accelerate launch ... tests/rl_zero3_worker.py --inputs DIR --output_dir DIR`.
"""

import argparse
import json
import os
from pathlib import Path

from transformers import AutoTokenizer
from trl import RLOOConfig, RLOOTrainer

from trl_moe_rm import PersonalizedReward, ProfileStore
from trl_moe_rm.checkpoints import load_moe_reward_model
from trl_moe_rm.data.loading import load_preference_dataset


def _partitioned(model) -> bool:
    return any(hasattr(param, "ds_id") for param in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--output_dir", required=True)
    cli = parser.parse_args()
    inputs, output_dir = Path(cli.inputs), Path(cli.output_dir)

    tokenizer = AutoTokenizer.from_pretrained(inputs / "policy")
    suppressed = [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id]
    suppressed += tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    args = RLOOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        learning_rate=3e-3,
        beta=0.0,
        max_steps=3,
        generation_kwargs={"suppress_tokens": suppressed},
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        ddp_backend="gloo",
        use_cpu=False,  # no GPU is visible: DeepSpeed runs on its CPU accelerator (the test checks ZeRO-3 is used)
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )

    # Loaded after the config: under `zero3_init_flag: true` this model is built partitioned, inside zero.Init.
    reward_model = load_moe_reward_model(inputs / "reward_model")
    record = {"reward_partitioned_on_load": _partitioned(reward_model)}
    reward = PersonalizedReward(
        reward_model, ProfileStore.from_pretrained(inputs / "reward_model"), tokenizer=tokenizer
    )
    record["reward_partitioned_after"] = _partitioned(reward.model)
    probe = json.loads((inputs / "probe.json").read_text())
    record["probe_scores"] = reward(**probe)

    dataset = load_preference_dataset(str(inputs / "prompts.jsonl"), split="train", check_columns=False)
    trainer = RLOOTrainer(
        model=str(inputs / "policy"),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    record["zero_stage"] = plugin.zero_stage if plugin is not None else None
    record["policy_partitioned"] = _partitioned(trainer.model)
    trainer.train()
    record.update(
        world_size=trainer.accelerator.num_processes,
        global_step=trainer.state.global_step,
        log_history=trainer.state.log_history,
        num_fallbacks=reward.num_fallbacks,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", "0"))
    (output_dir / f"rank{rank}.json").write_text(json.dumps(record))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
