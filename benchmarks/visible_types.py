"""
A second visible-context preference generator, whose number of latent preference types is a parameter.

The demo's controlled data ([`trl_moe_rm.data.controlled`]) has exactly six types (three attributes, two directions),
so it cannot say how a setting behaves when the number of experts `K` exceeds or falls short of the number of types.
This generator has six response attributes of its own (`format`, `evidence`, `tone`, `certainty`, `caution`, `cost`),
its own topics, prompt templates and marker words (none shared with the controlled data), and any even number of
types from 2 to 12: `num_types=2 * m` uses the first `m` attributes, each preferred in both directions. As in the
controlled data:

- each type owns its prompt templates, so the prompt reveals the type (visible context);
- the chosen response has the type's preferred value of its attribute and the rejected one the opposite value; the
  other attributes are drawn at random, independently for the two responses (distractors);
- `conflict_fraction` of each type's pairs reappear under the opposite type with the labels swapped (`conflict=True`),
  so that no reward that ignores the prompt can fit them.

Every response carries one planted marker word of its value for every attribute and none of the opposite value
([`VISIBLE_MARKERS`]); prompts contain no marker word.

```bash
python -m benchmarks.visible_types --num_types 4 --output /tmp/visible4.jsonl   # for `trl-moe-rm diagnose`
```
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

from datasets import Dataset


__all__ = [
    "VISIBLE_ATTRIBUTES",
    "VISIBLE_MARKERS",
    "VISIBLE_PROMPTS",
    "VISIBLE_TOPICS",
    "make_visible_types_dataset",
    "render_visible_response",
    "visible_type_names",
]

VISIBLE_ATTRIBUTES: tuple[str, ...] = ("format", "evidence", "tone", "certainty", "caution", "cost")
"""The six response attributes, in the order of the `chosen_attributes` / `rejected_attributes` vectors."""

VISIBLE_TOPICS: tuple[str, ...] = (
    "learning to swim", "growing tomatoes", "training for a marathon", "baking a birthday cake", "learning the guitar",
    "repainting a bedroom", "adopting a rescue dog", "planning a camping trip", "studying for an exam",
    "starting a podcast", "brewing coffee at home", "fixing a flat tyre", "learning a new language",
    "organising a garage", "writing a cover letter", "hosting a dinner party", "building a bookshelf",
    "keeping houseplants alive", "starting to run", "meal prepping for a week", "learning to juggle",
    "setting up a home office", "planting a hedge", "taking night photographs", "moving to a new city",
    "training a puppy", "decluttering a wardrobe", "sewing a cushion cover", "making fresh pasta",
    "choosing a first bicycle", "learning to skate", "planning a road trip", "renovating a kitchen",
    "starting a vegetable patch", "learning chess", "making candles", "writing a short story", "learning to knit",
    "preparing for a job interview", "cleaning a barbecue",
)  # fmt: skip
"""Topics of the prompts and responses (everyday tasks; none is a topic of the controlled data)."""

VISIBLE_MARKERS: dict[str, dict[int, tuple[str, ...]]] = {
    "format": {1: ("checklist", "step"), -1: ("story", "once")},
    "evidence": {1: ("research", "studies"), -1: ("personally", "anecdotally")},
    "tone": {1: ("amazing", "thrilling"), -1: ("adequate", "acceptable")},
    "certainty": {1: ("definitely", "guaranteed"), -1: ("perhaps", "possibly")},
    "caution": {1: ("careful", "hazards"), -1: ("fearlessly", "recklessly")},
    "cost": {1: ("budget", "cheaply"), -1: ("luxury", "premium")},
}
"""Marker words planted in the responses, per attribute and value (each sentence below carries one of them)."""

_SENTENCES: dict[str, dict[int, tuple[str, ...]]] = {
    "format": {
        1: ("here is a checklist for {topic}", "step one of {topic} is to gather what you need, then step two"),
        -1: (
            "let me tell you a story about {topic}",
            "once, a neighbour of mine tried {topic} on a whim",
        ),
    },
    "evidence": {
        1: ("research on {topic} points the same way", "studies of people {topic} agree on this"),
        -1: ("personally, {topic} taught me a lot", "anecdotally, {topic} goes better than you expect"),
    },
    "tone": {
        1: ("{topic} is an amazing project", "the first results of {topic} are thrilling"),
        -1: ("{topic} is an adequate way to spend a weekend", "the results of {topic} are acceptable"),
    },
    "certainty": {
        1: ("this will definitely work for {topic}", "success with {topic} is guaranteed if you follow it"),
        -1: ("this could perhaps work for {topic}", "it is possibly the right approach to {topic}"),
    },
    "caution": {
        1: ("be careful with {topic} and go slowly", "watch for the hazards of {topic}"),
        -1: ("go at {topic} fearlessly", "jump into {topic} recklessly and learn as you go"),
    },
    "cost": {
        1: ("you can do {topic} on a budget", "{topic} can be done cheaply with second-hand gear"),
        -1: ("treat yourself to luxury gear for {topic}", "premium equipment makes {topic} nicer"),
    },
}

VISIBLE_PROMPTS: dict[tuple[str, int], tuple[str, ...]] = {
    ("format", 1): (
        "Give me the procedure for {topic}, in order.",
        "What do I do first, second and third when {topic}?",
        "Lay out {topic} as a numbered plan.",
    ),
    ("format", -1): (
        "Tell me about {topic} as a tale.",
        "Narrate how someone went about {topic}.",
        "Spin me a yarn about {topic}.",
    ),
    ("evidence", 1): (
        "What do experts and data say about {topic}?",
        "Give me the scientific view on {topic}.",
        "Which findings should guide {topic}?",
    ),
    ("evidence", -1): (
        "What is your own take on {topic}?",
        "Share how {topic} went for you.",
        "From your own life, what about {topic}?",
    ),
    ("tone", 1): (
        "Get me fired up about {topic}!",
        "Hype me up for {topic}!",
        "Make {topic} sound exciting!",
    ),
    ("tone", -1): (
        "Give me a sober, flat assessment of {topic}.",
        "Describe {topic} without any enthusiasm.",
        "Keep it dry: how is {topic}?",
    ),
    ("certainty", 1): (
        "I need a firm answer on {topic}, no waffling.",
        "Tell me with conviction how {topic} will turn out.",
        "Commit to one clear answer about {topic}.",
    ),
    ("certainty", -1): (
        "How uncertain is {topic}? Hedge where needed.",
        "Be tentative: what might happen with {topic}?",
        "Don't overcommit; what about {topic}?",
    ),
    ("caution", 1): (
        "What could go wrong with {topic}?",
        "I'm nervous about {topic}; what should I look out for?",
        "Safety first: how do I approach {topic}?",
    ),
    ("caution", -1): (
        "I want to dive straight into {topic}, no worrying.",
        "Forget the worries, how do I just start {topic}?",
        "Encourage me to be bold about {topic}.",
    ),
    ("cost", 1): (
        "I'm broke; how do I manage {topic}?",
        "What's the thrifty way of {topic}?",
        "How do I keep {topic} inexpensive?",
    ),
    ("cost", -1): (
        "Money is no object: how should I go about {topic}?",
        "What's the top-end way of {topic}?",
        "Spare no expense: how do I do {topic}?",
    ),
}
"""Prompt templates of each type `(attribute, direction)`; no template is shared between types."""


def visible_type_names(num_types: int) -> list[str]:
    r"""
    The type names of a dataset with `num_types` types: `"<attribute>+"` and `"<attribute>-"` for the first
    `num_types // 2` attributes of [`VISIBLE_ATTRIBUTES`].

    Args:
        num_types (`int`):
            An even number from 2 to 12.

    Returns:
        `list[str]`: e.g. `["format+", "format-", "evidence+", "evidence-"]` for 4.
    """
    if isinstance(num_types, bool) or not isinstance(num_types, int) or num_types % 2 or not 2 <= num_types <= 12:
        raise ValueError(f"`num_types` must be an even integer from 2 to 12, got {num_types!r}.")
    return [f"{attribute}{sign}" for attribute in VISIBLE_ATTRIBUTES[: num_types // 2] for sign in "+-"]


def render_visible_response(topic: str, attributes: Sequence[int], rng: random.Random) -> str:
    r"""
    A response about `topic` with one sentence per attribute, realising `attributes` with planted markers.

    Args:
        topic (`str`):
            The topic, mentioned in every sentence.
        attributes (`Sequence[int]`):
            One value in `{-1, +1}` per attribute of [`VISIBLE_ATTRIBUTES`].
        rng (`random.Random`):
            Picks the sentences and their order.

    Returns:
        `str`: Six sentences in random order.
    """
    if len(attributes) != len(VISIBLE_ATTRIBUTES) or any(value not in (-1, 1) for value in attributes):
        raise ValueError(f"`attributes` must be {len(VISIBLE_ATTRIBUTES)} values in {{-1, 1}}, got {attributes!r}.")
    sentences = [
        rng.choice(_SENTENCES[attribute][value]).format(topic=topic)
        for attribute, value in zip(VISIBLE_ATTRIBUTES, attributes)
    ]
    rng.shuffle(sentences)
    return " ".join(sentence[0].upper() + sentence[1:] + "." for sentence in sentences)


def _pair(attribute: str, direction: int, topic: str, rng: random.Random) -> tuple[str, str, list, list]:
    chosen = [rng.choice((-1, 1)) for _ in VISIBLE_ATTRIBUTES]
    rejected = [rng.choice((-1, 1)) for _ in VISIBLE_ATTRIBUTES]
    index = VISIBLE_ATTRIBUTES.index(attribute)
    chosen[index], rejected[index] = direction, -direction
    return render_visible_response(topic, chosen, rng), render_visible_response(topic, rejected, rng), chosen, rejected


def make_visible_types_dataset(
    num_types: int = 4, num_pairs_per_type: int = 300, conflict_fraction: float = 0.5, seed: int = 0
) -> Dataset:
    r"""
    Visible-context preference pairs with `num_types` latent types (see the module docstring).

    Args:
        num_types (`int`, *optional*, defaults to `4`):
            Number of types, even, from 2 to 12.
        num_pairs_per_type (`int`, *optional*, defaults to `300`):
            Pairs of each type, conflict twins included.
        conflict_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction of each type's pairs that reappear under the opposite type with the labels swapped.
        seed (`int`, *optional*, defaults to `0`):
            Seed; the same seed gives the same dataset.

    Returns:
        [`~datasets.Dataset`]: Shuffled rows with `prompt`, `chosen`, `rejected`, `category` (the type name),
        `attribute`, `direction`, `chosen_attributes`, `rejected_attributes` (in [`VISIBLE_ATTRIBUTES`] order) and
        `conflict`.
    """
    attributes = VISIBLE_ATTRIBUTES[: len(visible_type_names(num_types)) // 2]
    if isinstance(num_pairs_per_type, bool) or not isinstance(num_pairs_per_type, int) or num_pairs_per_type < 1:
        raise ValueError(f"`num_pairs_per_type` must be a positive integer, got {num_pairs_per_type!r}.")
    if not 0.0 <= conflict_fraction <= 1.0:
        raise ValueError(f"`conflict_fraction` must be in [0, 1], got {conflict_fraction!r}.")
    rng = random.Random(seed)
    rows: list[dict] = []

    def add(attribute: str, direction: int, topic: str, chosen, rejected, chosen_values, rejected_values, conflict):
        prompt = rng.choice(VISIBLE_PROMPTS[(attribute, direction)]).format(topic=topic)
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "category": f"{attribute}{'+' if direction == 1 else '-'}",
                "attribute": attribute,
                "direction": direction,
                "chosen_attributes": [float(value) for value in chosen_values],
                "rejected_attributes": [float(value) for value in rejected_values],
                "conflict": conflict,
            }
        )

    num_twins = round(conflict_fraction * num_pairs_per_type)
    for attribute in attributes:
        for _ in range(num_twins):
            topic = rng.choice(VISIBLE_TOPICS)
            chosen, rejected, chosen_values, rejected_values = _pair(attribute, 1, topic, rng)
            add(attribute, 1, topic, chosen, rejected, chosen_values, rejected_values, True)
            add(attribute, -1, topic, rejected, chosen, rejected_values, chosen_values, True)
        for direction in (1, -1):
            for _ in range(num_pairs_per_type - num_twins):
                topic = rng.choice(VISIBLE_TOPICS)
                add(attribute, direction, topic, *_pair(attribute, direction, topic, rng), False)
    rng.shuffle(rows)
    return Dataset.from_list(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_types", type=int, default=4, help="Even number of types, 2 to 12.")
    parser.add_argument("--num_pairs_per_type", type=int, default=300, help="Pairs of each type.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data.")
    parser.add_argument("--output", required=True, help="JSONL file to write (outside the repository).")
    args = parser.parse_args(argv)
    make_visible_types_dataset(args.num_types, args.num_pairs_per_type, seed=args.seed).to_json(args.output)


if __name__ == "__main__":
    main()
