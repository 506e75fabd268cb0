"""train_rl.py --adv_weight dwa (the divergence-weighted advantage of 'Sparse but Critical'): the weights against a
hand computation, w = 1 exactly on-policy, and in the real loop: no effect with one update per batch, an effect
from the second mini-batch on."""
import math
import os

import pytest
import torch

import common
import ckpt
import engine
import toy_task
import train_rl
from rl_fixed_rollouts import fixed_rollouts  # rollouts that depend only on the prompt, random rewards


def test_dwa_weights_match_a_hand_computation():
    # r = pi / pi_old = 2, 1/2, 1 and e: k3 = (r - 1) - log r
    logp = torch.log(torch.tensor([0.4, 0.1, 0.3, 0.5 * math.e]))
    old = torch.log(torch.tensor([0.2, 0.2, 0.3, 0.5]))
    kl = [1 - math.log(2), -0.5 + math.log(2), 0.0, math.e - 2]
    for s, alpha in ((1.0, 1.0), (0.5, 4.0), (2.0, -3.0)):
        want = [1 + s * (1 / (1 + math.exp(-alpha * k)) - 0.5) for k in kl]
        assert train_rl.dwa_weights(logp, old, s, alpha).tolist() == pytest.approx(want, rel=1e-6)
    # high-KL boost (s, alpha > 0) raises the weight of the tokens that moved most; low-KL boost lowers it
    hi, lo = train_rl.dwa_weights(logp, old, 1.0, 2.0), train_rl.dwa_weights(logp, old, 1.0, -2.0)
    assert hi.argmax() == 3 and lo.argmin() == 3 and hi[2] == lo[2] == 1.0


def test_dwa_weights_are_one_on_policy_and_carry_no_gradient():
    logp = torch.randn(50, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    w = train_rl.dwa_weights(logp, logp.detach(), 1.7, 25.0)
    assert torch.equal(w, torch.ones(50)) and not w.requires_grad


@pytest.fixture
def loop(tiny_checkpoint, tmp_path, monkeypatch):
    """train_rl.main on fixed rollouts of the tiny checkpoint; records every DWA weight tensor it computes."""
    common.write_jsonl(str(tmp_path / "train.jsonl"), toy_task.make_records(40, seed=1, split="train"))
    monkeypatch.setattr(engine, "sample_responses", fixed_rollouts)
    calls, real = [], train_rl.dwa_weights

    def recorded(*a, **k):
        w = real(*a, **k)
        calls.append(w)
        return w
    monkeypatch.setattr(train_rl, "dwa_weights", recorded)

    def run(name, **over):
        s = {"model": tiny_checkpoint, "task": "toy_task", "train_data": str(tmp_path / "train.jsonl"), "test_data": "",
             "out_dir": str(tmp_path / name), "prompts_per_step": 8, "samples_per_prompt": 4, "max_response_tokens": 12,
             "lr": 3e-3, "warmup_steps": 0, "max_steps": 2, "save_every": 2, "progress": False, "log_rollouts": False}
        s.update(over)
        calls.clear()
        assert train_rl.main([x for k, v in s.items() for x in (f"--{k}", str(v))]) == 0
        from safetensors.torch import load_file
        return load_file(os.path.join(ckpt.checkpoint_dir(s["out_dir"], 2), "model.safetensors")), list(calls)
    return run


def test_dwa_changes_nothing_with_one_update_per_batch(loop, capsys):
    plain, none_calls = loop("plain")
    dwa, calls = loop("dwa", adv_weight="dwa", dwa_s=1.5, dwa_alpha=50.0)
    assert not none_calls and len(calls) == 2 and all(torch.equal(w, torch.ones_like(w)) for w in calls)
    assert all(torch.equal(plain[k], dwa[k]) for k in plain)
    assert "w = 1 (no effect)" in capsys.readouterr().out


def test_dwa_acts_from_the_second_mini_batch_on(loop):
    plain, _ = loop("plain", ppo_mini_batches=2)
    dwa, calls = loop("dwa", ppo_mini_batches=2, adv_weight="dwa", dwa_s=1.5, dwa_alpha=50.0)
    assert len(calls) == 4  # 2 steps x 2 mini-batches, one micro-batch each
    for step in range(2):
        first, second = calls[2 * step], calls[2 * step + 1]
        assert torch.allclose(first, torch.ones_like(first), atol=1e-6)  # the old log-probs of the unchanged policy
        assert (second > 1 + 1e-3).any() and (second >= 1 - 1e-6).all() and (second < 1.75).all()
    assert not all(torch.equal(plain[k], dwa[k]) for k in plain)


def test_dwa_scale_that_would_flip_the_advantage_is_an_error(loop):
    with pytest.raises(common.UserError, match="--dwa_s 3.0: .* sign"):
        loop("bad", adv_weight="dwa", dwa_s=3.0)
