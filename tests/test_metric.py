"""Tests of the `pairwise_accuracy` evaluate metric and of the `RewardTrainer` glue in `trl_moe_rm.metrics`."""

import ast
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from trl_moe_rm.accuracy import bootstrap_ci, pairwise_outcomes
from trl_moe_rm.metrics import (
    PAIRWISE_ACCURACY_PATH,
    load_pairwise_accuracy,
    pair_rewards_for_metrics,
    reward_compute_metrics,
)


OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}

CHOSEN = [2.0, 1.0, 0.0, 3.0, 0.5, -1.0]
REJECTED = [1.0, 2.0, 0.0, 0.5, 0.25, -2.0]  # outcomes: 1, 0, 0.5, 1, 1, 1
GROUPS = ["chat", "chat", "safety", "safety", "reasoning", "reasoning"]


def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this test")


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Marks the Hub offline and makes every socket connection fail."""
    for name, value in OFFLINE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(socket.socket, "connect", _no_network)


@pytest.fixture(scope="module")
def metric():
    """The metric, loaded offline from its local directory, in memory (a failed `compute` leaves no file lock)."""
    import evaluate

    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline(monkeypatch)
        yield evaluate.load(PAIRWISE_ACCURACY_PATH, keep_in_memory=True)


# ------------------------------------------------------------------------------------------------------------ loading


def test_metric_script_uses_absolute_imports_of_the_package():
    directory = Path(PAIRWISE_ACCURACY_PATH)
    assert (directory / "pairwise_accuracy.py").is_file()
    assert (directory / "README.md").is_file()
    # evaluate copies the script alone into its module cache: only absolute imports of installed packages work there,
    # and the outcome rule and the bootstrap come from the one pairwise accuracy, `trl_moe_rm.accuracy`.
    tree = ast.parse((directory / "pairwise_accuracy.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the metric script"
            imported.add(node.module)
    assert imported == {"__future__", "datasets", "evaluate", "numpy", "trl_moe_rm.accuracy"}


def test_load_offline(tmp_path, monkeypatch):
    import evaluate

    _offline(monkeypatch)
    metric = evaluate.load(PAIRWISE_ACCURACY_PATH, cache_dir=str(tmp_path))  # file-backed, the default
    assert metric.name == "pairwise_accuracy"
    assert metric.compute(chosen_scores=[1.0], rejected_scores=[0.0]) == {"accuracy": 1.0}


def test_load_pairwise_accuracy_helper(monkeypatch):
    _offline(monkeypatch)
    metric = load_pairwise_accuracy(keep_in_memory=True)
    assert metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED) == {"accuracy": 0.75}


# ----------------------------------------------------------------------------------------------------------- accuracy


def test_accuracy_values(metric):
    assert metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED) == {"accuracy": 0.75}
    assert metric.compute(chosen_scores=[1.0, 2.0, 3.0], rejected_scores=[0.0, 0.0, 0.0])["accuracy"] == 1.0
    assert metric.compute(chosen_scores=[0.0, 0.0], rejected_scores=[1.0, 2.0])["accuracy"] == 0.0
    # numpy arrays and tensors are accepted
    assert metric.compute(chosen_scores=np.array([1.0, 0.0]), rejected_scores=np.array([0.0, 1.0]))["accuracy"] == 0.5
    assert metric.compute(chosen_scores=torch.tensor([1.0]), rejected_scores=torch.tensor([0.0]))["accuracy"] == 1.0


def test_ties_count_half(metric):
    assert metric.compute(chosen_scores=[0.3] * 5, rejected_scores=[0.3] * 5) == {"accuracy": 0.5}
    assert metric.compute(chosen_scores=[1.0, 1.0], rejected_scores=[1.0, 0.0]) == {"accuracy": 0.75}


def test_close_scores_are_not_rounded_into_ties(metric):
    # The scores are stored as float64: in float32, 1 + 1e-8 == 1 and this pair would be a tie.
    assert metric.compute(chosen_scores=[1.0 + 1e-8], rejected_scores=[1.0]) == {"accuracy": 1.0}


def test_incremental_add_batch_with_groups_at_compute(metric):
    metric.add_batch(chosen_scores=CHOSEN[:4], rejected_scores=REJECTED[:4])
    metric.add(chosen_scores=CHOSEN[4], rejected_scores=REJECTED[4])
    metric.add_batch(chosen_scores=CHOSEN[5:], rejected_scores=REJECTED[5:])
    result = metric.compute(groups=GROUPS)
    assert result == metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED, groups=GROUPS)


# ------------------------------------------------------------------------------------------------------------- groups


def test_groups_breakdown(metric):
    result = metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED, groups=GROUPS)
    assert result["accuracy"] == 0.75
    assert list(result["per_group"]) == ["chat", "reasoning", "safety"]  # sorted by name
    assert result["per_group"] == {
        "chat": {"accuracy": 0.5, "count": 2},
        "reasoning": {"accuracy": 1.0, "count": 2},
        "safety": {"accuracy": 0.75, "count": 2},
    }
    # the overall accuracy is the count-weighted mean of the group accuracies
    per_group = result["per_group"].values()
    assert sum(g["accuracy"] * g["count"] for g in per_group) / sum(g["count"] for g in per_group) == 0.75


def test_no_groups_no_breakdown(metric):
    assert "per_group" not in metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED)


# ---------------------------------------------------------------------------------------------------------- bootstrap


def test_bootstrap_keys_and_bounds(metric):
    rng = np.random.default_rng(0)
    chosen = rng.normal(0.5, 1.0, size=200)
    rejected = rng.normal(0.0, 1.0, size=200)
    groups = rng.choice(["a", "b", "c"], size=200).tolist()

    result = metric.compute(chosen_scores=chosen, rejected_scores=rejected, groups=groups, bootstrap=True)
    assert set(result) == {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "per_group"}
    assert result["accuracy_ci_low"] <= result["accuracy"] <= result["accuracy_ci_high"]
    assert result["accuracy_ci_high"] - result["accuracy_ci_low"] < 0.2  # ~ 4 * sqrt(0.25 / 200) = 0.14
    for summary in result["per_group"].values():
        assert set(summary) == {"accuracy", "count", "accuracy_ci_low", "accuracy_ci_high"}
        assert summary["accuracy_ci_low"] <= summary["accuracy"] <= summary["accuracy_ci_high"]
    assert sum(summary["count"] for summary in result["per_group"].values()) == 200

    # The metric's bootstrap is `trl_moe_rm.accuracy.bootstrap_ci` on the per-pair outcomes.
    expected = bootstrap_ci(pairwise_outcomes(chosen, rejected), num_resamples=300, confidence=0.9, seed=3)
    result = metric.compute(
        chosen_scores=chosen, rejected_scores=rejected, bootstrap=True, num_resamples=300, confidence=0.9, seed=3
    )
    assert (result["accuracy_ci_low"], result["accuracy_ci_high"]) == pytest.approx(expected, rel=1e-12)


def test_bootstrap_is_degenerate_when_all_outcomes_agree(metric):
    result = metric.compute(chosen_scores=[1.0, 2.0, 3.0], rejected_scores=[0.0, 0.0, 0.0], bootstrap=True)
    assert result == {"accuracy": 1.0, "accuracy_ci_low": 1.0, "accuracy_ci_high": 1.0}


# ------------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"groups": ["a"]}, "one entry per pair"),
        ({"groups": [1, 2, 3, 4, 5, 6]}, "strings"),
        ({"bootstrap": True, "confidence": 1.5}, "confidence"),
        ({"bootstrap": True, "num_resamples": 0}, "num_resamples"),
    ],
)
def test_errors(metric, kwargs, match):
    with pytest.raises(ValueError, match=match):
        metric.compute(chosen_scores=CHOSEN, rejected_scores=REJECTED, **kwargs)


def test_mismatched_lengths_error(metric):
    with pytest.raises(ValueError, match="Mismatch"):
        metric.compute(chosen_scores=[1.0, 2.0], rejected_scores=[1.0])


# ---------------------------------------------------------------------------------------------- RewardTrainer helpers


def test_pair_rewards_for_metrics_reshapes_chosen_then_rejected_rows():
    logits = torch.tensor([[1.0], [2.0], [3.0], [10.0], [20.0], [30.0]], dtype=torch.bfloat16)
    pairs = pair_rewards_for_metrics(logits, ())
    assert pairs.dtype == torch.float32
    torch.testing.assert_close(pairs, torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]))
    # a model with several outputs gives a tuple whose first element is the rewards
    router_logits = torch.zeros(6, 4)
    torch.testing.assert_close(pair_rewards_for_metrics((logits, router_logits), ()), pairs)
    torch.testing.assert_close(pair_rewards_for_metrics(logits.squeeze(-1), ()), pairs)
    with pytest.raises(ValueError, match="2 \\* batch_size"):
        pair_rewards_for_metrics(torch.zeros(3, 1), ())
    with pytest.raises(ValueError, match="2 \\* batch_size"):
        pair_rewards_for_metrics(torch.zeros(4, 2), ())


def test_reward_compute_metrics_on_synthetic_predictions():
    predictions = np.stack([CHOSEN, REJECTED], axis=-1)
    metrics = reward_compute_metrics(EvalPrediction(predictions=predictions, label_ids=()))
    assert metrics["pairwise_accuracy"] == 0.75
    assert metrics["num_pairs"] == 6
    assert metrics["pairwise_accuracy_ci_low"] <= 0.75 <= metrics["pairwise_accuracy_ci_high"]
    assert reward_compute_metrics(EvalPrediction(predictions=predictions, label_ids=()), bootstrap=False) == {
        "pairwise_accuracy": 0.75,
        "num_pairs": 6,
    }
    with pytest.raises(ValueError, match="pair_rewards_for_metrics"):
        reward_compute_metrics(EvalPrediction(predictions=np.zeros((12, 1)), label_ids=()))


def _tiny_reward_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    words = "the cat dog sat ran on a mat good bad fast slow answer question yes no".split()
    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(vocab),
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval(), tokenizer, words


def test_reward_trainer_evaluation_gives_one_row_per_pair(tmp_path, monkeypatch):
    """
    A real `RewardTrainer.evaluate()` with 10 pairs and an evaluation batch of 4: with `pair_rewards_for_metrics`, the
    predictions are the exact (chosen, rejected) rewards of each pair, in order; without it, the last batch loses its
    rejected rows (18 rows for 20 sequences) and `reward_compute_metrics` refuses the predictions.
    """
    _offline(monkeypatch)
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, tokenizer, words = _tiny_reward_model_and_tokenizer()
    rng = random.Random(0)
    rows = [
        {
            "prompt": " ".join(rng.choices(words, k=rng.randint(1, 4))) + " ",
            "chosen": " ".join(rng.choices(words, k=rng.randint(1, 5))),
            "rejected": " ".join(rng.choices(words, k=rng.randint(1, 5))),
        }
        for _ in range(10)
    ]
    with torch.no_grad():

        def reward(text: str) -> float:
            input_ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")["input_ids"]
            return model(input_ids=input_ids).logits.item()

        expected = np.array([[reward(r["prompt"] + r["chosen"]), reward(r["prompt"] + r["rejected"])] for r in rows])

    captured = {}

    def compute_metrics(eval_pred):
        captured["predictions"] = eval_pred.predictions
        return reward_compute_metrics(eval_pred)

    args = RewardConfig(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=4,
        bf16=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
    )
    dataset = Dataset.from_list(rows)
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,  # required by `RewardTrainer`, unused here
        eval_dataset=dataset,
        processing_class=tokenizer,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=pair_rewards_for_metrics,
    )
    metrics = trainer.evaluate()

    predictions = captured["predictions"]
    assert predictions.shape == (10, 2)
    np.testing.assert_allclose(predictions, expected, rtol=1e-4, atol=1e-5)
    expected_accuracy = float(np.mean(np.where(expected[:, 0] > expected[:, 1], 1.0, 0.0)))
    assert metrics["eval_pairwise_accuracy"] == pytest.approx(expected_accuracy)
    assert metrics["eval_num_pairs"] == 10
    assert metrics["eval_pairwise_accuracy_ci_low"] <= expected_accuracy <= metrics["eval_pairwise_accuracy_ci_high"]

    # Without the preprocessing: 8 + 8 + 2 rows, because `gather_for_metrics` truncates the last (4-row) batch to the
    # dataset remainder (2), which is a number of pairs, not of rows.
    captured.clear()
    trainer.preprocess_logits_for_metrics = None
    with pytest.raises(ValueError, match="pair_rewards_for_metrics"):
        trainer.evaluate()
    assert captured["predictions"].shape == (18, 1)
