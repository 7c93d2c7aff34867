# /// script
# dependencies = [
#     "trl-moe-rm",
#     "peft",
# ]
# ///
"""
Personalized RLOO: train a policy with TRL's `RLOOTrainer`, each completion rewarded by a Mixture-of-Experts reward
model mixed with the weights of the user who wrote the prompt ([`trl_moe_rm.PersonalizedReward`]).

The dataset needs a `prompt` column (text or chat messages) and a user column (`--user_column`, default `user_id`); it
is a Hub id or a local `.json` / `.jsonl` / `.parquet` file or folder. `--reward_model_path` is a folder written by
`MoERewardTrainer` (or a Hub id), and `--profiles_path` the users' profiles (default: `<reward_model_path>/profiles`,
as written by `ProfileStore.save_pretrained`). Users without a profile get the model's default routing (counted in the
`personalized_reward/fallbacks` metric) unless `--strict_users`.

```bash
python recipes/rloo_personalized.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name data/user_prompts.jsonl \
    --reward_model_path Qwen2.5-0.5B-MoE-Reward --profiles_path Qwen2.5-0.5B-MoE-Reward/profiles \
    --output_dir Qwen2.5-0.5B-RLOO-personalized \
    --per_device_train_batch_size 16 --num_generations 8 --max_completion_length 256 --learning_rate 1e-6

# DeepSpeed ZeRO-3 (the reward model is gathered into a full copy on every process)
accelerate launch --config_file trl_moe_rm/accelerate_configs/zero3.yaml recipes/rloo_personalized.py --config my_rloo.yaml
```

See docs/rl.md.
"""

import os
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import AutoTokenizer
from trl import ModelConfig, RLOOConfig, RLOOTrainer, ScriptArguments, get_peft_config

from trl_moe_rm import PersonalizedReward
from trl_moe_rm.data.loading import load_preference_dataset
from trl_moe_rm.scripts.train import MoETrlParser, resolve_model_name_or_path


@dataclass
class PersonalizedRewardArguments:
    r"""
    Arguments of the personalized reward ([`PersonalizedReward`]).

    Args:
        reward_model_path (`str`, *optional*):
            The trained MoE reward model: a folder written by `MoERewardTrainer.save_model` or a Hub id.
        profiles_path (`str`, *optional*):
            The users' profiles (a `ProfileStore` folder or a model folder with `profiles/`). Defaults to
            `reward_model_path`.
        user_column (`str`, *optional*, defaults to `"user_id"`):
            Dataset column holding each prompt's user id.
        strict_users (`bool`, *optional*, defaults to `False`):
            Fail on users without a profile instead of falling back to the default routing.
        normalize_rewards (`bool`, *optional*, defaults to `False`):
            Standardize the rewards with their running mean and standard deviation.
        reward_batch_size (`int`, *optional*, defaults to `32`):
            Completions per forward pass of the reward model.
        max_logged_users (`int`, *optional*, defaults to `8`):
            Users whose mean reward is logged under their own key (the others are pooled into `_other`).
    """

    reward_model_path: str | None = field(
        default=None, metadata={"help": "The trained MoE reward model (folder or Hub id)."}
    )
    profiles_path: str | None = field(
        default=None, metadata={"help": "The users' profiles; defaults to `reward_model_path` (its `profiles/`)."}
    )
    user_column: str = field(default="user_id", metadata={"help": "Dataset column holding each prompt's user id."})
    strict_users: bool = field(
        default=False, metadata={"help": "Fail on users without a profile instead of using the default routing."}
    )
    normalize_rewards: bool = field(
        default=False, metadata={"help": "Standardize rewards with their running mean and standard deviation."}
    )
    reward_batch_size: int = field(default=32, metadata={"help": "Completions per reward-model forward pass."})
    max_logged_users: int = field(default=8, metadata={"help": "Users logged under their own metric key."})


def make_parser() -> MoETrlParser:
    """`(ScriptArguments, RLOOConfig, ModelConfig, PersonalizedRewardArguments)`; unknown YAML keys are errors."""
    return MoETrlParser((ScriptArguments, RLOOConfig, ModelConfig, PersonalizedRewardArguments))


def build_reward(reward_args: PersonalizedRewardArguments) -> PersonalizedReward:
    """The [`PersonalizedReward`] described by the arguments (load it after the training config, on every rank)."""
    if not reward_args.reward_model_path:
        raise ValueError("Pass the trained MoE reward model with `--reward_model_path` (a folder or a Hub id).")
    return PersonalizedReward.from_pretrained(
        reward_args.reward_model_path,
        profiles=reward_args.profiles_path,
        user_column=reward_args.user_column,
        strict=reward_args.strict_users,
        normalize=reward_args.normalize_rewards,
        batch_size=reward_args.reward_batch_size,
        max_logged_users=reward_args.max_logged_users,
    )


def load_prompts(script_args: ScriptArguments, user_column: str, split_flag: str = "dataset_train_split") -> Any:
    """The prompt split, checked for the `prompt` and user columns."""
    if not script_args.dataset_name:
        raise ValueError(
            "Pass the prompts with `--dataset_name`: a Hub id or a local .json / .jsonl / .parquet file or folder, with "
            f"a `prompt` column and a `{user_column}` column."
        )
    dataset = load_preference_dataset(
        script_args.dataset_name,
        config=script_args.dataset_config,
        streaming=script_args.dataset_streaming,
        check_columns=False,
    )
    split = getattr(script_args, split_flag)
    if split not in dataset:
        raise KeyError(
            f"The dataset {script_args.dataset_name!r} has no split {split!r} (its splits are {list(dataset)}); set "
            f"`--{split_flag}`."
        )
    dataset = dataset[split]
    columns = dataset.column_names if isinstance(dataset, (Dataset, IterableDataset)) else None
    if columns is not None:
        missing = [column for column in ("prompt", user_column) if column not in columns]
        if missing:
            raise ValueError(
                f"The dataset {script_args.dataset_name!r} has no {missing} column(s) (it has {columns}). Each row "
                f"needs a `prompt` and the id of its user in `{user_column}` (see `--user_column`)."
            )
    return dataset


def policy_init_kwargs(training_args: Any, model_args: ModelConfig) -> dict[str, Any]:
    """`from_pretrained` keyword arguments of the policy, as TRL's own scripts set them."""
    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs.update(training_args.model_init_kwargs or {})
    return kwargs


def train_personalized(
    trainer_cls: type,
    script_args: ScriptArguments,
    training_args: Any,
    model_args: ModelConfig,
    reward_args: PersonalizedRewardArguments,
) -> Any:
    r"""
    Train a policy with an online TRL trainer (`RLOOTrainer`, `GRPOTrainer`) and the personalized reward, then save it
    to `output_dir`. Shared by this script and `recipes/grpo_personalized.py`.

    Returns:
        The trainer after training.
    """
    if not model_args.model_name_or_path:
        raise ValueError("Pass the policy with `--model_name_or_path`.")
    if training_args.remove_unused_columns:
        raise ValueError(
            f"`remove_unused_columns=True` would drop the `{reward_args.user_column}` column before it reaches the "
            f"reward; set `--remove_unused_columns false` (the {type(training_args).__name__} default)."
        )
    model_name = resolve_model_name_or_path(model_args.model_name_or_path)
    training_args.model_init_kwargs = policy_init_kwargs(training_args, model_args)
    train_dataset = load_prompts(script_args, reward_args.user_column)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_prompts(script_args, reward_args.user_column, "dataset_test_split")

    # After the training config: under ZeRO-3 with `zero3_init_flag`, the reward model is loaded partitioned and
    # PersonalizedReward gathers it into a full copy on every process (see docs/rl.md).
    reward = build_reward(reward_args)
    tokenizer = AutoTokenizer.from_pretrained(
        model_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    trainer = trainer_cls(
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


def main(
    script_args: ScriptArguments,
    training_args: RLOOConfig,
    model_args: ModelConfig,
    reward_args: PersonalizedRewardArguments,
) -> RLOOTrainer:
    r"""
    Train a policy with RLOO and the personalized reward, then save it to `output_dir`.

    Returns:
        The [`~trl.RLOOTrainer`] after training.
    """
    return train_personalized(RLOOTrainer, script_args, training_args, model_args, reward_args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*make_parser().parse_args_and_config())
