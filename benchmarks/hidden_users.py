r"""
Hidden-user preference data for the personalization benchmark: everyday advice requests, a shared prompt pool, and
users who judge the same answers by opposite attributes.

Nothing here overlaps the controlled data of [`trl_moe_rm.data.controlled`] (explanations of technical topics judged on
length, formality and technicality): the prompts ask for everyday advice (gifts, outings, meals, home, hobbies,
travel) and the answers vary along three other attributes, each with two opposite values:

- `budget`: thrifty suggestions (free, second-hand, home-made) against lavish ones (premium, booked, splurged on);
- `layout`: a numbered list against one flowing paragraph;
- `voice`: a personal anecdote in the first person against impersonal, general advice.

Every prompt gets a few answers with random attribute values, and a *pair* is two answers to the same prompt that
differ in at least one attribute. The users ([`make_hidden_users`]) are the six *types* (one attribute value each,
e.g. `thrifty`, `list`, `personal`) plus users who mix two types of different attributes with unequal weights. A user
prefers the answer with the higher utility `sum_a w_a * value_a`, so the same pair is labelled one way by `thrifty`
and the other way by `lavish`; nothing in the prompt tells who is judging (hidden context).

Everything is generated from templates with explicit seeds; nothing is downloaded.

Example:

```python
>>> from benchmarks.hidden_users import make_hidden_user_pairs, make_hidden_users

>>> users = make_hidden_users(num_mixed=6, seed=0)
>>> split = make_hidden_user_pairs(users, train_pairs=200, test_pairs=100, seed=0)
>>> split["train"]["prompt"][0], split["train"]["user_id"][0]
```
"""

from __future__ import annotations

import random
from dataclasses import dataclass


__all__ = [
    "HIDDEN_ATTRIBUTES",
    "HIDDEN_TYPES",
    "HiddenUser",
    "make_hidden_user_pairs",
    "make_hidden_users",
    "make_prompts",
    "render_answer",
]

HIDDEN_ATTRIBUTES: tuple[str, ...] = ("budget", "layout", "voice")
"""Attributes of an answer, each `+1` or `-1`, in the order of the attribute vectors."""

HIDDEN_TYPES: dict[str, tuple[str, int]] = {
    "lavish": ("budget", 1),
    "thrifty": ("budget", -1),
    "list": ("layout", 1),
    "prose": ("layout", -1),
    "personal": ("voice", 1),
    "impersonal": ("voice", -1),
}
"""User types: the `(attribute, value)` each one prefers."""

# Each family: prompt templates with one `{slot}`, the slot's fillers, and suggestions per budget value.
_FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "gift": {
        "templates": (
            "What should I get {slot} for their birthday?",
            "I need a present for {slot}. Any thoughts?",
            "Help me pick a thank-you gift for {slot}.",
            "What is a good anniversary surprise for {slot}?",
        ),
        "slots": (
            "my sister",
            "my grandfather",
            "a coworker who is leaving",
            "my partner",
            "my best friend",
            "my piano teacher",
            "a neighbour who helped me move",
            "my dad",
        ),  # fmt: skip
        "-1": (
            "a handwritten letter",
            "a jar of home-made jam",
            "a framed photo you printed yourself",
            "a second-hand novel with a note inside",
            "a playlist of songs you both like",
            "a voucher for a home-cooked dinner",
        ),  # fmt: skip
        "1": (
            "a designer leather bag",
            "a weekend at a boutique spa",
            "a tasting menu at a starred restaurant",
            "a high-end espresso machine",
            "front-row concert tickets",
            "a hand-made watch",
        ),  # fmt: skip
    },
    "outing": {
        "templates": (
            "Any ideas for a Saturday in {slot}?",
            "How should we spend an afternoon in {slot}?",
            "Plan a day out in {slot} for two of us.",
            "We have one free evening in {slot}. What should we do?",
        ),
        "slots": (
            "Lisbon",
            "the mountains",
            "a small seaside town",
            "Vienna",
            "the countryside",
            "Montreal",
            "a lake district",
            "Kyoto",
        ),  # fmt: skip
        "-1": (
            "a picnic in a public park",
            "a free walking route along the river",
            "a museum on its free-entry day",
            "a bike ride on borrowed bikes",
            "a sunset from a public viewpoint",
            "browsing a flea market",
        ),
        "1": (
            "a private guided tour",
            "a helicopter ride over the coast",
            "a chef's table dinner",
            "a sailing trip on a chartered yacht",
            "box seats at the opera",
            "a suite with a rooftop terrace",
        ),
    },
    "meal": {
        "templates": (
            "What should I cook for {slot}?",
            "I am hosting {slot}. What menu would work?",
            "Suggest a dinner plan for {slot}.",
            "What food should I serve for {slot}?",
        ),
        "slots": (
            "six friends on Friday",
            "my in-laws",
            "a rainy Sunday lunch",
            "a garden party",
            "a first date at home",
            "a team potluck",
            "my parents' visit",
            "a game night",
        ),  # fmt: skip
        "-1": (
            "a big pot of lentil soup",
            "pasta with seasonal vegetables",
            "bean chili with rice",
            "a tray of roasted root vegetables",
            "home-baked flatbread with dips",
            "an omelette bar",
        ),
        "1": (
            "a whole roasted lobster",
            "dry-aged steak with truffle butter",
            "oysters with champagne",
            "a catered sushi platter",
            "wagyu sliders",
            "saffron risotto with scallops",
        ),  # fmt: skip
    },
    "home": {
        "templates": (
            "How can I make {slot} feel cosier?",
            "I want to refresh {slot}. Where do I start?",
            "What would brighten up {slot}?",
            "Any tips to make {slot} more welcoming?",
        ),
        "slots": (
            "my small bedroom",
            "our living room",
            "a rented flat",
            "my home office",
            "the guest room",
            "our kitchen",
            "a narrow hallway",
            "the balcony",
        ),  # fmt: skip
        "-1": (
            "plants grown from cuttings",
            "a thrifted rug",
            "fairy lights you already own",
            "rearranged furniture",
            "curtains sewn from old sheets",
            "a gallery of postcards",
        ),  # fmt: skip
        "1": (
            "a custom velvet sofa",
            "an interior designer's consultation",
            "Italian marble shelves",
            "a statement chandelier",
            "bespoke oak cabinets",
            "a hand-knotted silk carpet",
        ),  # fmt: skip
    },
    "hobby": {
        "templates": (
            "I want to take up {slot}. How do I begin?",
            "What is the best way to get into {slot}?",
            "Give me a plan for starting {slot} this month.",
            "How should a beginner approach {slot}?",
        ),
        "slots": (
            "watercolour painting",
            "running",
            "photography",
            "gardening",
            "the guitar",
            "pottery",
            "rock climbing",
            "birdwatching",
        ),  # fmt: skip
        "-1": (
            "free video lessons",
            "borrowed gear from a friend",
            "a library book on the basics",
            "a local club with no fees",
            "practice with whatever you have at home",
            "a used starter kit",
        ),
        "1": (
            "private lessons with a professional",
            "a premium starter kit",
            "a week-long residential course",
            "the top model of the gear",
            "a membership at an exclusive studio",
            "a personal coach",
        ),
    },
    "trip": {
        "templates": (
            "Where should I go for {slot}?",
            "Help me plan {slot}.",
            "What kind of holiday suits {slot}?",
            "I have some time off for {slot}. Ideas?",
        ),
        "slots": (
            "a long weekend",
            "our honeymoon",
            "a family reunion",
            "a solo week away",
            "spring break",
            "a trip with my mum",
            "a friends' getaway",
            "a quiet birthday trip",
        ),  # fmt: skip
        "-1": (
            "a camping trip by train",
            "a house swap with friends",
            "hiking between youth hostels",
            "a road trip sharing fuel costs",
            "visiting relatives in another town",
            "a volunteer farm stay",
        ),
        "1": (
            "a private villa in the tropics",
            "a first-class rail journey",
            "a luxury safari lodge",
            "an all-inclusive island resort",
            "a cruise in a balcony suite",
            "a ski chalet with a chef",
        ),
    },
}

_BUDGET_NOTES: dict[int, tuple[str, ...]] = {
    -1: (
        "It costs next to nothing.",
        "Your wallet will thank you.",
        "No need to spend much at all.",
        "Cheap, and it still feels special.",
    ),  # fmt: skip
    1: (
        "It is worth the splurge.",
        "Treat yourself; the price is part of the fun.",
        "Spend generously on this one.",
        "Go all out, it is a once-in-a-while thing.",
    ),  # fmt: skip
}
_PERSONAL: tuple[str, ...] = (
    "When I did this last year, {item} was the highlight for me.",
    "I tried {item} myself and my family still talks about it.",
    "Personally, I loved {item} the first time I went for it.",
    "My own favourite was {item}; I remember it fondly.",
)
_IMPERSONAL: tuple[str, ...] = (
    "Many people find that {item} works well.",
    "A common recommendation is {item}.",
    "{item} is a widely suggested option.",
    "Most guides point to {item} as a reliable choice.",
)
_LIST_OPENERS: tuple[str, ...] = ("Here are some options:", "A few ideas:", "Options to consider:")
_PROSE_LINKS: tuple[str, ...] = ("Another thought is", "You could also consider", "Alternatively, there is")


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def make_prompts(seed: int = 0) -> list[tuple[str, str]]:
    """
    The shared prompt pool: `(prompt, family)` for every template and slot of every family, in a seeded order.

    Args:
        seed (`int`, *optional*, defaults to `0`):
            Seed of the order.

    Returns:
        `list[tuple[str, str]]`: 192 distinct prompts with their family.
    """
    prompts = [
        (template.format(slot=slot), family)
        for family, spec in _FAMILIES.items()
        for template in spec["templates"]
        for slot in spec["slots"]
    ]
    random.Random(seed).shuffle(prompts)
    return prompts


def render_answer(family: str, attributes: tuple[int, int, int], rng: random.Random) -> str:
    """
    An answer to a prompt of `family` whose budget, layout and voice are the given values (`+1` / `-1` each, in
    [`HIDDEN_ATTRIBUTES`] order).

    Args:
        family (`str`):
            The prompt's family (`gift`, `outing`, `meal`, `home`, `hobby` or `trip`).
        attributes (`tuple[int, int, int]`):
            The answer's budget, layout and voice.
        rng (`random.Random`):
            Random source of the suggestions and phrasings.

    Returns:
        `str`: Three suggestions matching the budget, a budget note, and a personal or impersonal sentence, laid out as
        a numbered list or as one paragraph.
    """
    budget, layout, voice = attributes
    if any(value not in (-1, 1) for value in attributes) or family not in _FAMILIES:
        raise ValueError(
            f"Expected a family in {list(_FAMILIES)} and values in {{-1, 1}}, got {family!r}, {attributes}."
        )
    items = rng.sample(_FAMILIES[family][str(budget)], 3)
    aside = rng.choice(_PERSONAL if voice == 1 else _IMPERSONAL).format(item=items[0])
    note = rng.choice(_BUDGET_NOTES[budget])
    if layout == 1:
        lines = [rng.choice(_LIST_OPENERS)] + [f"{index}. {_capitalize(item)}." for index, item in enumerate(items, 1)]
        return "\n".join([*lines, _capitalize(aside), note])
    first = f"I would go with {items[0]}." if voice == 1 else f"A good choice is {items[0]}."
    links = rng.sample(_PROSE_LINKS, 2)
    return " ".join([first, f"{links[0]} {items[1]}, and {links[1].lower()} {items[2]}.", _capitalize(aside), note])


@dataclass(frozen=True)
class HiddenUser:
    """
    A simulated user: signed weights over [`HIDDEN_ATTRIBUTES`] (the utility of an answer is their dot product with
    its attribute values).

    Args:
        user_id (`str`):
            E.g. `"thrifty"` for a type, `"list+lavish"` for a mixed user.
        weights (`tuple[float, float, float]`):
            Weight of budget, layout and voice; one non-zero entry for a type, two for a mixed user.
    """

    user_id: str
    weights: tuple[float, float, float]

    def utility(self, attributes: tuple[int, int, int]) -> float:
        return float(sum(weight * value for weight, value in zip(self.weights, attributes)))


def make_hidden_users(num_mixed: int = 6, seed: int = 0) -> list[HiddenUser]:
    """
    The six user types, then `num_mixed` users mixing two types of different attributes with weights `(w, 1 - w)`,
    `w` uniform in `[0.6, 0.8]` (so neither attribute is a tie-breaker only).

    Args:
        num_mixed (`int`, *optional*, defaults to `6`):
            Number of mixed users (at most 24: the distinct ordered choices of two types of different attributes).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the mixed users' types and weights.

    Returns:
        `list[HiddenUser]`
    """
    users = []
    for name, (attribute, value) in HIDDEN_TYPES.items():
        weights = [0.0] * len(HIDDEN_ATTRIBUTES)
        weights[HIDDEN_ATTRIBUTES.index(attribute)] = float(value)
        users.append(HiddenUser(name, tuple(weights)))
    combos = [
        (first, second)
        for first in HIDDEN_TYPES
        for second in HIDDEN_TYPES
        if HIDDEN_TYPES[first][0] != HIDDEN_TYPES[second][0]
    ]
    if not 0 <= num_mixed <= len(combos):
        raise ValueError(f"`num_mixed` must be in [0, {len(combos)}], got {num_mixed}.")
    rng = random.Random(seed)
    for first, second in rng.sample(combos, num_mixed):
        share = rng.uniform(0.6, 0.8)
        weights = [0.0] * len(HIDDEN_ATTRIBUTES)
        for name, weight in ((first, share), (second, 1.0 - share)):
            attribute, value = HIDDEN_TYPES[name]
            weights[HIDDEN_ATTRIBUTES.index(attribute)] = weight * value
        users.append(HiddenUser(f"{first}+{second}", tuple(weights)))
    return users


def make_hidden_user_pairs(
    users: list[HiddenUser],
    train_pairs: int = 200,
    test_pairs: int = 100,
    answers_per_prompt: int = 6,
    test_fraction: float = 0.25,
    label_noise: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, list]]:
    r"""
    Preference pairs of every user on the shared prompt pool, split by prompt.

    Each prompt of [`make_prompts`] gets `answers_per_prompt` answers with random attribute values; the candidate pairs
    are all pairs of a prompt's answers that differ in at least one attribute. The prompts are split into train and
    test (`test_fraction`); each user draws `train_pairs` (`test_pairs`) candidate pairs of the train (test) prompts on
    which their utility is not tied, and labels them: the answer of higher utility is `chosen`, except with probability
    `label_noise` (a careless label). Different users draw overlapping pairs, so a pair often appears with opposite
    labels.

    Args:
        users (`list[HiddenUser]`):
            From [`make_hidden_users`].
        train_pairs (`int`, *optional*, defaults to `200`):
            Training pairs per user.
        test_pairs (`int`, *optional*, defaults to `100`):
            Held-out pairs per user.
        answers_per_prompt (`int`, *optional*, defaults to `6`):
            Answers generated per prompt.
        test_fraction (`float`, *optional*, defaults to `0.25`):
            Fraction of the prompts held out.
        label_noise (`float`, *optional*, defaults to `0.05`):
            Probability that a label is flipped.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the answers, the split, the draws and the noise.

    Returns:
        `dict` with `"train"` and `"test"`, each a dict of lists `prompt`, `chosen`, `rejected`, `user_id`,
        `chosen_attributes`, `rejected_attributes`, grouped by user in the order of `users`.
    """
    if answers_per_prompt < 2 or not 0 < test_fraction < 1 or not 0 <= label_noise < 0.5:
        raise ValueError(
            f"Need answers_per_prompt >= 2, 0 < test_fraction < 1 and 0 <= label_noise < 0.5; got {answers_per_prompt}, "
            f"{test_fraction}, {label_noise}."
        )
    rng = random.Random(seed)
    prompts = make_prompts(seed)
    num_test = max(1, round(test_fraction * len(prompts)))
    candidates: dict[str, list[tuple[str, tuple[str, tuple], tuple[str, tuple]]]] = {"test": [], "train": []}
    for position, (prompt, family) in enumerate(prompts):
        answers = []
        for _ in range(answers_per_prompt):
            attributes = tuple(rng.choice((-1, 1)) for _ in HIDDEN_ATTRIBUTES)
            answers.append((render_answer(family, attributes, rng), attributes))
        split = "test" if position < num_test else "train"
        candidates[split] += [
            (prompt, first, second)
            for index, first in enumerate(answers)
            for second in answers[index + 1 :]
            if first[1] != second[1] and first[0] != second[0]
        ]
    sets = {}
    for split, size in (("train", train_pairs), ("test", test_pairs)):
        columns: dict[str, list] = {
            key: [] for key in ("prompt", "chosen", "rejected", "user_id", "chosen_attributes", "rejected_attributes")
        }
        for user in users:
            usable = [row for row in candidates[split] if user.utility(row[1][1]) != user.utility(row[2][1])]
            if len(usable) < size:
                raise ValueError(f"Only {len(usable)} {split} pairs for user {user.user_id!r}; ask for fewer.")
            for prompt, first, second in rng.sample(usable, size):
                better, worse = (
                    (first, second) if user.utility(first[1]) > user.utility(second[1]) else (second, first)
                )
                if rng.random() < label_noise:
                    better, worse = worse, better
                columns["prompt"].append(prompt)
                columns["chosen"].append(better[0])
                columns["rejected"].append(worse[0])
                columns["user_id"].append(user.user_id)
                columns["chosen_attributes"].append(list(better[1]))
                columns["rejected_attributes"].append(list(worse[1]))
        sets[split] = columns
    return sets
