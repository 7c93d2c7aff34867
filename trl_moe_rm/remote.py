"""
Clients of the reward server (`trl-moe-rm serve`, see [`~trl_moe_rm.server`]):

- [`RemotePersonalizedReward`]: an `async` reward function for TRL's `GRPOTrainer` / `RLOOTrainer`, which shards each
  batch over one or more servers;
- [`compute_score`] and [`compute_score_batch`]: verl custom reward functions (the user and the prompt come from
  `extra_info`), scoring through the server or in-process.

The imports of this package are absolute, so that verl can also load this file by its path.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from .rewards import user_ids_from_columns


API_KEY_ENV = "TRL_MOE_RM_API_KEY"  # the same variable as the server's
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_NAME = "remote_personalized_reward"


class RemoteRewardError(RuntimeError):
    """The reward server refused a request, or no server answered it."""


def _endpoint(url: str) -> str:
    """`url` itself, or `url/get_reward` when it has no path (`http://host:5000`)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"Reward server URLs must start with http:// or https://, got {url!r}.")
    return url.rstrip("/") + "/get_reward" if urlsplit(url).path in ("", "/") else url


def _detail(response: Any) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class RemotePersonalizedReward:
    r"""
    An `async` TRL reward function that scores each completion for its user on reward servers (`trl-moe-rm serve`).

    TRL's `GRPOTrainer` and `RLOOTrainer` await it on their event loop, with the dataset's columns as keyword arguments;
    the user of each row is read from `user_column` (keep it with `remove_unused_columns=False`, the default of
    `GRPOConfig` / `RLOOConfig`). The rows of a call are split into one contiguous shard per URL, sent concurrently, and
    the rewards are put back in order. The server scores each (prompt, completion) exactly as an in-process
    [`PersonalizedReward`] does, text or chat messages alike.

    A shard that fails with a connection error, a timeout, or a 408 / 429 / 5xx answer is sent again after
    `backoff * 2**attempt` seconds, each retry to the next URL (so a dead replica is skipped); a 4xx answer is raised at
    once, with the server's explanation.

    Args:
        urls (`str` or `Sequence[str]`):
            The servers: `http://host:port` or the full `http://host:port/get_reward`.
        user_column (`str`, *optional*, defaults to `"user_id"`):
            The dataset column holding each row's user id.
        api_key (`str`, *optional*):
            Sent as `Authorization: Bearer <api_key>`. Defaults to the `TRL_MOE_RM_API_KEY` environment variable.
        timeout (`float`, *optional*, defaults to `60.0`):
            Seconds allowed for each HTTP request.
        retries (`int`, *optional*, defaults to `3`):
            Retries of a shard after its first attempt.
        backoff (`float`, *optional*, defaults to `0.5`):
            Seconds before the first retry; doubled at each retry.
        name (`str`, *optional*):
            The function's `__name__`, under which TRL logs it (`rewards/<name>/mean`). Defaults to
            `"remote_personalized_reward"`.

    Example:

    ```python
    >>> from trl import GRPOConfig, GRPOTrainer
    >>> reward = RemotePersonalizedReward(["http://10.0.0.1:5000", "http://10.0.0.2:5000"])
    >>> trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=GRPOConfig(...), train_dataset=dataset)
    ```
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        user_column: str = "user_id",
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        name: str | None = None,
    ) -> None:
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("`urls` is empty: pass the URL of at least one reward server.")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be an int >= 0, got {retries!r}.")
        if not timeout > 0 or not backoff >= 0:
            raise ValueError(f"`timeout` must be > 0 and `backoff` >= 0, got {timeout!r} and {backoff!r}.")
        self.urls = [_endpoint(url) for url in urls]
        self.user_column = user_column
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.__name__ = name or DEFAULT_NAME
        self.num_fallbacks = 0

    def __repr__(self) -> str:
        return f"RemotePersonalizedReward(urls={self.urls!r}, user_column={self.user_column!r})"

    @functools.cached_property
    def _ssl_context(self) -> Any:
        """httpx's default SSL context, built once: building it takes tens of milliseconds, more than a request."""
        import httpx

        return httpx.create_ssl_context()

    async def score(self, prompts: Sequence[Any], completions: Sequence[Any], user_ids: Sequence[Any]) -> list[float]:
        r"""
        The rewards of `(prompt, completion)` rows for their users, without TRL's calling convention: the arguments
        of [`~trl_moe_rm.PersonalizedReward.score`] (a `None` user gets the default routing), scored by the server(s).

        Returns:
            `list[float]`: one reward per row.
        """
        rewards, _ = await self._score(prompts, completions, user_ids)
        return rewards

    async def _score(
        self, prompts: Sequence[Any], completions: Sequence[Any], user_ids: Sequence[Any]
    ) -> tuple[list[float], int]:
        import httpx

        if not len(prompts) == len(completions) == len(user_ids):
            raise ValueError(
                f"Got {len(prompts)} prompts, {len(completions)} completions and {len(user_ids)} user ids; they must "
                "have the same length (one per completion)."
            )
        size = -(-len(prompts) // len(self.urls))  # ceil: one contiguous shard per URL
        starts = range(0, len(prompts), max(size, 1))
        # One client per call: TRL and verl may call from different event loops, to which a client is bound.
        async with httpx.AsyncClient(timeout=self.timeout, headers=self._headers, verify=self._ssl_context) as client:
            answers = await asyncio.gather(
                *(
                    self._post(
                        client,
                        shard,
                        {
                            "prompts": list(prompts[start : start + size]),
                            "completions": list(completions[start : start + size]),
                            "user_ids": list(user_ids[start : start + size]),
                        },
                    )
                    for shard, start in enumerate(starts)
                )
            )
        rewards = [reward for answer in answers for reward in answer["rewards"]]
        fallbacks = int(sum(sum(answer["extra_logs"].get("fallback", [])) for answer in answers))
        self.num_fallbacks += fallbacks
        return rewards, fallbacks

    async def _post(self, client: Any, shard: int, payload: dict[str, list[Any]]) -> dict[str, Any]:
        import httpx

        rows = len(payload["prompts"])
        failures = []
        for attempt in range(self.retries + 1):
            url = self.urls[(shard + attempt) % len(self.urls)]
            try:
                response = await client.post(url, json=payload)
            except httpx.TransportError as error:  # refused connection, timeout, reset
                failures.append(f"{url}: {type(error).__name__} {error}".rstrip())
            else:
                if response.status_code == 200:
                    return self._check(response, rows, url)
                if response.status_code not in RETRY_STATUSES:
                    raise RemoteRewardError(
                        f"The reward server {url} refused the request ({response.status_code}): {_detail(response)}"
                    )
                failures.append(f"{url}: HTTP {response.status_code} {_detail(response)}")
            if attempt < self.retries:
                await asyncio.sleep(self.backoff * 2**attempt)
        raise RemoteRewardError(
            f"No reward server answered a shard of {rows} rows after {self.retries + 1} attempts ({'; '.join(failures)})."
            " Check that `trl-moe-rm serve` runs at these URLs, or raise `timeout` / `retries`."
        )

    @staticmethod
    def _check(response: Any, rows: int, url: str) -> dict[str, Any]:
        try:
            answer = response.json()
        except ValueError:
            answer = None
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
        if (
            not isinstance(rewards, list)
            or len(rewards) != rows
            or not all(isinstance(reward, (int, float)) and math.isfinite(reward) for reward in rewards)
        ):
            raise RemoteRewardError(f"{url} did not answer {rows} finite rewards; is it a `trl-moe-rm serve` server?")
        answer.setdefault("extra_logs", {})
        return answer

    async def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """
        Score completions for their users on the server(s), with TRL's reward-function calling convention: the
        arguments and the result are those of [`~trl_moe_rm.PersonalizedReward.__call__`] (`completion_ids` are
        ignored: the server tokenizes the text). With TRL's `log_metric`, `<name>/fallbacks` is the number of rows of
        the call scored with the default routing.
        """
        log_metric: Callable[[str, float], None] | None = kwargs.get("log_metric")
        user_ids = user_ids_from_columns(kwargs, self.user_column, self.__name__)
        rewards, fallbacks = await self._score(prompts, completions, user_ids)
        if log_metric is not None:
            log_metric(f"{self.__name__}/fallbacks", float(fallbacks))
        return rewards


# ---------------------------------------------------------------------------------------------------------- verl
@functools.lru_cache(maxsize=8)
def _remote_reward(
    urls: tuple[str, ...], api_key: str | None, timeout: float, retries: int
) -> RemotePersonalizedReward:
    return RemotePersonalizedReward(list(urls), api_key=api_key, timeout=timeout, retries=retries)


@functools.lru_cache(maxsize=2)
def _local_reward(model: str, profiles: str | None, strict: bool) -> tuple[Any, threading.Lock]:
    from trl_moe_rm.rewards import PersonalizedReward

    return PersonalizedReward.from_pretrained(model, profiles=profiles, strict=strict), threading.Lock()


def _item(value: Any) -> Any:
    """A plain Python value for a numpy scalar (verl's non-tensor batch is made of numpy arrays)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value


def _prompt_and_user(extra_info: Mapping[str, Any] | None, prompt_key: str, user_key: str) -> tuple[Any, Any]:
    extra_info = extra_info or {}
    if prompt_key not in extra_info:
        raise ValueError(
            f"The personalized reward reads each row's prompt from extra_info[{prompt_key!r}] (verl passes only the "
            "response as solution_str), but this row's extra_info has no such key (it has "
            f"{sorted(extra_info)}): add it, with the user, in your data preprocessing "
            f"(extra_info={{{prompt_key!r}: prompt, {user_key!r}: user_id}}), or set `prompt_key`."
        )
    prompt = extra_info[prompt_key]
    if not isinstance(prompt, str):  # chat messages, possibly a numpy array of dicts after a parquet round trip
        prompt = [{key: _item(value) for key, value in dict(message).items()} for message in prompt]
    return prompt, _item(extra_info.get(user_key))


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None],
    *,
    urls: str | Sequence[str] | None = None,
    model: str | None = None,
    profiles: str | None = None,
    strict: bool = False,
    user_key: str = "user_id",
    prompt_key: str = "prompt",
    api_key: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    **unused: Any,
) -> list[float]:
    r"""
    verl custom reward function for its `batch` reward manager: the personalized reward of each response for its user.

    verl calls it with the batch's data sources, decoded responses, ground truths and `extra_info` dicts, plus the
    `custom_reward_function.reward_kwargs` of the config. The prompt and the user of each row are read from its
    `extra_info`; data sources and ground truths are ignored.

    Args:
        data_sources (`Sequence`):
            Ignored.
        solution_strs (`Sequence[str]`):
            The decoded responses.
        ground_truths (`Sequence`):
            Ignored.
        extra_infos (`Sequence[dict]`):
            Per row, the prompt (`extra_info[prompt_key]`, text or chat messages) and the user
            (`extra_info[user_key]`; missing or `None` for the default routing).
        urls (`str` or `Sequence[str]`, *optional*):
            Reward servers to score on (see [`RemotePersonalizedReward`]). Exactly one of `urls` and `model` is needed.
        model (`str`, *optional*):
            Score in-process with this MoE reward model folder (loaded once per process).
        profiles (`str`, *optional*):
            With `model`: the profiles folder (defaults to `<model>/profiles`).
        strict (`bool`, *optional*, defaults to `False`):
            With `model`: raise on users without a profile instead of using the default routing.
        user_key (`str`, *optional*, defaults to `"user_id"`):
            The key of the user in `extra_info`.
        prompt_key (`str`, *optional*, defaults to `"prompt"`):
            The key of the prompt in `extra_info`.
        api_key (`str`, *optional*):
            With `urls`: the servers' key (defaults to the `TRL_MOE_RM_API_KEY` environment variable).
        timeout (`float`, *optional*, defaults to `60.0`):
            With `urls`: seconds allowed for each HTTP request.
        retries (`int`, *optional*, defaults to `3`):
            With `urls`: retries of a failed request.
        **unused:
            Other keyword arguments verl may pass (e.g. `reward_router_address`), ignored.

    Returns:
        `list[float]`: one reward per response.
    """
    if (urls is None) == (model is None):
        raise ValueError(
            "Pass exactly one of `urls` (reward servers) and `model` (score in-process), e.g. "
            "`+custom_reward_function.reward_kwargs.urls=http://127.0.0.1:5000`."
        )
    rows = [_prompt_and_user(extra_info, prompt_key, user_key) for extra_info in extra_infos]
    prompts, user_ids = [prompt for prompt, _ in rows], [user_id for _, user_id in rows]
    completions = [  # the response of a chat prompt is the assistant's message
        response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]
        for prompt, response in zip(prompts, solution_strs)
    ]
    if urls is not None:
        urls = (urls,) if isinstance(urls, str) else tuple(urls)
        remote = _remote_reward(urls, api_key, timeout, retries)
        return asyncio.run(remote.score(prompts, completions, user_ids))
    reward, lock = _local_reward(model, profiles, strict)
    with lock:  # verl may call from several threads: one forward at a time
        return reward.score(prompts, completions, user_ids).tolist()


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> float:
    r"""
    verl custom reward function (`custom_reward_function.name=compute_score`): the personalized reward of one response.

    The prompt and the user are read from `extra_info` (see [`compute_score_batch`], which takes the same keyword
    arguments: `urls` or `model`, `user_key`, `prompt_key`, ...). Through a server, the rows that verl scores
    concurrently are merged into one forward pass by its dynamic batching.

    Args:
        data_source (`Any`):
            Ignored.
        solution_str (`str`):
            The decoded response.
        ground_truth (`Any`):
            Ignored.
        extra_info (`dict`, *optional*):
            The row's prompt and user.
        **kwargs:
            The keyword arguments of [`compute_score_batch`] (verl's `custom_reward_function.reward_kwargs`).

    Returns:
        `float`: the reward.
    """
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]


__all__ = ["RemotePersonalizedReward", "RemoteRewardError", "compute_score", "compute_score_batch"]
