"""
Text to model inputs: the one place where (prompt, response) rows become token ids, `prompt_length`, and padded
batches.

Every consumer goes through this module, so that a reward is always computed on the tokens the model was trained on:
[`MoERewardTrainer`] (training pairs), the feature cache, [`~trl_moe_rm.scoring.score_pairs`],
[`~trl_moe_rm.scoring.score`], [`fit_user_weights`], [`PersonalizedReward`], the CLI, the reward server and the
benchmarks.

The rules:

- **Standard (plain text) rows.** The prompt is tokenized alone with the tokenizer's special tokens, each response
  without them, and the response is closed with the end token: eos for decoders, sep for BERT-style encoders (an id of
  `0` is a valid end token). `prompt_length` is the number of prompt tokens, so a router with `router_input="prompt"`
  reads exactly the prompt.
- **Conversational rows** (lists of `{"role", "content"}` messages) go through the tokenizer's chat template, as in
  TRL: the prompt with the generation prompt, the response as the rest of the rendered conversation, both tokenized
  without special tokens, and no end token is added (the template closes the turn).
- **Row shapes**: `prompt`/`chosen`/`rejected` (TRL's preference format, explicit or implicit prompt), TRL's
  `prompt`/`completion`, and the legacy `prompt`/`response`. A row without a prompt column has an empty prompt.
- **Truncation keeps the response.** A sequence longer than `max_length` loses prompt tokens first, from the left
  (the prompt's leading special tokens, e.g. `[CLS]` or `<bos>`, are kept); only when the response alone does not fit
  is it cut on the right, keeping its end token, and it never becomes empty.
- **Padding** uses `trl.trainer.utils.pad`, on the right, with the tokenizer's pad token (eos when it has none).
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import apply_chat_template, is_conversational, maybe_apply_chat_template
from trl.trainer.utils import pad


logger = logging.get_logger(__name__)

PROMPT_COLUMN = "prompt"
PREFERENCE_COLUMNS = ("chosen", "rejected")
RESPONSE_COLUMNS = ("completion", "response")
"""Columns holding the response of a row to score, in the order they are looked up (TRL's name first)."""


def end_of_sequence_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token closing a response: eos for decoders, sep for BERT-style encoders (none if the tokenizer has neither)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the pad token, or eos when the tokenizer has no pad token."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("The tokenizer has neither a pad token nor an eos token; set `tokenizer.pad_token` first.")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """
    `AutoTokenizer.from_pretrained(name_or_path)`, with one clear error when a local folder holds no tokenizer (where
    transformers would suggest installing sentencepiece or tiktoken).
    """
    from transformers import AutoTokenizer

    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{str(folder)!r} holds no tokenizer (none of {list(TOKENIZER_FILES)}): save it next to the model with "
            "`tokenizer.save_pretrained(folder)` (the trainer's `save_model` does), or pass the tokenizer explicitly."
        )
    return AutoTokenizer.from_pretrained(name_or_path)


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, Mapping) and "role" in m for m in value)


def _check_text(value: Any, column: str, allow_empty_list: bool = False) -> None:
    if isinstance(value, str) or _is_messages(value) or (allow_empty_list and value == []):
        return
    raise ValueError(
        f"`{column}` must be a string or a list of chat messages ({{'role': ..., 'content': ...}}), got "
        f"{type(value).__name__} ({value!r:.80}). Convert the column to text, e.g. "
        f"`dataset.cast_column('{column}', datasets.Value('string'))`."
    )


def check_row_shape(row: Mapping[str, Any], columns: Sequence[str]) -> bool:
    """
    Check that the text fields of a row are all plain text or all chat messages, and return whether they are chat
    messages. A row that mixes the two cannot be tokenized consistently and gets a clear error.
    """
    present = [column for column in columns if column in row and row[column] is not None]
    for column in present:
        _check_text(row[column], column, allow_empty_list=column != PROMPT_COLUMN)
    kinds = {column: not isinstance(row[column], str) for column in present}
    if len(set(kinds.values())) > 1:
        plain = [column for column, chat in kinds.items() if not chat]
        chat = [column for column, chat in kinds.items() if chat]
        raise ValueError(
            f"The row mixes plain text ({plain}) with chat messages ({chat}). Use one shape for every field: all "
            "strings, or all lists of {'role': ..., 'content': ...} messages."
        )
    return any(kinds.values())


@dataclass
class Truncation:
    """
    What truncation to `max_length` cut, counted over many rows; [`Truncation.warn`] logs it once, with the counts.

    Args:
        max_length (`int` or `None`):
            The longest sequence, in tokens; `None` never truncates.
    """

    max_length: int | None
    rows: int = 0
    prompts_cut: int = 0
    responses_cut: int = 0
    _warned: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_length is not None and (
            isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2
        ):
            raise ValueError(
                f"`max_length` must be an int >= 2 (room for a prompt token and a response token) or None, got "
                f"{self.max_length!r}."
            )

    def apply(
        self,
        prompt_ids: list[int],
        response_ids: list[int],
        end_ids: Sequence[int],
        lead: int,
        longest_response: int | None = None,
    ) -> tuple[list[int], int]:
        """
        Cut one (prompt, response) to `max_length` and return `(input_ids, prompt_length)`. `longest_response` (the
        longest response sharing this prompt, e.g. both of a pair) makes the prompt cut the same for all of them.
        """
        self.rows += 1
        limit = self.max_length
        longest = max(len(response_ids), longest_response or 0)
        if limit is None or len(prompt_ids) + longest <= limit:
            return prompt_ids + response_ids, len(prompt_ids)
        # Keep the prompt's leading special tokens and at least one prompt token, then as much of its end as fits.
        floor = min(len(prompt_ids), lead + 1, limit - 1)
        room = max(limit - longest, floor)
        if room < len(prompt_ids):
            tail = prompt_ids[len(prompt_ids) - (room - lead) :] if room > lead else []
            prompt_ids = prompt_ids[: min(lead, room)] + tail
            self.prompts_cut += 1
        keep = limit - len(prompt_ids)
        if keep < len(response_ids):
            end = list(end_ids) if end_ids and response_ids[-len(end_ids) :] == list(end_ids) else []
            body = max(keep - len(end), 1)
            response_ids = response_ids[:body] + end if body + len(end) <= keep else response_ids[:keep]
            self.responses_cut += 1
        return prompt_ids + response_ids, len(prompt_ids)

    def warn(self, where: str) -> None:
        """Log one warning, the first time anything was cut, with the counts so far."""
        if self._warned or not (self.prompts_cut or self.responses_cut):
            return
        self._warned = True
        logger.warning(
            f"{where} truncated rows to max_length={self.max_length} tokens: {self.prompts_cut} of {self.rows} prompts "
            f"lost tokens from the left, and {self.responses_cut} responses that did not fit alone were cut on the "
            "right (their end token kept). Raise `max_length` to score whole sequences."
        )


class RowEncoder:
    r"""
    Turns (prompt, response) rows into token ids and `prompt_length`, with one tokenizer and one `max_length`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The reward model's tokenizer.
        max_length (`int`, *optional*):
            Truncate longer sequences (the prompt from the left first; see the module docstring). `None` keeps them.

    Example:

    ```python
    >>> encoder = RowEncoder(tokenizer, max_length=512)
    >>> input_ids, prompt_length = encoder.encode("How do I bake bread?", "Knead, proof, bake.")
    ```
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.end_ids = end_of_sequence_ids(tokenizer)
        self.pad_token_id = pad_token_id(tokenizer)
        self.truncation = Truncation(max_length)
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._prompt_cache: dict[str, list[int]] = {}

    @property
    def max_length(self) -> int | None:
        return self.truncation.max_length

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text and not special:
            return []
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _lead(self, prompt_ids: list[int]) -> int:
        lead = 0
        while lead < len(prompt_ids) and prompt_ids[lead] in self._special_ids:
            lead += 1
        return lead if lead < len(prompt_ids) else 0

    def _with_end(self, ids: list[int]) -> list[int]:
        end = self.end_ids
        return ids + end if end and ids[-len(end) :] != end else ids

    def tokenize(self, prompt: Any, response: Any) -> tuple[list[int], list[int], bool]:
        """
        `(prompt_ids, response_ids, conversational)` of one row, untruncated. The response ids include the end token
        of a standard row.
        """
        conversational = check_row_shape({"prompt": prompt, "completion": response}, ("prompt", "completion"))
        if conversational:
            if isinstance(prompt, str) or prompt is None:  # a response in messages with no prompt
                prompt = []
            rendered = apply_chat_template({"prompt": prompt, "completion": response or []}, self.tokenizer)
            return self._tokenize(rendered["prompt"], False), self._tokenize(rendered["completion"], False), True
        prompt = "" if prompt is None else prompt
        if prompt in self._prompt_cache:
            prompt_ids = self._prompt_cache[prompt]
        else:
            prompt_ids = self._prompt_cache.setdefault(prompt, self._tokenize(prompt, True))
        response_ids = self._tokenize("" if response is None else response, False)
        full = self._with_end(prompt_ids + response_ids)
        return list(prompt_ids), full[len(prompt_ids) :], False

    def encode(self, prompt: Any, response: Any, longest_response: int | None = None) -> tuple[list[int], int]:
        """
        `(input_ids, prompt_length)` of one (prompt, response) row, truncated to `max_length`. With
        `longest_response` (in tokens), the prompt is cut as for a response of that length, so that rows sharing a
        prompt keep the same prompt tokens.
        """
        prompt_ids, response_ids, _ = self.tokenize(prompt, response)
        ids, prompt_length = self.truncation.apply(
            prompt_ids, response_ids, self.end_ids, self._lead(prompt_ids), longest_response
        )
        if not ids:  # an empty prompt and response, with a tokenizer adding nothing: score one end / pad token
            ids = list(self.end_ids) or [self.pad_token_id]
        return ids, prompt_length

    def encode_many(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[tuple[list[int], int]]:
        """[`RowEncoder.encode`] for aligned lists of prompts and responses."""
        if len(prompts) != len(responses):
            raise ValueError(
                f"Got {len(prompts)} prompts and {len(responses)} responses; pass one prompt per response."
            )
        return [self.encode(prompt, response) for prompt, response in zip(prompts, responses)]

    def encode_preference(self, example: Mapping[str, Any], allow_empty: bool = False) -> dict[str, Any]:
        """
        `chosen_ids`, `rejected_ids` and `prompt_length` of one preference pair, as [`MoERewardTrainer`] trains on it.

        Both rows start with the same prompt tokens. Without a `prompt` column, `prompt_length` is the longest common
        token prefix of the two sequences. Empty responses are refused (a training pair needs text on both sides),
        unless `allow_empty=True` (scoring real data: an empty response is scored as its end token).
        """
        conversational = check_row_shape(example, (PROMPT_COLUMN, *PREFERENCE_COLUMNS))
        for column in PREFERENCE_COLUMNS:
            if column not in example or example[column] is None:
                raise ValueError(
                    f"A preference pair needs `chosen` and `rejected`, got the columns {sorted(example)}."
                )
            text = example[column]
            content = text if isinstance(text, str) else " ".join(str(m.get("content", "")) for m in text)
            if not content.strip() and not allow_empty:
                raise ValueError(
                    f"Found an empty `{column}` response (prompt: {str(example.get('prompt', ''))[:80]!r}). Remove "
                    "empty responses from the dataset, e.g. `dataset.filter(lambda x: x['chosen'].strip() and "
                    "x['rejected'].strip())`."
                )
        if PROMPT_COLUMN in example and example[PROMPT_COLUMN] is not None:
            prompt = example[PROMPT_COLUMN]
            # Both rows keep the same prompt tokens: the prompt is cut for the longer response of the pair.
            longest = None
            if self.max_length is not None:
                longest = max(len(self.tokenize(prompt, example[column])[1]) for column in PREFERENCE_COLUMNS)
            chosen, prompt_length = self.encode(prompt, example["chosen"], longest)
            rejected, _ = self.encode(prompt, example["rejected"], longest)
            return {"chosen_ids": chosen, "rejected_ids": rejected, "prompt_length": prompt_length}
        rendered = maybe_apply_chat_template({key: example[key] for key in PREFERENCE_COLUMNS}, self.tokenizer)
        chosen = self._tokenize(rendered["chosen"], not conversational)
        rejected = self._tokenize(rendered["rejected"], not conversational)
        if not conversational:
            chosen, rejected = self._with_end(chosen), self._with_end(rejected)
        return {
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "prompt_length": common_prefix_length(chosen, rejected),
        }


def common_prefix_length(ids: Sequence[int], other_ids: Sequence[int]) -> int:
    """Number of leading tokens two sequences share: the implicit prompt of a pair without a `prompt` column."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length


def response_column(columns: Sequence[str]) -> str:
    """The column holding the response of rows to score: TRL's `completion`, else the legacy `response`."""
    for column in RESPONSE_COLUMNS:
        if column in columns:
            return column
    raise ValueError(
        f"The rows have no response column (they have {list(columns)}): name it `completion` (TRL's prompt/completion "
        "format) or `response`, next to an optional `prompt`."
    )


def pad_batch(sequences: Sequence[Sequence[int]], padding_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into `(input_ids, attention_mask)` with `trl.trainer.utils.pad`."""
    input_ids = pad([torch.tensor(ids, dtype=torch.long) for ids in sequences], padding_value=padding_value)
    attention_mask = pad([torch.ones(len(ids), dtype=torch.long) for ids in sequences], padding_value=0)
    return input_ids, attention_mask


def tokenize_preference(example: dict[str, Any], processing_class: PreTrainedTokenizerBase) -> dict[str, Any]:
    """`datasets.map` function of [`MoERewardTrainer`]: [`RowEncoder.encode_preference`] without truncation."""
    return RowEncoder(processing_class).encode_preference(example)


__all__ = [
    "RowEncoder",
    "Truncation",
    "check_row_shape",
    "common_prefix_length",
    "end_of_sequence_ids",
    "load_tokenizer",
    "is_conversational",
    "pad_batch",
    "pad_token_id",
    "response_column",
    "tokenize_preference",
]
