"""The hidden-user preference generator of the personalization benchmark (`benchmarks/hidden_users.py`)."""

import random
import re

import pytest

from benchmarks.hidden_users import (
    HIDDEN_ATTRIBUTES,
    HIDDEN_TYPES,
    make_hidden_user_pairs,
    make_hidden_users,
    make_prompts,
    render_answer,
)
from trl_moe_rm.data.controlled import ATTRIBUTE_MARKERS, PROMPT_TEMPLATES, tokenize_words


def test_users_are_the_six_types_then_mixed_users():
    users = make_hidden_users(num_mixed=6, seed=0)
    assert [user.user_id for user in users[:6]] == list(HIDDEN_TYPES)
    for user in users[:6]:
        attribute, value = HIDDEN_TYPES[user.user_id]
        assert user.weights[HIDDEN_ATTRIBUTES.index(attribute)] == value
        assert sum(weight != 0 for weight in user.weights) == 1
    for user in users[6:]:
        nonzero = sorted(abs(weight) for weight in user.weights if weight != 0)
        assert len(nonzero) == 2 and sum(nonzero) == pytest.approx(1.0) and 0.2 <= nonzero[0] <= 0.4
    assert [user.user_id for user in make_hidden_users(6, seed=0)] == [user.user_id for user in users]
    with pytest.raises(ValueError, match="num_mixed"):
        make_hidden_users(num_mixed=25)


def test_answers_realise_their_attributes():
    rng = random.Random(0)
    listed = render_answer("gift", (1, 1, 1), rng)
    prose = render_answer("gift", (-1, -1, -1), rng)
    assert "\n1. " in listed and "\n" not in prose
    assert any(word in listed for word in ("I ", "My ", "me"))
    with pytest.raises(ValueError, match="family"):
        render_answer("weather", (1, 1, 1), rng)


def test_pairs_are_labelled_by_utility_split_by_prompt_and_hidden():
    users = make_hidden_users(num_mixed=2, seed=1)
    split = make_hidden_user_pairs(users, train_pairs=60, test_pairs=20, label_noise=0.0, seed=1)
    assert split == make_hidden_user_pairs(users, train_pairs=60, test_pairs=20, label_noise=0.0, seed=1)
    assert not set(split["train"]["prompt"]) & set(split["test"]["prompt"])
    by_id = {user.user_id: user for user in users}
    train = split["train"]
    assert len(train["prompt"]) == 60 * len(users)
    for user_id, chosen, rejected in zip(train["user_id"], train["chosen_attributes"], train["rejected_attributes"]):
        assert by_id[user_id].utility(tuple(chosen)) > by_id[user_id].utility(tuple(rejected))
    # Hidden context: the same answer pair is labelled both ways by opposite types.
    labelled = {(p, c, r) for p, c, r in zip(train["prompt"], train["chosen"], train["rejected"])}
    assert any((p, r, c) in labelled for p, c, r in labelled)
    noisy = make_hidden_user_pairs(users, train_pairs=60, test_pairs=20, label_noise=0.2, seed=1)["train"]
    flipped = sum(
        by_id[u].utility(tuple(c)) < by_id[u].utility(tuple(r))
        for u, c, r in zip(noisy["user_id"], noisy["chosen_attributes"], noisy["rejected_attributes"])
    )
    assert 0.1 < flipped / len(noisy["user_id"]) < 0.3


def test_nothing_overlaps_the_controlled_data():
    """Prompts and answers share no template and no planted marker word with the controlled dataset."""
    prompts = [prompt for prompt, _ in make_prompts()]
    assert len(set(prompts)) == len(prompts) == 192
    templates = [
        re.compile(re.escape(template).replace(re.escape("{topic}"), ".+"), re.IGNORECASE)
        for group in PROMPT_TEMPLATES.values()
        for template in group
    ]
    assert not any(template.fullmatch(prompt) for prompt in prompts for template in templates)
    markers = {word for values in ATTRIBUTE_MARKERS.values() for words in values.values() for word in words}
    split = make_hidden_user_pairs(make_hidden_users(), train_pairs=50, test_pairs=20)
    texts = prompts + split["train"]["chosen"] + split["train"]["rejected"]
    assert not markers & {word for text in texts for word in tokenize_words(text)}
