"""
How often does `trl-moe-rm diagnose` recommend the right setting? Measured on datasets whose regime is known.

- visible context (the right answer: the defaults): the demo's controlled data (`category`), the visible-types
  generator with 4 and 12 types (`benchmarks/visible_types.py`, `category`), Auto-J (scenario group; the assignment
  loss does not help there, see the real-data section of `docs/benchmarks.md`);
- hidden context (the right answer: `preset="hidden_context"`): DSP (`user_id`, the domain) and the controlled
  simulated users (`make_users(16, alpha=0.3, seed=0)`, 160 pairs each, `user_id`).

The visible datasets are those of `benchmarks/defaults_sweep.py` (train and test splits together; with the same
`--cache_dir`, their features come from the sweep's cache). Each dataset is encoded once with the frozen
all-MiniLM-L6-v2, each distinct text once (`benchmarks.real_data.PairTokenizer` and `prime_feature_cache`, 256
tokens), then `--draws` random samples of `--num_pairs` pairs are diagnosed with
[`~trl_moe_rm.diagnose.diagnose_features`], with and without the category column. Auto-J and DSP are read from the
real-data directory (`--data_dir`, `$TRL_MOE_RM_DATA` or `../shared/data`) and skipped when missing.

    python -m benchmarks.diagnose_accuracy --datasets controlled dsp --draws 5 --num_pairs 1000 --results /tmp/d.json
    python -m benchmarks.diagnose_accuracy --report --results /tmp/d.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
from datasets import DatasetDict, concatenate_datasets
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.utils import logging

from benchmarks.defaults_sweep import load_split, read_results, write_results
from benchmarks.dsp import load_dsp_pairs
from benchmarks.real_data import PairTokenizer, prime_feature_cache
from benchmarks.real_datasets import RealDataMissingError
from trl_moe_rm import MoERewardModel
from trl_moe_rm.data import make_users, make_users_dataset
from trl_moe_rm.demo import minilm_path
from trl_moe_rm.diagnose import diagnose_features
from trl_moe_rm.feature_cache import features_fingerprint


# name -> (the dataset's splits, category column, expected preset)
DATASETS: dict[str, tuple[Callable[[str | None], DatasetDict], str, str | None]] = {
    **{name: (partial(load_split, name), "category", None) for name in ("controlled", "types4", "types12", "autoj")},
    "dsp": (lambda data_dir: DatasetDict({"all": load_dsp_pairs(data_dir)}), "user_id", "hidden_context"),
    "simulated_users": (
        lambda _: DatasetDict({"all": make_users_dataset(make_users(16, alpha=0.3, seed=0), 160, seed=0)}),
        "user_id",
        "hidden_context",
    ),
}


def encode_dataset(splits: DatasetDict, name: str, model: Any, tokenizer: Any, cache_dir: str) -> dict[str, Any]:
    """
    Frozen features of every pair of every split, each distinct text encoded once and kept in `cache_dir` (the
    datasets of `benchmarks.defaults_sweep` find the features that sweep cached), and the pairs, splits concatenated.
    """
    pair_tokenizer = PairTokenizer(tokenizer, max_length=256)
    tokenized = {split: pair_tokenizer(dataset) for split, dataset in splits.items()}
    prime_feature_cache(model, tokenizer.pad_token_id, tokenized, cache_dir, name)
    features = [
        load_file(os.path.join(cache_dir, f"features-{features_fingerprint(model, split)}.safetensors"))
        for split in tokenized.values()
    ]
    return {
        "dataset": concatenate_datasets(list(splits.values())),
        **{key: np.concatenate([part[key].numpy() for part in features]) for key in features[0]},
    }


def run(
    names: Sequence[str], draws: int, num_pairs: int, cache_dir: str, results_path: str, data_dir: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    r"""
    Diagnoses `draws` random samples of `num_pairs` pairs of each dataset, with and without its category column, and
    stores them in `results_path` (JSON; a dataset already there is replaced).

    Returns:
        `dict[str, list[dict]]`: All the results in `results_path`: per dataset, one entry per draw and mode
        (`with_category`), with the diagnosis and `correct`.
    """
    logging.set_verbosity_error()
    backbone = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = MoERewardModel.from_backbone(backbone)
    results = read_results(results_path)["runs"]
    for name in names:
        loader, column, expected = DATASETS[name]
        try:
            encoded = encode_dataset(loader(data_dir), name, model, tokenizer, cache_dir)
        except RealDataMissingError as error:
            print(f"skipping {name}: {error}")
            continue
        dataset = encoded["dataset"]
        prompts, categories = np.asarray(dataset["prompt"]), np.asarray(dataset[column])
        results[name] = []
        for draw in range(draws):
            rows = np.sort(
                np.random.default_rng(draw).choice(len(dataset), min(num_pairs, len(dataset)), replace=False)
            )
            for with_category in (True, False):
                start = time.perf_counter()
                diagnosis = diagnose_features(
                    encoded["chosen_features"][rows],
                    encoded["rejected_features"][rows],
                    encoded["router_features"][rows],
                    prompts[rows],
                    categories[rows] if with_category else None,
                    seed=draw,
                )
                entry = {
                    "draw": draw,
                    "with_category": with_category,
                    "correct": diagnosis.preset == expected,
                    "seconds": time.perf_counter() - start,
                    **diagnosis.to_dict(),
                }
                results[name].append(entry)
                print(
                    f"{name} draw {draw} {'with' if with_category else 'without'} {column}: {diagnosis.preset} "
                    f"({'right' if entry['correct'] else 'WRONG'}); {diagnosis.reason}",
                    flush=True,
                )
        write_results(results_path, {"runs": results})
    return results


def markdown_report(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per dataset: right recommendations with and without the category column, and the mean probe scores."""
    lines = [
        "| dataset | regime | with the category column: right | readability | category readability | pooled / prompt "
        "/ context probe | without it: right |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = {True: [0, 0], False: [0, 0]}
    for name, entries in results.items():
        expected = DATASETS[name][2]
        cells = {}
        for mode in (True, False):
            mode_entries = [entry for entry in entries if entry["with_category"] == mode]
            right = sum(entry["correct"] for entry in mode_entries)
            totals[mode][0] += right
            totals[mode][1] += len(mode_entries)
            cells[mode] = (f"{right}/{len(mode_entries)}", mode_entries)

        def mean(key: str, mode_entries: list[dict]) -> str:
            values = [entry[key] for entry in mode_entries if entry[key] is not None]
            return f"{np.mean(values):.2f}" if values else "—"

        with_entries = cells[True][1]
        probes = " / ".join(
            mean(key, with_entries) for key in ("pooled_accuracy", "prompt_accuracy", "context_accuracy")
        )
        lines.append(
            f"| {name} | {'hidden' if expected else 'visible'} | {cells[True][0]} | "
            f"{mean('readability', with_entries)} | {mean('category_readability', with_entries)} | {probes} | "
            f"{cells[False][0]} |"
        )
    lines.append(
        f"| **all** | | **{totals[True][0]}/{totals[True][1]}** | | | | **{totals[False][0]}/{totals[False][1]}** |"
    )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--draws", type=int, default=5, help="Random samples diagnosed per dataset.")
    parser.add_argument("--num_pairs", type=int, default=1000, help="Pairs per sample.")
    parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "defaults_sweep_cache"))
    parser.add_argument("--results", default=os.path.join(tempfile.gettempdir(), "diagnose_accuracy.json"))
    parser.add_argument("--data_dir", default=None, help="Real data directory (default: $TRL_MOE_RM_DATA).")
    parser.add_argument("--report", action="store_true", help="Print the table of --results and exit.")
    args = parser.parse_args(argv)
    if not args.report:
        run(args.datasets, args.draws, args.num_pairs, args.cache_dir, args.results, args.data_dir)
    print(markdown_report(read_results(args.results)["runs"]))


if __name__ == "__main__":
    main()
