"""Tiny in-process models, tokenizers and datasets for the tests (no downloads)."""

import random

from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

from trl_moe_rm import MoERewardModel, MoERewardModelConfig


WORDS = (
    "good bad great awful fine poor yes no alpha beta gamma delta short long formal casual red blue green topic "
    "question answer please explain tell me about the a of is it this that why how what when one two three four "
    "five six seven eight nine ten cat dog sun moon"
).split()


def tiny_tokenizer(bert_style: bool = False) -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer over `WORDS`; BERT-style adds [CLS] ... [SEP] around single texts."""
    specials = ["[PAD]", "[UNK]", "[EOS]", "[CLS]", "[SEP]", "[BOS]"]
    vocab = {token: index for index, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert_style:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]", bos_token="[BOS]"
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
    )


def tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
    )


def tiny_moe(backbone: str = "llama", tokenizer=None, **moe_kwargs) -> MoERewardModel:
    """A tiny random MoE reward model over a Llama or BERT backbone."""
    tokenizer = tokenizer or tiny_tokenizer(bert_style=backbone == "bert")
    make = tiny_llama_config if backbone == "llama" else tiny_bert_config
    moe_kwargs.setdefault("num_experts", 4)
    moe_kwargs.setdefault("top_k", 2)
    config = MoERewardModelConfig(backbone_config=make(len(tokenizer)), **moe_kwargs)
    return MoERewardModel(config)


def separable_dataset(num_pairs: int = 32, seed: int = 0) -> Dataset:
    """Chosen responses say 'good', rejected ones 'bad': any reward model should learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_pairs):
        prompt = " ".join(rng.choice(["tell me about", "explain", "what is"]).split() + [rng.choice(WORDS[12:30])])
        filler = " ".join(rng.choices(WORDS[30:], k=rng.randint(1, 4)))
        rows.append({"prompt": prompt, "chosen": f"good {filler}", "rejected": f"bad {filler}"})
    return Dataset.from_list(rows)


def flipped_dataset(num_pairs_per_category: int = 64, seed: int = 0) -> Dataset:
    """
    Two hidden categories, each with its own prompts; the same response pair carries opposite labels per category.

    Category A prompts start with 'short', and there 'yes' beats 'no'; category B prompts start with 'long', and there
    'no' beats 'yes'. A single reward that ignores the prompt cannot beat 0.5; a prompt-routed mixture can reach 1.0.
    """
    rng = random.Random(seed)
    rows = []
    for category, (word, winner, loser) in enumerate((("short", "yes", "no"), ("long", "no", "yes"))):
        for _ in range(num_pairs_per_category):
            prompt = f"{word} question about {rng.choice(WORDS[12:20])}"
            filler = " ".join(rng.choices(WORDS[30:], k=rng.randint(1, 3)))
            rows.append(
                {"prompt": prompt, "chosen": f"{winner} {filler}", "rejected": f"{loser} {filler}", "category": category}
            )
    rng.shuffle(rows)
    return Dataset.from_list(rows)


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} {{ message['content'] }} [EOS] {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def tiny_args(output_dir, **overrides):
    """A fast CPU training configuration for the tests."""
    from trl_moe_rm import MoERewardConfig

    defaults = {
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "report_to": "none",
        "bf16": False,
        "logging_steps": 1,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    defaults.update(overrides)
    return MoERewardConfig(output_dir=str(output_dir), **defaults)
