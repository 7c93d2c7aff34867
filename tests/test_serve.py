"""
The reward server (`python -m trl_moe_rm.server`, i.e. `trl-moe-rm serve`) and its clients, with real parts.

Two real uvicorn servers run in subprocesses on free ports for the whole module, serving the same tiny MoE reward model
saved to disk: `A` with `--labels_are_user_ids` (OpenRLHF's `--label_key user_id`), and `B` with `--strict` and an API
key. Their rewards are compared with an in-process `PersonalizedReward` loaded from the same folder. The request
validation (every 4xx), normalization and batching are also tested in-process (FastAPI's `TestClient`), which is fast.

OpenRLHF's own client (`openrlhf.utils.agent.SingleTurnAgentExecutor._fetch_rewards_via_http`, OpenRLHF 0.11.2) is used
against the live server when `openrlhf` is importable: it needs only aiohttp once installed with
`pip install --no-deps openrlhf==0.11.2 pylatexenc`. Without it that test is skipped, and the JSON contract it relies
on is still checked by `test_openrlhf_json_contract`.
"""

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from tiny import CHAT_TEMPLATE, tiny_llama_config, tiny_moe, tiny_tokenizer

from trl_moe_rm import PersonalizedReward, ProfileStore, UserProfile
from trl_moe_rm.configuration_moe_reward import config_fingerprint
from trl_moe_rm.remote import RemotePersonalizedReward, RemoteRewardError, compute_score, compute_score_batch
from trl_moe_rm.server import (
    NORMALIZATION_FILENAME,
    ChatTemplateText,
    DynamicBatcher,
    ServeOptions,
    ServerMetrics,
    create_app,
    load_normalization,
    main,
)


REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
STARTUP_TIMEOUT = 240  # seconds: importing torch + transformers on a busy 2-core machine can be slow
PROMPTS = ["tell me about cat", "explain the moon", "what is alpha", "tell me about cat", "why is the sun red"]
COMPLETIONS = [" good one two", " bad three", "", " bad five six seven", " long answer please"]
USERS = ["alice", "bob", None, "carol", "alice"]  # None: no user, carol: no profile


# ---------------------------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m trl_moe_rm.server` in a subprocess, on a free port, with its log in a file."""

    def __init__(self, model_dir: Path, log: Path, *args: str, api_key: str | None = None) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        }
        env.pop("TRL_MOE_RM_API_KEY", None)
        if api_key:
            env["TRL_MOE_RM_API_KEY"] = api_key
        command = [
            sys.executable,
            "-m",
            "trl_moe_rm.server",
            "--model",
            str(model_dir),
            "--port",
            self.url.rsplit(":", 1)[1],
        ]
        with open(log, "wb") as file:
            self.process = subprocess.Popen([*command, *args], env=env, stdout=file, stderr=subprocess.STDOUT)

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", headers=self.headers, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not come up in {STARTUP_TIMEOUT}s:\n{self.log_text()[-4000:]}")

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics", headers=self.headers, timeout=30).json()

    def post(self, body, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}/get_reward", json=body, headers=self.headers, timeout=60, **kwargs)

    def stop(self) -> int:
        """SIGTERM, then the exit status: -SIGTERM after a graceful shutdown (uvicorn re-raises the signal)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


def _assert_close(actual, expected) -> None:
    assert len(actual) == len(expected)
    assert max(abs(a - b) for a, b in zip(actual, expected)) < 1e-5, (actual, expected)


def _chat(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [
        {"role": "user" if index % 2 == 0 else "assistant", "content": text} for index, text in enumerate(turns)
    ]
    return messages


# -------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny MoE reward model with its tokenizer (with a chat template) and two users' profiles, saved to disk."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=2).eval()
    with torch.no_grad():  # spread the expert scores so that users and rows differ visibly
        model.experts.weight.normal_(0, 1.0)
        model.experts.bias.copy_(torch.tensor([0.5, -0.5, 1.0, -1.0]))
        model.router.weight.normal_(0, 1.0)
    fingerprint = config_fingerprint(model.config)
    directory = tmp_path_factory.mktemp("served") / "moe-rm"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    store = ProfileStore(directory / "profiles")
    store.save(UserProfile("alice", [0.7, 0.1, 0.1, 0.1], config_hash=fingerprint))
    store.save(UserProfile("bob", [0.0, 0.0, 0.2, 0.8], mode="routed", beta=2.0, config_hash=fingerprint))
    return directory


@pytest.fixture(scope="module")
def reference(model_dir) -> PersonalizedReward:
    """The in-process reward the server must reproduce."""
    return PersonalizedReward.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    """Server A (`--labels_are_user_ids`) and server B (`--strict`, API key), started together."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "A": Server(model_dir, logs / "a.log", "--labels_are_user_ids", "--max_wait_ms", "10"),
        "B": Server(model_dir, logs / "b.log", "--strict", "--max_batch_size", "8", api_key=API_KEY),
    }
    try:
        for server in started.values():
            server.wait_healthy()
        yield started
    finally:
        for server in started.values():
            server.stop()
    for server in started.values():  # the shutdown was graceful
        assert "Stopped after" in server.log_text(), server.log_text()[-2000:]


@pytest.fixture()
def app_reward(model_dir) -> PersonalizedReward:
    return PersonalizedReward.from_pretrained(model_dir)


# ------------------------------------------------------------------------------------- parity with in-process scores
def test_openrlhf_queries_match_in_process(servers, reference):
    """Plain text, users as OpenRLHF labels; queries left-padded and ended by eos + pads (OpenRLHF <= 0.8)."""
    queries = [f"[PAD][PAD]{p}{c}[EOS][PAD]" for p, c in zip(PROMPTS, COMPLETIONS)]
    labels = [user or "" for user in USERS]  # OpenRLHF sends "" for a row without a label
    answer = servers["A"].post({"query": queries, "prompts": PROMPTS, "labels": labels}).json()
    expected = reference.score(PROMPTS, COMPLETIONS, USERS).tolist()
    _assert_close(answer["rewards"], expected)
    _assert_close(answer["scores"], [_sigmoid(value) for value in expected])
    assert answer["extra_logs"] == {"fallback": [0.0, 0.0, 1.0, 1.0, 0.0]}

    # Without users every row gets the default routing, which is the reward of a user without a profile.
    answer = servers["A"].post({"query": queries, "prompts": PROMPTS, "labels": [""] * 5}).json()
    _assert_close(answer["rewards"], reference.score(PROMPTS, COMPLETIONS, [None] * 5).tolist())
    assert answer["extra_logs"]["fallback"] == [1.0] * 5


def test_chat_templated_queries_match_in_process(servers, reference):
    """Prompts rendered with the chat template (special tokens included) are scored as the messages they came from."""
    conversations = [
        _chat("tell me about cat"),
        _chat("explain the moon", system="be short"),
        _chat("what is alpha", "alpha is a letter", "and beta"),
    ]
    contents = ["good one two", "bad", "one two three"]
    tokenizer = reference.tokenizer
    prompts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
    # The decoded prompt + response as a policy using this template produces it: the turn ends with " [EOS] ".
    queries = [f"{prompt}{content} [EOS] [PAD][PAD]" for prompt, content in zip(prompts, contents)]
    users = ["alice", "bob", None]
    answer = servers["A"].post({"query": queries, "prompts": prompts, "labels": ["alice", "bob", None]}).json()
    completions = [[{"role": "assistant", "content": content}] for content in contents]
    _assert_close(answer["rewards"], reference.score(conversations, completions, users).tolist())
    assert servers["A"].metrics()["rows"]["chat"] >= 3


def test_native_form_matches_in_process(servers, reference):
    """`prompts` + `completions` (text or messages) + `user_ids`: what RemotePersonalizedReward sends."""
    prompts = [*PROMPTS, _chat("tell me about cat"), _chat("why", system="be formal")]
    completions = [*COMPLETIONS, [{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "yes"}]]
    users = [*USERS, "bob", "alice"]
    answer = servers["A"].post({"prompts": prompts, "completions": completions, "user_ids": users}).json()
    _assert_close(answer["rewards"], reference.score(prompts, completions, users).tolist())


# ------------------------------------------------------------------------------------------------------ OpenRLHF
def test_openrlhf_json_contract(servers):
    """Exactly what OpenRLHF 0.11.2 posts per sample, and the answer fields it reads (numbers only in `extra_logs`)."""
    body = {"query": ["tell me about cat good[EOS]"], "prompts": ["tell me about cat"], "labels": ["alice"]}
    response = httpx.post(f"{servers['A'].url}/get_reward", content=json.dumps(body), timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert set(answer) == {"rewards", "scores", "extra_logs"}
    assert all(isinstance(value, float) for value in answer["rewards"] + answer["scores"])
    assert 0.0 <= answer["scores"][0] <= 1.0
    for values in answer["extra_logs"].values():  # OpenRLHF turns each into a tensor, row by row
        assert len(values) == 1 and all(isinstance(value, float) for value in values)


def test_openrlhf_client_against_live_server(servers, reference):
    """OpenRLHF's own remote reward client (0.11.2), unmodified, with the users sent as labels (`--label_key`)."""
    agent = pytest.importorskip(
        "openrlhf.utils.agent", reason="pip install --no-deps openrlhf==0.11.2 pylatexenc (needs only aiohttp)"
    )
    executor = agent.SingleTurnAgentExecutor(remote_rm_url=f"{servers['A'].url}/get_reward")
    queries = [p + c + "[EOS]" for p, c in zip(PROMPTS, COMPLETIONS)]
    labels = [user or "" for user in USERS]
    answers = asyncio.run(executor._fetch_rewards_via_http(queries, PROMPTS, labels))
    assert len(answers) == 1  # one server: one shard
    _assert_close(answers[0]["rewards"], reference.score(PROMPTS, COMPLETIONS, USERS).tolist())
    assert answers[0]["extra_logs"]["fallback"] == [0.0, 0.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------------------- load
def test_1000_requests_from_16_concurrent_clients(servers, reference):
    """Every request is answered with its own rows' rewards, in order: nothing lost, mixed up or reordered."""
    pool_prompts = [f"{verb} {topic}" for verb in ("tell me about", "explain", "what is", "why") for topic in
                    ("cat", "dog", "sun", "moon", "red", "blue", "green", "alpha", "beta", "gamma")]  # fmt: skip
    pool_completions = [f" {'good' if index % 3 else 'bad'} {' '.join(['one'] * (index % 5))}" for index in range(40)]
    pool_users = [("alice", "bob", None, "carol")[index % 4] for index in range(40)]
    expected = reference.score(pool_prompts, pool_completions, pool_users).tolist()
    assert len({round(value, 4) for value in expected}) == 40, "pool rewards must be distinct to detect mix-ups"

    def rows_of(request: int) -> list[int]:
        return [(request * 7 + offset) % 40 for offset in range(1 + request % 3)]

    async def run() -> dict[int, list[float]]:
        answers, next_request = {}, iter(range(1000))
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16)) as client:

            async def worker():
                for request in next_request:
                    rows = rows_of(request)
                    body = {
                        "query": [pool_prompts[row] + pool_completions[row] for row in rows],
                        "prompts": [pool_prompts[row] for row in rows],
                        "labels": [pool_users[row] for row in rows],
                    }
                    response = await client.post(f"{servers['A'].url}/get_reward", json=body)
                    assert response.status_code == 200, response.text
                    answers[request] = response.json()["rewards"]

            await asyncio.gather(*(worker() for _ in range(16)))
        return answers

    before = servers["A"].metrics()
    answers = asyncio.run(run())
    assert sorted(answers) == list(range(1000))
    for request, rewards in answers.items():
        _assert_close(rewards, [expected[row] for row in rows_of(request)])
    after = servers["A"].metrics()
    assert after["requests"]["ok"] - before["requests"]["ok"] == 1000
    assert after["rows"]["total"] - before["rows"]["total"] == sum(len(rows_of(r)) for r in range(1000))
    assert after["latency_ms"]["p99"] >= after["latency_ms"]["p50"] > 0
    assert after["requests"]["in_flight"] == 0


# ------------------------------------------------------------------------------------------------------ clients
def test_two_replicas_behind_the_sharding_client(servers, reference):
    """`RemotePersonalizedReward` shards a batch over both servers, in order; a dead replica is skipped on retry."""
    prompts, completions, users = PROMPTS * 8, COMPLETIONS * 8, ["alice", "bob", "bob", "alice", "alice"] * 8
    expected = reference.score(prompts, completions, users).tolist()
    before = {name: server.metrics()["rows"]["total"] for name, server in servers.items()}
    client = RemotePersonalizedReward([servers["A"].url, servers["B"].url], api_key=API_KEY)
    _assert_close(asyncio.run(client.score(prompts, completions, users)), expected)
    after = {name: server.metrics()["rows"]["total"] for name, server in servers.items()}
    assert {name: after[name] - before[name] for name in after} == {"A": 20, "B": 20}

    dead = f"http://127.0.0.1:{_free_port()}"
    failover = RemotePersonalizedReward([servers["A"].url, dead], retries=1, backoff=0.0)
    _assert_close(asyncio.run(failover.score(prompts, completions, users)), expected)
    with pytest.raises(RemoteRewardError, match="No reward server answered"):
        asyncio.run(RemotePersonalizedReward(dead, retries=1, backoff=0.0).score(["a"], ["b"], [None]))


def test_trl_calling_convention(servers, reference):
    """TRL awaits it (an async callable), passes the user column and `log_metric`; a missing column is explained."""
    from trl.trainer.utils import is_async_callable

    reward = RemotePersonalizedReward(servers["A"].url, name="remote_rm")
    assert is_async_callable(reward) and reward.__name__ == "remote_rm"
    logged = {}
    rewards = asyncio.run(
        reward(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=None, user_id=USERS, trainer_state=None,
               log_metric=logged.__setitem__, log_extra=None)
    )  # fmt: skip
    _assert_close(rewards, reference.score(PROMPTS, COMPLETIONS, USERS).tolist())
    assert logged == {"remote_rm/fallbacks": 2.0} and reward.num_fallbacks == 2
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        asyncio.run(reward(prompts=PROMPTS, completions=COMPLETIONS, user=USERS))


def test_verl_compute_score(servers, reference, model_dir):
    """verl's custom reward function, through the server and in-process; the prompt and user come from extra_info."""
    prompt = _chat("tell me about cat")
    completions = [[{"role": "assistant", "content": "good one"}], " bad"]
    expected = reference.score([prompt, "explain the moon"], completions, ["bob", None]).tolist()
    infos = [{"prompt": prompt, "user_id": "bob", "index": 3}, {"prompt": "explain the moon"}]
    remote = compute_score("src", "good one", None, infos[0], urls=servers["A"].url, reward_router_address=None)
    assert abs(remote - expected[0]) < 1e-5
    local = compute_score_batch(["src"] * 2, ["good one", " bad"], [None] * 2, infos, model=str(model_dir))
    _assert_close(local, expected)
    with pytest.raises(ValueError, match=r"extra_info\['prompt'\]"):
        compute_score("src", "good", None, {"user_id": "bob"}, model=str(model_dir))
    with pytest.raises(ValueError, match="exactly one of `urls`"):
        compute_score("src", "good", None, infos[0])


def test_grpo_with_the_remote_reward(servers, tmp_path):
    """Two GRPO steps (TRL's GRPOTrainer awaits the async reward); the server sees every row's user."""
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    policy = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    policy.generation_config.eos_token_id = tokenizer.eos_token_id
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    users = ["alice", "bob", "carol"]  # carol has no profile
    dataset = Dataset.from_list(
        [
            {"prompt": f"tell me about {topic}", "user_id": user}
            for user in users
            for topic in ("cat", "dog", "sun", "moon")
        ]
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-3,
        generation_kwargs={
            "suppress_tokens": [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id]
        },
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    before = servers["A"].metrics()["rows"]
    reward = RemotePersonalizedReward(servers["A"].url)
    trainer = GRPOTrainer(
        model=policy, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()

    logs = [entry for entry in trainer.state.log_history if "rewards/remote_personalized_reward/mean" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["rewards/remote_personalized_reward/mean"]) for entry in logs)
    assert all("remote_personalized_reward/fallbacks" in entry for entry in logs)
    after = servers["A"].metrics()["rows"]
    assert after["total"] - before["total"] == 16  # 2 steps x 2 prompts x 4 generations
    seen = {user: after["by_user"].get(user, 0) - before["by_user"].get(user, 0) for user in users}
    assert sum(seen.values()) == 16 and all(count % 4 == 0 for count in seen.values()), seen
    carol = after["fallbacks_by_user"].get("carol", 0) - before["fallbacks_by_user"].get("carol", 0)
    assert carol == seen["carol"] and reward.num_fallbacks == carol


# ------------------------------------------------------------------------------------------------- live refusals
def test_live_server_refusals(servers):
    """Server B: 401 without the key (even /health), 400 on bad JSON, 422 for unknown users under --strict."""
    url = servers["B"].url
    errors_before = servers["B"].metrics()["requests"]["errors"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 401
    wrong = httpx.post(f"{url}/get_reward", json={}, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert "TRL_MOE_RM_API_KEY" in wrong.json()["detail"]
    bad_json = servers["B"].post(None, content=b"{'query': }")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["detail"]
    unknown = servers["B"].post({"prompts": PROMPTS, "completions": COMPLETIONS, "user_ids": USERS})
    assert unknown.status_code == 422
    assert "'carol'" in unknown.json()["detail"] and "rows [2, 3]" in unknown.json()["detail"]
    assert "--strict" in unknown.json()["detail"]
    client = RemotePersonalizedReward(url, api_key=API_KEY, retries=3, backoff=5.0)  # a 4xx is never retried
    with pytest.raises(RemoteRewardError, match=r"refused the request \(422\): No profile for user"):
        asyncio.run(client.score(PROMPTS, COMPLETIONS, USERS))
    errors = servers["B"].metrics()["requests"]["errors"]
    assert {status: count - errors_before.get(status, 0) for status, count in errors.items()} == {
        "401": 2, "400": 1, "422": 2
    }  # fmt: skip


@pytest.mark.slow
def test_graceful_shutdown_finishes_in_flight_requests(model_dir, reference, tmp_path):
    """SIGTERM while a request waits in a batch: it is answered, then the server exits; progress lines are logged."""
    server = Server(model_dir, tmp_path / "c.log", "--max_wait_ms", "5000", "--log_interval", "0.5")
    try:
        server.wait_healthy()
        result = {}
        body = {"prompts": PROMPTS[:1], "completions": COMPLETIONS[:1], "user_ids": ["alice"]}
        thread = threading.Thread(target=lambda: result.setdefault("response", server.post(body)))
        thread.start()
        deadline = time.monotonic() + 60
        while server.metrics()["requests"]["in_flight"] == 0:
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert result["response"].status_code == 200
        _assert_close(
            result["response"].json()["rewards"], reference.score(PROMPTS[:1], COMPLETIONS[:1], ["alice"]).tolist()
        )
        assert server.process.wait(timeout=60) == -signal.SIGTERM
    finally:
        server.stop()
    log = server.log_text()
    assert "last 0.5s:" in log and "Stopped after 1 requests (1 rows)" in log


def test_non_loopback_host_needs_a_key(model_dir, monkeypatch, capsys):
    monkeypatch.delenv("TRL_MOE_RM_API_KEY", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), "--host", "0.0.0.0"])
    assert exit_info.value.code == 2
    assert "without authentication: set TRL_MOE_RM_API_KEY" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- 4xx cases, in-process
def _client(reward, api_key=None, **options):
    from fastapi.testclient import TestClient

    return TestClient(create_app(reward, ServeOptions(log_interval=0, **options), api_key=api_key))


GOOD = {"query": ["tell me about cat good"], "prompts": ["tell me about cat"]}


@pytest.mark.parametrize(
    "body, status, detail",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not valid JSON"),
        (b"[1, 2]", 422, "must be a JSON object"),
        (json.dumps({**GOOD, "user_id": ["alice"]}).encode(), 422, "Unknown field(s) ['user_id']"),
        (json.dumps({"prompts": ["a"]}).encode(), 422, "got neither"),
        (json.dumps({**GOOD, "completions": ["x"]}).encode(), 422, "not both"),
        (json.dumps({"query": ["a b"]}).encode(), 422, "`prompts` is missing"),
        (json.dumps({"query": "a b", "prompts": ["a"]}).encode(), 422, "`query` must be a JSON list"),
        (json.dumps({**GOOD, "prompts": ["a", "b"]}).encode(), 422, "`prompts` has 2 entries but there are 1 rows"),
        (json.dumps({**GOOD, "user_ids": ["alice", "bob"]}).encode(), 422, "`user_ids` has 2 entries"),
        (json.dumps({**GOOD, "labels": []}).encode(), 422, "`labels` has 0 entries"),
        (json.dumps({"query": [1], "prompts": ["a"]}).encode(), 422, "`query` entries must be strings; row [0]"),
        (json.dumps({**GOOD, "user_ids": [1.5]}).encode(), 422, "user ids (strings, integers or null); row [0]"),
        (json.dumps({**GOOD, "user_ids": [True]}).encode(), 422, "user ids"),
        (json.dumps({"query": ["other text"], "prompts": ["a"]}).encode(), 422, "row [0] does not start with its prompt"),
        (json.dumps({"prompts": ["a", [{"role": "user"}]], "completions": ["b", "c"]}).encode(), 422, "row [1]: a prompt and"),
        (json.dumps({"prompts": [[{"role": "user", "content": "a"}]], "completions": ["c"]}).encode(), 422, "both lists"),
        (json.dumps({"prompts": ["a"], "completions": [[{"role": "assistant", "content": "c"}]]}).encode(), 422, "row [0]"),
    ],
)  # fmt: skip
def test_bad_requests_get_one_clear_line(app_reward, body, status, detail):
    with _client(app_reward) as client:
        response = client.post("/get_reward", content=body)
        assert response.status_code == status, response.text
        message = response.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and "Traceback" not in message
        assert detail in message
        assert client.get("/metrics").json()["requests"]["errors"] == {str(status): 1}


def test_labels_as_user_ids(app_reward, reference):
    with _client(app_reward, labels_are_user_ids=True) as client:
        ok = client.post("/get_reward", json={**GOOD, "labels": ["bob"]}).json()
        _assert_close(ok["rewards"], reference.score(["tell me about cat"], [" good"], ["bob"]).tolist())
        missing = client.post("/get_reward", json=GOOD)
        assert missing.status_code == 422 and "--labels_are_user_ids" in missing.json()["detail"]
        both = client.post("/get_reward", json={**GOOD, "labels": ["bob"], "user_ids": ["bob"]})
        assert both.status_code == 422 and "in one of them" in both.json()["detail"]


def test_size_limits(app_reward):
    with _client(app_reward, max_request_bytes=1000, max_rows_per_request=3) as client:
        large = {"query": ["a " * 600], "prompts": ["a"]}
        response = client.post("/get_reward", json=large)
        assert response.status_code == 413 and "at most 1000" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            yield json.dumps(large).encode()

        response = client.post("/get_reward", content=chunks())
        assert response.status_code == 413 and "exceeds 1000 bytes" in response.json()["detail"]
        rows = {"query": ["a b"] * 4, "prompts": ["a"] * 4}
        response = client.post("/get_reward", json=rows)
        assert response.status_code == 413 and "has 4 rows" in response.json()["detail"]
        assert client.post("/get_reward", json={"query": [], "prompts": []}).json() == {
            "rewards": [], "scores": [], "extra_logs": {"fallback": []}
        }  # fmt: skip


def test_api_key_is_required_everywhere(app_reward):
    with _client(app_reward, api_key="s3cret") as client:
        for method, path in (("get", "/health"), ("get", "/metrics"), ("post", "/get_reward"), ("get", "/docs")):
            assert getattr(client, method)(path).status_code in (401, 404)
        assert client.get("/health").status_code == 401
        assert client.post("/get_reward", json=GOOD, headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert client.post("/get_reward", json=GOOD, headers={"Authorization": "s3cret"}).status_code == 401
        assert client.post("/get_reward", json=GOOD, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_non_finite_rewards_are_refused(model_dir):
    """A NaN reward fails its own request (500, naming its rows), not the requests batched with it."""
    reward = PersonalizedReward.from_pretrained(model_dir)
    with torch.no_grad():
        reward.model.experts.bias[:] = float("nan")
    with _client(reward) as client:
        response = client.post("/get_reward", json={"query": ["a b", "c d"], "prompts": ["a", "c"]})
        assert response.status_code == 500 and "rewards" not in response.json()
        detail = response.json()["detail"]
        assert detail.startswith("Scoring failed: NonFiniteRewardError") and "row(s) 0, 1" in detail


def test_strict_server_refuses_unknown_users(model_dir):
    reward = PersonalizedReward.from_pretrained(model_dir, strict=True)
    with _client(reward) as client:
        response = client.post("/get_reward", json={**GOOD, "user_ids": [None]})
        assert response.status_code == 422 and "No profile for user(s) None (row [0])" in response.json()["detail"]
        assert client.post("/get_reward", json={**GOOD, "user_ids": ["alice"]}).status_code == 200


# ------------------------------------------------------------------------------------------------ normalization
def test_normalization_is_computed_once_and_stored_with_the_model(model_dir, tmp_path, monkeypatch):
    reward = PersonalizedReward.from_pretrained(model_dir)
    reference_set = tmp_path / "reference.jsonl"
    rows = [{"prompt": p, "completion": c, "user_id": u} for p, c, u in zip(PROMPTS, COMPLETIONS, USERS)]
    reference_set.write_text("".join(json.dumps(row) + "\n" for row in rows))
    raw = reward.score(PROMPTS, COMPLETIONS, USERS)
    store = tmp_path / "model"  # stands for the model folder, where the statistics are stored
    store.mkdir()
    stats = load_normalization(reference_set, reward, store)
    assert stats.count == 5 and abs(stats.mean - raw.double().mean().item()) < 1e-6
    assert abs(stats.std - raw.double().std(unbiased=False).item()) < 1e-6
    stored = store / NORMALIZATION_FILENAME
    assert json.loads(stored.read_text())["mean"] == stats.mean

    # Another replica reuses the stored statistics (no scoring), or loads the statistics file itself.
    replica = PersonalizedReward.from_pretrained(model_dir)
    monkeypatch.setattr(replica, "score", lambda *args: pytest.fail("the statistics were computed again"))
    assert load_normalization(reference_set, replica, store) == stats
    assert load_normalization(stored, replica, store) == stats

    with _client(reward, normalization=stats, clip=1.0) as client:
        answer = client.post("/get_reward", json={"prompts": PROMPTS, "completions": COMPLETIONS, "user_ids": USERS})
        answer = answer.json()
        expected = [min(max((value - stats.mean) / stats.std, -1.0), 1.0) for value in raw.tolist()]
        _assert_close(answer["rewards"], expected)
        _assert_close(answer["extra_logs"]["raw_reward"], raw.tolist())
        _assert_close(answer["scores"], [_sigmoid(value) for value in expected])
        assert client.get("/health").json()["normalization"]["count"] == 5

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(stored.read_text()), "model_fingerprint": "0" * 64}))
    with pytest.raises(ValueError, match="statistics of another model"):
        load_normalization(other, reward, store)


# ------------------------------------------------------------------------------------------------ dynamic batching
def test_concurrent_requests_share_one_forward_pass():
    """Requests that arrive together are merged (up to max_batch_size rows), scored one batch at a time, split back."""
    batches, running = [], []

    def score(prompts, completions, user_ids):
        assert not running, "two forward passes ran at once"
        running.append(1)
        time.sleep(0.01)
        batches.append(list(prompts))
        running.pop()
        if "boom" in prompts:
            raise ValueError("bad row")
        return [float(prompt) for prompt in prompts]

    async def run():
        batcher = DynamicBatcher(score, max_batch_size=6, max_wait_ms=500, metrics=ServerMetrics())
        await batcher.start()
        try:
            requests = [[str(10 * r + i) for i in range(r % 3 + 1)] for r in range(4)]  # 1 + 2 + 3 + 1 rows
            results = await asyncio.gather(*(batcher.submit(rows, rows, [None] * len(rows)) for rows in requests))
            failing = await asyncio.gather(
                batcher.submit(["1"], ["1"], [None]), batcher.submit(["boom"], ["x"], [None]), return_exceptions=True
            )
        finally:
            await batcher.stop()
        return requests, results, failing, batcher.metrics

    requests, results, failing, metrics = asyncio.run(run())
    assert results == [[float(value) for value in rows] for rows in requests]
    assert batches[:2] == [["0", "10", "11", "20", "21", "22"], ["30"]]  # 6 rows, then the request that did not fit
    assert failing[0] == [1.0] and isinstance(failing[1], ValueError)  # the bad request failed alone
    assert batches[2:] == [["1", "boom"], ["1"], ["boom"]]
    assert metrics.batches == 3 and max(metrics.batch_sizes) == 6  # the one-by-one retry is part of its batch


# ---------------------------------------------------------------------------------------------- chat templates
QWEN_LIKE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize("template", [QWEN_LIKE, LLAMA3_LIKE, CHAT_TEMPLATE])
def test_chat_templated_text_is_read_back_into_messages(template):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = template
    chat = ChatTemplateText(tokenizer)
    assert chat.available
    for messages in (_chat("hi there"), _chat("a", "b", "c"), _chat("q", system="be brief")):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parsed = chat.parse(text)
        assert tokenizer.apply_chat_template(parsed, tokenize=False, add_generation_prompt=True) == text
        assert [m["content"] for m in parsed if m["role"] != "system"] == [
            m["content"] for m in messages if m["role"] != "system"
        ]
    assert chat.parse("just some plain text") is None
    assert chat.parse(text + "more") is None
    # A response generated after such a prompt ends with the end of the assistant's turn, which is cut off.
    finished = tokenizer.apply_chat_template(_chat("q", "the answer"), tokenize=False)
    response = "the answer" + finished.split("the answer", 1)[1]
    assert chat.completion(response) == [{"role": "assistant", "content": "the answer"}]


def test_a_tokenizer_without_chat_template_scores_plain_text():
    assert not ChatTemplateText(tiny_tokenizer()).available
