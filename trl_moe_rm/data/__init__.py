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
"""Synthetic preference datasets for training and evaluating Mixture-of-Experts reward models."""

from .controlled import (
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
