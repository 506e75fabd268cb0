"""lim_select.py: LIMR's scoring against a hand computation (back-filled gaps, dropped prompts, the threshold's >=,
the exact output files), a round trip through train_rl.py on the toy task, and bad input: one line naming the
file, line and field, with nothing written."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import common
import ckpt
import lim_select
import toy_task
import train_rl
from conftest import ROOT, subprocess_env

# The hand example: 7 prompts, 3 epochs of 2 steps each, each prompt drawn at most once an epoch, as train_rl draws
# them. (step, prompt, rewards) of every rollout; a reward of 0.5 is not a 1, so it counts as unsolved (LIMR: reward
# == 1).
LOG = [
    (1, 0, [1, 0]), (3, 0, [1, 0.5]), (5, 0, [1, 1]),    # p0: 1/2, 1/2, 1
    (4, 1, [1, 0, 1, 0]), (6, 1, [1, 0]),                 # p1: -, 1/2, 1/2 -> back-fill: 1/2, 1/2, 1/2
    (2, 2, [0, 0]), (5, 2, [1, 1]),                       # p2: 0, -, 1 -> 0, 1, 1
    (6, 3, [1, 1]),                                       # p3: -, -, 1: two gaps in a row, dropped
    (1, 4, [1, 1]), (3, 4, [1, 0]),                       # p4: 1, 1/2, -: the last epoch empty, dropped
    (1, 6, [0, 0]), (4, 6, [0, 0]), (5, 6, [0, 0]),       # p6: 0, 0, 0   (p5: never drawn, dropped)
]
# By hand: the average over p0, p1, p2, p6 is (1/4, 1/2, 5/8); sum_k (1 - avg_k)^2 = 9/16 + 1/4 + 9/64 = 61/64.
# sum_k (r_k - avg_k)^2 in 64ths: p0 (1/4, 0, 3/8) -> 13; p1 (1/4, 0, -1/8) -> 5; p2 (-1/4, 1/2, 3/8) -> 29;
# p6 (-1/4, -1/2, -5/8) -> 45. So s = 1 - 13/61, 1 - 5/61, 1 - 29/61, 1 - 45/61 = 0.787, 0.918, 0.525, 0.262.
HAND_SCORES = [1 - 13 / 61, 1 - 5 / 61, 1 - 29 / 61, None, None, None, 1 - 45 / 61]
HAND_ACCURACY = [[0.5, 0.5, 1.0], [0.5, 0.5, 0.5], [0.0, 1.0, 1.0], [None, 1.0, 1.0], [1.0, 0.5, None],
                 [None, None, None], [0.0, 0.0, 0.0]]


def write_log(run_dir, pool, with_epoch=True, steps=6):
    for step in range(1, steps + 1):
        rows = [{"id": pool[i]["id"], "reward": r, "step": step, "sample": k,
                 **({"epoch": (step - 1) // 2} if with_epoch else {})}
                for s, i, rewards in LOG if s == step for k, r in enumerate(rewards)]
        common.write_jsonl(os.path.join(run_dir, "rollouts", f"step_{step:06d}.jsonl"), rows)


@pytest.fixture
def hand(tmp_path):
    pool = toy_task.make_records(7, seed=3)
    common.write_jsonl(tmp_path / "pool.jsonl", pool)
    write_log(tmp_path / "probe", pool)
    out = tmp_path / "out"
    return {"pool": pool, "dir": tmp_path, "out": out,
            "args": ["--rollouts", str(tmp_path / "probe"), "--train_data", str(tmp_path / "pool.jsonl"),
                     "--task", "toy_task", "--out", str(out / "lim.jsonl"), "--scores_out", str(out / "scores.jsonl"),
                     "--random_out", str(out / "rand.jsonl"), "--plot_out", ""]}


def test_scores_match_the_hand_computation_with_gaps(hand, capsys):
    lim_select.main(hand["args"])
    pool, out = hand["pool"], hand["out"]
    scores = common.read_jsonl(out / "scores.jsonl")
    assert [list(r) for r in scores] == [["id", "score", "accuracy"]] * 7  # the exact format, one row per pool prompt
    assert [r["id"] for r in scores] == [r["id"] for r in pool]
    assert [r["accuracy"] for r in scores] == HAND_ACCURACY  # back-filled, null where a gap stayed
    for row, want in zip(scores, HAND_SCORES):
        assert row["score"] == (None if want is None else pytest.approx(want, abs=1e-12))
    # threshold 0.6: p0 (0.787) and p1 (0.918), the records unchanged, in pool order
    assert common.read_jsonl(out / "lim.jsonl") == [pool[0], pool[1]]
    rand = common.read_jsonl(out / "rand.jsonl")
    assert len(rand) == 2 and all(r in pool for r in rand) and rand == sorted(rand, key=pool.index)
    printed = capsys.readouterr().out
    assert "scored 4, dropped 3" in printed and "1 never drawn" in printed and "selected 2 with score >= 0.6" in printed
    assert "3 empty epochs back-filled" in printed  # p1's, p2's and p3's second


def test_a_killed_writes_leftovers_go_and_a_second_run_on_the_outputs_is_refused(hand):
    """lim_select took no lock and cleared nothing: each kill inside a write left a .tmp_ file beside the outputs for
    good. Its outputs are locked now (.lim.jsonl.lock), and a killed run's temporary files of them go."""
    import subprocess
    import sys
    from conftest import ROOT, subprocess_env
    out = hand["out"]
    out.mkdir()
    left = [out / ".tmp_lim.jsonl.k1ll3d_x", out / ".tmp_scores.jsonl.k1ll3d_y"]
    for path in left:
        path.write_text("a kill inside a write")
    (out / ".tmp_notes.txt.k1ll3d_x").write_text("another file's")
    lim_select.main(hand["args"])
    assert not any(path.exists() for path in left) and (out / ".tmp_notes.txt.k1ll3d_x").exists()
    common._LOCKS.pop(os.path.realpath(out / ".lim.jsonl.lock")).close()  # (as when this process ends)
    hold = f"import common, time; common.lock_output([{str(out / 'lim.jsonl')!r}]); print('held', flush=True); " \
           "time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold], cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(common.UserError, match="another run is using this output"):
            lim_select.main(hand["args"])
    finally:
        holder.kill()


def test_rand_holds_only_prompts_the_probe_drew(hand):
    """p5 was never drawn (as a prompt over the probe's --max_prompt_tokens would not be): LIM cannot select it, and
    RL on RAND would drop it, so RAND is drawn from the six the probe drew, for every seed."""
    picked = set()
    for seed in range(30):
        lim_select.main(hand["args"] + ["--seed", str(seed)])
        rand = common.read_jsonl(hand["out"] / "rand.jsonl")
        assert len(rand) == 2 and hand["pool"][5] not in rand
        picked |= {r["id"] for r in rand}
    assert len(picked) == 6  # (still a draw)


def test_the_threshold_keeps_a_score_equal_to_it(hand):
    at_p0 = 1 - 13 / 61  # p0's score, exactly as the code computes it (every sum is exact in binary)
    lim_select.main(hand["args"] + ["--threshold", repr(at_p0)])
    assert [r["id"] for r in common.read_jsonl(hand["out"] / "lim.jsonl")] == [hand["pool"][0]["id"],
                                                                               hand["pool"][1]["id"]]
    lim_select.main(hand["args"] + ["--threshold", repr(at_p0 + 1e-6)])
    assert [r["id"] for r in common.read_jsonl(hand["out"] / "lim.jsonl")] == [hand["pool"][1]["id"]]


def test_a_score_that_is_the_threshold_in_exact_arithmetic_is_kept(tmp_path):
    """8 rollouts a prompt, solved (2, 1), (8, 1) and (7, 8) times in 2 epochs: the second prompt's score is 3/5
    exactly, 0.5999999999999999 in floats, and --threshold 0.6 kept nothing ("the highest is 0.600")."""
    pool = toy_task.make_records(3, seed=3)
    common.write_jsonl(tmp_path / "pool.jsonl", pool)
    for step, solved in ((1, (2, 8, 7)), (2, (1, 1, 8))):
        common.write_jsonl(tmp_path / "probe" / "rollouts" / f"step_{step:06d}.jsonl", [
            {"id": r["id"], "reward": int(k < c), "step": step, "sample": k, "epoch": step - 1}
            for r, c in zip(pool, solved) for k in range(8)])
    scores = lim_select.lim_scores(lim_select.epoch_accuracy(
        [(e, i, ok) for e, solved in enumerate(((2, 8, 7), (1, 1, 8))) for i, c in enumerate(solved)
         for ok in [k < c for k in range(8)]], 3, [0, 1]))[0]
    assert scores[1] != 0.6 and abs(scores[1] - 0.6) < 1e-15  # (1 - (9/64 + 9/64) / (45/64 + ...): 3/5)
    lim_select.main(["--rollouts", str(tmp_path / "probe"), "--train_data", str(tmp_path / "pool.jsonl"), "--task",
                     "toy_task", "--out", str(tmp_path / "lim.jsonl"), "--plot_out", "", "--threshold", "0.6"])
    assert [r["id"] for r in common.read_jsonl(tmp_path / "lim.jsonl")] == [pool[1]["id"]]


def test_steps_per_epoch_groups_step_files_and_wins_over_the_field(hand):
    lim_select.main(hand["args"])
    want = common.read_jsonl(hand["out"] / "scores.jsonl")
    probe = hand["dir"] / "probe"
    write_log(probe, hand["pool"], with_epoch=False)  # an old log: no epoch field
    with pytest.raises(common.UserError, match=r"step_000001\.jsonl:1: missing field 'epoch'.*--steps_per_epoch"):
        lim_select.main(hand["args"])
    lim_select.main(hand["args"] + ["--steps_per_epoch", "2"])
    assert common.read_jsonl(hand["out"] / "scores.jsonl") == want
    for path in probe.glob("rollouts/*.jsonl"):  # a wrong epoch field: --steps_per_epoch is what counts
        common.write_jsonl(path, [{**r, "epoch": 7} for r in common.read_jsonl(path)])
    lim_select.main(hand["args"] + ["--steps_per_epoch", "2"])
    assert common.read_jsonl(hand["out"] / "scores.jsonl") == want
    # --epochs 2: the first two epochs only; p0 (1/2, 1/2), p1 (back-filled), p4 (1, 1/2) and p6 are complete,
    # p2 (0, -) now has an empty last epoch, p3 is not drawn in them
    lim_select.main(hand["args"] + ["--steps_per_epoch", "2", "--epochs", "2"])
    assert [r["score"] is not None for r in common.read_jsonl(hand["out"] / "scores.jsonl")] == \
        [True, True, False, False, True, False, True]



def test_with_steps_per_epoch_the_last_epoch_is_partial_when_it_lacks_step_files(hand, capsys):
    """--steps_per_epoch N: the epoch the probe stopped in is the one with fewer than N step files (6 of 4 + 2); a
    whole last one that drew fewer prompts (an old dynamic-sampling log) was dropped as partial too."""
    probe = hand["dir"] / "probe"
    write_log(probe, hand["pool"], with_epoch=False)
    lim_select.main(hand["args"] + ["--steps_per_epoch", "4", "--threshold", "0"])
    assert ("warning: the log's last epoch has 2 of --steps_per_epoch 4 steps: the probe stopped inside it"
            in capsys.readouterr().out)
    for step in (5, 6):  # steps 4-6 now draw 2 prompts, steps 1-3 drew 4: a whole epoch all the same
        common.write_jsonl(probe / "rollouts" / f"step_{step:06d}.jsonl",
                           [{"id": hand["pool"][6]["id"], "reward": 0, "step": step, "sample": 0}])
    lim_select.main(hand["args"] + ["--steps_per_epoch", "3", "--threshold", "0"])
    out = capsys.readouterr().out
    assert "warning" not in out and "over 2 epochs" in out


def test_a_last_epoch_the_probe_stopped_inside_is_left_out(hand, capsys):
    lim_select.main(hand["args"])
    want = common.read_jsonl(hand["out"] / "scores.jsonl")
    counted = re.search(r"\d+ rollouts of", capsys.readouterr().out).group()
    # step 7 opens a 4th epoch and draws only p0: scored, it would drop every other prompt (a gap at the end)
    common.write_jsonl(hand["dir"] / "probe" / "rollouts" / "step_000007.jsonl",
                       [{"id": hand["pool"][0]["id"], "reward": 1, "step": 7, "sample": 0, "epoch": 3}])
    lim_select.main(hand["args"])
    assert common.read_jsonl(hand["out"] / "scores.jsonl") == want
    out = capsys.readouterr().out
    assert "last epoch drew 1 prompts, the one before 5" in out and counted in out  # (its rollout not counted)
    lim_select.main(hand["args"] + ["--epochs", "4"])  # asked for: scored, and only p0 is complete
    assert [r["score"] is not None for r in common.read_jsonl(hand["out"] / "scores.jsonl")] == [True] + [False] * 6


def test_the_curves_are_plotted_when_matplotlib_is_installed(hand, capsys):
    args = [a for a in hand["args"] if a not in ("--plot_out", "")]
    lim_select.main(args)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib not installed" in capsys.readouterr().out
        return
    assert os.path.getsize(hand["out"] / "lim.png") > 1000  # default: beside --out


def test_round_trip_probe_select_and_train_with_train_rl(tiny_checkpoint, tmp_path, monkeypatch):
    """A real probe run logs epochs; its log selects a subset; the subset trains with train_rl.py."""
    pool = toy_task.make_records(10, seed=5)
    common.write_jsonl(tmp_path / "pool.jsonl", pool)
    # a random tiny model never answers right: score by the response's length instead, so curves differ
    monkeypatch.setattr(toy_task, "score", lambda response, record, finished: float(len(response) % 2))

    def rl(train_data, out_dir, steps, prompts_per_step):
        settings = {"model": tiny_checkpoint, "task": "toy_task", "train_data": train_data, "test_data": "",
                    "out_dir": out_dir, "prompts_per_step": prompts_per_step, "samples_per_prompt": 4,
                    "max_response_tokens": 6, "max_steps": steps, "save_every": steps, "warmup_steps": 1,
                    "gen_batch_size": 8, "progress": False}
        assert train_rl.main([x for k, v in settings.items() for x in (f"--{k}", str(v))]) == 0

    probe = str(tmp_path / "probe")
    rl(str(tmp_path / "pool.jsonl"), probe, 6, 4)  # 2 steps per epoch (10 // 4, 2 prompts left out each epoch)
    for step in range(1, 7):
        rows = common.read_jsonl(os.path.join(probe, "rollouts", f"step_{step:06d}.jsonl"))
        assert len(rows) == 16 and {r["epoch"] for r in rows} == {(step - 1) // 2}
    out = tmp_path / "sel"
    lim_select.main(["--rollouts", probe, "--train_data", str(tmp_path / "pool.jsonl"), "--task", "toy_task",
                     "--threshold", "0", "--out", str(out / "lim.jsonl"), "--scores_out", str(out / "scores.jsonl"),
                     "--random_out", str(out / "rand.jsonl"), "--plot_out", ""])
    scores = common.read_jsonl(out / "scores.jsonl")
    kept = [r["id"] for r in scores if r["score"] is not None and r["score"] >= 0]
    assert [r["id"] for r in common.read_jsonl(out / "lim.jsonl")] == kept and len(kept) >= 2
    assert len(common.read_jsonl(out / "rand.jsonl")) == len(kept)
    rl(str(out / "lim.jsonl"), str(tmp_path / "lim"), 2, 2)
    trained = {r["id"] for step in (1, 2)
               for r in common.read_jsonl(tmp_path / "lim" / "rollouts" / f"step_{step:06d}.jsonl")}
    assert trained <= set(kept)
    assert ckpt.checkpoint_steps(str(tmp_path / "lim")) == [2]


# -----------------------------------------------------------------------------
# bad input: one line naming the file, line and field; nothing written


def break_line(path, lineno, text):
    lines = open(path).read().splitlines()
    lines[lineno - 1] = text
    open(path, "w").write("\n".join(lines) + "\n")


def step_epoch(file_step, epoch):
    """A damage: every row of step file_step's log of this epoch."""
    def damage(log, pool):
        path = log / f"step_{file_step:06d}.jsonl"
        common.write_jsonl(str(path), [{**row, "epoch": epoch} for row in common.read_jsonl(str(path))])
    return damage


def first_row(file_step, prompt=0, **fields):
    """A damage: the first row of step file_step's log replaced by one of this pool prompt, reward 1, these fields."""
    return lambda log, pool: break_line(log / f"step_{file_step:06d}.jsonl", 1,
                                        json.dumps({"id": pool[prompt]["id"], "reward": 1, "step": file_step,
                                                    **fields}))


def repeat_first_row(file_step):
    """A damage: the first row of step file_step's log written twice."""
    def damage(log, pool):
        path = log / f"step_{file_step:06d}.jsonl"
        rows = common.read_jsonl(str(path))
        common.write_jsonl(str(path), rows + rows[:1])
    return damage


@pytest.mark.parametrize("damage,message", [
    (lambda log, pool: break_line(log / "step_000003.jsonl", 2, '{"id": "toy-train-00000", "reward": '),
     r"step_000003\.jsonl:2: not valid JSON"),
    (lambda log, pool: break_line(log / "step_000003.jsonl", 1,
                                  json.dumps({"id": "nope", "reward": 1, "step": 3, "epoch": 1})),
     r"step_000003\.jsonl:1: field 'id' 'nope' is not a prompt of the pool"),
    (lambda log, pool: break_line(log / "step_000004.jsonl", 2,
                                  json.dumps({"id": pool[1]["id"], "reward": "1", "epoch": 1})),
     r"step_000004\.jsonl:2: field 'reward' is '1', expected int or float"),
    (lambda log, pool: break_line(log / "step_000004.jsonl", 2,
                                  json.dumps({"id": pool[1]["id"], "reward": float("nan"), "epoch": 1})),
     r"step_000004\.jsonl:2: field 'reward' is nan, expected a finite number"),
    # a blank line: errors name the file's line, not the row's number
    (lambda log, pool: break_line(log / "step_000003.jsonl", 1,
                                  "\n" + json.dumps({"id": "nope", "reward": 1, "step": 3})),
     r"step_000003\.jsonl:2: field 'id' 'nope' is not a prompt of the pool"),
    (lambda log, pool: break_line(log / "step_000005.jsonl", 1,
                                  json.dumps({"id": pool[0]["id"], "reward": 1, "step": 5, "epoch": -1})),
     r"step_000005\.jsonl:1: field 'epoch' is -1"),
    (lambda log, pool: break_line(log / "step_000002.jsonl", 1, json.dumps({"id": pool[2]["id"], "epoch": 0})),
     r"step_000002\.jsonl:1: missing field 'reward'"),
    (lambda log, pool: os.remove(log / "step_000004.jsonl"), r"step_000004\.jsonl: file not found .*hole"),
    # a step 0 (no train_rl.py step): "step_000001.jsonl: file not found", of a file that was there
    (lambda log, pool: shutil.copy(log / "step_000001.jsonl", log / "step_000000.jsonl"),
     r"step_000000\.jsonl: step 0, where a probe run's steps start at 1"),
    (lambda log, pool: [os.remove(p) for p in log.glob("*.jsonl")], r"rollouts: no rollouts \(no step_N\.jsonl"),
    # an empty step file is a damaged copy (train_rl.py never writes one): read as no rollouts, it changed the
    # scores of an epoch (mid-run) or dropped the last as a stopped one
    (lambda log, pool: open(log / "step_000004.jsonl", "w").close(),
     r"step_000004\.jsonl: no rows; its writer never writes an empty file, so this is a damaged copy"),
    (first_row(3, step=2, epoch=1), r"step_000003\.jsonl:1: field 'step' is 2, expected 3"),
    # the logged epochs, step after step, start at 0 and never go down or skip one
    (step_epoch(1, 1), r"step_000001\.jsonl:1: field 'epoch' is 1, expected 0 \(the log's first step\): a probe run's"),
    (first_row(4, prompt=5, epoch=0),
     r"step_000004\.jsonl:1: field 'epoch' is 0, expected 1 or 2 \(step 3 ended in epoch 1\)"),
    # one run draws a prompt once an epoch, as one group: logs of two runs mixed, or a row repeated, were counted
    (first_row(2, epoch=0, sample=0), r"step_000002\.jsonl:1: id 'toy-train-00000' was drawn in epoch 0 already, at "
                                      r"step 1: a probe run draws a prompt once an epoch \(logs of two runs mixed"),
    (repeat_first_row(3), r"step_000003\.jsonl:5: sample 0 of id 'toy-train-00000' in epoch 1 is logged twice"),
    (step_epoch(3, 2), r"step_000003\.jsonl:1: field 'epoch' is 2, expected 0 or 1 \(step 2 ended in epoch 0\)"),
    (first_row(1, epoch=2), r"step_000001\.jsonl:1: field 'epoch' is 2, but no row of step 1 is of epoch 1"),
])
def test_bad_input_is_one_line_naming_the_place_and_nothing_is_written(hand, damage, message):
    damage(hand["dir"] / "probe" / "rollouts", hand["pool"])
    with pytest.raises(common.UserError, match=message):
        lim_select.main(hand["args"])
    assert not hand["out"].exists()


def test_a_step_whose_refills_cross_an_epochs_end_is_read_in_any_row_order(hand):
    """Dynamic sampling's refills can end a step in the next epoch, and a run seeded by rank logs its rows in rank
    order, so that a step's epochs alternate (0, 1, 0): read, not refused (a row-by-row check refused it)."""
    path = hand["dir"] / "probe" / "rollouts" / "step_000002.jsonl"
    rows = common.read_jsonl(str(path))
    common.write_jsonl(str(path), [rows[0], {**rows[1], "epoch": 1}, {**rows[0], "sample": 2}])
    pool_ids = {str(r["id"]): i for i, r in enumerate(hand["pool"])}
    outcomes = lim_select.read_outcomes(str(hand["dir"] / "probe"), pool_ids, 0)
    assert [epoch for epoch, _, _ in outcomes][6:9] == [0, 1, 0]  # (after step 1's six rows)


def test_an_output_on_an_input_or_another_output_is_refused_before_anything_is_written(hand):
    pool_file = hand["dir"] / "pool.jsonl"
    before = pool_file.read_bytes()

    def with_setting(flag, value):
        args = list(hand["args"])
        args[args.index(flag) + 1] = value
        return args
    with pytest.raises(common.UserError, match=r"--out .*pool\.jsonl: that is an input \(--train_data\)"):
        lim_select.main(with_setting("--out", str(pool_file)))
    assert pool_file.read_bytes() == before
    with pytest.raises(common.UserError, match=r"--random_out .*lim\.jsonl: the same file as --out"):
        lim_select.main(with_setting("--random_out", str(hand["out"] / "lim.jsonl")))
    assert not hand["out"].exists()
    log = hand["dir"] / "probe" / "rollouts" / "step_000002.jsonl"  # (--scores_out there overwrote the probe's log)
    before = log.read_bytes()
    with pytest.raises(common.UserError, match=r"--scores_out .*step_000002\.jsonl: that is an input \(--rollouts\)"):
        lim_select.main(with_setting("--scores_out", str(log)))
    assert log.read_bytes() == before


def test_bad_input_from_the_command_line_exits_2_with_one_line(hand):
    break_line(hand["dir"] / "probe" / "rollouts" / "step_000003.jsonl", 1,
               json.dumps({"id": "nope", "reward": 1, "step": 3, "epoch": 1}))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "lim_select.py"), *hand["args"]], env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "step_000003.jsonl:1: field 'id' 'nope'" in proc.stderr
    assert not hand["out"].exists()


def test_a_selection_that_keeps_nothing_writes_nothing(hand):
    with pytest.raises(common.UserError, match=r"no prompt scored >= --threshold 0\.95 \(the highest is 0\.918\)"):
        lim_select.main(hand["args"] + ["--threshold", "0.95"])
    assert not hand["out"].exists()


def test_a_bonus_reward_counts_as_solved(hand):
    """A reward above 1 (a task's bonus) is right, as tasks.is_correct says everywhere else: the log with every 1
    written 1.5 scores as the hand example does (0.5 stays unsolved)."""
    lim_select.main(hand["args"])
    want = common.read_jsonl(hand["out"] / "scores.jsonl")
    pool = hand["pool"]
    for step in range(1, 7):
        rows = [{"id": pool[i]["id"], "reward": 1.5 if r == 1 else r, "step": step, "sample": k,
                 "epoch": (step - 1) // 2} for s, i, rewards in LOG if s == step for k, r in enumerate(rewards)]
        common.write_jsonl(hand["dir"] / "probe" / "rollouts" / f"step_{step:06d}.jsonl", rows)
    lim_select.main(hand["args"])
    assert common.read_jsonl(hand["out"] / "scores.jsonl") == want


def test_a_probe_run_still_running_is_refused(hand):
    """lim_select on a live probe scored whatever epochs its log held so far and wrote LIM and RAND without a word
    (or blamed a stop for the epoch under way). While the probe holds its directory's lock: refused, nothing
    written; once it has ended: scored."""
    from conftest import ROOT, subprocess_env
    probe = str(hand["dir"] / "probe")
    holder = subprocess.Popen([sys.executable, "-c", f"import common, sys; common.lock_run_dir({probe!r}); "
                               "print('locked', flush=True); sys.stdin.read()"], cwd=ROOT, env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(common.UserError, match=rf"probe: the probe run is still running \(pid {holder.pid} on "
                                                   r".*\), so its rollout log is not complete"):
            lim_select.main(hand["args"])
        assert not hand["out"].exists()
    finally:
        holder.communicate("", timeout=60)  # (its stdin closed: it ends, and the lock goes with it)
    lim_select.main(hand["args"])
    assert (hand["out"] / "lim.jsonl").exists()
