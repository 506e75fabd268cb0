"""ckpt.py: a checkpoint, an fp32 full copy and the engine's copy of an FSDP-sharded model taken after a no-grad
forward hold the fp32 master, and resume restores it exactly. (Kill-and-resume through the scripts' mains:
test_train_rl.py, test_redistill_sft.py, test_kill_drill.py.) And a resume's run identity."""
import os
import re
import shutil

import pytest

import ckpt
import common
import engine
import parallel
from common import UserError


def test_checkpoints_and_full_copies_after_a_no_grad_forward_hold_the_fp32_master(tiny_checkpoint, tmp_path):
    """One rank with bf16 compute is FSDP-sharded (as on one GPU). FSDP2 leaves its root group (embeddings, final norm,
    lm_head) gathered in bf16 after a forward without backward; a checkpoint or an fp32 full copy taken then must
    still hold the fp32 master, and resume must restore it exactly."""
    import torch
    from conftest import assert_train_shards
    from model import load_model
    from tasks import load_tokenizer
    parallel.dist_setup()
    master = load_model(tiny_checkpoint).state_dict()
    model = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    optimizer = ckpt.make_optimizer(model.parameters(), lr=1e-3)
    parallel.idle_pass(model)  # a training micro-batch: FSDP reshards after its backward
    with torch.no_grad():
        parallel.idle_pass(model, backward=False)  # validation, a pre-pass: the root stays gathered
    assert parallel.is_sharded(model)
    copy = parallel.full_copy(model, torch.float32)
    assert all(torch.equal(copy.state_dict()[k], master[k]) for k in master)
    with torch.no_grad():  # so does the engine's copy, gathered tensor by tensor
        parallel.idle_pass(model, backward=False)
    gathered, plain = engine.GenWeights(model, torch.float32).w, engine.GenWeights(load_model(tiny_checkpoint)).w
    assert gathered.keys() == plain.keys() and all(torch.equal(gathered[k], plain[k]) for k in plain)
    # train_rl's kept copy (--keep_engine): refilled in place from the shards at each step, same tensors, same serial
    engine.release()
    kept = engine.kept_weights(model, 0, torch.float32)
    ptrs, serial = [t.data_ptr() for t in kept.w.values()], kept.serial
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)  # "the update" (exact in fp32, undone below)
        parallel.idle_pass(model, backward=False)
        again = engine.kept_weights(model, 0, torch.float32)
        assert again is kept and kept.serial == serial and [t.data_ptr() for t in kept.w.values()] == ptrs
        assert all(torch.equal(kept.w[k], plain[k] * 0.5) for k in plain)
        for p in model.parameters():
            p.mul_(2.0)
    with pytest.raises(ValueError, match="needs full weights"):  # generate() itself never gathers
        engine.generate(model, [[1, 2, 3]], max_new_tokens=2)
    engine.release()
    with torch.no_grad():
        parallel.idle_pass(model, backward=False)
    ckpt.save_checkpoint(str(tmp_path), 1, model, load_tokenizer(tiny_checkpoint), optimizer, {}, torch.bfloat16, 2)
    assert assert_train_shards(tmp_path, 1) == 1
    again = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    # the optimizer state's own hyperparameters would silently replace the ones given now: refused, named
    with pytest.raises(UserError, match=r"optimizer settings than the checkpoint's: betas: was \[0.9, 0.999\], now "
                                        r"\[0.5, 0.999\]; weight_decay: was 0.0, now 0.1$"):
        other = ckpt.make_optimizer(again.parameters(), lr=1e-3, betas=(0.5, 0.999), weight_decay=0.1)
        ckpt.load_local_train_state(again, other, ckpt.load_checkpoint(str(tmp_path))[3])
    # a shard of bitsandbytes' 8-bit AdamW (its keys) resumed under torch's AdamW (--adam_8bit without bitsandbytes
    # or CUDA here): refused up front, not a KeyError at the first step
    shard = ckpt.load_checkpoint(str(tmp_path))[3]
    state = {"step": torch.tensor(1.0), "state1": torch.zeros(3), "qmap1": torch.zeros(3)}
    eight_bit = {**shard, "optimizer": {**shard["optimizer"], "state": {0: state}}}
    with pytest.raises(UserError, match=r"holds the state of 8-bit AdamW \(bitsandbytes\), and this run's optimizer "
                                        r"is AdamW \(torch\)"):
        ckpt.load_local_train_state(again, ckpt.make_optimizer(again.parameters(), lr=1e-3), eight_bit)
    ckpt.load_local_train_state(again, ckpt.make_optimizer(again.parameters(), lr=1e-3),
                                ckpt.load_checkpoint(str(tmp_path))[3])
    assert all(torch.equal(parallel.full_copy(again, torch.float32).state_dict()[k], master[k]) for k in master)


def test_a_resume_must_share_the_runs_identity_both_ways():
    """A setting that decides the data order, changed, added or dropped at --resume, is one line naming it (a key
    only the checkpoint has, e.g. dynamic sampling turned off, counts as much as one only the new run has)."""
    ckpt.check_run_identity("run", {"seed": 1, "lr": 0.1}, {"seed": 1, "lr": 0.1})
    with pytest.raises(UserError, match=r"run: --resume with different settings than the run's: seed: was 1, now 2$"):
        ckpt.check_run_identity("run", {"seed": 1}, {"seed": 2})
    with pytest.raises(UserError, match="dynamic_sampling: was True, now None"):
        ckpt.check_run_identity("run", {"seed": 1, "dynamic_sampling": True}, {"seed": 1})
    with pytest.raises(UserError, match="dynamic_sampling: was None, now True"):
        ckpt.check_run_identity("run", {"seed": 1}, {"seed": 1, "dynamic_sampling": True})
    # a key that earlier versions did not record: not compared with their checkpoints, compared with later ones
    ckpt.check_run_identity("run", {"seed": 1}, {"seed": 1, "data_digest": "ab"}, recorded_since=("data_digest",))
    with pytest.raises(UserError, match="data_digest: was 'ab', now 'cd'"):
        ckpt.check_run_identity("run", {"data_digest": "ab"}, {"data_digest": "cd"}, recorded_since=("data_digest",))
    with pytest.raises(UserError, match="data_digest: was 'ab', now None"):
        ckpt.check_run_identity("run", {"data_digest": "ab"}, {}, recorded_since=("data_digest",))
    # a key that describes what may be unused (validation): compared only where both use it
    for saved, now in (({"val": None}, {"val": "ab"}), ({"val": "ab"}, {"val": None}), ({}, {"val": "ab"})):
        ckpt.check_run_identity("run", saved, now, when_both=("val",))
    with pytest.raises(UserError, match="val: was 'ab', now 'cd'"):
        ckpt.check_run_identity("run", {"val": "ab"}, {"val": "cd"}, when_both=("val",))


def test_a_path_setting_spelled_otherwise_names_the_same_files(tmp_path, monkeypatch):
    """Relative or absolute, through a link: the same files are the same setting (a resume naming them otherwise was
    refused); other files, or one that is not there, are a difference."""
    (tmp_path / "data").mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "data" / name).write_text("{}\n")
    os.symlink(tmp_path / "data", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "data" / "a.jsonl")
    ckpt.check_run_identity("run", {"train_data": "data/a.jsonl", "seed": 1}, {"train_data": absolute, "seed": 1})
    ckpt.check_run_identity("run", {"data": ["data/a.jsonl", "data/b.jsonl"]},
                            {"data": ["link/a.jsonl", str(tmp_path / "data" / "b.jsonl")]})
    for saved, now in (("data/a.jsonl", "data/b.jsonl"), ("data/a.jsonl", "data/gone.jsonl"),
                       (["data/a.jsonl", "data/b.jsonl"], ["data/b.jsonl", "data/a.jsonl"]),
                       (["data/a.jsonl"], ["data/a.jsonl", "data/b.jsonl"])):
        with pytest.raises(UserError, match="data: was"):
            ckpt.check_run_identity("run", {"data": saved}, {"data": now})
    with pytest.raises(UserError, match="seed: was 'data/a.jsonl'"):  # (only the settings that name files)
        ckpt.check_run_identity("run", {"seed": "data/a.jsonl"}, {"seed": absolute})


def test_local_shard_optimizer_updates_sharded_weights_like_the_optimizer_on_them(tiny_checkpoint, tmp_path):
    """--adam_8bit on FSDP-sharded weights runs bitsandbytes' AdamW on each rank's local shards (LocalShardOptimizer).
    With torch's AdamW standing in for it (bitsandbytes needs CUDA), three steps on the local shards give the weights
    of AdamW on the sharded parameters themselves, and a checkpoint of it resumes to the same next step."""
    import torch
    from model import load_model, pack
    from tasks import load_tokenizer
    parallel.dist_setup()
    ids, cu = pack([[3, 4, 5, 6, 7], [8, 9, 10]])

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.5, 0.999), weight_decay=0.01)

    def train(model, optimizer, steps):
        for _ in range(steps):
            model.token_logprobs(model(ids, cu_seqlens=cu)[0, :-1], ids[0, 1:]).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return parallel.full_copy(model, torch.float32).state_dict()

    ref_model = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    model = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    local = ckpt.LocalShardOptimizer(list(model.parameters()), adamw)
    assert all(not isinstance(p, torch.distributed.tensor.DTensor) for g in local.param_groups for p in g["params"])
    ref, got = train(ref_model, adamw(list(ref_model.parameters())), 3), train(model, local, 3)
    start = load_model(tiny_checkpoint).state_dict()
    for k in ref:
        assert not torch.equal(ref[k], start[k]), k  # it trained
        assert (got[k] - ref[k]).abs().max() <= 1e-6, k
    ckpt.save_checkpoint(str(tmp_path), 3, model, load_tokenizer(tiny_checkpoint), local, {}, torch.bfloat16, 2)
    again = parallel.shard_model(load_model(tiny_checkpoint), torch.bfloat16)
    resumed = ckpt.LocalShardOptimizer(list(again.parameters()), adamw)
    ckpt.load_local_train_state(again, resumed, ckpt.load_checkpoint(str(tmp_path))[3])
    for opt in (local, resumed):  # a schedule's next lr reaches the inner optimizer, whose groups the load replaced
        opt.param_groups[0]["lr"] = 3e-3
    after, after_resumed = train(model, local, 1), train(again, resumed, 1)
    assert all(torch.equal(after[k], after_resumed[k]) for k in after)
    # each shard says whose it is: step 3's, rank 0's
    shard = torch.load(ckpt.train_shard_path(str(tmp_path), 3, 0), weights_only=True)
    assert (shard["step"], shard["rank"]) == (3, 0)


def test_a_shard_in_another_steps_or_ranks_place_is_refused_and_nothing_removed(tmp_path):
    """A rank's optimizer shard copied or renamed by hand into another step's or rank's place loaded as that one's
    (the shapes match), silently. A stamped shard of another place stops the resume, removing nothing (skipped as
    damaged, the checkpoint would be pruned with its right files); an unstamped one, an earlier version's, loads."""
    import torch
    run = str(tmp_path)
    for step in (1, 2):
        fake_checkpoint(run, step)
    torch.save({"exp_avg": torch.full((2,), 1.0), "step": 1, "rank": 0}, ckpt.train_shard_path(run, 2, 0))
    with pytest.raises(UserError, match=r"step_000002\.train\.rank0\.pt: holds the optimizer shard of step 1, rank 0, "
                                        r"not of step 2, rank 0 .*nothing was skipped or removed"):
        ckpt.resume_checkpoint(run, resume=True)
    assert ckpt.checkpoint_parts(run) == {1, 2} and ckpt.checkpoint_steps(run) == [1, 2]
    torch.save({"exp_avg": torch.full((2,), 2.0), "step": 2, "rank": 0}, ckpt.train_shard_path(run, 2, 0))
    assert ckpt.resume_checkpoint(run, resume=True)[0] == 2


def test_clip_grad_norm_scales_only_above_the_bound():
    """The norm before clipping is returned; gradients above max_norm are scaled to it, the rest left alone, and
    0 turns clipping off."""
    import torch
    for grad, max_norm, after in [([0.9, 1.2], 1.0, 1.0), ([0.3, 0.4], 1.0, 0.5), ([0.9, 1.2], 0.0, 1.5)]:
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor(grad)
        assert ckpt.clip_grad_norm([p], max_norm) == pytest.approx(1.5 if grad[0] == 0.9 else 0.5)
        assert float(p.grad.norm()) == pytest.approx(after, rel=1e-5)


def fake_checkpoint(run_dir, step, state=True):
    """The files of a checkpoint of `step` as save_checkpoint lays them out, with stand-in contents."""
    import torch
    from safetensors.torch import save_file
    os.makedirs(ckpt.checkpoint_dir(run_dir, step), exist_ok=True)
    weights = os.path.join(ckpt.checkpoint_dir(run_dir, step), "model.safetensors")
    save_file({"w": torch.full((2,), float(step))}, weights)
    torch.save({"exp_avg": torch.full((2,), float(step))}, ckpt.train_shard_path(run_dir, step, 0))
    if state:
        torch.save({"step": step, "world_size": 1}, ckpt.checkpoint_dir(run_dir, step) + ".state.pt")


def test_prune_keeps_the_newest_resumable_and_the_weights_asked_for(tmp_path):
    run = str(tmp_path)
    for step in (1, 2, 3, 4):
        fake_checkpoint(run, step)
    ckpt.prune_checkpoints(run, 4, keep_last=2, keep_weights=(1,))
    assert ckpt.checkpoint_steps(run) == [3, 4]
    assert sorted(os.listdir(run)) == ["step_000001", "step_000003", "step_000003.state.pt",
                                       "step_000003.train.rank0.pt", "step_000004", "step_000004.state.pt",
                                       "step_000004.train.rank0.pt"]  # step 1: its weights alone; step 2: nothing


def test_resume_takes_the_newest_readable_checkpoint_and_drops_what_lies_beyond(tmp_path, capsys):
    """A fresh run refuses a directory with checkpoints; a resume takes the newest one every file of which reads,
    skipping (with a warning) a newer one with a damaged file, and removes what an interrupted save left; what lies
    beyond the one taken (the damaged one, an unfinished save's parts) only once the resume is accepted, at its prune:
    it was removed at once, and a resume then refused (another setting) had lost it for nothing."""
    run = str(tmp_path)
    for step in (1, 2, 3):
        fake_checkpoint(run, step)
    fake_checkpoint(run, 4, state=False)  # a save killed before its state file: not resumable
    with open(ckpt.train_shard_path(run, 3, 0), "wb") as f:
        f.write(b"cut short")
    open(os.path.join(run, ".tmp_abc"), "w").close()
    with pytest.raises(UserError, match="already holds checkpoints \\(newest step 3\\); pass --resume true"):
        ckpt.resume_checkpoint(run, resume=False)
    step, model_dir, state, shard = ckpt.resume_checkpoint(run, resume=True)
    assert (step, model_dir, state["step"]) == (2, ckpt.checkpoint_dir(run, 2), 2)
    assert float(shard["exp_avg"][0]) == 2.0
    assert "skipping the checkpoint of step 3: cannot read" in capsys.readouterr().out
    assert ckpt.checkpoint_parts(run) == {1, 2, 3, 4} and not os.path.exists(os.path.join(run, ".tmp_abc"))
    ckpt.prune_checkpoints(run, 2, keep_last=2)
    assert ckpt.checkpoint_parts(run) == {1, 2}
    for step in (1, 2):
        os.remove(ckpt.checkpoint_dir(run, step) + ".state.pt")
    # nothing resumable left, but the weights and shards of an earlier run (its state files removed to free the disk):
    # a fresh run went on, pruned them all at its first save and wrote over that run's logs
    for resume in (True, False):
        with pytest.raises(UserError, match=r"holds weights or shards of an earlier run \(steps 1, 2\) and no "
                                            r"checkpoint to resume .*move them away, or choose another --out_dir"):
            ckpt.resume_checkpoint(run, resume=resume)
    assert ckpt.checkpoint_parts(run) == {1, 2}
    for step in (1, 2):
        ckpt.remove_checkpoint(run, step)
    assert ckpt.resume_checkpoint(run, resume=True) is None  # nothing of a run left: a fresh run


def test_a_checkpoint_one_rank_does_not_see_is_an_error_not_a_skip(tmp_path, monkeypatch):
    """Each rank listed the checkpoints itself: one whose view lacked the newest (a node-local --out_dir, a lagging
    network file system) resumed from an older step than the others, their collectives paired across steps (a hang),
    and its save rewrote the older checkpoint's shard. Rank 0's listing is walked by every rank now, and a state file
    that a rank does not see stops every rank (here rank 1 is played by the gathers' second entry)."""
    run = str(tmp_path)
    for step in (1, 2):
        fake_checkpoint(run, step)
    monkeypatch.setattr(ckpt, "all_gather_json", lambda value: [value, [*value[:3], False, *value[4:]]]
                        if isinstance(value, list) and len(value) == 5 else [value, value])
    with pytest.raises(UserError, match=r"step_000002\.state\.pt: rank\(s\) 1 do not see it, where rank\(s\) 0 do: "
                                        r"every rank must see one --out_dir .*nothing was skipped or removed"):
        ckpt.resume_checkpoint(run, resume=True)
    assert ckpt.checkpoint_parts(run) == {1, 2}


def test_a_checkpoint_missing_only_its_shard_is_not_skipped(tmp_path):
    """A finished run's shards deleted to free the disk (load_checkpoint's docstring allows it), then the run extended:
    its last checkpoint was skipped as damaged and removed, weights and all. A save writes the shards before the state
    file, so a state file without its shard is that, not a kill's leftover: refused, and nothing removed."""
    run = str(tmp_path)
    for step in (1, 2):
        fake_checkpoint(run, step)
    os.remove(ckpt.train_shard_path(run, 2, 0))
    with pytest.raises(UserError, match=r"step_000002\.train\.rank0\.pt is missing, where the checkpoint of step 2 "
                                        r"is otherwise whole"):
        ckpt.resume_checkpoint(run, resume=True)
    assert ckpt.checkpoint_steps(run) == [1, 2]
    # a finished run reads no shard: still resumable ("nothing to do")
    assert ckpt.resume_checkpoint(run, resume=True, needs_shard=lambda state: state["step"] < 2)[0] == 2


def test_a_bit_flipped_on_the_disk_is_a_damaged_checkpoint(tmp_path, capsys):
    """torch.load does not check a zip record's CRC: a shard with one bit flipped (the same size) loaded as other
    optimizer moments and the resume went on from it, silently. Checked now: that checkpoint is skipped as damaged."""
    import struct
    run = str(tmp_path)
    for step in (1, 2):
        fake_checkpoint(run, step)
    path = ckpt.train_shard_path(run, 2, 0)
    data = bytearray(open(path, "rb").read())
    at = data.index(struct.pack("<2f", 2.0, 2.0))  # the exp_avg tensor's bytes
    data[at] ^= 1
    open(path, "wb").write(data)
    import torch
    assert float(torch.load(path, weights_only=True)["exp_avg"][0]) != 2.0  # (torch.load alone takes it)
    step, _, _, shard = ckpt.resume_checkpoint(run, resume=True)
    assert step == 1 and float(shard["exp_avg"][0]) == 1.0
    out = capsys.readouterr().out
    assert f"skipping the checkpoint of step 2: cannot read {path}: its record " in out
    assert "fails its CRC check (the file changed on the disk)" in out


def test_the_code_stamp_leaves_out_what_it_cannot_read(tmp_path):
    """An editor's lock beside a file being edited (Emacs: ".#train_rl.py", a link to nothing), a directory named like
    a module or a file without read permission stopped every training run at its start with a traceback; the stamp
    serves a note, so they are left out."""
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    os.symlink("user@host.123:456", tmp_path / ".#a.py")
    (tmp_path / "pkg.py").mkdir()
    secret = tmp_path / "secret.py"
    secret.write_text("y = 2\n")
    secret.chmod(0)
    try:
        readable = os.access(secret, os.R_OK)  # (root reads it anyway)
        stamp = ckpt.source_digests(str(tmp_path))
    finally:
        secret.chmod(0o644)
    assert sorted(stamp) == ["a.py"] + (["secret.py"] if readable else [])
    assert stamp["a.py"] == ckpt.source_digests(str(tmp_path))["a.py"] and len(stamp["a.py"]) == 16


def test_a_resume_under_edited_code_names_the_files_that_changed(tmp_path, capsys):
    """A fork edits a script and resumes: the steps after the checkpoint run other code than those before. The resume
    goes on (that is often its purpose) but says which files differ from the code that saved the checkpoint; the
    same code, a checkpoint of a version that did not record it, or a finished run say nothing."""
    import torch
    run, now = str(tmp_path), ckpt.code_stamp()
    assert "ckpt.py" in now and "train_rl.py" in now and all(len(d) == 16 for d in now.values())
    fake_checkpoint(run, 1)
    state_file = ckpt.checkpoint_dir(run, 1) + ".state.pt"
    edited = dict(now, **{"grpo.py": "0" * 16, "gone.py": "1" * 16})
    del edited["scoring.py"]
    for saved, note in ((None, False), (now, False), (edited, True)):
        torch.save({"step": 1, "world_size": 1, **({} if saved is None else {"code": saved})}, state_file)
        capsys.readouterr()
        assert ckpt.resume_checkpoint(run, resume=True)[0] == 1
        out = capsys.readouterr().out
        assert ("the code changed since step 1 was saved: gone.py (removed), grpo.py (edited), scoring.py (new); what "
                "the resume computes runs the code as it is now") in out if note else "code changed" not in out
    ckpt.resume_checkpoint(run, resume=True, needs_shard=lambda state: False)  # finished: nothing runs the new code
    assert "code changed" not in capsys.readouterr().out


@pytest.mark.parametrize("size", [4_000, 16_000, 200_000])
def test_a_state_file_that_lost_its_tail_is_damage_not_a_read_error(tmp_path, size):
    """torch.load of a file of a few KiB cut short fails with OSError EINVAL (it seeks past the end), which was
    taken for the storage's error: redistill_sft's 16 KB state file (its RNG states) stopped every resume, asking
    to run again "when the storage reads", where the checkpoint should be skipped."""
    import torch
    path = str(tmp_path / "step_000004.state.pt")
    torch.save({"step": 4, "rng": torch.zeros(size // 4, dtype=torch.uint8)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(Exception) as failed:
        torch.load(path, weights_only=True)
    assert not ckpt.read_failure(failed.value), repr(failed.value)


def test_a_read_error_is_not_taken_for_a_damaged_checkpoint(tmp_path, monkeypatch):
    """A read that fails for the storage's or the host's sake says nothing of the file: the resume stops naming it,
    and skips and removes nothing (taken for damage, the newest good checkpoint was deleted and its steps trained
    again). Each way such a failure reaches load_checkpoint: the storage's I/O error or no memory from torch.load,
    torch's CPU allocator's own error, a refused open of the weights (which safetensors reports as a missing file)
    and an I/O error on a shard index (which read_json turns into a UserError). A damaged file is still skipped (the
    test above), and so is a missing one or a directory where a file should be."""
    import builtins
    import errno
    import json
    import torch
    run = str(tmp_path)
    for step in (1, 2):
        fake_checkpoint(run, step)
    weights = os.path.join(ckpt.checkpoint_dir(run, 2), "model.safetensors")
    index = os.path.join(ckpt.checkpoint_dir(run, 2), "model.safetensors.index.json")
    real_load, real_open = torch.load, builtins.open
    state = ckpt.checkpoint_dir(run, 2) + ".state.pt"
    failures = [("load", state, OSError(errno.EIO, "Input/output error")), ("load", state, MemoryError()),
                ("load", ckpt.train_shard_path(run, 2, 0), RuntimeError(
                    "[enforce fail at alloc_cpu.cpp:127] . DefaultCPUAllocator: can't allocate memory: you tried to "
                    "allocate 209715200 bytes. Error code 12 (Cannot allocate memory)")),
                ("open", weights, PermissionError(errno.EACCES, "Permission denied")),
                ("open", index, OSError(errno.EIO, "Input/output error"))]
    for how, path, error in failures:
        if path == index:  # step 2 saved as a sharded checkpoint: its index names its one shard
            with open(index, "w") as f:
                json.dump({"weight_map": {"w": "model.safetensors"}}, f)

        def failing(real, *args, **kwargs):
            if args[0] == path:
                raise error
            return real(*args, **kwargs)
        monkeypatch.setattr(torch, "load", lambda *a, **k: failing(real_load, *a, **k) if how == "load"
                            else real_load(*a, **k))
        monkeypatch.setattr(builtins, "open", lambda *a, **k: failing(real_open, *a, **k) if how == "open"
                            else real_open(*a, **k))
        with pytest.raises(UserError, match=rf"{re.escape(path)}: .*\(a read error, not a damaged file\): no "
                                            r"checkpoint was skipped or removed"):
            ckpt.resume_checkpoint(run, resume=True)
        monkeypatch.undo()
        assert ckpt.checkpoint_parts(run) == {1, 2}, error
    assert ckpt.resume_checkpoint(run, resume=True)[0] == 2  # the storage reads again: the newest, as ever
    assert not any(ckpt.read_failure(e(errno.ENOENT, "no")) for e in (FileNotFoundError, IsADirectoryError))


def test_a_second_run_on_a_locked_run_directory_is_refused(tmp_path):
    """Rank 0 of a run holds its directory's lock until it ends, however it ends: another process starting a run
    there (a second terminal, a re-run beside a killed torchrun's surviving workers) is refused before it writes."""
    import subprocess
    import sys
    from conftest import ROOT, subprocess_env
    run = str(tmp_path / "run")
    ckpt.resume_checkpoint(run, resume=False)  # a fresh directory: nothing made before the first write
    assert not os.path.exists(run)
    ckpt.metrics_log(run, 0)  # the first write: this process holds the lock now
    ckpt.resume_checkpoint(run, resume=True)  # and takes it again (a resumed main() in one process)
    other = [sys.executable, "-c", f"import ckpt; ckpt.resume_checkpoint({run!r}, resume=True)"]
    proc = subprocess.run(other, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=60)
    assert proc.returncode != 0 and f"{run}: another run is using this directory (pid {os.getpid()} on" in proc.stderr
    common._LOCKS.pop(os.path.realpath(os.path.join(run, ".lock"))).close()  # the run ends: the lock goes with it
    proc = subprocess.run(other, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_run_whose_directory_was_moved_or_removed_stops_before_writing_there(tmp_path):
    """`mv` or `rm -rf` of a live run's directory and a re-run of the same command (the usual restart): the re-run
    locked a new .lock, and the old run's next write (atomic_open makes the folders again) landed among its files:
    two runs' steps interleaved in one metrics.jsonl, and their checkpoints overwrote and pruned each other. The old
    run stops at its next write, and writes nothing there."""
    run, old = str(tmp_path / "run"), str(tmp_path / "old")
    log = ckpt.metrics_log(run, 0)
    log({"step": 1})
    os.rename(run, old)  # moved aside, and a re-run there holds its own lock
    os.makedirs(run)
    open(os.path.join(run, ".lock"), "w").close()
    with pytest.raises(common.UserError, match=r"run: removed or moved away while this run used it \(.*\.lock is "
                                               r"another run's\); stopping before writing there"):
        log({"step": 2})
    assert os.listdir(run) == [".lock"] and common.read_jsonl(os.path.join(old, "metrics.jsonl")) == [{"step": 1}]
    gone = str(tmp_path / "gone")
    ckpt.metrics_log(gone, 0)
    shutil.rmtree(gone)  # rm -rf
    with pytest.raises(common.UserError, match=r"\.lock is gone\)"):  # save_checkpoint asks before it writes
        ckpt.save_checkpoint(gone, 1, None, None, None, {}, None, 1)
    assert not os.path.exists(gone)


def test_a_run_moved_away_during_its_save_neither_finishes_the_save_nor_prunes_there(tiny_checkpoint, tmp_path,
                                                                                     monkeypatch):
    """A save takes minutes at the paper's sizes: moved away (and a re-run there with steps 1-3) while the weights
    were written, the old run wrote its step's state there and its prune removed the re-run's checkpoints. It
    stops before the state file: what it wrote is a partial save, which a resume removes."""
    import torch
    from model import load_model
    from tasks import load_tokenizer
    run = str(tmp_path / "run")
    ckpt.metrics_log(run, 0)
    model = load_model(tiny_checkpoint)
    real = ckpt.save_model

    def moved_during_the_save(*a, **k):
        os.rename(run, run + ".moved")
        os.makedirs(run)
        open(os.path.join(run, ".lock"), "w").close()
        for s in (1, 2, 3):
            fake_checkpoint(run, s)
        return real(*a, **k)
    monkeypatch.setattr(ckpt, "save_model", moved_during_the_save)
    with pytest.raises(UserError, match="removed or moved away while this run used it"):
        ckpt.save_checkpoint(run, 5, model, load_tokenizer(tiny_checkpoint),
                             ckpt.make_optimizer(model.parameters(), lr=1e-3), {}, torch.float32, 1)
    assert ckpt.checkpoint_steps(run) == [1, 2, 3]


def test_a_save_killed_before_its_state_file_leaves_nothing_a_later_run_takes_for_its_own(tiny_checkpoint, tmp_path,
                                                                                          monkeypatch, capsys):
    """save_checkpoint marks a save under way until its state file is written. Killed before that, its weights
    (renamed into place first) stayed: a prune took them for weights kept by an earlier prune, and a fresh run there
    for its own (--keep_steps). The next start, fresh or resumed, removes what the marked save left; one killed after
    its state file keeps its checkpoint, and weights kept by a prune (no mark) stay."""
    import torch
    from model import load_model
    from tasks import load_tokenizer
    run = str(tmp_path / "run")
    ckpt.metrics_log(run, 0)
    model, tokenizer = load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint)
    optimizer = ckpt.make_optimizer(model.parameters(), lr=1e-3)
    ckpt.save_checkpoint(run, 1, model, tokenizer, optimizer, {}, torch.float32, 1)
    assert sorted(os.listdir(run)) == [".lock", "step_000001", "step_000001.state.pt", "step_000001.train.rank0.pt"]
    # (a save that ends leaves no mark)

    class Killed(Exception):
        pass

    def killed(*a, **k):
        raise Killed()
    with monkeypatch.context() as m:
        m.setattr(ckpt, "local_train_state", killed)  # after its weights, before its shard and state file
        with pytest.raises(Killed):
            ckpt.save_checkpoint(run, 2, model, tokenizer, optimizer, {}, torch.float32, 1)
    assert {"step_000002", "step_000002.saving"} <= set(os.listdir(run)) and ckpt.checkpoint_steps(run) == [1]
    fake_checkpoint(run, 3)  # killed after its state file: complete, its mark left
    open(os.path.join(run, "step_000003.saving"), "w").close()
    os.remove(ckpt.train_shard_path(run, 1, 0))  # step 1: its weights alone, as a prune keeps them
    os.remove(ckpt.checkpoint_dir(run, 1) + ".state.pt")
    capsys.readouterr()
    assert ckpt.resume_checkpoint(run, resume=True)[0] == 3
    assert "removed what an interrupted save left" in capsys.readouterr().out
    assert sorted(f for f in os.listdir(run) if f.startswith("step_")) == [
        "step_000001", "step_000003", "step_000003.state.pt", "step_000003.train.rank0.pt"]


def test_a_fresh_run_does_not_take_over_a_directory_another_run_saved_into_meanwhile(tmp_path):
    """A fresh run looks for checkpoints before it holds the lock of a directory that does not exist yet; a run that
    saved there in between and ended had its metrics emptied, its rollouts removed and its settings overwritten, and
    the fresh run's own checkpoints were then pruned as older than the other's. Refused, with nothing changed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "step_000006.state.pt").write_bytes(b"x")
    (run / "metrics.jsonl").write_text('{"step": 6}\n')
    (run / "settings.json").write_text("{}")
    with pytest.raises(common.UserError, match=r"another run saved checkpoints there \(newest step 6\) while this "
                                               r"one was starting; nothing was changed"):
        ckpt.metrics_log(str(run), 0, settings={"seed": 7})
    assert (run / "metrics.jsonl").read_text() == '{"step": 6}\n' and (run / "settings.json").read_text() == "{}"
    ckpt.metrics_log(str(run), 6, settings={"seed": 7})  # (a resume from that step goes on)


LOCKED_SCRIPT = '''
import sys
import ckpt, common, parallel

def main():
    parallel.dist_setup()
    ckpt.resume_checkpoint(sys.argv[1], resume=True)

common.run_main(main)
'''


@pytest.mark.torchrun
def test_every_rank_stops_on_a_locked_run_directory(tmp_path):
    """Only rank 0 takes the lock, but a refusal is every rank's error: the others leave no collective hanging (a
    gloo traceback after the one line)."""
    import subprocess
    import sys
    from conftest import free_port, subprocess_env
    run = str(tmp_path / "run")
    ckpt.metrics_log(run, 0)  # this process holds the lock
    script = tmp_path / "locked.py"
    script.write_text(LOCKED_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), str(script), run], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("another run is using this directory") == 2, proc.stderr[-3000:]  # from each rank
    assert "[rank1]" not in proc.stderr and "Connection reset" not in proc.stderr, proc.stderr[-3000:]
    common._LOCKS.pop(os.path.realpath(os.path.join(run, ".lock"))).close()


def test_steps_from_a_million_on_are_read_and_pruned_as_the_others(tmp_path):
    """checkpoint_dir writes 7 digits from step 1,000,000; a fixed 6-digit slice read step_1000000 as step 100000."""
    run = str(tmp_path)
    for step in (999_999, 1_000_000):
        open(ckpt.checkpoint_dir(run, step) + ".state.pt", "w").close()
    assert ckpt.checkpoint_steps(run) == [999_999, 1_000_000]
    assert ckpt.checkpoint_parts(run) == {999_999, 1_000_000}
