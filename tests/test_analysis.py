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
"""Tests of the analysis metrics and plots, on planted structure so that a wrong metric fails."""

import json
import re

import numpy as np
import pytest
import torch
from datasets import Dataset
from scipy.stats import spearmanr
from tiny import separable_dataset, tiny_moe, tiny_tokenizer

from trl_moe_rm.analysis import (
    ExpertDescription,
    PairScores,
    analysis_report,
    attribute_deltas,
    category_recovery,
    describe_experts,
    description_accuracy,
    expert_attribute_correlation,
    log_odds_z_scores,
    posterior_assignment,
    routing_matrix,
    routing_matrix_from_model,
    routing_nmi,
    routing_purity,
    score_pairs,
    specialization_score,
    steer,
    steering_shift,
)
from trl_moe_rm.data import ATTRIBUTE_MARKERS, ATTRIBUTES, CATEGORIES, make_controlled_dataset
from trl_moe_rm.plots import (
    plot_expert_attribute_heatmap,
    plot_routing_entropy,
    plot_routing_heatmap,
    plot_weight_shift,
    plot_weight_shift_heatmap,
)
from trl_moe_rm.processing import tokenize_preference as _tokenize_preference


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def controlled():
    return make_controlled_dataset(num_pairs_per_category=30)


def _count(text, words):
    tokens = re.findall(r"[a-z]+", text.lower())
    return float(sum(tokens.count(word) for word in words))


def _planted_expert_rewards(text):
    """Expert 0: formal connectors; 1: length in words; 2: minus technical markers; 3: constant (dead)."""
    return [
        _count(text, ("furthermore", "moreover")),
        float(len(re.findall(r"[a-z]+", text.lower()))),
        -_count(text, ("algorithm", "latency", "throughput")),
        0.0,
    ]


def _planted_scores(dataset, routing=None):
    chosen = np.array([_planted_expert_rewards(text) for text in dataset["chosen"]])
    rejected = np.array([_planted_expert_rewards(text) for text in dataset["rejected"]])
    if routing is None:
        routing = np.zeros_like(chosen)
        routing[:, 3] = 1.0
    return PairScores.from_expert_rewards(chosen, rejected, routing)


def _one_hot(indices, width):
    matrix = np.zeros((len(indices), width))
    matrix[np.arange(len(indices)), indices] = 1.0
    return matrix


# ----------------------------------------------------------------------------------------------------------------------
# PairScores
# ----------------------------------------------------------------------------------------------------------------------


def test_pair_scores_properties_and_validation():
    scores = PairScores.from_expert_rewards(
        chosen_expert_rewards=[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]],
        rejected_expert_rewards=[[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]],
        routing_weights=[[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]],
    )
    np.testing.assert_allclose(scores.expert_deltas, [[1, -1], [-1, 2], [0, 0]])
    np.testing.assert_allclose(scores.reward_deltas, [1.0, 1.25, 0.0])
    assert scores.accuracy == pytest.approx(2.5 / 3)  # the tie counts one half
    np.testing.assert_array_equal(scores.top1_experts, [0, 1, 0])
    np.testing.assert_allclose(scores.router_probs, scores.routing_weights)
    subset = scores.select([2, 0])
    np.testing.assert_allclose(subset.chosen_rewards, [1.0, 1.0])
    assert len(subset) == 2 and subset.num_experts == 2
    with pytest.raises(ValueError, match="router_probs"):
        PairScores([0.0], [0.0], [[0.0, 0.0]], [[0.0, 0.0]], [[1.0, 0.0]], router_probs=[[1.0, 0.0, 0.0]])


# ----------------------------------------------------------------------------------------------------------------------
# Category recovery
# ----------------------------------------------------------------------------------------------------------------------


def test_nmi_and_purity_are_one_for_a_permuted_perfect_assignment():
    rng = np.random.default_rng(0)
    categories = rng.choice(list(CATEGORIES), size=300)
    permutation = dict(zip(CATEGORIES, rng.permutation(8)[:6]))  # 6 of 8 experts, in a shuffled order
    experts = np.array([permutation[c] for c in categories])
    assert routing_nmi(experts, categories) == pytest.approx(1.0)
    assert routing_purity(experts, categories) == pytest.approx(1.0)


def test_nmi_is_near_zero_for_a_random_assignment():
    rng = np.random.default_rng(1)
    categories = rng.integers(0, 6, size=4000)
    experts = rng.integers(0, 8, size=4000)
    assert routing_nmi(experts, categories) < 0.02
    # Purity of a random assignment sits near the largest category share, far from 1.
    assert routing_purity(experts, categories) < 0.3


def test_purity_hand_computed_example():
    experts = [0, 0, 0, 1, 1, 2]
    categories = ["a", "a", "b", "b", "b", "c"]
    # expert 0 -> majority a (2 of 3), expert 1 -> b (2 of 2), expert 2 -> c (1 of 1): (2 + 2 + 1) / 6.
    assert routing_purity(experts, categories) == pytest.approx(5 / 6)
    # Splitting one category over two experts keeps purity at 1 but lowers NMI below 1.
    split = [0, 1, 2, 2]
    assert routing_purity(split, ["a", "a", "b", "b"]) == 1.0
    assert routing_nmi(split, ["a", "a", "b", "b"]) < 1.0
    with pytest.raises(ValueError, match="3 category labels for 6 pairs"):
        routing_purity(experts, categories[:3])


def test_category_recovery_uses_the_top1_routed_expert():
    categories = ["x", "y", "x", "y"]
    routing = np.array([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.6, 0.0, 0.4], [0.2, 0.0, 0.8]])
    assert category_recovery(routing, categories) == {"nmi": pytest.approx(1.0), "purity": 1.0}
    swapped = routing[:, [2, 1, 0]]  # relabelled experts: same recovery
    assert category_recovery(swapped, categories)["nmi"] == pytest.approx(1.0)
    mixed = np.array([[1.0, 0.0, 0.0]] * 4)
    assert category_recovery(mixed, categories) == {"nmi": pytest.approx(0.0), "purity": 0.5}


def test_posterior_assignment_picks_the_expert_that_explains_the_label():
    deltas = np.array([[2.0, -1.0, 0.5], [-3.0, -0.5, -4.0], [0.0, 0.1, 0.0]])
    scores = PairScores.from_expert_rewards(deltas, np.zeros_like(deltas), np.full((3, 3), 1 / 3))
    np.testing.assert_array_equal(posterior_assignment(scores), [0, 1, 1])
    # A router prior concentrated on expert 2 overrides the weak likelihood preference of the last pair.
    prior = np.array([[1 / 3] * 3, [1 / 3] * 3, [0.01, 0.01, 0.98]])
    scores = PairScores.from_expert_rewards(deltas, np.zeros_like(deltas), np.full((3, 3), 1 / 3), router_probs=prior)
    np.testing.assert_array_equal(posterior_assignment(scores, use_router_prior=True), [0, 1, 2])


def test_routing_matrix_means_and_names():
    routing = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
    matrix, names = routing_matrix(routing, ["b", "b", "a", "a"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(matrix, [[0.1, 0.9], [0.75, 0.25]])
    dataset = Dataset.from_dict({"category": ["b", "b", "a", "a"]})
    matrix_from_dataset, _ = routing_matrix(PairScores.from_expert_rewards(routing, routing, routing), dataset)
    np.testing.assert_allclose(matrix_from_dataset, matrix)


# ----------------------------------------------------------------------------------------------------------------------
# Expert-attribute alignment
# ----------------------------------------------------------------------------------------------------------------------


def test_correlation_equals_scipy_spearman_and_constant_columns_are_zero():
    rng = np.random.default_rng(2)
    experts = rng.normal(size=(200, 3))
    experts[:, 2] = 1.5  # dead expert
    attributes = rng.choice([-2.0, 0.0, 2.0], size=(200, 2))  # heavy ties
    experts[:, 1] = attributes[:, 0] + rng.normal(scale=0.5, size=200)
    corr = expert_attribute_correlation(experts, attributes)
    assert corr.shape == (3, 2)
    for k in range(2):
        for a in range(2):
            assert corr[k, a] == pytest.approx(spearmanr(experts[:, k], attributes[:, a]).statistic)
    np.testing.assert_array_equal(corr[2], [0.0, 0.0])
    assert not np.isnan(corr).any()


def test_hungarian_matching_recovers_a_planted_permutation_with_signs():
    rng = np.random.default_rng(3)
    num_pairs, num_experts, num_attributes = 500, 5, 3
    attributes = rng.normal(size=(num_pairs, num_attributes))
    experts = rng.normal(size=(num_pairs, num_experts))
    expert_of = {0: 3, 1: 0, 2: 4}
    sign_of = {0: -1.0, 1: 1.0, 2: -1.0}
    for a, k in expert_of.items():
        experts[:, k] = sign_of[a] * attributes[:, a] + 0.1 * rng.normal(size=num_pairs)
    score, matching = specialization_score(expert_attribute_correlation(experts, attributes))
    assert score > 0.95
    assert len(matching) == num_attributes  # K > A: only A experts are matched
    assert {(k, a) for k, a, _ in matching} == {(k, a) for a, k in expert_of.items()}
    for _, a, rho in matching:
        assert np.sign(rho) == sign_of[a]
    # Fewer experts than attributes: only K attributes are matched.
    score, matching = specialization_score(expert_attribute_correlation(experts[:, [4, 3]], attributes))
    assert [(k, a) for k, a, _ in matching] == [(0, 2), (1, 0)]
    assert score > 0.95


def test_pure_noise_gives_low_specialization():
    rng = np.random.default_rng(4)
    corr = expert_attribute_correlation(rng.normal(size=(500, 4)), rng.normal(size=(500, 3)))
    score, _ = specialization_score(corr)
    assert score < 0.15


# ----------------------------------------------------------------------------------------------------------------------
# Descriptions
# ----------------------------------------------------------------------------------------------------------------------


def test_log_odds_z_scores_sign_and_symmetry():
    prior = np.array([10.0, 10.0, 10.0])
    z = log_odds_z_scores([20.0, 5.0, 5.0], [5.0, 5.0, 20.0], prior)
    assert z[0] > 2 and z[2] < -2
    np.testing.assert_allclose(z[0], -z[2])
    np.testing.assert_allclose(log_odds_z_scores([3.0, 4.0], [3.0, 4.0], [1.0, 1.0]), [0.0, 0.0], atol=1e-12)


def test_descriptions_name_the_planted_markers(controlled):
    scores = _planted_scores(controlled)
    calls = []

    def describe_fn(description: ExpertDescription) -> str:
        calls.append(description.expert)
        return f"LLM: expert {description.expert} / {description.summary}"

    descriptions = describe_experts(scores, controlled, describe_fn=describe_fn, attribute_names=ATTRIBUTES)
    assert [d.expert for d in descriptions] == [0, 1, 2, 3] and calls == [0, 1, 2, 3]

    formal = descriptions[0]
    top = [word for word, _ in formal.top_words]
    assert {"furthermore", "moreover"} <= set(top)
    assert all(z > 0 for _, z in formal.top_words) and len(formal.top_words) <= 10
    assert formal.summary.startswith("LLM: expert 0 / prefers: ")
    assert "furthermore" in formal.summary or "moreover" in formal.summary
    assert "hey" in [word for word, _ in formal.bottom_words]
    assert formal.features["rho/formality"] > 0.5
    assert len(formal.examples) == 3
    best = formal.examples[0]
    assert _count(best["preferred"], ("furthermore", "moreover")) > _count(best["not_preferred"], ("furthermore",))
    assert abs(best["delta"]) == max(abs(scores.expert_deltas[:, 0]))

    longer = descriptions[1]
    assert longer.features["length_words"] > 10
    assert "longer" in longer.summary
    simple = descriptions[2]
    assert {"simple", "basically"} & {word for word, _ in simple.top_words}
    assert "latency" in [word for word, _ in simple.bottom_words] or "throughput" in [
        w for w, _ in simple.bottom_words
    ]
    dead = descriptions[3]
    assert dead.top_words == [] and dead.examples == [] and dead.features["num_pairs"] == 0

    corr = expert_attribute_correlation(scores.expert_deltas, attribute_deltas(controlled))
    _, matching = specialization_score(corr)
    assert sorted((k, a) for k, a, _ in matching) == [(0, 1), (1, 0), (2, 2)]
    assert dict(((k, a), np.sign(rho)) for k, a, rho in matching)[(2, 2)] == -1
    assert description_accuracy(descriptions, matching, ATTRIBUTE_MARKERS, ATTRIBUTES) == 1.0
    # A wrong matching (or a wrong direction) is not rewarded.
    wrong = [(0, 2, 0.9), (2, 1, 0.9), (1, 0, 0.9)]
    assert description_accuracy(descriptions, wrong, ATTRIBUTE_MARKERS, ATTRIBUTES) == pytest.approx(1 / 3)
    assert description_accuracy(descriptions, [(0, "formality", -0.7)], ATTRIBUTE_MARKERS, ATTRIBUTES) == 0.0
    # Without names, the `rho/<name>` features are numbered.
    assert "rho/attribute_1" in describe_experts(scores, controlled)[0].features


def test_description_accuracy_counts_the_length_feature_sign():
    description = ExpertDescription(expert=0, top_words=[("cat", 3.0)], features={"length_words": -12.0}, examples=[])
    assert description_accuracy([description], [(0, "length", -0.8)], ATTRIBUTE_MARKERS, ATTRIBUTES) == 1.0
    assert description_accuracy([description], [(0, "length", 0.8)], ATTRIBUTE_MARKERS, ATTRIBUTES) == 0.0
    with pytest.raises(ValueError, match="No description for expert 1"):
        description_accuracy([description], [(1, "length", 0.8)], ATTRIBUTE_MARKERS, ATTRIBUTES)


# ----------------------------------------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------------------------------------


def test_steer_is_the_static_mixture_margin():
    rng = np.random.default_rng(5)
    chosen, rejected = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    scores = PairScores.from_expert_rewards(chosen, rejected, np.full((10, 3), 1 / 3))
    weights = np.array([0.2, 0.0, 0.8])
    np.testing.assert_allclose(steer(scores, weights), chosen @ weights - rejected @ weights)
    np.testing.assert_allclose(steer(scores, np.full((10, 3), 1 / 3)), scores.reward_deltas)


def test_steering_toward_the_length_expert_shifts_preferences_along_length():
    rng = np.random.default_rng(6)
    num_pairs = 400
    chosen_attributes = rng.choice([-1.0, 1.0], size=(num_pairs, 3))
    rejected_attributes = rng.choice([-1.0, 1.0], size=(num_pairs, 3))
    noise = 0.01 * rng.normal(size=(2, num_pairs))
    # Expert 0 is exactly the length attribute; expert 1 prefers low technicality; the router only uses expert 1.
    chosen = np.stack([chosen_attributes[:, 0] + noise[0], -chosen_attributes[:, 2]], axis=1)
    rejected = np.stack([rejected_attributes[:, 0] + noise[1], -rejected_attributes[:, 2]], axis=1)
    scores = PairScores.from_expert_rewards(chosen, rejected, _one_hot(np.ones(num_pairs, dtype=int), 2))
    deltas = chosen_attributes - rejected_attributes
    shift = steering_shift(scores, deltas, expert=0, attribute_index=0)
    assert 0.35 < shift < 0.65  # from ~50% to 100% of the pairs preferring the longer response
    assert shift == pytest.approx(steering_shift(scores, deltas, expert=0, attribute_index=0, direction=1))
    assert steering_shift(scores, deltas, expert=0, attribute_index=0, direction=-1) < -0.35
    # Expert 1 stands for low technicality; oriented by its (negative) rho, steering to it changes nothing.
    assert steering_shift(scores, deltas, expert=1, attribute_index=2) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Scoring with a real (tiny) model
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_score_pairs_with_a_tiny_model(backbone):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(bert_style=backbone == "bert")
    model = tiny_moe(backbone, tokenizer, num_experts=4, top_k=2, router_temperature=2.0)
    model.train()
    rows = separable_dataset(num_pairs=7).to_list()
    rows[1]["prompt"] = rows[0]["prompt"]  # same prompt, different responses: routing must be equal
    rows[1]["chosen"], rows[1]["rejected"] = "good one two three four five", "bad"
    dataset = Dataset.from_list(rows)

    scores = score_pairs(model, tokenizer, dataset, batch_size=3)
    assert model.training  # restored
    assert len(scores) == 7 and scores.num_experts == 4
    for name in ("chosen_expert_rewards", "rejected_expert_rewards", "routing_weights", "router_probs"):
        assert getattr(scores, name).shape == (7, 4)
    np.testing.assert_allclose(scores.routing_weights.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(scores.router_probs.sum(axis=1), 1.0, atol=1e-6)
    assert ((scores.routing_weights > 0).sum(axis=1) == 2).all()
    # Both responses of a pair use the pair's single routing vector.
    np.testing.assert_allclose(
        scores.chosen_rewards, (scores.routing_weights * scores.chosen_expert_rewards).sum(1), atol=1e-5
    )
    np.testing.assert_allclose(
        scores.rejected_rewards, (scores.routing_weights * scores.rejected_expert_rewards).sum(1), atol=1e-5
    )
    np.testing.assert_allclose(scores.routing_weights[0], scores.routing_weights[1], atol=1e-6)

    # Batching, padding and sorting do not change the numbers: compare with an unpadded forward of pair 6.
    example = _tokenize_preference({k: rows[6][k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor([example["chosen_ids"]]), prompt_lengths=torch.tensor([example["prompt_length"]])
        )
    assert out.logits.item() == pytest.approx(scores.chosen_rewards[6], abs=1e-5)
    np.testing.assert_allclose(scores.router_probs[6], torch.softmax(out.router_logits / 2.0, -1)[0], atol=1e-5)

    # The routing matrix wrapper scores the model once and needs the category column up front.
    categorized = dataset.add_column("category", ["a", "b", "a", "b", "a", "b", "a"])
    matrix, names = routing_matrix_from_model(model, tokenizer, categorized, batch_size=4)
    assert names == ["a", "b"] and matrix.shape == (2, 4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="`category`"):
        routing_matrix_from_model(model, tokenizer, dataset)


def test_score_pairs_truncates_instead_of_dropping_rows():
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    dataset = separable_dataset(num_pairs=4)
    scores = score_pairs(model, tokenizer, dataset, batch_size=8, max_length=4)
    assert len(scores) == 4


# ----------------------------------------------------------------------------------------------------------------------
# Report and missing columns
# ----------------------------------------------------------------------------------------------------------------------


def test_analysis_report_on_planted_structure(controlled):
    # The router sends each category to its own expert among 4: experts 0-2 by attribute, expert 3 for nothing.
    attribute_expert = {"formality": 0, "length": 1, "technicality": 2}
    experts = [attribute_expert[attribute] for attribute in controlled["attribute"]]
    scores = _planted_scores(controlled, routing=_one_hot(experts, 4))
    report = analysis_report(scores, controlled, attribute_names=ATTRIBUTES, markers=ATTRIBUTE_MARKERS)
    json.dumps(report)  # serializable
    # Three equal experts, each holding two equal categories: NMI = 2 log 3 / (log 3 + log 6).
    assert report["nmi"] == pytest.approx(2 * np.log(3) / (np.log(3) + np.log(6)))
    assert routing_nmi(experts, controlled["attribute"]) == pytest.approx(1.0)
    assert report["purity"] == pytest.approx(0.5)  # each expert mixes two opposite categories evenly
    assert report["specialization"] > 0.7
    assert report["description_accuracy"] == 1.0
    assert report["num_conflict_pairs"] == sum(controlled["conflict"])
    conflict = np.array(controlled["conflict"])
    assert report["conflict_accuracy"] == pytest.approx(scores.select(conflict).accuracy)
    assert report["accuracy"] == pytest.approx(scores.accuracy)
    assert {entry["attribute"]: entry["expert"] for entry in report["steering"]} == attribute_expert
    assert report["routing_matrix"]["categories"] == sorted(CATEGORIES)
    assert set(report["descriptions"]) == {"0", "1", "2", "3"}
    only = analysis_report(scores, controlled, metrics=["accuracy", "specialization"], attribute_names=ATTRIBUTES)
    assert "nmi" not in only and "description_accuracy" not in only and "specialization" in only


def test_attribute_metrics_need_the_attribute_names(controlled):
    """The analysis does not know the controlled data: without names (and markers) it skips or refuses those metrics."""
    scores = _planted_scores(controlled)
    default = analysis_report(scores, controlled)
    assert "nmi" in default and "conflict_accuracy" in default
    assert not {"specialization", "steering", "description_accuracy", "descriptions"} & set(default)
    without_markers = analysis_report(scores, controlled, attribute_names=ATTRIBUTES)
    assert "specialization" in without_markers and "steering" in without_markers
    assert "description_accuracy" not in without_markers
    with pytest.raises(ValueError, match="need `attribute_names`"):
        analysis_report(scores, controlled, metrics=["steering"])
    with pytest.raises(ValueError, match="needs `markers`"):
        analysis_report(scores, controlled, metrics=["description_accuracy"], attribute_names=ATTRIBUTES)
    with pytest.raises(ValueError, match="3 entries but there are 2 attribute names"):
        analysis_report(scores, controlled, metrics=["specialization"], attribute_names=["a", "b"])


def test_missing_columns_are_named():
    dataset = separable_dataset(num_pairs=6)  # prompt/chosen/rejected only
    rng = np.random.default_rng(7)
    scores = PairScores.from_expert_rewards(rng.normal(size=(6, 3)), rng.normal(size=(6, 3)), np.full((6, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"routing_nmi needs a `category` column; the dataset has \['prompt'"):
        analysis_report(scores, dataset)
    with pytest.raises(ValueError, match="`chosen_attributes`"):
        analysis_report(scores, dataset, metrics=["specialization"], attribute_names=ATTRIBUTES)
    with pytest.raises(ValueError, match="`conflict`"):
        analysis_report(scores, dataset, metrics=["conflict_accuracy"])
    with pytest.raises(ValueError, match="`category`"):
        routing_matrix(scores, dataset)
    with pytest.raises(ValueError, match="`category`"):
        category_recovery(scores, dataset)
    with pytest.raises(ValueError, match="`rejected_attributes`"):
        attribute_deltas(dataset.add_column("chosen_attributes", [[1.0]] * 6))
    with pytest.raises(ValueError, match="`chosen`"):
        describe_experts(scores, dataset.remove_columns("chosen"))
    with pytest.raises(ValueError, match="`rejected`"):
        score_pairs(None, None, dataset.remove_columns("rejected"))
    with pytest.raises(ValueError, match="Unknown metrics"):
        analysis_report(scores, dataset, metrics=["nmi_typo"])
    assert analysis_report(scores, dataset, metrics=["accuracy"])["accuracy"] == pytest.approx(scores.accuracy)


# ----------------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------------


def _is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    rng = np.random.default_rng(8)
    log_history = [{"step": step, "loss": 1.0, "moe/routing_entropy": 1.0 / step} for step in range(1, 6)]
    log_history.append({"step": 5, "eval_moe/routing_entropy": 0.3})
    paths = [
        plot_routing_heatmap(rng.dirichlet(np.ones(4), size=6), list(CATEGORIES), tmp_path / "a" / "routing.png"),
        plot_expert_attribute_heatmap(rng.uniform(-1, 1, (4, 3)), list(ATTRIBUTES), tmp_path / "b" / "corr.png"),
        plot_routing_entropy(log_history, tmp_path / "c" / "entropy.png"),
        plot_weight_shift(rng.normal(size=4), [f"e{k}" for k in range(4)], tmp_path / "shift.png", title="user_0"),
        plot_weight_shift_heatmap(rng.normal(size=(3, 4)), ["u0", "u1", "u2"], None, str(tmp_path / "d" / "h.png")),
    ]
    for path in paths:
        assert _is_png(path)
        assert (tmp_path / path).stat().st_size > 1000
    with pytest.raises(ValueError, match="moe/routing_entropy"):
        plot_routing_entropy([{"step": 1, "loss": 0.5}], tmp_path / "none.png")
    with pytest.raises(ValueError, match="3 category names"):
        plot_routing_heatmap(np.ones((2, 2)), ["a", "b", "c"], tmp_path / "bad.png")
