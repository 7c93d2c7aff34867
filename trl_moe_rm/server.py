"""
An HTTP reward server for personalized MoE rewards: OpenRLHF's remote reward protocol, plus a native form for the
clients of this package ([`~trl_moe_rm.remote.RemotePersonalizedReward`] for TRL, `compute_score` for verl).

```bash
pip install 'trl-moe-rm[serve]'
trl-moe-rm serve --model my-moe-rm --labels_are_user_ids        # or: python -m trl_moe_rm.server --model ...
```

`POST /get_reward` takes one of two bodies, with one entry per row in every list:

- OpenRLHF's: `{"query": [str], "prompts": [str], "labels": [...]}`, where `query` is the decoded prompt + response.
  Leading and trailing runs of pad / eos tokens are removed from it (as OpenRLHF's own `serve_rm.py` did), it is
  split into prompt and response with `prompts` (the router reads the prompt only), and a prompt rendered with the
  reward tokenizer's chat template is read back into messages, so that it is scored as [`PersonalizedReward`] scores
  conversational rows.
- Native: `{"prompts": [str | messages], "completions": [str | messages]}`, scored exactly as
  `PersonalizedReward.score(prompts, completions, user_ids)` scores them in-process.

Either body may carry `"user_ids": [str | int | null]`; with `--labels_are_user_ids` the OpenRLHF `labels` are the
user ids instead (an unmodified OpenRLHF run with `--label_key user_id`). The answer is
`{"rewards": [float], "scores": [float], "extra_logs": {"fallback": [0. | 1.], ...}}`: `rewards` are the personalized
rewards (normalized and clipped when configured), `scores = sigmoid(rewards)` lie in [0, 1], and `extra_logs` holds
per-row lists of numbers, as OpenRLHF expects. No reward is ever NaN or infinite: [`PersonalizedReward`] refuses them,
and the request fails (500) with a message naming its rows.
"""

import argparse
import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

API_KEY_ENV = "TRL_MOE_RM_API_KEY"
NORMALIZATION_FILENAME = "reward_normalization.json"
SERVE_DESCRIPTION = (
    "Serve a MoE reward model and its users' profiles over HTTP: POST /get_reward speaks OpenRLHF's remote reward "
    "protocol (--remote_rm_url) and the native form of RemotePersonalizedReward (TRL) and compute_score (verl); "
    "GET /health and GET /metrics. Concurrent requests are merged into one forward pass (dynamic batching). Binds "
    f"127.0.0.1 by default; set {API_KEY_ENV} to require `Authorization: Bearer <key>`."
)
SUPPORTED_FIELDS = ("query", "prompts", "completions", "labels", "user_ids")
MAX_TRACKED_USERS = 100  # distinct users kept in the per-user metrics; later users are counted under "_other"
LATENCY_WINDOW = 10_000  # recent requests and batches behind the latency percentiles


class RequestError(Exception):
    """A request that cannot be answered: an HTTP status and a one-line `detail` naming the problem and the fix."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _rows(indices: Sequence[int]) -> str:
    """`rows [0, 3, 5]`, with at most 10 indices listed."""
    shown = ", ".join(str(index) for index in indices[:10])
    more = f", ... ({len(indices)} rows)" if len(indices) > 10 else ""
    return f"row{'s' if len(indices) > 1 else ''} [{shown}{more}]"


# ---------------------------------------------------------------------------------------------------- query text
def _lstrip_tokens(text: str, tokens: Sequence[str]) -> str:
    """`text` without its leading run of `tokens` (linear time, whatever the text)."""
    start = 0
    while (token := next((token for token in tokens if text.startswith(token, start)), None)) is not None:
        start += len(token)
    return text[start:]


def _rstrip_tokens(text: str, tokens: Sequence[str]) -> str:
    """`text` without its trailing run of `tokens` (linear time, whatever the text)."""
    end = len(text)
    while (token := next((token for token in tokens if text.endswith(token, 0, end)), None)) is not None:
        end -= len(token)
    return text[:end]


def _split_once(text: str, marker: str) -> tuple[str, str]:
    before, found, after = text.partition(marker)
    if not found or marker in after:
        raise ValueError(f"the chat template does not render {marker!r} exactly once")
    return before, after


class ChatTemplateText:
    r"""
    Reads text rendered with a tokenizer's chat template (with its special tokens, and the generation prompt) back into
    the messages it was rendered from, so that it can be scored as a conversational row.

    The template is probed once with placeholder messages, which gives the text before the first user message (with
    and without a system message), the separators between turns, the generation prompt and the end of an assistant
    turn. A prompt is cut along those, and the messages found are kept only if the template renders them back to
    exactly the same text; otherwise (another template, plain text) [`parse`] returns `None`.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The reward model's tokenizer. Without a chat template nothing is parsed.
    """

    _SYSTEM, _USER, _ASSISTANT, _NEXT_USER = (
        "TRLMOERMSYSTEM0",
        "TRLMOERMUSER1",
        "TRLMOERMASSISTANT2",
        "TRLMOERMUSER3",
    )

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._heads: list[tuple[str, str | None]] = []  # (text before the first message, system-to-user separator)
        self._separators = {"user": "", "assistant": ""}  # after a user turn / after an assistant turn
        self._tail = ""
        self.assistant_end = ""
        self._assistant_end_lead = ""
        if getattr(tokenizer, "chat_template", None):
            try:
                self._probe()
            except Exception as error:  # a template that refuses the probe conversation: plain text only
                logger.warning(f"Chat-templated prompts will be scored as plain text: {error}.")
                self._heads = []
        self._parse_cached = functools.lru_cache(maxsize=4096)(self._parse)

    @property
    def available(self) -> bool:
        """Whether chat-templated prompts can be read back into messages."""
        return bool(self._heads)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _probe(self) -> None:
        def user(text: str) -> dict[str, str]:
            return {"role": "user", "content": text}

        assistant = {"role": "assistant", "content": self._ASSISTANT}
        head, self._tail = _split_once(self._render([user(self._USER)], True), self._USER)
        conversation = self._render([user(self._USER), assistant, user(self._NEXT_USER)], True)
        conversation_head, rest = _split_once(conversation, self._USER)
        self._separators["user"], rest = _split_once(rest, self._ASSISTANT)
        self._separators["assistant"], tail = _split_once(rest, self._NEXT_USER)
        if conversation_head != head or tail != self._tail or not all(self._separators.values()):
            raise ValueError("its turns are not rendered one after the other")
        self._heads = [(head, None)]
        with contextlib.suppress(Exception):  # templates without a system role (e.g. Gemma's) raise here
            with_system = self._render([{"role": "system", "content": self._SYSTEM}, user(self._USER)], True)
            system_head, rest = _split_once(with_system, self._SYSTEM)
            system_separator, tail = _split_once(rest, self._USER)
            if system_separator and tail == self._tail:
                self._heads.insert(0, (system_head, system_separator))
        ending = _split_once(self._render([user(self._USER), assistant], False), self._ASSISTANT)[1]
        if ending.split():
            self.assistant_end = ending.split()[0]
            self._assistant_end_lead = ending[: ending.index(self.assistant_end)]

    def parse(self, text: str) -> list[dict[str, str]] | None:
        """
        The messages that the chat template renders (with the generation prompt) to exactly `text`, else `None`.

        Args:
            text (`str`):
                A prompt, e.g. `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`.
        """
        if not self._heads:
            return None
        messages = self._parse_cached(text)
        return None if messages is None else [dict(message) for message in messages]

    def _parse(self, text: str) -> tuple[dict[str, str], ...] | None:
        for head, system_separator in self._heads:
            messages = self._cut(text, head, system_separator)
            if messages is not None and self._render(messages, True) == text:
                return tuple(messages)
        return None

    def _cut(self, text: str, head: str, system_separator: str | None) -> list[dict[str, str]] | None:
        if not text.startswith(head) or not text.endswith(self._tail) or len(text) < len(head) + len(self._tail):
            return None
        body = text[len(head) : len(text) - len(self._tail)]
        messages = []
        if system_separator is not None:
            system, found, body = body.partition(system_separator)
            if not found:
                return None
            messages.append({"role": "system", "content": system})
        role, start = "user", 0
        while True:
            end = body.find(self._separators[role], start)
            messages.append({"role": role, "content": body[start : len(body) if end < 0 else end]})
            if end < 0:
                break
            start = end + len(self._separators[role])
            role = "assistant" if role == "user" else "user"
        return messages if role == "user" else None

    def completion(self, response: str) -> list[dict[str, str]]:
        """
        The assistant message of a response that followed a chat-templated prompt: the text up to the end of the
        assistant's turn (e.g. `<|im_end|>`), which the template adds back when the row is rendered.
        """
        if self.assistant_end and self.assistant_end in response:
            response = response[: response.index(self.assistant_end)]
            if self._assistant_end_lead and response.endswith(self._assistant_end_lead):
                response = response[: -len(self._assistant_end_lead)]
        return [{"role": "assistant", "content": response}]


class QueryText:
    r"""
    Turns OpenRLHF's `query` (the decoded prompt + response, special tokens included) into the (prompt, completion) that
    [`PersonalizedReward`] scores.

    Leading and trailing runs of `strip_tokens` are removed first, as OpenRLHF's `serve_rm.py` did from 0.4.0 to 0.8.2
    (its `strip_sequence`, for left-padded queries; later OpenRLHF clients send no padding, and then this changes
    nothing). The query must then
    start with its prompt: the rest is the response. A prompt that the reward tokenizer's chat template renders from
    messages is scored as those messages, and the response as the assistant's message (cut at the end of its turn);
    any other prompt is scored as plain text.

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            The reward model's tokenizer.
        strip_tokens (`Sequence[str]`, *optional*):
            Token strings to strip. Defaults to the tokenizer's pad and eos tokens; pass the policy's when its tokenizer
            differs from the reward model's.
    """

    def __init__(self, tokenizer: Any, strip_tokens: Sequence[str] | None = None) -> None:
        if strip_tokens is None:
            strip_tokens = [tokenizer.pad_token, tokenizer.eos_token]
        self.strip_tokens = sorted({token for token in strip_tokens if token}, key=len, reverse=True)
        self.chat = ChatTemplateText(tokenizer)

    def split(self, query: str, prompt: str) -> tuple[Any, Any, bool] | None:
        """
        `(prompt, completion, chat_templated)` of one row, or `None` when the query does not start with its prompt.

        Args:
            query (`str`):
                The decoded prompt and response.
            prompt (`str`):
                The prompt text, as OpenRLHF sends it in `prompts`.
        """
        text = _lstrip_tokens(query, self.strip_tokens)
        if not text.startswith(prompt):
            return None
        response = _rstrip_tokens(text[len(prompt) :], self.strip_tokens)
        messages = self.chat.parse(prompt)
        if messages is None:
            return prompt, response, False
        return messages, self.chat.completion(response), True


# ------------------------------------------------------------------------------------------------- normalization
@dataclass(frozen=True)
class RewardNormalization:
    r"""
    A fixed affine map of the rewards, `(r - mean) / std`, with statistics computed once on a reference set and stored
    with the model, so that every replica of the server gives the same scale.

    Args:
        mean (`float`):
            Mean reward of the reference set.
        std (`float`):
            Population standard deviation of the reference set's rewards (`1.0` is used when it is below `1e-8`).
        count (`int`):
            Number of reference rows.
        model_fingerprint (`str`):
            [`~trl_moe_rm.configuration_moe_reward.config_fingerprint`] of the model the statistics belong to.
        reference_sha256 (`str`, *optional*):
            SHA-256 of the reference file.
    """

    mean: float
    std: float
    count: int
    model_fingerprint: str
    reference_sha256: str | None = None

    def apply(self, reward: float) -> float:
        """The normalized reward."""
        return (reward - self.mean) / (self.std if self.std > 1e-8 else 1.0)


def _read_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--normalize_with {str(path)!r} is not valid JSON ({error}).") from None


def load_normalization(
    path: str | os.PathLike, reward: Any, model_dir: str | os.PathLike | None
) -> RewardNormalization:
    r"""
    The normalization statistics of `--normalize_with FILE`.

    `FILE` is either a reference set (`.jsonl`, or a `.json` list, of rows with `prompt`, `completion` or `response`,
    and optionally `user_id`), or a statistics file written by an earlier call (`reward_normalization.json`). The
    statistics of a reference set are computed once, by scoring every row for its user, and written to
    `<model_dir>/reward_normalization.json`, which later calls (other replicas) reuse as long as the reference file is
    unchanged.

    Args:
        path (`str` or `os.PathLike`):
            The reference set or the statistics file.
        reward ([`PersonalizedReward`]):
            The reward being served.
        model_dir (`str` or `os.PathLike`, *optional*):
            Where the statistics are stored (the model's folder); `None` (a model from the Hub) keeps them in memory.

    Raises:
        `FileNotFoundError`: `path` does not exist.
        `ValueError`: the file holds neither rows nor statistics, or the statistics belong to another model.
    """
    from .configuration_moe_reward import config_fingerprint
    from .io_utils import atomic_write_text
    from .rewards import RunningMeanStd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--normalize_with {str(path)!r} does not exist.")
    fingerprint = config_fingerprint(reward.model.config)
    content = _read_json(path)
    if isinstance(content, dict):
        if not {"mean", "std", "count", "model_fingerprint"} <= set(content):
            raise ValueError(
                f"--normalize_with {str(path)!r} is a JSON object without `mean`, `std`, `count` and "
                "`model_fingerprint`: pass a reference set (rows with `prompt` and `completion`) or a "
                f"{NORMALIZATION_FILENAME} written by the server."
            )
        stats = RewardNormalization(**{key: content.get(key) for key in RewardNormalization.__dataclass_fields__})
        if stats.model_fingerprint != fingerprint:
            raise ValueError(
                f"--normalize_with {str(path)!r} holds the statistics of another model (fingerprint "
                f"{stats.model_fingerprint[:12]}, the served model's is {fingerprint[:12]}): compute them again from "
                "the reference set."
            )
        return stats
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    stored = None if model_dir is None else Path(model_dir) / NORMALIZATION_FILENAME
    if stored is not None and stored.is_file():
        previous = json.loads(stored.read_text(encoding="utf-8"))
        if previous.get("reference_sha256") == sha256 and previous.get("model_fingerprint") == fingerprint:
            logger.info(f"Reusing the normalization statistics in {stored} (same reference set).")
            return RewardNormalization(**previous)
    if not isinstance(content, list) or not content or not all(isinstance(row, dict) for row in content):
        raise ValueError(f"--normalize_with {str(path)!r} holds no rows: write one JSON object per reference row.")
    completion_key = "completion" if "completion" in content[0] else "response"
    missing = [index for index, row in enumerate(content) if "prompt" not in row or completion_key not in row]
    if missing:
        raise ValueError(
            f"--normalize_with {str(path)!r}: {_rows(missing)} lack `prompt` or `{completion_key}`; every reference "
            "row needs both (and optionally `user_id`)."
        )
    rewards = reward.score(
        [row["prompt"] for row in content],
        [row[completion_key] for row in content],
        [row.get("user_id") for row in content],
    )
    running = RunningMeanStd()
    running.update(rewards)
    stats = RewardNormalization(running.mean, running.std, running.count, fingerprint, sha256)
    if stored is None:
        logger.warning("The model is not a local folder: the normalization statistics are kept in memory only.")
        return stats
    try:
        atomic_write_text(stored, json.dumps(asdict(stats), indent=2) + "\n")
        logger.info(f"Normalization statistics of {path} ({stats.count} rows) stored in {stored}.")
    except OSError as error:
        logger.warning(f"Could not store the normalization statistics in {stored} ({error}); using them in memory.")
    return stats


# ------------------------------------------------------------------------------------------------------- metrics
def _sigmoid(value: float) -> float:
    """The logistic function, without overflow for large |value|."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def rank(quantile: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.ceil(quantile * len(ordered)) - 1)], 3)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99), "max": round(ordered[-1], 3)}


def _count(counts: dict[str, int], key: str, value: int = 1) -> None:
    if key not in counts and len(counts) >= MAX_TRACKED_USERS:
        key = "_other"
    counts[key] = counts.get(key, 0) + value


@dataclass
class ServerMetrics:
    """Counters of the server, read by `GET /metrics` and the periodic log line (updated on the event loop only)."""

    started: float = field(default_factory=time.monotonic)
    requests: int = 0
    rows: int = 0
    fallback_rows: int = 0
    chat_rows: int = 0  # rows scored as chat messages
    errors: dict[str, int] = field(default_factory=dict)
    rows_by_user: dict[str, int] = field(default_factory=dict)
    fallbacks_by_user: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    batch_rows: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    forward_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def record_batch(self, rows: int, seconds: float) -> None:
        self.batches += 1
        self.batch_rows += rows
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        self.forward_ms.append(seconds * 1000)

    def snapshot(self) -> dict[str, Any]:
        """The JSON of `GET /metrics`."""
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests": {"ok": self.requests, "errors": dict(self.errors), "in_flight": self.in_flight},
            "rows": {
                "total": self.rows,
                "fallback": self.fallback_rows,
                "chat": self.chat_rows,
                "by_user": dict(self.rows_by_user),
                "fallbacks_by_user": dict(self.fallbacks_by_user),
            },
            "batches": {
                "total": self.batches,
                "mean_rows": round(self.batch_rows / self.batches, 3) if self.batches else 0.0,
                "max_rows": max(self.batch_sizes, default=0),
                "rows_histogram": {str(size): count for size, count in sorted(self.batch_sizes.items())},
            },
            "latency_ms": _percentiles(self.latencies_ms),
            "forward_ms": _percentiles(self.forward_ms),
        }


# ---------------------------------------------------------------------------------------------- dynamic batching
@dataclass
class _Job:
    prompts: list[Any]
    completions: list[Any]
    user_ids: list[Any]
    future: asyncio.Future
    arrival: float


class DynamicBatcher:
    r"""
    Merges concurrent scoring requests into one forward pass, and splits the rewards back.

    A batch closes when it holds `max_batch_size` rows, or `max_wait_ms` after its oldest request arrived; a request
    never is split (one larger than `max_batch_size` is a batch on its own). Batches run one at a time on a single
    worker thread, so one model forward runs at a time, while the event loop keeps accepting requests. When a merged
    batch fails, its requests are scored again one by one, so that a bad request fails alone.

    Args:
        score (`Callable[[list, list, list], list[float]]`):
            Scores `(prompts, completions, user_ids)` rows.
        max_batch_size (`int`):
            Most rows merged into one batch.
        max_wait_ms (`float`):
            Longest wait for more requests after the first one of a batch arrived.
        metrics ([`ServerMetrics`]):
            Where batch sizes and forward times are recorded.
    """

    def __init__(
        self,
        score: Callable[[list, list, list], list[float]],
        max_batch_size: int,
        max_wait_ms: float,
        metrics: ServerMetrics,
    ) -> None:
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Start the batching loop (on the running event loop)."""
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-moe-rm-forward")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop the loop; requests still queued get an error."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._executor.shutdown(wait=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, prompts: list[Any], completions: list[Any], user_ids: list[Any]) -> list[float]:
        """The rewards of one request's rows, scored in a batch with the requests that arrive around it."""
        loop = asyncio.get_running_loop()
        job = _Job(prompts, completions, user_ids, loop.create_future(), loop.time())
        self._pending.append(job)
        self._pending_rows += len(prompts)
        self._wakeup.set()
        return await job.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._pending[0].arrival + self.max_wait
            while self._pending_rows < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            jobs = self._take()
            if not jobs:
                continue
            start = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._score_jobs, jobs)
            self.metrics.record_batch(sum(len(job.prompts) for job in jobs), time.perf_counter() - start)
            for job, result in zip(jobs, results):
                if job.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def _take(self) -> list[_Job]:
        jobs, rows = [], 0
        while self._pending:
            job = self._pending[0]
            if jobs and rows + len(job.prompts) > self.max_batch_size:
                break
            self._pending.popleft()
            self._pending_rows -= len(job.prompts)
            if not job.future.cancelled():
                jobs.append(job)
                rows += len(job.prompts)
        return jobs

    def _score_jobs(self, jobs: list[_Job]) -> list[list[float] | BaseException]:
        try:
            rewards = self.score(
                [prompt for job in jobs for prompt in job.prompts],
                [completion for job in jobs for completion in job.completions],
                [user_id for job in jobs for user_id in job.user_ids],
            )
        except Exception as error:
            if len(jobs) == 1:
                return [error]
            return [self._score_jobs([job])[0] for job in jobs]
        results, start = [], 0
        for job in jobs:
            results.append(rewards[start : start + len(job.prompts)])
            start += len(job.prompts)
        return results


# ----------------------------------------------------------------------------------------------------- requests
def _check_list(body: dict[str, Any], name: str, length: int | None) -> list[Any]:
    value = body[name]
    if not isinstance(value, list):
        raise RequestError(422, f"`{name}` must be a JSON list (one entry per row), got {type(value).__name__}.")
    if length is not None and len(value) != length:
        raise RequestError(
            422, f"`{name}` has {len(value)} entries but there are {length} rows: send one entry per row."
        )
    return value


def _check_strings(values: list[Any], name: str) -> None:
    bad = [index for index, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        raise RequestError(422, f"`{name}` entries must be strings; {_rows(bad)} are not.")


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
            for message in value
        )
    )


def _check_user_ids(values: list[Any], name: str) -> None:
    bad = [
        index
        for index, value in enumerate(values)
        if not (value is None or isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)))
    ]
    if bad:
        raise RequestError(
            422, f"`{name}` entries must be user ids (strings, integers or null); {_rows(bad)} are not."
        )


@dataclass
class ServeOptions:
    r"""
    How the server reads requests and shapes its answers.

    Args:
        labels_are_user_ids (`bool`, *optional*, defaults to `False`):
            Read each row's user from OpenRLHF's `labels` (an OpenRLHF run with `--label_key user_id`).
        max_batch_size (`int`, *optional*, defaults to `64`):
            Most rows merged into one forward pass.
        max_wait_ms (`float`, *optional*, defaults to `5.0`):
            Longest wait for more requests to merge after the first one of a batch arrived.
        max_rows_per_request (`int`, *optional*, defaults to `8192`):
            Larger requests are refused (413).
        max_request_bytes (`int`, *optional*, defaults to `67108864`):
            Larger request bodies are refused (413).
        strip_tokens (`Sequence[str]`, *optional*):
            Token strings stripped from the ends of OpenRLHF queries; defaults to the reward tokenizer's pad and eos.
        normalization ([`RewardNormalization`], *optional*):
            Map each reward to `(r - mean) / std`.
        clip (`float`, *optional*):
            Clip the (normalized) rewards to `[-clip, clip]`.
        log_interval (`float`, *optional*, defaults to `60.0`):
            Seconds between progress log lines (`0` for none).
    """

    labels_are_user_ids: bool = False
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_rows_per_request: int = 8192
    max_request_bytes: int = 64 * 1024 * 1024
    strip_tokens: Sequence[str] | None = None
    normalization: RewardNormalization | None = None
    clip: float | None = None
    log_interval: float = 60.0


class RewardService:
    r"""
    What `POST /get_reward` does, apart from HTTP: validates a request body, turns it into rows, scores them through
    the [`DynamicBatcher`] and builds the answer.

    Args:
        reward ([`PersonalizedReward`]):
            The reward served. Its `strict` decides whether unknown users are refused.
        options ([`ServeOptions`]):
            Limits, user channel, normalization.
    """

    def __init__(self, reward: Any, options: ServeOptions) -> None:
        from .rewards import is_missing_user

        self.reward = reward
        self.options = options
        self.queries = QueryText(reward.tokenizer, options.strip_tokens)
        self.metrics = ServerMetrics()
        self.batcher = DynamicBatcher(self._score, options.max_batch_size, options.max_wait_ms, self.metrics)
        self._is_missing_user = is_missing_user

    def _score(self, prompts: list[Any], completions: list[Any], user_ids: list[Any]) -> list[float]:
        return self.reward.score(prompts, completions, user_ids).tolist()

    def parse(self, body: Any) -> tuple[list[Any], list[Any], list[Any], int]:
        """`(prompts, completions, user_ids, chat_rows)` of a request body, or a [`RequestError`]."""
        if not isinstance(body, dict):
            raise RequestError(422, f"The request body must be a JSON object, got a JSON {type(body).__name__}.")
        unknown = sorted(set(body) - set(SUPPORTED_FIELDS))
        if unknown:
            raise RequestError(422, f"Unknown field(s) {unknown}: the fields are {list(SUPPORTED_FIELDS)}.")
        if ("query" in body) == ("completions" in body):
            raise RequestError(
                422,
                "Send either `query` and `prompts` (OpenRLHF: the decoded prompt + response, and the prompt) or "
                "`prompts` and `completions`, " + ("not both." if "query" in body else "got neither."),
            )
        if "prompts" not in body:
            raise RequestError(
                422, "`prompts` is missing: send each row's prompt, so that the router reads the prompt only."
            )
        if "query" in body:
            queries = _check_list(body, "query", None)
            rows = len(queries)
        else:
            completions = _check_list(body, "completions", None)
            rows = len(completions)
        if rows > self.options.max_rows_per_request:
            raise RequestError(
                413,
                f"The request has {rows} rows; this server takes at most {self.options.max_rows_per_request} per "
                "request (--max_rows_per_request): split it.",
            )
        prompts = _check_list(body, "prompts", rows)
        user_ids = self._user_ids(body, rows)
        if "query" in body:
            _check_strings(queries, "query")
            _check_strings(prompts, "prompts")
            return self._split_queries(queries, prompts, user_ids)
        bad = [
            index
            for index, (prompt, completion) in enumerate(zip(prompts, completions))
            if not (
                (isinstance(prompt, str) and isinstance(completion, str))
                or (_is_messages(prompt) and _is_messages(completion))
            )
        ]
        if bad:
            raise RequestError(
                422,
                f"{_rows(bad)}: a prompt and its completion must both be strings, or both lists of chat messages "
                "({'role': str, 'content': str}).",
            )
        return prompts, completions, user_ids, sum(not isinstance(prompt, str) for prompt in prompts)

    def _user_ids(self, body: dict[str, Any], rows: int) -> list[Any]:
        labels = _check_list(body, "labels", rows) if "labels" in body else None
        if "user_ids" in body:
            if self.options.labels_are_user_ids and labels is not None:
                raise RequestError(
                    422,
                    "Both `user_ids` and `labels` were sent, and this server reads the users from `labels` "
                    "(--labels_are_user_ids): send the users in one of them.",
                )
            user_ids = _check_list(body, "user_ids", rows)
            _check_user_ids(user_ids, "user_ids")
            return user_ids
        if self.options.labels_are_user_ids:
            if labels is None:
                raise RequestError(
                    422,
                    "`labels` is missing: this server reads each row's user from `labels` (--labels_are_user_ids; "
                    "OpenRLHF sends them with --label_key user_id), or send `user_ids`.",
                )
            _check_user_ids(labels, "labels")
            return labels
        return [None] * rows

    def _split_queries(
        self, queries: list[str], prompts: list[str], user_ids: list[Any]
    ) -> tuple[list[Any], list[Any], list[Any], int]:
        split = [self.queries.split(query, prompt) for query, prompt in zip(queries, prompts)]
        bad = [index for index, row in enumerate(split) if row is None]
        if bad:
            raise RequestError(
                422,
                f"The `query` of {_rows(bad)} does not start with its prompt (after removing leading pad/eos tokens): "
                "a query must be the decoded prompt followed by the response, as OpenRLHF sends it.",
            )
        return [row[0] for row in split], [row[1] for row in split], user_ids, sum(row[2] for row in split)

    async def answer(self, body: Any) -> dict[str, Any]:
        """The JSON answer to one request body, or a [`RequestError`]."""
        prompts, completions, user_ids, chat_rows = self.parse(body)
        fallbacks = [self._is_fallback(user_id) for user_id in user_ids]
        if self.reward.strict and any(fallbacks):
            unknown = [index for index, fallback in enumerate(fallbacks) if fallback]
            users = sorted({repr(user_ids[index]) for index in unknown})
            raise RequestError(
                422,
                f"No profile for user(s) {', '.join(users[:10])} ({_rows(unknown)}), and this server runs with "
                "--strict: fit their profiles (trl-moe-rm personalize), or serve without --strict to score them with "
                "the default routing.",
            )
        if not prompts:
            raw = []
        else:
            from .profiles import UnknownUserError

            try:
                raw = await self.batcher.submit(prompts, completions, user_ids)
            except UnknownUserError as error:  # a profile removed since the check above
                raise RequestError(422, str(error)) from None
            except Exception as error:
                logger.exception("Scoring failed")
                message = (str(error).splitlines() or [""])[0]
                raise RequestError(500, f"Scoring failed: {type(error).__name__}: {message}") from None
        rewards = self._transform(raw)
        extra_logs: dict[str, list[float]] = {"fallback": [float(fallback) for fallback in fallbacks]}
        if self.options.normalization is not None or self.options.clip is not None:
            extra_logs["raw_reward"] = raw
        self._record(user_ids, fallbacks, chat_rows)
        return {
            "rewards": rewards,
            "scores": [_sigmoid(reward) for reward in rewards],
            "extra_logs": extra_logs,
        }

    def _is_fallback(self, user_id: Any) -> bool:
        return self._is_missing_user(user_id) or user_id not in self.reward.profiles

    def _transform(self, rewards: list[float]) -> list[float]:
        if self.options.normalization is not None:
            rewards = [self.options.normalization.apply(reward) for reward in rewards]
        if self.options.clip is not None:
            rewards = [min(max(reward, -self.options.clip), self.options.clip) for reward in rewards]
        return rewards

    def _record(self, user_ids: list[Any], fallbacks: list[bool], chat_rows: int) -> None:
        metrics = self.metrics
        metrics.requests += 1
        metrics.rows += len(user_ids)
        metrics.fallback_rows += sum(fallbacks)
        metrics.chat_rows += chat_rows
        for user_id, fallback in zip(user_ids, fallbacks):
            key = "_missing" if self._is_missing_user(user_id) else str(user_id)
            _count(metrics.rows_by_user, key)
            if fallback:
                _count(metrics.fallbacks_by_user, key)

    async def log_progress(self) -> None:
        """Log one line per `log_interval` seconds: requests, rows, batch sizes, latency, fallbacks, errors."""
        metrics = self.metrics
        interval = self.options.log_interval
        previous = (metrics.requests, metrics.rows, metrics.batches, metrics.batch_rows, metrics.fallback_rows, 0)
        while True:
            await asyncio.sleep(interval)
            errors = sum(metrics.errors.values())
            current = (
                metrics.requests,
                metrics.rows,
                metrics.batches,
                metrics.batch_rows,
                metrics.fallback_rows,
                errors,
            )
            requests, rows, batches, batch_rows, fallbacks, new_errors = (a - b for a, b in zip(current, previous))
            previous = current
            latency = _percentiles(list(metrics.latencies_ms)[-requests:] if requests else [])
            logger.info(
                f"last {interval:g}s: {requests} requests ({requests / interval:.1f}/s), {rows} rows "
                f"({rows / interval:.1f}/s), {batches} batches of {batch_rows / max(batches, 1):.1f} rows on average, "
                f"latency p50 {latency.get('p50', 0):.1f} ms p99 {latency.get('p99', 0):.1f} ms, {fallbacks} fallback "
                f"rows, {new_errors} errors, {metrics.in_flight} in flight"
            )


async def _read_body(request: Any, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(
            413, f"The request body has {int(length)} bytes; this server takes at most {limit} (--max_request_mb)."
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body exceeds {limit} bytes (--max_request_mb): split the request.")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(reward: Any, options: ServeOptions | None = None, api_key: str | None = None) -> Any:
    r"""
    The FastAPI application of the reward server.

    Args:
        reward ([`PersonalizedReward`]):
            The reward served (its model, tokenizer, profiles and `strict` setting).
        options ([`ServeOptions`], *optional*):
            Limits, batching, user channel and normalization. Defaults to `ServeOptions()`.
        api_key (`str`, *optional*):
            When set, every request needs `Authorization: Bearer <api_key>` (else 401), compared in constant time.

    Returns:
        `fastapi.FastAPI`: serve it with uvicorn (see [`run_serve`]).
    """
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    service = RewardService(reward, options or ServeOptions())
    metrics = service.metrics
    expected = f"Bearer {api_key}".encode() if api_key else None

    def authenticate(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            _count(metrics.errors, "401")
            raise HTTPException(
                401,
                f"Missing or wrong API key: send `Authorization: Bearer <key>` with the server's {API_KEY_ENV}.",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        progress = asyncio.create_task(service.log_progress()) if service.options.log_interval > 0 else None
        try:
            yield
        finally:
            if progress is not None:
                progress.cancel()
            await service.batcher.stop()
            logger.info(f"Stopped after {metrics.requests} requests ({metrics.rows} rows).")

    app = FastAPI(
        title="trl-moe-rm reward server",
        lifespan=lifespan,
        dependencies=[Depends(authenticate)],
        docs_url=None,  # no unauthenticated routes
        redoc_url=None,
        openapi_url=None,
    )
    app.state.service = service

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        start = time.perf_counter()
        metrics.in_flight += 1
        try:
            body = await _read_body(request, service.options.max_request_bytes)
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise RequestError(400, f"The request body is not valid JSON ({error}).") from None
            answer = await service.answer(payload)
        except RequestError as error:
            _count(metrics.errors, str(error.status))
            return JSONResponse({"detail": error.detail}, status_code=error.status)
        finally:
            metrics.in_flight -= 1
        metrics.latencies_ms.append((time.perf_counter() - start) * 1000)
        return JSONResponse(answer)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "num_experts": reward.model.config.num_experts,
            "device": str(reward.device),
            "strict": reward.strict,
            "labels_are_user_ids": service.options.labels_are_user_ids,
            "chat_template": service.queries.chat.available,
            "normalization": asdict(service.options.normalization) if service.options.normalization else None,
            "clip": service.options.clip,
            "max_batch_size": service.options.max_batch_size,
        }

    @app.get("/metrics")
    async def get_metrics() -> dict[str, Any]:
        return metrics.snapshot()

    return app


# ---------------------------------------------------------------------------------------------------------- CLI
def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the arguments of `trl-moe-rm serve` to `parser` (and return it)."""
    parser.add_argument(
        "--model_name_or_path", "--model", dest="model", required=True,
        help="Directory (or Hub id) of a trained MoE reward model.",
    )  # fmt: skip
    parser.add_argument(
        "--profiles", default=None, help="ProfileStore directory (default: <model>/profiles, else no profiles)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: loopback only).")
    parser.add_argument("--port", type=int, default=5000, help="Port to listen on.")
    parser.add_argument(
        "--labels_are_user_ids",
        action="store_true",
        help="Read each row's user from OpenRLHF's `labels` (run OpenRLHF with --label_key user_id).",
    )
    parser.add_argument(
        "--strict", action="store_true", help="Refuse (422) rows of users without a profile instead of routing them."
    )
    parser.add_argument(
        "--allow_unauthenticated",
        action="store_true",
        help=f"Allow binding a non-loopback host without {API_KEY_ENV} (anyone who can reach it can use it).",
    )
    parser.add_argument("--max_batch_size", type=int, default=64, help="Most rows merged into one forward pass.")
    parser.add_argument(
        "--max_wait_ms", type=float, default=5.0, help="Longest wait for more requests to merge into a batch."
    )
    parser.add_argument("--max_rows_per_request", type=int, default=8192, help="Larger requests get 413.")
    parser.add_argument("--max_request_mb", type=float, default=64.0, help="Larger request bodies get 413.")
    parser.add_argument("--max_length", type=int, default=None, help="Truncate longer rows (tokens).")
    parser.add_argument(
        "--device", default=None, help="Device of the model (default: the first accelerator, else CPU)."
    )
    parser.add_argument(
        "--strip_tokens",
        nargs="+",
        default=None,
        help="Token strings stripped from the ends of OpenRLHF queries (default: the reward tokenizer's pad and eos; "
        "pass the policy's when its tokenizer differs).",
    )
    parser.add_argument(
        "--normalize_with",
        default=None,
        help=f"Reference set (.jsonl rows: prompt, completion, user_id) or {NORMALIZATION_FILENAME}: serve "
        "(r - mean) / std with its statistics, stored with the model so that every replica uses the same.",
    )
    parser.add_argument("--clip", type=float, default=None, help="Clip the (normalized) rewards to [-clip, clip].")
    parser.add_argument("--log_interval", type=float, default=60.0, help="Seconds between progress lines (0: none).")
    parser.add_argument(
        "--graceful_timeout", type=float, default=30.0, help="On shutdown, seconds left to in-flight requests."
    )
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_args(args: argparse.Namespace, api_key: str | None) -> None:
    if not _is_loopback(args.host) and not api_key and not args.allow_unauthenticated:
        raise ValueError(
            f"refusing to serve on {args.host!r} (not a loopback address) without authentication: set {API_KEY_ENV} "
            "(clients then send `Authorization: Bearer <key>`), or pass --allow_unauthenticated."
        )
    for name in ("max_batch_size", "max_rows_per_request"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}.")
    for name in ("max_wait_ms", "log_interval", "graceful_timeout"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not args.max_request_mb > 0:
        raise ValueError(f"--max_request_mb must be positive, got {args.max_request_mb}.")
    if args.clip is not None and not args.clip > 0:
        raise ValueError(f"--clip must be positive, got {args.clip}.")


def run_serve(args: argparse.Namespace) -> int:
    r"""
    Run the reward server until it is stopped (SIGINT / SIGTERM), finishing the requests in flight first (for at most
    `--graceful_timeout` seconds).

    Args:
        args (`argparse.Namespace`):
            The arguments of [`add_serve_arguments`].

    Returns:
        `int`: the exit status, `130` after SIGINT. After SIGTERM the process ends by that signal once the shutdown is
        done (uvicorn re-raises it), as a service manager expects.

    Raises:
        `ValueError`: invalid arguments, e.g. a non-loopback `--host` without an API key.
        `FileNotFoundError`: a missing model, profiles or normalization file.
        `SystemExit`: FastAPI or uvicorn is missing (`pip install 'trl-moe-rm[serve]'`).
    """
    api_key = os.environ.get(API_KEY_ENV) or None
    _check_args(args, api_key)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        raise SystemExit(f"trl-moe-rm serve needs {error.name}: pip install 'trl-moe-rm[serve]'.") from None
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from .rewards import PersonalizedReward

    model_dir = Path(args.model).expanduser()
    local = model_dir.is_dir()  # else a Hub id: its profiles/ are looked up there
    profiles = args.profiles
    if profiles is None and local and not (model_dir / "profiles").is_dir():
        logger.warning(f"No profiles in {args.model}/profiles and no --profiles: every row gets the default routing.")
        profiles = {}
    reward = PersonalizedReward.from_pretrained(
        args.model,
        profiles=profiles,
        strict=args.strict,
        batch_size=args.max_batch_size,
        device=args.device,
        max_length=args.max_length,
    )
    store = model_dir if local else None
    normalization = load_normalization(args.normalize_with, reward, store) if args.normalize_with else None
    options = ServeOptions(
        labels_are_user_ids=args.labels_are_user_ids,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_rows_per_request=args.max_rows_per_request,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        strip_tokens=args.strip_tokens,
        normalization=normalization,
        clip=args.clip,
        log_interval=args.log_interval,
    )
    app = create_app(reward, options, api_key=api_key)
    logger.info(
        f"Serving {args.model} ({reward.model.config.num_experts} experts, on {reward.device}) at "
        f"http://{args.host}:{args.port}/get_reward; authentication {'on' if api_key else 'off'}, "
        f"strict={args.strict}, labels_are_user_ids={args.labels_are_user_ids}, max_batch_size={args.max_batch_size}, "
        f"max_wait_ms={args.max_wait_ms:g}, chat template {'parsed' if app.state.service.queries.chat.available else 'none'}"
    )
    try:
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=args.graceful_timeout,
        )
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled, after the graceful shutdown
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m trl_moe_rm.server --model DIR ...`: the same as `trl-moe-rm serve`."""
    parser = add_serve_arguments(
        argparse.ArgumentParser(prog="python -m trl_moe_rm.server", description=SERVE_DESCRIPTION)
    )
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (FileNotFoundError, NotADirectoryError, PermissionError, ValueError, KeyError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


__all__ = [
    "ChatTemplateText",
    "DynamicBatcher",
    "QueryText",
    "RewardNormalization",
    "RewardService",
    "ServeOptions",
    "ServerMetrics",
    "add_serve_arguments",
    "create_app",
    "load_normalization",
    "run_serve",
]


if __name__ == "__main__":
    sys.exit(main())
