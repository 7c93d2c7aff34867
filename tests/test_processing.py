"""
One text-to-reward path (issue 12): the same rows through every consumer give the same token ids and the same rewards.

Consumers: the trainer's dataset preparation (and its collator), the frozen-backbone feature cache, `score_pairs`,
the personalization fit's scoring pass, `PersonalizedReward`, the public `score` call and `trl-moe-rm score`. Cases: a
decoder with last-token pooling whose eos id is 0 (GPT-NeoX / Pythia's `<|endoftext|>`), a BERT-style encoder, and
conversational rows rendered with a chat template.
"""

import json

import pytest
import torch
from tiny import CHAT_TEMPLATE, WORDS, tiny_args, tiny_moe, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trl_moe_rm import MoERewardTrainer, PersonalizedReward, score, score_pairs
from trl_moe_rm.cli import main
from trl_moe_rm.personalization import expert_pair_scores
from trl_moe_rm.processing import RowEncoder, Truncation, check_row_shape, end_of_sequence_ids
from trl_moe_rm.scoring import scores_from_features


# float32 forward passes of the same ids in batches of different shapes (padding, batch size): agreement to ~1e-6
# relative; 1e-5 leaves room for the reduction order of a different batch composition.
ATOL = 1e-5


def eos_zero_tokenizer() -> PreTrainedTokenizerFast:
    """A decoder tokenizer whose eos id is 0, as GPT-NeoX / Pythia's `<|endoftext|>`."""
    specials = ["<|endoftext|>", "[PAD]", "[UNK]", "[BOS]"]
    vocab = {token: index for index, token in enumerate(specials + list(WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 3)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|endoftext|>", bos_token="[BOS]"
    )


PLAIN = [
    {"prompt": "tell me about the cat", "chosen": "good one two", "rejected": "bad three"},
    {"prompt": "why is it", "chosen": "yes", "rejected": "no four five six"},
    {"prompt": "explain the sun and the moon please", "chosen": "fine", "rejected": "poor"},
]
CHAT = [
    {
        "prompt": [{"role": "user", "content": row["prompt"]}],
        "chosen": [{"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]}],
    }
    for row in PLAIN
]


def _case(name):
    if name == "decoder_eos0":
        tokenizer = eos_zero_tokenizer()
        return tiny_moe("llama", tokenizer, pooling="last"), tokenizer, PLAIN
    if name == "bert":
        tokenizer = tiny_tokenizer(bert_style=True)
        return tiny_moe("bert", tokenizer), tokenizer, PLAIN
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tiny_moe("llama", tokenizer), tokenizer, CHAT


@pytest.mark.parametrize("case", ["decoder_eos0", "bert", "chat"])
def test_every_consumer_gives_the_same_ids_and_rewards(case, tmp_path):
    torch.manual_seed(0)
    model, tokenizer, rows = _case(case)
    model.eval()
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    prompts = [row["prompt"] for row in rows]
    responses = [row[column] for column in ("chosen", "rejected") for row in rows]
    prompts2 = prompts + prompts

    # Token ids: the trainer's prepared dataset against the encoder every scorer uses.
    trainer = MoERewardTrainer(model=model, args=tiny_args(tmp_path / "t"), train_dataset=dataset,
                               processing_class=tokenizer)
    prepared = trainer.train_dataset
    encoder = RowEncoder(tokenizer)
    encoded = encoder.encode_many(prompts2, responses)
    n = len(rows)
    assert [ids for ids, _ in encoded[:n]] == prepared["chosen_ids"]
    assert [ids for ids, _ in encoded[n:]] == prepared["rejected_ids"]
    assert [length for length, in zip(prepared["prompt_length"])] == [length for _, length in encoded[:n]]
    if case == "decoder_eos0":
        assert end_of_sequence_ids(tokenizer) == [0]
        assert all(ids[-1] == 0 for ids, _ in encoded)  # the eos id 0 closes every response

    # Rewards: the trainer's collator batch through the model ...
    batch = trainer.data_collator([prepared[i] for i in range(n)])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k not in ("margin", "user_ids")}).logits[:, 0]
    reference = logits.float()
    # ... score_pairs, the personalization fit's scoring pass, score(), PersonalizedReward and the CLI.
    pair_scores = score_pairs(model, tokenizer, dataset, batch_size=2)
    fit_scores = expert_pair_scores(model, dataset, tokenizer)
    public = score(model, tokenizer, prompts2, responses, batch_size=4)
    personalized = PersonalizedReward(model, {}, tokenizer=tokenizer, batch_size=5).score(
        prompts2, responses, [None] * len(responses)
    )
    for rewards in (
        torch.tensor(list(pair_scores.chosen_rewards) + list(pair_scores.rejected_rewards)),
        torch.tensor(list(fit_scores.chosen_rewards) + list(fit_scores.rejected_rewards)),
        public,
        personalized,
    ):
        torch.testing.assert_close(rewards.float(), reference, atol=ATOL, rtol=0)

    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in zip(prompts2, responses)))
    assert main(["score", "--model", str(model_dir), "--input", str(source), "--output", str(tmp_path / "o.jsonl")]) == 0
    cli = [json.loads(line)["reward"] for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(cli), reference, atol=ATOL, rtol=0)


def test_feature_cache_scores_match_the_full_pass(tmp_path):
    """The frozen-backbone cache encodes the trainer's ids: its head scores equal the full forward's."""
    from datasets import Dataset

    torch.manual_seed(0)
    tokenizer = eos_zero_tokenizer()
    model = tiny_moe("llama", tokenizer, pooling="last")
    dataset = Dataset.from_list(PLAIN)
    args = tiny_args(tmp_path / "t", freeze_backbone=True, cache_features=True)
    trainer = MoERewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    cached = scores_from_features(model, trainer.cached_features(trainer.train_dataset))
    direct = score_pairs(model, tokenizer, dataset)
    torch.testing.assert_close(torch.tensor(cached.chosen_rewards), torch.tensor(direct.chosen_rewards), atol=ATOL,
                               rtol=0)
    torch.testing.assert_close(torch.tensor(cached.rejected_rewards), torch.tensor(direct.rejected_rewards),
                               atol=ATOL, rtol=0)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_response():
    tokenizer = tiny_tokenizer(bert_style=True)
    vocab = tokenizer.get_vocab()
    encoder = RowEncoder(tokenizer, max_length=7)
    ids, prompt_length = encoder.encode("tell me about the cat", "good one")
    # [CLS] kept, the prompt's start cut, the response and its closing [SEP] whole.
    assert ids[0] == vocab["[CLS]"] and ids[-3:] == [vocab["good"], vocab["one"], vocab["[SEP]"]]
    assert len(ids) == 7 and prompt_length == 4
    ids, prompt_length = encoder.encode("tell me", "good " * 20)
    assert len(ids) == 7 and ids[-1] == vocab["[SEP]"] and vocab["good"] in ids[prompt_length:]
    assert encoder.truncation.prompts_cut == 2 and encoder.truncation.responses_cut == 1
    with pytest.raises(ValueError, match="max_length"):
        Truncation(1)


def test_rows_that_mix_text_and_messages_are_refused():
    with pytest.raises(ValueError, match="mixes plain text"):
        check_row_shape({"prompt": "hi", "chosen": [{"role": "assistant", "content": "x"}]}, ("prompt", "chosen"))
    with pytest.raises(ValueError, match="must be a string or a list of chat messages"):
        check_row_shape({"prompt": 3}, ("prompt",))


def test_token_type_ids_from_a_bert_tokenizer_are_accepted():
    """Issue 13: `model(**tokenizer(...), prompt_lengths=...)` with `token_type_ids` on an encoder backbone."""
    tokenizer = tiny_tokenizer(bert_style=True)
    for encoding in ("separate", "separate_no_grad"):
        model = tiny_moe("bert", tokenizer, prompt_encoding=encoding).eval()
        inputs = dict(tokenizer(["tell me about cat good", "why is it bad one two"], padding=True,
                                return_tensors="pt"))
        with torch.no_grad():
            plain = model(**inputs, prompt_lengths=torch.tensor([3, 4])).logits
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
            typed = model(**inputs, prompt_lengths=torch.tensor([3, 4])).logits
            paired = model(**inputs, prompt_lengths=torch.tensor([3, 3]), paired=True).logits
        torch.testing.assert_close(typed, plain)
        assert paired.shape == (2, 1)


def test_truncated_pairs_keep_one_prompt_for_both_rows():
    """The prompt is cut for the longer response of a pair, so both rows route on the same prompt tokens."""
    tokenizer = tiny_tokenizer()
    encoder = RowEncoder(tokenizer, max_length=9)
    pair = encoder.encode_preference(
        {"prompt": "tell me about the cat and the dog", "chosen": "good", "rejected": "bad one two three four"}
    )
    length = pair["prompt_length"]
    assert pair["chosen_ids"][:length] == pair["rejected_ids"][:length]
    assert len(pair["rejected_ids"]) == 9 and len(pair["chosen_ids"]) < 9


def test_scoring_real_data_accepts_an_empty_response_but_training_and_fitting_refuse_it():
    """Real data (Auto-J) has a few empty answers: analysis scores them as the end token; labelled pairs refuse them."""
    from trl_moe_rm import fit_user_weights

    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    pair = {"prompt": "tell me", "chosen": "good one", "rejected": ""}
    scores = score_pairs(model, tokenizer, {key: [value] for key, value in pair.items()})
    assert torch.isfinite(torch.tensor(scores.rejected_rewards)).all()
    with pytest.raises(ValueError, match="Found an empty `rejected` response"):
        fit_user_weights(model, [pair], tokenizer=tokenizer)


def test_progress_bars_are_labelled_and_honour_the_switches(tmp_path, capsys, monkeypatch):
    """Issue 15: "Encoding N pairs" for the feature cache and "Scoring N pairs" for score_pairs, hidden by the
    trainer's `disable_tqdm` and by `TQDM_DISABLE=1`."""
    from datasets import Dataset

    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer)
    dataset = Dataset.from_list(PLAIN * 4)
    args = tiny_args(tmp_path / "t", freeze_backbone=True, cache_features=True, disable_tqdm=False,
                     per_device_eval_batch_size=2)
    MoERewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    score_pairs(model, tokenizer, dataset, batch_size=2)
    err = capsys.readouterr().err
    assert "Encoding 12 pairs" in err and "Scoring 12 pairs" in err
    args = tiny_args(tmp_path / "u", freeze_backbone=True, cache_features=True, disable_tqdm=True)
    MoERewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    score_pairs(model, tokenizer, dataset, batch_size=2)
    err = capsys.readouterr().err
    assert "Encoding" not in err and "Scoring" not in err
