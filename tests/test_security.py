"""
Security properties of the load paths:

- nothing in `trl_moe_rm` can unpickle: a static scan of the package source (no pickle-family imports, `torch.load`
  only with `weights_only=True`, no `allow_pickle=True`, no `.bin` / `.pt` weights read), and a dynamic check that the
  loaders never call a pickle loader and refuse a folder holding a (booby-trapped) pickle without opening it;
- weights are read only from safetensors checked by content: a pickle behind a weights index, a `.safetensors` name,
  a symlink or a Hub download is refused before anything reads it;
- `trust_remote_code` is never turned on silently: every default is `False` and no call in the package passes `True`;
- a user id cannot escape the profile store directory (`../../etc/passwd`, absolute paths, separators, NUL, ...).
"""

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from test_hub import fake_hub  # noqa: F401  (fixture)
from tiny import separable_dataset, tiny_args, tiny_moe, tiny_tokenizer

import trl_moe_rm
from trl_moe_rm import MoERewardTrainer, ProfileStore, UserProfile
from trl_moe_rm.checkpoints import load_moe_reward_model
from trl_moe_rm.hub import UnsafeFilesError, UnsafeWeightsError, load_from_hub, push_moe_reward_model
from trl_moe_rm.safety import check_safetensors_file


PACKAGE = Path(trl_moe_rm.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def parsed_sources():
    for path in SOURCES:
        yield path.relative_to(PACKAGE.parent), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def dotted(node: ast.AST) -> str:
    """`torch.load` for `torch.load(...)`'s function, `np.load` etc.; '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def keyword_value(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


# ----------------------------------------------------------------------------------------------------------------------
# No pickle on any load path
# ----------------------------------------------------------------------------------------------------------------------


def test_the_scan_sees_the_whole_package():
    names = {path.name for path in SOURCES}
    assert {"checkpoints.py", "feature_cache.py", "profiles.py", "trainer.py", "cli.py"} <= names


def test_no_pickle_family_module_is_imported():
    found = []
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [
                    f"{path}:{node.lineno} import {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] in PICKLE_MODULES
                ]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
                found.append(f"{path}:{node.lineno} from {node.module} import ...")
            elif isinstance(node, ast.Call) and dotted(node.func).split(".")[0] in PICKLE_MODULES:
                found.append(f"{path}:{node.lineno} {dotted(node.func)}(...)")
    assert not found, found


def test_every_torch_load_is_weights_only_and_numpy_never_allows_pickle():
    found = []
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            if name.endswith("torch.load") or name == "load" and isinstance(node.func, ast.Name):
                if keyword_value(node, "weights_only") is not True:
                    found.append(f"{path}:{node.lineno} {name}(...) without weights_only=True")
            if keyword_value(node, "weights_only") is False or keyword_value(node, "allow_pickle") is True:
                found.append(f"{path}:{node.lineno} {name}(...) allows pickles")
            if keyword_value(node, "use_safetensors") is False:
                found.append(f"{path}:{node.lineno} {name}(...) with use_safetensors=False")
    assert not found, found


def test_no_pickle_weights_file_is_opened_by_name():
    # `.bin` / `.pt` names may only appear as names to *detect* or *refuse* (checkpoints.WEIGHTS_FILES, the hub's
    # refusal lists), never as an argument of a call that reads a file.
    readers = {"open", "load", "load_file", "load_state_dict", "safe_open", "from_file", "read_bytes", "read_text"}
    found = []
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and dotted(node.func).split(".")[-1] in readers:
                for argument in ast.walk(node):
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                        if argument.value.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")):
                            found.append(f"{path}:{node.lineno} reads {argument.value!r}")
    assert not found, found


@pytest.fixture
def saved_model(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    store = ProfileStore(tmp_path / "model" / "profiles")
    store.save(UserProfile(user_id="alice", expert_weights=[0.25] * 4))
    return tmp_path / "model"


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling (or any non-weights-only `torch.load`) during the test fails it."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was loaded")

    def safe_torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True")
        return original_torch_load(*args, **kwargs)

    original_torch_load = torch.load
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", safe_torch_load)


def test_load_paths_never_unpickle(saved_model, tmp_path, no_unpickling):
    model = load_moe_reward_model(saved_model)
    assert type(model).__name__ == "MoERewardModel"
    store = ProfileStore.from_pretrained(saved_model)
    assert store.load("alice").expert_weights == [0.25] * 4
    # The on-disk feature cache is safetensors, read back without pickle.
    tokenizer = tiny_tokenizer()
    args = tiny_args(
        tmp_path / "run", freeze_backbone=True, cache_features=True, feature_cache_dir=str(tmp_path / "cache")
    )
    for _ in range(2):  # the second trainer loads the cache written by the first
        torch.manual_seed(0)
        MoERewardTrainer(
            model=tiny_moe("llama", tokenizer),
            args=args,
            train_dataset=separable_dataset(4),
            processing_class=tokenizer,
        )
    assert [path.suffix for path in (tmp_path / "cache").iterdir()] == [".safetensors"]


class _Trap:
    """Unpickling this object writes a file: the proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "extra.pkl"])
def test_a_booby_trapped_pickle_is_refused_unopened(saved_model, tmp_path, name):
    proof = tmp_path / "executed"
    (saved_model / name).write_bytes(pickle.dumps(_Trap(str(proof))))
    with pytest.raises(ValueError, match="pickle"):
        load_moe_reward_model(saved_model)
    assert not proof.exists()


def test_a_pickle_among_profiles_is_refused_unopened(saved_model, tmp_path):
    proof = tmp_path / "executed"
    (saved_model / "profiles" / "profiles.pkl").write_bytes(pickle.dumps(_Trap(str(proof))))
    with pytest.raises(ValueError, match="pickle"):
        ProfileStore.from_pretrained(saved_model)
    assert not proof.exists()


# ----------------------------------------------------------------------------------------------------------------------
# Weights are safetensors by content, whatever points to them
# ----------------------------------------------------------------------------------------------------------------------


def _index_to(folder: Path, target: str) -> None:
    """Replaces the folder's weights by an index whose weight map points every tensor to `target`."""
    keys = list(json.loads(_header(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    weight_map = {key: target for key in keys if key != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _header(path: Path) -> str:
    raw = path.read_bytes()
    return raw[8 : 8 + int.from_bytes(raw[:8], "little")].decode()


def test_an_index_pointing_to_torch_save_weights_is_refused(saved_model):
    """The reproduction of issue 13: a `torch.save` state dict behind a weights index loaded (unpickled) before."""
    state_dict = load_moe_reward_model(saved_model).state_dict()
    torch.save(state_dict, saved_model / "weights.data")
    _index_to(saved_model, "weights.data")
    with pytest.raises(UnsafeWeightsError, match=r"points to 'weights\.data', which is not a \.safetensors file"):
        load_moe_reward_model(saved_model)
    # Named .safetensors, the same bytes are refused by content.
    (saved_model / "weights.data").rename(saved_model / "weights.safetensors")
    index = json.loads((saved_model / "model.safetensors.index.json").read_text())
    index["weight_map"] = dict.fromkeys(index["weight_map"], "weights.safetensors")
    (saved_model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeWeightsError, match="zip archive, as written by torch.save"):
        load_moe_reward_model(saved_model)


@pytest.mark.parametrize("where", ["index", "suffix", "symlink", "hub_snapshot"])
def test_a_booby_trapped_pickle_behind_every_path_is_refused_unopened(
    saved_model,
    tmp_path,
    fake_hub,  # noqa: F811
    where,
):
    proof = tmp_path / "executed"
    trap = pickle.dumps(_Trap(str(proof)))
    target = saved_model
    if where == "index":  # a sharded index whose shards are a pickle with a .safetensors name
        (saved_model / "model-00001-of-00001.safetensors").write_bytes(trap)
        _index_to(saved_model, "model-00001-of-00001.safetensors")
    elif where == "suffix":  # the name says safetensors, the content is a pickle
        (saved_model / "model.safetensors").write_bytes(trap)
    elif where == "symlink":  # the weights file is a link to a pickle outside the folder
        (tmp_path / "elsewhere.pkl").write_bytes(trap)
        (saved_model / "model.safetensors").unlink()
        (saved_model / "model.safetensors").symlink_to(tmp_path / "elsewhere.pkl")
    else:  # a Hub repository whose model.safetensors is a pickle: downloaded, never read
        push_moe_reward_model(saved_model, "me/trapped", token="t")
        fake_hub.repos["me/trapped"]["model.safetensors"] = trap
        target = "me/trapped"
    with pytest.raises(UnsafeWeightsError, match="cannot be read as safetensors .*it is a pickle"):
        load_moe_reward_model(target)
    with pytest.raises(UnsafeFilesError):
        load_from_hub(target)
    assert not proof.exists()


def test_an_adapter_whose_base_backbone_hides_a_pickle_is_refused(tmp_path):
    """The adapter config points to the backbone: its weights are checked like the model's."""
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_llama_config
    from transformers import AutoModel

    from trl_moe_rm import MoERewardModel

    tokenizer = tiny_tokenizer()
    backbone = tmp_path / "backbone"
    AutoModel.from_config(tiny_llama_config(len(tokenizer))).save_pretrained(backbone)
    model = MoERewardModel.from_backbone(str(backbone), num_experts=4, top_k=2)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["router", "experts"])
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    model.config.save_pretrained(tmp_path / "adapter")
    assert load_moe_reward_model(tmp_path / "adapter") is not None

    proof = tmp_path / "executed"
    (backbone / "model-00001-of-00001.safetensors").write_bytes(pickle.dumps(_Trap(str(proof))))
    _index_to(backbone, "model-00001-of-00001.safetensors")
    with pytest.raises(UnsafeWeightsError, match="model-00001-of-00001.safetensors"):
        load_moe_reward_model(tmp_path / "adapter")
    assert not proof.exists()


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "fewer than the 8"),
        (b"\x00" * 32, r"header length \(0 bytes\)"),
        (_with_header(b"not json!"), "header is not JSON"),
        (_with_header(b"[]"), "not a JSON object"),
        (_with_header(b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', b"\x00" * 4), "tensor 'w'"),
        (_with_header(b'{"__metadata__": {"n": 1}}'), "__metadata__"),
    ],
)
def test_the_safetensors_check_names_what_is_wrong(tmp_path, content, reason):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(UnsafeWeightsError, match=reason):
        check_safetensors_file(path)


def test_a_real_safetensors_file_passes_the_check(saved_model):
    check_safetensors_file(saved_model / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------------------
# trust_remote_code is never turned on silently
# ----------------------------------------------------------------------------------------------------------------------


def test_no_call_in_the_package_passes_trust_remote_code_true():
    found = []
    for path, tree in parsed_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and keyword_value(node, "trust_remote_code") is True:
                found.append(f"{path}:{node.lineno}")
            if isinstance(node, ast.Dict):  # e.g. model_init_kwargs = {"trust_remote_code": True}
                for key, value in zip(node.keys, node.values):
                    if getattr(key, "value", None) == "trust_remote_code" and getattr(value, "value", None) is True:
                        found.append(f"{path}:{node.lineno}")
    assert not found, found


def test_trust_remote_code_defaults_to_false(tmp_path):
    args = tiny_args(tmp_path)
    assert args.trust_remote_code is False
    from trl_moe_rm.scripts.train import parse_args

    _, training_args, model_args = parse_args(
        ["--output_dir", str(tmp_path), "--model_name_or_path", "x", "--use_cpu", "--bf16", "false"]
    )
    assert training_args.trust_remote_code is False
    assert getattr(model_args, "trust_remote_code", False) is False


def test_loading_paths_pass_trust_remote_code_false(saved_model, tmp_path, monkeypatch):
    """Record the kwargs every `from_pretrained` receives on the package's load paths."""
    import transformers

    from trl_moe_rm import MoERewardModel
    from trl_moe_rm.cli import _load_model_and_tokenizer

    seen = []

    def recorder(original):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return original(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(MoERewardModel, "from_pretrained", recorder(MoERewardModel.from_pretrained))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recorder(transformers.AutoModel.from_pretrained))
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", recorder(transformers.AutoTokenizer.from_pretrained)
    )
    load_moe_reward_model(saved_model)
    _load_model_and_tokenizer(str(saved_model))
    # The trainer built from a checkpoint name: `from_backbone` -> `AutoModel.from_pretrained`.
    backbone = tmp_path / "backbone"
    tiny_moe("llama", tiny_tokenizer()).backbone.save_pretrained(backbone)
    tiny_tokenizer().save_pretrained(backbone)
    MoERewardTrainer(model=str(backbone), args=tiny_args(tmp_path / "run"), train_dataset=separable_dataset(4))
    assert len(seen) >= 4
    assert all(value in (None, False) for value in seen), seen
    assert False in seen  # the trainer passes its (False) `trust_remote_code` explicitly


# ----------------------------------------------------------------------------------------------------------------------
# Profile paths are confined to their store
# ----------------------------------------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../etc/passwd",
    "../escape",
    "/etc/passwd",
    "..",
    ".",
    "a/b",
    "a\\..\\..\\b",
    "C:\\Windows\\system32",
    "name\x00.json",
    "~root",
    "profiles.safetensors",
    "s-abc.json",
    "i-1",
    "ünïcødé/../../x",
    "x" * 150,
]


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*")}


@pytest.mark.parametrize("store_format", ["json", "safetensors"])
def test_hostile_user_ids_stay_inside_the_store(tmp_path, store_format):
    root = tmp_path / "root"
    store_dir = root / "models" / "m" / "profiles"
    store_dir.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0")
    before = files_under(root)
    store = ProfileStore(store_dir, format=store_format)
    cwd = os.getcwd()
    os.chdir(store_dir)  # relative ids must not resolve against the working directory either
    try:
        for index, user_id in enumerate(HOSTILE_IDS):
            weights = [0.0] * 4
            weights[index % 4] = 1.0
            store.save(UserProfile(user_id=user_id, expert_weights=weights))
            assert store.load(user_id).expert_weights == weights
            assert user_id in store
    finally:
        os.chdir(cwd)
    created = files_under(root) - before
    assert created and all(path.startswith(str(Path("models", "m", "profiles")) + os.sep) for path in created), created
    for path in created:  # flat: no sub-directory was created from an id
        assert os.sep not in str(Path(path).relative_to(Path("models", "m", "profiles")))
    assert (root / "etc" / "passwd").read_text() == "root:x:0:0"
    assert sorted(store.list(), key=str) == sorted(HOSTILE_IDS, key=str)
    reopened = ProfileStore.from_pretrained(store_dir)
    assert {profile.user_id for profile in reopened.as_dict().values()} == set(HOSTILE_IDS)
    if store_format == "json":  # every file name is the injective encoding, never the raw id
        names = [Path(path).name for path in created]
        assert all(name.startswith(("s-", "i-")) and name.endswith(".json") for name in names)
        assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz234567-.json") for name in names)
    # Deleting a hostile id removes only its own file.
    store.delete("../../etc/passwd")
    assert "../../etc/passwd" not in store and (root / "etc" / "passwd").exists()


def test_an_id_too_long_for_a_file_name_is_rejected_cleanly(tmp_path):
    store = ProfileStore(tmp_path / "profiles")
    with pytest.raises(ValueError, match="too long"):
        store.save(UserProfile(user_id="y" * 1000, expert_weights=[1.0]))
    assert not (tmp_path / "profiles").exists() or not any((tmp_path / "profiles").iterdir())
    with pytest.raises(KeyError):
        store.load("y" * 1000)


def test_a_symlinked_profile_is_replaced_not_followed(tmp_path):
    store = ProfileStore(tmp_path / "profiles")
    store.save(UserProfile(user_id="mallory", expert_weights=[1.0, 0.0]))
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"do not": "touch"}))
    (path,) = (tmp_path / "profiles").iterdir()
    path.unlink()
    path.symlink_to(outside)
    store.save(UserProfile(user_id="mallory", expert_weights=[0.0, 1.0]))
    assert json.loads(outside.read_text()) == {"do not": "touch"}
    assert not path.is_symlink() and store.load("mallory").expert_weights == [0.0, 1.0]
