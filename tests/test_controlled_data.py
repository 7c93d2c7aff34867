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
"""Tests of the controlled synthetic preference dataset and of the simulated users."""

import itertools
import math
import random
from collections import Counter, defaultdict

import numpy as np
import pytest

from trl_moe_rm.data.controlled import (
    ATTRIBUTE_MARKERS,
    ATTRIBUTES,
    CATEGORIES,
    CATEGORY_DIRECTIONS,
    CATEGORY_TOPICS,
    PROMPT_TEMPLATES,
    SimulatedUser,
    count_sentences,
    get_prompt_id,
    make_controlled_dataset,
    make_user_pairs,
    make_users,
    make_users_dataset,
    opposite_category,
    render_prompt,
    render_response,
    tokenize_words,
    train_test_split_by_prompt,
)


EXPECTED_COLUMNS = {
    "prompt",
    "chosen",
    "rejected",
    "category",
    "category_id",
    "attribute",
    "direction",
    "chosen_attributes",
    "rejected_attributes",
    "conflict",
    "prompt_id",
}
PROMPT_CATEGORY = {
    render_prompt(category, topic, index): category
    for category in CATEGORIES
    for index in range(len(PROMPT_TEMPLATES[category]))
    for topic in CATEGORY_TOPICS[category]
}
ALL_MARKERS = {
    word for by_direction in ATTRIBUTE_MARKERS.values() for words in by_direction.values() for word in words
}


@pytest.fixture(scope="module")
def dataset():
    return make_controlled_dataset(num_pairs_per_category=200, conflict_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def rows(dataset):
    return dataset.to_list()


def _diffs_and_labels(rows):
    """Attribute difference (chosen - rejected) per row; every row's label is 'chosen wins'."""
    return np.array([np.subtract(row["chosen_attributes"], row["rejected_attributes"]) for row in rows])


def _assert_markers_match(text, attributes):
    words = set(tokenize_words(text))
    for attribute, value in zip(ATTRIBUTES, attributes):
        value = int(value)
        assert words & set(ATTRIBUTE_MARKERS[attribute][value]), (attribute, value, text)
        assert not words & set(ATTRIBUTE_MARKERS[attribute][-value]), (attribute, value, text)
    num_sentences = count_sentences(text)
    if int(attributes[0]) == -1:
        assert num_sentences == 1, text
    else:
        assert 4 <= num_sentences <= 6, text


# ----------------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------------


def test_category_constants_are_consistent():
    assert ATTRIBUTES == ("length", "formality", "technicality")
    assert CATEGORIES == ("concise", "detailed", "formal", "casual", "technical", "plain")
    assert set(CATEGORY_DIRECTIONS) == set(CATEGORIES)
    # Each (attribute, direction) is covered exactly once.
    assert sorted(CATEGORY_DIRECTIONS.values()) == sorted(itertools.product(ATTRIBUTES, (-1, 1)))
    assert CATEGORY_DIRECTIONS["concise"] == ("length", -1)
    assert CATEGORY_DIRECTIONS["formal"] == ("formality", 1)
    assert CATEGORY_DIRECTIONS["plain"] == ("technicality", -1)
    for category in CATEGORIES:
        opposite = opposite_category(category)
        assert opposite != category and opposite_category(opposite) == category
        assert CATEGORY_DIRECTIONS[opposite][0] == CATEGORY_DIRECTIONS[category][0]


def test_markers_are_single_lower_case_words_and_disjoint():
    assert set(ATTRIBUTE_MARKERS) == set(ATTRIBUTES)
    seen = []
    for attribute in ATTRIBUTES:
        assert set(ATTRIBUTE_MARKERS[attribute]) == {-1, 1}
        for words in ATTRIBUTE_MARKERS[attribute].values():
            assert len(words) >= 3
            for word in words:
                assert word == word.lower() and tokenize_words(word) == [word]
            seen.extend(words)
    assert len(seen) == len(set(seen)), "a marker word is used for two attribute values"


def test_prompt_pools_are_large_and_free_of_markers():
    for category in CATEGORIES:
        assert len(CATEGORY_TOPICS[category]) >= 40
        assert len(set(CATEGORY_TOPICS[category])) == len(CATEGORY_TOPICS[category])
        assert len(PROMPT_TEMPLATES[category]) >= 5
        assert len(CATEGORY_TOPICS[category]) * len(PROMPT_TEMPLATES[category]) >= 250
        for text in CATEGORY_TOPICS[category] + PROMPT_TEMPLATES[category]:
            assert not set(tokenize_words(text)) & ALL_MARKERS, text
    # Templates are category specific, topics only partially overlap.
    for first, second in itertools.combinations(CATEGORIES, 2):
        assert not set(PROMPT_TEMPLATES[first]) & set(PROMPT_TEMPLATES[second])
        assert set(CATEGORY_TOPICS[first]) != set(CATEGORY_TOPICS[second])
        # Opposite categories share topics, which the conflict twins use.
        if opposite_category(first) == second:
            assert len(set(CATEGORY_TOPICS[first]) & set(CATEGORY_TOPICS[second])) >= 20


def test_prompt_ids_are_unique_and_stable():
    ids = {}
    for category in CATEGORIES:
        for index in range(len(PROMPT_TEMPLATES[category])):
            for topic in CATEGORY_TOPICS[category]:
                prompt = render_prompt(category, topic, index)
                assert prompt not in ids, f"prompt {prompt!r} can be produced twice"
                ids[prompt] = get_prompt_id(prompt)
    assert sorted(ids.values()) == list(range(len(ids)))
    with pytest.raises(ValueError, match="Unknown prompt"):
        get_prompt_id("not a generated prompt")


@pytest.mark.parametrize("attributes", list(itertools.product((-1, 1), repeat=3)))
def test_render_response_realises_every_attribute_combination(attributes):
    rng = random.Random(sum(attributes))
    texts = [render_response("a heat pump", attributes, rng) for _ in range(40)]
    for text in texts:
        _assert_markers_match(text, attributes)
        assert "heat pump" in text.lower()
        assert len(text.split()) <= 90
    assert len(set(texts)) >= 10, "responses should vary"


def test_render_response_rejects_bad_attributes():
    with pytest.raises(ValueError, match="3 values"):
        render_response("a heat pump", [1, 1], random.Random(0))
    with pytest.raises(ValueError, match="-1 or \\+1"):
        render_response("a heat pump", [1, 0, 1], random.Random(0))


# ----------------------------------------------------------------------------------------------------------------------
# Controlled dataset
# ----------------------------------------------------------------------------------------------------------------------


def test_default_build_has_200_pairs_per_category():
    dataset = make_controlled_dataset()
    assert len(dataset) == 6 * 200
    assert len(set(dataset["category"])) == 6


def test_determinism():
    first = make_controlled_dataset(num_pairs_per_category=30, seed=7).to_list()
    second = make_controlled_dataset(num_pairs_per_category=30, seed=7).to_list()
    other = make_controlled_dataset(num_pairs_per_category=30, seed=8).to_list()
    assert first == second
    assert first != other
    # Not just a different order: the generated texts differ too.
    assert {row["chosen"] for row in first} != {row["chosen"] for row in other}
    # Global random state does not leak in.
    random.seed(123)
    np.random.seed(123)
    assert make_controlled_dataset(num_pairs_per_category=30, seed=7).to_list() == first


def test_schema(dataset, rows):
    assert set(dataset.column_names) == EXPECTED_COLUMNS
    row = rows[0]
    for name in ("prompt", "chosen", "rejected", "category", "attribute"):
        assert isinstance(row[name], str)
    for name in ("category_id", "direction", "prompt_id"):
        assert isinstance(row[name], int)
    assert isinstance(row["conflict"], bool)
    for row in rows:
        assert row["category_id"] == CATEGORIES.index(row["category"])
        assert (row["attribute"], row["direction"]) == CATEGORY_DIRECTIONS[row["category"]]
        for name in ("chosen_attributes", "rejected_attributes"):
            assert len(row[name]) == len(ATTRIBUTES)
            assert all(isinstance(value, float) and value in (-1.0, 1.0) for value in row[name])
        assert row["prompt_id"] == get_prompt_id(row["prompt"])


def test_counts_per_category(dataset):
    counts = Counter(dataset["category"])
    assert counts == {category: 200 for category in CATEGORIES}
    conflicts = Counter(row["category"] for row in dataset if row["conflict"])
    assert conflicts == {category: 100 for category in CATEGORIES}


@pytest.mark.parametrize("num_pairs, fraction", [(1, 0.5), (7, 0.0), (7, 1.0), (11, 0.3)])
def test_counts_for_other_settings(num_pairs, fraction):
    dataset = make_controlled_dataset(num_pairs_per_category=num_pairs, conflict_fraction=fraction, seed=1)
    assert Counter(dataset["category"]) == {category: num_pairs for category in CATEGORIES}
    expected_conflicts = round(fraction * num_pairs)
    conflicts = Counter(row["category"] for row in dataset if row["conflict"])
    for category in CATEGORIES:
        assert conflicts.get(category, 0) == expected_conflicts


def test_category_subsets():
    dataset = make_controlled_dataset(num_pairs_per_category=20, categories=["plain", "concise", "detailed"], seed=0)
    assert Counter(dataset["category"]) == {"concise": 20, "detailed": 20, "plain": 20}
    # "plain" has no opposite in the selection, so it has no conflict rows; concise/detailed do.
    conflicts = Counter(row["category"] for row in dataset if row["conflict"])
    assert conflicts == {"concise": 10, "detailed": 10}
    assert {row["category_id"] for row in dataset} == {0, 1, 5}


def test_chosen_better_on_category_attribute(rows):
    for row in rows:
        index = ATTRIBUTES.index(row["attribute"])
        assert row["chosen_attributes"][index] == row["direction"]
        assert row["rejected_attributes"][index] == -row["direction"]


def test_distractor_attributes_are_random(rows):
    # The non-category attributes are drawn independently: roughly balanced and often equal/different.
    for attribute_index, attribute in enumerate(ATTRIBUTES):
        distractor_rows = [row for row in rows if row["attribute"] != attribute]
        chosen_mean = np.mean([row["chosen_attributes"][attribute_index] for row in distractor_rows])
        equal = np.mean(
            [
                row["chosen_attributes"][attribute_index] == row["rejected_attributes"][attribute_index]
                for row in distractor_rows
            ]
        )
        assert abs(chosen_mean) < 0.15
        assert 0.35 < equal < 0.65


def test_texts_match_attributes(rows):
    for row in rows:
        _assert_markers_match(row["chosen"], row["chosen_attributes"])
        _assert_markers_match(row["rejected"], row["rejected_attributes"])
        assert not set(tokenize_words(row["prompt"])) & ALL_MARKERS


def test_responses_mention_topic_and_fit_length_budget(rows):
    topics = {topic for topics in CATEGORY_TOPICS.values() for topic in topics}
    for row in rows:
        # The longest topic contained in the prompt (some topics contain shorter ones).
        prompt_topic = max((topic for topic in topics if topic in row["prompt"]), key=len)
        assert prompt_topic.lower() in row["chosen"].lower()
        assert prompt_topic.lower() in row["rejected"].lower()
        assert len(row["chosen"].split()) <= 90 and len(row["rejected"].split()) <= 90
    long_responses = [row["chosen"] for row in rows if row["chosen_attributes"][0] == 1]
    assert len(set(long_responses)) > 0.95 * len(long_responses)
    assert len({row["prompt"] for row in rows if row["category"] == "formal"}) > 100


def test_conflict_twins_are_swapped_pairs_under_opposite_categories(rows):
    conflict_rows = [row for row in rows if row["conflict"]]
    keys = Counter(
        (row["category"], row["chosen"], row["rejected"], tuple(row["chosen_attributes"])) for row in conflict_rows
    )
    twin_keys = Counter(
        (opposite_category(row["category"]), row["rejected"], row["chosen"], tuple(row["rejected_attributes"]))
        for row in conflict_rows
    )
    assert keys == twin_keys
    # The two twins have different prompts: the prompt sets of a response pair under the two categories are disjoint.
    prompts_by_pair = defaultdict(lambda: defaultdict(set))
    for row in conflict_rows:
        pair = frozenset((row["chosen"], row["rejected"]))
        prompts_by_pair[pair][row["category"]].add(row["prompt"])
    for by_category in prompts_by_pair.values():
        assert len(by_category) == 2
        first, second = by_category.values()
        assert not first & second
    # Non-conflict rows are not duplicated with swapped labels.
    conflict_free = [row for row in rows if not row["conflict"]]
    swapped = {(row["rejected"], row["chosen"]) for row in conflict_free}
    long_pairs = [
        row for row in conflict_free if row["chosen_attributes"][0] == 1 or row["rejected_attributes"][0] == 1
    ]
    assert not any((row["chosen"], row["rejected"]) in swapped for row in long_pairs)


def test_no_single_reward_fits_conflict_rows(rows):
    conflict_rows = [row for row in rows if row["conflict"]]
    diffs = _diffs_and_labels(rows)
    conflict_diffs = _diffs_and_labels(conflict_rows)

    # Logistic regression on the pooled attribute differences (the best any response-only linear reward can do).
    weights = np.zeros(len(ATTRIBUTES))
    for _ in range(500):
        probabilities = 1.0 / (1.0 + np.exp(-diffs @ weights))
        weights += 0.5 * diffs.T @ (1.0 - probabilities) / len(diffs)
    assert np.mean(conflict_diffs @ weights > 0) <= 0.5 + 1e-9
    assert np.mean(diffs @ weights > 0) < 0.8

    # No linear scorer at all beats chance on the conflict rows.
    for candidate in np.random.default_rng(0).normal(size=(200, len(ATTRIBUTES))):
        assert np.mean(conflict_diffs @ candidate > 0) <= 0.5 + 1e-9

    # A category-aware oracle gets everything right.
    oracle = [
        row["direction"] * (row["chosen_attributes"][index] - row["rejected_attributes"][index]) > 0
        for row in rows
        for index in [ATTRIBUTES.index(row["attribute"])]
    ]
    assert np.mean(oracle) == 1.0


def test_prompt_reveals_category(dataset):
    rows = dataset.to_list()
    # The prompt -> category map is a function.
    categories_by_prompt = defaultdict(set)
    for row in rows:
        categories_by_prompt[row["prompt_id"]].add(row["category"])
    assert all(len(categories) == 1 for categories in categories_by_prompt.values())

    # A multinomial naive Bayes on prompt words, trained on some prompts, recovers the category of unseen prompts.
    split = train_test_split_by_prompt(dataset, test_size=0.3, seed=0)
    word_counts = {category: Counter() for category in CATEGORIES}
    for row in split["train"]:
        word_counts[row["category"]].update(tokenize_words(row["prompt"]))
    vocabulary = set().union(*word_counts.values())

    def predict(prompt):
        def log_likelihood(category):
            total = sum(word_counts[category].values()) + len(vocabulary)
            return sum(math.log((word_counts[category][word] + 1) / total) for word in tokenize_words(prompt))

        return max(CATEGORIES, key=log_likelihood)

    test_rows = split["test"].to_list()
    accuracy = np.mean([predict(row["prompt"]) == row["category"] for row in test_rows])
    assert accuracy > 0.95


def test_split_by_prompt(dataset):
    split = train_test_split_by_prompt(dataset, test_size=0.2, seed=0)
    assert set(split) == {"train", "test"}
    train_prompts, test_prompts = set(split["train"]["prompt"]), set(split["test"]["prompt"])
    assert not train_prompts & test_prompts
    assert len(split["train"]) + len(split["test"]) == len(dataset)
    num_prompts = len(train_prompts | test_prompts)
    assert len(test_prompts) == round(0.2 * num_prompts)
    again = train_test_split_by_prompt(dataset, test_size=0.2, seed=0)
    assert again["test"].to_list() == split["test"].to_list()
    other = train_test_split_by_prompt(dataset, test_size=0.2, seed=1)
    assert set(other["test"]["prompt"]) != test_prompts


def test_split_keeps_at_least_one_prompt_per_side():
    tiny = make_controlled_dataset(num_pairs_per_category=1, conflict_fraction=0.0, categories=["concise", "plain"])
    split = train_test_split_by_prompt(tiny, test_size=0.01)
    assert len(split["train"]) == 1 and len(split["test"]) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Simulated users
# ----------------------------------------------------------------------------------------------------------------------


def test_make_users():
    users = make_users(num_users=8, alpha=0.3, seed=0)
    assert [user.user_id for user in users] == [f"user_{index}" for index in range(8)]
    for user in users:
        assert set(user.direction_weights) == set(CATEGORIES)
        assert math.isclose(sum(user.direction_weights.values()), 1.0, abs_tol=1e-9)
        assert all(weight >= 0 for weight in user.direction_weights.values())
    assert [user.direction_weights for user in make_users(8, 0.3, seed=0)] == [u.direction_weights for u in users]
    assert [user.direction_weights for user in make_users(8, 0.3, seed=1)] != [u.direction_weights for u in users]
    # Small concentration gives peaked users, large concentration nearly uniform ones.
    peaked = np.mean([max(user.direction_weights.values()) for user in make_users(50, alpha=0.1, seed=0)])
    flat = np.mean([max(user.direction_weights.values()) for user in make_users(50, alpha=100.0, seed=0)])
    assert peaked > 0.6 and flat < 0.25


def test_user_utility_and_preference():
    user = SimulatedUser("u", {"concise": 0.25, "formal": 0.75})
    assert user.direction_weights["technical"] == 0.0
    assert math.isclose(user.utility([1, 1, 1]), -0.25 + 0.75)
    assert math.isclose(user.utility([-1, 1, -1]), 0.25 + 0.75)
    assert user.prefers([-1, 1, 1], [1, 1, 1])
    assert not user.prefers([1, 1, 1], [1, 1, 1])
    assert user.dominant_category == "formal"
    np.testing.assert_allclose(user.attribute_weights, [-0.25, 0.75, 0.0])


def test_user_pairs_follow_utility():
    users = make_users(num_users=3, alpha=0.5, seed=2)
    for user in users:
        pairs = make_user_pairs(user, num_pairs=40, seed=0)
        assert set(pairs.column_names) == EXPECTED_COLUMNS | {"user_id"}
        assert len(pairs) == 40
        for row in pairs:
            assert row["user_id"] == user.user_id
            assert user.utility(row["chosen_attributes"]) > user.utility(row["rejected_attributes"])
            assert row["category"] == user.dominant_category
            assert row["category_id"] == CATEGORIES.index(user.dominant_category)
            assert row["conflict"] is False
            assert row["prompt_id"] == get_prompt_id(row["prompt"])
            _assert_markers_match(row["chosen"], row["chosen_attributes"])
            _assert_markers_match(row["rejected"], row["rejected_attributes"])
        # Prompts come from the pools of several categories, not only the dominant one.
        assert len({PROMPT_CATEGORY[row["prompt"]] for row in pairs}) >= 3
        assert make_user_pairs(user, num_pairs=40, seed=0).to_list() == pairs.to_list()


def test_users_with_opposite_preferences_label_oppositely():
    verbose = SimulatedUser("verbose", {"detailed": 1.0})
    terse = SimulatedUser("terse", {"concise": 1.0})
    verbose_rows = make_user_pairs(verbose, num_pairs=30, seed=0).to_list()
    terse_rows = make_user_pairs(terse, num_pairs=30, seed=0).to_list()
    assert all(row["chosen_attributes"][0] == 1 and row["rejected_attributes"][0] == -1 for row in verbose_rows)
    assert all(row["chosen_attributes"][0] == -1 and row["rejected_attributes"][0] == 1 for row in terse_rows)


def test_make_users_dataset():
    users = make_users(num_users=4, seed=0)
    dataset = make_users_dataset(users, pairs_per_user=10, seed=3)
    assert len(dataset) == 40
    assert Counter(dataset["user_id"]) == {user.user_id: 10 for user in users}
    assert make_users_dataset(users, pairs_per_user=10, seed=3).to_list() == dataset.to_list()
    assert make_users_dataset(users, pairs_per_user=10, seed=4).to_list() != dataset.to_list()


# ----------------------------------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"categories": ["concise", "verbose"]}, "Unknown category 'verbose'"),
        ({"categories": "concise"}, "not a single string"),
        ({"categories": []}, "at least one category"),
        ({"categories": ["plain", "plain"]}, "duplicates"),
        ({"conflict_fraction": -0.1}, "conflict_fraction"),
        ({"conflict_fraction": 1.5}, "conflict_fraction"),
        ({"num_pairs_per_category": 0}, "at least 1"),
        ({"num_pairs_per_category": 2.5}, "must be an int"),
    ],
)
def test_make_controlled_dataset_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_controlled_dataset(**kwargs)


@pytest.mark.parametrize("test_size", [0.0, 1.0, -0.2, 1.5])
def test_split_rejects_bad_test_size(dataset, test_size):
    with pytest.raises(ValueError, match="test_size"):
        train_test_split_by_prompt(dataset, test_size=test_size)


def test_split_rejects_datasets_it_cannot_split(dataset):
    with pytest.raises(ValueError, match="'prompt' column"):
        train_test_split_by_prompt(dataset.remove_columns("prompt"))
    with pytest.raises(ValueError, match="at least 2"):
        train_test_split_by_prompt(dataset.select([0]))


def test_user_argument_validation():
    with pytest.raises(ValueError, match="Unknown category"):
        SimulatedUser("u", {"verbose": 1.0})
    with pytest.raises(ValueError, match="sum to 1"):
        SimulatedUser("u", {"concise": 0.5, "formal": 0.2})
    with pytest.raises(ValueError, match="non-negative"):
        SimulatedUser("u", {"concise": 1.5, "formal": -0.5})
    with pytest.raises(ValueError, match="num_users"):
        make_users(num_users=0)
    with pytest.raises(ValueError, match="alpha"):
        make_users(alpha=0.0)
    with pytest.raises(ValueError, match="num_pairs"):
        make_user_pairs(SimulatedUser("u", {"concise": 1.0}), num_pairs=0)
    indifferent = SimulatedUser("u", {category: 1 / 6 for category in CATEGORIES})
    with pytest.raises(ValueError, match="indifferent"):
        make_user_pairs(indifferent, num_pairs=5)
    with pytest.raises(ValueError, match="at least one"):
        make_users_dataset([], pairs_per_user=3)
    with pytest.raises(ValueError, match="unique"):
        make_users_dataset([SimulatedUser("u", {"concise": 1.0})] * 2, pairs_per_user=3)
