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
Controlled synthetic preference dataset with hidden, conflicting categories.

The benchmark follows the P-SOUPS recipe: three response attributes (`length`, `formality`, `technicality`), each of which
can be preferred in two directions, giving six preference *categories*. Each category owns its prompt templates, so the
prompt reveals which direction the annotator wants, while the responses carry planted, distinctive marker words for
every attribute value (see [`ATTRIBUTE_MARKERS`]).

A fraction of the response pairs is duplicated under the opposite category (same attribute, opposite direction) with
the labels swapped. On those *conflict* rows, no single reward that only looks at the responses can do better than
chance, whereas a model that routes on the prompt can fit every row.

Everything is generated from templates in this module; nothing is downloaded. All randomness flows from explicit seeds
(`random.Random` / `numpy.random.Generator`), so a given seed always yields the same dataset.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value, concatenate_datasets


__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_MARKERS",
    "CATEGORIES",
    "CATEGORY_DIRECTIONS",
    "CATEGORY_TOPICS",
    "PROMPT_TEMPLATES",
    "SimulatedUser",
    "count_sentences",
    "get_prompt_id",
    "make_controlled_dataset",
    "make_user_pairs",
    "make_users",
    "make_users_dataset",
    "opposite_category",
    "render_prompt",
    "render_response",
    "tokenize_words",
    "train_test_split_by_prompt",
]

ATTRIBUTES: tuple[str, ...] = ("length", "formality", "technicality")
"""Response attributes, in the order used by the `chosen_attributes` / `rejected_attributes` vectors."""

CATEGORIES: tuple[str, ...] = ("concise", "detailed", "formal", "casual", "technical", "plain")
"""Preference categories, in the order used by `category_id`."""

CATEGORY_DIRECTIONS: dict[str, tuple[str, int]] = {
    "concise": ("length", -1),
    "detailed": ("length", 1),
    "formal": ("formality", 1),
    "casual": ("formality", -1),
    "technical": ("technicality", 1),
    "plain": ("technicality", -1),
}
"""Mapping from category name to the `(attribute, direction)` it prefers."""

ATTRIBUTE_MARKERS: dict[str, dict[int, tuple[str, ...]]] = {
    "length": {
        -1: ("short", "briefly", "nutshell"),
        1: ("example", "detail", "background", "overview", "finally"),
    },
    "formality": {
        -1: ("hey", "gonna", "lol", "btw", "cheers"),
        1: ("furthermore", "moreover", "consequently", "regards"),
    },
    "technicality": {
        -1: ("simple", "easy", "basically", "everyday", "imagine"),
        1: ("algorithm", "parameter", "latency", "throughput", "asymptotic"),
    },
}
"""Lower-case single marker words planted in responses, per attribute and attribute value.

Every generated response contains at least one marker of its value for each attribute and never a marker of the
opposite value. Prompts and topics contain no marker word at all. Length is additionally realised structurally: value
`-1` is exactly one sentence, value `+1` is 4 to 6 sentences.
"""

# ----------------------------------------------------------------------------------------------------------------------
# Prompt side
# ----------------------------------------------------------------------------------------------------------------------

_TOPIC_POOL: tuple[str, ...] = (
    "photosynthesis", "compound interest", "the water cycle", "a hash table", "a sourdough starter",
    "public key cryptography", "a suspension bridge", "the stock market", "a jet engine", "vaccination",
    "a search engine", "plate tectonics", "a heat pump", "the immune system", "a credit score",
    "solar power", "a neural network", "inflation", "a bicycle gear system", "a rainbow",
    "a refrigerator", "blockchain", "the tides", "a database index", "composting",
    "a mortgage", "GPS navigation", "a wind turbine", "the human heart", "an electric car",
    "cloud computing", "a nuclear reactor", "the greenhouse effect", "a compiler", "fermentation",
    "a touchscreen", "the printing press", "a microwave oven", "machine translation", "an earthquake",
    "a clinical trial", "the postal system", "a coffee grinder", "recycling", "a 3D printer",
    "the electoral college", "a carbon tax", "a spreadsheet", "coral reef ecology", "a thermostat",
    "file compression", "the placebo effect", "a hybrid car", "an operating system", "bird migration",
    "a smoke detector", "supply and demand", "a telescope", "a password manager", "weather forecasting",
    "a pacemaker", "the internet", "a river delta", "a recommendation system", "insulin",
    "an elevator", "the phases of the moon", "a loyalty program", "noise cancellation", "a traffic light",
    "DNA replication", "a pension fund", "a volcano", "video streaming", "a dishwasher",
    "antibiotic resistance", "a lighthouse", "an error correcting code", "a bee colony", "the metric system",
    "a sailboat", "speech recognition", "a water filter", "the circadian rhythm", "an auction",
    "a power grid", "a quantum computer", "a seed bank", "a barcode scanner", "sleep",
    "a carburetor", "a spam filter", "the blood type system", "a canal lock", "a sewing machine",
    "a rechargeable battery",
)  # fmt: skip

_TOPICS_PER_CATEGORY = 48
_TOPIC_STRIDE = 16

CATEGORY_TOPICS: dict[str, tuple[str, ...]] = {
    name: tuple(
        _TOPIC_POOL[(index * _TOPIC_STRIDE + offset) % len(_TOPIC_POOL)] for offset in range(_TOPICS_PER_CATEGORY)
    )
    for index, name in enumerate(CATEGORIES)
}
"""Topics of each category: overlapping windows of one shared pool, so opposite categories share 32 topics."""

PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "concise": (
        "In one sentence, what is {topic}?",
        "Quick question: {topic}?",
        "Give me the one-line version of {topic}.",
        "Summarize {topic} in a single line.",
        "Keep it to one line: what is {topic}?",
        "No essays please, just tell me what {topic} is.",
        "What is {topic}, in as few words as possible?",
    ),
    "detailed": (
        "Explain in depth how {topic} works.",
        "Give me a thorough, step-by-step walkthrough of {topic}.",
        "I want the full picture: describe {topic} comprehensively.",
        "Write an extensive explanation of {topic}, covering every aspect.",
        "Can you elaborate at length on {topic}?",
        "Walk me through {topic} thoroughly, leaving nothing out.",
        "Provide a comprehensive account of {topic} with plenty of context.",
    ),
    "formal": (
        "Please draft a formal note about {topic}.",
        "Compose a professional memo regarding {topic}.",
        "Kindly prepare an official statement on {topic}.",
        "Write a courteous letter to a colleague concerning {topic}.",
        "Could you prepare a formal briefing on {topic} for the board?",
        "Draft a polite, professional message describing {topic}.",
        "In a formal register, please address the subject of {topic}.",
    ),
    "casual": (
        "yo, what's the deal with {topic}?",
        "so can u tell me about {topic}? no pressure",
        "dude, {topic}... what's up with that?",
        "ok real talk, explain {topic} to me",
        "chat with me about {topic}, no need to be stiff",
        "sup! whats {topic} all about?",
        "just curious, what's the scoop on {topic}? keep it chill",
    ),
    "technical": (
        "Give a rigorous technical explanation of {topic}.",
        "Describe the underlying mechanisms of {topic} using precise terminology.",
        "From an engineering standpoint, how does {topic} work?",
        "What are the key specifications and trade-offs of {topic}?",
        "Analyze {topic} quantitatively, as a specialist would.",
        "Explain {topic} for an expert audience with domain vocabulary.",
    ),
    "plain": (
        "Explain {topic} like I'm five.",
        "How would you describe {topic} to my grandmother?",
        "Without any jargon, what is {topic}?",
        "Put {topic} in layman's terms for me.",
        "I'm a total beginner; help me understand {topic}.",
        "Describe {topic} in words a kid would understand.",
    ),
}
"""Category-specific prompt templates with a `{topic}` slot. No template text is shared between categories."""

# ----------------------------------------------------------------------------------------------------------------------
# Response side
# ----------------------------------------------------------------------------------------------------------------------

# Core sentences carry the technicality markers. They are lower case; formal responses are capitalised later.
_CORE_SENTENCES: dict[int, tuple[str, ...]] = {
    1: (
        "{topic} can be analysed as an algorithm with a tunable parameter",
        "the throughput of {topic} depends on a handful of key parameters",
        "{topic} has asymptotic behaviour that bounds its latency",
        "engineers characterise {topic} by its latency and throughput",
        "the core algorithm behind {topic} trades latency against throughput",
        "each parameter of {topic} shifts its asymptotic cost",
    ),
    -1: (
        "{topic} is basically a simple idea from everyday life",
        "think of {topic} like a recipe that is easy to follow",
        "{topic} is easy to picture, basically like a daily routine",
        "{topic} is simple at heart and shows up in everyday life",
        "imagine {topic} as a simple tool anyone can use",
        "{topic} basically works like a kitchen helper, nothing fancy",
    ),
}

# Filler sentences only appear in long responses and carry the length +1 markers; they are neutral otherwise.
_FILLER_SENTENCES: tuple[str, ...] = (
    "for example, {topic} shows up in many different settings",
    "in more detail, there are several ways to look at {topic}",
    "some background helps when you first meet {topic}",
    "an overview of {topic} usually starts with its history",
    "a concrete example of {topic} makes the idea stick",
    "the detail that matters most is how the parts of {topic} fit together",
    "finally, it is worth revisiting {topic} from time to time",
    "historical background explains why {topic} looks the way it does today",
)

_SHORT_LEADS: tuple[str, ...] = ("in short, ", "briefly, ", "in a nutshell, ")
_FORMAL_CONNECTORS: tuple[str, ...] = ("furthermore, ", "moreover, ", "consequently, ")
_CASUAL_CONNECTORS: tuple[str, ...] = ("hey, ", "btw ", "hey so ")
_CASUAL_TAILS: tuple[str, ...] = (" lol", ", not gonna lie", ", gonna be handy")
_SIGN_OFFS: dict[int, tuple[str, ...]] = {1: ("Kind regards.", "With kind regards."), -1: ("cheers!", "cheers lol!")}

_WORD_RE = re.compile(r"[a-z0-9]+")
_SENTENCE_END_RE = re.compile(r"[.!?](?:\s|$)")


def tokenize_words(text: str) -> list[str]:
    """
    Lower-cases `text` and splits it into alphanumeric words, the tokenisation used to define [`ATTRIBUTE_MARKERS`].

    Args:
        text (`str`):
            Text to tokenise.

    Returns:
        `list[str]`: Lower-case words, in order.
    """
    return _WORD_RE.findall(text.lower())


def count_sentences(text: str) -> int:
    """
    Counts the sentences of a generated response (sentence-final `.`, `!` or `?` followed by a space or the end).

    Args:
        text (`str`):
            Response text produced by [`render_response`].

    Returns:
        `int`: Number of sentences.
    """
    return len(_SENTENCE_END_RE.findall(text))


def _check_attributes(attributes: Sequence[float], name: str = "attributes") -> tuple[int, int, int]:
    if len(attributes) != len(ATTRIBUTES):
        raise ValueError(
            f"`{name}` must have {len(ATTRIBUTES)} values (one per attribute in {ATTRIBUTES}), got {len(attributes)}."
        )
    values = []
    for attribute, value in zip(ATTRIBUTES, attributes, strict=True):
        if value not in (-1, 1):
            raise ValueError(f"`{name}` values must be -1 or +1; got {value!r} for attribute {attribute!r}.")
        values.append(int(value))
    return values[0], values[1], values[2]


def _style(sentence: str, formality: int) -> str:
    """Capitalises formal sentences; casual sentences stay lower case."""
    return sentence[0].upper() + sentence[1:] if formality == 1 else sentence


def render_response(topic: str, attributes: Sequence[float], rng: random.Random) -> str:
    """
    Renders a response about `topic` whose text realises the given attribute values with planted markers.

    Args:
        topic (`str`):
            Topic the response talks about; it is mentioned verbatim.
        attributes (`Sequence[float]`):
            One value in `{-1, +1}` per attribute, in [`ATTRIBUTES`] order.
        rng (`random.Random`):
            Random generator used to pick sentence templates.

    Returns:
        `str`: A single sentence when `length` is `-1`, otherwise 4 to 6 sentences. It contains at least one marker
        from [`ATTRIBUTE_MARKERS`] for each attribute value and none of the opposite values.
    """
    length, formality, technicality = _check_attributes(attributes)
    cores = rng.sample(_CORE_SENTENCES[technicality], 2)
    if length == -1:
        prefix = rng.choice(_FORMAL_CONNECTORS if formality == 1 else _CASUAL_CONNECTORS)
        tail = rng.choice(_CASUAL_TAILS) if formality == -1 and rng.random() < 0.5 else ""
        sentence = prefix + rng.choice(_SHORT_LEADS) + cores[0].format(topic=topic) + tail + "."
        return _style(sentence, formality)

    num_sentences = rng.randint(4, 6)
    # Opening sentence: casual responses greet, formal responses state the core point directly.
    opener = cores[0].format(topic=topic)
    if formality == -1:
        opener = rng.choice(_CASUAL_CONNECTORS) + opener
    sentences = [opener + "."]
    # Middle sentences: a second core sentence plus neutral fillers, shuffled, some with a formality connector.
    middle = [cores[1]] + rng.sample(_FILLER_SENTENCES, num_sentences - 3)
    rng.shuffle(middle)
    for template in middle:
        # Refer to the topic by pronoun in some sentences to keep responses compact.
        sentence = template.format(topic=topic if rng.random() < 0.5 else "it")
        if rng.random() < 0.5:
            if formality == 1:
                sentence = rng.choice(_FORMAL_CONNECTORS) + sentence
            elif rng.random() < 0.5:
                sentence = rng.choice(_CASUAL_CONNECTORS) + sentence
            else:
                sentence = sentence + rng.choice(_CASUAL_TAILS)
        sentences.append(sentence + ".")
    sentences.append(rng.choice(_SIGN_OFFS[formality]))
    return " ".join(_style(sentence, formality) for sentence in sentences)


@functools.cache
def _prompt_universe() -> dict[str, int]:
    """Enumerates every prompt text the generators can produce and gives each a stable integer id."""
    prompt_ids: dict[str, int] = {}
    for category in CATEGORIES:
        for template in PROMPT_TEMPLATES[category]:
            for topic in CATEGORY_TOPICS[category]:
                prompt_ids.setdefault(template.format(topic=topic), len(prompt_ids))
    return prompt_ids


def render_prompt(category: str, topic: str, template_index: int) -> str:
    """
    Renders the prompt of `category` built from template number `template_index` and `topic`.

    Args:
        category (`str`):
            Category name, one of [`CATEGORIES`].
        topic (`str`):
            Topic inserted in the template.
        template_index (`int`):
            Index into `PROMPT_TEMPLATES[category]`.

    Returns:
        `str`: The prompt text.
    """
    _check_category(category)
    return PROMPT_TEMPLATES[category][template_index].format(topic=topic)


def get_prompt_id(prompt: str) -> int:
    """
    Returns the stable id of a prompt produced by this module (the same text always maps to the same id).

    Args:
        prompt (`str`):
            Prompt text, as found in the `prompt` column.

    Returns:
        `int`: Index of the prompt in the enumeration of all category templates and topics.
    """
    try:
        return _prompt_universe()[prompt]
    except KeyError:
        raise ValueError(
            f"Unknown prompt {prompt!r}: only prompts rendered from `PROMPT_TEMPLATES` have an id."
        ) from None


def _check_category(category: str) -> None:
    if category not in CATEGORY_DIRECTIONS:
        raise ValueError(f"Unknown category {category!r}; choose from {CATEGORIES}.")


def opposite_category(category: str) -> str:
    """
    Returns the category that prefers the same attribute in the opposite direction.

    Args:
        category (`str`):
            Category name, one of [`CATEGORIES`].

    Returns:
        `str`: The opposite category, e.g. `"detailed"` for `"concise"`.
    """
    _check_category(category)
    attribute, direction = CATEGORY_DIRECTIONS[category]
    return next(name for name, spec in CATEGORY_DIRECTIONS.items() if spec == (attribute, -direction))


# ----------------------------------------------------------------------------------------------------------------------
# Controlled dataset
# ----------------------------------------------------------------------------------------------------------------------

_BASE_FEATURES = {
    "prompt": Value("string"),
    "chosen": Value("string"),
    "rejected": Value("string"),
    "category": Value("string"),
    "category_id": Value("int64"),
    "attribute": Value("string"),
    "direction": Value("int64"),
    "chosen_attributes": List(Value("float32")),
    "rejected_attributes": List(Value("float32")),
    "conflict": Value("bool"),
    "prompt_id": Value("int64"),
}
CONTROLLED_FEATURES = Features(_BASE_FEATURES)
USER_FEATURES = Features({**_BASE_FEATURES, "user_id": Value("string")})


def _random_prompt(category: str, rng: random.Random, topic: str | None = None) -> tuple[str, str]:
    """Draws a prompt of `category` (optionally with a fixed topic); returns `(prompt, topic)`."""
    if topic is None:
        topic = rng.choice(CATEGORY_TOPICS[category])
    return rng.choice(PROMPT_TEMPLATES[category]).format(topic=topic), topic


def _labelled_attributes(attribute: str, direction: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Chosen/rejected attribute vectors: fixed on `attribute`, random (independently) on the distractors."""
    chosen = [rng.choice((-1, 1)) for _ in ATTRIBUTES]
    rejected = [rng.choice((-1, 1)) for _ in ATTRIBUTES]
    index = ATTRIBUTES.index(attribute)
    chosen[index], rejected[index] = direction, -direction
    return chosen, rejected


def _row(
    prompt: str,
    chosen: str,
    rejected: str,
    category: str,
    chosen_attributes: Sequence[int],
    rejected_attributes: Sequence[int],
    conflict: bool,
) -> dict:
    attribute, direction = CATEGORY_DIRECTIONS[category]
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "category": category,
        "category_id": CATEGORIES.index(category),
        "attribute": attribute,
        "direction": direction,
        "chosen_attributes": [float(value) for value in chosen_attributes],
        "rejected_attributes": [float(value) for value in rejected_attributes],
        "conflict": conflict,
        "prompt_id": get_prompt_id(prompt),
    }


def _rows_to_dataset(rows: list[dict], features: Features) -> Dataset:
    return Dataset.from_dict({name: [row[name] for row in rows] for name in features}, features=features)


def _validate_categories(categories: Sequence[str] | None) -> tuple[str, ...]:
    if categories is None:
        return CATEGORIES
    if isinstance(categories, str):
        raise ValueError(
            f"`categories` must be a sequence of category names, not a single string; use [{categories!r}] instead."
        )
    selected = tuple(categories)
    if not selected:
        raise ValueError(f"`categories` must contain at least one category; choose from {CATEGORIES} (or pass None).")
    for category in selected:
        _check_category(category)
    if len(set(selected)) != len(selected):
        raise ValueError(f"`categories` contains duplicates: {list(selected)}; list each category at most once.")
    return tuple(category for category in CATEGORIES if category in selected)


def make_controlled_dataset(
    num_pairs_per_category: int = 200,
    conflict_fraction: float = 0.5,
    categories: Sequence[str] | None = None,
    seed: int = 0,
) -> Dataset:
    """
    Builds the controlled preference dataset with hidden, partly conflicting categories.

    For a category `c` preferring `(attribute, direction)`, the chosen response has value `direction` on `attribute` and
    the rejected one `-direction`; the two other attributes are drawn uniformly and independently for both responses.
    For every pair of opposite categories that are both selected, `round(conflict_fraction * num_pairs_per_category)`
    response pairs are shared: each appears once under `c` (with a prompt of `c`) and once under the opposite category
    (with a different prompt of that category, about the same topic) with chosen and rejected swapped. Both rows are
    flagged `conflict=True` and count toward their own category. Categories whose opposite is not selected get no
    conflict rows.

    Args:
        num_pairs_per_category (`int`, *optional*, defaults to `200`):
            Number of rows of each selected category, conflict rows included.
        conflict_fraction (`float`, *optional*, defaults to `0.5`):
            Fraction, in `[0, 1]`, of each category's rows that are conflict twins.
        categories (`Sequence[str]` or `None`, *optional*, defaults to `None`):
            Subset of [`CATEGORIES`] to generate. `None` selects all six.
        seed (`int`, *optional*, defaults to `0`):
            Random seed; the same seed always yields the same dataset.

    Returns:
        [`~datasets.Dataset`]: Shuffled rows with columns `prompt`, `chosen`, `rejected` (TRL explicit-prompt
        preference format), `category`, `category_id` (index in [`CATEGORIES`]), `attribute`, `direction`,
        `chosen_attributes` and `rejected_attributes` (values in [`ATTRIBUTES`] order), `conflict` and `prompt_id`
        (stable id of the prompt text, see [`get_prompt_id`]).

    Example:

    ```python
    >>> from trl_moe_rm.data import make_controlled_dataset
    >>> dataset = make_controlled_dataset(num_pairs_per_category=100, seed=0)
    >>> len(dataset)
    600
    ```
    """
    if isinstance(num_pairs_per_category, bool) or not isinstance(num_pairs_per_category, int):
        raise ValueError(f"`num_pairs_per_category` must be an int, got {num_pairs_per_category!r}.")
    if num_pairs_per_category < 1:
        raise ValueError(f"`num_pairs_per_category` must be at least 1, got {num_pairs_per_category}.")
    if not (isinstance(conflict_fraction, int | float) and 0.0 <= conflict_fraction <= 1.0):
        raise ValueError(f"`conflict_fraction` must be a number in [0, 1], got {conflict_fraction!r}.")
    selected = _validate_categories(categories)
    rng = random.Random(seed)

    rows: list[dict] = []
    num_conflicts = {category: 0 for category in selected}
    # Conflict twins: for each selected (c, opposite) pair, shared response pairs with swapped labels.
    for category in selected:
        opposite = opposite_category(category)
        if opposite not in selected or CATEGORY_DIRECTIONS[category][1] != 1:
            continue
        opposite_topics = set(CATEGORY_TOPICS[opposite])
        shared_topics = [topic for topic in CATEGORY_TOPICS[category] if topic in opposite_topics]
        attribute, direction = CATEGORY_DIRECTIONS[category]
        num_twins = round(conflict_fraction * num_pairs_per_category)
        for _ in range(num_twins):
            topic = rng.choice(shared_topics)
            chosen_attributes, rejected_attributes = _labelled_attributes(attribute, direction, rng)
            chosen = render_response(topic, chosen_attributes, rng)
            rejected = render_response(topic, rejected_attributes, rng)
            prompt, _ = _random_prompt(category, rng, topic)
            twin_prompt, _ = _random_prompt(opposite, rng, topic)
            rows.append(_row(prompt, chosen, rejected, category, chosen_attributes, rejected_attributes, True))
            rows.append(_row(twin_prompt, rejected, chosen, opposite, rejected_attributes, chosen_attributes, True))
        num_conflicts[category] = num_conflicts[opposite] = num_twins

    # Regular rows fill each category up to `num_pairs_per_category`.
    for category in selected:
        attribute, direction = CATEGORY_DIRECTIONS[category]
        for _ in range(num_pairs_per_category - num_conflicts[category]):
            prompt, topic = _random_prompt(category, rng)
            chosen_attributes, rejected_attributes = _labelled_attributes(attribute, direction, rng)
            chosen = render_response(topic, chosen_attributes, rng)
            rejected = render_response(topic, rejected_attributes, rng)
            rows.append(_row(prompt, chosen, rejected, category, chosen_attributes, rejected_attributes, False))

    rng.shuffle(rows)
    return _rows_to_dataset(rows, CONTROLLED_FEATURES)


def train_test_split_by_prompt(
    dataset: Dataset, test_size: float = 0.2, seed: int = 0, prompt_column: str = "prompt"
) -> DatasetDict:
    """
    Splits a dataset so that no prompt appears in both the train and the test split.

    Distinct prompts are sorted, shuffled with `seed`, and `round(test_size * num_prompts)` of them (at least one, and
    at least one left for training) go to the test split together with all their rows. Row order is preserved within
    splits.

    Args:
        dataset ([`~datasets.Dataset`]):
            Dataset with a `prompt_column` column.
        test_size (`float`, *optional*, defaults to `0.2`):
            Fraction, in `(0, 1)`, of distinct prompts assigned to the test split.
        seed (`int`, *optional*, defaults to `0`):
            Random seed of the prompt shuffle.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column identifying the prompt of each row: the prompt text, or a prompt id (e.g. DSP's `query_id`).

    Returns:
        [`~datasets.DatasetDict`]: With keys `"train"` and `"test"`.
    """
    if not (isinstance(test_size, int | float) and 0.0 < test_size < 1.0):
        raise ValueError(f"`test_size` must be a fraction strictly between 0 and 1, got {test_size!r}.")
    if prompt_column not in dataset.column_names:
        raise ValueError(
            f"`dataset` needs a {prompt_column!r} column to be split by prompt; it has {dataset.column_names}."
        )
    prompts = dataset[prompt_column]
    unique_prompts = sorted(set(prompts))
    if len(unique_prompts) < 2:
        raise ValueError(
            f"`dataset` has {len(unique_prompts)} distinct prompt(s); at least 2 are needed to split by prompt."
        )
    random.Random(seed).shuffle(unique_prompts)
    num_test = min(max(round(test_size * len(unique_prompts)), 1), len(unique_prompts) - 1)
    test_prompts = set(unique_prompts[:num_test])
    train_indices = [index for index, prompt in enumerate(prompts) if prompt not in test_prompts]
    test_indices = [index for index, prompt in enumerate(prompts) if prompt in test_prompts]
    return DatasetDict({"train": dataset.select(train_indices), "test": dataset.select(test_indices)})


# ----------------------------------------------------------------------------------------------------------------------
# Simulated users
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SimulatedUser:
    """
    Simulated annotator whose preference is a convex mixture of the six category directions.

    Args:
        user_id (`str`):
            Identifier of the user.
        direction_weights (`dict[str, float]`):
            Non-negative weight of each category in [`CATEGORIES`]; they must sum to 1. Missing categories get weight
            0.
    """

    user_id: str
    direction_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for category in self.direction_weights:
            _check_category(category)
        weights = {category: float(self.direction_weights.get(category, 0.0)) for category in CATEGORIES}
        if any(not math.isfinite(weight) or weight < 0 for weight in weights.values()):
            raise ValueError(f"`direction_weights` must be finite and non-negative, got {self.direction_weights}.")
        if not math.isclose(sum(weights.values()), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"`direction_weights` must sum to 1, got {sum(weights.values())}; normalise them by their sum first."
            )
        self.direction_weights = weights

    @property
    def attribute_weights(self) -> np.ndarray:
        """Net signed weight of each attribute ([`ATTRIBUTES`] order): the user's utility is linear in them."""
        net = np.zeros(len(ATTRIBUTES))
        for category, weight in self.direction_weights.items():
            attribute, direction = CATEGORY_DIRECTIONS[category]
            net[ATTRIBUTES.index(attribute)] += direction * weight
        return net

    @property
    def dominant_category(self) -> str:
        """Category with the largest weight (ties broken by [`CATEGORIES`] order)."""
        return max(CATEGORIES, key=lambda category: self.direction_weights[category])

    def utility(self, attributes: Sequence[float]) -> float:
        """
        Utility of a response: `sum_c w_c * direction_c * attributes[attribute_c]`.

        Args:
            attributes (`Sequence[float]`):
                Attribute values of the response, in [`ATTRIBUTES`] order.

        Returns:
            `float`: The user's utility.
        """
        if len(attributes) != len(ATTRIBUTES):
            raise ValueError(f"`attributes` must have {len(ATTRIBUTES)} values ({ATTRIBUTES}), got {len(attributes)}.")
        total = 0.0
        for category, weight in self.direction_weights.items():
            attribute, direction = CATEGORY_DIRECTIONS[category]
            total += weight * direction * float(attributes[ATTRIBUTES.index(attribute)])
        return total

    def prefers(self, a_attributes: Sequence[float], b_attributes: Sequence[float]) -> bool:
        """
        Whether the user strictly prefers response `a` to response `b`.

        Args:
            a_attributes (`Sequence[float]`):
                Attribute values of response `a`.
            b_attributes (`Sequence[float]`):
                Attribute values of response `b`.

        Returns:
            `bool`: `True` if `utility(a_attributes) > utility(b_attributes)`.
        """
        return self.utility(a_attributes) > self.utility(b_attributes)


def make_users(num_users: int = 10, alpha: float = 0.3, seed: int = 0) -> list[SimulatedUser]:
    """
    Samples simulated users whose category weights follow a symmetric Dirichlet distribution.

    Args:
        num_users (`int`, *optional*, defaults to `10`):
            Number of users, at least 1.
        alpha (`float`, *optional*, defaults to `0.3`):
            Dirichlet concentration (> 0). Small values give users dominated by one or two directions.
        seed (`int`, *optional*, defaults to `0`):
            Random seed.

    Returns:
        `list[SimulatedUser]`: Users with ids `"user_0"`, `"user_1"`, ...
    """
    if isinstance(num_users, bool) or not isinstance(num_users, int) or num_users < 1:
        raise ValueError(f"`num_users` must be an int >= 1, got {num_users!r}.")
    if not (isinstance(alpha, int | float) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"`alpha` must be a positive finite Dirichlet concentration, got {alpha!r}.")
    rng = random.Random(seed)
    users = []
    for index in range(num_users):
        # Dirichlet sample = normalised independent Gamma(alpha, 1) draws (resampled in the rare all-zero underflow).
        gammas = [0.0]
        while sum(gammas) <= 0.0:
            gammas = [rng.gammavariate(float(alpha), 1.0) for _ in CATEGORIES]
        total = sum(gammas)
        weights = {category: gamma / total for category, gamma in zip(CATEGORIES, gammas, strict=True)}
        users.append(SimulatedUser(f"user_{index}", weights))
    return users


_MAX_TIE_RESAMPLES = 1000


def make_user_pairs(user: SimulatedUser, num_pairs: int, seed: int = 0) -> Dataset:
    """
    Builds preference pairs labelled by a simulated user.

    Prompts are drawn from all categories' pools (the prompt does not reveal the user), both responses get uniformly
    random attribute values (resampled while the user is indifferent between them) and the response with the higher
    utility is `chosen`.

    Args:
        user ([`SimulatedUser`]):
            The annotator.
        num_pairs (`int`):
            Number of pairs, at least 1.
        seed (`int`, *optional*, defaults to `0`):
            Random seed.

    Returns:
        [`~datasets.Dataset`]: Same columns as [`make_controlled_dataset`] plus `user_id`. `category`, `category_id`,
        `attribute` and `direction` describe the user's dominant direction; `conflict` is always `False`.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
        raise ValueError(f"`num_pairs` must be an int >= 1, got {num_pairs!r}.")
    if np.allclose(user.attribute_weights, 0.0, atol=1e-12):
        raise ValueError(
            f"User {user.user_id!r} is indifferent between all responses (opposite directions cancel out); "
            "give it a non-zero net weight on at least one attribute."
        )
    rng = random.Random(seed)
    dominant = user.dominant_category
    rows = []
    for _ in range(num_pairs):
        prompt, topic = _random_prompt(rng.choice(CATEGORIES), rng)
        for _ in range(_MAX_TIE_RESAMPLES):
            a_attributes = [rng.choice((-1, 1)) for _ in ATTRIBUTES]
            b_attributes = [rng.choice((-1, 1)) for _ in ATTRIBUTES]
            if abs(user.utility(a_attributes) - user.utility(b_attributes)) > 1e-9:
                break
        else:  # pragma: no cover - only reachable with near-zero net weights
            raise ValueError(f"Could not sample a non-tied pair for user {user.user_id!r}; its net weights are ~0.")
        if not user.prefers(a_attributes, b_attributes):
            a_attributes, b_attributes = b_attributes, a_attributes
        chosen = render_response(topic, a_attributes, rng)
        rejected = render_response(topic, b_attributes, rng)
        row = _row(prompt, chosen, rejected, dominant, a_attributes, b_attributes, False)
        row["user_id"] = user.user_id
        rows.append(row)
    return _rows_to_dataset(rows, USER_FEATURES)


def make_users_dataset(users: Sequence[SimulatedUser], pairs_per_user: int, seed: int = 0) -> Dataset:
    """
    Concatenates [`make_user_pairs`] over several users, each with its own seed derived from `seed` and its position.

    Args:
        users (`Sequence[SimulatedUser]`):
            Annotators, at least one.
        pairs_per_user (`int`):
            Number of pairs per user, at least 1.
        seed (`int`, *optional*, defaults to `0`):
            Random seed.

    Returns:
        [`~datasets.Dataset`]: The users' pairs, grouped by user in the order of `users`.
    """
    if not users:
        raise ValueError("`users` must contain at least one `SimulatedUser`; create some with `make_users`.")
    user_ids = [user.user_id for user in users]
    if len(set(user_ids)) != len(user_ids):
        raise ValueError(f"User ids must be unique, got {user_ids}.")
    seed_rng = random.Random(seed)
    seeds = [seed_rng.getrandbits(63) for _ in users]
    return concatenate_datasets(
        [
            make_user_pairs(user, pairs_per_user, seed=int(user_seed))
            for user, user_seed in zip(users, seeds, strict=True)
        ]
    )
