"""train_rl.py --dynamic_sampling (DAPO's refill) in the real loop, on rollouts whose rewards depend only on the
prompt (tests/rl_fixed_rollouts.py; with 2 samples a prompt about half the groups have no reward variance): each step
trains the first --prompts_per_step groups with a signal in the data order, draws further batches for them up to
--max_gen_batches and logs how many, a resume draws the same groups, and 2 ranks train the groups 1 rank does.
The same cheap runs (no warm start) check the loop's bookkeeping: which steps are saved, the step-0 validation,
the streak of non-finite steps, and the settings a resume must share with the run it continues."""
import os
import shutil
import sys

import pytest
import torch

import ckpt
import common
import engine
import toy_task
import train_rl
from common import UserError
from conftest import RL_N, RL_PROMPTS, RL_RECORDS, ROOT, free_port, subprocess_env
from rl_fixed_rollouts import fixed_rollouts

PROMPTS, N, RECORDS = RL_PROMPTS, RL_N, RL_RECORDS


@pytest.fixture
def loop(rl_run, tmp_path):
    """conftest's rl_run, three steps with --dynamic_sampling by default; and the training records."""
    def run(name, **over):
        return rl_run(name, **({"max_steps": 3, "dynamic_sampling": True} | over))
    return run, common.read_jsonl(str(tmp_path / "train.jsonl"))


def groups(rows):
    """A step's rollout log as (id, rewards, trained, epoch) per group, in the order drawn (one rank)."""
    return [(rows[i]["id"], [r["reward"] for r in rows[i:i + N]], rows[i]["trained"], rows[i]["epoch"])
            for i in range(0, len(rows), N)]


@pytest.mark.slow
def test_each_step_trains_the_first_groups_with_a_signal_in_the_data_order(loop):
    run, train = loop
    metrics, logs, _ = run("dyn", max_steps=4)
    drawn = 0
    for m in metrics:
        got = groups(logs[m["step"]])
        # the prompts are the data order's next gen_batches batches, each batch's epoch logged with it
        want_ids, want_epochs = [], []
        for b in range(drawn + 1, drawn + m["gen_batches"] + 1):
            want_ids += [train[i]["id"] for i in train_rl.step_prompt_indices(RECORDS, PROMPTS, b, 1234)]
            want_epochs += [(b - 1) // (RECORDS // PROMPTS)] * PROMPTS
        drawn += m["gen_batches"]
        assert [g[0] for g in got] == want_ids and [g[3] for g in got] == want_epochs
        signal = [len(set(rewards)) > 1 for _, rewards, _, _ in got]
        trained = [g[2] for g in got]
        # exactly the first PROMPTS groups with a signal train, and the last batch was needed to reach them
        first = [i for i, has in enumerate(signal) if has][:PROMPTS]
        assert sum(trained) == PROMPTS and trained == [i in first for i in range(len(got))]
        assert sum(signal[:-PROMPTS]) < PROMPTS
        assert m["kept_frac"] == pytest.approx(PROMPTS / len(got)) and m["train_seqs"] == PROMPTS * N
        assert m["zero_var_frac"] == pytest.approx(1 - sum(signal) / len(got))
    assert drawn > len(metrics) and max(m["epoch"] for m in metrics) >= 1  # it refilled, into the next epoch


@pytest.mark.slow
def test_max_gen_batches_caps_the_refill_and_the_step_trains_what_it_found(loop):
    run, _ = loop
    metrics, logs, _ = run("capped", max_gen_batches=1, max_steps=2)
    for m in metrics:
        got = groups(logs[m["step"]])
        signal = [len(set(rewards)) > 1 for _, rewards, _, _ in got]
        assert m["gen_batches"] == 1 and len(got) == PROMPTS
        assert [g[2] for g in got] == signal and 0 < sum(signal) < PROMPTS
        assert m["updates"] == 1


@pytest.mark.slow
def test_a_resumed_run_draws_the_same_groups_and_ends_with_the_same_weights(loop):
    """The data cursor (prompt batches drawn) is saved with the checkpoint: were the resume to start step 3 at batch
    3, as a run without refill does, it would draw other prompts."""
    run, _ = loop
    _, whole_logs, whole = run("whole", max_steps=3)
    run("cut", max_steps=2)
    _, logs, cut = run("cut", max_steps=3, resume=True)
    assert whole_logs[3] == logs[3]
    from safetensors.torch import load_file
    a = load_file(os.path.join(ckpt.checkpoint_dir(whole, 3), "model.safetensors"))
    b = load_file(os.path.join(ckpt.checkpoint_dir(cut, 3), "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="dynamic_sampling: was True, now None"):
        run("cut", max_steps=4, resume=True, dynamic_sampling=False)


def test_dynamic_sampling_needs_groups_of_two(loop):
    """A group of one has no reward variance: dynamic sampling would find no group to keep, and dropping zero-variance
    groups (which ran, dropping none) does nothing."""
    run, _ = loop
    with pytest.raises(UserError, match="--dynamic_sampling needs --samples_per_prompt >= 2"):
        run("one", samples_per_prompt=1)
    with pytest.raises(UserError, match="--drop_zero_variance_groups needs --samples_per_prompt >= 2"):
        run("one", samples_per_prompt=1, dynamic_sampling=False, drop_zero_variance_groups=True)


@pytest.mark.torchrun
def test_two_ranks_train_the_groups_one_rank_does(tiny_checkpoint, tmp_path):
    """Which groups train is decided on the global batch, not per rank: 2 ranks (7 prompts, so one rank draws more)
    train the same groups as 1, with the same losses and weights."""
    import subprocess
    train = str(tmp_path / "train.jsonl")
    common.write_jsonl(train, toy_task.make_records(RECORDS, seed=1, split="train"))
    runs = {}
    for ranks in (1, 2):
        out = str(tmp_path / f"r{ranks}")
        s = {"model": tiny_checkpoint, "task": "toy_task", "train_data": train, "test_data": "", "out_dir": out,
             "prompts_per_step": 7, "samples_per_prompt": N, "max_response_tokens": 12, "lr": 1e-3,
             "warmup_steps": 0, "max_steps": 3, "save_every": 3, "progress": False, "dynamic_sampling": True,
             "micro_batch_tokens": 120}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_port",
               str(free_port()), os.path.join(ROOT, "tests", "rl_fixed_rollouts.py")]
        r = subprocess.run(cmd + [x for k, v in s.items() for x in (f"--{k}", str(v))], env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        runs[ranks] = out
    for step in (1, 2, 3):
        trained = [sorted((row["epoch"], row["id"], row["sample"]) for row in common.read_jsonl(os.path.join(
            runs[k], "rollouts", f"step_{step:06d}.jsonl")) if row["trained"]) for k in (1, 2)]
        assert len(trained[0]) == 7 * N and trained[0] == trained[1]
    from safetensors.torch import load_file
    a, b = (load_file(os.path.join(ckpt.checkpoint_dir(runs[k], 3), "model.safetensors")) for k in (1, 2))
    # (k_proj's bias has a gradient of 0 up to round-off, which Adam scales up to ~lr: hence 1e-4, not 1e-5)
    assert all(float((b[k] - a[k]).norm()) <= 1e-4 * float(a[k].norm()) for k in a)
    ma, mb = ([m for m in common.read_jsonl(os.path.join(runs[k], "metrics.jsonl"))] for k in (1, 2))
    assert [m["loss"] for m in mb] == pytest.approx([m["loss"] for m in ma], rel=1e-5, abs=1e-7)


# -----------------------------------------------------------------------------
# the loop's bookkeeping (any sampling: these runs draw one batch a step unless they say otherwise)


def test_the_last_step_is_saved_when_save_every_does_not_divide_it(loop):
    """--max_steps 3, --save_every 2: step 2 is saved by the cadence and step 3 because it is the last; without the
    last one the run's final weights would be lost (and --keep_steps 3, which the docs' commands use, refused)."""
    run, _ = loop
    _, _, out = run("ends", max_steps=3, save_every=2, dynamic_sampling=False)
    assert ckpt.checkpoint_steps(out) == [2, 3]


def test_a_step_to_keep_is_one_the_run_saves(loop):
    """--keep_steps names steps whose weights outlive --keep_last; one never saved kept nothing, silently. Kept: a
    step of the cadence after the run's start, its last, or one saved already (an earlier leg's last step, off the
    cadence, kept through a longer resumed run). Refused: one pruned before this run's start, one off the cadence,
    and one below 1."""
    run, _ = loop
    flags = dict(save_every=2, keep_last=1, keep_steps=3, dynamic_sampling=False)
    run("keep", max_steps=3, **flags)  # 3: its last step
    _, _, out = run("keep", max_steps=6, resume=True, **flags)
    assert ckpt.checkpoint_steps(out) == [6] and os.path.isdir(ckpt.checkpoint_dir(out, 3))
    for keep in (2, 5, 0):  # 2: pruned by the first leg; 5: never on the cadence
        with pytest.raises(UserError, match=rf"--keep_steps {keep}: that step is never saved \(this run saves every "
                                            rf"--save_every 2 steps after step 6 and its last, 8,"):
            run("keep", max_steps=8, resume=True, **(flags | {"keep_steps": keep}))


def test_a_resumed_run_does_not_validate_step_0_again(loop, tmp_path):
    """--val_before_train validates the initial policy once, as step 0: a resumed run starts from trained weights,
    so validating again would log a second step-0 record (of the wrong weights) into metrics.jsonl. And a resume
    that validates on other records (another test set, --val_limit) or with another response cap is refused: its
    val/acc would go on the run's curve as the same measure."""
    run, _ = loop
    test, other = str(tmp_path / "test.jsonl"), str(tmp_path / "other.jsonl")
    common.write_jsonl(test, toy_task.make_records(4, seed=2, split="test"))
    common.write_jsonl(other, toy_task.make_records(4, seed=3, split="test"))
    kw = dict(test_data=test, val_every=2, val_before_train=True, dynamic_sampling=False, save_every=2)
    run("val", max_steps=2, **kw)
    for changed in ({"test_data": other}, {"val_limit": 2}, {"val_max_response_tokens": 5}):
        with pytest.raises(UserError, match=r"different settings than the run's: validation: was \["):
            run("val", max_steps=3, resume=True, **(kw | changed))
    _, _, out = run("val", max_steps=3, resume=True, **kw)
    ms = common.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [m["step"] for m in ms] == [0, 1, 2, 3]
    assert [m["step"] for m in ms if "val/acc" in m] == [0, 2, 3]


def test_a_good_step_ends_the_streak_of_non_finite_ones(loop, monkeypatch):
    """--max_bad_steps counts consecutive non-finite steps: NaN in steps 1 and 3 of 4 with --max_bad_steps 2 is
    never two in a row, so the run finishes (exit 0), every step logged and the last saved; a streak that a good
    step does not reset would stop it at step 3 (exit 1)."""
    run, _ = loop
    real, calls = train_rl.ppo_clip_loss, [0]

    def nan_in_steps_1_and_3(*a, **k):  # one micro-batch a step: the n-th call is step n's update
        calls[0] += 1
        loss, clipped = real(*a, **k)
        return (loss * float("nan") if calls[0] in (1, 3) else loss), clipped

    monkeypatch.setattr(train_rl, "ppo_clip_loss", nan_in_steps_1_and_3)
    metrics, _, out = run("nan", max_steps=4, max_bad_steps=2, dynamic_sampling=False, micro_batch_tokens=100000)
    assert calls[0] == 4 and [m["bad_steps"] for m in metrics] == [1, 1, 2, 2]
    assert [m["updates"] for m in metrics] == [0, 1, 0, 1] and ckpt.checkpoint_steps(out)[-1] == 4


@pytest.fixture(scope="module")
def saved_run(tiny_checkpoint, tmp_path_factory):
    """One step of a --dynamic_sampling run on fixed rollouts, saved, and a function that resumes it with settings
    changed (the resume's --max_steps is the saved step: a resume that is not refused runs no step)."""
    d = tmp_path_factory.mktemp("identity")
    train = str(d / "train.jsonl")
    common.write_jsonl(train, toy_task.make_records(RECORDS, seed=1, split="train"))
    s = {"model": tiny_checkpoint, "task": "toy_task", "train_data": train, "test_data": "", "out_dir": str(d / "run"),
         "prompts_per_step": PROMPTS, "samples_per_prompt": N, "max_response_tokens": 12, "lr": 3e-3,
         "warmup_steps": 0, "max_steps": 1, "save_every": 1, "progress": False, "dynamic_sampling": True,
         "max_gen_batches": 3}

    def main(**over):
        return train_rl.main([x for k, v in (s | over).items() for x in (f"--{k}", str(v))])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "sample_responses", fixed_rollouts)
        assert main() == 0
    return d, main


# a value other than the saved run's for each setting a resume must keep ("copy": the same file or checkpoint at
# another path, which still names another run)
CHANGED = {"task": "toy_task_copy", "train_data": "copy", "template": "chat", "max_prompt_tokens": 500,
           "prompts_per_step": 4, "samples_per_prompt": 4, "seed": 7, "lr": 1e-3, "warmup_steps": 5,
           "temperature": 0.5, "top_p": 0.9, "max_response_tokens": 10, "loss_agg": "constant", "std_normalize": False,
           "clip_low": 0.1, "clip_high": 0.28, "ppo_epochs": 2, "ratio_level": "sequence", "ppo_mini_batches": 2,
           "kl_coef": 0.05, "kl_estimator": "k1", "ref_model": "copy", "entropy_coef": 0.01, "adv_weight": "dwa",
           "rollout_is": "off", "rollout_is_cap": 3.0, "dwa_s": 0.5, "dwa_alpha": 2.0, "policy_loss": "cispo",
           "rollout_is_mode": "mask", "overlong_buffer": 4, "overlong_penalty": 0.5, "std_scope": "batch",
           "entropy_top_frac": 0.2, "baseline": "loo", "cov_frac": 0.01, "clip_cov_low": 0.5, "clip_cov_high": 4.0,
           "kl_cov_coef": 2.0,
           "drop_zero_variance_groups": True, "mask_truncated": True, "grad_clip": 0.5, "adam_8bit": True,
           "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "model": "copy", "max_gen_batches": 1}


# the switch a setting acts under, where the saved run has it off (a setting neither run uses is not compared)
SWITCHED_ON = {"dwa_s": {"adv_weight": "dwa"}, "dwa_alpha": {"adv_weight": "dwa"},
               "overlong_penalty": {"overlong_buffer": 4}, "cov_frac": {"policy_loss": "clip_cov"},
               "clip_cov_low": {"policy_loss": "clip_cov"}, "clip_cov_high": {"policy_loss": "clip_cov"},
               "kl_cov_coef": {"policy_loss": "kl_cov"}, "kl_estimator": {"kl_coef": 0.05},
               "ref_model": {"kl_coef": 0.05}}


def test_every_identity_setting_has_a_changed_value():
    assert set(CHANGED) == set(train_rl.RUN_IDENTITY) | set(train_rl.RUN_OBJECTIVE) | {"max_gen_batches"}
    switched = {n for names, _, _ in train_rl.switched_settings(vars(train_rl.get_parser().parse_args([])))
                for n in names}
    assert set(SWITCHED_ON) <= switched


@pytest.mark.parametrize("key,value", [("kl_estimator", "k1"), ("ref_model", "copy"), ("dwa_s", 0.5),
                                       ("overlong_penalty", 0.5), ("clip_cov_low", 0.5), ("kl_cov_coef", 2.0)])
def test_a_resume_may_change_a_setting_that_neither_it_nor_the_run_uses(saved_run, tiny_checkpoint, key, value):
    """A fresh run takes a setting whose switch is off with a note (a sweep may pass it to every arm); a resume
    refused it, and so a re-run of a finished study's stage with such a sweep's settings."""
    d, main = saved_run
    if value == "copy":
        value = str(d / f"{key}_unused")
        if not os.path.exists(value):
            shutil.copytree(tiny_checkpoint, value)
    assert main(resume=True, **{key: value}) == 0


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_a_resume_with_a_changed_setting_is_refused_naming_it(saved_run, tiny_checkpoint, key, monkeypatch):
    """Each setting of RUN_IDENTITY (the data order, the schedule), RUN_OBJECTIVE (what a step samples and
    optimises) and, under --dynamic_sampling, --max_gen_batches (how many prompt batches a step may draw, so the
    data cursor) must be the saved run's: changed at a resume, the rest of the run would be another run's, silently.
    The refusal names the setting."""
    d, main = saved_run
    value = CHANGED[key]
    if key == "task":  # the same task under another module name
        (d / "toy_task_copy.py").write_text("from toy_task import *  # noqa\n")
        monkeypatch.syspath_prepend(str(d))
    elif value == "copy":
        src = {"train_data": str(d / "train.jsonl")}.get(key, tiny_checkpoint)
        value = str(d / f"{key}_copy")
        if not os.path.exists(value):
            (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, value)
    with pytest.raises(UserError, match=rf"different settings than the run's: (.*; )?{key}: was"):
        main(resume=True, **{key: value}, **SWITCHED_ON.get(key, {}))
    assert main(resume=True) == 0  # unchanged, it resumes (and, at its last step, runs none)


def test_a_run_of_an_earlier_version_is_compared_on_what_that_version_did(saved_run):
    """A checkpoint whose saved settings predate --policy_loss, --rollout_is_mode, --overlong_buffer,
    --overlong_penalty, --std_scope, --entropy_top_frac, --baseline and Clip-Cov's and KL-Cov's settings (and
    --rollout_is, on by default since 2026-12-02, and --ratio_level) ran PPO with each token's ratio, truncated IS (or
    none), no length penalty, each group's mean and std and every token: it resumes under those, and a resume that asks
    for another is refused, naming it (compared on today's defaults instead, --rollout_is token would pass silently for
    a run that sampled without it)."""
    d, main = saved_run
    old = str(d / "old_version")
    if not os.path.exists(old):
        shutil.copytree(str(d / "run"), old, ignore=shutil.ignore_patterns(".lock"))
        path = ckpt.checkpoint_dir(old, 1) + ".state.pt"
        state = torch.load(path, weights_only=True)
        added = ("policy_loss", "rollout_is_mode", "overlong_buffer", "overlong_penalty", "std_scope",
                 "entropy_top_frac", "rollout_is", "baseline", "cov_frac", "clip_cov_low", "clip_cov_high",
                 "kl_cov_coef", "ratio_level", "adv_weight")
        state["settings"] = {k: v for k, v in state["settings"].items() if k not in added}
        torch.save(state, path)
    assert main(out_dir=old, resume=True, rollout_is="off") == 0
    for key, value in (("policy_loss", "cispo"), ("rollout_is_mode", "mask"), ("overlong_buffer", 4),
                       ("overlong_penalty", 0.5), ("std_scope", "batch"), ("entropy_top_frac", 0.2),
                       ("baseline", "loo"), ("cov_frac", 0.01), ("clip_cov_low", 0.5), ("clip_cov_high", 4.0),
                       ("kl_cov_coef", 2.0), ("ratio_level", "sequence"), ("adv_weight", "dwa"),
                       ("rollout_is", "token")):
        with pytest.raises(UserError, match=rf"different settings than the run's: (.*; )?{key}: was"):
            main(out_dir=old, resume=True, **({"rollout_is": "off", key: value} | SWITCHED_ON.get(key, {})
                                              | ({"rollout_is": "token"} if key == "rollout_is_mode" else {})))


@pytest.mark.parametrize("rebuilt", ["model", "ref_model"])
def test_a_resume_whose_model_was_rebuilt_at_the_same_path_is_refused(saved_run, tiny_checkpoint, rebuilt,
                                                                         monkeypatch):
    """--model (the tokenizer; the KL reference) or --ref_model rebuilt under the same path (an SFT stage re-run
    into its final/): the path compared equal, and the resume went on with another reference, silently."""
    d, main = saved_run
    monkeypatch.setattr(engine, "sample_responses", fixed_rollouts)
    paths = {name: str(d / f"{rebuilt}_{name}") for name in ("model", "ref_model")}
    for path in paths.values():
        if not os.path.exists(path):
            shutil.copytree(tiny_checkpoint, path)
    run = dict(out_dir=str(d / f"rebuilt_{rebuilt}"), model=paths["model"], ref_model=paths["ref_model"],
               kl_coef=0.05)
    assert main(**run) == 0
    assert main(resume=True, **run) == 0  # (untouched: it resumes)
    weights = os.path.join(paths[rebuilt], "model.safetensors")
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))  # written anew
    with pytest.raises(UserError, match=rf"different settings than the run's: {rebuilt}_files: was"):
        main(resume=True, **run)


def test_a_resume_names_every_changed_setting_in_one_refusal(saved_run):
    """A setting of the data order, one of the objective and one of the optimizer changed at once: one error names
    all three (one refusal each would take three attempts to learn them)."""
    d, main = saved_run
    with pytest.raises(UserError) as e:
        main(resume=True, seed=7, temperature=0.5, beta1=0.9)
    assert all(f"{k}: was" in str(e.value) for k in ("seed", "temperature", "beta1")), e.value
