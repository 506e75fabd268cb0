"""reproduce.sh: the micro preset end to end (every artefact, the final table), stage skipping on a re-run,
and --dry-run of the paper presets (complete commands with the paper's key flags)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

# every variable reproduce.sh and its presets read ($NAME, ${NAME...}; HOME aside): the tests set what they need and
# leave out what the shell running them has (OUT=..., SEEDS=3, LIMR=1 as the README shows would run other studies)
STUDY_VARIABLES = {name for path in [os.path.join(ROOT, "reproduce.sh"), *glob.glob(os.path.join(ROOT, "config", "*"))]
                   for name in re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", open(path).read())} - {"HOME"}


def study_env(**env):
    """The environment a test runs reproduce.sh in: the shell's, less every study variable, and then env."""
    return {k: v for k, v in os.environ.items() if k not in STUDY_VARIABLES} | env


def run_reproduce(*args, env=None, check=True):
    e = study_env(**{"OMP_NUM_THREADS": "1", "THREADS": "1", **(env or {})})  # (the preset's own setting: 2)
    proc = subprocess.run(["bash", os.path.join(ROOT, "reproduce.sh"), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"reproduce.sh {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_checkpoint(path):
    return os.path.exists(os.path.join(path, "config.json")) and any(
        n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in os.listdir(path))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("micro") / "run")
    proc = run_reproduce("micro", env={"MICRO_OUT": out})
    yield out, proc
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow  # the micro_run fixture: reproduce.sh micro, ~1 minute
def test_micro_pipeline_writes_every_artefact(micro_run):
    out, proc = micro_run
    for split in ("train", "test", "sft"):
        assert read_jsonl(f"{out}/data/{split}.jsonl")
    assert os.path.exists(f"{out}/base_data/tokenizer/tokenizer.json")
    base_text = read_jsonl(f"{out}/base_data/pretrain.jsonl")
    # its 10 + 10 puzzles and no claim drills (tiny_base's default adds 12,000: minutes of pre-training in a test)
    assert all("text" in d for d in base_text) and len(base_text) == 20
    teacher = read_jsonl(f"{out}/sft_teacher.jsonl")
    assert teacher and all({"id", "task", "prompt", "response"} <= set(r) for r in teacher)
    for ckpt in ("base/final", "sft/final", "rl/step_000003"):
        assert is_checkpoint(f"{out}/{ckpt}"), ckpt
    metrics = read_jsonl(f"{out}/rl/metrics.jsonl")
    assert [m["step"] for m in metrics if "reward" in m] == [1, 2, 3]
    assert len(os.listdir(f"{out}/rl/rollouts")) == 3
    names = ["base", "sft", "rl"]
    for v in ("A", "B"):  # a set may be empty (nothing correct); then its model is skipped, never half-made
        rows = read_jsonl(f"{out}/redistill_{v}.jsonl")
        assert all(r["reward"] == 1.0 for r in rows)
        if rows:
            assert is_checkpoint(f"{out}/redistill_{v}/final")
            names.append(f"redistill_{v}")
        else:
            assert f"redistill_{v}: skipped" in proc.stdout
    for name in names:
        with open(f"{out}/eval/{name}/test/summary.json") as f:
            summary = json.load(f)
        assert set(summary["by_difficulty"]) == {"2", "3"} and 0 <= summary["overall"]["accuracy"] <= 1
    assert "== sample_effect: skipped (SAMPLE_EFFECT=0" in proc.stdout  # micro's policy has no reward to differentiate
    stages = [line.split("\t")[0] for line in open(f"{out}/times.tsv")]
    assert stages == ["data", "base_text", "base", "base_probe", "teacher_data", "sft", "rl", "sample_A",
                      "sample_B"] + \
        [n for n in ("redistill_A", "redistill_B") if n in names] + ["eval"] + \
        ["limr_probe_1", "limr_select_1", "limr_lim_1", "limr_rand_1", "limr_eval_1_0"]
    # the final table: printed and in results.md, a row per evaluated model, the GRPO gain stated
    with open(f"{out}/results.md") as f:
        table = f.read()
    assert table in proc.stdout
    assert "| checkpoint | people 2 | people 3 | overall |" in table
    assert "SFT samples" in table and "RL rollouts" in table
    for name in names:
        assert f"| {name} |" in table
    assert "GRPO gain over its start" in table and "Wall time per stage" in table
    # the base probed in its own pre-training format: every test question asked, the line in the table
    with open(f"{out}/base_probe.json") as f:
        probe = json.load(f)
    assert probe["n"] == len(read_jsonl(f"{out}/data/test.jsonl")) and set(probe["people"]) == {"2", "3"}
    assert 0 <= probe["accuracy"] <= 1 and "The base asked in its own pre-training format" in table


@pytest.mark.slow  # the micro_run fixture
def test_micro_limr_stages_probe_select_train_and_table(micro_run):
    """LIMR=1 (micro sets it): the probe's epochs, the selection, FULL = the probe at the arms' step, the table."""
    out, proc = micro_run
    seed_dir = f"{out}/limr/seed_1"
    pool = read_jsonl(f"{out}/data/train.jsonl")
    for step in range(1, 9):  # 8 puzzles, 2 per step: epochs of 4 steps
        assert {r["epoch"] for r in read_jsonl(f"{seed_dir}/full/rollouts/step_{step:06d}.jsonl")} == {(step - 1) // 4}
    scores = read_jsonl(f"{seed_dir}/scores.jsonl")
    assert [r["id"] for r in scores] == [r["id"] for r in pool] and all(len(r["accuracy"]) == 2 for r in scores)
    assert read_jsonl(f"{seed_dir}/lim.jsonl") == [r for r, s in zip(pool, scores) if s["score"] is not None]
    assert sorted(r["id"] for r in read_jsonl(f"{seed_dir}/rand.jsonl")) == \
        sorted(r["id"] for r in read_jsonl(f"{seed_dir}/lim.jsonl"))  # as many, from the 8: the same 8
    for run in ("full", "lim", "rand"):  # FULL is the probe's checkpoint at the arms' step 2
        assert is_checkpoint(f"{seed_dir}/{run}/step_000002"), run
    for name in ("start", "full_1", "lim_1", "rand_1"):
        with open(f"{out}/limr/eval/{name}/test/summary.json") as f:
            assert 0 <= json.load(f)["overall"]["accuracy"] <= 1
    with open(f"{out}/results.md") as f:
        table = f.read()
    assert "### LIMR: RL on the LIM subset" in table
    # 2 steps x 2 prompts x 2 rollouts each; LIM's selection also cost the probe's 8 steps (32 rollouts)
    assert "| FULL | 1 | 8 | 2 | 8 | 8 |" in table and "| RAND | 1 | 8 | 2 | 8 | 8 |" in table
    assert "| LIM | 1 | 8 | 2 | 8 | 40 |" in table
    assert "seed 1: the probe ran 8 steps (32 rollouts) on the 8 prompts of the pool; 8 scored, 0 dropped" in table


@pytest.mark.slow  # the micro_run fixture
def test_a_dry_run_of_a_finished_study_lists_every_stage_done(micro_run):
    """--dry-run shows what a run would do: on a finished study, nothing. Its re-distillation sets, smaller than one
    SFT batch, were skipped by the run, so the dry run skips them too (it assumed them trained, built another eval
    command and told the user to delete the markers of stages that were done)."""
    out, _ = micro_run
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in os.listdir(f"{out}/done"):
        assert f"== {stage}: done" in proc.stdout
    if not open(f"{out}/redistill_A.jsonl").read().strip():
        assert "== redistill_A: skipped" in proc.stdout


@pytest.mark.slow  # the micro_run fixture
def test_a_stage_done_again_after_a_later_one_was_skipped_is_warned_of(micro_run):
    """sft done again (its marker and outputs removed, then a re-run) while rl stayed done: rl was skipped and the
    table compared the new cold start with the RL run of the old one, without a word. A skipped stage whose marker is
    older than that of a stage whose outputs its command names is warned of now; a stage none reads (the base's probe,
    an evaluation, whose marker a re-scoring rewrites) warns of nothing."""
    out = micro_run[0]  # (a copy elsewhere is another study: its markers name this OUT)
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr
    markers = {name: os.stat(f"{out}/done/{name}") for name in ("sft", "eval", "base_probe")}
    later = max(os.path.getmtime(f"{out}/done/{name}") for name in os.listdir(f"{out}/done")) + 10
    try:
        os.utime(f"{out}/done/sft", (later, later))  # as a re-run of sft leaves it
        proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False)
        assert proc.returncode == 0
        warned = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
        assert warned[0].startswith("warning: stage sft ran after rl was done, and rl reads what it wrote")
        assert any(w.startswith("warning: stage sft ran after limr_probe_1 was done") for w in warned)
        assert not any("sample_B was done" in w for w in warned)  # (it reads rl's rollouts, done before sft's)
        os.utime(f"{out}/done/sft", ns=(markers["sft"].st_atime_ns, markers["sft"].st_mtime_ns))
        for name in ("eval", "base_probe"):
            os.utime(f"{out}/done/{name}", (later, later))
        assert "warning" not in run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False).stderr
    finally:  # (the fixture's study, as it was, for the tests after this one)
        for name, st in markers.items():
            os.utime(f"{out}/done/{name}", ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.slow  # the micro_run fixture
def test_rerun_skips_finished_stages_and_resumes_a_partial_one(micro_run):
    out, _ = micro_run
    # pretend RL was killed after step 2: drop its marker, the last checkpoint and what came after it
    for stage in os.listdir(f"{out}/done"):
        if (stage not in ("data", "base_text", "base", "base_probe", "teacher_data", "sft")
                and not stage.startswith("limr")):
            os.remove(f"{out}/done/{stage}")
    shutil.rmtree(f"{out}/rl/step_000003")
    os.remove(f"{out}/rl/step_000003.state.pt")
    proc = run_reproduce("micro", env={"MICRO_OUT": out})
    for stage in ("data", "base_text", "base", "base_probe", "teacher_data", "sft"):
        assert f"== {stage}: done" in proc.stdout
    assert "resuming from" in proc.stdout and "(step 2)" in proc.stdout
    assert [m["step"] for m in read_jsonl(f"{out}/rl/metrics.jsonl") if "reward" in m] == [1, 2, 3]
    assert "skipping" in proc.stdout or "done" in proc.stdout  # eval.py skips the pairs it finished
    assert "| rl |" in proc.stdout


@pytest.mark.slow  # the micro_run fixture
def test_a_finished_studys_evaluation_re_check_that_fails_leaves_its_results_and_the_study_goes_on(micro_run):
    """A done eval stage runs again (to re-score with today's scorer); with a checkpoint deleted since (disk space),
    eval.py fails: the earlier results stand, with a warning, and the report is still written."""
    out, _ = micro_run
    os.rename(f"{out}/sft/final", f"{out}/sft/final.aside")
    try:
        os.remove(f"{out}/results.md")
        proc = run_reproduce("micro", env={"MICRO_OUT": out})
        assert "warning: stage eval's re-check failed (above); its earlier results stand" in proc.stderr
        assert "| sft |" in open(f"{out}/results.md").read()
    finally:
        os.rename(f"{out}/sft/final.aside", f"{out}/sft/final")


@pytest.mark.slow  # the micro_run fixture
def test_an_evaluation_done_under_the_other_scoring_rule_is_re_checked_not_refused(micro_run):
    """eval.py --score_truncated decides scoring only, and eval.py's re-check re-scores its finished pairs for it: a
    study whose preset switched it (the paper presets did) goes on, where the changed command stopped it and its
    error said to evaluate everything again; the marker then holds the command that re-scored."""
    out, _ = micro_run
    path = f"{out}/done/eval"
    seconds, command = open(path).read().splitlines()
    with open(path, "w") as f:  # as if evaluated under the other rule
        f.write(f"{seconds}\n{command} --score_truncated true\n")
    try:
        proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "== eval: done; eval.py checks its pairs" in proc.stdout
        assert "its marker then takes this command" in proc.stdout
        assert open(path).read().splitlines() == [seconds, f"{command} --score_truncated true"]  # (a dry run)
        proc = run_reproduce("micro", env={"MICRO_OUT": out})
        assert open(path).read().splitlines() == [seconds, command]
    finally:
        with open(path, "w") as f:
            f.write(f"{seconds}\n{command}\n")
    with open(path, "w") as f:  # another setting of eval.py still counts
        f.write(f"{seconds}\n{command} --seed 3\n")
    try:
        proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": out}, check=False)
        assert proc.returncode == 1 and "error: stage eval in " + out + " was done with another command" in proc.stderr
    finally:
        with open(path, "w") as f:
            f.write(f"{seconds}\n{command}\n")


@pytest.mark.slow  # the micro_run fixture
def test_a_finished_stage_with_another_command_is_an_error_not_a_skip(micro_run):
    """Seed 2 into seed 1's OUT: every stage's command differs (its seeds), so the first one stops the run with both
    commands named, instead of passing off seed 1's outputs as seed 2's."""
    out, _ = micro_run
    marker = open(f"{out}/done/data").read().splitlines()
    assert marker[0].isdigit() and "kk_data.py" in marker[1]  # seconds, then the command
    proc = run_reproduce("micro", env={"MICRO_OUT": out, "SEED": "2"}, check=False)
    assert proc.returncode == 1 and "error: stage data in " + out + " was done with another command" in proc.stderr
    assert "  was: " + marker[1] in proc.stderr and "  now: " in proc.stderr


@pytest.mark.slow  # the micro_run fixture
def test_a_set_smaller_than_one_sft_batch_is_skipped_as_an_empty_one(micro_run):
    """redistill_sft.py trains no step on fewer samples than --global_batch (micro's 4) and refuses them: a policy
    with a few correct answers must not stop the study before its evaluation and report."""
    out, _ = micro_run
    path = f"{out}/redistill_A.jsonl"
    before = open(path).read()
    if before.strip():
        pytest.skip("micro's policy gave correct samples this time: its model was trained")
    row = dict(read_jsonl(f"{out}/sft_teacher.jsonl")[0], source="greedy", reward=1.0)
    try:
        with open(path, "w") as f:
            f.write(json.dumps(row) + "\n")
        proc = run_reproduce("micro", env={"MICRO_OUT": out})
        assert f"== redistill_A: skipped, the RL policy gave 1 correct sample(s) ({path}), fewer than one SFT " \
               f"batch (4)" in proc.stdout
        assert "== eval: done" in proc.stdout and "| rl |" in proc.stdout and "| redistill_A |" not in proc.stdout
    finally:
        with open(path, "w") as f:
            f.write(before)


def test_a_seed_that_stops_says_no_table_over_the_seeds_was_made(tmp_path):
    """SEEDS=N stopped at a later seed with that seed's error alone, leaving OUT/results.md, seed 1's own table, as
    if it were the study's. The outer run says so, with how to go on (here seed 2's OUT is a file)."""
    out = tmp_path / "t"
    out.mkdir()
    (out / "seed_2").write_text("in the way")
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(out), "SEEDS": "2"}, check=False)
    assert proc.returncode == 2 and f"error: OUT {out}/seed_2 is a file" in proc.stderr
    assert (f"error: seed 2 of 2 stopped (above); no table over the seeds was made, and {out}/results.md is seed 1's "
            f"alone. Run the same command again to go on") in proc.stderr


@pytest.mark.slow  # the micro_run fixture
def test_seeds_2_runs_a_second_seed_and_tables_mean_std(micro_run):
    out, _ = micro_run
    proc = run_reproduce("micro", env={"MICRO_OUT": out, "SEEDS": "2"})
    assert "==== seed 1 of 2 -> " + out in proc.stdout and f"==== seed 2 of 2 -> {out}/seed_2" in proc.stdout
    assert "== rl: done" in proc.stdout  # seed 1 is the finished run: skipped
    seed2 = f"{out}/seed_2"
    # every stage of seed 2 has its own seed: other puzzles, other pre-training text, RL's seed moved by one
    ids = {s: {r["id"] for r in read_jsonl(f"{d}/data/train.jsonl")} for s, d in ((1, out), (2, seed2))}
    assert ids[1] and ids[2] and not ids[1] & ids[2]
    assert read_jsonl(f"{out}/data/test.jsonl") == read_jsonl(f"{seed2}/data/test.jsonl")  # the same questions
    assert read_jsonl(f"{out}/base_data/pretrain.jsonl") != read_jsonl(f"{seed2}/base_data/pretrain.jsonl")
    for d, seed in ((out, 1234), (seed2, 1235)):
        with open(f"{d}/rl/settings.json") as f:
            assert json.load(f)["seed"] == seed
    assert not os.path.exists(f"{seed2}/limr")  # LIMR has seeds of its own: it runs with seed 1 only
    with open(f"{out}/results.md") as f:
        text = f.read()
    assert "### Over 2 seeds" in text and "GRPO gain over its start (rl - sft, overall):" in text
    rl = [json.load(open(f"{d}/eval/rl/test/summary.json"))["overall"]["accuracy"] for d in (out, seed2)]
    mean, std = sum(rl) / 2, abs(rl[0] - rl[1]) / 2 ** 0.5
    assert "| rl | 2 |" in text and f"{mean:.3f} ± {std:.3f} |" in text


def test_a_stage_that_fails_is_logged_as_a_stopped_attempt_and_not_marked_done(tmp_path):
    """Its seconds count in the report's device hours, but it is not skipped on the next run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "data").write_text("a file where the data directory goes: kk_data.py cannot write its splits")
    (out / "times.tsv").write_text("data\t1")  # an earlier attempt's line, cut short by a kill: left on its own
    proc = run_reproduce("micro", env={"MICRO_OUT": str(out)}, check=False)
    assert proc.returncode != 0 and "== data" in proc.stdout and "== base_text" not in proc.stdout
    assert (out / "times.tsv").read_text(encoding="utf-8").splitlines()[0] == "data\t1"
    name, seconds, devices, kind, status = (out / "times.tsv").read_text(encoding="utf-8").splitlines()[-1].split("\t")
    assert (name, devices, kind, status) == ("data", "1", "cpu", "stopped") and int(seconds) >= 0
    assert not (out / "done" / "data").exists()


def test_a_second_study_on_the_same_out_is_refused(tmp_path):
    """Two reproduce.sh on one OUT would run the same stages over each other's files: the second stops at once."""
    import fcntl
    if not shutil.which("flock"):
        pytest.skip("no flock(1) here: reproduce.sh takes no lock")
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".reproduce.lock", "w") as held:  # as a running study holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_reproduce("micro", env={"MICRO_OUT": str(out)}, check=False)
    assert proc.returncode == 1 and f"another reproduce.sh is running on {out}" in proc.stderr
    assert os.listdir(out) == [".reproduce.lock"]  # no stage ran


@pytest.mark.parametrize("flock_works", [True, False])
def test_a_study_whose_out_was_moved_away_while_it_ran_stops_writing_there(flock_works, tmp_path):
    """`mv OUT` (or `rm -rf OUT`) and a re-run while a study runs: the re-run took a new lock there, and this script
    wrote its done markers and times into it and ran its next stages among the re-run's files. It stops after the
    stage under way, writing nothing more at that path; on a file system without locks too (flock fails there)."""
    if not shutil.which("flock"):
        pytest.skip("no flock(1) here: reproduce.sh takes no lock")
    out, moved, bin_dir = tmp_path / "run", tmp_path / "moved", tmp_path / "bin"
    bin_dir.mkdir()
    if not flock_works:
        (bin_dir / "flock").write_text('#!/bin/bash\necho "flock: 9: No locks available" >&2; exit 1\n')
        (bin_dir / "flock").chmod(0o755)
    fake = bin_dir / "python"  # the data stage: OUT is moved away and a re-run makes it anew while the stage runs
    fake.write_text(f'#!/bin/bash\nif [[ "$1" == kk_data.py ]]; then mv {out} {moved}; mkdir {out}; touch '
                    f'{out}/.reproduce.lock; exit 0; fi\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    proc = run_reproduce("micro", env={"MICRO_OUT": str(out), "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                         check=False)
    assert proc.returncode == 1 and f"error: {out} was removed or moved away while this reproduce.sh ran" in proc.stderr
    assert "== base_text" not in proc.stdout and os.listdir(out) == [".reproduce.lock"]
    assert not (moved / "done").exists()  # (the stage did not finish in the study's own directory either)


def test_the_tiny_preset_runs_its_own_thread_count_not_the_shells():
    """Another CPU thread count rounds otherwise, so the figures hold for the preset's 2: an OMP_NUM_THREADS left in
    the shell is overridden, with a note; THREADS chooses another."""
    def threads(**env):
        e = study_env(**env, SEED="1")
        proc = subprocess.run(["bash", "-c", "source config/tiny.sh && echo $OMP_NUM_THREADS"], cwd=ROOT, env=e,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip(), proc.stderr
    assert threads() == ("2", "")
    out, err = threads(OMP_NUM_THREADS="1")
    assert out == "2" and "OMP_NUM_THREADS=1 in the environment; this preset runs THREADS=2" in err
    assert threads(OMP_NUM_THREADS="1", THREADS="1") == ("1", "")


def test_dry_run_of_seeds_gives_each_seed_its_own_directory_and_seeds(tmp_path):
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "t"), "SEEDS": "2"})
    first, second = proc.stdout.split("==== seed 2 of 2")
    assert f"--out_dir {tmp_path}/t/rl " in first and "--seed 1234" in first and "--train_seed 100000 " in first
    assert f"--out_dir {tmp_path}/t/seed_2/rl " in second and "--seed 1235" in second
    assert "--train_seed 1100003 " in second and "--teacher_seed 1" in second and "--seed 1300003" in second
    report = f"+ python report.py --out_dir {tmp_path}/t --preset tiny --seeds 2 --limr_seeds 1 2 3"
    assert proc.stdout.rstrip().endswith(report)
    bad = run_reproduce("tiny", "--dry-run", env={"SEEDS": "two"}, check=False)
    assert bad.returncode == 2 and "SEEDS (two) must be positive integers" in bad.stderr
    for env, error in (({"LIMR": "yes"}, "LIMR is 'yes': 1 (run it) or 0"),  # (it ran as LIMR=0, silently)
                       ({"LIMR_ONLY": "true"}, "LIMR_ONLY is 'true': 1 (run it) or 0"),
                       ({"THREADS": "0"}, "THREADS is '0': the CPU threads of every stage, a positive integer"),
                       # (01 ran as limr/seed_01, which the report, reading the number 1, left out of its tables)
                       ({"LIMR_SEEDS": "01"}, "LIMR_SEEDS holds '01': each LIMR seed, a non-negative integer"),
                       ({"LIMR_SEEDS": "1 x"}, "LIMR_SEEDS holds 'x'"),
                       ({"SELECT_K": "abc"}, "SELECT_K holds 'abc': the samples of each sample-effect selection")):  # (the shell's arithmetic read it as 0)
        bad = run_reproduce("tiny", "--dry-run", env=env, check=False)
        assert bad.returncode == 2 and error in bad.stderr and not bad.stdout


def test_a_setting_the_preset_sets_otherwise_is_noted_and_tinys_selection_size_is_taken(tmp_path):
    """micro sets RL_STEPS=3 itself: RL_STEPS=5 from the environment ran 3 steps without a word. tiny's SELECT_K and
    SELECT_FROM were set outright, so SELECT_K=50 ran 100; they are defaults now."""
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(tmp_path / "m"), "RL_STEPS": "5"}, check=False)
    assert proc.returncode == 0
    assert "note: RL_STEPS=5 from the environment: preset micro sets RL_STEPS=3, which this run uses" in proc.stderr
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "t"), "SELECT_K": "50"}, check=False)
    assert proc.returncode == 0 and "--select 50 " in proc.stdout and "note" not in proc.stderr


def test_a_study_goes_on_at_its_own_thread_count_only(tmp_path):
    """Another THREADS rounds every stage otherwise: a training stage's resume refuses it, but sampling and
    evaluation took it, and one study held stages of two counts. The count is recorded in OUT/cpu_threads at the
    start, and another is refused before any stage."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "cpu_threads").write_text("2\n")
    proc = run_reproduce("micro", env={"MICRO_OUT": str(out)}, check=False)  # (study_env: THREADS=1)
    assert proc.returncode == 2 and "the study in" in proc.stderr and "ran with THREADS=2" in proc.stderr
    assert "== data" not in proc.stdout and not (out / "done").exists()


def test_seeds_and_help_work_when_started_from_another_directory(tmp_path):
    """The script moves to its own directory first: a second seed and --help must still find the script, started as
    `bash REPO/reproduce.sh` from REPO's parent (a path relative to where it was started used to point nowhere) or
    through a symbolic link elsewhere (whose directory has no config/)."""
    e = study_env(OUT=str(tmp_path / "t"), SEEDS="2")
    link = tmp_path / "r.sh"
    link.symlink_to(os.path.join(ROOT, "reproduce.sh"))
    for script, cwd in ((os.path.join(os.path.basename(ROOT), "reproduce.sh"), os.path.dirname(ROOT)),
                        (str(link), str(tmp_path))):
        for args, expect in ((["tiny", "--dry-run"], "==== seed 2 of 2"), (["--help"], "reproduce.sh [PRESET]")):
            proc = subprocess.run(["bash", script, *args], cwd=cwd, env=e, capture_output=True, text=True,
                                  timeout=300)
            assert proc.returncode == 0 and expect in proc.stdout, proc.stderr[-2000:]


def test_help_prints_the_whole_header_and_the_presets():
    """--help is the script's opening comment, all of it (a fixed line range once cut it mid-sentence as the
    header grew), then the presets."""
    lines = open(os.path.join(ROOT, "reproduce.sh")).read().splitlines()[1:]
    header = lines[:next(i for i, line in enumerate(lines) if not line.startswith("#"))]
    proc = subprocess.run(["bash", os.path.join(ROOT, "reproduce.sh"), "--help"], env=study_env(), capture_output=True,
                          text=True, timeout=60)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0 and out[:len(header)] == header and "tiny.sh" in out[len(header):], proc.stdout


@pytest.mark.parametrize("preset,flags", [
    ("kk-qwen2.5-1.5b", ["--nproc_per_node=8", "--prompts_per_step 128", "--samples_per_prompt 8", "--temperature 0.7",
                         "--lr 5e-6", "--warmup_steps 8", "--beta1 0.5", "--max_response_tokens 4096",
                         "--max_steps 125", "--steps 125,115-124", "--num_examples 1000", "--global_batch 64",
                         "--lr 1e-5", "--epochs 2", "--test_people 4-8", "--train_people 3-7"]),
    ("math-qwen2.5-1.5b", ["--nproc_per_node=8", "--prompts_per_step 128", "--lr 2.5e-6", "--warmup_steps 4",
                           "--max_steps 50", "--global_batch 32", "--n_sft_train 900", "--task math"]),
])
def test_dry_run_of_paper_presets_prints_complete_commands(preset, flags, tmp_path):
    model_dir = str(tmp_path / "Qwen2.5-1.5B")  # need not exist for a dry run
    proc = run_reproduce(preset, "--dry-run", env={"GPUS": "8", "MODEL_DIR": model_dir, "OUT": str(tmp_path / "out")})
    commands = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    text = "\n".join(commands)
    scripts = ["_data.py", "redistill_sft.py", "train_rl.py", "sample_policy.py", "eval.py", "sample_effect.py",
               "report.py"]
    for script in scripts:
        assert script in text, script
    for flag in flags:
        assert flag in text, flag
    assert f"--init {model_dir}" in text and "--resume" in text
    assert "$" not in text  # every variable expanded
    assert not os.path.exists(tmp_path / "out")  # a dry run writes nothing


@pytest.mark.parametrize("preset,batches", [
    ("kk-qwen2.5-1.5b", {"sft": 64, "redistill_A": 64, "redistill_B": 32}),
    ("math-qwen2.5-1.5b", {"sft": 32, "redistill_A": 32, "redistill_B": 32}),
    ("tiny", {"sft": 8, "redistill_A": 8, "redistill_B": 8})])
def test_each_sft_of_a_preset_runs_at_the_papers_batch_for_its_set(preset, batches, tmp_path):
    """The paper's K&K set B trained at batch 32 (train_sft_kk_re_distill_rl.sh), its cold start and set A at 64:
    REDISTILL_B_ARGS reaches set B's command alone, after the shared SFT settings, and the K&K data command holds
    out the paper's 100 SFT puzzles. What the parser makes of each command is what the run gets."""
    import shlex
    import common
    import redistill_sft
    env = {"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": str(tmp_path / "out")}
    lines = run_reproduce(preset, "--dry-run", env=env).stdout.splitlines()
    stages = {line[3:]: lines[i + 1][2:] for i, line in enumerate(lines[:-1])
              if line.startswith("== ") and lines[i + 1].startswith("+ ")}
    for stage, batch in batches.items():
        argv = shlex.split(stages[stage])
        args = common.parse_settings(redistill_sft.get_parser(), argv[argv.index("redistill_sft.py") + 1:])
        assert args.global_batch == batch, stage
    assert ("--sft_val_fraction 0.1" in stages["data"]) == (preset == "kk-qwen2.5-1.5b")


@pytest.mark.parametrize("preset,limr", [("kk-qwen2.5-1.5b", "0"), ("math-qwen2.5-1.5b", "0"),
                                         ("limr-qwen2.5-math-7b", "0"), ("tiny", "1"), ("micro", "1")])
def test_every_command_of_every_preset_parses_with_its_scripts_own_settings(preset, limr, tmp_path):
    """A stale or misspelt flag in a preset would stop a paper run at that stage, hours in: each command of the dry
    run goes through its script's parser (the same parse_settings main() calls), with SEEDS=2 and LIMR where the
    preset has its stages."""
    import importlib
    import shlex
    import common
    seeds = "1" if preset.startswith("limr-") else "2"  # (a LIMR-only preset has LIMR_SEEDS: SEEDS=2 is refused)
    env = {"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": str(tmp_path / "out"), "SEEDS": seeds,
           "LIMR": limr}
    proc = run_reproduce(preset, "--dry-run", env=env)
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) >= 8
    for argv in commands:
        at = next(i for i, word in enumerate(argv) if word.endswith(".py"))
        script = importlib.import_module(os.path.basename(argv[at])[:-3])
        try:
            common.parse_settings(script.get_parser(), argv[at + 1:])
        except SystemExit:
            raise AssertionError(f"{preset}: {shlex.join(argv)[:300]} does not parse (argparse's error above)")


def test_seeds_with_the_limr_only_preset_is_an_error_before_any_stage(tmp_path):
    """SEED changes none of the LIMR preset's stages (its seeds are LIMR_SEEDS): SEEDS=2 would run the whole 7B
    experiment twice, identically, and the report reads one copy."""
    for seeds in ({"SEEDS": "2"}, {"SEED": "2"}):  # SEED=2 alone ran seed 1's commands again, labelled seed 2
        env = {"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": str(tmp_path / "out"), **seeds}
        proc = run_reproduce("limr-qwen2.5-math-7b", "--dry-run", env=env, check=False)
        assert proc.returncode == 2 and "set LIMR_SEEDS instead" in proc.stderr
        assert "+ " not in proc.stdout and not os.path.exists(tmp_path / "out")
    # ... and LIMR_SEEDS, as the message says, is taken (the preset overwrote it)
    env = {"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": str(tmp_path / "out"), "LIMR_SEEDS": "1 2"}
    proc = run_reproduce("limr-qwen2.5-math-7b", "--dry-run", env=env)
    assert "limr/seed_1/full" in proc.stdout and "limr/seed_2/full" in proc.stdout and "--limr_seeds 1 2" in proc.stdout


def test_dynamic_sampling_is_read_as_train_rl_reads_it(tmp_path):
    """DYNAMIC_SAMPLING=1 (or yes, on) ran dynamic sampling for the 100 steps of the run without it: neither measured
    setting. Read as train_rl reads it: true, 75 steps; anything else that is not a boolean is refused."""
    for value, steps, flag in (("1", 75, "true"), ("On", 75, "true"), ("no", 100, "false")):
        proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / value), "DYNAMIC_SAMPLING": value})
        assert f"--max_steps {steps} " in proc.stdout and f"--dynamic_sampling {flag} " in proc.stdout, value
    bad = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "x"), "DYNAMIC_SAMPLING": "maybe"}, check=False)
    assert bad.returncode == 2 and "DYNAMIC_SAMPLING=maybe: give true or false" in bad.stderr


def test_swap_twins_apart_reaches_every_split_the_tiny_preset_writes(tmp_path):
    """SWAP_TWINS=apart: the data, LIMR pool and base-text commands skip the test's swap twins, and nothing else
    changes; the default leaves every command as it was (finished studies' markers hold); another value is refused."""
    def commands(**env):
        proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out"), "LIMR": "1", **env})
        return stage_lines(proc.stdout)
    kept, apart = commands(), commands(SWAP_TWINS="apart")
    assert kept == commands(SWAP_TWINS="kept") and list(kept) == list(apart)
    changed = {stage: (kept[stage], apart[stage]) for stage in kept if kept[stage] != apart[stage]}
    assert changed == {"data": (kept["data"], kept["data"] + " --test_dedup swap"),
                       "base_text": (kept["base_text"], kept["base_text"] + " --exclude_swap_twins true"),
                       "limr_data": (kept["limr_data"], kept["limr_data"] + " --test_dedup swap")}
    bad = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "x"), "SWAP_TWINS": "yes"}, check=False)
    assert bad.returncode == 2 and "SWAP_TWINS=yes: give kept or apart" in bad.stderr
    # a preset that does not read it says so (micro's data stage is its own)
    micro = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(tmp_path / "m"), "SWAP_TWINS": "apart"})
    assert "note: SWAP_TWINS=apart from the environment: preset micro does not read it" in micro.stderr


def test_a_seed_given_with_seeds_is_an_error_not_ignored(tmp_path):
    """SEEDS=N runs seeds 1..N: SEED=4 beside it was dropped without a word."""
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(tmp_path / "out"), "SEED": "4", "SEEDS": "2"},
                         check=False)
    assert proc.returncode == 2 and "SEEDS=2 runs seeds 1..2; SEED=4 would be ignored" in proc.stderr
    assert run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(tmp_path / "out"), "SEED": "1",
                                                    "SEEDS": "2"}).returncode == 0


def test_a_data_directory_given_to_the_tiny_preset_is_one_per_seed(tmp_path):
    """The tiny preset's puzzles depend on the seed: with DATA set from outside, every seed of SEEDS=N wrote its
    splits into the same folder, and seed 1's runs then named files holding seed 2's puzzles."""
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out"), "DATA": str(tmp_path / "d"),
                                                   "SEEDS": "2"})
    data_lines = [line for line in proc.stdout.splitlines() if line.startswith("+ python kk_data.py --out_dir")]
    assert len(data_lines) == 2 and f"--out_dir {tmp_path / 'd'} " in data_lines[0]
    assert f"--out_dir {tmp_path / 'd' / 'seed_2'} " in data_lines[1]
    # ... and on SWAP_TWINS: a study with the swap twins apart in another OUT rewrote the kept study's splits (its
    # done-marker is in its own OUT), which the kept study then read on resume
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "apart"), "DATA": str(tmp_path / "d"),
                                                   "SEEDS": "2", "SWAP_TWINS": "apart"})
    data_lines = [line for line in proc.stdout.splitlines() if line.startswith("+ python kk_data.py --out_dir")]
    assert len(data_lines) == 2 and f"--out_dir {tmp_path / 'd' / 'swap_apart'} " in data_lines[0]
    assert f"--out_dir {tmp_path / 'd' / 'swap_apart' / 'seed_2'} " in data_lines[1]


def test_limr_with_a_preset_without_its_stages_is_an_error_before_any_stage(tmp_path):
    env = {"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": str(tmp_path / "out"), "LIMR": "1"}
    proc = run_reproduce("kk-qwen2.5-1.5b", "--dry-run", env=env, check=False)
    assert proc.returncode == 2 and "+ " not in proc.stdout
    assert "preset kk-qwen2.5-1.5b sets no LIMR stages" in proc.stderr


def preset_of(tmp_path, text):
    """A preset file outside config/ (reproduce.sh takes config/NAME.sh: NAME a path relative to config/)."""
    (tmp_path / "fake.sh").write_text("source config/tiny.sh\n" + text)
    return os.path.relpath(str(tmp_path / "fake"), os.path.join(ROOT, "config"))


def test_a_preset_whose_commands_cannot_run_is_refused_before_any_stage(tmp_path):
    """A task script path with a space passed the check and was cut at its stage, midway through a study; an empty
    stage command wrote a marker the next run took for an old one's; LIMR with one of its two step counts died at
    the end of the whole study (an unbound variable)."""
    env = {"OUT": str(tmp_path / "out")}
    for text, message in (('TASK_SCRIPT="/x/my tasks/task.py"\n', "error: TASK_SCRIPT is '/x/my tasks/task.py'"),
                          ('DATA_CMD=""\n', "error: stage data has no command"),
                          ("unset LIMR_PROBE_STEPS\n", "sets no LIMR stages (LIMR_STEPS and LIMR_PROBE_STEPS")):
        proc = run_reproduce(preset_of(tmp_path, text), "--dry-run", check=False,
                             env={**env, "LIMR": "1" if "LIMR" in text else "0"})
        assert proc.returncode == 2 and message in proc.stderr, (proc.stdout[-500:], proc.stderr[-500:])
        assert "+ python" not in proc.stdout and not os.path.exists(env["OUT"])


def test_dry_run_of_limrs_own_setting(tmp_path):
    """LIMR's preset: only the LIMR stages, from the base, with their settings."""
    model_dir, out = str(tmp_path / "Qwen2.5-Math-7B"), str(tmp_path / "out")
    proc = run_reproduce("limr-qwen2.5-math-7b", "--dry-run", env={"GPUS": "8", "MODEL_DIR": model_dir, "OUT": out})
    lines = proc.stdout.splitlines()
    command_of = {lines[i][3:]: lines[i + 1][2:] for i in range(len(lines) - 1)
                  if lines[i].startswith("== ") and lines[i + 1].startswith("+ ")}
    assert list(command_of) == ["data", "limr_probe_1234", "limr_select_1234", "limr_lim_1234", "limr_rand_1234",
                                "limr_eval_1234_0", "limr_eval_1234_1", "report"]
    assert "--n_sft_train 0 --n_sft_val 0" in command_of["data"]
    probe = command_of["limr_probe_1234"]
    for flag in ("--nproc_per_node=8", f"--model {model_dir}", "--max_steps 168", "--prompts_per_step 1024",
                 "--samples_per_prompt 8", "--temperature 1.2", "--max_response_tokens 3072", "--lr 5e-7",
                 "--beta2 0.95", "--ppo_mini_batches 32",
                 "--kl_coef 0.01 --kl_estimator k1", f"--out_dir {out}/limr/seed_1234/full"):
        assert flag in probe, flag
    assert f"--rollouts {out}/limr/seed_1234/full" in command_of["limr_select_1234"]
    assert "--threshold 0.6 --epochs 21" in command_of["limr_select_1234"]
    for arm in ("lim", "rand"):
        assert f"--model {model_dir}" in command_of[f"limr_{arm}_1234"]
        assert f"--train_data {out}/limr/seed_1234/{arm}.jsonl" in command_of[f"limr_{arm}_1234"]
        assert "--max_steps 120" in command_of[f"limr_{arm}_1234"]
    assert f"--checkpoints {model_dir} {out}/limr/seed_1234/full/step_000120 {out}/limr/seed_1234/lim/step_000120" \
        in command_of["limr_eval_1234_0"]
    assert ("--split_names aime24 amc23 --samples_per_prompt 4 --temperature 0.4 --top_p 0.95"
            in command_of["limr_eval_1234_1"])
    assert "$" not in "\n".join(command_of.values()) and not os.path.exists(out)


def test_dry_run_of_the_tiny_preset_includes_the_sample_effect_experiment(tmp_path):
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out")})
    lines = proc.stdout.splitlines()
    command_of = {lines[i][3:]: lines[i + 1][2:] for i in range(len(lines) - 1)
                  if lines[i].startswith("== ") and lines[i + 1].startswith("+ ")}
    assert "--fixed_names true" in command_of["data"] and "--fixed_names true" in command_of["base_text"]
    assert "--teacher_style table --teacher_cot_fraction 0.25" in command_of["teacher_data"]
    assert "--text_format table --drill_people 2-3" in command_of["base_text"]
    out = str(tmp_path / "out")
    # the base text: apart from the SFT pool up to renaming, from the test up to logic (its twins too)
    assert f"--exclude {out}/data/sft.jsonl --exclude_logic {out}/data/test.jsonl" in command_of["base_text"]
    assert "--test_dedup" not in command_of["data"]  # (kk_data's default: logic)
    assert (f"--select 100 --select_out {out}/sample_effect/top.jsonl --select_bottom {out}/sample_effect/bottom.jsonl "
            f"--select_random {out}/sample_effect/random.jsonl --select_from {out}/redistill_A.jsonl"
            in command_of["sample_effect"])
    for v in ("top", "bottom", "random"):
        assert (f"--init {out}/base/final --data {out}/sample_effect/{v}.jsonl --out_dir {out}/se_{v}"
                in command_of[f"se_{v}"])
    assert (f"--checkpoints {out}/se_top/final {out}/se_bottom/final {out}/se_random/final --names se_top se_bottom "
            "se_random" in command_of["eval_se"])
    assert not os.path.exists(out)


def test_the_selection_experiment_is_skipped_without_its_set(tmp_path):
    """SELECT_FROM names set A; a study whose RL policy gave A fewer samples than one SFT batch has no set A, so
    sample_effect ranks nothing and no se_* stage runs (pooling the other sets instead would be another experiment)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "redistill_A.jsonl").write_text('{"id": "x"}\n', encoding="utf-8")
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(out)})
    assert "== redistill_A: skipped" in proc.stdout
    assert (f"== se_top, se_bottom, se_random: skipped, SELECT_FROM={out}/redistill_A.jsonl is not one of this "
            "study's SFT sets") in proc.stdout
    effect = proc.stdout.split("== sample_effect\n+ ", 1)[1].splitlines()[0]
    assert "--sft_data" in effect and "--select" not in effect and "redistill_A" not in effect
    assert "== se_top" not in proc.stdout.replace("== se_top, se_bottom", "") and "== eval_se" not in proc.stdout


def test_the_selected_sets_sft_takes_its_own_settings_and_a_set_below_one_batch_is_skipped(tmp_path):
    """se_top/bottom/random trained with the cold start's settings whatever set was ranked (set B's paper recipe is
    batch 32, not 64), and a SELECT_K below one batch stopped the study at se_top."""
    out = str(tmp_path / "out")
    text = f'REDISTILL_B_ARGS="--global_batch 4"\nSELECT_FROM={out}/redistill_B.jsonl\n'
    proc = run_reproduce(preset_of(tmp_path, text), "--dry-run", env={"OUT": out})
    se_top = proc.stdout.split("== se_top\n+ ", 1)[1].splitlines()[0]
    assert se_top.endswith("--global_batch 4") and f"--select_from {out}/redistill_B.jsonl" in proc.stdout
    proc = run_reproduce(preset_of(tmp_path, "SELECT_K=5\n"), "--dry-run", env={"OUT": out})
    assert ("== se_top, se_bottom, se_random: skipped, SELECT_K=5 samples are fewer than one SFT batch (8)"
            in proc.stdout) and "== eval_se" not in proc.stdout


def test_a_selection_pool_smaller_than_a_top_and_a_bottom_k_skips_the_selection_not_the_study(tmp_path):
    """sample_effect.py refuses a top-K and a bottom-K that would share samples: a set A of one SFT batch or more but
    under 2 x SELECT_K (8 to 199 samples for the tiny preset) stopped the whole study at sample_effect, leaving no
    table, no LIMR and no results.md. The selection is skipped instead; the sample effect itself runs."""
    out = tmp_path / "out"
    out.mkdir()
    for name, count in (("sft_teacher", 300), ("redistill_A", 199), ("redistill_B", 300)):
        (out / f"{name}.jsonl").write_text("{}\n" * count, encoding="utf-8")
    stages = stage_lines(run_reproduce("tiny", "--dry-run", env={"OUT": str(out)}).stdout)
    assert "--select" not in stages["sample_effect"] and "se_top" not in stages and "eval_se" not in stages
    (out / "redistill_A.jsonl").write_text("{}\n" * 200, encoding="utf-8")  # (exactly 2 x SELECT_K: selected)
    stages = stage_lines(run_reproduce("tiny", "--dry-run", env={"OUT": str(out)}).stdout)
    assert "--select 100 " in stages["sample_effect"] and "se_top" in stages and "eval_se" in stages


def test_a_later_seeds_limr_pool_comes_from_its_own_streams(tmp_path):
    """SEED=2 LIMR=1: the LIMR pool was drawn from seed 1's streams, 12 of its 170 puzzles the cold start's SFT
    puzzles up to renaming. Seed 1's command is as it was (its studies' markers hold)."""
    def limr_data(seed):
        proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / f"o{seed}"), "LIMR": "1", "SEED": seed})
        return proc.stdout.split("== limr_data\n+ ", 1)[1].splitlines()[0]
    assert limr_data("2").endswith("--train_seed 1100003 --sft_seed 1200003")
    assert limr_data("1").endswith("--sft_per_people 50,300")


def test_dry_run_of_the_tiny_preset_with_limr(tmp_path):
    out = str(tmp_path / "out")
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": out, "LIMR": "1"})
    lines = proc.stdout.splitlines()
    command_of = {lines[i][3:]: lines[i + 1][2:] for i in range(len(lines) - 1)
                  if lines[i].startswith("== ") and lines[i + 1].startswith("+ ")}
    stages = list(command_of)
    assert stages.index("eval_se") < stages.index("limr_data") < stages.index("limr_probe_1") < stages.index("report")
    assert [s for s in stages if s.startswith("limr_probe")] == ["limr_probe_1", "limr_probe_2", "limr_probe_3"]
    assert "--train_per_people 20,150" in command_of["limr_data"]
    probe = command_of["limr_probe_2"]
    assert f"--model {out}/sft/final" in probe and f"--train_data {out}/limr/data/train.jsonl" in probe
    # FULL: the probe at step 40, kept
    assert "--max_steps 80" in probe and probe.endswith("--save_every 40 --keep_steps 40 --seed 2")
    assert "--max_steps 40" in command_of["limr_lim_2"] and command_of["limr_lim_2"].endswith("--seed 2")
    assert "--names start full_2 lim_2 rand_2" in command_of["limr_eval_2_0"] and not os.path.exists(out)


def stage_lines(stdout):
    """A dry run's stages in order: {stage: its "+ " command line, or its "== stage: ..." line when not run}."""
    lines, stages = stdout.splitlines(), {}
    for i, line in enumerate(lines):
        if line.startswith("== "):
            name, _, said = line[3:].partition(":")
            stages[name] = line if said else lines[i + 1][2:]
    return stages


def kk_dry_run(out, gpus):
    return run_reproduce("kk-qwen2.5-1.5b", "--dry-run", check=False,
                         env={"GPUS": str(gpus), "MODEL_DIR": str(out.parent / "base"), "OUT": str(out)})


def test_an_empty_done_marker_is_no_marker(tmp_path):
    """Every version wrote a marker's seconds: an empty one is a write a full disk stopped (the marker is now
    written whole or not at all). The stage runs again, where it was refused as an older marker with a fix that
    could not mend it."""
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    (out / "done" / "data").write_text("")
    proc = kk_dry_run(out, 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\n== data\n+ " in proc.stdout and "== data: done" not in proc.stdout


def test_an_older_done_marker_without_its_command_is_not_taken_as_this_command(tmp_path):
    """A marker written before markers held the command (seconds alone) cannot say its outputs are this command's
    (a preset's RL steps changed since, say): the run stops, printing the line that accepts it."""
    out = tmp_path / "out"
    (out / "done").mkdir(parents=True)
    (out / "done" / "data").write_text("12\n")
    proc = kk_dry_run(out, 8)
    assert proc.returncode == 1 and "stage data in " + str(out) + " was marked done by an older" in proc.stderr
    accept = next(line for line in proc.stderr.splitlines() if "add it to the marker: " in line)
    subprocess.run(accept.split("add it to the marker: ", 1)[1], shell=True, check=True)  # what the user runs
    proc = kk_dry_run(out, 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== data: done (OUT/done/data), skipped" in proc.stdout


def test_a_finished_evaluation_runs_again_to_re_score_with_todays_scorer(tmp_path):
    """eval.py re-scores its finished pairs when the task's scorer changed (a git pull mid-study): a done eval stage
    runs again (it reuses its pairs), where a skip left the table on the old scorer's rewards."""
    out = tmp_path / "out"
    command = stage_lines(kk_dry_run(out, 8).stdout)["eval"]
    (out / "done").mkdir(parents=True)
    (out / "done" / "eval").write_text(f"60\n{command[command.index('eval.py'):]}\n")
    proc = kk_dry_run(out, 8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== eval: done; eval.py checks its pairs" in proc.stdout
    assert stage_lines(proc.stdout)["eval"].startswith("== eval: done")
    assert "+ " + command in proc.stdout


def test_a_stage_done_on_8_gpus_is_done_on_4(tmp_path):
    """The marker holds the stage's command without its launcher (torchrun --nproc_per_node=GPUS): a study carried on
    with another number of GPUs skips the stages that are done, as their outputs do not depend on it."""
    out = tmp_path / "out"
    on8, on4 = (stage_lines(kk_dry_run(out, gpus).stdout)["sft"] for gpus in (8, 4))
    script = on8.index("redistill_sft.py")
    assert on8 != on4 and on8[script:] == on4[on4.index("redistill_sft.py"):]  # only the launcher differs
    (out / "done").mkdir(parents=True)
    (out / "done" / "sft").write_text(f"3600\n{on8[script:]}\n")  # as the GPUS=8 run wrote it
    proc = kk_dry_run(out, 4)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "== sft: done (OUT/done/sft), skipped" in proc.stdout


def test_a_stage_done_under_a_renamed_settings_old_spelling_is_done(tmp_path):
    """--max_new_tokens became --max_response_tokens and sample_policy's and eval's --batch_size --gen_batch_size
    (2026-12-07): a marker of before, recording the old spelling, is the same command (a study goes on), while
    another value is still another command."""
    out, script = tmp_path / "out", {"sample_A": "sample_policy.py", "eval": "eval.py"}
    lines = stage_lines(run_reproduce("tiny", "--dry-run", env={"OUT": str(out)}).stdout)
    now = {stage: lines[stage][lines[stage].index(name):] for stage, name in script.items()}
    (out / "done").mkdir(parents=True)
    for value in ("", "9"):
        for stage, command in now.items():
            assert " --max_response_tokens 120 --gen_batch_size " in command
            was = command.replace("--max_response_tokens", "--max_new_tokens")
            was = was.replace("--gen_batch_size", "--batch_size")
            if value:
                was = re.sub(r"--batch_size \d+", f"--batch_size {value}", was)
            (out / "done" / stage).write_text(f"60\n{was}\n")
        proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(out)}, check=False)
        if value:
            assert proc.returncode == 1 and f"stage sample_A in {out} was done with another command" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
            assert "== sample_A: done (OUT/done/sample_A), skipped" in proc.stdout
            assert "== eval: done; eval.py checks its pairs" in proc.stdout


def test_a_study_goes_on_under_another_spelling_of_its_out(tmp_path):
    """OUT with a trailing slash, or a link to it, is the same study: its done stages were refused as done with
    "another command" (the paths in them spelled otherwise), and the advice was to start over."""
    out = tmp_path / "out"
    command = stage_lines(kk_dry_run(out, 8).stdout)["data"]
    (out / "done").mkdir(parents=True)
    (out / "done" / "data").write_text(f"5\n{command}\n")  # (python kk_data.py ...: no launcher to strip)
    (tmp_path / "link").symlink_to(out)
    for spelling in (f"{out}/", str(tmp_path / "link")):
        proc = run_reproduce("kk-qwen2.5-1.5b", "--dry-run", check=False,
                             env={"GPUS": "8", "MODEL_DIR": str(tmp_path / "base"), "OUT": spelling})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "== data: done (OUT/done/data), skipped" in proc.stdout
    (out / "done" / "data").write_text(f"5\n{command.replace('--test_per_people 100', '--test_per_people 99')}\n")
    assert "was done with another command" in kk_dry_run(tmp_path / "link", 8).stderr  # (another value still is)


def test_limr_only_from_the_environment_starts_from_the_base_and_gpus_is_checked(tmp_path):
    """LIMR_ONLY=1 builds no cold start: its probe started from OUT/sft/final and failed after the base's
    pre-training, naming a hub download. And GPUS=abc was torchrun's error at the first launched stage."""
    out = tmp_path / "out"
    proc = run_reproduce("micro", "--dry-run", env={"OUT": str(out), "LIMR_ONLY": "1"})
    assert f"train_rl.py --model {out}/base/final " in stage_lines(proc.stdout)["limr_probe_1"]
    proc = kk_dry_run(out, "abc")
    assert proc.returncode == 2 and "error: GPUS is 'abc': the GPUs of every launched stage" in proc.stderr


def test_a_re_distillation_set_of_exactly_one_sft_batch_is_trained(tmp_path):
    """redistill_sft.py trains on a set of at least --global_batch samples (one step): a set of exactly one SFT batch
    is trained (set A: its stage listed), one sample fewer is skipped as too small (set B). Micro's batches, read
    from its commands."""
    import shlex
    import common
    import redistill_sft
    out = tmp_path / "m"
    listed = stage_lines(run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(out)}).stdout)
    batch = {}
    for v in ("A", "B"):
        argv = shlex.split(listed[f"redistill_{v}"])
        batch[v] = common.parse_settings(redistill_sft.get_parser(),
                                         argv[argv.index("redistill_sft.py") + 1:]).global_batch
    out.mkdir()
    (out / "redistill_A.jsonl").write_text("{}\n" * batch["A"])
    (out / "redistill_B.jsonl").write_text("{}\n" * (batch["B"] - 1))
    stages = stage_lines(run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(out)}).stdout)
    assert stages["redistill_A"] == listed["redistill_A"]
    assert stages["redistill_B"].startswith(f"== redistill_B: skipped, the RL policy gave {batch['B'] - 1} correct")
    assert f"fewer than one SFT batch ({batch['B']})" in stages["redistill_B"]


def test_seeds_2_runs_the_limr_stages_once_per_limr_seed(tmp_path):
    """LIMR has seeds of its own (LIMR_SEEDS): with SEEDS=2 its stages run in seed 1's study only, each LIMR seed's
    probe once, not once more per study seed (the slow test_seeds_2_runs_a_second_seed_and_tables_mean_std, dry)."""
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "t"), "SEEDS": "2", "LIMR": "1"})
    first, second = proc.stdout.split("==== seed 2 of 2")
    limr_seeds = proc.stdout.rstrip().splitlines()[-1].split("--limr_seeds ")[1].split()  # the report's
    probes = [line for line in proc.stdout.splitlines() if line.startswith("== limr_probe")]
    assert probes == [f"== limr_probe_{seed}" for seed in limr_seeds] and len(limr_seeds) > 1
    assert all(probe in first for probe in probes)
    assert not [line for line in second.splitlines() if line.startswith("== limr")]


def test_re_distillation_sets_are_sampled_with_seed_minus_one(tmp_path):
    """sample_A and sample_B take --seed SEED - 1: seed 1, the preset as measured (the published figures), samples
    with seed 0, seed 2 with seed 1. What sample_policy's parser makes of each command is what the run gets."""
    import shlex
    import common
    import sample_policy
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "t"), "SEEDS": "2"})
    for study, part in enumerate(proc.stdout.split("==== seed 2 of 2")):
        stages = stage_lines(part)
        for stage in ("sample_A", "sample_B"):
            argv = shlex.split(stages[stage])
            at = argv.index("sample_policy.py")
            assert common.parse_settings(sample_policy.get_parser(), argv[at + 1:]).seed == study, stage


@pytest.mark.parametrize("preset,var,name,path", [
    ("micro", "MICRO_OUT", "OUT", "my runs/m"), ("kk-qwen2.5-1.5b", "MODEL_DIR", "BASE", "models/q$x"),
    ("kk-qwen2.5-1.5b", "OUT", "OUT", "out;rm"), ("micro", "MICRO_OUT", "OUT", "runs/{a,b}"),
    ("micro", "MICRO_OUT", "OUT", "~/runs"), ("limr-qwen2.5-math-7b", "AIME24", "AIME24", "my sets/aime24.jsonl")])
def test_a_path_the_stage_commands_cannot_carry_is_refused_first(preset, var, name, path, tmp_path):
    """Stage commands are shell words: a space cut a path in two (kk_data.py then failed on 'unrecognized
    arguments'), a quote, $ or ; would be read by the shell, and a quoted '~/runs' put the stages' outputs in $HOME
    and the markers in ./~ (the re-distillation sets then counted 0 lines and were skipped). Such a path is refused
    before any stage, naming it."""
    value = path if path.startswith("~") else str(tmp_path / path)
    proc = run_reproduce(preset, "--dry-run", env={"GPUS": "8", var: value}, check=False)
    assert proc.returncode == 2 and f"error: {name} is '{value}'" in proc.stderr
    assert "== " not in proc.stdout and not os.listdir(tmp_path)


def test_a_path_with_ordinary_characters_is_not_refused(tmp_path):
    out = tmp_path / "runs-1_2.3+x@y:z,w=v%~é" / "m"
    proc = run_reproduce("micro", "--dry-run", env={"MICRO_OUT": str(out)})
    assert f"--out_dir {out}/data" in proc.stdout


def test_missing_base_model_is_a_clear_error(tmp_path):
    proc = run_reproduce("kk-qwen2.5-1.5b", env={"MODEL_DIR": str(tmp_path / "none"), "OUT": str(tmp_path / "out")},
                         check=False)
    assert proc.returncode == 2
    assert "huggingface-cli download Qwen/Qwen2.5-1.5B --local-dir" in proc.stderr
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("value", ["075", "080", "0", "7x"])
def test_a_step_count_the_shell_would_misread_is_refused_before_any_stage(value, tmp_path):
    """RL_STEPS=075: the shell's arithmetic reads octal, so the tiny preset's set B took steps 30-60 and the
    re-distillation sampled step_000061, while train_rl.py trained to step 75 (080: a shell error mid-preset)."""
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out"), "RL_STEPS": value}, check=False)
    assert proc.returncode == 2 and f"error: RL_STEPS (from the environment) is '{value}'" in proc.stderr
    assert "+ python" not in proc.stdout
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out"), "RL_STEPS": "75"})
    assert "rl/step_000075 " in proc.stdout and "--steps 75,37-74 " in proc.stdout


def test_unknown_preset(tmp_path):
    proc = run_reproduce("nope", check=False)
    assert proc.returncode == 2 and "no preset config/nope.sh" in proc.stderr
    proc = run_reproduce("tiny", "micro", "--dry-run", check=False)  # (the last one ran, the first unsaid)
    assert proc.returncode == 2 and "two presets given (tiny and micro)" in proc.stderr
    (tmp_path / "a_file").write_text("")
    proc = run_reproduce("micro", env={"MICRO_OUT": str(tmp_path / "a_file")}, check=False)  # (mkdir's own error)
    assert proc.returncode == 2 and f"OUT {tmp_path / 'a_file'} is a file, not a directory" in proc.stderr
    proc = run_reproduce("micro", "--dry-run", env={"SAMPLE_EFFECT": "yes"}, check=False)  # (read as 0, silently)
    assert proc.returncode == 2 and "SAMPLE_EFFECT is 'yes': 1 (run it) or 0" in proc.stderr


@pytest.mark.parametrize("seeds", ["1", "2"])
def test_a_kill_of_the_script_ends_its_running_stage_too(seeds, tmp_path):
    """`kill PID` of reproduce.sh (or of the SEEDS=N loop above it) left the stage under way running on, unmarked
    and holding OUT's lock; now the stage ends with the script, the attempt is logged as stopped, the lock is free.
    The script ends after the stage has: one that takes a moment to stop (a save) was left running on, holding the
    lock that an immediate re-run then met; and no command of the stage's after it starts (a preset's "a || b")."""
    import fcntl
    import signal
    import time
    out, pid_file = tmp_path / "out", tmp_path / "stage.pid"
    (tmp_path / "stage.py").write_text(
        "import os, signal, sys, time\n"
        "def stop(*_):\n    time.sleep(1.0)\n    open(sys.argv[1] + '.ended', 'w').close()\n    sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, stop)\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    (tmp_path / "after.py").write_text(f"open({str(tmp_path / 'after.ran')!r}, 'w').close()\n")
    preset = preset_of(tmp_path, f'DATA_CMD="python {tmp_path}/stage.py {pid_file} || python {tmp_path}/after.py"\n')
    env = study_env(OMP_NUM_THREADS="1", THREADS="1", OUT=str(out), SEEDS=seeds)
    log = open(tmp_path / "log", "w")  # (not a pipe: the stage would hold it open, and reading it to its end would
    # wait for the stage, whenever the script ended)
    proc = subprocess.Popen(["bash", os.path.join(ROOT, "reproduce.sh"), preset], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stage = None
    try:
        for _ in range(600):  # the stage has started
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        stage = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGTERM
        assert (tmp_path / "stage.pid.ended").exists()  # (the stage had finished stopping when the script ended)
        assert not (tmp_path / "after.ran").exists()
        for _ in range(100):  # (the stage has ended before the script: at most a moment to be reaped)
            try:
                os.kill(stage, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the stage runs on after its reproduce.sh was killed")
    finally:  # (nothing left behind when the test fails)
        log.close()
        for pid, kill in ((proc.pid, os.killpg), (stage, os.kill)):
            try:
                if pid is not None:
                    kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    name, _, _, _, status = (out / "times.tsv").read_text(encoding="utf-8").splitlines()[-1].split("\t")
    assert (name, status) == ("data", "stopped") and not (out / "done" / "data").exists()
    if shutil.which("flock"):
        with open(out / ".reproduce.lock", "w") as lock:  # (raises if anything still holds it)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_seed_refuses_to_start_after_its_sources_changed_under_seeds_n(tmp_path):
    """SEEDS=N runs each seed's study as a new reproduce.sh, which reads this script and the preset anew: an edit
    while seed 1 ran gave seeds 2..N other settings, tabled together without a word. The parent passes the digest
    of its sources; a seed whose sources differ stops before any stage."""
    proc = run_reproduce("tiny", "--dry-run", check=False,
                         env={"OUT": str(tmp_path / "out"), "SEED": "2", "SEEDS_SOURCES_DIGEST": "0 0"})
    assert proc.returncode == 1 and "reproduce.sh or config/ changed since this SEEDS=N run began" in proc.stderr
    assert "+ python" not in proc.stdout
    proc = run_reproduce("tiny", "--dry-run", env={"OUT": str(tmp_path / "out"), "SEEDS": "2"})
    assert proc.stdout.count("preset tiny -> ") == 2  # (unchanged: both seeds start)


def test_the_sources_digest_passes_over_a_folder_in_config(tmp_path):
    """A folder (or a dead link) in config/ stopped a SEEDS=N run at once, without a word: the digest's cat failed
    on it under pipefail. The digest reads the files only."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=lambda d, names: [
        n for n in names if n in (".git", "runs", "tests", "__pycache__") or n.endswith(".md")])
    (copy / "config" / "old").mkdir()
    (copy / "config" / "gone.sh").symlink_to(tmp_path / "none")
    proc = subprocess.run(["bash", "reproduce.sh", "tiny", "--dry-run"], cwd=copy, capture_output=True, text=True,
                          env=study_env(OUT=str(tmp_path / "out"), SEEDS="2"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("preset tiny -> ") == 2
