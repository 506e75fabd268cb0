"""
train_rl.py's pure functions: the GRPO objective (group advantages with RLOO's baseline or the group mean, the
batch's std or REINFORCE++'s whitening, the PPO clipped surrogate, CISPO's and KL-Cov's, the KL estimators, DWA's
token weights, the rollouts' importance weights, DAPO's overlong penalty, the high-entropy minority's floor, the
tokens Clip-Cov and KL-Cov act on, the loss aggregation's token weights) and the run's schedule (each step's
prompts, sampling seed and learning rate). Each switch is one setting of train_rl.py; tests/test_grpo.py checks each
function against a hand computation.
"""
import math

import numpy as np
import torch

import parallel


def group_advantages(rewards, n, std_normalize=True, seq_kl=None, kl_coef=0.0, eps=1e-6, batch_std=None,
                     baseline="mean"):
    """GRPO advantages for rewards laid out group by group (n per prompt): (r - mean_g) / (std_g + eps).
    baseline "loo" (RLOO, Ahmadian et al. 2024, arXiv 2402.14740): r less the mean of the group's other n - 1
    rewards, which is n / (n - 1) x (r - mean_g), before any std (RLOO itself has none: std_normalize False).

    std is unbiased (N-1), as torch.std in verl. A group with all-equal rewards gets exactly 0 (before k1's term
    below; train_rl's --std_scope tokens then whitens over tokens, which moves it off 0).
    Groups of one use mean 0 and std 1 (verl), i.e. the advantage is the reward. batch_std: divided by this (the
    std of the whole batch's rewards, batch_moments()) instead of each group's own.

    seq_kl (k1's KL in the reward, InstructGPT): each response's summed log(pi / pi_ref). The group statistics
    come from the task rewards alone; then kl_coef x (seq_kl - its group's mean) is subtracted, unscaled, so the
    penalty is linear in kl_coef. (Normalising the shaped reward r - kl_coef x seq_kl instead, as verl does, turns
    a group of equal rewards into the standardised KL at unit scale whatever kl_coef is: docs/grpo.md.)
    """
    if baseline not in ("mean", "loo"):
        raise ValueError(f"unknown baseline {baseline!r}")
    scale = n / (n - 1) if baseline == "loo" and n > 1 else 1.0
    r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, n)
    if n == 1 or not r.numel():  # (no group: a rank with no prompt this step)
        adv = r.clone()
    else:
        mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True)
        adv = (r - mean) * scale
        if std_normalize:
            adv = adv / ((std if batch_std is None else batch_std) + eps)
        adv = torch.where(equal_rewards(r)[:, None], torch.zeros_like(adv), adv)
    if seq_kl is not None:
        kl = torch.as_tensor(seq_kl, dtype=torch.float32).view(-1, n)
        adv = adv - kl_coef * ((kl - kl.mean(1, keepdim=True)) * scale if n > 1 else kl)
    return adv.view(-1)


def batch_moments(values, weights=None):
    """The mean and unbiased std of values over every rank's together (the step's whole batch), in float64, each value
    counted weights[i] times (a response's token count: the moments of its tokens, as verl's masked_whiten takes them;
    default once); std 0 for fewer than two counts, mean 0 for none. Two all-reduces (the mean, then the squared
    deviations from it): a sum of squares less the squared sum cancels badly where the values sit far from 0 and close
    together. Every rank calls this."""
    weights = [1] * len(values) if weights is None else weights
    s = parallel.all_reduce_numbers({"n": sum(weights), "sum": sum(w * v for v, w in zip(values, weights))})
    mean = s["sum"] / s["n"] if s["n"] else 0.0
    deviations = parallel.all_reduce_numbers({"d": sum(w * (v - mean) ** 2 for v, w in zip(values, weights))})["d"]
    return mean, (math.sqrt(deviations / (s["n"] - 1)) if s["n"] >= 2 else 0.0)


def whiten(adv, mean, std):
    """REINFORCE++-baseline's whitening (arXiv 2501.03262; verl's masked_whiten): (A - mean) / sqrt(std^2 + 1e-8), the
    batch's token moments (batch_moments)."""
    return (adv - mean) / math.sqrt(std ** 2 + 1e-8)


def finite_count(values):
    """How many of every rank's values together are finite (one all-reduce). Every rank calls this."""
    return int(parallel.all_reduce_numbers({"n": int(torch.isfinite(values.detach()).sum())})["n"])


def top_fraction_threshold(values, frac):
    """The k-th largest of every rank's float32 values together, k = ceil(frac x their number): the floor of the top
    `frac` ('Beyond the 80/20 Rule', arXiv 2506.01939: the highest-entropy tokens). None where no rank has a finite
    value (a NaN, from a blown-up forward, is left out on every rank). Every rank calls this."""
    n = finite_count(values)
    # (0.2 x 10 is 2.0000000000000004 in floats: k = 2, not 3)
    return kth_largest(values, max(1, math.ceil(frac * n * (1 - 1e-12)))) if n else None


def kth_largest(values, k):
    """The k-th largest of every rank's finite float32 values together (1 <= k <= their number), by a binary search
    over the values' bit patterns (as ordered integers: exact, at most 33 steps however small the value, e.g. an
    entropy of 0), each step one all-reduce of a count, so no rank sends its values and every rank takes the same
    steps; the same at any world size. Non-finite values are left out. Every rank calls this."""
    v = values.detach().float().flatten()
    bits = v[torch.isfinite(v)].view(torch.int32).long()
    keys = torch.where(bits < 0, -2**31 - bits, bits)  # the floats' order (-0.0 and 0.0 alike)
    lo = int(parallel.all_reduce_numbers({"x": int(keys.min()) if keys.numel() else 2**31}, op="min")["x"])
    hi = int(parallel.all_reduce_numbers({"x": int(keys.max()) if keys.numel() else -2**31}, op="max")["x"]) + 1
    while hi - lo > 1:  # count(keys >= lo) >= k > count(keys >= hi)
        mid = (lo + hi) // 2
        if parallel.all_reduce_numbers({"c": int((keys >= mid).sum())})["c"] >= k:
            lo = mid
        else:
            hi = mid
    bits = lo if lo >= 0 else -2**31 - lo
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def covariance_tokens(logp, adv, method, frac, uniforms, bounds=(1.0, 5.0)):
    """The tokens Clip-Cov or KL-Cov act on (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
    Reasoning Language Models", arXiv 2505.22617): each token's centred product (log pi - mean log pi) x (A - mean A),
    both means over every rank's training tokens together (the paper's batch; verl takes each micro-batch's), whose
    mean is the batch's Cov(log pi, A), the quantity the paper finds driving entropy down. logp, adv: this rank's
    training tokens, flat, in float; uniforms: one number in [0, 1) per token, a hash of the token's place in the step
    (the same at any world size). Of the batch's N tokens, k = max(1, floor(frac x N)) are chosen (verl's count):
    kl_cov: those with the k largest products, ties at the floor broken by the smallest uniforms (an all-zero batch
    of advantages ties every token); clip_cov: k drawn at random from those whose product lies strictly inside bounds
    (all of them where fewer), the k smallest uniforms among them. Exactly k but for ties of the uniforms' 24 bits at
    the floor (kept). Returns (a bool mask over this rank's tokens, the batch's covariance; None where no rank has a
    token). Every rank calls this, taking the same steps: each branch turns on counts summed over the ranks."""
    lp, a = logp.detach().double(), adv.detach().double()
    s = parallel.all_reduce_numbers({"n": lp.numel(), "lp": float(lp.sum()), "a": float(a.sum())})
    n = int(s["n"])
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=logp.device), None
    products = (lp - s["lp"] / n) * (a - s["a"] / n)
    covariance = parallel.all_reduce_numbers({"c": float(products.sum())})["c"] / n
    # (0.29 x 100 is 28.999999999999996 in floats: k = 29, the documented floor, not 28)
    products, k = products.float(), max(1, math.floor(frac * n * (1 + 1e-12)))
    if method == "kl_cov":  # (a NaN log-prob makes every product NaN: nothing chosen, on every rank)
        finite = finite_count(products)
        if not finite:
            return torch.zeros_like(products, dtype=torch.bool), covariance
        floor = kth_largest(products, min(k, finite))
        above, tied = products > floor, products == floor
        room = min(k, finite) - int(parallel.all_reduce_numbers({"c": int(above.sum())})["c"])
        return above | smallest_draws(tied, uniforms, room), covariance
    if method != "clip_cov":
        raise ValueError(f"unknown covariance method {method!r}")
    return smallest_draws((products > bounds[0]) & (products < bounds[1]), uniforms, k), covariance


def smallest_draws(among, uniforms, k):
    """Of the tokens marked in `among` on every rank together, the k with the smallest uniforms (all of them where
    fewer; ties at the floor kept): a random choice that does not depend on the ranks. Every rank calls this."""
    count = int(parallel.all_reduce_numbers({"c": int(among.sum())})["c"])
    if count == 0:
        return among
    draw = torch.where(among, -uniforms.float(), torch.full_like(uniforms, float("nan"), dtype=torch.float32))
    return among & (draw >= kth_largest(draw, min(k, count)))


def equal_rewards(r):
    """Per row of r (groups, n): True where every reward is the same. Equal rewards, not std == 0: the std of equal
    rewards such as 0.1 or 0.7 is ~8e-9 or ~6e-8 in float32 and ~1e-17 in float64 at some group sizes, not 0."""
    return (r == r[:, :1]).all(1)


def zero_variance(rewards, n):
    """Per group of n (rewards laid out group by group): True where every reward is the same (in float32, as
    group_advantages sees them), so its task advantages are 0 and its policy gradient none (k1's KL term and
    --std_scope tokens' whitening aside; a group of one has no variance to speak of: False)."""
    if n == 1:
        return [False] * len(rewards)
    return equal_rewards(torch.as_tensor(rewards, dtype=torch.float32).view(-1, n)).tolist()


def refill_keep(signal, room):
    """DAPO's dynamic sampling (arXiv 2503.14476): of a freshly sampled prompt batch, in its global prompt order,
    `signal` says which groups' rewards vary; the first `room` of those (the groups the step still wants) train.
    A function of the batch alone, so every rank, at any world size, keeps the same groups."""
    keep = []
    for s in signal:
        keep.append(bool(s) and room > 0)
        room -= keep[-1]
    return keep


# a log-ratio is clamped to this before exp (verl's bound): past ~88.7 exp overflows fp32, and one token's inf times a
# clipped branch's zero gradient made the whole update NaN (the step skipped)
MAX_LOG_RATIO = 20.0


def bounded(log_ratio):
    """log_ratio clamped to +-MAX_LOG_RATIO, for exp."""
    return torch.clamp(log_ratio, -MAX_LOG_RATIO, MAX_LOG_RATIO)


def ppo_clip_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.2):
    """Per-token PPO clipped surrogate, to minimise: max(-A*rho, -A*clip(rho, 1-clip_low, 1+clip_high)).

    Returns (loss per token, 1.0 where the clipped branch is the one taken, else 0.0).
    """
    ratio = torch.exp(bounded(logp - old_logp))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def cispo_loss(logp, old_logp, adv, clip_low=0.2, clip_high=0.2):
    """CISPO (MiniMax-M1, arXiv 2506.13585) per token, to minimise: -sg(clip(rho, 1-clip_low, 1+clip_high)) * A *
    rho / sg(rho): the importance weight is clipped and detached, never the token, so every token keeps its policy
    gradient (PPO's clip gives a token past the band none). Its value is -A * the clipped weight, as ppo_clip_loss's is
    -A * rho where the clip does not bind; its gradient -A * weight * grad log pi. logp: ppo_clip_loss's (the token's
    log-prob, or GSPO's sequence-level one). Returns (loss per token, 1.0 where the weight was clipped, else 0.0).
    (The log-ratio is bounded before exp, as ppo_clip_loss's: with --clip_high inf an overflowed weight times a zero
    advantage was NaN.)"""
    ratio = torch.exp(bounded(logp - old_logp))
    weight = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high).detach()
    clipped = (ratio.detach() < 1.0 - clip_low) | (ratio.detach() > 1.0 + clip_high)
    return -adv * weight * torch.exp(logp - logp.detach()), clipped.float()


def kl_cov_loss(logp, old_logp, adv, selected, coef=1.0):
    """KL-Cov (arXiv 2505.22617; verl's kl_cov) per token, to minimise: -A * rho, no clip, with coef x |log pi -
    log pi_old| added on the selected tokens (covariance_tokens), which holds them near the old policy. On-policy
    (rho = 1) it is -A * rho exactly, as |x|'s gradient at 0 is 0: it acts from the second update of a batch.
    Returns (loss per token, 0.0 everywhere: nothing is clipped)."""
    log_ratio = logp - old_logp
    return -adv * torch.exp(bounded(log_ratio)) + coef * log_ratio.abs() * selected, torch.zeros_like(adv)


def kl_penalty(logp, ref_logp, estimator="k3"):
    """Per-token estimate of the value of KL(pi || pi_ref) from samples of pi.

    k1 = logp - ref_logp (unbiased, high variance; train_rl puts it in the reward); k3 = exp(ref - logp) -
    (ref - logp) - 1 (unbiased, always >= 0, verl's low_var_kl; train_rl puts it in the loss), clamped to
    [-10, 10] as in verl, its log-ratio to +-MAX_LOG_RATIO first (an overflow made the update NaN). (As a loss, k3's
    gradient is in expectation that of KL(pi_ref || pi).)
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        d = bounded(ref_logp - logp)
        return torch.clamp(torch.exp(d) - d - 1.0, min=-10.0, max=10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def dwa_weights(logp, old_logp, s, alpha):
    """Divergence-weighted advantage weights (arXiv 2603.22446): w = 1 + s (sigmoid(alpha KL) - 1/2), where
    KL = (r - 1) - log r, r = pi / pi_old on the sampled token, is the k3 estimate of KL(pi_old || pi) from samples
    of pi_old (the rollouts). Detached; exactly 1 where logp == old_logp (on-policy)."""
    log_r = (logp - old_logp).detach()
    kl = torch.expm1(log_r) - log_r
    return 1.0 + s * (torch.sigmoid(alpha * kl) - 0.5)


def per_response(values, lengths, mean=False):
    """Each token's value replaced by the sum (or mean) over its response; values: flat, responses of `lengths` in
    order."""
    counts = torch.tensor(lengths, device=values.device)
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), counts)
    total = torch.zeros(len(lengths), device=values.device, dtype=values.dtype).index_add_(0, seq, values)
    return (total / counts.clamp(min=1) if mean else total)[seq]


def sequence_ratio_logp(logp, old_logp, lengths):
    """GSPO's sequence-level ratio (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv 2507.18071, in
    its GSPO-token form): each token's ratio is the response's length-normalised ratio s_i = exp(mean_t log(pi /
    pi_old)), with the token's own gradient, sg[s_i] pi_t / sg[pi_t]. Returned as log-probs for ppo_clip_loss, which
    takes exp(logp - old_logp): its value is then log s_i at every token, its gradient that of logp."""
    mean_log_ratio = per_response((logp - old_logp).detach(), lengths, mean=True)
    return old_logp + mean_log_ratio + (logp - logp.detach())


def rollout_is_weights(old_logp, sampler_logp, lengths, level="token", cap=2.0, mode="truncate"):
    """Truncated importance sampling (TIS: Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"; verl's rollout importance sampling). The rollouts were drawn by the engine, whose
    log-probs (sampler_logp) differ slightly from the trainer's (old_logp: kernels, batch shapes, bf16), while the
    update's ratio is taken against the trainer; each token's policy-gradient loss is weighted by
    min(pi_old / pi_sampler, cap) ("token"), or every token of a response by min(prod_t pi_old / pi_sampler, cap)
    ("sequence"), or by the geometric mean of its tokens' ratios, exp(mean_t log(pi_old / pi_sampler)) ("geometric",
    verl's level of that name: a sequence weight that does not grow with the length). mode "mask" (masked importance
    sampling, MIS / IcePop: Liu, Li et al. 2025, "When Speed Kills Stability"): the ratio itself inside [1/cap, cap],
    0 outside it (that token, or every token of that response, leaves the gradient). lengths: the responses' token
    counts, in order. Detached; exactly 1 where the two agree. Returns (weights, a bool mask of the tokens whose weight
    was capped or masked)."""
    log_ratio = (old_logp - sampler_logp).detach().float()
    if level in ("sequence", "geometric"):
        log_ratio = per_response(log_ratio, lengths, mean=level == "geometric")
    elif level != "token":
        raise ValueError(f"unknown rollout importance-sampling level {level!r}")
    ratio = log_ratio.exp()
    if mode == "truncate":
        return ratio.clamp(max=cap), ratio > cap
    if mode == "mask":
        outside = (ratio > cap) | (ratio < 1.0 / cap)
        return torch.where(outside, torch.zeros_like(ratio), ratio), outside
    raise ValueError(f"unknown rollout importance-sampling mode {mode!r}")


def overlong_penalty(lengths, max_len, buffer, factor=1.0):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to each response's reward: 0 up to
    max_len - buffer tokens, then falling linearly to -factor at max_len (a response cut at the cap gets -factor).
    buffer 0: off."""
    start = max_len - buffer
    return [-factor * min(1.0, (length - start) / buffer) if buffer and length > start else 0.0 for length in lengths]


def token_weights(lengths, loss_agg, total_tokens, total_seqs, max_response_tokens):
    """Weight of each response token so that loss = sum(weight * token_loss) over the whole global batch.

    lengths: response lengths of the sequences of one micro-batch; total_tokens / total_seqs: counts over
    the whole (mini-)batch on all ranks, all-reduced before the first micro-batch, so the result does not
    depend on how the batch is split into micro-batches and ranks.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float32)
    if loss_agg == "token_mean":              # DAPO: every token of the batch counts the same
        per_seq = torch.full_like(lengths, 1.0 / max(total_tokens, 1))
    elif loss_agg == "seq_mean_token_mean":   # GRPO: every sequence counts the same
        per_seq = 1.0 / (lengths.clamp(min=1) * max(total_seqs, 1))
    elif loss_agg == "constant":              # Dr. GRPO: a constant normaliser, no length bias
        per_seq = torch.full_like(lengths, 1.0 / (max_response_tokens * max(total_seqs, 1)))
    else:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}")
    return torch.repeat_interleave(per_seq, lengths.long())


# -----------------------------------------------------------------------------
# the schedule: which prompts, which sampling seed, which learning rate at each step


def batch_epoch(num_records, prompts_per_step, batch):
    """The epoch that prompt batch `batch` (1-based, in the data order) belongs to."""
    return (batch - 1) // (num_records // prompts_per_step)


def step_prompt_indices(num_records, prompts_per_step, batch, seed):
    """Indices (into the training records) of the prompts of prompt batch `batch` (1-based), for all ranks: RL step N
    draws batch N, unless dynamic sampling made earlier steps draw more.

    Epoch e visits the records in a permutation seeded by (seed, e); the last partial batch of an epoch is
    dropped. A pure function of the batch, so a resumed run skips and repeats nothing.
    """
    epoch = batch_epoch(num_records, prompts_per_step, batch)
    k = batch - 1 - epoch * (num_records // prompts_per_step)
    return parallel.epoch_order(num_records, seed, epoch)[k * prompts_per_step:(k + 1) * prompts_per_step]


def generation_seed(seed, step, rank, gen_batch=0):
    """The sampling seed of a (run seed, step, rank, the step's prompt batch): different everywhere, reproducible on
    resume. (A numpy hash, older than common.derive_seed, which then gives each generation batch its stream; it stays
    because every RL result of the study hangs on it. A step's first batch keeps the seed it always had. Known
    aliasing, kept for that reason: numpy pads a seed list with zeros, so [seed, step, 0] is the stream of
    parallel.epoch_order's [seed, epoch] for epoch == step; it ties a step's sampling to an epoch's order only where
    step s draws its first batch from epoch s (an epoch of about one batch), which no preset does, and the engine
    hashes this seed again before use.)"""
    return int(np.random.default_rng([seed, step, rank] + ([gen_batch] if gen_batch else [])).integers(2**31))


def lr_at(step, lr, warmup_steps):
    """Linear warm-up over the first warmup_steps steps (step 1 gets lr/warmup), then constant.
    (HF's get_constant_schedule_with_warmup, used by verl, gives step 1 lr 0; we skip that no-op step.)"""
    return lr * min(1.0, step / warmup_steps) if warmup_steps > 0 else lr
