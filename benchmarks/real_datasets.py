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
The data directory of the real preference data, and the Auto-J loader, for the benchmarks (`real_data.py`,
`personalization.py`; the DSP loader is in `dsp.py`).

The data files are never shipped with the project (their licences do not allow it): they are read from a data
directory given explicitly, or by the environment variable `TRL_MOE_RM_DATA`, or found at `../shared/data` relative to
the repository root. Every loader raises [`RealDataMissingError`] (a `FileNotFoundError`) with a message naming the
missing file, so that callers can skip cleanly.

The Auto-J pairwise test set is loaded by [`load_autoj_pairs`]; its 58 scenarios are grouped into the 8 groups of the
Auto-J paper by the mapping [`AUTOJ_SCENARIO_GROUPS`], written for this project.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from datasets import Dataset


__all__ = [
    "AUTOJ_FILE",
    "AUTOJ_GROUPS",
    "AUTOJ_SCENARIO_GROUPS",
    "DATA_DIR_ENV",
    "RealDataMissingError",
    "autoj_scenario_group",
    "load_autoj_pairs",
    "real_data_file",
    "resolve_data_dir",
]

DATA_DIR_ENV: str = "TRL_MOE_RM_DATA"
"""Environment variable holding the directory of the real data files."""

AUTOJ_FILE: str = "autoj/testdata_pairwise.jsonl"
"""Path of the Auto-J pairwise test set, relative to the data directory."""

_REPO_ROOT = Path(__file__).resolve().parents[1]

AUTOJ_GROUPS: tuple[str, ...] = (
    "summarization",
    "exam_questions",
    "code",
    "creative_writing",
    "functional_writing",
    "rewriting",
    "general_communication",
    "nlp_tasks",
    "others",
)
"""The 8 scenario groups of the Auto-J paper, plus `"others"` for the `others` scenario and any unknown scenario."""

# Written for this project from the scenario names and the group names of the Auto-J paper. The assignment of a few
# borderline scenarios (counterfactual, brainstorming, planning, ranking, data_analysis) is a judgement call.
_GROUP_MEMBERS: dict[str, tuple[str, ...]] = {
    "summarization": ("note_summarization", "post_summarization", "text_summarization"),
    "exam_questions": ("math_reasoning", "solving_exam_question_with_math", "solving_exam_question_without_math"),
    "code": (
        "code_correction_rewriting",
        "code_generation",
        "code_simplification",
        "code_to_code_translation",
        "explaining_code",
    ),
    "creative_writing": (
        "counterfactual",
        "creative_writing",
        "writing_advertisement",
        "writing_blog_post",
        "writing_marketing_materials",
        "writing_personal_essay",
        "writing_presentation_script",
        "writing_social_media_post",
        "writing_song_lyrics",
    ),
    "functional_writing": (
        "functional_writing",
        "writing_biography",
        "writing_cooking_recipe",
        "writing_email",
        "writing_job_application",
        "writing_legal_document",
        "writing_news_article",
        "writing_product_description",
        "writing_scientific_paper",
        "writing_technical_document",
    ),
    "rewriting": (
        "instructional_rewriting",
        "language_polishing",
        "paraphrasing",
        "text_correction",
        "text_simplification",
    ),
    "general_communication": (
        "analyzing_general",
        "asking_how_to_question",
        "brainstorming",
        "chitchat",
        "explaining_general",
        "open_question",
        "planning",
        "recommendation",
        "roleplay",
        "seeking_advice",
        "value_judgement",
        "verifying_fact",
    ),
    "nlp_tasks": (
        "classification_identification",
        "data_analysis",
        "information_extraction",
        "keywords_extraction",
        "question_generation",
        "ranking",
        "reading_comprehension",
        "text_to_text_translation",
        "title_generation",
        "topic_modeling",
    ),
    "others": ("others",),
}

AUTOJ_SCENARIO_GROUPS: dict[str, str] = {
    scenario: group for group, scenarios in _GROUP_MEMBERS.items() for scenario in scenarios
}
"""Mapping from each of the 58 Auto-J scenarios to its group (one of [`AUTOJ_GROUPS`])."""


class RealDataMissingError(FileNotFoundError):
    """A real data file is not where the data directory says; the message says how to point to it."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    r"""
    The directory holding the real data files.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Explicit directory. When `None`, the environment variable `TRL_MOE_RM_DATA` is used, and when that is
            unset or empty, `../shared/data` relative to the repository root.

    Returns:
        `Path`: The directory (not checked for existence; see [`real_data_file`]).
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or (_REPO_ROOT.parent / "shared" / "data")
    return Path(data_dir).expanduser()


def real_data_file(relative_path: str, data_dir: str | os.PathLike | None = None) -> Path:
    r"""
    Path of one real data file, checked for existence.

    Args:
        relative_path (`str`):
            Path inside the data directory, e.g. [`AUTOJ_FILE`] or [`~benchmarks.dsp.DSP_FILE`].
        data_dir (`str` or `os.PathLike`, *optional*):
            Data directory, resolved by [`resolve_data_dir`].

    Returns:
        `Path`: The file.

    Raises:
        [`RealDataMissingError`]: If the file does not exist.
    """
    path = resolve_data_dir(data_dir) / relative_path
    if not path.is_file():
        raise RealDataMissingError(
            f"Real data file not found: {path}. Pass `--data_dir` (or `data_dir=`) or set {DATA_DIR_ENV} to the "
            "directory holding `autoj/` and `dsp/` (see ../shared/data/README.md); the data is never shipped with "
            "the project."
        )
    return path


def autoj_scenario_group(scenario: str) -> str:
    r"""
    Group of an Auto-J scenario.

    Args:
        scenario (`str`):
            Scenario name, e.g. `"code_generation"`.

    Returns:
        `str`: One of [`AUTOJ_GROUPS`]; `"others"` for a scenario the mapping does not know.
    """
    return AUTOJ_SCENARIO_GROUPS.get(scenario, "others")


def load_autoj_pairs(data_dir: str | os.PathLike | None = None, drop_ties: bool = True) -> Dataset:
    r"""
    The Auto-J pairwise test set (Li et al. 2023) as preference pairs with human labels.

    `label` 0 means response 1 is preferred (chosen = response 1, rejected = response 2), 1 means response 2 is
    preferred (chosen = response 2, rejected = response 1), and 2 is a tie. Ties are dropped by default; with
    `drop_ties=False` they are kept in file order with chosen = response 1, rejected = response 2 and `tie=True`.

    Args:
        data_dir (`str` or `os.PathLike`, *optional*):
            Data directory, resolved by [`resolve_data_dir`]; the file is `autoj/testdata_pairwise.jsonl`.
        drop_ties (`bool`, *optional*, defaults to `True`):
            Whether to drop the tied pairs.

    Returns:
        [`~datasets.Dataset`]: One row per pair (1,019 without ties, 1,392 with), with columns `prompt`, `chosen`,
        `rejected`, `scenario`, `category` (the scenario's group, see [`autoj_scenario_group`]), `label` (the original
        0/1/2 label), `tie` (bool) and `row` (the line index in the file).

    Raises:
        [`RealDataMissingError`]: If the file is missing.
        `ValueError`: If a line lacks a field or has a label other than 0, 1 or 2.
    """
    path = real_data_file(AUTOJ_FILE, data_dir)
    columns: dict[str, list] = {
        name: [] for name in ("prompt", "chosen", "rejected", "scenario", "category", "label", "tie", "row")
    }
    with path.open(encoding="utf-8") as handle:
        for row, line in enumerate(handle):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [key for key in ("scenario", "label", "prompt", "response 1", "response 2") if key not in record]
            if missing:
                raise ValueError(f"{path}, line {row + 1}: missing field(s) {missing}.")
            label = int(record["label"])
            if label not in (0, 1, 2):
                raise ValueError(f"{path}, line {row + 1}: label must be 0, 1 or 2, got {record['label']!r}.")
            if label == 2 and drop_ties:
                continue
            first, second = record["response 1"], record["response 2"]
            chosen, rejected = (second, first) if label == 1 else (first, second)
            columns["prompt"].append(record["prompt"])
            columns["chosen"].append(chosen)
            columns["rejected"].append(rejected)
            columns["scenario"].append(record["scenario"])
            columns["category"].append(autoj_scenario_group(record["scenario"]))
            columns["label"].append(label)
            columns["tie"].append(label == 2)
            columns["row"].append(row)
    return Dataset.from_dict(columns)
