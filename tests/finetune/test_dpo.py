"""DPO's loss, rewards, reward accuracy and sequence log-probabilities against plain NumPy."""

import copy

import numpy as np

import minillm as mm
from minillm.finetune.dpo import DPOObjective, dpo_loss, log_sigmoid, reward_accuracy, sequence_log_probs
from minillm.models import GPT, GPTConfig


def _numpy_dpo(pc, pr, rc, rr, beta):
    z = beta * ((pc - pr) - (rc - rr))
    loss = np.mean(-np.log(1.0 / (1.0 + np.exp(-z))))
    return loss, beta * (pc - rc), beta * (pr - rr)


def test_loss_and_rewards_equal_numpy():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, size=6) for _ in range(4))
    beta = 0.3
    loss, chosen, rejected = dpo_loss(mm.Tensor(pc), mm.Tensor(pr), rc, rr, beta)
    expected = _numpy_dpo(pc, pr, rc, rr, beta)
    np.testing.assert_allclose(loss.item(), expected[0], rtol=1e-12)
    np.testing.assert_allclose(chosen, expected[1], rtol=1e-12)
    np.testing.assert_allclose(rejected, expected[2], rtol=1e-12)


def test_loss_gradient_matches_the_derived_formula():
    # dL/dπ_c = −β σ(−z) / B and dL/dπ_r = +β σ(−z) / B (docs/finetuning.md)
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(0, 3, size=5) for _ in range(4))
    beta = 0.5
    policy_c, policy_r = mm.Tensor(pc, requires_grad=True), mm.Tensor(pr, requires_grad=True)
    loss, _, _ = dpo_loss(policy_c, policy_r, rc, rr, beta)
    loss.backward()
    z = beta * ((pc - pr) - (rc - rr))
    weight = beta / (1 + np.exp(z)) / len(pc)                       # β σ(−z) / B
    np.testing.assert_allclose(policy_c.grad, -weight, rtol=1e-10)
    np.testing.assert_allclose(policy_r.grad, weight, rtol=1e-10)
    mm.gradcheck(lambda a, b: dpo_loss(a, b, rc, rr, beta)[0], policy_c, policy_r)


def test_log_sigmoid_is_stable_and_exact():
    z = np.array([-800.0, -30.0, -1.0, 0.0, 2.0, 40.0, 800.0])
    got = log_sigmoid(mm.Tensor(z)).numpy()
    expected = -np.logaddexp(0.0, -z)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)   # log(1 + 4e-18) rounds to 0
    assert np.all(np.isfinite(got))


def test_reward_accuracy_counts_ties_as_half():
    assert reward_accuracy([1.0, 0.0, 2.0, 0.0], [0.0, 1.0, 2.0, -1.0]) == (1 + 0 + 0.5 + 1) / 4


def test_sequence_log_probs_sum_only_the_response_tokens():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=20, context_length=8)).to(np.float64)
    inputs = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    targets = np.array([[-100, 3, 4, 9], [-100, -100, 8, -100]])
    got = sequence_log_probs(model, inputs, targets).numpy()
    logits = model(inputs).numpy()
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = [log_probs[0, 1, 3] + log_probs[0, 2, 4] + log_probs[0, 3, 9], log_probs[1, 2, 8]]
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_an_untouched_policy_scores_one_half_and_zero_margin():
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=20, context_length=8))
    objective = DPOObjective(copy.deepcopy(model), beta=0.1)
    inputs = np.array([[1, 2, 3, 4], [1, 2, 5, 6]])
    targets = np.array([[-100, 3, 4, 0], [-100, 5, 6, 0]])
    metrics = objective.metrics(model, [(inputs, targets)])
    assert metrics["reward_acc"] == 0.5 and metrics["margin"] == 0.0
    np.testing.assert_allclose(metrics["val_loss"], np.log(2), rtol=1e-6)
    assert all(not p.requires_grad for p in objective.reference.parameters())
    assert objective.reference is not model


def test_chosen_and_rejected_go_through_in_one_batch_and_the_reference_without_a_graph(monkeypatch):
    """docs/finetuning.md: the chosen and rejected rows go through the model in one batch of 2B rows (chosen
    first); the reference runs under no_grad. The loss is -log σ(β((π_c − π_r) − (ref_c − ref_r))) of the halves."""
    mm.manual_seed(1)
    policy = GPT(GPTConfig.from_preset("tiny", vocab_size=20, context_length=8)).to(np.float64)
    reference = GPT(GPTConfig.from_preset("tiny", vocab_size=20, context_length=8)).to(np.float64)
    objective = DPOObjective(reference, beta=0.5)
    calls = []
    for name, model in (("policy", policy), ("reference", reference)):
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda ids, *a, _n=name, _f=forward, **k:
                            calls.append((_n, np.shape(ids), mm.is_grad_enabled())) or _f(ids, *a, **k))
    inputs = np.array([[1, 2, 3, 4], [1, 5, 6, 0], [1, 2, 7, 8], [1, 5, 9, 0]])   # chosen 0, 1; rejected 2, 3
    targets = np.array([[-100, 3, 4, 0], [-100, 6, 0, -100], [-100, 7, 8, 0], [-100, 9, 0, -100]])
    loss = objective(policy, (inputs, targets))
    assert calls == [("policy", (4, 4), True), ("reference", (4, 4), False)]
    with mm.no_grad():
        pol = sequence_log_probs(policy, inputs, targets).numpy()
        ref = sequence_log_probs(reference, inputs, targets).numpy()
    z = 0.5 * ((pol[:2] - pol[2:]) - (ref[:2] - ref[2:]))
    np.testing.assert_allclose(loss.item(), np.mean(np.logaddexp(0.0, -z)), rtol=1e-10)


def test_the_objectives_weight_gradients_are_central_differences_and_the_reference_gets_none():
    """The DPO loss of a whole (float64) policy model: backward's gradient of two weight matrices equals
    central differences; the reference model, used in the same loss, receives no gradient at all."""
    mm.manual_seed(0)
    policy = GPT(GPTConfig.from_preset("tiny", vocab_size=12, context_length=8, n_layer=1, d_model=8,
                                       n_head=2)).to(np.float64)
    reference = copy.deepcopy(policy)
    rng = np.random.default_rng(1)
    for param in policy.parameters():                      # away from the reference: z != 0
        param.data += rng.normal(0, 0.05, param.shape)
    objective = DPOObjective(reference, beta=0.7)
    inputs = np.array([[1, 2, 3, 4], [1, 5, 6, 0], [1, 2, 7, 8], [1, 5, 9, 0]])
    targets = np.array([[-100, 3, 4, 0], [-100, 6, 0, -100], [-100, 7, 8, 0], [-100, 9, 0, -100]])
    named = dict(policy.named_parameters())
    mm.gradcheck(lambda *weights: objective(policy, (inputs, targets)), named["h.0.mlp.c_fc.weight"],
                 named["wte.weight"])
    objective(policy, (inputs, targets)).backward()
    assert all(p.grad is None for p in reference.parameters())
    assert all(p.grad is not None for p in policy.parameters())
