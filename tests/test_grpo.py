"""grpo.py, train_rl.py's pure functions, against hand computations: group advantages (with k1's KL in the reward),
the loss aggregations' token weights, the clipped surrogate, the KL estimators and their expected gradients, the
token-mean policy gradient, DWA's weights, and each step's prompts. (The loop itself: test_train_rl.py.)"""
import json
import math
import warnings

import pytest
import torch

import grpo
import parallel


def test_group_advantages_per_group():
    rewards = [1, 0, 0, 0,   1, 1, 1, 1,   0, 0, 1, 1]
    adv = grpo.group_advantages(rewards, n=4)
    # group 1: mean 0.25, unbiased std sqrt(0.25) = 0.5
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))
    assert torch.equal(adv[4:8], torch.zeros(4))                     # all-equal group -> exactly 0
    std = torch.tensor([0.0, 0.0, 1.0, 1.0]).std()                    # unbiased, as torch.std in verl
    assert torch.allclose(adv[8:], torch.tensor([-0.5, -0.5, 0.5, 0.5]) / (std + 1e-6))
    assert torch.equal(grpo.group_advantages([0, 0, 0], n=3), torch.zeros(3))
    with warnings.catch_warnings():  # a rank with no prompt this step: no group, and no warning from std() of none
        warnings.simplefilter("error")
        assert grpo.group_advantages([], n=4).shape == (0,)
    # partial rewards too: float32's std of one group of eight 0.7s is ~6e-8, not 0 (it depends on the reduction's
    # layout), which once gave them all +0.056
    for r in (0.1, 0.3, 0.7):
        for flat in ([r] * 8, [r] * 8 + [0, 1] * 4):
            assert torch.equal(grpo.group_advantages(flat, n=8)[:8], torch.zeros(8))
        assert grpo.zero_variance([r] * 8, 8) == [True]
    # Dr. GRPO: mean-centred only
    assert torch.allclose(grpo.group_advantages(rewards, 4, std_normalize=False)[:4],
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # groups of one: mean 0, std 1 (verl), so the advantage is the reward
    assert torch.equal(grpo.group_advantages([1.0, 0.0], n=1), torch.tensor([1.0, 0.0]))


def test_kl_in_the_reward_scales_linearly_with_kl_coef():
    """k1's penalty at an honest scale: the group statistics come from the task rewards alone and the KL term is
    centred in its group, never divided by the std. In a group of equal rewards the advantages are
    -kl_coef x (KL - mean KL): linear in kl_coef (normalising the shaped reward made them the standardised KL,
    nearly the same for kl_coef 0.1 and 1e-5)."""
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    seq_kl = [0.3, -0.1, 0.5, 0.1, 0.2, 0.0, 0.4, 0.2]
    kl = torch.tensor(seq_kl).view(2, 4)
    for std_normalize in (True, False):
        task = grpo.group_advantages(rewards, 4, std_normalize)
        for coef in (0.1, 1e-3, 1e-5):
            adv = grpo.group_advantages(rewards, 4, std_normalize, seq_kl=seq_kl, kl_coef=coef)
            torch.testing.assert_close(adv, task - coef * (kl - kl.mean(1, keepdim=True)).view(-1))
    equal = [grpo.group_advantages(rewards, 4, seq_kl=seq_kl, kl_coef=c)[:4] for c in (0.1, 1e-5)]
    torch.testing.assert_close(equal[0], 1e4 * equal[1])
    assert float(equal[0].abs().max()) == pytest.approx(0.1 * 0.3)  # |0.5 - mean 0.2|: no unit scale
    # groups of one (mean 0, std 1, as verl): the reward less kl_coef x KL
    torch.testing.assert_close(grpo.group_advantages([1.0, 0.0], 1, seq_kl=[0.5, 0.2], kl_coef=0.1),
                               torch.tensor([0.95, -0.02]))


def test_loss_aggregations_match_hand_computation_and_ignore_the_split():
    # two sequences with 2 and 3 response tokens; per-token losses l
    l1, l2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    hand = {"token_mean": (1 + 2 + 3 + 4 + 5) / 5,
            "seq_mean_token_mean": ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2,
            "constant": (1 + 2 + 3 + 4 + 5) / (10 * 2)}  # max_response_tokens = 10, 2 sequences
    for agg, want in hand.items():
        one = (grpo.token_weights([2, 3], agg, 5, 2, 10) * torch.cat([l1, l2])).sum()
        # the same batch as two micro-batches (or two ranks): weights use the global counts
        split = (grpo.token_weights([2], agg, 5, 2, 10) * l1).sum() + \
                (grpo.token_weights([3], agg, 5, 2, 10) * l2).sum()
        assert one.item() == pytest.approx(want) and split.item() == pytest.approx(want), agg


def test_clipping_on_both_sides():
    old = torch.zeros(6)
    logp = torch.log(torch.tensor([1.5, 1.1, 0.5, 1.5, 0.9, 0.5]))  # ratios
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    logp.requires_grad_(True)
    loss, clipped = grpo.ppo_clip_loss(logp, old, adv, clip_low=0.2, clip_high=0.3)
    # A>0: ratio 1.5 clipped to 1.3 (no gradient); 1.1 inside; 0.5 below the floor but the unclipped term
    # is the larger loss (pessimistic bound), so it keeps its gradient. A<0 mirrors it.
    assert torch.allclose(loss.detach(), torch.tensor([-1.3, -1.1, -0.5, 1.5, 0.9, 0.8]))
    assert clipped.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([0.0, -1.1, -0.5, 1.5, 0.9, 0.0]))  # d(-A*ratio)/dlogp = -A*ratio
    # clip-higher: the ceiling is 1 + clip_high, the floor 1 - clip_low
    loss2, _ = grpo.ppo_clip_loss(torch.log(torch.tensor([2.0, 0.1])), torch.zeros(2), torch.tensor([1.0, -1.0]),
                                  0.2, 0.28)
    assert torch.allclose(loss2, torch.tensor([-1.28, 0.8]))


def test_an_extreme_log_ratio_leaves_the_gradient_finite():
    """exp of a log-ratio past ~88.7 overflows fp32: one token's inf times its clipped branch's zero gradient made the
    whole update NaN (skipped as a bad step). The log-ratio is clamped to +-MAX_LOG_RATIO first, as verl does."""
    for adv in (1.0, 0.0, -1.0):
        logp = torch.tensor([-1.0, -1.0], requires_grad=True)
        loss, _ = grpo.ppo_clip_loss(logp, torch.tensor([-96.0, -1.1]), torch.tensor([adv, 1.0]))
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all(), adv
        assert logp.grad[1] == pytest.approx(-math.exp(0.1))  # (an ordinary token's gradient is untouched)
    # CISPO's weight is detached, but with an unbounded clip (--clip_high inf) an overflowed one times a zero
    # advantage (a zero-variance group, kept by default) was NaN
    logp = torch.tensor([-1.0, -1.0], requires_grad=True)
    loss, _ = grpo.cispo_loss(logp, torch.tensor([-101.0, -2.0]), torch.tensor([0.0, 1.0]), clip_high=math.inf)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert loss[1].item() == pytest.approx(-math.e) and logp.grad[1] == pytest.approx(-math.e)
    for make in (lambda lp, ref: grpo.kl_penalty(lp, ref, "k3"),
                 lambda lp, ref: grpo.kl_cov_loss(lp, ref, torch.ones(2), torch.ones(2))[0]):
        logp = torch.tensor([-96.0, -1.0], requires_grad=True)
        make(logp, torch.zeros(2)).sum().backward()
        assert torch.isfinite(logp.grad).all()


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5, -20.0])
    ref = torch.tensor([-1.5, -1.0, -0.5, -0.1])
    assert torch.allclose(grpo.kl_penalty(logp, ref, "k1"), logp - ref)
    d = ref - logp
    k3 = grpo.kl_penalty(logp, ref, "k3")
    assert torch.allclose(k3[:3], torch.exp(d[:3]) - d[:3] - 1)
    assert k3[2] == 0 and (k3 >= 0).all()
    assert k3[3] == 10.0  # exp(19.9) - ... clamped to 10 as in verl
    # both estimate KL(pi || ref): check their means on samples from pi against the exact value
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum()
    for est in ("k1", "k3"):
        assert grpo.kl_penalty(p.log()[x], q.log()[x], est).mean().item() == pytest.approx(exact.item(), abs=5e-3)


def test_kl_terms_expected_gradients_on_a_two_token_vocabulary():
    """Exact expectations over a 2-token vocabulary (sample weights pi(y), not differentiated). k1 in the reward
    (train_rl's k1): the policy-gradient loss on advantage -kl_coef * k1 descends KL(pi || ref). k3 in the loss
    (train_rl's k3): its gradient is that of the reverse KL(ref || pi), not of KL(pi || ref). k1 used as a loss
    would have expected gradient 0 (why train_rl does not offer it)."""
    theta = torch.tensor([0.4, -0.3], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([-0.5, 0.6]), 0)
    beta = 0.1

    def expected_grad(per_token_loss):
        logp = torch.log_softmax(theta, 0)
        weights = logp.exp().detach()
        (weights * per_token_loss(logp)).sum().backward()
        g = theta.grad.clone()
        theta.grad = None
        return g

    def analytic(kl):
        g, = torch.autograd.grad(kl(torch.log_softmax(theta, 0)), theta)
        return g

    forward_kl = lambda logp: (logp.exp() * (logp - ref)).sum()      # KL(pi || ref)
    reverse_kl = lambda logp: (ref.exp() * (ref - logp)).sum()       # KL(ref || pi)
    k1_reward = expected_grad(lambda logp: grpo.ppo_clip_loss(
        logp, logp.detach(), -beta * grpo.kl_penalty(logp, ref, "k1").detach())[0])
    assert torch.allclose(k1_reward, beta * analytic(forward_kl), atol=1e-6)
    k3_loss = expected_grad(lambda logp: beta * grpo.kl_penalty(logp, ref, "k3"))
    assert torch.allclose(k3_loss, beta * analytic(reverse_kl), atol=1e-6)
    assert not torch.allclose(k3_loss, beta * analytic(forward_kl), atol=1e-3)
    k1_loss = expected_grad(lambda logp: beta * grpo.kl_penalty(logp, ref, "k1"))
    assert torch.allclose(k1_loss, torch.zeros(2), atol=1e-7)


def test_token_mean_gradient_is_the_analytic_policy_gradient():
    """A 2-token vocabulary, policy softmax(theta) per position: the gradient of the token-mean loss (on-policy,
    ratio == 1) equals -(1/T) sum_i A_i sum_t (onehot(y_it) - p)."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(theta.detach(), 0)
    seqs = [torch.multinomial(p, k, replacement=True, generator=g) for k in (3, 5, 2, 4)]
    rewards = [1.0, 0.0, 1.0, 0.0]
    adv = grpo.group_advantages(rewards, n=4)
    lengths = [len(s) for s in seqs]
    y = torch.cat(seqs)
    logp = torch.log_softmax(theta, 0)[y]
    a = torch.repeat_interleave(adv, torch.tensor(lengths))
    tok_loss, _ = grpo.ppo_clip_loss(logp, logp.detach(), a)
    loss = (grpo.token_weights(lengths, "token_mean", sum(lengths), 4, 10) * tok_loss).sum()
    loss.backward()
    analytic = -sum(adv[i] * (torch.nn.functional.one_hot(s, 2).float() - p).sum(0)
                    for i, s in enumerate(seqs)) / sum(lengths)
    assert torch.allclose(theta.grad, analytic, atol=1e-6)
    assert theta.grad.abs().sum() > 0


def test_data_order_covers_each_epoch_once_and_is_deterministic():
    per_epoch = [grpo.step_prompt_indices(50, 8, s, seed=3) for s in range(1, 7)]  # 6 steps x 8 of 50
    flat = [i for b in per_epoch for i in b]
    assert len(set(flat)) == 48
    assert per_epoch == [grpo.step_prompt_indices(50, 8, s, seed=3) for s in range(1, 7)]
    assert grpo.step_prompt_indices(50, 8, 7, seed=3) != per_epoch[0]  # epoch 2: a new permutation
    shards = [parallel.rank_share(per_epoch[0], r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(per_epoch[0]) and not set(shards[0]) & set(shards[1])


def test_dwa_weights_match_a_hand_computation():
    # r = pi / pi_old = 2, 1/2, 1 and e: k3 = (r - 1) - log r
    logp = torch.log(torch.tensor([0.4, 0.1, 0.3, 0.5 * math.e]))
    old = torch.log(torch.tensor([0.2, 0.2, 0.3, 0.5]))
    kl = [1 - math.log(2), -0.5 + math.log(2), 0.0, math.e - 2]
    for s, alpha in ((1.0, 1.0), (0.5, 4.0), (2.0, -3.0)):
        want = [1 + s * (1 / (1 + math.exp(-alpha * k)) - 0.5) for k in kl]
        assert grpo.dwa_weights(logp, old, s, alpha).tolist() == pytest.approx(want, rel=1e-6)
    # high-KL boost (s, alpha > 0) raises the weight of the tokens that moved most; low-KL boost lowers it
    hi, lo = grpo.dwa_weights(logp, old, 1.0, 2.0), grpo.dwa_weights(logp, old, 1.0, -2.0)
    assert hi.argmax() == 3 and lo.argmin() == 3 and hi[2] == lo[2] == 1.0


def test_dwa_weights_are_one_on_policy_and_carry_no_gradient():
    logp = torch.randn(50, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    w = grpo.dwa_weights(logp, logp.detach(), 1.7, 25.0)
    assert torch.equal(w, torch.ones(50)) and not w.requires_grad


def test_rollout_is_weights_by_hand_and_exactly_one_when_sampler_and_trainer_agree():
    old = torch.tensor([0.0, -1.0, -2.0])
    sampler = torch.tensor([0.0, -1.5, 0.5])
    w, capped = grpo.rollout_is_weights(old, sampler, [2, 1], "token", cap=1.5)
    assert torch.allclose(w, torch.tensor([1.0, 1.5, math.exp(-2.5)]))  # e^0.5 = 1.65 capped to 1.5
    assert capped.tolist() == [False, True, False]
    w, capped = grpo.rollout_is_weights(old, sampler, [2, 1], "sequence", cap=2.0)
    assert torch.allclose(w, torch.tensor([math.exp(0.5), math.exp(0.5), math.exp(-2.5)]))  # one weight a response
    assert not capped.any()
    w, capped = grpo.rollout_is_weights(old, sampler, [2, 1], "sequence", cap=1.5)
    assert torch.allclose(w, torch.tensor([1.5, 1.5, math.exp(-2.5)])) and capped.tolist() == [True, True, False]
    w, capped = grpo.rollout_is_weights(old, sampler, [2, 1], "geometric", cap=1.2)  # exp of the mean log-ratio
    assert torch.allclose(w, torch.tensor([1.2, 1.2, math.exp(-2.5)])) and capped.tolist() == [True, True, False]
    w, _ = grpo.rollout_is_weights(old, sampler, [2, 1], "geometric", cap=2.0)
    assert torch.allclose(w, torch.tensor([math.exp(0.25), math.exp(0.25), math.exp(-2.5)]))
    w, masked = grpo.rollout_is_weights(old, sampler, [2, 1], "geometric", cap=1.5, mode="mask")
    assert torch.allclose(w, torch.tensor([math.exp(0.25), math.exp(0.25), 0.0]))
    assert masked.tolist() == [False, False, True]
    lp = torch.randn(50, requires_grad=True)
    for level in ("token", "sequence", "geometric"):
        w, capped = grpo.rollout_is_weights(lp, lp.detach().clone(), [20, 30], level)
        assert torch.equal(w, torch.ones(50)) and not capped.any() and not w.requires_grad  # detached
    with pytest.raises(ValueError, match="unknown rollout importance-sampling level"):
        grpo.rollout_is_weights(old, sampler, [3], "tokens")


def test_rollout_is_matches_verls_truncated_importance_sampling():
    """verl's TIS, written out as its actor does it: ratio = exp(old_log_prob - rollout_log_probs), clamped above at
    the cap, multiplied into the per-token policy-gradient loss."""
    g = torch.Generator().manual_seed(0)
    old, sampler = -torch.rand(64, generator=g) * 3, -torch.rand(64, generator=g) * 3
    adv = torch.randn(64, generator=g)
    verl_ratio = torch.clamp(torch.exp(old - sampler), max=2.0)
    verl_loss = -adv * 1.0 * verl_ratio  # on-policy: the PPO ratio is 1, its loss -A
    w, _ = grpo.rollout_is_weights(old, sampler, [64], "token", cap=2.0)
    loss, _ = grpo.ppo_clip_loss(old, old, adv)
    assert torch.allclose(loss * w, verl_loss)


def test_batch_std_scales_every_group_alike():
    """--std_scope batch: each group's mean-centred rewards divided by one std, the batch's (unbiased, all values);
    a group of equal rewards still gets 0."""
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]
    std = grpo.batch_moments(rewards)[1]
    assert std == pytest.approx(torch.tensor(rewards, dtype=torch.float64).std().item(), rel=1e-12)
    adv = grpo.group_advantages(rewards, 4, batch_std=std)
    centred = [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx([c / (std + 1e-6) for c in centred], rel=1e-6)
    per_group = grpo.group_advantages(rewards, 4)
    assert per_group[0] / per_group[4] != pytest.approx(adv[0] / adv[4])  # one scale for all, not each its own
    assert grpo.batch_moments([0.5]) == (0.5, 0.0) and grpo.batch_moments([]) == (0.0, 0.0)
    # far from 0 and close together: a sum of squares less the squared sum gave 1e-8 for 1,000 copies of 0.1
    assert grpo.batch_moments([0.1] * 1000)[1] < 1e-14
    close = [1 + 1e-7 * i for i in range(10)]
    want = torch.tensor(close, dtype=torch.float64).std().item()
    assert grpo.batch_moments(close)[1] == pytest.approx(want, rel=1e-9)


def test_token_moments_and_whitening_by_hand():
    """--std_scope tokens (REINFORCE++-baseline): the moments of the responses' advantages with each counted once per
    token are those of the token list written out (a response of no token counts nothing); whitening is (A - mean) /
    sqrt(std^2 + 1e-8), verl's masked_whiten."""
    values, lengths = [0.5, -0.5, 1.5, 9.0], [3, 1, 2, 0]
    tokens = torch.tensor([0.5] * 3 + [-0.5] + [1.5] * 2, dtype=torch.float64)
    mean, std = grpo.batch_moments(values, lengths)
    assert mean == pytest.approx(float(tokens.mean()), rel=1e-12)
    assert std == pytest.approx(float(tokens.std()), rel=1e-12)
    assert grpo.batch_moments([2.0], [1]) == (2.0, 0.0) and grpo.batch_moments([2.0], [0]) == (0.0, 0.0)
    adv = torch.tensor(values)
    torch.testing.assert_close(grpo.whiten(adv, mean, std), (adv - mean) / math.sqrt(std ** 2 + 1e-8))
    white = grpo.whiten(tokens, *grpo.batch_moments(tokens.tolist()))
    assert float(white.mean()) == pytest.approx(0, abs=1e-12) and float(white.std()) == pytest.approx(1, rel=1e-6)


def test_top_fraction_threshold_is_the_kth_largest(monkeypatch):
    """The floor of the top `frac` of the values (the k-th largest, k = ceil(frac n)), ties, zeros (a confident
    token's entropy), a rounding's -1e-7 and 1e-30 included: what topk gives, at world size 1 (tests/test_train_rl.py:
    the same at 2 ranks), in at most 36 all-reduces (a bisection on the values themselves took ~1,100 to reach an
    entropy of 0)."""
    calls, real = [0], grpo.parallel.all_reduce_numbers

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(grpo.parallel, "all_reduce_numbers", counted)
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 80, (1,), generator=g))
        v = torch.rand(n, generator=g) * 5
        pick = torch.rand(n, generator=g)
        v[pick < 0.3], v[pick < 0.2], v[pick < 0.1], v[pick < 0.05] = 1.5, 0.0, 1e-30, -1e-7
        frac = [0.2, 0.5, 1e-6, 0.999, 1.0, 1 / 3][trial % 6]
        k = max(1, math.ceil(frac * n - 1e-9))
        calls[0] = 0
        assert grpo.top_fraction_threshold(v, frac) == float(torch.topk(v, k).values[-1])
        assert calls[0] <= 36
    assert grpo.top_fraction_threshold(torch.tensor([3.0, 1.0, 2.0]), 1.0) == 1.0  # all: the smallest
    assert grpo.top_fraction_threshold(torch.zeros(0), 0.2) is None
    nan = float("nan")  # a blown-up forward's NaN is left out (it took the floor to -inf at one rank, not at another)
    assert grpo.top_fraction_threshold(torch.tensor([nan, 1.0, 2.0, 3.0]), 0.5) == 2.0
    assert grpo.top_fraction_threshold(torch.tensor([nan]), 0.5) is None
    assert grpo.top_fraction_threshold(torch.arange(10.0), 0.2) == 8.0  # (k = 2, though 0.2 x 10 > 2 in floats)


def test_masked_importance_sampling_by_hand():
    """mode mask (MIS / IcePop): the ratio inside [1/cap, cap], 0 outside, per token or per response."""
    old = torch.tensor([0.0, -1.0, -2.0, -0.2])
    sampler = torch.tensor([0.0, -1.5, 0.5, 0.0])  # ratios 1, e^0.5 = 1.65, e^-2.5 = 0.08, e^-0.2 = 0.82
    w, masked = grpo.rollout_is_weights(old, sampler, [2, 2], "token", cap=1.5, mode="mask")
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 0.0, math.exp(-0.2)]))
    assert masked.tolist() == [False, True, True, False]
    w, masked = grpo.rollout_is_weights(old, sampler, [2, 2], "sequence", cap=2.0, mode="mask")
    assert torch.allclose(w, torch.tensor([math.exp(0.5)] * 2 + [0.0] * 2))  # the second response: e^-2.7 < 1/2
    assert masked.tolist() == [False, False, True, True]
    lp = torch.randn(50, requires_grad=True)
    w, masked = grpo.rollout_is_weights(lp, lp.detach().clone(), [50], "token", mode="mask")
    assert torch.equal(w, torch.ones(50)) and not masked.any() and not w.requires_grad
    with pytest.raises(ValueError, match="unknown rollout importance-sampling mode"):
        grpo.rollout_is_weights(old, sampler, [4], "token", mode="clip")


def test_cispo_clips_the_weight_not_the_token():
    """CISPO: value -A * clip(rho) (PPO's -A * rho inside the band), and a gradient -A * clip(rho) * grad log pi on
    every token, where PPO's clip gives a token past the band none."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    old = torch.tensor([-1.0, -1.5, -0.5, -1.1])  # ratios 1, e^0.5 = 1.65, e^-0.5 = 0.61, e^0.1 = 1.105
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, clipped = grpo.cispo_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    weight = torch.tensor([1.0, 1.28, 0.8, math.exp(0.1)])
    assert torch.allclose(loss, -adv * weight) and clipped.tolist() == [0.0, 1.0, 1.0, 0.0]
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv * weight)  # every token's gradient, its weight clipped
    ppo_logp = logp.detach().clone().requires_grad_()
    ppo, _ = grpo.ppo_clip_loss(ppo_logp, old, adv, 0.2, 0.28)
    ppo.sum().backward()
    assert ppo_logp.grad[1] == 0 and ppo_logp.grad[2] == 0  # past the band: no gradient under PPO
    assert torch.allclose(ppo[[0, 3]], loss.detach()[[0, 3]])  # inside the band both values are -A * rho
    on = torch.randn(8, requires_grad=True)  # on-policy: PPO's loss and gradient exactly
    a = torch.randn(8)
    c, _ = grpo.cispo_loss(on, on.detach(), a)
    p, _ = grpo.ppo_clip_loss(on, on.detach(), a)
    assert torch.equal(c, p.detach()) and torch.equal(torch.autograd.grad(c.sum(), on)[0],
                                                      torch.autograd.grad(p.sum(), on)[0])


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment: 0 up to max - buffer, then linear down to -factor at the cap; buffer 0 off."""
    assert grpo.overlong_penalty([1, 6, 7, 8, 10], 10, 4, factor=0.5) == [0.0, 0.0, -0.125, -0.25, -0.5]
    assert grpo.overlong_penalty([10, 10], 10, 10) == [-1.0, -1.0]
    assert grpo.overlong_penalty([3, 10], 10, 0) == [0.0, 0.0]


def test_zero_variance_groups():
    assert grpo.zero_variance([1, 1, 0, 1, 0.5, 0.5], n=2) == [True, False, True]
    assert grpo.zero_variance([0, 0, 0, 0], n=4) == [True]
    assert grpo.zero_variance([1, 0, 1], n=1) == [False, False, False]  # a group of one: nothing to compare
    # partial rewards, one group per call (a rank's share of one prompt) at group sizes that are not powers of two:
    # float64's std of three 0.1s is 1.7e-17, not 0, while group_advantages gives them all 0 (the group teaches
    # nothing, and dynamic sampling must refill it)
    for r in (0.1, 0.3, 0.7):
        for n in (3, 6, 7):
            assert grpo.zero_variance([r] * n, n) == [True]
            assert grpo.zero_variance([r] * n + [0.0] * (n - 1) + [1.0], n) == [True, False]
            assert torch.equal(grpo.group_advantages([r] * n, n), torch.zeros(n))


def test_refill_keeps_the_first_groups_with_signal_up_to_the_room_left():
    assert grpo.refill_keep([1, 0, 1, 1, 0, 1], room=2) == [True, False, True, False, False, False]
    assert grpo.refill_keep([0, 1, 0], room=5) == [False, True, False]  # all it has, fewer than wanted
    assert grpo.refill_keep([1, 1], room=0) == [False, False]


def test_a_steps_first_generation_batch_keeps_its_seed_and_later_batches_get_their_own():
    import numpy as np
    assert grpo.generation_seed(1234, 7, 1) == int(np.random.default_rng([1234, 7, 1]).integers(2**31))
    seeds = {grpo.generation_seed(1234, 7, 1, b) for b in range(4)} | {grpo.generation_seed(1234, 7, 0, 1)}
    assert len(seeds) == 5


def test_per_response_sums_and_means():
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert torch.equal(grpo.per_response(v, [2, 1, 3]), torch.tensor([3.0, 3.0, 3.0, 15.0, 15.0, 15.0]))
    assert torch.equal(grpo.per_response(v, [2, 1, 3], mean=True), torch.tensor([1.5, 1.5, 3.0, 5.0, 5.0, 5.0]))


def test_gspo_ratio_is_the_responses_mean_log_ratio_with_each_tokens_own_gradient():
    """GSPO-token: the value of every token's ratio is s_i = exp(mean_t log(pi/pi_old)) of its response; the gradient
    of sum_t ratio_t A_t with respect to log pi_t is s_i A_t (sg[s_i] pi_t / sg[pi_t])."""
    logp = torch.tensor([-1.0, -2.0, -0.5, -0.1, -3.0], requires_grad=True)
    old = torch.tensor([-1.5, -1.5, -0.2, -0.4, -2.0])
    lengths, adv = [2, 3], torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    ratio = torch.exp(grpo.sequence_ratio_logp(logp, old, lengths) - old)
    s = torch.tensor([math.exp((0.5 - 0.5) / 2)] * 2 + [math.exp((-0.3 + 0.3 - 1.0) / 3)] * 3)
    assert torch.allclose(ratio, s)
    (ratio * adv).sum().backward()
    assert torch.allclose(logp.grad, s * adv)
    # on-policy (old = logp) the ratio is 1 and the gradient that of the token-level ratio
    logp.grad = None
    on = torch.exp(grpo.sequence_ratio_logp(logp, logp.detach(), lengths) - logp.detach())
    assert torch.allclose(on, torch.ones(5))
    (on * adv).sum().backward()
    assert torch.allclose(logp.grad, adv)


def test_lr_warm_up_by_hand():
    """Step 1 (the first update) runs at lr / warmup, not at 0 as HF's schedule; constant from step warmup on."""
    assert [grpo.lr_at(s, 1e-3, 4) for s in (1, 2, 4, 9)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])
    assert grpo.lr_at(1, 1e-3, 0) == 1e-3


def test_the_leave_one_out_baseline_is_the_mean_of_the_others():
    """--baseline loo (RLOO): each reward less the mean of its group's other rewards, by hand; then the group's std as
    GRPO's, an all-equal group 0, and k1's KL centred the same way."""
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    loo = grpo.group_advantages(rewards, 4, std_normalize=False, baseline="loo")
    others = [r - (sum(rewards[:4]) - r) / 3 for r in rewards[:4]]
    torch.testing.assert_close(loo, torch.tensor(others + [0.0] * 4))
    std = torch.tensor(rewards[:4]).std().item()
    torch.testing.assert_close(grpo.group_advantages(rewards, 4, baseline="loo")[:4],
                               torch.tensor(others) / (std + 1e-6))
    seq_kl = [0.4, 0.1, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0]
    shaped = grpo.group_advantages(rewards, 4, std_normalize=False, seq_kl=seq_kl, kl_coef=0.5, baseline="loo")
    kl_others = [k - (sum(seq_kl[:4]) - k) / 3 for k in seq_kl[:4]]
    torch.testing.assert_close(shaped[:4], torch.tensor([a - 0.5 * k for a, k in zip(others, kl_others)]))
    assert not torch.allclose(loo, grpo.group_advantages(rewards, 4, std_normalize=False))
    with pytest.raises(ValueError, match="baseline"):
        grpo.group_advantages(rewards, 4, baseline="median")


def test_kl_cov_chooses_the_tokens_of_largest_centred_product():
    """KL-Cov's tokens: the k = floor(frac N) (at least one) largest (log pi - mean)(A - mean), means over the batch,
    by hand; the returned covariance is their mean. Ties at the floor go to the smallest uniforms, so exactly k are
    chosen even where every advantage is 0 (every product 0). A NaN log-prob (a blown-up forward, whose step is
    skipped) makes every product NaN: nothing is chosen, on every rank alike, and nothing fails."""
    g = torch.Generator().manual_seed(1)
    from fractions import Fraction
    for n, frac in ((50, 0.1), (50, 0.0001), (7, 0.5), (200, 0.02), (100, 0.29)):  # (0.29 x 100 = 28.99... in floats)
        logp = -torch.rand(n, generator=g) * 3
        adv = torch.randn(n, generator=g)
        u = torch.rand(n, generator=g)
        chosen, cov = grpo.covariance_tokens(logp, adv, "kl_cov", frac, u)
        lp, a = logp.double(), adv.double()
        products = (lp - lp.mean()) * (a - a.mean())
        k = max(1, math.floor(Fraction(str(frac)) * n))  # (the decimal fraction, exactly)
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.topk(products, k).indices] = True
        assert torch.equal(chosen, want) and int(chosen.sum()) == k
        assert cov == pytest.approx(float(products.mean()), rel=1e-9)
    # products by hand: 1.55 (tokens 0-2), 0.05 (3-4), 0.95 (5-9): k = 5 takes 0-2 and two of the five tied at 0.95,
    # those of the smallest uniforms (0.05 and 0.4: tokens 6 and 8)
    adv = torch.tensor([0.5, 0.5, 0.5, -1.0, -1.0, -2.0, -2.0, -2.0, -2.0, -2.0])
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -3.0, -3.0, -3.0, -3.0, -3.0])
    u = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.7, 0.05, 0.6, 0.4, 0.8])
    chosen, cov = grpo.covariance_tokens(logp, adv, "kl_cov", 0.5, u)
    assert chosen.nonzero().flatten().tolist() == [0, 1, 2, 6, 8]
    assert cov == pytest.approx((3 * 1.55 + 2 * 0.05 + 5 * 0.95) / 10)
    chosen, cov = grpo.covariance_tokens(-torch.rand(20, generator=g), torch.zeros(20), "kl_cov", 0.1, u.repeat(2))
    assert int(chosen.sum()) == 2 and cov == 0.0  # all tied at 0: exactly k, not every token
    logp[0] = float("nan")
    chosen, cov = grpo.covariance_tokens(logp, adv, "kl_cov", 0.2, u)
    assert not chosen.any() and math.isnan(cov)
    chosen, cov = grpo.covariance_tokens(torch.zeros(0), torch.zeros(0), "kl_cov", 0.2, torch.zeros(0))
    assert chosen.shape == (0,) and cov is None


def test_clip_cov_draws_its_tokens_from_inside_the_bounds_by_the_smallest_uniforms():
    """Clip-Cov's tokens: of those whose centred product lies strictly inside the bounds, the k = floor(frac N)
    with the smallest uniforms (a random draw that does not depend on the ranks), all of them where fewer, none where
    no token is inside."""
    g = torch.Generator().manual_seed(2)
    n = 400
    logp, adv = -torch.rand(n, generator=g) * 4, torch.randn(n, generator=g) * 2
    u = torch.rand(n, generator=g)
    lp, a = logp.double(), adv.double()
    products = ((lp - lp.mean()) * (a - a.mean())).float()
    inside = (products > 0.5) & (products < 2.0)
    assert 10 < int(inside.sum()) < n // 2
    chosen, _ = grpo.covariance_tokens(logp, adv, "clip_cov", 0.02, u, (0.5, 2.0))
    k = int(0.02 * n)
    want = torch.zeros(n, dtype=torch.bool)
    want[torch.where(inside)[0][torch.argsort(u[inside])[:k]]] = True
    assert torch.equal(chosen, want) and int(chosen.sum()) == k
    chosen, _ = grpo.covariance_tokens(logp, adv, "clip_cov", 0.9, u, (0.5, 2.0))
    assert torch.equal(chosen, inside)  # fewer inside than k: all of them
    chosen, _ = grpo.covariance_tokens(logp, adv, "clip_cov", 0.02, u, (100.0, 200.0))
    assert not chosen.any()
    with pytest.raises(ValueError, match="covariance method"):
        grpo.covariance_tokens(logp, adv, "cov", 0.02, u)


COVARIANCE_SCRIPT = '''
import json, sys
import torch
import grpo, parallel

rank, world, device = parallel.dist_setup()
g = torch.Generator().manual_seed(3)
logp, adv, u = -torch.rand(300, generator=g) * 3, torch.randn(300, generator=g), torch.rand(300, generator=g)
adv[:100] = 0.0  # ties
out = {}
for name, cut in (("uneven", 120), ("empty", 0), ("all", 300)):
    mine = slice(0, cut) if rank == 0 else slice(cut, 300)
    for method in ("kl_cov", "clip_cov"):
        chosen, cov = grpo.covariance_tokens(logp[mine], adv[mine], method, 0.05, u[mine], (0.1, 1.0))
        out[f"{name}_{method}"] = [chosen.nonzero().flatten().add(mine.start).tolist(), cov]
parallel.dist_cleanup()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
    json.dump(out, f)
'''


@pytest.mark.torchrun
def test_covariance_tokens_at_two_ranks_choose_what_one_rank_does(tmp_path):
    """Clip-Cov's and KL-Cov's choice over 2 ranks (gloo), the tokens split unevenly, all on one rank or all on the
    other: together the ranks choose the tokens one process chooses, with the same covariance (a rank with no token
    joins every collective)."""
    from test_parallel import two_ranks
    proc = two_ranks(tmp_path, "covariance.py", COVARIANCE_SCRIPT, tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    g = torch.Generator().manual_seed(3)
    logp, adv, u = -torch.rand(300, generator=g) * 3, torch.randn(300, generator=g), torch.rand(300, generator=g)
    adv[:100] = 0.0
    for method in ("kl_cov", "clip_cov"):
        chosen, cov = grpo.covariance_tokens(logp, adv, method, 0.05, u, (0.1, 1.0))
        assert int(chosen.sum()) == 15
        for name in ("uneven", "empty", "all"):
            got = sorted(ranks[0][f"{name}_{method}"][0] + ranks[1][f"{name}_{method}"][0])
            assert got == chosen.nonzero().flatten().tolist(), (name, method)
            assert ranks[0][f"{name}_{method}"][1] == pytest.approx(cov, rel=1e-9)


def test_kl_cov_loss_by_hand_its_penalty_acting_only_off_policy():
    """KL-Cov's loss: -A rho with no clip, plus coef |log rho| on the chosen tokens only; on-policy its gradient is
    -A grad log pi on every token (|x|'s gradient at 0 is 0), off-policy the penalty pulls a chosen token's
    log-prob back toward the old one."""
    logp = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    old = torch.tensor([-1.5, -0.5, -1.0])
    adv = torch.tensor([1.0, -2.0, 0.5])
    chosen = torch.tensor([True, False, True])
    loss, clipped = grpo.kl_cov_loss(logp, old, adv, chosen, coef=0.3)
    rho = torch.exp(logp.detach() - old)
    want = -adv * rho + 0.3 * (logp.detach() - old).abs() * chosen
    torch.testing.assert_close(loss.detach(), want)
    assert not clipped.any()  # rho = e^0.5 is past any clip band: no clip here
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv * rho + 0.3 * torch.sign(logp.detach() - old) * chosen)
    on = torch.tensor([-1.0, -0.5, -2.0], requires_grad=True)
    grpo.kl_cov_loss(on, on.detach(), adv, chosen, coef=0.3)[0].sum().backward()
    torch.testing.assert_close(on.grad, -adv)
