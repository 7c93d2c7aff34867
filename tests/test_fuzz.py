"""
Property-based fuzzing of the numerically delicate parts: the router (`top_k_routing`), every loss and the whole
training objective as `MoERewardTrainer.compute_loss` composes it (values and gradients), and the user-weight fitting
behind `fit_user_weights` / `fit_users`.

Inputs cover extreme logits and rewards (+-1e4), all-equal values, `K=1`, `top_k=K`, a batch of one pair and
fp16/bf16 inputs. The invariants: no NaN/Inf in any loss or gradient, routing rows with exactly `top_k` non-zeros
that sum to 1 and select a valid top-k set, fitted weights on the simplex. Examples are bounded and run without a
deadline so that the suite stays fast and deterministic on a busy CPU.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tiny import separable_dataset, tiny_args, tiny_moe, tiny_tokenizer

from trl_moe_rm import MoERewardTrainer, fit_user_weights, fit_users
from trl_moe_rm import losses as moe_losses
from trl_moe_rm.analysis import PairScores
from trl_moe_rm.fitting import mixture_scores, routed_weights
from trl_moe_rm.modeling_moe_reward import top_k_routing


FUZZ = settings(
    max_examples=40, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Values that stress the numerics: huge gaps, exact ties, zeros, tiny values; plus anything in between.
SPECIAL = st.sampled_from([-1e4, -1e3, -30.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 30.0, 1e3, 1e4])
VALUE = st.one_of(SPECIAL, st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32))


@st.composite
def matrices(draw, rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `(rows, cols)` tensor: random values, all equal, or one extreme value per row."""
    kind = draw(st.sampled_from(["random", "all_equal", "one_hot_extreme"]))
    if kind == "all_equal":
        values = np.full((rows, cols), draw(VALUE))
    elif kind == "one_hot_extreme":
        values = np.full((rows, cols), draw(st.sampled_from([-1e4, 0.0])))
        for row in range(rows):
            values[row, draw(st.integers(0, cols - 1))] = 1e4
    else:
        values = np.array(draw(st.lists(VALUE, min_size=rows * cols, max_size=rows * cols))).reshape(rows, cols)
    return torch.tensor(values, dtype=torch.float32).to(dtype)


@st.composite
def routing_problems(draw):
    num_experts = draw(st.integers(1, 10))
    top_k = draw(st.sampled_from(sorted({1, num_experts, draw(st.integers(1, num_experts))})))
    batch = draw(st.sampled_from([1, 2, draw(st.integers(1, 8))]))
    dtype = draw(st.sampled_from(DTYPES))
    temperature = draw(st.sampled_from([0.05, 0.5, 1.0, 7.0]))
    return draw(matrices(batch, num_experts, dtype)), top_k, temperature


def assert_finite(name: str, value: torch.Tensor) -> None:
    assert torch.isfinite(value).all(), f"{name} is not finite: {value}"


# ----------------------------------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------------------------------


@FUZZ
@given(routing_problems())
def test_top_k_routing_is_exactly_top_k_on_the_simplex(problem):
    logits, top_k, temperature = problem
    weights = top_k_routing(logits, top_k, temperature)
    assert weights.dtype == torch.float32 and weights.shape == logits.shape
    assert_finite("routing", weights)
    assert ((weights > 0).sum(dim=-1) == top_k).all(), weights
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(logits.shape[0]), atol=1e-6, rtol=0)
    # The kept experts are a top-k set of the logits: none of the dropped logits beats a kept one.
    scaled = logits.float()
    selected = weights > 0
    if top_k < logits.shape[-1]:
        lowest_kept = scaled.masked_fill(~selected, float("inf")).amin(dim=-1)
        highest_dropped = scaled.masked_fill(selected, float("-inf")).amax(dim=-1)
        assert (lowest_kept >= highest_dropped).all()
    # Among the kept experts, a larger logit never gets a smaller weight.
    for row in range(logits.shape[0]):
        kept = selected[row].nonzero().flatten()
        order = scaled[row, kept].argsort()
        assert (weights[row, kept][order].diff() >= 0).all()


@FUZZ
@given(routing_problems(), st.integers(0, 2**31 - 1))
def test_top_k_routing_gradients_are_finite(problem, seed):
    logits, top_k, temperature = problem
    leaf = logits.detach().clone().requires_grad_(True)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed))
    (gradient,) = torch.autograd.grad((top_k_routing(leaf, top_k, temperature) * upstream).sum(), leaf)
    assert gradient.dtype == logits.dtype
    assert_finite("routing gradient", gradient)


# ----------------------------------------------------------------------------------------------------------------------
# Losses, one by one and as the trainer composes them
# ----------------------------------------------------------------------------------------------------------------------


@st.composite
def loss_problems(draw):
    num_experts = draw(st.integers(1, 8))
    top_k = draw(st.sampled_from(sorted({1, num_experts, draw(st.integers(1, num_experts))})))
    batch = draw(st.sampled_from([1, 2, draw(st.integers(1, 6))]))
    dtype = draw(st.sampled_from(DTYPES))
    return {
        "router_logits": draw(matrices(batch, num_experts, dtype)),
        "chosen": draw(matrices(batch, num_experts, dtype)),
        "rejected": draw(matrices(batch, num_experts, dtype)),
        "weight_vectors": draw(matrices(num_experts, 3, dtype)),
        "margin": draw(st.none() | matrices(1, batch, dtype).map(lambda m: m[0])),
        "top_k": top_k,
        "temperature": draw(st.sampled_from([0.1, 1.0, 3.0])),
        "assignment_temperature": draw(st.sampled_from([0.05, 0.5, 1.0])),
        "assignment_top_k": draw(st.sampled_from([None, 1, top_k])),
    }


def every_loss(problem, router_logits, chosen, rejected, weight_vectors) -> dict[str, torch.Tensor]:
    """Every loss of `trl_moe_rm.losses`, fed as `MoERewardTrainer.compute_loss` feeds them."""
    margin, temperature = problem["margin"], problem["temperature"]
    routing = top_k_routing(router_logits, problem["top_k"], temperature)
    probs = torch.softmax(router_logits.float() / temperature, dim=-1)
    deltas = chosen.float() - rejected.float()  # as the model computes them: float32 rewards of the rounded inputs
    # The routed reward, mixed in float32 as `MoERewardModel.forward` mixes it.
    reward_chosen = (routing * chosen.float()).sum(-1)
    reward_rejected = (routing * rejected.float()).sum(-1)
    shifted = deltas if margin is None else deltas - margin[:, None]
    responsibilities = moe_losses.assignment_responsibilities(
        probs, shifted, problem["assignment_temperature"], problem["assignment_top_k"]
    )
    return {
        "bradley_terry": moe_losses.bradley_terry_loss(reward_chosen, reward_rejected, margin),
        "likelihood_mixture": moe_losses.likelihood_mixture_loss(routing, deltas, margin),
        "assignment_expert": moe_losses.assignment_expert_loss(responsibilities, shifted),
        "assignment_balance": moe_losses.entropy_balance_loss(responsibilities),
        "router_assignment": moe_losses.router_assignment_loss(router_logits, responsibilities, temperature),
        "sparsity": moe_losses.local_sparsity_loss(probs),
        "switch_balance": moe_losses.switch_balance_loss(probs, routing),
        "entropy_balance": moe_losses.entropy_balance_loss(probs),
        "cosine_diversity": moe_losses.cosine_diversity_loss(weight_vectors),
        "correlation_diversity": moe_losses.correlation_diversity_loss(deltas),
        "router_z": moe_losses.router_z_loss(router_logits),
        "center": torch.mean((reward_chosen.float() + reward_rejected.float()) ** 2),
    }


@FUZZ
@given(loss_problems())
def test_every_loss_and_its_gradients_are_finite(problem):
    names = ("router_logits", "chosen", "rejected", "weight_vectors")
    # The values from the low-precision inputs themselves (each loss upcasts to float32 internally) ...
    values = every_loss(problem, **{name: problem[name] for name in names})
    # ... and the gradients with respect to float32 copies of the same (rounded) values: a true gradient of 1e9 (the
    # quadratic center term at rewards of 1e4) cannot be held by an fp16 tensor, whatever the loss does.
    leaves = {name: problem[name].float().requires_grad_(True) for name in names}
    graphs = every_loss(problem, **leaves)
    for name, value in values.items():
        assert value.dim() == 0 and value.dtype == torch.float32, name
        assert_finite(name, value)
        torch.testing.assert_close(value, graphs[name].detach(), rtol=1e-3, atol=1e-3)
        if not graphs[name].requires_grad:  # a constant (e.g. the diversity of a single expert)
            continue
        gradients = torch.autograd.grad(graphs[name], list(leaves.values()), retain_graph=True, allow_unused=True)
        for leaf_name, gradient in zip(leaves, gradients):
            if gradient is not None:
                assert_finite(f"d {name} / d {leaf_name}", gradient)
    assert values["sparsity"] >= 0 and values["entropy_balance"] >= -1e-6 and values["router_z"] >= 0
    assert 0 <= values["cosine_diversity"] <= 1 + 1e-5 and 0 <= values["correlation_diversity"] <= 1 + 1e-5


# The real objective: `MoERewardTrainer.compute_loss` on precomputed features (the fast-path inputs), with an identity
# router and identity experts so that the fuzzed features *are* the router logits and the expert rewards.
HIDDEN = 32


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tokenizer = tiny_tokenizer()
    built = {}
    for loss_type in ("reward_mixture", "likelihood_mixture", "assignment"):
        for num_experts, top_k in ((1, 1), (4, 2), (4, 4), (4, 1)):
            args = tiny_args(
                tmp_path_factory.mktemp("fuzz"),
                loss_type=loss_type,
                num_experts=num_experts,
                top_k=top_k,
                sparsity_coef=0.1,
                balance_coef=0.1,
                diversity_coef=0.1,
                router_z_loss_coef=0.01,
                center_rewards_coefficient=0.01,
                assignment_top_k=1 if loss_type == "assignment" else None,
            )
            # Top-1 over several experts trains its router through the straight-through gradient.
            router_gradient = "dense" if top_k == 1 < num_experts else "sparse"
            model = tiny_moe("llama", tokenizer, num_experts=num_experts, top_k=top_k, router_gradient=router_gradient)
            with torch.no_grad():
                model.router.weight.copy_(torch.eye(num_experts, HIDDEN))
                model.experts.weight.copy_(torch.eye(num_experts, HIDDEN))
            trainer = MoERewardTrainer(
                model=model, args=args, train_dataset=separable_dataset(2), processing_class=tokenizer
            )
            built[(loss_type, num_experts, top_k)] = trainer
    return built


@FUZZ
@given(
    st.sampled_from(["reward_mixture", "likelihood_mixture", "assignment"]),
    st.sampled_from([(1, 1), (4, 2), (4, 4), (4, 1)]),
    st.sampled_from([1, 2, 5]),
    st.sampled_from(["float32", "bfloat16", "float16_inputs"]),
    st.data(),
)
def test_trainer_objective_and_parameter_gradients_are_finite(trainers, loss_type, shape, batch, precision, data):
    """
    `precision`: an fp32 model; a bf16 model (`dtype=torch.bfloat16` training); or fp16 features fed to the fp32 head
    (mixed precision keeps fp32 parameters; a pure-fp16 model is not covered: a true gradient above 65504, e.g. 4e6
    for the expert weights at features and rewards of 1e4 with the center term on, overflows any fp16 tensor).
    """
    num_experts, top_k = shape
    trainer = trainers[(loss_type, num_experts, top_k)]
    model_dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    input_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16_inputs": torch.float16}[precision]
    model = trainer.model.to(model_dtype)
    sequence = torch.zeros(2 * batch, HIDDEN)
    sequence[:, :num_experts] = data.draw(matrices(2 * batch, num_experts))
    router = torch.zeros(batch, HIDDEN)
    router[:, :num_experts] = data.draw(matrices(batch, num_experts))
    inputs = {
        "sequence_features": sequence.to(input_dtype),
        "router_features": router.to(input_dtype),
        "paired": True,
        "attention_mask": torch.ones(2 * batch, 3, dtype=torch.long),
    }
    margin = data.draw(st.none() | matrices(1, batch).map(lambda m: m[0]))
    if margin is not None:
        inputs["margin"] = margin
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)
        assert_finite("loss", loss)
        loss.backward()
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                assert_finite(f"gradient of {name}", parameter.grad)
        assert ((outputs.routing_weights > 0).sum(-1) == top_k).all()
        logged = {key: values[-1] for key, values in trainer._metrics["train"].items() if values}
        assert all(np.isfinite(value) for value in logged.values()), logged
    finally:
        model.zero_grad(set_to_none=True)
        trainer._metrics["train"].clear()
        model.float()


# ----------------------------------------------------------------------------------------------------------------------
# Fitting a user's weights
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    return {k: tiny_moe("llama", tiny_tokenizer(), num_experts=k, top_k=1) for k in (1, 3)}


@st.composite
def user_scores(draw, num_experts: int, num_pairs: int):
    dtype = draw(st.sampled_from(DTYPES))
    chosen = draw(matrices(num_pairs, num_experts, dtype)).float().numpy()
    rejected = draw(matrices(num_pairs, num_experts, dtype)).float().numpy()
    routing = top_k_routing(draw(matrices(num_pairs, num_experts, dtype)), draw(st.integers(1, num_experts)))
    return PairScores.from_expert_rewards(chosen, rejected, routing.numpy())


def assert_profile_on_simplex(profile, num_experts: int) -> None:
    weights = np.asarray(profile.expert_weights)
    assert weights.shape == (num_experts,)
    assert np.isfinite(weights).all() and (weights >= 0).all()
    assert abs(weights.sum() - 1) < 1e-6


@FUZZ
@given(
    st.sampled_from([1, 3]),
    st.sampled_from([1, 2, 7]),
    st.sampled_from(["hedge", "hyre", "gradient"]),
    st.sampled_from(["static", "routed"]),
    st.sampled_from(["routing", "uniform"]),
    st.data(),
)
def test_fit_user_weights_stays_on_the_simplex(models, num_experts, num_pairs, method, mode, prior, data):
    assume(not (method == "hyre" and mode == "routed"))
    scores = data.draw(user_scores(num_experts, num_pairs))
    kwargs = {"steps": 20} if method == "gradient" else {}
    profile = fit_user_weights(
        models[num_experts], pairs=None, method=method, mode=mode, prior=prior, scores=scores, **kwargs
    )
    assert_profile_on_simplex(profile, num_experts)
    assert profile.num_shots == num_pairs
    # The profile's reward stays finite whatever the rewards it mixes.
    deltas = torch.from_numpy(scores.expert_deltas)
    weights = torch.tensor(profile.expert_weights)
    routing = torch.from_numpy(scores.routing_weights) if mode == "routed" else None
    assert_finite("user reward", mixture_scores(deltas, weights, routing=routing))
    assert_finite("routed weights", routed_weights(torch.from_numpy(scores.routing_weights), weights))


@FUZZ
@given(st.sampled_from(["hedge", "hyre", "gradient"]), st.lists(st.integers(1, 4), min_size=1, max_size=4), st.data())
def test_fit_users_batches_any_number_of_shots(models, method, shots, data):
    num_experts = 3
    scores = data.draw(user_scores(num_experts, sum(shots)))
    user_ids = [user for user, count in enumerate(shots) for _ in range(count)]
    dataset = {
        "user_id": user_ids,
        "prompt": ["p"] * len(user_ids),
        "chosen": ["a"] * len(user_ids),
        "rejected": ["b"] * len(user_ids),
    }
    kwargs = {"steps": 20} if method == "gradient" else {}
    profiles = fit_users(models[num_experts], dataset, method=method, scores=scores, **kwargs)
    assert sorted(profiles) == list(range(len(shots)))
    for user, profile in profiles.items():
        assert_profile_on_simplex(profile, num_experts)
        assert profile.num_shots == shots[user]


# ----------------------------------------------------------------------------------------------------------------------
# The text path: random unicode, empty and huge strings, chat messages, through the encoder and PersonalizedReward
# ----------------------------------------------------------------------------------------------------------------------

_TEXT = st.one_of(st.text(max_size=60), st.just(""), st.just("good " * 400), st.sampled_from(["tell me", "bad one"]))
_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": _TEXT}), min_size=1, max_size=2
)
_TEXT_MODEL = {}


def _text_model():
    if not _TEXT_MODEL:
        from tiny import CHAT_TEMPLATE

        torch.manual_seed(0)
        tokenizer = tiny_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        _TEXT_MODEL.update(tokenizer=tokenizer, model=tiny_moe("llama", tokenizer).eval())
    return _TEXT_MODEL["model"], _TEXT_MODEL["tokenizer"]


@FUZZ
@given(
    rows=st.lists(
        st.one_of(st.tuples(_TEXT, _TEXT), st.tuples(_MESSAGES, _MESSAGES), st.tuples(_TEXT, _MESSAGES)),
        min_size=1,
        max_size=4,
    ),
    max_length=st.one_of(st.none(), st.integers(2, 40)),
    user=st.sampled_from([None, "alice", "", float("nan")]),
)
def test_text_path_never_gives_nan_or_an_unexpected_error(rows, max_length, user):
    """Any text: finite rewards, or a ValueError naming the problem (a row mixing text and messages)."""
    from trl_moe_rm import PersonalizedReward, UserProfile

    model, tokenizer = _text_model()
    profiles = {"alice": UserProfile(user_id="alice", expert_weights=[0.4, 0.3, 0.2, 0.1])}
    reward = PersonalizedReward(model, profiles, tokenizer=tokenizer, max_length=max_length)
    prompts, completions = [row[0] for row in rows], [row[1] for row in rows]
    mixed = any(isinstance(p, str) != isinstance(c, str) for p, c in rows)
    if mixed:
        with pytest.raises(ValueError, match="mixes plain text"):
            reward(prompts=prompts, completions=completions, user_id=[user] * len(rows))
        return
    values = reward(prompts=prompts, completions=completions, user_id=[user] * len(rows))
    assert len(values) == len(rows) and all(np.isfinite(values))
    if max_length is not None:
        for prompt, completion in rows:
            ids, prompt_length = reward.encoder.encode(prompt, completion)
            assert len(ids) <= max_length and 0 <= prompt_length <= len(ids)
