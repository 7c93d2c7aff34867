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

accelerate launch --config_file trl_moe_rm/accelerate_configs/zero3.yaml recipes/grpo_personalized.py --config my_grpo.yaml
```

See docs/rl.md.
"""

import os
import sys
from pathlib import Path

from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments


sys.path.insert(0, str(Path(__file__).resolve().parent))
from rloo_personalized import PersonalizedRewardArguments, train_personalized  # noqa: E402

from trl_moe_rm.scripts.train import MoETrlParser  # noqa: E402


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
    return train_personalized(GRPOTrainer, script_args, training_args, model_args, reward_args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*make_parser().parse_args_and_config())
