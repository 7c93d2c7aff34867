# /// script
# dependencies = [
#     "trl-moe-rm",
#     "peft",
# ]
# ///
"""
Personalized GRPO: train a policy with TRL's `GRPOTrainer`, each completion rewarded by a Mixture-of-Experts reward
model mixed with the weights of the user who wrote the prompt ([`trl_moe_rm.PersonalizedReward`]).

Same data and reward arguments as `recipes/rloo_personalized.py` (whose helpers this script reuses): a `prompt` column
and a user column (`--user_column`, default `user_id`), `--reward_model_path` and `--profiles_path`.

```bash
python recipes/grpo_personalized.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name data/user_prompts.jsonl \
    --reward_model_path Qwen2.5-0.5B-MoE-Reward \
    --output_dir Qwen2.5-0.5B-GRPO-personalized \
    --per_device_train_batch_size 16 --num_generations 8 --max_completion_length 256 --learning_rate 1e-6

accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/grpo_personalized.py --config my_grpo.yaml
```

See docs/rl.md.
"""

import os
import sys
from pathlib import Path

from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, get_peft_config


sys.path.insert(0, str(Path(__file__).resolve().parent))
from rloo_personalized import (  # noqa: E402
    PersonalizedRewardArguments,
    build_reward,
    load_prompts,
    policy_init_kwargs,
)

from trl_moe_rm.scripts.train import MoETrlParser, resolve_model_name_or_path  # noqa: E402


def make_parser() -> MoETrlParser:
    """`(ScriptArguments, GRPOConfig, ModelConfig, PersonalizedRewardArguments)`; unknown YAML keys are errors."""
    return MoETrlParser((ScriptArguments, GRPOConfig, ModelConfig, PersonalizedRewardArguments))


def main(
    script_args: ScriptArguments,
    training_args: GRPOConfig,
    model_args: ModelConfig,
    reward_args: PersonalizedRewardArguments,
) -> GRPOTrainer:
    r"""
    Train a policy with GRPO and the personalized reward, then save it to `output_dir`.

    Returns:
        The [`~trl.GRPOTrainer`] after training.
    """
    if not model_args.model_name_or_path:
        raise ValueError("Pass the policy with `--model_name_or_path`.")
    if training_args.remove_unused_columns:
        raise ValueError(
            f"`remove_unused_columns=True` would drop the `{reward_args.user_column}` column before it reaches the "
            "reward; set `--remove_unused_columns false` (the GRPOConfig default)."
        )
    model_name = resolve_model_name_or_path(model_args.model_name_or_path)
    training_args.model_init_kwargs = policy_init_kwargs(training_args, model_args)
    train_dataset = load_prompts(script_args, reward_args.user_column)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, reward_args.user_column, "dataset_test_split")

    reward = build_reward(reward_args)  # after the training config: see rloo_personalized.py and docs/rl.md
    tokenizer = AutoTokenizer.from_pretrained(
        model_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    trainer = GRPOTrainer(
        model=model_name,
        reward_funcs=reward,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(
        f"Model saved to {training_args.output_dir}; {reward.num_fallbacks} completions on this process were scored "
        "with the default routing (users without a profile)."
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*make_parser().parse_args_and_config())
