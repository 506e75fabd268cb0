"""eval.py: deterministic greedy runs (the same samples and summary as scoring.generate_and_score in-process),
sampled metrics, torchrun = 1 process, errors. (pass@k, summaries and tables: test_scoring.py.)"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import common
import eval as ev
import scoring
import toy_task
from conftest import ROOT, free_port, lock_held_elsewhere, refuse_different_data, subprocess_env
from model import load_model
from tasks import load_tokenizer

FAST = ["--task", "toy_task", "--max_response_tokens", "12", "--gen_batch_size", "16", "--progress", "false"]


def read(path):
    with open(path, "rb") as f:
        return f.read()


# -----------------------------------------------------------------------------
# end to end on the tiny checkpoint


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("eval_data") / "toy_test.jsonl")
    records = (toy_task.make_records(5, seed=1, split="easy")
               + toy_task.make_records(5, seed=2, split="hard", max_value=99))
    assert {r["level"] for r in records} == {1, 2}
    common.write_jsonl(path, records[::2] + records[1::2])  # levels interleaved
    return path


@pytest.fixture(scope="module")
def greedy_run(tiny_checkpoint, split, tmp_path_factory):
    """One greedy single-process evaluation (two checkpoint names for the same weights)."""
    out = str(tmp_path_factory.mktemp("eval_greedy"))
    ev.main(["--checkpoints", tiny_checkpoint, tiny_checkpoint, "--names", "base", "again",
             "--splits", split, "--out_dir", out] + FAST)
    return out


def test_generations_kept_buffers_are_freed_when_the_run_ends(tiny_checkpoint, split, tmp_path):
    """eval.main kept the engine's weight copy and KV cache after it returned (at the paper's shape ~12 GB of GPU
    memory), hidden from a next stage run in the same process (a notebook, a sweep), as train_rl frees them."""
    import engine
    ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", str(tmp_path / "out")] + FAST)
    assert not engine._kept


def test_a_directory_moved_away_gets_no_table_and_one_removed_is_a_fresh_start_in_the_same_process(
        tiny_checkpoint, split, tmp_path, monkeypatch):
    """Moved away (and a re-run there) after the last pair's check, results.md landed in the re-run's directory; a
    finished run's directory removed and eval run again in the same process (a notebook, a sweep) was refused as
    moved away, after its whole generation."""
    import shutil
    out = str(tmp_path / "out")
    args = ["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", out] + FAST
    real = ev.markdown_table

    def moved_meanwhile(rows):
        os.rename(out, out + ".moved")
        os.makedirs(out)
        open(os.path.join(out, ".lock"), "w").close()
        return real(rows)
    monkeypatch.setattr(ev, "markdown_table", moved_meanwhile)
    with pytest.raises(common.UserError, match="removed or moved away while this run used it"):
        ev.main(args)
    assert os.listdir(out) == [".lock"]
    monkeypatch.setattr(ev, "markdown_table", real)
    shutil.rmtree(out)
    out = str(tmp_path / "again")
    args = ["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", out] + FAST
    ev.main(args)
    shutil.rmtree(out)  # start over, in this process
    ev.main(args)
    assert os.path.exists(os.path.join(out, "results.md"))


def test_the_ranks_check_together_that_they_read_the_same_splits(tiny_checkpoint, split, tmp_path, monkeypatch):
    """Each rank reads the splits itself: their digests go to parallel.same_on_every_rank (it refuses, on every rank,
    splits written again between two ranks' reads) before any pair is generated or written."""
    seen = refuse_different_data(monkeypatch)
    with pytest.raises(common.UserError, match="the ranks read different data"):
        ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", str(tmp_path / "out")] + FAST)
    assert seen == [({split: common.data_digest(toy_task.load_split(split))}, split)]
    assert not (tmp_path / "out").exists()


def test_greedy_outputs_and_determinism(greedy_run, tiny_checkpoint, split, tmp_path, capsys):
    pair = os.path.join(greedy_run, "base", "toy_test")
    samples = common.read_jsonl(os.path.join(pair, "samples.jsonl"))
    records = toy_task.load_split(split)
    assert [s["id"] for s in samples] == [r["id"] for r in records]  # record order, one greedy sample each
    assert set(samples[0]) == {"id", "difficulty", "sample", "response", "reward", "finished", "length"}
    assert all(s["difficulty"] == r["level"] and s["sample"] == 0 for s, r in zip(samples, records))
    assert all(s["reward"] == toy_task.score(s["response"], r, s["finished"]) for s, r in zip(samples, records))
    assert all(s["finished"] or s["length"] == 12 for s in samples)
    with open(os.path.join(pair, "summary.json")) as f:
        summary = json.load(f)
    assert summary["n"] == 1 and summary["pass_k"] == [1] and list(summary["by_difficulty"]) == ["1", "2"]
    assert summary == {**summary, **scoring.summarize(samples, records, "level", [1])}
    # the importable helper (validation inside training) gives the same samples and summary in-process
    from model import load_model
    from tasks import load_tokenizer
    got, got_summary = scoring.generate_and_score(load_model(tiny_checkpoint), load_tokenizer(tiny_checkpoint),
                                                  toy_task, records, max_new_tokens=12, batch_size=16, progress=False)
    assert got == samples and got_summary == scoring.summarize(samples, records, "level")
    results = read(os.path.join(greedy_run, "results.md")).decode()
    assert "| checkpoint | level 1 | level 2 | overall | mean len | truncated |" in results
    assert "\n| base |" in results and "\n| again |" in results
    # the same greedy run elsewhere: byte-identical files (the two names hold the same weights: same samples)
    out2 = str(tmp_path / "out2")
    ev.main(["--checkpoints", tiny_checkpoint, tiny_checkpoint, "--names", "base", "again",
             "--splits", split, "--out_dir", out2] + FAST)
    for rel in ("base/toy_test/samples.jsonl", "base/toy_test/summary.json", "results.md"):
        assert read(os.path.join(out2, rel)) == read(os.path.join(greedy_run, rel)), rel
    assert read(os.path.join(out2, "again/toy_test/samples.jsonl")) == read(os.path.join(pair, "samples.jsonl"))
    # a re-run skips the done pairs; another pass_k recomputes the summary from samples.jsonl without generating
    capsys.readouterr()
    ev.main(["--checkpoints", tiny_checkpoint, "--names", "base", "--splits", split, "--out_dir", out2,
             "--pass_k", "1", "2"] + FAST)
    log = capsys.readouterr().out
    assert "skipped" in log and "loaded" not in log
    # a checkpoint rebuilt under the same path (a re-run stage): the pair is evaluated again, not reused
    import shutil
    ckpt = shutil.copytree(tiny_checkpoint, str(tmp_path / "ckpt"))
    args = ["--checkpoints", ckpt, "--names", "c", "--splits", split, "--out_dir", out2] + FAST
    ev.main(args)
    os.utime(os.path.join(ckpt, "model.safetensors"), ns=(1, 1))
    capsys.readouterr()
    ev.main(args)
    log = capsys.readouterr().out
    assert "changed since (model.safetensors); evaluating again" in log and "loaded" in log
    # a split edited in place, its size and time as before (as a directory of problem files shows an edit of one):
    # its records decide, not the file's stamps; the same records under a new time are the same pair
    edited = shutil.copy(split, str(tmp_path / "edited.jsonl"))
    args = ["--checkpoints", tiny_checkpoint, "--names", "e", "--splits", edited, "--out_dir", out2] + FAST
    ev.main(args)
    stat, text = os.stat(edited), read(edited)
    first = text.index(b"?")  # one digit of the first question changed: same size
    digit = text[first - 1:first]
    with open(edited, "wb") as f:
        f.write(text[:first - 1] + (b"1" if digit != b"1" else b"2") + text[first:])
    os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(edited) == stat.st_size and os.stat(edited).st_mtime_ns == stat.st_mtime_ns
    capsys.readouterr()
    ev.main(args)
    log = capsys.readouterr().out
    # (a question of the split changed: its prompt too)
    assert "changed since (prompts as rendered (sha256), split records (sha256)); evaluating again" in log
    assert "loaded" in log
    os.utime(edited, ns=(1, 1))
    ev.main(args)
    log = capsys.readouterr().out
    assert "skipped" in log and "loaded" not in log
    ev.main(args + ["--seed", "3", "--top_p", "0.9"])  # greedy reads neither: the same pair, done
    log = capsys.readouterr().out
    assert "skipped" in log and "loaded" not in log
    # a re-run with other generation settings refuses, unless --overwrite
    with pytest.raises(common.UserError, match="other settings.*max_response_tokens"):
        ev.main(["--checkpoints", tiny_checkpoint, "--names", "base", "--splits", split, "--out_dir", out2]
                + FAST + ["--max_response_tokens", "8"])
    ev.main(["--checkpoints", tiny_checkpoint, "--names", "base", "--splits", split, "--out_dir", out2,
             "--overwrite", "true"] + FAST + ["--max_response_tokens", "8"])
    summary_path = os.path.join(out2, "again/toy_test/summary.json")
    summary = common.read_json(summary_path)
    # the batch shape it was generated in (in bf16 it can flip a greedy near-tie), recorded, not reuse-deciding
    assert (summary["settings"]["world_size"], summary["settings"]["gen_batch_size"]) == (1, 16)
    # a damaged earlier result: a clear message, not a traceback
    for damage in ('{"checkpoint": ', b'{"checkpoint": "\xff"}', json.dumps({**summary, "settings": []}),
                   json.dumps({k: v for k, v in summary.items() if k != "settings"}),
                   json.dumps({**summary, "settings": {**summary["settings"], "inputs": "x"}}),
                   json.dumps({k: v for k, v in summary.items() if k != "overall"}),
                   json.dumps({**summary, "overall": {**summary["overall"], "accuracy": "0.5"}})):
        with open(summary_path, "wb") as f:
            f.write(damage if isinstance(damage, bytes) else damage.encode())
        with pytest.raises(common.UserError, match=r"cannot read this earlier result: .*summary\.json: "):
            ev.main(["--checkpoints", tiny_checkpoint, "--names", "again", "--splits", split, "--out_dir", out2]
                    + FAST)
    assert all(s["length"] <= 8 for s in common.read_jsonl(os.path.join(out2, "base/toy_test/samples.jsonl")))


def test_an_earlier_versions_summary_is_reused_while_its_split_is_unchanged(tiny_checkpoint, split, tmp_path, capsys):
    """Summaries written before the split's records were digested hold the split file's [size, time] instead: they
    are compared as such (not thrown away: a stage resumed across the upgrade would generate everything again), and
    a split file changed since is evaluated again."""
    import shutil
    own = shutil.copy(split, str(tmp_path / "split.jsonl"))
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", own, "--out_dir", str(tmp_path / "out"),
            *FAST]
    ev.main(args)
    path = tmp_path / "out" / "m" / "split" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    inputs = summary["settings"]["inputs"]
    del inputs[ev.SPLIT_DIGEST]
    inputs.update(common.file_stamps([own]))  # the earlier version's record of the split
    path.write_text(json.dumps(summary))
    capsys.readouterr()
    ev.main(args)
    assert "m on split: done before, skipped" in capsys.readouterr().out
    os.utime(own, ns=(1, 1))
    ev.main(args)
    log = capsys.readouterr().out
    assert "changed since (split.jsonl); evaluating again" in log and "loaded" in log


def test_a_reused_pairs_numbers_are_recomputed_from_its_samples(tiny_checkpoint, split, tmp_path):
    """A metric fixed in scoring.py (pass@k, accuracy, mean length) changed no stamp: the old summary's numbers were
    reused while a fresh --out_dir gave others. They are recomputed from the samples at every reuse."""
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST]
    ev.main(args)
    path = tmp_path / "out" / "m" / "toy_test" / "summary.json"
    right = json.loads(path.read_text(encoding="utf-8"))
    wrong = json.loads(json.dumps(right))
    wrong["overall"]["mean_length"] += 1.0  # as an earlier metric computed it
    path.write_text(json.dumps(wrong))
    ev.main(args)
    assert json.loads(path.read_text(encoding="utf-8")) == right
    # rewritten by a run of another batch size, the summary keeps the one its samples were generated in
    path.write_text(json.dumps(wrong))
    ev.main(args + ["--gen_batch_size", "3"])
    assert json.loads(path.read_text(encoding="utf-8")) == right and right["settings"]["gen_batch_size"] == 16


def test_a_reused_pairs_damaged_samples_are_a_line_naming_the_file(tiny_checkpoint, split, tmp_path):
    """A reused samples.jsonl with a reward of text gave a TypeError, a "finished" of "no" counted as finished, and
    a line lost gave an error that did not name the file: each is one line naming samples.jsonl (and its line) and
    saying how to evaluate the pair again, as is a samples.jsonl lost beside its summary."""
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST]
    ev.main(args)
    path = tmp_path / "out" / "m" / "toy_test" / "samples.jsonl"
    good = path.read_text(encoding="utf-8").splitlines(keepends=True)
    for field, value, message in (("reward", "1", r":2: field 'reward' is '1', expected int or float"),
                                  ("finished", "no", r":2: field 'finished' is 'no', expected bool"),
                                  ("reward", float("nan"), r":2: field 'reward' is nan, expected a finite number"),
                                  ("length", -100000, r":2: field 'length' is -100000, expected a count of tokens"),
                                  ("reward", 10 ** 400, r":2: field 'reward' is 1000+, expected a finite number")):
        path.write_text(good[0] + json.dumps({**json.loads(good[1]), field: value}) + "\n" + "".join(good[2:]))
        with pytest.raises(common.UserError, match=re.escape(str(path)) + message + ".*; pass --overwrite true"):
            ev.main(args)
    for lines, message in ((good + good[-1:], rf":{len(good) + 1}: sample 2 of id .*, where each prompt has 1"),
                           (good[:1] + [good[1].replace('"id": "', '"id": "x')] + good[2:],
                            r":2: field 'id' 'x.*' is the id of no record of the split")):
        path.write_text("".join(lines))
        with pytest.raises(common.UserError, match=re.escape(str(path)) + message + "; pass --overwrite true"):
            ev.main(args)
    path.write_text("".join(good[1:]))  # (a line lost)
    damaged = re.escape(str(path)) + ": 0 samples of id .*, where each prompt has 1; pass --overwrite true"
    with pytest.raises(common.UserError, match=damaged):
        ev.main(args)
    path.unlink()  # (the summary kept, its samples gone)
    with pytest.raises(common.UserError, match=re.escape(str(path)) + ": file not found; pass --overwrite true"):
        ev.main(args)


def test_an_earlier_versions_summary_is_recomputed_by_todays_rule(tiny_checkpoint, split, tmp_path, capsys):
    """Before tasks.is_correct, accuracy was the mean reward (and there was no mean_reward): such a summary is
    recomputed from its samples (nothing generated), so one results table never mixes the two rules."""
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST]
    ev.main(args)
    path = tmp_path / "out" / "m" / "toy_test" / "summary.json"
    fresh = json.loads(path.read_text(encoding="utf-8"))
    old = json.loads(path.read_text(encoding="utf-8"))
    for m in [old["overall"], *old["by_difficulty"].values()]:
        del m["mean_reward"]
        m["accuracy"] = 0.123  # (what a graded reward's mean could read)
    path.write_text(json.dumps(old))
    capsys.readouterr()
    ev.main(args)
    assert "loaded" not in capsys.readouterr().out  # recomputed, not generated
    assert {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k != "settings"} == {
        k: v for k, v in fresh.items() if k != "settings"}


def test_a_rebuilt_checkpoint_does_not_mark_a_pair_done(tiny_checkpoint, split, tmp_path, monkeypatch, capsys):
    """Every split of a checkpoint carries the stamps taken before its files were read: a checkpoint rebuilt at the
    path while the first split generated (a re-run stage) must leave the second pair's stamps stale too, so that the
    next run evaluates both again, not the first alone beside the old model's second row. Files that change while
    they are loaded are an error."""
    import shutil
    ckpt = shutil.copytree(tiny_checkpoint, str(tmp_path / "ckpt"))
    other = shutil.copy(split, str(tmp_path / "other.jsonl"))
    args = ["--checkpoints", ckpt, "--names", "m", "--splits", split, other, "--out_dir", str(tmp_path / "out"), *FAST]
    real, calls = ev.generate_and_score, []

    def rebuilt_after_the_first(*a, **kw):
        out = real(*a, **kw)
        if not calls:
            os.utime(os.path.join(ckpt, "config.json"), ns=(1, 1))  # the stage writes the checkpoint again
        calls.append(1)
        return out
    monkeypatch.setattr(ev, "generate_and_score", rebuilt_after_the_first)
    ev.main(args)
    monkeypatch.setattr(ev, "generate_and_score", real)
    capsys.readouterr()
    ev.main(args)
    assert capsys.readouterr().out.count("changed since (config.json); evaluating again") == 2
    import model
    real_load = model.load_model

    def written_while_loaded(*a, **kw):
        os.utime(os.path.join(ckpt, "config.json"), ns=(2, 2))
        return real_load(*a, **kw)
    monkeypatch.setattr(model, "load_model", written_while_loaded)
    with pytest.raises(common.UserError, match="its files changed while it was loaded"):
        ev.main(args + ["--overwrite", "true"])


def test_what_a_killed_runs_writes_left_is_removed(tiny_checkpoint, split, tmp_path, capsys):
    """A SIGKILL inside a write leaves its temporary file (a whole samples.jsonl): the next run removes it, holding
    out_dir's lock; another file's stays."""
    out = tmp_path / "out"
    left = [out / "m" / "toy_test" / ".tmp_samples.jsonl.k1ll3d_x", out / ".tmp_results.md.k1ll3d_x"]
    other = out / "m" / ".tmp_notes.txt.k1ll3d_x"
    for path in left + [other]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x" * 2**20)
    ev.main(["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(out), *FAST])
    assert not any(p.exists() for p in left) and other.exists()
    assert f"note: removed what a killed run's writes left in {out} (2.0 MiB)" in capsys.readouterr().out


def test_a_finished_pair_is_rescored_when_its_task_changed(tiny_checkpoint, split, tmp_path, monkeypatch, capsys):
    """A fixed scorer must change the reused results: a finished pair's samples are re-scored when the task module's
    source changed since (the responses stand; nothing is generated again), where eval showed the old accuracy."""
    import inspect
    module = tmp_path / "my_task.py"
    module.write_text(inspect.getsource(toy_task))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_task", raising=False)
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST, "--task", "my_task"]
    ev.main(args)
    pair = tmp_path / "out" / "m" / "toy_test"
    before = common.read_jsonl(str(pair / "samples.jsonl"))
    wrong = sum(s["reward"] == 0 for s in before)
    assert wrong > 0  # (a tiny model: some answers wrong, which the new scorer counts right)
    module.write_text(inspect.getsource(toy_task) + "\n\ndef score(response, record, finished):\n    return 1.0\n")
    monkeypatch.delitem(sys.modules, "my_task")
    capsys.readouterr()
    ev.main(args)
    log = capsys.readouterr().out
    assert f"the task's score changed since it was evaluated: {wrong} of {len(before)} rewards re-scored" in log
    assert "loaded" not in log  # re-scored, not generated
    after = common.read_jsonl(str(pair / "samples.jsonl"))
    assert [s["reward"] for s in after] == [1.0] * len(before)
    assert [s["response"] for s in after] == [s["response"] for s in before]
    assert json.loads((pair / "summary.json").read_text(encoding="utf-8"))["overall"]["accuracy"] == 1.0
    ev.main(args)
    assert "re-scored" not in capsys.readouterr().out  # stamped: once


def test_score_truncated_scores_a_cut_off_answer_as_the_papers_eval_did(tiny_checkpoint, split, tmp_path, monkeypatch,
                                                                        capsys):
    """--score_truncated true: the paper's verl eval appended EOS to every response before scoring, so a truncated
    response with a right answer counted; here it is a setting, off by default (a truncated answer is wrong, as in
    training). Switched on a done pair, its samples are re-scored, nothing generated; the heading says how."""
    module = tmp_path / "ended_task.py"  # right iff the response ended: what the setting turns around
    module.write_text("from toy_task import *  # noqa\n\n\ndef score(response, record, finished):\n"
                      "    return 1.0 if finished else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ended_task", raising=False)

    def run_args(out):
        return ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(out), *FAST,
                "--task", "ended_task", "--max_response_tokens", "3"]
    args = run_args(tmp_path / "out")
    ev.main(args)
    pair = tmp_path / "out" / "m" / "toy_test"
    samples = common.read_jsonl(str(pair / "samples.jsonl"))
    cut = sum(not s["finished"] for s in samples)
    assert 0 < cut and [s["reward"] for s in samples] == [float(s["finished"]) for s in samples]
    capsys.readouterr()
    ev.main(args + ["--score_truncated", "true"])
    log = capsys.readouterr().out
    assert f"--score_truncated true: {cut} of {len(samples)} rewards re-scored" in log and "loaded" not in log
    summary = json.loads((pair / "summary.json").read_text(encoding="utf-8"))
    assert summary["overall"]["accuracy"] == 1.0 and summary["overall"]["truncation_rate"] == cut / len(samples)
    assert "greedy, pass@1, truncated answers scored as ended" in (tmp_path / "out" / "results.md").read_text()
    ev.main(args)  # back: the truncated ones are wrong again
    assert f"--score_truncated false: {cut} of {len(samples)} rewards re-scored" in capsys.readouterr().out
    fresh = tmp_path / "fresh"  # generated under the setting: the same rewards as re-scored
    ev.main(run_args(fresh) + ["--score_truncated", "true"])
    assert [s["reward"] for s in common.read_jsonl(str(fresh / "m" / "toy_test" / "samples.jsonl"))] == \
        [1.0] * len(samples)


def test_a_kill_between_re_scored_samples_and_their_summary_leaves_no_summary_of_the_other_rule(
        tiny_checkpoint, split, tmp_path, monkeypatch):
    """Re-scoring rewrites samples.jsonl, then summary.json. Killed in between, the summary kept its old stamps, so a
    run of the old rule took the re-scored samples for its own and labelled them with its rule. The stamps are voided
    first now: whatever the next run's rule, it re-scores."""
    module = tmp_path / "ended_task.py"
    module.write_text("from toy_task import *  # noqa\n\n\ndef score(response, record, finished):\n"
                      "    return 1.0 if finished else 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "ended_task", raising=False)
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST, "--task", "ended_task", "--max_response_tokens", "3"]
    ev.main(args)
    pair = tmp_path / "out" / "m" / "toy_test"
    strict = [s["reward"] for s in common.read_jsonl(str(pair / "samples.jsonl"))]
    assert 0.0 in strict
    real = common.write_json

    def killed_at_the_summary(path, obj):
        if str(path).endswith("summary.json") and obj["settings"].get("score_truncated"):
            raise KeyboardInterrupt  # the re-scored summary's write
        return real(path, obj)
    with monkeypatch.context() as m:
        m.setattr(common, "write_json", killed_at_the_summary)
        with pytest.raises(KeyboardInterrupt):
            ev.main(args + ["--score_truncated", "true"])
    assert [s["reward"] for s in common.read_jsonl(str(pair / "samples.jsonl"))] == [1.0] * len(strict)
    ev.main(args)  # the old rule again: its samples are re-scored, not taken as they are
    summary = json.loads((pair / "summary.json").read_text(encoding="utf-8"))
    assert [s["reward"] for s in common.read_jsonl(str(pair / "samples.jsonl"))] == strict
    assert summary["settings"]["score_truncated"] is False and summary["overall"]["accuracy"] == sum(strict) / len(
        strict)


def test_a_prompt_changed_in_the_code_is_evaluated_again(tiny_checkpoint, split, tmp_path, monkeypatch, capsys):
    """The prompts also come from code: tasks.SYSTEM_PROMPT edited since a pair was evaluated (where the task
    module's source, the checkpoint and the split are unchanged) makes it stale; its old answers, to the old
    prompt, were reused as the new prompt's. A summary from before the prompts were digested is reused."""
    args = ["--checkpoints", tiny_checkpoint, "--names", "m", "--splits", split, "--out_dir", str(tmp_path / "out"),
            *FAST]
    ev.main(args)
    monkeypatch.setattr(ev.tasks, "SYSTEM_PROMPT", ev.tasks.SYSTEM_PROMPT + " Be brief.")
    capsys.readouterr()
    ev.main(args)
    log = capsys.readouterr().out
    assert "changed since (prompts as rendered (sha256)); evaluating again" in log and "loaded" in log
    ev.main(args)
    assert "m on toy_test: done before, skipped" in capsys.readouterr().out
    path = tmp_path / "out" / "m" / "toy_test" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    del summary["settings"]["inputs"][ev.PROMPT_DIGEST]  # an earlier version's
    summary["settings"]["max_new_tokens"] = summary["settings"].pop("max_response_tokens")  # (its earlier name)
    path.write_text(json.dumps(summary))
    monkeypatch.undo()
    ev.main(args)
    assert "m on toy_test: done before, skipped" in capsys.readouterr().out
    assert "max 12 new tokens" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")


def test_a_chat_template_fixed_in_place_is_evaluated_again(tiny_checkpoint, split, tmp_path, capsys):
    """The prompts come from the checkpoint's chat template and tokenizer: a file of them changed since a pair was
    evaluated makes it stale, as a changed weight file does; a summary from before they were recorded is reused."""
    import shutil
    ckpt_dir = shutil.copytree(tiny_checkpoint, str(tmp_path / "m"))
    args = ["--checkpoints", ckpt_dir, "--splits", split, "--out_dir", str(tmp_path / "out"), *FAST]
    ev.main(args)
    template = os.path.join(ckpt_dir, "chat_template.jinja")
    with open(template, "a") as f:
        f.write("{# fixed #}")
    capsys.readouterr()
    ev.main(args)
    log = capsys.readouterr().out
    assert "changed since (chat_template.jinja); evaluating again" in log and "loaded" in log
    path = tmp_path / "out" / "m" / "toy_test" / "summary.json"
    summary = json.loads(path.read_text(encoding="utf-8"))
    inputs = summary["settings"]["inputs"]
    assert {os.path.basename(f) for f in inputs} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    summary["settings"]["inputs"] = {f: v for f, v in inputs.items()
                                     if os.path.basename(f) not in ev.tasks.TOKENIZER_FILES}  # an earlier version's
    path.write_text(json.dumps(summary))
    ev.main(args)
    assert "m on toy_test: done before, skipped" in capsys.readouterr().out


def test_a_hub_split_done_from_one_directory_is_done_from_another(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """A hub split (hf:NAME:SPLIT) is no path: recorded as <cwd>/hf:..., a pair done from one directory was "made
    with other settings" from another, and only --overwrite (generating it all again) went on."""
    import math_data
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1), "level": 1, "subject": "Algebra",
             "unique_id": f"test/algebra/{i}.json"} for i in range(3)]
    monkeypatch.setattr(math_data, "_hub_rows",
                        lambda path: [(f"{path}: row {i}", None, r) for i, r in enumerate(rows)])
    out = str(tmp_path / "out")
    args = ["--task", "math", "--checkpoints", tiny_checkpoint, "--names", "m", "--splits", "hf:org/MATH-500:test",
            "--out_dir", out, "--max_response_tokens", "4", "--progress", "false"]
    for here in ("a", "b"):
        os.makedirs(tmp_path / here)
        monkeypatch.chdir(tmp_path / here)
        capsys.readouterr()
        ev.main(args)
    assert "m on MATH-500_test: done before, skipped" in capsys.readouterr().out
    path = os.path.join(out, "m", "MATH-500_test", "summary.json")
    summary = common.read_json(path)
    assert summary["settings"]["split_path"] == "hf:org/MATH-500:test"
    # an earlier version's summary, which recorded it as CWD/hf:...: the same split
    summary["settings"]["split_path"] = os.path.join(str(tmp_path / "a"), "hf:org/MATH-500:test")
    common.write_json(path, summary)
    ev.main(args)
    assert "m on MATH-500_test: done before, skipped" in capsys.readouterr().out


def test_every_checkpoint_is_checked_before_the_first_ones_generation(tiny_checkpoint, split, tmp_path):
    """A later checkpoint without its tokenizer or weights stopped the run when its turn came, after the earlier
    ones' generation (hours, at the paper's scale): now before any."""
    import shutil
    for missing, message in (("tokenizer", r"no-tokenizer: no tokenizer files"),
                             ("weights", r"no-weights: no model\.safetensors")):
        ckpt = shutil.copytree(tiny_checkpoint, str(tmp_path / f"no-{missing}"))
        for name in os.listdir(ckpt):
            if (name in ev.tasks.VOCABULARY_FILES) if missing == "tokenizer" else name.startswith("model."):
                os.remove(os.path.join(ckpt, name))
        out = tmp_path / f"out-{missing}"
        with pytest.raises(common.UserError, match=message):
            ev.main(["--checkpoints", tiny_checkpoint, ckpt, "--splits", split, "--out_dir", str(out), *FAST])
        assert not out.exists()
    # ... and its own tokenizer and context: its vocabulary (an id past the embedding was an IndexError traceback), its
    # chat template, its prompts' fit (each checked with the first checkpoint's tokenizer and context alone)

    def changed(name, config=None, no_template=False):
        ckpt = shutil.copytree(tiny_checkpoint, str(tmp_path / name))
        if config:
            path = os.path.join(ckpt, "config.json")
            common.write_json(path, {**common.read_json(path), **config})
        if config and "vocab_size" in config:  # the weights as config.json says (their headers are checked first)
            from safetensors.torch import load_file, save_file
            path = os.path.join(ckpt, "model.safetensors")
            save_file({k: t[:config["vocab_size"]].contiguous() if t.shape[0] == vocab else t
                       for k, t in load_file(path).items()}, path)
        if no_template:
            for file in os.listdir(ckpt):
                if file == "chat_template.jinja":
                    os.remove(os.path.join(ckpt, file))
            path = os.path.join(ckpt, "tokenizer_config.json")
            common.write_json(path, {k: v for k, v in common.read_json(path).items() if k != "chat_template"})
        return ckpt
    vocab = len(ev.tasks.load_tokenizer(tiny_checkpoint))
    for ckpt, extra, message in (
            (changed("small-vocab", {"vocab_size": vocab - 1}), [],
             rf"small-vocab: the tokenizer has {vocab} tokens > the model's vocab_size {vocab - 1}"),
            (changed("short", {"max_position_embeddings": 16}), [], r"with .*short: record id .*16-token context"),
            (changed("no-chat", no_template=True), ["--template", "chat"], r"no-chat: .*no chat template")):
        out = tmp_path / f"out-{os.path.basename(ckpt)}"
        with pytest.raises(common.UserError, match=message):
            ev.main(["--checkpoints", tiny_checkpoint, ckpt, "--splits", split, "--out_dir", str(out), *FAST, *extra])
        assert not out.exists()


def test_a_run_stopped_before_its_table_leaves_not_the_last_runs(tiny_checkpoint, split, tmp_path, monkeypatch):
    """results.md was written at the end alone: a re-run that re-evaluated a pair and then stopped left the last
    run's table beside summaries it did not show."""
    out = tmp_path / "out"
    ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", str(out), *FAST])
    assert (out / "results.md").exists()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ev, "generate_and_score", stopped)
    with pytest.raises(KeyboardInterrupt):
        ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", str(out), "--overwrite", "true",
                 *FAST])
    assert not (out / "results.md").exists()


def test_a_name_of_dots_alone_writes_inside_out_dir(capsys):
    assert ev.safe_name("..") == ev.safe_name(".") == "unnamed"  # ("--names .." wrote beside --out_dir)
    assert ev.safe_name("step.5") == "step.5" and ev.safe_name("a/b c") == "a_b_c"
    # a name given that cannot be a directory's as it is: said, not rewritten silently
    assert ev.unique_names(["x", "y"], ["a b", "ok"], "--names", "checkpoints") == ["a_b", "ok"]
    assert "note: --names 'a b' is written as 'a_b'" in capsys.readouterr().out


def test_sampled_metrics(tiny_checkpoint, split, tmp_path):
    out = str(tmp_path / "sampled")
    args = ["--checkpoints", tiny_checkpoint, "--splits", split, "--samples_per_prompt", "4", "--temperature", "1.0",
            "--top_p", "0.95", "--pass_k", "1", "2", "4", "8", "--seed", "3"] + FAST
    ev.main(args + ["--out_dir", out])
    pair = os.path.join(out, os.path.basename(tiny_checkpoint), "toy_test")
    samples = common.read_jsonl(os.path.join(pair, "samples.jsonl"))
    with open(os.path.join(pair, "summary.json")) as f:
        summary = json.load(f)
    assert len(samples) == 40 and [s["sample"] for s in samples[:4]] == [0, 1, 2, 3]
    assert summary["n"] == 4 and summary["pass_k"] == [1, 2, 4]
    o = summary["overall"]
    assert o["accuracy"] == o["pass@1"] == pytest.approx(sum(s["reward"] for s in samples) / 40, abs=1e-6)
    assert o["accuracy"] <= o["pass@2"] <= o["pass@4"]
    assert "avg@4, temperature 1, top-p 0.95" in read(os.path.join(out, "results.md")).decode()
    ev.main(args + ["--out_dir", str(tmp_path / "again")])  # seeded: reproducible at a fixed world size
    assert read(os.path.join(tmp_path, "again", os.path.basename(tiny_checkpoint), "toy_test", "samples.jsonl")) \
        == read(os.path.join(pair, "samples.jsonl"))


class Killed(Exception):
    pass


def test_a_sampled_pair_is_reused_only_under_its_generation_settings(tiny_checkpoint, split, tmp_path, capsys,
                                                                     monkeypatch):
    """A done pair (summary.json) is reused only when every setting that changes what is generated is the run's:
    each one changed without --overwrite is refused, naming it (a sampled pair made with another seed or top-p is
    other samples). Another --pass_k is not one: the summary is recomputed from samples.jsonl without loading a
    model, and records the k asked (else the next run would recompute again and again). A summary of a version from
    before inputs were recorded is reused as is; a config.json changed in place makes the pair stale, as a weight
    file does. An --overwrite run removes the old summary before it writes new samples: killed in between, the
    re-run evaluates again (the old summary would mark the new samples done). --pass_k 0 is refused."""
    import shutil
    ckpt_dir = shutil.copytree(tiny_checkpoint, str(tmp_path / "m"))
    out = str(tmp_path / "out")
    sampled = ["--samples_per_prompt", "4", "--temperature", "1.0", "--seed", "0", "--top_p", "1.0"]

    def run(*extra, checkpoint=ckpt_dir, split_path=split):
        capsys.readouterr()
        ev.main(["--checkpoints", checkpoint, "--names", "m", "--splits", split_path, "--split_names", "toy_test",
                 "--out_dir", out] + FAST + sampled + list(extra))
        return capsys.readouterr().out

    with pytest.raises(common.UserError, match="--pass_k values must be >= 1"):
        run("--pass_k", "0")
    assert "loaded" in run("--pass_k", "1")
    pair = os.path.join(out, "m", "toy_test")
    (tmp_path / "toy_task_copy.py").write_text("from toy_task import *  # noqa\n")  # the same task, another name
    monkeypatch.syspath_prepend(str(tmp_path))
    changed = {"task": ["--task", "toy_task_copy"], "checkpoint_path": {"checkpoint": tiny_checkpoint},
               "split_path": {"split_path": shutil.copy(split, str(tmp_path / "copy.jsonl"))},
               "samples_per_prompt": ["--samples_per_prompt", "2"], "temperature": ["--temperature", "0.5"],
               "top_p": ["--top_p", "0.9"], "max_response_tokens": ["--max_response_tokens", "8"],
               "template": ["--template", "plain"], "dtype": ["--dtype", "float64"], "seed": ["--seed", "1"]}
    assert set(changed) == set(ev.GENERATION_SETTINGS)
    for key, change in changed.items():
        extra, where = (change, {}) if isinstance(change, list) else ([], change)
        with pytest.raises(common.UserError, match=rf"summary\.json was made with other settings \({key}="):
            run("--pass_k", "1", *extra, **where)
    # the same checkpoint and split spelled otherwise (through a link, relative): the same pair, done
    os.symlink(tmp_path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    log = run("--pass_k", "1", checkpoint=str(tmp_path / "link" / "m"), split_path=os.path.relpath(split))
    assert "done before, skipped" in log and "loaded" not in log
    # another --pass_k: recomputed from the samples, no model loaded, the k asked recorded
    log = run("--pass_k", "1", "2", "4")
    assert "done before, skipped" in log and "loaded" not in log
    samples, summary = common.read_jsonl(os.path.join(pair, "samples.jsonl")), common.read_json(
        os.path.join(pair, "summary.json"))
    assert summary["pass_k"] == [1, 2, 4] and summary["settings"]["pass_k_asked"] == [1, 2, 4]
    want = scoring.summarize(samples, toy_task.load_split(split), "level", [1, 2, 4])
    assert summary["overall"]["pass@4"] == want["overall"]["pass@4"] and summary == {**summary, **want}
    # every prompt's samples cut alike (a hand edit, a partial copy): once reused as avg@2 under the heading avg@4
    samples_path = os.path.join(pair, "samples.jsonl")
    common.write_jsonl(samples_path, [r for r in samples if r["sample"] < 2])
    with pytest.raises(common.UserError, match=r"samples\.jsonl: 2 samples of id .*, where each prompt has 4; pass "
                                               r"--overwrite true"):
        run("--pass_k", "1", "2", "4")
    common.write_jsonl(samples_path, samples)
    # an earlier version's summary, without the inputs: reused
    del summary["settings"]["inputs"]
    common.write_json(os.path.join(pair, "summary.json"), summary)
    log = run("--pass_k", "1", "2", "4")
    assert "done before, skipped" in log and "loaded" not in log
    common.write_json(os.path.join(pair, "summary.json"), {**summary, "settings": {
        **summary["settings"], "inputs": ev.inputs_of(ckpt_dir, common.data_digest(toy_task.load_split(split)))}})
    assert "loaded" not in run("--pass_k", "1", "2", "4")
    os.utime(os.path.join(ckpt_dir, "config.json"), ns=(1, 1))  # the config edited in place
    log = run("--pass_k", "1", "2", "4")
    assert "changed since (config.json); evaluating again" in log and "loaded" in log
    # --overwrite killed after writing the new samples, before their summary: the pair is not done
    real = common.write_json

    def dies_before_the_summary(path, *args, **kwargs):
        if os.path.basename(path) == "summary.json":
            raise Killed()
        return real(path, *args, **kwargs)
    monkeypatch.setattr(common, "write_json", dies_before_the_summary)
    with pytest.raises(Killed):
        run("--pass_k", "1", "2", "4", "--overwrite", "true")
    monkeypatch.setattr(common, "write_json", real)
    assert not os.path.exists(os.path.join(pair, "summary.json"))
    assert "loaded" in run("--pass_k", "1", "2", "4")


@pytest.mark.torchrun
def test_torchrun_two_processes_equal_one(greedy_run, tiny_checkpoint, split, tmp_path):
    port = free_port()
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port),
           os.path.join(ROOT, "eval.py"), "--checkpoints", tiny_checkpoint, tiny_checkpoint,
           "--names", "base", "again", "--splits", split, "--out_dir", out] + FAST
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2 rank(s))" in proc.stdout
    for rel in ("base/toy_test/samples.jsonl", "base/toy_test/summary.json", "again/toy_test/summary.json",
                "results.md"):
        assert_same_result(os.path.join(out, rel), os.path.join(greedy_run, rel))


def assert_same_result(at_2_ranks, at_1_rank):
    """The same file at 2 ranks as at 1 (a summary: but for the world size it records)."""
    if at_1_rank.endswith("summary.json"):
        two, one = common.read_json(at_2_ranks), common.read_json(at_1_rank)
        assert (two["settings"].pop("world_size"), one["settings"].pop("world_size")) == (2, 1)
        assert two == one, at_1_rank
    else:
        assert read(at_2_ranks) == read(at_1_rank), at_1_rank


@pytest.mark.torchrun
def test_torchrun_with_fewer_records_than_ranks(tiny_checkpoint, split, tmp_path):
    """One record on two ranks: rank 1's share is empty, it samples nothing, and the result is one process's."""
    one = str(tmp_path / "one.jsonl")
    common.write_jsonl(one, common.read_jsonl(split)[:1])
    args = ["--checkpoints", tiny_checkpoint, "--names", "base", "--splits", one] + FAST
    ev.main(args + ["--out_dir", str(tmp_path / "alone")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "eval.py"), *args, "--out_dir", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rel in ("base/one/samples.jsonl", "base/one/summary.json"):
        assert_same_result(str(tmp_path / "ddp" / rel), str(tmp_path / "alone" / rel))


@pytest.mark.torchrun
def test_torchrun_a_write_refused_on_rank_0_stops_every_rank_with_its_line(tiny_checkpoint, split, tmp_path):
    """Rank 0 alone writes a pair's files: on a full disk it stopped with its line, and rank 1 went on into the next
    collective, to die there with the backend's traceback or torchrun's SIGTERM. Every rank now stops with it."""
    (tmp_path / "full_disk.py").write_text(
        "import errno, common, eval\n"
        "def full(path, records):\n"
        "    common.raise_refused_write(path, OSError(errno.ENOSPC, 'No space left on device'), 'nothing written')\n"
        "common.write_jsonl = full\n"
        "common.run_main(eval.main)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           str(tmp_path / "full_disk.py"), "--checkpoints", tiny_checkpoint, "--names", "base", "--splits", split,
           "--out_dir", str(tmp_path / "ddp")] + FAST
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("samples.jsonl: cannot write it (No space left on device)") == 2, proc.stderr[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: 2 ", proc.stderr), proc.stderr[-3000:]  # its own
    assert "eval.py\", line" not in proc.stderr  # no worker's traceback (torchrun's own launcher prints one)


@pytest.mark.torchrun
def test_torchrun_a_score_failing_on_one_ranks_share_stops_every_rank_with_its_line(tiny_checkpoint, split, tmp_path):
    """A task's score that fails for one response (a fork's bug, past the load-time check of an empty response): the
    rank that generated it stopped, and the other died in the gather after its generation with a backend's
    traceback. The other rank now stops with the first one's line."""
    import json as json_
    first = json_.loads(open(split).readline())["id"]  # (record 0: rank 0's share; rank 1 scores records 1, 3, ...)
    second = [json_.loads(line)["id"] for line in open(split)][1]
    (tmp_path / "picky_task.py").write_text(  # (its first call for a record: the split's check as it loads)
        "from toy_task import *\n"
        "import toy_task\n"
        "calls = {}\n"
        "def score(response, record, finished):\n"
        "    calls[record['id']] = calls.get(record['id'], 0) + 1\n"
        f"    if record['id'] == {second!r} and calls[record['id']] > 1:\n"
        "        raise ValueError('cannot read ' + record['id'])\n"
        "    return toy_task.score(response, record, finished)\n")
    args = [a for a in FAST if a != "toy_task"]
    args[args.index("--task") + 1:args.index("--task") + 1] = ["picky_task"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "eval.py"), "--checkpoints", tiny_checkpoint, "--names", "base", "--splits", split,
           "--out_dir", str(tmp_path / "ddp"), *args]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(tmp_path), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode != 0 and first != second
    assert f"error: rank 1 stopped: ValueError: cannot read {second}" in proc.stderr, proc.stderr[-3000:]
    assert "Connection reset" not in proc.stderr and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert not (tmp_path / "ddp" / "base").exists()


# -----------------------------------------------------------------------------
# errors: one clear line


def test_error_cases(tiny_checkpoint, split, tmp_path, monkeypatch):
    def run(*extra, checkpoints=(tiny_checkpoint,), splits=(split,)):
        ev.main(["--checkpoints", *checkpoints, "--splits", *splits, "--out_dir", str(tmp_path / "out")]
                + FAST + list(extra))

    with pytest.raises(common.UserError, match="checkpoint .*nowhere: no such directory"):
        run(checkpoints=(str(tmp_path / "nowhere"),))
    os.makedirs(tmp_path / "not_a_ckpt")
    with pytest.raises(common.UserError, match="no config.json"):
        run(checkpoints=(str(tmp_path / "not_a_ckpt"),))
    with pytest.raises(common.UserError, match="missing.jsonl: file not found"):
        run(splits=(str(tmp_path / "missing.jsonl"),))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(common.UserError, match="empty.jsonl: no records"):
        run(splits=(str(empty),))
    # a split of another task (K&K-shaped records): the task's loader names the missing field
    kk_like = tmp_path / "kk_test.jsonl"
    common.write_jsonl(str(kk_like), [{"id": "kk-1", "people": 3, "quiz": "A says ...", "names": ["A", "B", "C"],
                                       "solution": [True, False, True]}])
    with pytest.raises(common.UserError, match=r"kk_test.jsonl:1: missing field .*split of task 'toy_task'"):
        run(splits=(str(kk_like),))
    # a lenient loader: the difficulty key, then the fields render/score need, are checked before generating
    monkeypatch.setattr(toy_task, "load_split", lambda path: common.read_jsonl(path))
    with pytest.raises(common.UserError, match=r"kk_test\.jsonl:1 .*missing difficulty field 'level'.*another task"):
        run(splits=(str(kk_like),))
    common.write_jsonl(str(kk_like), [{"id": "kk-1", "level": 3, "quiz": "A says ..."}])
    with pytest.raises(common.UserError, match="cannot render or score it .*KeyError.*another task"):
        run(splits=(str(kk_like),))
    monkeypatch.undo()
    with pytest.raises(common.UserError, match="share the name"):
        run(checkpoints=(tiny_checkpoint, tiny_checkpoint))
    with pytest.raises(common.UserError, match="--names has 1 name"):
        run("--names", "a", checkpoints=(tiny_checkpoint, tiny_checkpoint))
    with pytest.raises(common.UserError, match="greedy"):
        run("--samples_per_prompt", "4")
    with pytest.raises(common.UserError, match="unknown task"):
        run("--task", "no_such_task_module")
    with pytest.raises(common.UserError, match="context"):
        run("--max_response_tokens", "100000")
    # a checkpoint or a training run's directory as --out_dir: pair folders beside (or inside) its checkpoints
    import shutil
    shutil.copytree(tiny_checkpoint, tmp_path / "run" / "step_000002")
    step = str(tmp_path / "run" / "step_000002")
    for out_dir, message in ((tiny_checkpoint, r"is the checkpoint"), (step + "/eval", r"is in the checkpoint"),
                             (str(tmp_path / "run"), r"--out_dir .*run: is .*run, a training run's directory \(whose "
                                                     r"pruning deletes step_N/ with what eval\.py wrote in it\)")):
        with pytest.raises(common.UserError, match=message):
            ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", out_dir] + FAST)
    assert not os.path.exists(tmp_path / "out" / "results.md")  # nothing half-written


def test_a_later_checkpoints_bad_weights_stop_the_run_before_the_first_ones_generation(tiny_checkpoint, split,
                                                                                        tmp_path):
    """A checkpoint's weights were read only when its turn came: a damaged second one (a tensor of another shape, a
    quantized export) stopped the run after the first one's generation, hours in. Their headers are read first."""
    import shutil
    from safetensors.torch import load_file, save_file
    bad = str(tmp_path / "bad")
    shutil.copytree(tiny_checkpoint, bad)
    weights = load_file(os.path.join(bad, "model.safetensors"))
    norm = weights["model.norm.weight"]
    for tensor, message in [(norm[:-1], "has shape"), (norm.to(torch.int8), "has dtype int8")]:
        save_file({**weights, "model.norm.weight": tensor}, os.path.join(bad, "model.safetensors"))
        with pytest.raises(common.UserError, match=rf"bad/model.safetensors: tensor 'model.norm.weight' {message}"):
            ev.main(["--checkpoints", tiny_checkpoint, bad, "--splits", split, "--out_dir", str(tmp_path / "out")]
                    + FAST)
        assert not os.path.exists(tmp_path / "out")  # (no generation, no lock taken)


def test_a_second_run_on_the_same_out_dir_is_refused(tiny_checkpoint, split, tmp_path):
    """Two evals writing one --out_dir could leave one run's summary.json marking the other's samples.jsonl."""
    out = str(tmp_path / "out")
    with lock_held_elsewhere(out) as pid:
        with pytest.raises(common.UserError, match=f"{out}: another run is using this directory \\(pid {pid} "):
            ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", out] + FAST)
    assert sorted(os.listdir(out)) == [".lock"]  # refused before writing anything


@pytest.mark.slow  # a subprocess that imports torch
def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--task", "toy_task",
                           "--checkpoints", str(tmp_path / "nope"), "--splits", "x.jsonl"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: checkpoint {tmp_path / 'nope'}: no such directory"]


@pytest.mark.torchrun  # its launcher with one process
def test_every_option_passes_through_torchrun(tmp_path):
    """torchrun parses the whole command line first: no option of ours may be a prefix of one of its own
    (`--n` was: "ambiguous option --n could match --nnodes ..."). Every option, then our own error line."""
    opts = {a.option_strings[0]: "1" for a in ev.get_parser()._actions if a.option_strings and a.dest != "help"}
    opts.update({"--task": "toy_task", "--checkpoints": str(tmp_path / "nope"), "--splits": "x.jsonl",
                 "--template": "auto", "--dtype": "auto", "--overwrite": "false", "--progress": "false",
                 "--out_dir": str(tmp_path / "out"), "--config": str(tmp_path / "settings.json")})
    (tmp_path / "settings.json").write_text("{}")
    argv = [x for kv in opts.items() for x in kv]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port",
                           "0", os.path.join(ROOT, "eval.py")] + argv,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert f"error: checkpoint {tmp_path / 'nope'}: no such directory" in proc.stderr, proc.stderr[-2000:]


# each generation setting reaches the generation: eval.main's samples equal scoring.generate_and_score's at the same
# settings (in-process, apart from eval.main's wiring) and differ from the defaults' (a setting dropped on its way,
# its default passed instead, fails)
GENERATION_DEFAULTS = {"n": 4, "temperature": 1.0, "top_p": 1.0, "seed": 0, "template": "auto"}


def eval_samples(ckpt, split, out, **s):
    ev.main(["--checkpoints", ckpt, "--names", "m", "--splits", split, "--split_names", "t", "--out_dir", str(out),
             "--samples_per_prompt", str(s["n"]), "--temperature", str(s["temperature"]), "--top_p", str(s["top_p"]),
             "--seed", str(s["seed"]), "--template", s["template"], "--pass_k", "1", "2"] + FAST)
    return common.read_jsonl(os.path.join(str(out), "m", "t", "samples.jsonl"))


def direct(ckpt, split, **s):
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    samples, _ = scoring.generate_and_score(model, tok, toy_task, toy_task.load_split(split), n=s["n"],
                                            temperature=s["temperature"], top_p=s["top_p"], max_new_tokens=12,
                                            seed=s["seed"], template=s["template"], batch_size=16, progress=False)
    return samples


@pytest.mark.parametrize("change", [{"temperature": 0.5}, {"top_p": 0.3}, {"seed": 7}, {"template": "plain"}])
def test_each_generation_setting_reaches_the_sampler(tiny_checkpoint, split, tmp_path, change):
    s = {**GENERATION_DEFAULTS, **change}
    got = eval_samples(tiny_checkpoint, split, tmp_path / "out", **s)
    assert got == direct(tiny_checkpoint, split, **s)
    # ... and the setting matters at all here (else the equality above proves nothing)
    default = direct(tiny_checkpoint, split, **GENERATION_DEFAULTS)
    assert [x["response"] for x in got] != [x["response"] for x in default]


def test_dtype_reaches_the_model(tiny_checkpoint, split, tmp_path, monkeypatch):
    """--dtype float64 (the exact check the docs offer) loads the model in float64, not as a label only."""
    import model as model_module
    real, seen = model_module.load_model, []

    def spy(*a, **kw):
        m = real(*a, **kw)
        seen.append(next(m.parameters()).dtype)
        return m
    monkeypatch.setattr(model_module, "load_model", spy)
    ev.main(["--checkpoints", tiny_checkpoint, "--splits", split, "--out_dir", str(tmp_path / "o"),
             "--dtype", "float64"] + FAST)
    assert seen == [torch.float64]
