"""sample_policy.py: a policy checkpoint or an RL rollout log -> re-distillation SFT set (filter, dedupe, N),
torchrun shards, the SFT file trains with redistill_sft.py, bad input -> clear errors and nothing written."""
import json
import os
import re
import subprocess
import sys

import pytest

import common
import engine
import parallel
import redistill_sft
import sample_policy as sp
import toy_task
from common import UserError
from tasks import load_tokenizer
from conftest import ROOT, free_port, lock_held_elsewhere, refuse_different_data, subprocess_env


@pytest.fixture(scope="module")
def policy(tiny_checkpoint, tmp_path_factory):
    """A tiny policy that is right on part of the toy task, by a wide margin both ways: SFT'd on teacher
    responses until greedy decoding is right on most of the 40 held-out prompts, while sampling at T = 1 is
    right on well under all of them. Measured over training seeds, library versions and CPU instruction sets:
    greedy right on 27-40 prompts; 52-68 of the 160 samples right, 37-49 distinct correct responses (the SFT
    set keeps 30). After 3 epochs it was 5-11 distinct, and fewer than 8 failed the SFT step below.
    Returns (checkpoint dir, split file of the 40 records)."""
    d = tmp_path_factory.mktemp("policy")
    tok = load_tokenizer(tiny_checkpoint)
    common.write_jsonl(d / "sft.jsonl", [{"id": r["id"], "task": "toy_task", "prompt": toy_task.render_prompt(r, tok),
                                          "response": toy_task.teacher_response(r)}
                                         for r in toy_task.make_records(400, seed=21, split="train")])
    common.write_jsonl(d / "split.jsonl", toy_task.make_records(40, seed=22, split="val"))
    redistill_sft.main(["--init_tiny", "true", "--tokenizer", tiny_checkpoint, "--tiny_hidden_size", "128",
                        "--tiny_layers", "2", "--data", str(d / "sft.jsonl"), "--out_dir", str(d / "run"),
                        "--lr", "3e-3", "--global_batch", "16", "--epochs", "8", "--loss_reduction", "token_mean",
                        "--progress", "false"])
    return str(d / "run" / "final"), str(d / "split.jsonl")


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def sample_args(ckpt, split, out, *extra):
    return ["--from_checkpoint", ckpt, "--task", "toy_task", "--split", split, "--out", out,
            "--max_response_tokens", "20", "--progress", "false", *extra]


# -----------------------------------------------------------------------------
# from a checkpoint


@pytest.mark.slow  # the policy fixture: a ~10 s SFT run
def test_from_checkpoint_the_ranks_check_together_that_they_read_the_same_split(policy, tmp_path, monkeypatch):
    """Each rank reads --split itself and samples its share: a split written again between two ranks' reads would
    merge two versions' halves into set A; every rank refuses instead (parallel.same_on_every_rank)."""
    ckpt, split = policy
    seen = refuse_different_data(monkeypatch)
    with pytest.raises(common.UserError, match="the ranks read different data"):
        sp.main(sample_args(ckpt, split, str(tmp_path / "a.jsonl")))
    assert [what for _, what in seen] == [split] and not (tmp_path / "a.jsonl").exists()


def test_a_rerun_removes_a_killed_writes_leftovers_and_a_second_run_on_the_output_is_refused(policy, tmp_path):
    """A SIGKILL inside the atomic write of --out left a whole set's size as .tmp_NAME.XXXXXXXX, and every re-run
    left it there; the re-run removes it, holding the output's lock (so no live run's write goes: a second run on
    the same output is refused). The engine's kept buffers are freed when the run ends, as train_rl frees them."""
    ckpt, split = policy
    out = tmp_path / "a.jsonl"
    (tmp_path / ".tmp_a.jsonl.k3x9_q2z").write_text("x" * 1000)
    with lock_held_elsewhere(str(tmp_path), ".a.jsonl.lock") as pid:
        with pytest.raises(UserError, match=rf"a.jsonl.lock: another run is using this output \(pid {pid} on"):
            sp.main(sample_args(ckpt, split, str(out)))
    assert (tmp_path / ".tmp_a.jsonl.k3x9_q2z").exists() and not out.exists()
    sp.main(sample_args(ckpt, split, str(out)))
    assert out.exists() and not (tmp_path / ".tmp_a.jsonl.k3x9_q2z").exists() and not engine._kept


def test_an_output_moved_away_while_sampling_is_not_written_and_bad_input_makes_no_directory(policy, tmp_path,
                                                                                             monkeypatch):
    """--out's directory moved away (and a re-run there) while the set was made: the old run's set replaced the
    re-run's. And the output lock, taken before any input was read, left a directory behind bad input."""
    ckpt, split = policy
    with pytest.raises(UserError, match="no_such_run"):
        sp.main(["--task", "toy_task", "--from_rollouts", str(tmp_path / "no_such_run"), "--steps", "1",
                 "--out", str(tmp_path / "sets" / "B.jsonl")])
    assert not (tmp_path / "sets").exists()
    sets = tmp_path / "sets"
    real = sp.select

    def moved_meanwhile(*a, **k):
        os.rename(sets, tmp_path / "sets.old")
        sets.mkdir()
        (sets / ".A.jsonl.lock").write_text("pid 1 on elsewhere\n")
        common.write_jsonl(sets / "A.jsonl", [{"the": "re-run's set"}])
        return real(*a, **k)
    monkeypatch.setattr(sp, "select", moved_meanwhile)
    with pytest.raises(UserError, match="removed or moved away while this run used it"):
        sp.main(sample_args(ckpt, split, str(sets / "A.jsonl")))
    assert common.read_jsonl(sets / "A.jsonl") == [{"the": "re-run's set"}]


def test_from_checkpoint_writes_sft_that_trains(policy, tiny_checkpoint, tmp_path, capsys):
    ckpt, split = policy
    out, everything = str(tmp_path / "redistill.jsonl"), str(tmp_path / "all.jsonl")
    sp.main(sample_args(ckpt, split, out, "--samples_per_prompt", "4", "--temperature", "1.0", "--max_per_prompt", "2",
                        "--num_examples", "30", "--samples_out", everything))
    log = capsys.readouterr().out
    samples, rows = read(everything), read(out)
    records = {r["id"]: r for r in toy_task.load_split(split)}
    tok = load_tokenizer(ckpt)

    assert len(samples) == 160
    assert {(s["id"], s["sample"]) for s in samples} == {(i, k) for i in records for k in range(4)}
    good = [s for s in samples if s["reward"] == 1.0 and s["finished"]]
    assert 0 < len(good) < len(samples), "the policy should be right sometimes, not always"
    distinct = {}  # by prompt text: the toy split holds a few prompts under two ids
    for s in good:
        if s["response"] not in distinct.setdefault(s["prompt"], []) and len(distinct[s["prompt"]]) < 2:
            distinct[s["prompt"]].append(s["response"])
    available = sum(len(v) for v in distinct.values())
    assert len(rows) == min(30, available)
    prompts = {s["prompt"] for s in samples}
    assert len(prompts) < 40  # (so the count is of prompts, not ids)
    assert f"{len(prompts) - len(distinct)} of {len(prompts)} prompts had no correct sample" in log

    per_id = {}
    for row in rows:
        assert set(row) == {"id", "task", "prompt", "response", "source", "reward", "sample"}
        assert row["task"] == "toy_task" and row["reward"] == 1.0 and row["source"] == os.path.abspath(ckpt)
        assert row["response"] in distinct[row["prompt"]]  # correct, finished, from this prompt
        per_id.setdefault(row["prompt"], []).append(row["response"])
        # the prompt is exactly what the policy saw, the response exactly what it produced (minus the stop token)
        record = records[row["id"]]
        assert row["prompt"] == toy_task.render_prompt(record, tok)
        match = [s for s in samples if s["id"] == row["id"] and s["response"] == row["response"]][0]
        assert match["tokens"][-1] == tok.eos_token_id or tok.decode(match["tokens"][-1:]) in common.STOP_TOKENS
        assert tok.decode(match["tokens"][:-1]) == row["response"]
        assert toy_task.score(row["response"], record, True) == 1.0
    assert all(len(v) == len(set(v)) <= 2 for v in per_id.values())  # deduplicated, at most 2 per prompt (text)

    # the same seed gives the same file; the SFT loop trains on it (re-distilling the base)
    again = str(tmp_path / "again.jsonl")
    sp.main(sample_args(ckpt, split, again, "--samples_per_prompt", "4", "--temperature", "1.0",
                        "--max_per_prompt", "2", "--num_examples", "30"))
    assert read(again) == rows
    redistill_sft.main(["--init", tiny_checkpoint, "--data", out, "--out_dir", str(tmp_path / "sft"), "--global_batch",
                        "8", "--epochs", "1", "--lr", "1e-3", "--progress", "false"])
    assert os.path.isfile(tmp_path / "sft" / "final" / "model.safetensors")


def test_several_splits_are_sampled_in_order_and_may_not_share_a_prompt(tiny_checkpoint, tmp_path):
    """Set A larger than the SFT split: the SFT prompts, then the RL pool's, one sample each; an id in both files
    would give one prompt twice, so it is an error naming both."""
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    common.write_jsonl(a, toy_task.make_records(5, seed=1, split="sft"))
    common.write_jsonl(b, toy_task.make_records(7, seed=2, split="train"))
    everything = str(tmp_path / "all.jsonl")
    sp.main(["--from_checkpoint", tiny_checkpoint, "--task", "toy_task", "--split", a, b, "--out",
             str(tmp_path / "out.jsonl"), "--max_response_tokens", "4", "--progress", "false", "--allow_empty", "true",
             "--samples_out", everything])
    want = [r["id"] for path in (a, b) for r in common.read_jsonl(path)]
    assert [s["id"] for s in read(everything)] == want and len(set(want)) == 12
    common.write_jsonl(b, toy_task.make_records(7, seed=1, split="sft"))  # the same ids as a.jsonl
    with pytest.raises(UserError, match=f"split {b}: id .* is also in {a}"):
        sp.main(["--from_checkpoint", tiny_checkpoint, "--task", "toy_task", "--split", a, b, "--out",
                 str(tmp_path / "out.jsonl"), "--max_response_tokens", "4", "--progress", "false"])


@pytest.mark.torchrun
def test_torchrun_ranks_sample_disjoint_shards(policy, tmp_path):
    """Two ranks, 2 samples a prompt at T = 1: each rank samples its share, the samples are merged in record then
    sample order and are what one process samples from the whole split (each record keyed by its index in it; in
    fp64, where the shares' other batch shapes cannot move a token across a CDF boundary), and the SFT set is the
    selection over the merged samples."""
    ckpt, split = policy
    env = subprocess_env()
    out2, all2 = str(tmp_path / "two.jsonl"), str(tmp_path / "all2.jsonl")
    sampled = ("--samples_per_prompt", "2", "--temperature", "1.0", "--num_examples", "0", "--dtype", "float64")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "sample_policy.py"),
                           *sample_args(ckpt, split, out2, "--samples_out", all2, *sampled)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = read(all2)
    records = toy_task.load_split(split)
    ids = [r["id"] for r in records]
    by_rank = {r: {s["id"] for s in samples if s["rank"] == r} for r in (0, 1)}
    assert by_rank[0] == set(parallel.rank_share(ids, 0, 2)) and by_rank[1] == set(parallel.rank_share(ids, 1, 2))
    assert not by_rank[0] & by_rank[1]
    assert [(s["id"], s["sample"]) for s in samples] == [(i, k) for i in ids for k in range(2)]  # merged in order
    one = str(tmp_path / "one_all.jsonl")
    sp.main(sample_args(ckpt, split, str(tmp_path / "one.jsonl"), "--samples_out", one, *sampled))
    fields = ("id", "sample", "response", "reward", "finished")
    assert [[s[k] for k in fields] for s in read(one)] == [[s[k] for k in fields] for s in samples]
    assert len({s["response"] for s in samples}) > len(ids)  # sampled: a record's two samples differ
    kept, _ = sp.select(samples, 1, 0, 0)
    assert [(r["id"], r["response"]) for r in read(out2)] == [(s["id"], s["response"]) for s in kept]
    assert len(kept) == len({s["prompt"] for s in samples if s["reward"] == 1.0 and s["finished"]}) > 0


@pytest.mark.slow  # the policy fixture
def test_checkpoint_errors_write_nothing(policy, tmp_path):
    ckpt, split = policy
    out = tmp_path / "out.jsonl"
    cases = [
        (sample_args(ckpt, split, str(out), "--max_response_tokens", "3000"),
         r"split\.jsonl: record id 'toy-val-00000': prompt of \d+ tokens \+ --max_response_tokens 3000 "
         r"> the model's 2048-token context"),
        (sample_args(ckpt, str(tmp_path / "nope.jsonl"), str(out)), "nope.jsonl: file not found"),
        (sample_args(str(tmp_path / "nockpt"), split, str(out)), "nockpt: checkpoint directory not found"),
        (sample_args(ckpt, split, str(out)) + ["--from_rollouts", str(tmp_path)], "exactly one of"),
        (sample_args(ckpt, split, str(out), "--task", "no_such_task"), "unknown task 'no_such_task'"),
        (sample_args(ckpt, split, str(out), "--top_p", "0"), "top_p"),
        # greedy: n samples per prompt would be one response n times (n x the compute, deduplicated to one)
        (sample_args(ckpt, split, str(out), "--temperature", "0", "--samples_per_prompt", "4"),
         r"greedy decoding \(--temperature 0\) gives 4 identical samples per prompt"),
        (sample_args(ckpt, split, split), r"--out .*split\.jsonl: that is an input \(--split\)"),
        # a policy that is never right under a 2-token budget: empty result
        (sample_args(ckpt, split, str(out), "--max_response_tokens", "2"),
         "no correct, finished response among 40 samples"),
    ]
    for argv, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            sp.main(argv)
        assert not out.exists()


# -----------------------------------------------------------------------------
# selection and rollout logs


def s(id_, response, reward=1.0, finished=True, **kw):
    return {"id": id_, "prompt": f"P{id_}", "response": response, "reward": reward, "finished": finished, **kw}


def test_select_filters_dedupes_and_takes_n():
    samples = [s("a", "x"), s("a", "x"), s("a", "y"), s("a", "z", reward=0.0), s("b", "w", finished=False),
               s("b", "v", reward=0.0), s("c", "u"), s("d", "t"), s("d", "t"), s("e", "q<|im_end|>r"), s("e", "q")]
    kept, counts = sp.select(samples, max_per_prompt=1, num_examples=0, seed=0)
    assert sorted((k["id"], k["response"]) for k in kept) == [("a", "x"), ("c", "u"), ("d", "t"), ("e", "q")]
    # a stop token's text inside a response would read back as the stop id, which SFT refuses: dropped and counted
    assert counts == {"samples": 11, "correct": 8, "stop_text": 1, "too_long": 0, "duplicates": 2, "over_limit": 1,
                      "prompts": 5, "prompts_without_correct": 1, "distinct": 4}
    kept, counts = sp.select(samples, max_per_prompt=0, num_examples=0, seed=0)
    assert sorted((k["id"], k["response"]) for k in kept) == [("a", "x"), ("a", "y"), ("c", "u"), ("d", "t"),
                                                              ("e", "q")]
    # the shuffle is seeded; N keeps the first N after it
    first = [k["response"] for k in sp.select(samples, 0, 3, seed=0)[0]]
    assert first == [k["response"] for k in sp.select(samples, 0, 3, seed=0)[0]] and len(first) == 3
    orders = {tuple(k["response"] for k in sp.select(samples, 0, 0, seed=seed)[0]) for seed in range(10)}
    assert len(orders) > 1
    assert first == [k["response"] for k in sp.select(samples, 0, 0, seed=0)[0]][:3]
    # ids are matched as text (as load_records refuses 2 and "2" as one id): one prompt, logged either way
    kept, counts = sp.select([dict(s(2, "x"), prompt="P"), dict(s("2", "x"), prompt="P")], 1, 0, seed=0)
    assert len(kept) == 1 and counts["duplicates"] == 1 and counts["prompts"] == 1
    # one prompt under two ids (a puzzle given twice, in one split or two): one prompt, its answer kept once (SFT
    # trained on it twice)
    kept, counts = sp.select([dict(s("p1", "x"), prompt="P"), dict(s("p9", "x"), prompt="P"),
                              dict(s("p9", "y"), prompt="P")], 1, 0, seed=0)
    assert [(k["id"], k["response"]) for k in kept] == [("p1", "x")] and counts["prompts"] == 1
    assert counts["duplicates"] == 1 and counts["over_limit"] == 1


def test_a_set_holds_no_stop_token_sft_would_refuse(tmp_path):
    """A right response with a stop id's text written in pieces is dropped, for each stop id its tokenizer has: the
    tokenizer's own EOS too (R1-Distill's, a Llama 2 style '</s>'), not only the usual chat terminators' names, or
    redistill_sft refuses the whole set. --from_rollouts takes the tokenizer saved with the run's newest weights."""
    import tasks
    run = tmp_path / "run"
    assert sp.tasks.run_tokenizer(str(tmp_path)) is None and sp.stop_texts(None) == common.STOP_TOKENS
    for step, eos in ((2, "<|end|>"), (10, "</s>")):
        eos_tokenizer(eos).save_pretrained(str(run / f"step_{step:06d}"))
    tok = sp.tasks.run_tokenizer(str(run))
    assert tok.eos_token == "</s>" and "</s>" in sp.stop_texts(tok)  # the newest weights' tokenizer
    samples = [s("a", "so</s> the answer is x"), s("a", "the answer is x")]
    assert len(sp.select(samples, 0, 0, 0)[0]) == 2  # (by the usual names alone it stays, and SFT refuses it)
    kept, counts = sp.select(samples, 0, 0, 0, sp.stop_texts(tok))
    assert [k["response"] for k in kept] == ["the answer is x"] and counts["stop_text"] == 1
    common.write_jsonl(str(tmp_path / "set.jsonl"), kept)
    assert len(tasks.load_sft_examples([str(tmp_path / "set.jsonl")], tok, 100)) == 1


def test_a_too_long_answer_leaves_its_prompts_place_to_the_next():
    """With one answer a prompt, a first right answer too long for SFT gives its place to the next right one; the
    length is asked only of answers that would be kept (it tokenizes: not of duplicates or ones over the limit)."""
    asked = []

    def too_long(sample):
        asked.append(sample["response"])
        return sample["response"] == "long"
    samples = [s("a", "long"), s("a", "long"), s("a", "short"), s("a", "other"), s("b", "x", reward=0.0)]
    kept, counts = sp.select(samples, 1, 0, 0, too_long=too_long)
    assert [k["response"] for k in kept] == ["short"] and asked == ["long", "short"]
    assert counts["too_long"] == 1 and counts["duplicates"] == 1 and counts["over_limit"] == 1


def test_a_set_holds_no_example_longer_than_sft_takes(tmp_path, capsys):
    """A right response whose SFT example (prompt + response + EOS, as redistill_sft tokenizes it) is longer than
    --max_length is dropped and counted, so the set trains at that --max_length (one such sample made
    redistill_sft refuse the whole set after the RL run: a 1,024-token prompt and a 4,096-token answer exceed the
    paper's 5000). The limit is inclusive; 0 keeps every length."""
    import tasks
    run = tmp_path / "rl"
    tok = eos_tokenizer("</s>")
    tok.save_pretrained(str(run / "step_000002"))
    responses = {"a": "so the answer is x", "b": "so the answer is x " * 6 + "so the answer is x"}
    write_rollouts(str(run), {2: [s(i, text) for i, text in responses.items()]})
    sizes = {i: len(tasks.sft_token_ids(tok, [f"P{i}"], [text])[0][0]) for i, text in responses.items()}
    assert sizes["a"] < sizes["b"]
    for limit, kept in ((sizes["b"] - 1, ["a"]), (sizes["b"], ["a", "b"]), (0, ["a", "b"])):
        out = tmp_path / f"out{limit}.jsonl"
        sp.main(["--from_rollouts", str(run), "--steps", "2", "--task", "toy_task", "--out", str(out),
                 "--max_length", str(limit), "--progress", "false"])
        assert sorted(r["id"] for r in read(out)) == kept
        assert f"{2 - len(kept)} longer than --max_length {limit}" in capsys.readouterr().out
        assert len(tasks.load_sft_examples([str(out)], tok, limit or sizes["b"])) == len(kept)


def write_rollouts(run_dir, steps):
    for step, recs in steps.items():  # train_rl.py's names (step_000003.jsonl); step 1 unpadded, also accepted
        name = f"step_{step}.jsonl" if step == 1 else f"step_{step:06d}.jsonl"
        common.write_jsonl(os.path.join(run_dir, "rollouts", name),
                           [{"step": step, "length": 5, **r} for r in recs])


def test_an_output_on_one_of_the_runs_rollout_logs_is_refused(tmp_path):
    """--out on a rollout log it reads (a slip of the path) overwrote the RL run's own log, which no later stage
    could read; refused before anything is written."""
    run = tmp_path / "rl"
    eos_tokenizer("</s>").save_pretrained(str(run / "step_000002"))
    write_rollouts(str(run), {1: [s("a", "x")], 2: [s("b", "y")]})
    log = run / "rollouts" / "step_1.jsonl"
    before = log.read_bytes()
    with pytest.raises(UserError, match=r"--samples_out .*step_1\.jsonl: that is an input \(--from_rollouts\)"):
        sp.main(["--from_rollouts", str(run), "--steps", "2", "--task", "toy_task", "--out", str(tmp_path / "o.jsonl"),
                 "--samples_out", str(log), "--progress", "false"])
    assert log.read_bytes() == before and not (tmp_path / "o.jsonl").exists()
    for name in ("settings.json", "metrics.jsonl"):  # (read here, and by the run's resume: rewritten as SFT rows)
        with pytest.raises(UserError, match=rf"--out .*{name}: that is an input \(--from_rollouts\)"):
            sp.main(["--from_rollouts", str(run), "--steps", "2", "--task", "toy_task", "--out", str(run / name),
                     "--progress", "false"])


def test_from_rollouts_of_a_live_run_is_refused(tmp_path):
    """While the RL run holds its directory's lock its rollout logs may still change (a resume rewrites every log past
    its checkpoint): refused, nothing written, as lim_select refuses; once it has ended, read."""
    records = toy_task.make_records(2, seed=31)
    run, out = str(tmp_path / "rl"), str(tmp_path / "out.jsonl")
    write_rollouts(run, {1: [s(r["id"], toy_task.teacher_response(r)) for r in records]})
    args = ["--from_rollouts", run, "--steps", "1", "--task", "toy_task", "--out", out, "--progress", "false"]
    with lock_held_elsewhere(run) as pid:
        with pytest.raises(UserError, match=rf"rl: the RL run is still running \(pid {pid} on .*\), so its rollout "
                                            r"logs may yet change"):
            sp.main(args)
    assert not os.path.exists(out)
    sp.main(args)
    assert len(read(out)) == 2


def test_from_rollouts_steps_order_first_occurrence_and_rescore(tmp_path, capsys, monkeypatch):
    records = toy_task.make_records(4, seed=30)
    common.write_jsonl(tmp_path / "split.jsonl", records)
    a, b, c, d = records
    right = {r["id"]: toy_task.teacher_response(r) for r in records}
    run = str(tmp_path / "rl")
    write_rollouts(run, {
        1: [s(a["id"], right[a["id"]] + " (step 1)"), s(b["id"], "wrong", reward=0.0)],
        2: [s(a["id"], right[a["id"]] + " (step 2)"), s(b["id"], right[b["id"]], finished=False)],
        3: [s(a["id"], right[a["id"]] + " (step 3)<|endoftext|>"), s(c["id"], right[c["id"]]),
            s(d["id"], "\\boxed{999}")],  # d: the log says correct, the task's score says not
        4: [s(b["id"], right[b["id"]])],  # outside the step range
    })
    out = str(tmp_path / "out.jsonl")
    sp.main(["--from_rollouts", run, "--steps", "3,1-2", "--task", "toy_task", "--out", out, "--progress", "false"])
    rows = read(out)
    # a's first occurrence in reading order 3, 1, 2 is step 3's (its decoded stop token removed); b never correct
    assert sorted((r["id"], r["response"], r["step"]) for r in rows) == sorted([
        (a["id"], right[a["id"]] + " (step 3)", 3), (c["id"], right[c["id"]], 3), (d["id"], "\\boxed{999}", 3)])
    assert all(r["source"] == os.path.join(run, "rollouts", "step_000003.jsonl") for r in rows)
    log = capsys.readouterr().out
    assert "1 of 4 prompts had no correct sample" in log and "removed a trailing stop-token string from 1" in log
    # the same run spelt relatively: the same bytes (set B's source was the path as given, set A's absolute)
    monkeypatch.chdir(tmp_path)
    sp.main(["--from_rollouts", "rl", "--steps", "3,1-2", "--task", "toy_task", "--out", "again.jsonl",
             "--progress", "false"])
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()
    capsys.readouterr()
    # with the split, the task's score re-checks the log's rewards (the paper does): d is dropped
    sp.main(["--from_rollouts", run, "--steps", "1-3", "--task", "toy_task", "--split", str(tmp_path / "split.jsonl"),
             "--out", out, "--progress", "false", "--num_examples", "1"])
    log = capsys.readouterr().out
    assert "2 rewards changed" in log and "note: only" not in log  # d, and b unfinished (the log said 1.0)
    assert len(read(out)) == 1 and read(out)[0]["id"] in (a["id"], c["id"])


def test_rollout_errors_write_nothing(tmp_path):
    run, out = str(tmp_path / "rl"), tmp_path / "out.jsonl"
    write_rollouts(run, {5: [s("a", "x")], 6: [s("a", "y", reward=0.0)]})

    def fails(pattern, *argv):
        with pytest.raises(UserError, match=pattern):
            sp.main(["--from_rollouts", run, "--task", "toy_task", "--out", str(out), "--progress", "false", *argv])
        assert not out.exists()

    fails(r"step_000007\.jsonl: file not found \(rollout steps present: 5\.\.6 \(2 files\)\)", "--steps", "5-7")
    # a range past the newest log is cut at its first missing step (a typo's zeros were a list of a trillion steps)
    fails(r"step_000007\.jsonl: file not found \(rollout steps present: 5\.\.6", "--steps", "5-1000000000000")
    fails("expected steps like 115-125", "--steps", "7-5")
    fails("expected steps like 115-125", "--steps", "five")
    fails("listed twice", "--steps", "5,5-6")
    fails("--from_rollouts needs --steps")
    # sampling settings would do nothing here (the RL run sampled): given, they are an error, not silently ignored
    fails(r"--limit applies to --from_checkpoint only", "--steps", "5", "--limit", "1")
    fails(r"--temperature, --max_response_tokens apply to --from_checkpoint only", "--steps", "5",
          "--temperature", "0.7", "--max_response_tokens", "8")
    fails(r"--samples_out .*out\.jsonl: the same file as --out", "--steps", "5", "--samples_out", str(out))
    fails("no correct, finished response among 1 samples", "--steps", "6")
    # an earlier run's --out beside this run's --samples_out: a pair of two runs, said (it read as this run's)
    sp.main(["--from_rollouts", run, "--task", "toy_task", "--out", str(out), "--progress", "false", "--steps", "5"])
    with pytest.raises(UserError, match=rf"nothing written to {re.escape(str(out))} \(the {re.escape(str(out))} there "
                                        r"is an earlier run's, and --samples_out .*all\.jsonl this run's samples\)"):
        sp.main(["--from_rollouts", run, "--task", "toy_task", "--out", str(out), "--progress", "false", "--steps",
                 "6", "--samples_out", str(tmp_path / "all.jsonl")])
    out.unlink()
    bad = {"finished": "yes"}, {"reward": None}, {"step": 9}, {"response": ["x"]}
    for i, change in enumerate(bad):
        write_rollouts(run, {8: [s("a", "x"), {**s("a", "y"), **change}]})
        field = next(iter(change))
        fails(rf"step_000008\.jsonl:2: field '{field}'", "--steps", "8")
    common.write_jsonl(os.path.join(run, "rollouts", "step_000008.jsonl"), [{"step": 8, "id": "a", "prompt": "p"}])
    fails(r"step_000008\.jsonl:1: missing field 'response'", "--steps", "8")
    with open(os.path.join(run, "rollouts", "step_000008.jsonl"), "w") as f:
        f.write("{oops\n")
    fails(r"step_000008\.jsonl:1: not valid JSON", "--steps", "8")
    # train_rl writes a log whole: a line cut short, the last one too, is a damaged copy
    with open(os.path.join(run, "rollouts", "step_000008.jsonl"), "w") as f:
        f.write(json.dumps(s("a", "x", step=8, length=5)) + '\n{"step": 8, "id": "a", "prom')
    fails(r"step_000008\.jsonl:2: not valid JSON", "--steps", "8")
    # an empty log is a damaged copy too (train_rl logs every step's rollouts): read as none, set B lost a step
    open(os.path.join(run, "rollouts", "step_000008.jsonl"), "w").close()
    fails(r"step_000008\.jsonl: no rows; its writer never writes an empty file", "--steps", "5,8")
    # a rollout of a prompt the --split lacks: the error names the log's line, not only the split
    common.write_jsonl(tmp_path / "split.jsonl", toy_task.make_records(2, seed=1))
    write_rollouts(run, {8: [s(toy_task.make_records(2, seed=1)[1]["id"], "x"), s("a", "y")]})
    fails(r"step_000008\.jsonl:2: field 'id' 'a' is the id of no record in --split .*split\.jsonl, so its answer "
          r"cannot be re-scored", "--steps", "8", "--split", str(tmp_path / "split.jsonl"))
    # one id, two prompts (a row edited by hand): its answer would be scored against another prompt's record
    write_rollouts(run, {8: [s("a", "x"), s("b", "y")], 9: [{**s("a", "z"), "prompt": "another"}]})
    fails(r"step_000009\.jsonl:1: field 'prompt' differs from that of id 'a' at .*step_000008\.jsonl:1: one id, two "
          r"prompts", "--steps", "8-9")
    write_rollouts(run, {8: [s("a", "x"), {**s("b", "y"), "prompt": ""}]})
    fails(r"step_000008\.jsonl:2: field 'prompt' is \"\", expected a prompt's text", "--steps", "8")
    with pytest.raises(UserError, match=r"rollouts/step_000001\.jsonl: file not found \(rollout steps present: none\)"):
        sp.main(["--from_rollouts", str(tmp_path / "empty"), "--steps", "1", "--task", "toy_task", "--out", str(out)])


def test_a_max_length_no_prompt_fits_or_a_marking_tokenizer_is_refused_before_sampling(
        tiny_checkpoint, tmp_path, monkeypatch):
    """Every SFT example is its prompt + response + EOS: a --max_length below every prompt's length keeps none, known
    before the split is sampled (it was refused after: the whole sampling job lost)."""
    split, out = str(tmp_path / "split.jsonl"), tmp_path / "out.jsonl"
    common.write_jsonl(split, toy_task.make_records(3, seed=1, split="val"))
    monkeypatch.setattr(engine, "sample_responses", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(UserError, match=r"--max_length 5: every prompt of .*split\.jsonl is at least \d+ tokens"):
        sp.main(sample_args(tiny_checkpoint, split, str(out), "--max_length", "5"))
    assert not out.exists()
    # a tokenizer that marks a lone text's start (sentencepiece's, tasks.lone_text_marker): refused before sampling
    # too, where the first kept sample's length check refused it after
    monkeypatch.setattr(sp.tasks, "lone_text_marker", lambda tokenizer: "▁")
    with pytest.raises(UserError, match="puts '▁' before every text it encodes alone"):
        sp.main(sample_args(tiny_checkpoint, split, str(out)))
    assert not out.exists()


def test_steps_name_one_step_as_a_range_and_belong_to_rollouts_only(tiny_checkpoint, tmp_path):
    """--steps 125-125 is the one step 125 (a range whose ends are equal, as a script building 'A-B' from a start and
    an end writes it), not an error; --steps with --from_checkpoint, which samples a checkpoint and reads no rollout
    log, is refused rather than silently ignored."""
    assert sp.parse_steps("125-125") == [125] and sp.parse_steps("3,5-5,1-2") == [3, 5, 1, 2]
    assert sp.parse_steps("1-1000000000000", last=6) == list(range(1, 8))  # cut at the first missing step
    assert sp.parse_steps("9-1000000000000", last=6) == [9] and sp.parse_steps("3,5-6", last=6) == [3, 5, 6]
    split = str(tmp_path / "split.jsonl")
    common.write_jsonl(split, toy_task.make_records(2, seed=1, split="val"))
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=r"^--steps applies to --from_rollouts only$"):
        sp.main(["--from_checkpoint", tiny_checkpoint, "--task", "toy_task", "--split", split, "--out", str(out),
                 "--steps", "5", "--progress", "false"])
    assert not out.exists()


def eos_tokenizer(eos):
    """A small byte-level BPE tokenizer whose EOS is `eos` (e.g. a Llama 2 style '</s>', not one of the usual chat
    terminators' names)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(["so the answer is x"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token=eos)


def test_select_counts_a_prompt_whose_right_answers_hold_a_stop_text_as_answered_and_a_bonus_as_right():
    """A prompt whose only right answers were dropped for a stop token's text had a correct sample (it is not one
    'without a correct sample'); a reward above 1 (a bonus) is right, as tasks.is_correct says."""
    samples = [s("a", "x<|im_end|>y"), s("b", "w", reward=1.5), s("c", "v", reward=0.0)]
    kept, counts = sp.select(samples, 0, 0, 0)
    assert [k["id"] for k in kept] == ["b"]
    assert counts["prompts_without_correct"] == 1 and counts["stop_text"] == 1 and counts["correct"] == 2


def test_from_rollouts_strips_and_drops_the_run_tokenizers_own_eos(tmp_path, capsys):
    """--from_rollouts reads the stop texts of the tokenizer saved with the run's weights: a logged response that
    ends with its EOS text ('</s>', not one of the usual chat terminators) has it stripped and is kept; one with the
    EOS text inside is dropped (redistill_sft would refuse it). A step folder with no tokenizer is passed over."""
    run = tmp_path / "rl"
    eos_tokenizer("</s>").save_pretrained(str(run / "step_000002"))
    (run / "step_000004").mkdir()  # (no tokenizer in it)
    write_rollouts(str(run), {2: [s("a", "the answer is x</s>"), s("b", "so</s> the answer is x")]})
    out = tmp_path / "out.jsonl"
    sp.main(["--from_rollouts", str(run), "--steps", "2", "--task", "toy_task", "--out", str(out),
             "--progress", "false"])
    assert [(r["id"], r["response"]) for r in read(out)] == [("a", "the answer is x")]
    assert "1 holding a stop token's text" in capsys.readouterr().out


def test_rollouts_are_checked_to_be_of_the_split_and_task_given(tiny_checkpoint, tmp_path, capsys):
    """Data made again under the same ids (another pool of puzzles) re-scored the run's answers against other
    records, and lim_select selected the other pool's prompts in the logged ones' place: each logged prompt is
    compared with its record's, rendered as the run rendered them (its saved tokenizer, its --template); the run's
    --task with --task. A run that saved no weights is compared on its task alone."""
    import lim_select
    import shutil
    run, split, out = tmp_path / "rl", tmp_path / "split.jsonl", tmp_path / "out.jsonl"
    shutil.copytree(tiny_checkpoint, run / "step_000001")
    common.write_json(str(run / "settings.json"), {"task": "toy_task", "template": "plain", "prompts_per_step": 2,
                                                   "samples_per_prompt": 1})
    records, tok = toy_task.make_records(2, seed=1), load_tokenizer(tiny_checkpoint)
    rows = [{"step": 1, "id": r["id"], "prompt": toy_task.render_prompt(r, tok, "plain"), "epoch": 0, "length": 5,
             "response": toy_task.teacher_response(r), "reward": float(i), "finished": True}
            for i, r in enumerate(records)]
    write_rollouts(str(run), {1: rows})
    other = [{**r, "question": r["question"].replace("+", "-")} for r in records]  # the same ids, other problems
    for data, ok in ((records, True), (other, False)):
        common.write_jsonl(str(split), data)
        for stage in (lambda: sp.main(["--from_rollouts", str(run), "--steps", "1", "--task", "toy_task", "--split",
                                       str(split), "--out", str(out), "--progress", "false"]),
                      lambda: lim_select.main(["--rollouts", str(run), "--train_data", str(split), "--task",
                                               "toy_task", "--out", str(out), "--plot_out", "", "--threshold", "0"])):
            if ok:
                stage()
            else:
                with pytest.raises(UserError, match=r"step_1\.jsonl:1: field 'prompt' is not that of record .* of "
                                                    r".*split\.jsonl as the run rendered it"):
                    stage()
    shutil.rmtree(run / "step_000001")  # no saved weights, so no tokenizer to render with: the prompts are not compared
    sp.main(["--from_rollouts", str(run), "--steps", "1", "--task", "toy_task", "--split", str(split), "--out",
             str(out), "--progress", "false"])
    assert "and their prompts are not compared with --split's" in capsys.readouterr().out
    common.write_json(str(run / "settings.json"), {"task": "kk", "template": "plain"})
    with pytest.raises(UserError, match=r"rl: the RL run's --task is 'kk', not 'toy_task'"):
        sp.main(["--from_rollouts", str(run), "--steps", "1", "--task", "toy_task", "--out", str(out)])


def test_from_checkpoint_drops_a_response_holding_the_checkpoints_own_eos(tmp_path, monkeypatch):
    """--from_checkpoint checks the samples against the checkpoint's own tokenizer's stop texts (its EOS '</s>')."""
    ckpt = tmp_path / "ckpt"
    eos_tokenizer("</s>").save_pretrained(str(ckpt))
    split = tmp_path / "split.jsonl"
    common.write_jsonl(split, toy_task.make_records(2, seed=1, split="val"))
    monkeypatch.setattr(sp, "sample_checkpoint", lambda *a: (
        [s(i, text, source=str(ckpt), sample=0) for i, text in (("a", "so</s> x"), ("b", "the answer is x"))], None))
    out = tmp_path / "out.jsonl"
    sp.main(["--from_checkpoint", str(ckpt), "--task", "toy_task", "--split", str(split), "--out", str(out),
             "--progress", "false"])
    assert [(r["id"], r["response"]) for r in read(out)] == [("b", "the answer is x")]
    # every right answer held one: the error says why none is left
    monkeypatch.setattr(sp, "sample_checkpoint", lambda *a: ([s("a", "so</s> x", source=str(ckpt), sample=0)], None))
    with pytest.raises(UserError, match="no correct, finished response without a stop token, within --max_length "
                                        "among 1 samples"):
        sp.main(["--from_checkpoint", str(ckpt), "--task", "toy_task", "--split", str(split), "--out",
                 str(tmp_path / "none.jsonl"), "--progress", "false"])


def sample_all(ckpt, split, tmp_path, name, *extra):
    """sample_policy --from_checkpoint with these settings: every sample it drew (--samples_out)."""
    everything = str(tmp_path / f"{name}.all.jsonl")
    sp.main(["--from_checkpoint", ckpt, "--task", "toy_task", "--split", split, "--out",
             str(tmp_path / f"{name}.jsonl"), "--max_response_tokens", "6", "--progress", "false",
             "--allow_empty", "true", "--samples_out", everything, *extra])
    return read(everything)


def test_sampling_settings_reach_the_sampler(tiny_checkpoint, tmp_path):
    """--top_p, --seed, --template and --limit (with its seed) at other values than their defaults reach the
    sampling: a setting dropped on its way through main (its default used) fails here."""
    split = str(tmp_path / "split.jsonl")
    records = toy_task.make_records(6, seed=1, split="val")
    common.write_jsonl(split, records)
    tok = load_tokenizer(tiny_checkpoint)

    def draw(name, *extra):
        return sample_all(tiny_checkpoint, split, tmp_path, name, *extra)
    greedy = {s["id"]: s["tokens"] for s in draw("greedy")}
    # top_p near 0 keeps only the most likely token: T = 1 then samples the greedy answer, every time
    nucleus = draw("nucleus", "--temperature", "1", "--top_p", "1e-6", "--samples_per_prompt", "2")
    assert [s["tokens"] for s in nucleus] == [greedy[s["id"]] for s in nucleus]
    # (a random tiny model at T = 1, top_p 1 is far from greedy; another --seed gives other samples)
    t1 = {seed: [s["tokens"] for s in draw(f"t1_{seed}", "--temperature", "1", "--samples_per_prompt", "2",
                                           "--seed", str(seed))] for seed in (1, 2)}
    assert t1[1] != [greedy[s["id"]] for s in nucleus] and t1[1] != t1[2]
    # --template plain: the prompt sampled and written is the plain one, not the tokenizer's chat template's
    plain = draw("plain", "--template", "plain")
    assert [s["prompt"] for s in plain] == [toy_task.render_prompt(r, tok, "plain") for r in records]
    assert plain[0]["prompt"] != toy_task.render_prompt(records[0], tok, "auto")
    # --limit: that many records, drawn by --seed
    picks = {seed: [s["id"] for s in draw(f"lim_{seed}", "--limit", "3", "--seed", str(seed))] for seed in (0, 1, 2, 3)}
    assert all(len(ids) == 3 for ids in picks.values()) and len({tuple(ids) for ids in picks.values()}) > 1


def test_the_shuffle_seed_reaches_the_selection(tmp_path):
    """--seed shuffles the selection (set B's subset differs by seed), as select() does with it."""
    run_dir = str(tmp_path / "rl")
    rows = [{"step": 1, "length": 5, "id": f"p{i}", "prompt": f"P{i}", "response": f"r{i}", "reward": 1.0,
             "finished": True} for i in range(20)]
    common.write_jsonl(os.path.join(run_dir, "rollouts", "step_000001.jsonl"), rows)
    orders = {}
    for seed in (0, 1):
        out = str(tmp_path / f"out{seed}.jsonl")
        sp.main(["--from_rollouts", run_dir, "--steps", "1", "--task", "toy_task", "--out", out, "--seed", str(seed),
                 "--num_examples", "5", "--progress", "false"])
        orders[seed] = [r["id"] for r in read(out)]
        assert orders[seed] == [s["id"] for s in sp.select([dict(r) for r in rows], 1, 5, seed)[0]]
    assert orders[0] != orders[1]


def test_max_per_prompt_reaches_the_selection(tmp_path):
    """--max_per_prompt 2 keeps the first two distinct right answers of a prompt that has three (0: all three)."""
    run_dir = str(tmp_path / "rl")
    rows = [{"step": 1, "length": 5, "id": "p0", "prompt": "P0", "response": f"r{k}", "reward": 1.0, "finished": True}
            for k in range(3)]
    common.write_jsonl(os.path.join(run_dir, "rollouts", "step_000001.jsonl"), rows)
    for limit, want in (("2", ["r0", "r1"]), ("0", ["r0", "r1", "r2"])):
        out = str(tmp_path / f"out{limit}.jsonl")
        sp.main(["--from_rollouts", run_dir, "--steps", "1", "--task", "toy_task", "--out", out, "--max_per_prompt",
                 limit, "--num_examples", "0", "--progress", "false"])
        assert sorted(r["response"] for r in read(out)) == want
