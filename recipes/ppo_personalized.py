# /// script
# dependencies = [
#     "trl-moe-rm",
#     "trl>=1.0,<=1.12.0",
#     "peft",
# ]
# ///
"""
Personalized PPO: train a policy with TRL's `PPOTrainer` against one user's reward model,
`MoERewardModel.for_user(profile)`.

`PPOTrainer` lives in `trl.experimental.ppo` in trl 1.0 to 1.12 only: upstream TRL removed it in 1.13. This script
checks the installed version and stops with a clear error otherwise; run it in an environment with `trl<=1.12.0`
(e.g. `.venv-trl-1.12.0`, made by `make test-ppo`). For current TRL, use `recipes/rloo_personalized.py` or
`recipes/grpo_personalized.py`, which also serve many users in one run.

PPO reads the reward at the last non-pad token of each sequence (`score(hidden_states)` of the reward model), so the
MoE reward model must use `pooling="last"` (the default for decoder backbones) and the profile's static weights are
used (a `"routed"` profile is applied as its static weights `w_u`).

```bash
python recipes/ppo_personalized.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name data/user_prompts.jsonl \
    --reward_model_path Qwen2.5-0.5B-MoE-Reward --user_id alice \
    --output_dir Qwen2.5-0.5B-PPO-alice \
    --per_device_train_batch_size 16 --total_episodes 10000 --response_length 128 --learning_rate 3e-6
```

The prompts are the `prompt` column of `--dataset_name` (text or chat messages); when the dataset has a
`--user_column`, only the rows of `--user_id` are used. The value model starts from `--value_model_path` (default:
the policy, with a fresh scalar head). See docs/rl.md.
"""

import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version


PPO_TRL_RANGE = (Version("1.0.0"), Version("1.12.0"))


def check_trl_version() -> str:
    """Raise a clear `ImportError` unless the installed TRL still has `trl.experimental.ppo` (1.0 to 1.12)."""
    try:
        installed = version("trl")
    except PackageNotFoundError as error:
        raise ImportError("TRL is not installed: `pip install 'trl>=1.0,<=1.12.0'`.") from error
    release = Version(Version(installed).base_version)
    if not PPO_TRL_RANGE[0] <= release <= PPO_TRL_RANGE[1]:
        raise ImportError(
            f"recipes/ppo_personalized.py needs TRL's PPOTrainer (`trl.experimental.ppo`), which exists in trl 1.0 to "
            f"1.12 only (upstream TRL removed it in 1.13); trl {installed} is installed. Use an environment with "
            "`pip install 'trl>=1.0,<=1.12.0'` (e.g. `make test-ppo` creates .venv-trl-1.12.0 with trl==1.12.0), or use "
            "recipes/rloo_personalized.py / recipes/grpo_personalized.py with the current TRL."
        )
    return installed


try:
    check_trl_version()
except ImportError as error:
    if __name__ == "__main__":
        sys.exit(f"error: {error}")
    raise

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from trl import ModelConfig, ScriptArguments, get_peft_config  # noqa: E402
from trl.data_utils import is_conversational  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402

from trl_moe_rm import ProfileStore  # noqa: E402
from trl_moe_rm.checkpoints import load_moe_reward_model  # noqa: E402
from trl_moe_rm.data.loading import load_preference_dataset  # noqa: E402
from trl_moe_rm.scripts.train import MoETrlParser, resolve_model_name_or_path  # noqa: E402


@dataclass
class UserRewardArguments:
    r"""
    The user whose reward model PPO optimizes.

    Args:
        user_id (`str`):
            The user's id in the profile store (an id made of digits is also tried as an int).
        profiles_path (`str`, *optional*):
            The users' profiles; defaults to `reward_model_path` (its `profiles/` folder).
        user_column (`str`, *optional*, defaults to `"user_id"`):
            When the dataset has this column, only the rows of `user_id` are used.
        value_model_path (`str`, *optional*):
            Initialisation of the value model (`AutoModelForSequenceClassification`, one label); defaults to the
            policy.
    """

    user_id: str | None = field(default=None, metadata={"help": "The user whose reward PPO optimizes."})
    profiles_path: str | None = field(
        default=None, metadata={"help": "The users' profiles; defaults to `reward_model_path`."}
    )
    user_column: str = field(default="user_id", metadata={"help": "Dataset column of user ids (rows are filtered)."})
    value_model_path: str | None = field(
        default=None, metadata={"help": "Initialisation of the value model; defaults to the policy."}
    )


def make_parser() -> MoETrlParser:
    """`(ScriptArguments, PPOConfig, ModelConfig, UserRewardArguments)`; unknown YAML keys are errors."""
    return MoETrlParser((ScriptArguments, PPOConfig, ModelConfig, UserRewardArguments))


def load_user_reward_model(reward_model_path: str, user_args: UserRewardArguments) -> Any:
    """`MoERewardModel.for_user(profile)` for `user_args.user_id`, checked for PPO's last-token reward."""
    if not user_args.user_id:
        raise ValueError("Pass the user whose reward PPO optimizes with `--user_id`.")
    model = load_moe_reward_model(reward_model_path)
    if getattr(model.config, "pooling", None) != "last":
        raise ValueError(
            f"PPOTrainer reads the reward at the last token of each sequence, but this MoE reward model pools with "
            f"{model.config.pooling!r}: its PPO rewards would differ from its scores. Use a model trained with "
            "`pooling='last'`, or recipes/rloo_personalized.py / grpo_personalized.py, which score whole sequences."
        )
    store = ProfileStore.from_pretrained(user_args.profiles_path or reward_model_path)
    profile = store.get(user_args.user_id)
    if profile is None and user_args.user_id.lstrip("-").isdigit():
        profile = store.get(int(user_args.user_id))
    if profile is None:
        raise ValueError(f"No profile for user {user_args.user_id!r} in {store}; fit one with fit_user_weights.")
    if profile.mode == "routed":
        print(f"User {profile.user_id!r} has a routed profile; PPO's last-token reward uses its static weights.")
    return model.for_user(profile, mode="static")


def load_queries(script_args: ScriptArguments, user_args: UserRewardArguments, tokenizer: Any, split: str) -> Any:
    """The user's prompts, tokenized into `input_ids` (chat prompts with the generation prompt)."""
    if not script_args.dataset_name:
        raise ValueError("Pass the prompts with `--dataset_name` (a Hub id or a local file / folder).")
    dataset = load_preference_dataset(script_args.dataset_name, config=script_args.dataset_config, check_columns=False)
    if split not in dataset:
        raise KeyError(f"The dataset {script_args.dataset_name!r} has no split {split!r} (it has {list(dataset)}).")
    dataset = dataset[split]
    if "prompt" not in dataset.column_names:
        raise ValueError(f"The dataset has no `prompt` column (it has {dataset.column_names}).")
    if user_args.user_column in dataset.column_names:
        user = user_args.user_id
        dataset = dataset.filter(lambda row: str(row[user_args.user_column]) == user)
        if len(dataset) == 0:
            raise ValueError(f"The dataset has no rows of user {user!r} in its `{user_args.user_column}` column.")

    def tokenize(row: dict[str, Any]) -> dict[str, list[int]]:
        if is_conversational(row):
            ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) else ids
            return {"input_ids": list(ids)}
        return {"input_ids": tokenizer(row["prompt"])["input_ids"]}

    return dataset.map(tokenize, remove_columns=dataset.column_names)


def main(
    script_args: ScriptArguments, training_args: PPOConfig, model_args: ModelConfig, user_args: UserRewardArguments
) -> PPOTrainer:
    r"""
    Train a policy with PPO against one user's reward model, then save it to `output_dir`.

    Returns:
        The `PPOTrainer` after training.
    """
    policy_path = resolve_model_name_or_path(model_args.model_name_or_path or training_args.sft_model_path)
    tokenizer = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    init_kwargs = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    policy = AutoModelForCausalLM.from_pretrained(policy_path, **init_kwargs)
    value_model = AutoModelForSequenceClassification.from_pretrained(
        user_args.value_model_path or policy_path, num_labels=1, **init_kwargs
    )
    reward_model = load_user_reward_model(training_args.reward_model_path, user_args)
    peft_config = get_peft_config(model_args)
    ref_policy = None if peft_config is not None else AutoModelForCausalLM.from_pretrained(policy_path, **init_kwargs)

    train_dataset = load_queries(script_args, user_args, tokenizer, script_args.dataset_train_split)
    eval_dataset = train_dataset
    if training_args.eval_strategy != "no":
        eval_dataset = load_queries(script_args, user_args, tokenizer, script_args.dataset_test_split)
    trainer = PPOTrainer(
        args=training_args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*make_parser().parse_args_and_config())
