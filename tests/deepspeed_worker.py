"""
Worker side of `tests/test_deepspeed.py`, run once per rank by `accelerate launch`.

It runs the real training script (`trl_moe_rm.scripts.train.main`, the function behind `recipes/train_moe_rm.py`) with
a probing callback, and writes one `rank{R}.json` per rank into `--probe_dir`:

- `init`: at step 0 (after DeepSpeed has partitioned the model), statistics of the router / expert parameters
  gathered with `deepspeed.zero.GatheredParameters`, a checksum of the gathered input embeddings, and the scores of
  every expert on fixed inputs;
- `local_loads`: on this rank, the mean routing weights of every training forward pass (to check that the logged
  `moe/load/expert_*` metrics are the mean over ranks);
- `final`: the scores on the same fixed inputs after training (eval mode, no grad), computed inside the run;
- `log_history`: the trainer's log history.

Usage: `accelerate launch ... tests/deepspeed_worker.py --probe_dir DIR <train_moe_rm.py arguments>`.
"""

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback


PROBE_PROMPTS = ["tell me about cat", "explain the moon", "what is alpha", "tell me about dog"]
PROBE_RESPONSES = ["good one two", "bad three", "good", "bad five six seven"]


def probe_batch(tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Fixed (prompt, response) rows, right-padded, with their prompt lengths."""
    rows, prompt_lengths = [], []
    for prompt, response in zip(PROBE_PROMPTS, PROBE_RESPONSES):
        prompt_ids = tokenizer(prompt)["input_ids"]
        rows.append(prompt_ids + tokenizer(response, add_special_tokens=False)["input_ids"])
        prompt_lengths.append(len(prompt_ids))
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([row + [pad] * (width - len(row)) for row in rows]),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows]),
        "prompt_lengths": torch.tensor(prompt_lengths),
    }


@torch.no_grad()
def probe_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: Any) -> dict[str, list]:
    """Routed and per-expert scores of `model` (a MoERewardModel, PEFT-wrapped or not) on `batch`, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        outputs = model(**{key: value.to(device) for key, value in batch.items()})
    finally:
        model.train(was_training)
    return {
        "logits": outputs.logits.float().squeeze(-1).tolist(),
        "expert_rewards": outputs.expert_rewards.float().tolist(),
        "routing_weights": outputs.routing_weights.float().tolist(),
    }


def _moe(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _gathered(params: list[torch.nn.Parameter]):
    """Full (un-partitioned) views of ZeRO-3 parameters; a no-op for ordinary ones."""
    if any(hasattr(param, "ds_id") for param in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class ProbeCallback(TrainerCallback):
    def __init__(self, probe_dir: str, tokenizer: PreTrainedTokenizerBase):
        self.probe_dir = Path(probe_dir)
        self.batch = probe_batch(tokenizer)
        self.record: dict[str, Any] = {"local_loads": []}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        moe = _moe(model)
        head = {
            name: param
            for name, param in model.named_parameters()
            if ".router." in f".{name}" or ".experts." in f".{name}"
        }
        embeddings = moe.backbone.get_input_embeddings().weight
        stats = {}
        with _gathered([*head.values(), embeddings]):
            for name, param in head.items():
                data = param.detach().float()
                stats[name] = {
                    "shape": list(data.shape),
                    "partition_numel": int(getattr(param, "ds_tensor", param).numel()),
                    "std": data.std().item() if data.numel() > 1 else 0.0,
                    "abs_max": data.abs().max().item() if data.numel() else 0.0,
                    "values": data.flatten()[:16].tolist(),
                }
            embedding_checksum = embeddings.detach().double().abs().sum().item()
        self.record["init"] = {
            "global_step": state.global_step,
            "params": stats,
            "embedding_checksum": embedding_checksum,
            "zero3": any(hasattr(param, "ds_id") for param in model.parameters()),
            "scores": probe_scores(model, self.batch, args.device),
        }
        self.record["world_size"] = args.world_size
        moe.register_forward_hook(self._record_load)

    def _record_load(self, module, inputs, outputs):
        if module.training:
            self.record["local_loads"].append(outputs.routing_weights.float().mean(dim=0).tolist())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.record["final"] = probe_scores(model, self.batch, args.device)
        self.record["log_history"] = state.log_history
        self.record["global_step"] = state.global_step
        self.probe_dir.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        with open(self.probe_dir / f"rank{rank}.json", "w") as file:
            json.dump(self.record, file)


def main(argv: list[str]) -> None:
    from transformers import AutoTokenizer

    from trl_moe_rm.scripts import train

    probe_index = argv.index("--probe_dir")
    probe_dir = argv[probe_index + 1]
    del argv[probe_index : probe_index + 2]
    script_args, training_args, model_args = train.make_parser().parse_args_and_config(argv)
    tokenizer = AutoTokenizer.from_pretrained(train.resolve_model_name_or_path(model_args.model_name_or_path))
    train.main(script_args, training_args, model_args, callbacks=[ProbeCallback(probe_dir, tokenizer)])


if __name__ == "__main__":
    main(sys.argv[1:])
