"""train_rl.py --rollout_is (truncated importance sampling) in the real loop: the engine's log-probs reach the weights,
the weighted loss changes the update, the step logs the mean weight, the capped share and the sampler-trainer KL, and
with the real engine (which agrees with the trainer in fp32) the weights are 1. (The weights against a hand
computation and verl's formula: test_grpo.py.) And --ratio_level sequence (GSPO), which acts only with several
updates per batch."""
import os

import pytest
import torch

import ckpt
import common
import engine
import toy_task
import train_rl
from rl_fixed_rollouts import fixed_rollouts  # rollouts whose logged sampler log-probs are all 0


@pytest.fixture
def loop(tiny_checkpoint, tmp_path, monkeypatch):
    """train_rl.main on the tiny checkpoint; records the arguments and result of every rollout_is_weights call."""
    common.write_jsonl(str(tmp_path / "train.jsonl"), toy_task.make_records(40, seed=1, split="train"))
    calls, real = [], train_rl.rollout_is_weights

    def recorded(*a, **k):
        out = real(*a, **k)
        calls.append((a, out))
        return out
    monkeypatch.setattr(train_rl, "rollout_is_weights", recorded)

    def run(name, fixed=True, **over):
        if fixed:
            monkeypatch.setattr(engine, "sample_responses", fixed_rollouts)
        s = {"model": tiny_checkpoint, "task": "toy_task", "train_data": str(tmp_path / "train.jsonl"),
             "test_data": "", "out_dir": str(tmp_path / name), "prompts_per_step": 8, "samples_per_prompt": 4,
             "max_response_tokens": 12, "lr": 3e-3, "warmup_steps": 0, "max_steps": 2, "save_every": 2,
             "progress": False, "log_rollouts": False}
        s.update(over)
        calls.clear()
        assert train_rl.main([x for k, v in s.items() for x in (f"--{k}", str(v))]) == 0
        from safetensors.torch import load_file
        weights = load_file(os.path.join(ckpt.checkpoint_dir(s["out_dir"], 2), "model.safetensors"))
        metrics = [m for m in common.read_jsonl(os.path.join(s["out_dir"], "metrics.jsonl")) if m.get("step")]
        return weights, metrics, list(calls)
    return run


@pytest.mark.slow
def test_token_weights_come_from_the_engines_logprobs_and_change_the_update(loop):
    plain, plain_metrics, none = loop("plain", rollout_is="off")
    tis, metrics, calls = loop("tis", rollout_is="token", rollout_is_cap=1.5)
    assert not none and all("is_weight" not in m for m in plain_metrics)
    assert len(calls) == 2  # one micro-batch per step
    for (old, sampler, lens, level, cap, mode), (w, capped) in calls:
        assert torch.equal(sampler, torch.zeros_like(sampler)) and sum(lens) == old.numel()  # fixed rollouts log 0
        assert (level, cap, mode) == ("token", 1.5, "truncate")
        # the sampler said log-prob 0 (probability 1) for tokens the trainer finds less likely: weights < 1
        assert torch.allclose(w, old.exp()) and (w < 1).all() and not capped.any()
    for m, (_, (w, _)) in zip(metrics, calls):
        assert m["is_weight"] == pytest.approx(w.mean().item(), rel=1e-5) and m["is_capped"] == 0
        assert m["is_kl"] > 0
    assert not all(torch.equal(plain[k], tis[k]) for k in plain)


def test_sequence_weights_and_the_cap(loop, capsys):
    """A response's weight is the product of its token ratios (here its probability under the trainer, the sampler
    having logged 1): short responses exceed the tiny cap, long ones do not, and the logged share says which."""
    _, metrics, calls = loop("seq", rollout_is="sequence", rollout_is_cap=1e-6)
    assert "note: --rollout_is_cap 1e-06 < 1 truncates every weight below it" in capsys.readouterr().out
    for m, ((old, sampler, lens, level, cap, _), (w, capped)) in zip(metrics, calls):
        ratio = torch.repeat_interleave(torch.stack([s.sum() for s in old.split(lens)]).exp(), torch.tensor(lens))
        assert level == "sequence" and torch.allclose(w, ratio.clamp(max=1e-6), rtol=1e-4, atol=0)
        assert torch.equal(capped, ratio > 1e-6) and 0 < capped.sum() < capped.numel()
        assert m["is_capped"] == pytest.approx(capped.float().mean().item())


def test_geometric_weights_are_each_responses_mean_token_ratio(loop):
    """--rollout_is geometric: a response's weight is exp of its tokens' mean log-ratio (its per-token probability's
    geometric mean, the sampler having logged 1), for short and long responses alike under the cap."""
    _, _, calls = loop("geo", rollout_is="geometric", rollout_is_cap=1.0)
    for (old, sampler, lens, level, cap, _), (w, _) in calls:
        ratio = torch.stack([(s - t).mean() for s, t in zip(old.split(lens), sampler.split(lens))]).exp()
        assert level == "geometric" and torch.allclose(w, torch.repeat_interleave(ratio, torch.tensor(lens)), rtol=1e-4)
        assert (w < 1).all() and w.min() > 1e-3  # (the products of sequence would reach ~1e-30 on long responses)


def test_with_the_real_engine_the_weights_are_one(loop):
    """On CPU in fp32 the engine's log-probs equal the training forward's to float rounding: TIS changes nothing."""
    _, metrics, calls = loop("real", fixed=False, rollout_is="token")
    assert calls and all(torch.allclose(w, torch.ones_like(w), atol=1e-4) for _, (w, _) in calls)
    assert all(abs(m["is_weight"] - 1) < 1e-4 and m["is_capped"] == 0 and abs(m["is_kl"]) < 1e-6 for m in metrics)


def test_a_cap_that_is_not_positive_is_an_error(loop):
    with pytest.raises(common.UserError, match="--rollout_is_cap must be > 0, got 0.0"):
        loop("bad", rollout_is="token", rollout_is_cap=0)


@pytest.mark.slow
def test_gspo_sequence_ratio_changes_only_a_run_with_several_updates(loop):
    """--ratio_level sequence (GSPO): with one on-policy update the ratio is 1 at every token and the update is the
    token-level one; with two mini-batches the second one's ratios differ, and so do the weights."""
    one_token, _, _ = loop("t1")
    one_seq, _, _ = loop("s1", ratio_level="sequence")
    assert all(torch.allclose(one_token[k], one_seq[k], rtol=1e-5, atol=1e-7) for k in one_token)
    two_token, _, _ = loop("t2", ppo_mini_batches=2)
    two_seq, metrics, _ = loop("s2", ppo_mini_batches=2, ratio_level="sequence")
    assert all(m["updates"] == 2 for m in metrics)
    assert not all(torch.allclose(two_token[k], two_seq[k], rtol=1e-5, atol=1e-7) for k in two_token)
