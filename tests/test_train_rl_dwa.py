"""train_rl.py --adv_weight dwa (the divergence-weighted advantage of 'Sparse but Critical') in the real loop: no
effect with one update per batch, an effect from the second mini-batch on. (The weights against a hand computation,
w = 1 exactly on-policy: test_grpo.py.)"""
import os

import pytest
import torch

import common
import ckpt
import engine
import toy_task
import train_rl
from rl_fixed_rollouts import fixed_rollouts  # rollouts that depend only on the prompt, random rewards


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
