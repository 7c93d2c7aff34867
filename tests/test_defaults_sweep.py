"""The defaults study: the visible-types generator and the sweep's report (the sweep itself is a benchmark)."""

import re
from collections import Counter

import pytest

from benchmarks.defaults_sweep import RECIPES, markdown_report
from benchmarks.visible_types import (
    VISIBLE_ATTRIBUTES,
    VISIBLE_MARKERS,
    VISIBLE_PROMPTS,
    make_visible_types_dataset,
    visible_type_names,
)
from trl_moe_rm.data.controlled import ATTRIBUTE_MARKERS, tokenize_words


MARKERS = {word for values in VISIBLE_MARKERS.values() for words in values.values() for word in words}


@pytest.mark.parametrize("num_types", [4, 12])
def test_types_conflicts_and_planted_markers(num_types):
    data = make_visible_types_dataset(num_types=num_types, num_pairs_per_type=10, seed=0)
    assert Counter(data["category"]) == dict.fromkeys(visible_type_names(num_types), 10)
    assert sum(data["conflict"]) == num_types * 5
    for row in data:
        index = VISIBLE_ATTRIBUTES.index(row["attribute"])
        assert row["chosen_attributes"][index] == row["direction"] == -row["rejected_attributes"][index]
        for text, values in ((row["chosen"], row["chosen_attributes"]), (row["rejected"], row["rejected_attributes"])):
            words = set(tokenize_words(text))
            for attribute, value in zip(VISIBLE_ATTRIBUTES, values):
                assert words & set(VISIBLE_MARKERS[attribute][int(value)])
                assert not words & set(VISIBLE_MARKERS[attribute][-int(value)])
    # A conflict pair reappears under the opposite type with the labels swapped.
    conflicts = {(row["chosen"], row["rejected"]): row["category"] for row in data if row["conflict"]}
    for (chosen, rejected), category in conflicts.items():
        opposite = category[:-1] + ("-" if category.endswith("+") else "+")
        assert conflicts[(rejected, chosen)] == opposite


def test_prompts_reveal_the_type_and_carry_no_marker_word():
    controlled_markers = {word for values in ATTRIBUTE_MARKERS.values() for words in values.values() for word in words}
    for templates in VISIBLE_PROMPTS.values():
        for template in templates:
            assert not set(tokenize_words(template)) & (MARKERS | controlled_markers), template
    assert len({template for templates in VISIBLE_PROMPTS.values() for template in templates}) == 36


def test_bad_arguments_are_refused():
    for num_types in (3, 0, 14):
        with pytest.raises(ValueError, match="even integer from 2 to 12"):
            make_visible_types_dataset(num_types=num_types)
    with pytest.raises(ValueError, match="num_pairs_per_type"):
        make_visible_types_dataset(num_pairs_per_type=0)


def test_the_report_ranks_recipes_by_their_worst_gap():
    recipes = list(RECIPES)[:2]

    def run(accuracy):
        return {"accuracy": accuracy, "conflict_accuracy": None, "nmi": 0.5, "purity": 0.5, "experts_used": 4}

    results = {
        "runs": {
            "types4": {recipes[0]: {"0": run(0.9), "1": run(0.8)}, recipes[1]: {"0": run(0.8)}},
            "autoj": {recipes[0]: {"0": run(0.6)}, recipes[1]: {"0": run(0.7)}},
        }
    }
    report = markdown_report(results)
    assert "| 0.850 (0.80–0.90) |" in report
    gaps = dict(re.findall(r"\| ([^|]+) \| [^|]+ \| [^|]+ \| ([0-9.]+) \|\n", report))
    assert gaps == {recipes[0]: "0.100", recipes[1]: "0.050"}
