import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from trl_moe_rm.io_utils import atomic_write_bytes, atomic_write_text, is_temp_file
from trl_moe_rm.profiles import (
    PROFILE_SCHEMA_VERSION,
    ProfileStore,
    ProfileStoreError,
    ProfileStoreNotWritableError,
    UnknownUserError,
    UserProfile,
    config_fingerprint,
    lookup_profile,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = ["json", "safetensors"]


def make_profile(user_id, weights=(0.5, 0.25, 0.25), **kwargs) -> UserProfile:
    return UserProfile(user_id=user_id, expert_weights=list(weights), **kwargs)


def assert_same_profile(a: UserProfile, b: UserProfile) -> None:
    assert type(a.user_id) is type(b.user_id) and a.user_id == b.user_id
    assert a.expert_weights == pytest.approx(b.expert_weights, abs=1e-7)
    assert (a.mode, a.beta, a.method, a.num_shots, a.fitted_at, a.config_hash, a.metadata) == (
        b.mode,
        b.beta,
        b.method,
        b.num_shots,
        b.fitted_at,
        b.config_hash,
        b.metadata,
    )


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------------------------------------------------
# UserProfile
# ----------------------------------------------------------------------------------------------------------------------


def test_profile_dict_round_trip_and_tensor():
    profile = make_profile(
        7, mode="routed", beta=2.0, method="hyre", num_shots=16, config_hash="abc", metadata={"split": ["a", 1]}
    )
    data = profile.to_dict()
    assert data["schema_version"] == PROFILE_SCHEMA_VERSION
    assert_same_profile(UserProfile.from_dict(json.loads(json.dumps(data))), profile)
    assert profile.num_experts == 3
    torch.testing.assert_close(profile.weights_tensor(), torch.tensor([0.5, 0.25, 0.25]))
    assert profile.fitted_at.endswith("+00:00")  # UTC by default


def test_profile_weights_validation():
    with pytest.raises(ValueError, match="NaN"):
        make_profile("u", [math.nan, 0.5, 0.5])
    with pytest.raises(ValueError, match="Inf"):
        make_profile("u", [math.inf, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        make_profile("u", [1.5, -0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        make_profile("u", [0.5, 0.6])
    with pytest.raises(ValueError, match="empty"):
        make_profile("u", [])
    drifted = make_profile("u", [0.50003, 0.5])  # tiny drift is renormalised away
    assert math.fsum(drifted.expert_weights) == pytest.approx(1.0, abs=1e-12)
    from_tensor = UserProfile("u", torch.tensor([0.25, 0.75]))
    assert from_tensor.expert_weights == [0.25, 0.75]
    with pytest.raises(ValueError, match="mode"):
        make_profile("u", mode="dynamic")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        make_profile("u", metadata={"t": torch.ones(1)})


@pytest.mark.parametrize(
    "bad_id, error, message",
    [
        (True, TypeError, "bool"),
        (1.5, TypeError, "float"),
        (None, TypeError, "NoneType"),
        ("", ValueError, "non-empty"),
    ],
)
def test_profile_bad_user_id(bad_id, error, message):
    with pytest.raises(error, match=message):
        make_profile(bad_id)


def test_check_compatible():
    profile = make_profile("u", [0.25] * 4, config_hash="aaaa")
    profile.check_compatible(4, "aaaa")
    profile.check_compatible(4, None)
    with pytest.raises(
        ValueError, match="fitted for a model with K=4 experts, this model has K=8: refit with fit_user_weights"
    ):
        profile.check_compatible(8, "aaaa")
    with pytest.raises(ValueError, match="config fingerprint aaaa, this model has bbbb"):
        profile.check_compatible(4, "bbbb")


def test_from_dict_rejects_newer_schema_and_unknown_fields():
    data = make_profile("u").to_dict()
    with pytest.raises(ValueError, match="upgrade trl_moe_rm"):
        UserProfile.from_dict({**data, "schema_version": PROFILE_SCHEMA_VERSION + 1})
    with pytest.raises(ValueError, match="unknown field"):
        UserProfile.from_dict({**data, "surprise": 1})


# ----------------------------------------------------------------------------------------------------------------------
# config_fingerprint
# ----------------------------------------------------------------------------------------------------------------------


class FakeConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def to_dict(self):
        return dict(self.kwargs)


def test_config_fingerprint_ignores_volatile_keys():
    base = {"num_experts": 8, "hidden_size": 16, "id2label": {0: "LABEL_0"}, "text_config": {"layers": 2}}
    noisy = {
        **base,
        "id2label": {"0": "LABEL_0"},  # keys as written to JSON
        "_name_or_path": "/somewhere/else",
        "transformers_version": "9.9.9",
        "torch_dtype": "bfloat16",
        "dtype": torch.float16,
        "architectures": ["MoERewardModel"],
        "auto_map": {"AutoModel": "x.Y"},
        "_commit_hash": "deadbeef",
        "pad_token_id": 3,
        "eos_token_id": [1, 2],
        "bos_token_id": 0,
        "text_config": {"layers": 2, "_name_or_path": "sub", "torch_dtype": "float32"},
    }
    fingerprint = config_fingerprint(base)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert config_fingerprint(noisy) == fingerprint
    assert config_fingerprint(FakeConfig(**noisy)) == fingerprint
    assert config_fingerprint({**base, "num_experts": 4}) != fingerprint
    assert config_fingerprint({**base, "text_config": {"layers": 3}}) != fingerprint
    with pytest.raises(TypeError, match="to_dict"):
        config_fingerprint(42)


# ----------------------------------------------------------------------------------------------------------------------
# ProfileStore basics
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_round_trip(tmp_path, fmt):
    store = ProfileStore(tmp_path / "profiles", format=fmt)
    assert not (tmp_path / "profiles").exists()  # nothing is created before the first write
    assert store.list() == [] and len(store) == 0
    profiles = [
        make_profile("alice", (0.1, 0.2, 0.7), method="hedge", num_shots=8, metadata={"lang": "fr", "n": [1, 2]}),
        make_profile(3, (1.0, 0.0, 0.0), mode="routed", beta=0.5, config_hash="0123456789abcdef"),
        make_profile(-12, (0.3, 0.3, 0.4)),
        make_profile("3", (0.0, 0.5, 0.5)),  # distinct from the int 3
        make_profile("Émilie ☃", (0.2, 0.2, 0.6)),
    ]
    store.save(profiles[0])
    store.save_many(profiles[1:])
    assert store.list() == [-12, 3, "3", "alice", "Émilie ☃"]
    assert list(store) == store.list()
    assert len(store) == 5
    reopened = ProfileStore(tmp_path / "profiles", format=fmt)
    for profile in profiles:
        assert_same_profile(reopened.load(profile.user_id), profile)
    assert list(reopened.as_dict()) == store.list()
    assert isinstance(reopened.load(3).user_id, int) and isinstance(reopened.load("3").user_id, str)

    # overwrite
    store.save(make_profile("alice", (0.6, 0.2, 0.2), method="gradient"))
    assert reopened.load("alice").method == "gradient"
    assert len(store) == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_contains_get_delete(tmp_path, fmt):
    store = ProfileStore(tmp_path, format=fmt)
    store.save_many([make_profile(1), make_profile("bob")])
    assert 1 in store and "bob" in store
    assert "1" not in store and 2 not in store and True not in store and 1.0 not in store
    assert store.get("nobody") is None
    assert store.get("nobody", "fallback") == "fallback"
    assert store.get("bob").user_id == "bob"
    store.delete(1)
    assert store.list() == ["bob"] and 1 not in store
    with pytest.raises(UnknownUserError, match=r"no profile for user 1 in ProfileStore\(") as info:
        store.delete(1)
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError, match="'carol'.*ProfileStore"):
        store.load("carol")
    store.delete("bob")
    assert store.list() == []


def test_store_rejects_duplicates_and_mixed_k_in_table(tmp_path):
    store = ProfileStore(tmp_path / "table", format="safetensors")
    with pytest.raises(ValueError, match="duplicate user id 'a'"):
        store.save_many([make_profile("a"), make_profile("a")])
    with pytest.raises(ValueError, match="same number of experts"):
        store.save_many([make_profile("a"), make_profile("b", (0.5, 0.5))])
    assert not (tmp_path / "table" / "profiles.safetensors").exists()
    with pytest.raises(ValueError, match="format must be one of"):
        ProfileStore(tmp_path, format="pickle")


def test_store_format_mismatch_is_detected(tmp_path):
    ProfileStore(tmp_path, format="safetensors").save(make_profile("a"))
    with pytest.raises(ProfileStoreError, match="format='safetensors'"):
        ProfileStore(tmp_path, format="json")


# ----------------------------------------------------------------------------------------------------------------------
# Exact user ids
# ----------------------------------------------------------------------------------------------------------------------


def test_lookup_profile_never_aliases_ids(tmp_path):
    one, text_one = make_profile(1), make_profile("1")
    profiles = {1: one, "1": text_one}
    assert lookup_profile(profiles, 1) is one and lookup_profile(profiles, "1") is text_one
    assert lookup_profile(profiles, np.int64(1)) is one
    assert lookup_profile({1: one}, 2, "default") == "default"
    for alias in (True, 1.0):  # a plain dict lookup would find user 1
        with pytest.raises(TypeError, match="user_id must be a str or an int, got"):
            lookup_profile(profiles, alias)
    assert lookup_profile({1.0: one}, 1) is one  # an aliasing key, but the profile is user 1's own
    assert lookup_profile({True: text_one}, 1) is None  # an equal key holding another user's profile
    store = ProfileStore(tmp_path, format="safetensors")
    store.save(one)
    assert lookup_profile(store, 1).user_id == 1 and lookup_profile(store, "1") is None
    with pytest.raises(TypeError, match="got the bool True"):
        lookup_profile(store, True)


def test_user_rewards_never_alias_ids():
    from tiny import tiny_moe, tiny_tokenizer

    from trl_moe_rm import UserRewards

    rewards = UserRewards(tiny_moe("llama", tiny_tokenizer()), {1: UserProfile(1, [1.0, 0.0, 0.0, 0.0])})
    assert rewards.weights_for(1)[0].tolist() == [1.0, 0.0, 0.0, 0.0]  # cached for the int 1 only
    for alias in (True, 1.0):
        with pytest.raises(TypeError, match="user_id must be a str or an int"):
            rewards.weights_for(alias)
    assert rewards.weights_for("1")[0] is None and rewards.fallbacks_by_user == {"1": 1}


# ----------------------------------------------------------------------------------------------------------------------
# Hostile JSON
# ----------------------------------------------------------------------------------------------------------------------


def _nested(depth: int) -> dict:
    root = node = {}
    for _ in range(depth - 1):
        node["x"] = {}
        node = node["x"]
    return root


def _plant(store: ProfileStore, payload: str) -> None:
    """Rewrites alice's stored profile with `payload` (raw JSON text) as its metadata."""
    if store.format == "json":
        path = store.directory / next(p.name for p in store.directory.iterdir() if p.suffix == ".json")
        data = json.loads(path.read_text())
        data["metadata"] = "PAYLOAD"
        path.write_text(json.dumps(data).replace('"PAYLOAD"', payload))
    else:
        record = {
            k: v for k, v in make_profile("alice").to_dict().items() if k not in ("expert_weights", "schema_version")
        }
        record["metadata"] = "PAYLOAD"
        metadata = {
            "format": "trl_moe_rm.profiles",
            "schema_version": "1",
            "profiles": json.dumps([record]).replace('"PAYLOAD"', payload),
        }
        store.table_path.write_bytes(safetensors_save({"expert_weights": torch.tensor([[0.5, 0.25, 0.25]])}, metadata))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "payload, message",
    [
        ("[" * 100_000 + "]" * 100_000, "deeper than Python's recursion limit"),
        ("[" * 200 + "]" * 200, "more than 34 levels deep"),
        ("1" * 5000, r"an integer of 5000 digits \(at most 4300\)"),
    ],
    ids=["100k_deep", "200_deep", "5000_digits"],
)
def test_hostile_profile_json_is_a_profile_store_error(tmp_path, fmt, payload, message):
    store = ProfileStore(tmp_path, format=fmt)
    store.save(make_profile("alice"))
    _plant(store, payload)
    before = snapshot(tmp_path)
    with pytest.raises(ProfileStoreError, match=message):
        store.load("alice")
    with pytest.raises(ProfileStoreError, match=message):
        ProfileStore.from_pretrained(tmp_path).as_dict()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("fmt", FORMATS)
def test_metadata_nesting_is_bounded(tmp_path, fmt):
    with pytest.raises(ValueError, match="more than 32 levels deep"):
        make_profile("a", metadata=_nested(33))
    store = ProfileStore(tmp_path, format=fmt)
    store.save(make_profile("a", metadata=_nested(32)))  # the deepest allowed round-trips
    assert store.load("a").metadata == _nested(32)


# ----------------------------------------------------------------------------------------------------------------------
# Concurrent writers
# ----------------------------------------------------------------------------------------------------------------------

# Each writer saves its 150 users one by one into the same table, once both are ready (same package bootstrap as
# `_KILL_CHILD` below).
_WRITER_CHILD = r"""
import os, sys, time, types
repo, store_dir, ready, go, first = sys.argv[1:6]
package = types.ModuleType("trl_moe_rm")
package.__path__ = [os.path.join(repo, "trl_moe_rm")]
sys.modules["trl_moe_rm"] = package
from trl_moe_rm.profiles import ProfileStore, UserProfile

store = ProfileStore(store_dir, format="safetensors")
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
for user in range(int(first), int(first) + 150):
    store.save(UserProfile(user, [0.5, 0.25, 0.25]))
"""


def test_concurrent_table_writers_keep_every_user(tmp_path):
    store_dir, go = tmp_path / "store", tmp_path / "go"
    children = {
        first: subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER_CHILD,
                str(REPO_ROOT),
                str(store_dir),
                str(tmp_path / f"ready{first}"),
                str(go),
                str(first),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for first in (0, 1000)
    }
    try:
        while not all((tmp_path / f"ready{first}").exists() for first in children):  # both start saving together
            failed = [child for child in children.values() if child.poll() is not None]
            if failed:
                pytest.fail(f"a writer exited before saving: {failed[0].stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        go.touch()
        for child in children.values():
            _, err = child.communicate(timeout=600)
            assert child.returncode == 0, err.decode()[-2000:]
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    store = ProfileStore.from_pretrained(store_dir)
    assert store.list() == [*range(150), *range(1000, 1150)]  # no lost update
    store.save_pretrained(tmp_path / "copy")  # the lock file is the store's, not a profile: it is not copied
    assert [p.name for p in (tmp_path / "copy" / "profiles").iterdir()] == ["profiles.safetensors"]


# ----------------------------------------------------------------------------------------------------------------------
# Corruption, schema versions, path safety, permissions
# ----------------------------------------------------------------------------------------------------------------------


def test_corrupt_json_file_raises_and_is_left_unchanged(tmp_path):
    store = ProfileStore(tmp_path)
    store.save(make_profile("alice"))
    (path,) = [p for p in tmp_path.iterdir()]
    garbage = b'{"schema_version": 1, "user_id": "alice", "expert_wei'
    path.write_bytes(garbage)
    before = snapshot(tmp_path)
    with pytest.raises(ProfileStoreError, match="delete it or re-save the profile") as info:
        store.load("alice")
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    assert snapshot(tmp_path) == before
    # a file whose content belongs to another user (copied by hand) is a mismatch
    other = make_profile("mallory").to_dict()
    path.write_text(json.dumps(other))
    with pytest.raises(ProfileStoreError, match="holds user 'mallory'"):
        store.load("alice")
    # re-saving fixes it
    store.save(make_profile("alice"))
    assert store.load("alice").user_id == "alice"


def test_corrupt_table_raises_and_is_left_unchanged(tmp_path):
    store = ProfileStore(tmp_path, format="safetensors")
    store.save_many([make_profile("a"), make_profile("b")])
    table = tmp_path / "profiles.safetensors"
    table.write_bytes(table.read_bytes()[:-7])  # truncated
    before = snapshot(tmp_path)
    with pytest.raises(ProfileStoreError, match="profiles.safetensors.*delete it or re-save"):
        store.load("a")
    with pytest.raises(ProfileStoreError):
        store.save(make_profile("c"))  # never overwrite a table we cannot read (other users' data)
    assert snapshot(tmp_path) == before


def test_schema_version_too_new(tmp_path):
    store = ProfileStore(tmp_path / "json")
    store.save(make_profile(5))
    path = tmp_path / "json" / "i-5.json"
    data = json.loads(path.read_text())
    data["schema_version"] = PROFILE_SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileStoreError, match=r"schema_version=2, newer.*upgrade trl_moe_rm"):
        store.load(5)

    table_dir = tmp_path / "table"
    table_dir.mkdir()
    metadata = {"format": "trl_moe_rm.profiles", "schema_version": "2", "profiles": "[]"}
    (table_dir / "profiles.safetensors").write_bytes(
        safetensors_save({"expert_weights": torch.zeros(0, 3)}, metadata=metadata)
    )
    with pytest.raises(ProfileStoreError, match="upgrade trl_moe_rm"):
        ProfileStore(table_dir, format="safetensors").list()


def test_table_with_nan_weights_is_rejected(tmp_path):
    metadata = {
        "format": "trl_moe_rm.profiles",
        "schema_version": "1",
        "profiles": json.dumps([{"user_id": "a"}]),
    }
    (tmp_path / "profiles.safetensors").write_bytes(
        safetensors_save({"expert_weights": torch.tensor([[math.nan, 1.0]])}, metadata=metadata)
    )
    with pytest.raises(ProfileStoreError, match="NaN"):
        ProfileStore(tmp_path, format="safetensors").load("a")


@pytest.mark.parametrize(
    "user_id", ["../../etc/passwd", "a/b", "a\\b", "nul\x00byte", "..", ".", "/abs", "C:\\x", "~", "A", "a"]
)
def test_path_traversal_ids_stay_inside(tmp_path, user_id):
    store_dir = tmp_path / "store"
    store = ProfileStore(store_dir)
    store.save(make_profile(user_id))
    files = list(store_dir.iterdir())
    assert len(files) == 1
    assert files[0].resolve().parent == store_dir.resolve()
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["store", files[0].name])
    assert store.list() == [user_id]
    assert store.load(user_id).user_id == user_id


def test_case_sensitive_ids_get_distinct_files(tmp_path):
    store = ProfileStore(tmp_path)
    store.save_many([make_profile("Alice"), make_profile("alice"), make_profile("ALICE")])
    names = [p.name.lower() for p in tmp_path.iterdir()]
    assert len(set(names)) == 3  # no collision even on case-insensitive file systems
    assert store.list() == ["ALICE", "Alice", "alice"]


def test_too_long_id_for_a_file_name(tmp_path):
    long_id = "x" * 300
    store = ProfileStore(tmp_path / "json")
    with pytest.raises(ValueError, match="too long.*format='safetensors'"):
        store.save(make_profile(long_id))
    assert long_id not in store and store.get(long_id) is None
    table = ProfileStore(tmp_path / "table", format="safetensors")
    table.save(make_profile(long_id))
    assert table.list() == [long_id]


def test_list_ignores_temp_and_foreign_files(tmp_path):
    store = ProfileStore(tmp_path)
    store.save(make_profile(1))
    (tmp_path / ".i-2.json.0123456789abcdef.tmp").write_text("{}")
    (tmp_path / "README.md").write_text("hello")
    (tmp_path / "i-007.json").write_text("{}")  # not a canonical name
    assert store.list() == [1]


def test_store_path_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ProfileStoreNotWritableError, match="existing file"):
        ProfileStore(path)


def _can_write(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("fmt", FORMATS)
def test_read_only_directory(tmp_path, fmt):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o500)
    try:
        if _can_write(directory):
            pytest.skip("running with privileges that ignore directory permissions (root)")
        store = ProfileStore(directory, format=fmt)
        with pytest.raises(ProfileStoreNotWritableError, match=str(directory)) as info:
            store.save(make_profile("a"))
        assert isinstance(info.value, PermissionError)
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o700)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unwritable_directory_is_detected_before_writing(tmp_path, fmt, monkeypatch):
    # Same check as above, forced through os.access so that it also runs as root.
    store = ProfileStore(tmp_path, format=fmt)
    store.save(make_profile("a"))
    before = snapshot(tmp_path)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(ProfileStoreNotWritableError, match="is not writable"):
        store.save(make_profile("b"))
    with pytest.raises(ProfileStoreNotWritableError):
        store.delete("a")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_save_and_load_pretrained(tmp_path, fmt):
    store = ProfileStore(tmp_path / "work", format=fmt)
    store.save_many([make_profile(1), make_profile("u2", (0.2, 0.3, 0.5))])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"")
    assert store.save_pretrained(model_dir) == model_dir / "profiles"

    for source in (model_dir, model_dir / "profiles", str(model_dir)):
        loaded = ProfileStore.from_pretrained(source)
        assert loaded.format == fmt
        assert loaded.list() == [1, "u2"]
        assert_same_profile(loaded.load("u2"), store.load("u2"))

    # save_pretrained mirrors: a deleted user disappears from the export
    store.delete(1)
    store.save_pretrained(model_dir)
    assert ProfileStore.from_pretrained(model_dir).list() == ["u2"]


def test_save_pretrained_switching_format_leaves_one_format(tmp_path):
    ProfileStore(tmp_path / "a", format="safetensors").save(make_profile("x"))
    ProfileStore(tmp_path / "a", format="safetensors").save_pretrained(tmp_path / "model")
    ProfileStore(tmp_path / "b").save(make_profile("y"))
    ProfileStore(tmp_path / "b").save_pretrained(tmp_path / "model")
    loaded = ProfileStore.from_pretrained(tmp_path / "model")
    assert loaded.format == "json" and loaded.list() == ["y"]


@pytest.mark.parametrize("name", ["profiles.pkl", "evil.pickle", "pytorch_model.bin", "weights.pt"])
def test_from_pretrained_refuses_pickle_files(tmp_path, name):
    ProfileStore(tmp_path / "model" / "profiles").save(make_profile("a"))
    (tmp_path / "model" / "profiles" / name).write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ProfileStoreError, match="never unpickled"):
        ProfileStore.from_pretrained(tmp_path / "model")


def test_from_pretrained_missing_profiles(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no profiles found"):
        ProfileStore.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ProfileStore.from_pretrained(str(tmp_path / "nope"))


def test_from_pretrained_hub(tmp_path, monkeypatch):
    import huggingface_hub

    snapshot_dir = tmp_path / "snapshot"
    ProfileStore(tmp_path / "src", format="safetensors").save(make_profile("hub-user"))
    ProfileStore(tmp_path / "src", format="safetensors").save_pretrained(snapshot_dir)
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(snapshot_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    store = ProfileStore.from_pretrained("org/model", revision="v1", token="tok")
    assert store.list() == ["hub-user"]
    assert calls == [{"repo_id": "org/model", "revision": "v1", "token": "tok", "allow_patterns": ["profiles/*"]}]


# ----------------------------------------------------------------------------------------------------------------------
# Crash safety
# ----------------------------------------------------------------------------------------------------------------------


def test_atomic_write_helpers(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    assert is_temp_file(".f.txt.0123.tmp") and not is_temp_file("f.txt")
    with pytest.raises(TypeError, match="atomic_write_text"):
        atomic_write_bytes(target, "str")


# The child imports the two modules without running the package `__init__` (which pulls in transformers and the
# trainer, several seconds on a small machine); what is tested is exactly `profiles.py` and `io_utils.py`.
_KILL_CHILD = r"""
import os, sys, time, types
repo, store_dir, fmt, marker = sys.argv[1:5]
package = types.ModuleType("trl_moe_rm")
package.__path__ = [os.path.join(repo, "trl_moe_rm")]
sys.modules["trl_moe_rm"] = package
from trl_moe_rm.profiles import ProfileStore, UserProfile

store = ProfileStore(store_dir, format=fmt)

def hanging_fsync(fd):
    with open(marker, "w") as handle:
        handle.write("writing")
    time.sleep(120)

os.fsync = hanging_fsync
store.save(UserProfile("alice", [0.9, 0.05, 0.05], method="new"))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_during_save_keeps_old_profile(tmp_path, fmt):
    store_dir = tmp_path / "store"
    store = ProfileStore(store_dir, format=fmt)
    old_alice = make_profile("alice", (0.1, 0.2, 0.7), method="old")
    bob = make_profile("bob", (0.3, 0.3, 0.4))
    store.save_many([old_alice, bob])
    before = snapshot(store_dir)

    marker = tmp_path / "marker"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_CHILD, str(REPO_ROOT), str(store_dir), fmt, str(marker)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"child exited early ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("child never reached fsync")
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    # The new version was fully written to a temp file but never moved into place...
    leftovers = [p for p in store_dir.iterdir() if p.name not in before]
    assert len(leftovers) == 1 and is_temp_file(leftovers[0].name)
    # ...so every profile file is byte-for-byte the old one, and the store still reads the old profiles.
    assert {name: data for name, data in snapshot(store_dir).items() if name in before} == before
    reopened = ProfileStore(store_dir, format=fmt)
    assert reopened.list() == ["alice", "bob"]
    assert_same_profile(reopened.load("alice"), old_alice)
    assert_same_profile(reopened.load("bob"), bob)
    # and the store keeps working afterwards
    reopened.save(make_profile("alice", (0.9, 0.05, 0.05), method="new"))
    assert reopened.load("alice").method == "new"
