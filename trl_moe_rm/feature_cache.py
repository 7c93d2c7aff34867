"""Frozen-backbone fast path: encode every (prompt, response) once, then train the head on cached features."""

import hashlib
import json
import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset
from safetensors.torch import load_file, save
from tqdm.auto import tqdm
from transformers.utils import logging

from .io_utils import atomic_write_bytes
from .modeling_moe_reward import MoERewardModel
from .scoring import progress_disabled


logger = logging.get_logger(__name__)

FEATURE_KEYS = ("chosen_features", "rejected_features", "router_features")


class FeatureBank:
    """
    Cached backbone features of the tokenized preference datasets a trainer uses.

    Each prepared dataset gets a `feature_row` column indexing into this bank; the collator looks the features up, so
    no float column is written into Arrow and the bank is shared by the train and eval datasets.
    """

    def __init__(self):
        self._blocks: dict[str, list[torch.Tensor]] = {key: [] for key in FEATURE_KEYS}
        self._tensors: dict[str, torch.Tensor] | None = None
        self.num_rows = 0

    def add(self, features: dict[str, torch.Tensor]) -> range:
        """Append the features of a dataset; returns the rows they occupy."""
        size = features["chosen_features"].shape[0]
        for key in FEATURE_KEYS:
            self._blocks[key].append(features[key].float().cpu())
        self._tensors = None
        rows = range(self.num_rows, self.num_rows + size)
        self.num_rows += size
        return rows

    def lookup(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: tensor[rows] for key, tensor in self._materialize().items()}

    def overwrite(self, rows: torch.Tensor, features: dict[str, torch.Tensor]) -> None:
        """Replace the features stored at `rows` (after the backbone changed, e.g. on resume from a checkpoint)."""
        for key, tensor in self._materialize().items():
            tensor[rows] = features[key].to(tensor.dtype)

    def _materialize(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            self._tensors = {key: torch.cat(blocks) for key, blocks in self._blocks.items()}
            self._blocks = {key: [tensor] for key, tensor in self._tensors.items()}
        return self._tensors


def backbone_fingerprint(model: MoERewardModel) -> str:
    """A cheap key of the backbone: its configuration, the pooling settings, and a sample of every weight."""
    backbone = model.backbone
    digest = hashlib.sha256()
    digest.update(json.dumps(backbone.config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(json.dumps([model.config.pooling, model.config.prompt_encoding, model.config.router_input]).encode())
    for name, param in backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().float().flatten()[:256].cpu().numpy().tobytes())
    return digest.hexdigest()


def features_fingerprint(model: MoERewardModel, dataset: Dataset) -> str:
    """A key for the on-disk cache: [`backbone_fingerprint`] and the data."""
    digest = hashlib.sha256(backbone_fingerprint(model).encode())
    for column in ("chosen_ids", "rejected_ids", "prompt_length"):
        digest.update(json.dumps(list(dataset[column])).encode())
    return digest.hexdigest()[:32]


@torch.inference_mode()
def encode_preference_dataset(
    model: MoERewardModel,
    dataset: Dataset,
    collator: Any,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    cache_dir: str | None = None,
    disable_tqdm: bool | None = None,
) -> dict[str, torch.Tensor]:
    r"""
    Encode a tokenized preference dataset once with the (frozen) backbone.

    Args:
        model ([`MoERewardModel`]):
            The model whose backbone encodes the data.
        dataset ([`~datasets.Dataset`]):
            Tokenized preference rows (`chosen_ids`, `rejected_ids`, `prompt_length`).
        collator:
            The preference collator (chosen rows first, then rejected rows).
        batch_size (`int`, *optional*, defaults to `64`):
            Pairs per forward pass.
        device (`torch.device` or `str`, *optional*):
            Where to run the backbone. Defaults to the model's device.
        cache_dir (`str`, *optional*):
            A directory for a safetensors cache keyed by [`features_fingerprint`]: a second run on the same backbone
            and data loads instead of encoding. A corrupt or mismatched cache file is ignored (with a warning) and
            rewritten.
        disable_tqdm (`bool`, *optional*):
            Hide the "Encoding" progress bar (the trainer passes its `disable_tqdm`; `TQDM_DISABLE=1` hides it too).

    Returns:
        `dict` with `chosen_features`, `rejected_features` and `router_features`, each `(len(dataset), hidden_size)`.
    """
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"features-{features_fingerprint(model, dataset)}.safetensors")
        if os.path.isfile(path):
            try:
                features = load_file(path)
                if all(key in features and features[key].shape[0] == len(dataset) for key in FEATURE_KEYS):
                    return features
                problem = "it does not hold the features of this dataset"
            except Exception as error:  # safetensors raises its own error types
                problem = f"it cannot be read ({error})"
            logger.warning(
                f"Ignoring the feature cache {path!r}: {problem}. Encoding the data again and rewriting it."
            )
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    table = dataset.select_columns(["chosen_ids", "rejected_ids", "prompt_length"])
    # Batches of similar lengths need less padding (the encoding is cheaper); the rows are put back in order below.
    order = _rows_by_length(table)
    blocks: dict[str, list[torch.Tensor]] = {key: [] for key in FEATURE_KEYS}
    logger.info(f"Encoding {len(order)} pairs with the frozen backbone (once; training then reads the cache).")
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=f"Encoding {len(order)} pairs", unit="batch", disable=progress_disabled(disable_tqdm)):
        rows = table[order[start : start + batch_size]]
        examples = [dict(zip(rows, values)) for values in zip(*rows.values())]
        batch = collator(examples)
        sequence, router = model.encode(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            prompt_lengths=batch["prompt_lengths"].to(device),
            paired=True,
        )
        chosen, rejected = sequence.chunk(2)
        blocks["chosen_features"].append(chosen.float().cpu())
        blocks["rejected_features"].append(rejected.float().cpu())
        blocks["router_features"].append(router.float().cpu())
    model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    features = {key: torch.cat(values)[inverse] for key, values in blocks.items()}
    if path is not None:
        atomic_write_bytes(path, save(features))
    return features


def _rows_by_length(table: Dataset) -> list[int]:
    """Row indices sorted by the longer response of each pair, read with Arrow (no Python lists of token ids)."""
    lengths = []
    for batch in table.with_format("arrow").iter(batch_size=8192):
        chosen = pc.list_value_length(batch["chosen_ids"]).to_numpy(zero_copy_only=False)
        rejected = pc.list_value_length(batch["rejected_ids"]).to_numpy(zero_copy_only=False)
        lengths.append(np.maximum(chosen, rejected))
    if not lengths:
        return []
    return np.argsort(np.concatenate(lengths), kind="stable").tolist()
