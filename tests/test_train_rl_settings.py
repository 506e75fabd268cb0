"""train_rl.py's settings reach what they set, in the real loop (a one-line edit that ignores any of them, uses its
default or swaps two fails one of these): the loss aggregation and advantage normalisation by hand, the clip bounds
in their places, the optimizer's schedule, betas, weight decay and clipping, the sampler's temperature, template and
top-p against the trainer's, the seed's data order and generation stream, epochs, the prompt cap and validation's
settings, PPO epochs and mini-batches with DWA's settings, TIS and the entropy bonus in every epoch, k3's KL and the
entropy bonus with their coefficients, k1's shaped advantages recomputed apart, and which rollouts train. Cheap:
conftest's rl_run (the tiny checkpoint, fixed rollouts or the real engine, one or two steps)."""
import math
import os

import pytest
import torch

import ckpt
import common
import engine
import grpo
import tasks
import toy_task
import train_rl
from conftest import RL_N, RL_PROMPTS, RL_RECORDS, refuse_different_data
from rl_fixed_rollouts import fixed_rollouts


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "constant"])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_loss_agg_and_std_normalize_give_the_logged_loss_by_hand(rl_run, agg, std_normalize):
    """One on-policy update (ratio 1, no TIS): the loss is -sum_i A_i * sum_t w_it, with token_mean w = 1/sum L,
    seq_mean_token_mean w = 1/(L_i RL_N), constant w = 1/(max_response_tokens RL_N); the advantages are the group's
    (r - mean) / (std + eps) or, --std_normalize false, r - mean."""
    run = rl_run
    metrics, logs, _ = run(f"{agg}_{std_normalize}", loss_agg=agg, std_normalize=std_normalize, rollout_is="off",
                           max_response_tokens=12)
    (m,), rows = metrics, logs[1]
    want_adv = grpo.group_advantages([r["reward"] for r in rows], RL_N, std_normalize).tolist()
    assert [r["advantage"] for r in rows] == pytest.approx(want_adv, abs=1e-6)
    assert any(abs(a) > 0.1 for a in want_adv) and all(r["trained"] for r in rows)
    A, L = [r["advantage"] for r in rows], [r["length"] for r in rows]
    per_seq = {"token_mean": [li / sum(L) for li in L], "seq_mean_token_mean": [1 / len(L)] * len(L),
               "constant": [li / (12 * len(L)) for li in L]}[agg]
    want = -sum(a * w for a, w in zip(A, per_seq))
    assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    if agg != "seq_mean_token_mean":  # (0 by construction there: each group's advantages sum to 0)
        assert abs(want) > 1e-3


def test_a_batch_std_divides_every_groups_advantages_by_the_batchs_reward_std(rl_run, capsys):
    """--std_scope batch: (r - the group's mean) / (the std of every rollout's reward + eps), by hand from the rollout
    log, zero-variance groups counted where --drop_zero_variance_groups leaves them out of the loss (as TRL counts
    them; over the trained rollouts alone a group varying through a left-out one could meet a std of 0); with
    --std_normalize false it is not used, and said so."""
    run = rl_run
    _, plain, _ = run("dr_grpo", std_normalize=False, rollout_is="off")
    _, unused, _ = run("dr_grpo_batch", std_normalize=False, std_scope="batch", rollout_is="off")
    assert [r["advantage"] for r in unused[1]] == [r["advantage"] for r in plain[1]]
    assert "note: --std_scope not used: only --std_normalize true uses it" in capsys.readouterr().out
    _, logs, _ = run("batch_std", std_scope="batch", rollout_is="off", drop_zero_variance_groups=True)
    rows = logs[1]
    rewards = [r["reward"] for r in rows]
    assert not all(r["trained"] for r in rows)  # a zero-variance group, left out of the loss
    std = torch.tensor(rewards, dtype=torch.float64).std().item()
    want = grpo.group_advantages(rewards, RL_N, batch_std=std).tolist()
    assert [r["advantage"] for r in rows] == pytest.approx(want, abs=1e-6)
    assert want != pytest.approx(grpo.group_advantages(rewards, RL_N).tolist(), abs=1e-3)
    trained_only = torch.tensor([r["reward"] for r in rows if r["trained"]], dtype=torch.float64).std().item()
    assert want != pytest.approx(grpo.group_advantages(rewards, RL_N, batch_std=trained_only).tolist(), abs=1e-3)


def test_token_whitening_gives_reinforce_plus_plus_baselines_advantages(rl_run):
    """--std_scope tokens: the group-centred rewards whitened over every token of the step's rollouts (each response
    weighing its length; zero-variance groups count, and get -mean / std), by hand from the rollout log."""
    _, logs, _ = rl_run("whiten", std_scope="tokens", rollout_is="off", drop_zero_variance_groups=True)
    rows = logs[1]
    rewards = torch.tensor([r["reward"] for r in rows], dtype=torch.float64)
    centred = rewards - rewards.view(-1, RL_N).mean(1).repeat_interleave(RL_N)
    tokens = torch.repeat_interleave(centred, torch.tensor([r["length"] for r in rows]))
    want = (centred - tokens.mean()) / math.sqrt(float(tokens.var()) + 1e-8)
    assert [r["advantage"] for r in rows] == pytest.approx(want.tolist(), abs=1e-5)
    equal = [r for r in rows if not r["trained"]]  # a zero-variance group, out of the loss, in the moments
    assert equal and abs(float(tokens.mean())) > 1e-3 and all(r["advantage"] != 0 for r in equal)


def test_the_entropy_minority_trains_only_the_batchs_highest_entropy_tokens(rl_run, monkeypatch):
    """--entropy_top_frac 0.2: the floor is the batch's top 20 % of training tokens by the pre-update policy's
    entropy (the values the floor is taken over are the entropies the update logs), and the (on-policy) loss is
    -sum A_t over those tokens only / all tokens (token_mean), by hand; an entropy bonus still counts every token."""
    run = rl_run
    seen, real = [], train_rl.top_fraction_threshold

    def spy(values, frac):
        floor = real(values, frac)
        seen.append((values.clone(), frac, floor))
        return floor
    monkeypatch.setattr(train_rl, "top_fraction_threshold", spy)
    (m,), logs, _ = run("forking", entropy_top_frac=0.2, rollout_is="off")
    (values, frac, floor), = seen
    trained = [r for r in logs[1] if r["trained"]]
    assert frac == 0.2 and values.numel() == sum(r["length"] for r in trained)
    keep = values >= floor
    assert m["entropy_floor"] == floor and m["entropy_kept"] == pytest.approx(float(keep.float().mean()))
    assert m["entropy"] == pytest.approx(float(values.double().mean()), rel=1e-5)  # entropies, not another score
    assert 0.2 <= m["entropy_kept"] < 0.3
    kept_per_row = [int(k.sum()) for k in keep.split([r["length"] for r in trained])]
    want = -sum(r["advantage"] * c for r, c in zip(trained, kept_per_row)) / values.numel()
    assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-8) and abs(want) > 1e-4
    seen.clear()
    (bonus,), _, _ = run("forking_bonus", entropy_top_frac=0.2, rollout_is="off", entropy_coef=0.5)
    assert bonus["loss"] == pytest.approx(want - 0.5 * float(seen[0][0].double().mean()), rel=1e-5, abs=1e-8)
    (plain,), _, _ = run("all_tokens", rollout_is="off")
    assert plain["loss"] != pytest.approx(m["loss"]) and "entropy_floor" not in plain


def test_the_leave_one_out_baseline_reaches_the_advantages(rl_run):
    """--baseline loo: the logged advantages are RLOO's (each reward less its group's others' mean), by hand."""
    (m,), logs, _ = rl_run("rloo", baseline="loo", std_normalize=False, rollout_is="off")
    rewards = [r["reward"] for r in logs[1]]
    want = grpo.group_advantages(rewards, RL_N, std_normalize=False, baseline="loo").tolist()
    assert [r["advantage"] for r in logs[1]] == pytest.approx(want, abs=1e-6)
    assert want != pytest.approx(grpo.group_advantages(rewards, RL_N, std_normalize=False).tolist(), abs=1e-3)


def spy_covariance(monkeypatch):
    """What train_rl passes covariance_tokens and what it returns, per call."""
    seen, real = [], train_rl.covariance_tokens

    def spy(*args):
        out = real(*args)
        seen.append((args, out))
        return out
    monkeypatch.setattr(train_rl, "covariance_tokens", spy)
    return seen


def test_clip_cov_cuts_the_policy_gradient_of_the_tokens_it_draws(rl_run, monkeypatch):
    """--policy_loss clip_cov: covariance_tokens gets the pre-update log-probs and each token's advantage, the
    settings in their places and one number per token (token_draws'); the (on-policy, token_mean) loss is -sum A_t
    over the tokens not drawn / all tokens, by hand; the same draw run to run; logged: the share drawn and the
    covariance."""
    seen = spy_covariance(monkeypatch)
    settings = dict(policy_loss="clip_cov", cov_frac=0.5, clip_cov_low=-100, clip_cov_high=100, rollout_is="off")
    (m,), logs, _ = rl_run("clip_cov", **settings)
    ((logp, adv, method, frac, draws, bounds), (chosen, cov)), = seen
    trained = [r for r in logs[1] if r["trained"]]
    lens = [r["length"] for r in trained]
    assert torch.equal(adv, torch.repeat_interleave(torch.tensor([r["advantage"] for r in trained]),
                                                    torch.tensor(lens)))
    assert (method, frac, bounds) == ("clip_cov", 0.5, (-100, 100)) and draws.shape == logp.shape == (sum(lens),)
    at = [j for j, r in enumerate(logs[1]) if r["trained"]]  # (one rank, one prompt batch: row j is prompt j // n's)
    assert torch.equal(draws, train_rl.token_draws(1234, 1, [(0, j // RL_N) for j in at], [j % RL_N for j in at], lens,
                                                   RL_PROMPTS, RL_N))
    assert (logp <= 0).all() and logp.std() > 0.1  # log-probs of the sampled tokens
    assert int(chosen.sum()) == int(0.5 * sum(lens))  # every token inside such bounds: k of them
    kept = [len(c) - int(c.sum()) for c in chosen.split(lens)]
    want = -sum(r["advantage"] * k for r, k in zip(trained, kept)) / sum(lens)
    assert m["loss"] == pytest.approx(want, rel=1e-5, abs=1e-8)
    assert abs(float(adv[chosen].sum())) > 1  # (the drawn tokens' advantages do not cancel: the cut shows)
    assert m["cov_chosen"] == pytest.approx(float(chosen.float().mean())) and m["logp_adv_cov"] == cov
    (plain,), _, _ = rl_run("ppo", rollout_is="off")
    assert plain["loss"] != pytest.approx(m["loss"]) and "cov_chosen" not in plain
    rl_run("clip_cov_again", **settings)
    assert torch.equal(seen[1][1][0], chosen)


def test_token_draws_differ_by_seed_step_prompt_batch_place_sample_and_position():
    """Clip-Cov's draw (KL-Cov's tie-break) is keyed by every part of a token's place in the step, so no two tokens of
    a step share a stream: with --dynamic_sampling two prompt batches' first prompts, and one rollout's positions,
    draw apart; another seed or step draws anew; the same place draws the same."""
    places, samples, lengths = [(0, 0), (0, 0), (1, 0), (0, 1), (2, 3)], [0, 1, 0, 0, 1], [6, 6, 6, 6, 6]
    u = train_rl.token_draws(5, 3, places, samples, lengths, 4, 2)
    assert u.shape == (30,) and ((u >= 0) & (u < 1)).all() and len(set(u.tolist())) == 30
    for seed, step in ((6, 3), (5, 4)):
        other = train_rl.token_draws(seed, step, places, samples, lengths, 4, 2)
        assert not torch.isclose(other, u).any()
    assert torch.equal(train_rl.token_draws(5, 3, places[2:], samples[2:], lengths[2:], 4, 2), u[12:])
    assert train_rl.token_draws(5, 3, [], [], [], 4, 2).shape == (0,)


def test_kl_cov_penalises_its_chosen_tokens_from_the_second_update(rl_run, monkeypatch):
    """--policy_loss kl_cov: the top --cov_frac of tokens by the centred product are chosen; on-policy the loss is
    plain PPO's (its penalty has no gradient at ratio 1); with two mini-batches the chosen tokens reach kl_cov_loss
    with --kl_cov_coef, and the coefficient changes the second update."""
    seen = spy_covariance(monkeypatch)
    (m,), _, _ = rl_run("kl_cov", policy_loss="kl_cov", cov_frac=0.05, rollout_is="off")
    ((logp, adv, method, frac, draws, _), (chosen, cov)), = seen
    products = (logp.double() - logp.double().mean()) * (adv.double() - adv.double().mean())
    assert method == "kl_cov" and draws.shape == logp.shape
    assert torch.equal(chosen.nonzero().flatten().sort().values,
                       torch.topk(products, max(1, int(0.05 * logp.numel()))).indices.sort().values)
    (plain,), _, _ = rl_run("ppo", rollout_is="off")
    assert m["loss"] == pytest.approx(plain["loss"], rel=1e-6) and m["cov_chosen"] > 0
    calls, real = [], train_rl.kl_cov_loss

    def spy(logp, old, adv, selected, coef):
        calls.append((selected.clone(), coef))
        return real(logp, old, adv, selected, coef)
    monkeypatch.setattr(train_rl, "kl_cov_loss", spy)
    runs = {coef: rl_run(f"kl_cov_{coef}", policy_loss="kl_cov", cov_frac=0.2, kl_cov_coef=coef, ppo_mini_batches=2,
                         rollout_is="off")[0][0] for coef in (0.0, 5.0)}
    assert {c for _, c in calls} == {0.0, 5.0}
    assert sum(int(s.sum()) for s, c in calls if c == 5.0) == int(seen[-1][1][0].sum())
    assert runs[5.0]["grad_norm"] != pytest.approx(runs[0.0]["grad_norm"], rel=1e-4)


def test_clip_bounds_reach_the_surrogate_in_their_places(rl_run, monkeypatch):
    """--clip_low / --clip_high (asymmetric here) reach ppo_clip_loss as the floor's and the ceiling's margins, and the
    clipped share is what they give: two mini-batches, so the second one's ratios differ from 1."""
    run = rl_run
    seen, real = [], train_rl.ppo_clip_loss

    def spy(logp, old, adv, lo, hi):
        out = real(logp, old, adv, lo, hi)
        seen.append((lo, hi, logp.detach(), old.detach(), adv.detach(), out[1]))
        return out
    monkeypatch.setattr(train_rl, "ppo_clip_loss", spy)
    metrics, _, _ = run("clip", clip_low=0.001, clip_high=0.5, ppo_mini_batches=2, lr=3e-2, rollout_is="off")
    assert len(seen) == 2 and metrics[0]["updates"] == 2
    for lo, hi, logp, old, adv, clipped in seen:
        assert (lo, hi) == (0.001, 0.5)
        ratio = (logp - old).exp()
        want = ((adv > 0) & (ratio > 1 + hi)) | ((adv < 0) & (ratio < 1 - lo))
        assert torch.equal(clipped.bool(), want)
    assert seen[1][5].sum() > 0  # the tight floor binds in the second mini-batch


def test_cispo_takes_the_clip_bounds_in_place_of_the_ppo_surrogate(rl_run, monkeypatch):
    """--policy_loss cispo: CISPO's loss replaces PPO's in every mini-batch, with the clip bounds in their places
    (--clip_low 1: no floor, the paper's; refused for ppo, whose floor would be 0); the second mini-batch's ratios
    differ from 1, so some weight is clipped there, and its tokens still get a gradient."""
    run = rl_run
    seen, real = [], train_rl.cispo_loss

    def spy(logp, old, adv, lo, hi):
        out = real(logp, old, adv, lo, hi)
        grad = torch.autograd.grad(out[0].sum(), logp, retain_graph=True)[0]
        seen.append((lo, hi, out[1], grad, adv.detach()))
        return out
    monkeypatch.setattr(train_rl, "cispo_loss", spy)
    monkeypatch.setattr(train_rl, "ppo_clip_loss", lambda *a: pytest.fail("PPO's surrogate under --policy_loss cispo"))
    metrics, _, _ = run("cispo", policy_loss="cispo", clip_low=1.0, clip_high=0.01, ppo_mini_batches=2, lr=3e-2,
                        rollout_is="off")
    assert len(seen) == 2 and metrics[0]["updates"] == 2
    assert all((lo, hi) == (1.0, 0.01) for lo, hi, *_ in seen)
    _, _, clipped, grad, adv = seen[1]
    assert clipped.sum() > 0 and (grad[clipped.bool() & (adv != 0)] != 0).all()  # clipped, yet trained
    assert metrics[0]["clip_frac"] > 0
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="--clip_low 1.0: the ratio's floor"):
        run("ppo_floor", clip_low=1.0)


def test_masked_importance_sampling_zeroes_the_tokens_outside_the_band(rl_run, capsys):
    """--rollout_is_mode mask against truncate, on the fixed rollouts (whose sampler log-probs are 0: each token's
    ratio is the trainer's probability, ~1/300 on average for their random tokens): truncation caps none of them;
    the mask zeroes those below 1/C, here some of them."""
    run = rl_run
    (trunc,), _, _ = run("truncate", rollout_is="token", rollout_is_cap=300.0)
    (mask,), _, _ = run("mask", rollout_is="token", rollout_is_cap=300.0, rollout_is_mode="mask")
    assert trunc["is_capped"] == 0 and 0 < mask["is_capped"] < 1
    assert mask["is_weight"] < trunc["is_weight"]
    assert mask["loss"] != trunc["loss"]
    with pytest.raises(common.UserError, match="--rollout_is_cap 1.0 leaves that band empty"):  # [1, 1]: none kept
        run("empty_band", rollout_is="token", rollout_is_cap=1.0, rollout_is_mode="mask")
    capsys.readouterr()
    run("unused_band", rollout_is="off", rollout_is_cap=1.0, rollout_is_mode="mask")  # (unused: a note, not refused)
    assert ("note: --rollout_is_cap and --rollout_is_mode not used: only --rollout_is token, sequence or geometric "
            "uses them" in capsys.readouterr().out)


def test_the_overlong_punishment_lowers_the_advantages_rewards_not_the_logged_ones(rl_run):
    """--overlong_buffer 4 of 12 tokens, --overlong_penalty 0.5: each response's advantage is its group's over
    reward + DAPO's penalty for its length, in the groups whose task rewards differ; a group of equal rewards keeps
    advantage 0 (its penalties alone, standardised, would be full-size advantages); the rollout log and the step's
    reward and accuracy keep the task's."""
    run = rl_run
    (plain,), plain_logs, _ = run("plain", rollout_is="off")
    (m,), logs, _ = run("overlong", rollout_is="off", overlong_buffer=4, overlong_penalty=0.5)
    rows = logs[1]
    signal = [not z for z in grpo.zero_variance([r["reward"] for r in rows], RL_N) for _ in range(RL_N)]
    penalty = [p if s else 0.0 for p, s in zip(grpo.overlong_penalty([r["length"] for r in rows], 12, 4, 0.5), signal)]
    assert any(penalty) and [r["reward"] for r in rows] == [r["reward"] for r in plain_logs[1]]
    want = grpo.group_advantages([r["reward"] + p for r, p in zip(rows, penalty)], RL_N).tolist()
    assert [r["advantage"] for r in rows] == pytest.approx(want, abs=1e-6)
    assert [r["advantage"] for r in rows] != pytest.approx([r["advantage"] for r in plain_logs[1]], abs=1e-6)
    quiet = [r for r, s in zip(rows, signal) if not s]
    assert any(r["length"] > 8 for r in quiet) and all(r["advantage"] == 0 for r in quiet)  # penalised lengths there
    assert (m["reward"], m["acc"]) == (plain["reward"], plain["acc"]) and "overlong_penalty" not in plain
    assert m["overlong_penalty"] == pytest.approx(sum(penalty) / len(rows))


def test_the_optimizer_runs_with_the_lr_schedule_betas_and_weight_decay_given(rl_run):
    """The saved optimizer state holds the settings the step ran with: lr = lr_at(step) (warm-up 4: step 2 of 4 runs
    at half the peak), the betas and the weight decay given."""
    run = rl_run
    metrics, _, out = run("opt", max_steps=2, save_every=2, lr=1e-3, warmup_steps=4, beta1=0.8, beta2=0.99,
                          weight_decay=0.05)
    assert [m["lr"] for m in metrics] == pytest.approx([2.5e-4, 5e-4])
    (group,) = torch.load(ckpt.train_shard_path(out, 2, 0), weights_only=True)["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(5e-4) and tuple(group["betas"]) == (0.8, 0.99)
    assert group["weight_decay"] == 0.05


def test_grad_clip_bounds_the_norm_the_optimizer_sees(rl_run, monkeypatch):
    run = rl_run
    seen, real = [], ckpt.clip_grad_norm

    def spy(params, max_norm):
        params = list(params)
        norm = real(params, max_norm)
        after = float(torch.stack([p.grad.norm() for p in params if p.grad is not None]).norm())
        seen.append((max_norm, norm, after))
        return norm
    monkeypatch.setattr(ckpt, "clip_grad_norm", spy)
    metrics, _, _ = run("clip", grad_clip=1e-4, rollout_is="off")
    (max_norm, norm, after), = seen
    assert max_norm == 1e-4 and norm > 1e-3 and after == pytest.approx(1e-4, rel=1e-3)
    assert metrics[0]["grad_norm"] == pytest.approx(norm)


@pytest.mark.parametrize("template", ["plain", "chat"])
def test_temperature_and_template_reach_the_engine_and_the_training_forward(rl_run, template, tiny_checkpoint,
                                                                            tmp_path):
    """With the real engine (which agrees with the trainer in fp32), at a temperature other than the default and
    with each template: the trainer's log-probs are the sampler's (TIS weight 1, no gap), from the update's forward
    and from the pre-pass's (two mini-batches), and the rollouts' prompts are the template's."""
    run = rl_run
    for name, extra in (("one", {}), ("two", {"ppo_mini_batches": 2})):
        metrics, logs, _ = run(f"{template}{name}", fixed=False, temperature=1.6, template=template, **extra)
        (m,) = metrics
        assert abs(m["is_weight"] - 1) < 1e-4 and m["logprob_gap"] < 1e-4, m
    tok, task = tasks.load_tokenizer(tiny_checkpoint), tasks.get_task("toy_task")
    train = {r["id"]: r for r in common.read_jsonl(str(tmp_path / "train.jsonl"))}
    assert all(r["prompt"] == task.render_prompt(train[r["id"]], tok, template) for r in logs[1])


def test_top_p_and_the_response_cap_reach_the_engine(rl_run):
    """--top_p 1e-3 keeps one token (greedy): every sample of a group is the same response; --max_response_tokens 3
    caps every response."""
    run = rl_run
    _, logs, _ = run("top_p", fixed=False, temperature=1.6, top_p=1e-3, max_response_tokens=3)
    rows = logs[1]
    assert all(rows[i]["response"] == rows[i + 1]["response"] for i in range(0, len(rows), RL_N))
    assert all(r["length"] <= 3 for r in rows) and any(not r["finished"] for r in rows)
    _, logs, _ = run("full", fixed=False, temperature=1.6, top_p=1.0, max_response_tokens=3)
    assert any(r["response"] != s["response"] for r, s in zip(logs[1][::RL_N], logs[1][1::RL_N]))


def test_the_seed_sets_the_data_order_and_the_generation_seed(rl_run, monkeypatch, tmp_path):
    run = rl_run
    seeds, real = [], fixed_rollouts

    def spy(*a, seed=None, **k):
        seeds.append(seed)
        return real(*a, **k)
    monkeypatch.setattr(engine, "sample_responses", spy)
    _, logs, _ = run("seed", fixed=False, seed=7, max_steps=2, save_every=2, dynamic_sampling=True,
                     max_gen_batches=3)
    train = common.read_jsonl(str(tmp_path / "train.jsonl"))
    drawn = [row["id"] for s in (1, 2) for row in logs[s][::RL_N]]
    order = [train[i]["id"] for b in range(1, len(drawn) // RL_PROMPTS + 1)
             for i in grpo.step_prompt_indices(RL_RECORDS, RL_PROMPTS, b, 7)]
    assert drawn == order
    batches = [sum(row["sample"] == 0 for row in logs[s]) // RL_PROMPTS for s in (1, 2)]
    per_step = [[grpo.generation_seed(7, s, 0, b) for b in range(count)] for s, count in zip((1, 2), batches)]
    assert seeds == per_step[0] + per_step[1]


def test_rollouts_are_keyed_by_their_place_and_an_earlier_run_keeps_its_rank_keyed_seeds(rl_run, monkeypatch):
    """Each prompt's rows are keyed by its place in the step's global batch (so every world size samples the same
    rollouts: test_train_rl's 2-rank run); a run begun before that (its identity without "rollout_seeds") resumes
    sampling as it did, keyed by the rank and the place in the rank's share, and its checkpoints stay so marked."""
    run = rl_run
    calls, real = [], fixed_rollouts

    def spy(*a, prompt_numbers=None, **k):
        calls.append(prompt_numbers)
        return real(*a, **k)
    monkeypatch.setattr(engine, "sample_responses", spy)
    _, _, out = run("keyed", fixed=False)
    assert calls == [list(range(RL_PROMPTS))]
    path = ckpt.checkpoint_dir(out, 1) + ".state.pt"
    state = torch.load(path, weights_only=True)
    assert state["identity"]["rollout_seeds"] == "by_place"
    torch.save({**state, "identity": {k: v for k, v in state["identity"].items() if k != "rollout_seeds"}}, path)
    run("keyed", fixed=False, max_steps=2, resume=True)
    assert calls[1:] == [None]
    assert "rollout_seeds" not in torch.load(ckpt.checkpoint_dir(out, 2) + ".state.pt", weights_only=True)["identity"]


def test_a_resume_on_other_kernels_is_refused_and_an_earlier_run_is_not_compared_on_them(rl_run, monkeypatch):
    """The CPU's vector instructions (or the GPU's model) round matmuls otherwise, as a thread count does: a run
    resumed on another machine was accepted and trained weights that neither machine's whole run gives. A run of a
    version that did not record them resumes."""
    run = rl_run
    _, _, out = run("kernels")
    here = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    with pytest.raises(common.UserError, match=rf"different settings than the run's: compute_kernels: was "
                                               rf"'{here}', now 'OTHER'$"):
        run("kernels", max_steps=2, resume=True)
    path = ckpt.checkpoint_dir(out, 1) + ".state.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "identity": {k: v for k, v in state["identity"].items() if k != "compute_kernels"}}, path)
    run("kernels", max_steps=2, resume=True)


def test_a_resume_whose_end_is_behind_its_checkpoint_does_nothing_and_says_so(rl_run, monkeypatch, capsys):
    """A finished run re-run with --resume, or one resumed with a --max_steps below its checkpoint's step, has no step
    to run: it says so, and builds no engine (it printed "steps 3..1" and decoded nothing)."""
    run, here = rl_run, torch.backends.cpu.get_cpu_capability()
    metrics, _, _ = run("ended", max_steps=2, save_every=2)
    capsys.readouterr()
    monkeypatch.setattr(engine, "sample_responses", lambda *a, **k: pytest.fail("sampled past the end"))
    for max_steps in (2, 1):
        again, _, out = run("ended", max_steps=max_steps, save_every=2, resume=True)
        assert again == metrics
        assert f"{out}: already at step 2 >= --max_steps {max_steps}; nothing to do" in capsys.readouterr().out
    # ... at any number of ranks and on any CPU (nothing is left to compute; both were refused), while a run that goes
    # on needs the number of ranks that wrote its shards
    monkeypatch.setattr(ckpt, "world_size", lambda: 2)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "OTHER")
    assert run("ended", max_steps=2, save_every=2, resume=True)[0] == metrics
    assert "nothing to do" in capsys.readouterr().out
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: here)
    with pytest.raises(common.UserError, match=r"step_000002\.state\.pt: written by 1 rank\(s\); resume it with "
                                               r"the same number \(torchrun --nproc_per_node\), not 2"):
        run("ended", max_steps=3, save_every=2, resume=True)
    # its optimizer shard deleted to free the disk: still finished (the shard is not read), but not resumable further
    monkeypatch.setattr(ckpt, "world_size", lambda: 1)
    os.remove(ckpt.train_shard_path(out, 2, 0))
    assert run("ended", max_steps=2, save_every=2, resume=True)[0] == metrics
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(common.UserError, match=r"step_000002\.train\.rank0\.pt is missing, where the checkpoint "
                                               r"of step 2 is otherwise whole"):
        run("ended", max_steps=3, save_every=2, resume=True)
    assert ckpt.checkpoint_steps(out) == [2]  # (skipped, it was removed: the run's last weights)


def test_a_refused_resume_removes_no_checkpoint(rl_run, monkeypatch, capsys):
    """A resume skipped a damaged newest checkpoint and removed it (and any other above the one it took) before its
    settings were checked: a resume then refused (another setting, another rank count) had lost that checkpoint for
    nothing. Now the skipped ones go only once the resume is accepted, and the rank count is named first (a 2-rank
    run's checkpoint resumed alone was refused for its thread count, on CPU)."""
    run = rl_run
    _, _, out = run("damaged", max_steps=2, save_every=1)
    with open(ckpt.train_shard_path(out, 2, 0), "r+b") as f:
        f.truncate(100)
    with pytest.raises(common.UserError, match="different settings than the run's: lr: was 0.003, now 0.001"):
        run("damaged", max_steps=3, save_every=1, resume=True, lr=1e-3)
    assert "skipping the checkpoint of step 2" in capsys.readouterr().out
    assert ckpt.checkpoint_parts(out) == {1, 2}
    with pytest.raises(common.UserError, match="--keep_steps 0: that step is never saved"):
        run("damaged", max_steps=3, save_every=1, resume=True, keep_steps=0)
    assert ckpt.checkpoint_parts(out) == {1, 2}
    held_out = os.path.join(os.path.dirname(out), "held_out.jsonl")  # (a split of its own: not --train_data)
    common.write_jsonl(held_out, toy_task.make_records(4, seed=9, split="test"))
    with pytest.raises(common.UserError, match="--val_max_response_tokens 100000 > the model's"):  # (a later refusal)
        run("damaged", max_steps=3, save_every=1, resume=True, test_data=held_out, val_every=1,
            val_max_response_tokens=100000)
    assert ckpt.checkpoint_parts(out) == {1, 2}
    monkeypatch.setattr(ckpt, "world_size", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)
    with pytest.raises(common.UserError, match=r"written by 1 rank\(s\); resume it with the same number"):
        run("damaged", max_steps=3, save_every=1, resume=True)
    assert ckpt.checkpoint_parts(out) == {1, 2}
    monkeypatch.undo()
    run("damaged", max_steps=3, save_every=1, resume=True)  # accepted: step 2 is saved anew
    assert ckpt.checkpoint_steps(out)[-2:] == [2, 3]
    log = capsys.readouterr().out
    assert "skipping the checkpoint of step 2" in log
    # a longer run rounds nothing otherwise: noted without the last-bits warning a batching setting gets
    assert "note: resuming with other settings than when step 1 was saved: max_steps: was 2, now 3\n" in log


def test_a_task_without_difficulties_logs_no_difficulty_field(rl_run, tmp_path, monkeypatch):
    """DIFFICULTY None: every rollout row held a field "null" (the None key, as JSON writes it)."""
    import inspect
    import sys
    (tmp_path / "plain_task.py").write_text(inspect.getsource(toy_task) + "\nDIFFICULTY = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "plain_task", raising=False)
    _, logs, _ = rl_run("plain", task="plain_task")
    assert logs[1] and not any("null" in row for row in logs[1])
    _, logs, _ = rl_run("levels")
    assert all(row["level"] is not None for row in logs[1])


def test_epochs_prompt_cap_and_validation_settings(rl_run, monkeypatch, tmp_path, tiny_checkpoint):
    """--epochs 1 (no --max_steps) runs one pass; --max_prompt_tokens drops the longer prompts; validation runs on
    --val_limit records with --val_max_response_tokens, at --val_every and not before training when told so."""
    run = rl_run
    test = str(tmp_path / "test.jsonl")
    common.write_jsonl(test, toy_task.make_records(20, seed=2, split="test"))
    calls, real = [], train_rl.validate

    def spy(model, tok, task, records, step, **k):
        calls.append((step, len(records), k["max_new_tokens"]))
        return real(model, tok, task, records, step, **k)
    monkeypatch.setattr(train_rl, "validate", spy)
    tok, task = tasks.load_tokenizer(tiny_checkpoint), tasks.get_task("toy_task")
    train = (toy_task.make_records(24, seed=1, split="short", max_value=9)  # 47 tokens each
             + toy_task.make_records(16, seed=3, split="long", max_value=999))  # 49-51
    train = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    common.write_jsonl(str(tmp_path / "varied.jsonl"), train)
    lengths = [len(ids) for ids in tasks.task_prompt_ids(tok, task, train, "auto")]
    cap = min(lengths)
    kept = sum(x <= cap for x in lengths)
    assert 2 * RL_PROMPTS <= kept < RL_RECORDS
    metrics, logs, _ = run("epochs", max_steps=0, epochs=1, save_every=100, test_data=test, val_every=2,
                           val_limit=7, val_max_response_tokens=5, val_before_train=False, max_prompt_tokens=cap,
                           train_data=str(tmp_path / "varied.jsonl"))
    steps = kept // RL_PROMPTS
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert calls == [(s, 7, 5) for s in range(1, steps + 1) if s % 2 == 0 or s == steps]
    ids = {row["id"] for rows in logs.values() for row in rows}
    long_ids = {r["id"] for r, n in zip(train, lengths) if n > cap}
    assert long_ids and not ids & long_ids


def test_ppo_epochs_mini_batches_and_dwa_settings_reach_the_update(rl_run, monkeypatch):
    """--ppo_epochs 3 x --ppo_mini_batches 2 = 6 optimizer steps, each mini-batch seen once an epoch; DWA's weights
    are grpo.dwa_weights with --dwa_s and --dwa_alpha as given (not their defaults)."""
    run = rl_run
    seen, real = [], train_rl.dwa_weights

    def spy(logp, old, s, alpha):
        seen.append((logp.detach(), old.detach(), s, alpha))
        return real(logp, old, s, alpha)
    monkeypatch.setattr(train_rl, "dwa_weights", spy)
    metrics, _, _ = run("ppo", ppo_epochs=3, ppo_mini_batches=2, adv_weight="dwa", dwa_s=1.5, dwa_alpha=7.0,
                        lr=3e-2)
    assert metrics[0]["updates"] == 6 and len(seen) == 6
    assert all((s, alpha) == (1.5, 7.0) for _, _, s, alpha in seen)
    moved = [(lp - old).abs().max() for lp, old, _, _ in seen]
    assert moved[0] == 0 and max(moved) > 1e-3  # the first mini-batch on-policy, later ones not


def test_later_epochs_weigh_the_loss_as_the_first(rl_run):
    """With a learning rate too small to move the policy, each of --ppo_epochs 2's passes takes the loss the one
    pass takes: TIS's weights (tiny here: the fixed rollouts' sampler logged probability 1) and the entropy bonus
    apply in every epoch, not only the first."""
    run = rl_run
    kw = dict(lr=1e-12, rollout_is="token", entropy_coef=0.01)
    (one,), _, _ = run("one", **kw)
    (two,), _, _ = run("two", ppo_epochs=2, **kw)
    assert two["updates"] == 2 and two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    assert one["is_weight"] < 0.1  # (the weights are far from 1: dropping them would show)


def test_the_logged_entropy_is_the_first_passes_and_ratio_settings_on_policy_are_noted(rl_run, capsys, tmp_path):
    """--ppo_epochs 3 logged the mean entropy over its three passes, the later two of weights updated since: now the
    first pass's, as kl and is_*, so that runs of other --ppo_epochs compare. And CISPO, GSPO's ratio and a clip
    band (a --config's too) act through the ratio pi / pi_old alone, 1 with one on-policy update: said so there, not
    with three."""
    (tmp_path / "band.json").write_text('{"clip_high": 0.5}')
    ratio = dict(policy_loss="cispo", ratio_level="sequence", loss_agg="seq_mean_token_mean",
                 config=str(tmp_path / "band.json"))
    (one,), _, _ = rl_run("one", lr=3e-2, **ratio)
    assert ("note: --policy_loss cispo, --ratio_level sequence, --clip_high 0.5 with one on-policy update per batch: "
            "the ratio pi / pi_old is 1") in capsys.readouterr().out
    (three,), _, _ = rl_run("three", lr=3e-2, ppo_epochs=3, **ratio)
    assert three["updates"] == 3 and three["entropy"] == pytest.approx(one["entropy"], rel=1e-6)
    assert "on-policy update per batch" not in capsys.readouterr().out


def other_reference(tiny_checkpoint, path):
    """A reference policy for the KL that is not the start policy (other random weights, the same tokenizer), so
    the KL is not 0 already at step 1."""
    from model import build_model, save_model, tiny_config
    from tasks import load_tokenizer
    tok = load_tokenizer(tiny_checkpoint)
    save_model(build_model(tiny_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), seed=5),
               path, tok)
    return path


def test_a_reference_of_another_tokenizer_or_a_shorter_context_is_refused_before_any_work(rl_run, tiny_checkpoint,
                                                                                          tmp_path):
    """--ref_model was loaded unchecked: one with fewer tokens ended step 1 in an embedding's IndexError, one with
    the tokens at other ids trained on a KL between different tokens without a word, and one with a shorter
    context scored positions it never learnt. Each is one line before any work."""
    from model import build_model, save_model, tiny_config
    from tasks import load_tokenizer
    from tiny_base import build_tokenizer
    other = str(tmp_path / "other_tokens")
    tok = build_tokenizer(["a quite different text to learn from"] * 20, vocab_size=300)
    save_model(build_model(tiny_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2), seed=5),
               other, tok)
    with pytest.raises(common.UserError, match=r"--model .* and --ref_model .*other_tokens have different tokenizers "
                                               r"\(\d+ vs \d+ tokens\); the KL to the reference compares"):
        rl_run("other", kl_coef=0.1, ref_model=other)
    short = str(tmp_path / "short_context")
    tok = load_tokenizer(tiny_checkpoint)
    save_model(build_model(tiny_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                       max_position_embeddings=16), seed=5), short, tok)
    with pytest.raises(common.UserError, match=r"train.jsonl with --ref_model .*short_context: record id .*: prompt "
                                               r"of \d+ tokens \+ --max_response_tokens 12 > the model's 16-token "
                                               r"context"):
        rl_run("short", kl_coef=0.1, ref_model=short)
    assert not (tmp_path / "other").exists() and not (tmp_path / "short").exists()


def test_k3_kl_and_the_entropy_bonus_enter_the_loss_with_their_coefficients(rl_run, tiny_checkpoint, tmp_path,
                                                                            monkeypatch):
    """--kl_coef c (k3, in the loss) and --entropy_coef e: with every reward equal (no advantage), one on-policy
    update's token_mean loss is exactly c * KL - e * entropy, both as logged per trained token. A coefficient lost
    or the bonus's sign turned (a penalty) moves it."""
    run = rl_run
    monkeypatch.setenv("NO_SIGNAL_STEP", "0")  # (the fixture's rollouts never advance their step: every step)
    c, e = 0.3, 0.05
    metrics, logs, _ = run("k3", kl_coef=c, kl_estimator="k3", entropy_coef=e,
                           ref_model=other_reference(tiny_checkpoint, str(tmp_path / "ref")), loss_agg="token_mean")
    (m,) = metrics
    assert all(r["advantage"] == 0 and r["trained"] for r in logs[1]) and m["kl"] > 0.01 and m["entropy"] > 0.1
    assert m["loss"] == pytest.approx(c * m["kl"] - e * m["entropy"], rel=1e-5)


def test_k1_takes_each_responses_summed_log_ratio_off_its_advantage(rl_run, tiny_checkpoint, tmp_path):
    """--kl_estimator k1: each rollout's advantage is its group's reward advantage less kl_coef x (its response's
    summed log(pi / pi_ref) - the group's mean), the log-ratio recomputed here by the start policy and the
    reference, one response at a time."""
    import grpo
    import tasks
    from model import load_model, response_logprobs
    run, train = rl_run, common.read_jsonl(str(tmp_path / "train.jsonl"))
    ref_path, c = other_reference(tiny_checkpoint, str(tmp_path / "ref")), 0.2
    _, logs, _ = run("k1", kl_coef=c, kl_estimator="k1", ref_model=ref_path,
                     temperature=0.7)
    rows, tok, task = logs[1], tasks.load_tokenizer(tiny_checkpoint), tasks.get_task("toy_task")
    by_id = {r["id"]: r for r in train}
    policy, ref = load_model(tiny_checkpoint), load_model(ref_path)
    seq_kl = []
    for i in range(0, len(rows), RL_N):  # the rollouts the fixture drew for this group's record, as train_rl got them
        record = by_id[rows[i]["id"]]
        drawn = fixed_rollouts(None, tok, task, [record], n=RL_N, max_new_tokens=12)
        prompt = tasks.task_prompt_ids(tok, task, [record], "auto")[0]
        assert [d["reward"] for d in drawn] == [r["reward"] for r in rows[i:i + RL_N]]
        with torch.no_grad():
            seq_kl += [float((response_logprobs(policy, [prompt], [d["tokens"]], 0.7)
                              - response_logprobs(ref, [prompt], [d["tokens"]], 0.7)).sum()) for d in drawn]
    want = grpo.group_advantages([r["reward"] for r in rows], RL_N, True, seq_kl, c)
    assert any(abs(x) > 0.05 for x in seq_kl)
    torch.testing.assert_close(torch.tensor([r["advantage"] for r in rows]), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mask_truncated, drop_zero_variance_groups", [(True, True), (False, False)])
def test_masked_truncations_and_zero_variance_groups_do_not_train(rl_run, monkeypatch, mask_truncated,
                                                                  drop_zero_variance_groups):
    """--mask_truncated leaves out each response the cap cut (DAPO's overlong filtering), and
    --drop_zero_variance_groups each group whose rewards are all equal; off, both train (the rollout log's
    `trained`)."""
    run = rl_run

    def some_cut(*args, **kwargs):  # the second sample of every other group ran into the cap
        out = fixed_rollouts(*args, **kwargs)
        for i, r in enumerate(out):
            r["finished"] = not (r["sample"] == 1 and i // RL_N % 2 == 0)
        return out
    monkeypatch.setattr(engine, "sample_responses", some_cut)
    _, logs, _ = run("filters", fixed=False, mask_truncated=mask_truncated,  # (some_cut, patched above)
                     drop_zero_variance_groups=drop_zero_variance_groups)
    rows = logs[1]
    zero_var = [len({r["reward"] for r in rows[i - i % RL_N:i - i % RL_N + RL_N]}) == 1 for i in range(len(rows))]
    want = [not (mask_truncated and not r["finished"]) and not (drop_zero_variance_groups and z)
            for r, z in zip(rows, zero_var)]
    assert [r["trained"] for r in rows] == want
    assert any(not r["finished"] for r in rows) and any(zero_var) and not all(zero_var)


def test_the_ranks_check_together_that_they_read_the_same_data(rl_run, tmp_path, monkeypatch):
    """Each rank reads --train_data and --test_data itself: the digests of what it kept (after the prompt filter) go to
    parallel.same_on_every_rank, which refuses on every rank data written again between two ranks' reads, before a
    step is drawn or anything is written."""
    seen = refuse_different_data(monkeypatch)
    with pytest.raises(common.UserError, match="the ranks read different data"):
        rl_run("run", max_prompt_tokens=10**6)
    train = str(tmp_path / "train.jsonl")
    assert seen == [([common.data_digest(common.read_jsonl(train)), common.data_digest([])], f"{train}, ")]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_out_dir_on_the_model_or_validation_on_the_training_split_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    """Each ran: a run into its own --model wrote its checkpoints, logs and rollouts among the model's files, and
    validation on --train_data measured nothing held out; a default --test_data that did not exist was named as if
    the user had given it. (redistill_sft refuses --out_dir on --init too.)"""
    import redistill_sft
    train = str(tmp_path / "train.jsonl")
    common.write_jsonl(train, toy_task.make_records(8, seed=1, split="train"))
    base = ["--task", "toy_task", "--model", tiny_checkpoint, "--train_data", train]
    # (every output in a checkpoint is refused: common.check_output_path)
    with pytest.raises(common.UserError, match=r"--out_dir .*: is the checkpoint .*; give a path outside it"):
        train_rl.main(base + ["--test_data", "", "--out_dir", tiny_checkpoint])
    with pytest.raises(common.UserError, match=r"--test_data .*train\.jsonl: the same file as --train_data"):
        train_rl.main(base + ["--test_data", train, "--out_dir", str(tmp_path / "o")])
    with pytest.raises(common.UserError, match=r"^--test_data data/kk/test\.jsonl \(the default\): not found; give "
                                               r"--test_data FILE, or --test_data '' for no validation$"):
        train_rl.main(base + ["--out_dir", str(tmp_path / "o")])
    with pytest.raises(common.UserError, match=r"--out_dir .*: is the checkpoint .*; give a path outside it"):
        redistill_sft.main(["--init", tiny_checkpoint, "--data", train, "--out_dir", tiny_checkpoint])
    assert not (tmp_path / "o").exists()
