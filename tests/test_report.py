"""report.py: the final table from what the stages wrote (a synthetic run directory, no model needed)."""
import json
import os
import shutil

import pytest

import common
import report


def summary(acc2, acc3, overall, task="kk", samples=1, temperature=0.0):
    return {"settings": {"task": task, "samples_per_prompt": samples, "temperature": temperature, "top_p": 1.0},
            "by_difficulty": {"2": {"accuracy": acc2}, "3": {"accuracy": acc3}},
            "pass_k": [1], "overall": {"accuracy": overall, "mean_length": 22.0, "truncation_rate": 0.0}}


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    accs = {"base": (0.0, 0.0, 0.0), "sft": (0.4, 0.2, 0.25), "rl": (0.5, 0.4, 0.425), "redistill_A": (0.3, 0.3, 0.3)}
    for name, acc in accs.items():
        common.write_json(out / "eval" / name / "test" / "summary.json", summary(*acc))
    for name, acc in {"se_top": (0.1, 0.1, 0.1), "se_bottom": (0.0, 0.0, 0.0), "se_random": (0.2, 0.2, 0.2)}.items():
        common.write_json(out / "eval_se" / name / "test" / "summary.json", summary(*acc))
    # times.tsv: RL stopped once (logged by reproduce.sh) and then finished: both attempts count; lines of older
    # runs have no status column
    rows = [("data", 2), ("base_text", 9), ("base", 180), ("teacher_data", 3), ("sft", 18), ("rl", 100, "stopped"),
            ("rl", 260, "finished"), ("sample_A", 6), ("redistill_A", 12), ("eval", 15)]
    (out / "times.tsv").write_text("".join("\t".join(map(str, (r[0], r[1], 1, "cpu") + r[2:])) + "\n" for r in rows))
    common.write_jsonl(out / "sft_teacher.jsonl", [{"id": i} for i in range(40)])
    common.write_jsonl(out / "redistill_A.jsonl", [{"id": i} for i in range(13)])
    common.write_json(out / "rl" / "settings.json",
                      {"prompts_per_step": 16, "samples_per_prompt": 8, "temperature": 1.0})
    common.write_jsonl(out / "rl" / "metrics.jsonl", [{"step": 0, "val/acc": 0.25}] +
                       [{"step": s, "reward": 0.1 * s} for s in (1, 2, 3)] + [{"step": 3, "val/acc": 0.4}])
    common.write_json(out / "sample_effect" / "effects.summary.json", {"files": {
        "/x/sft_teacher.jsonl": {"count": 40, "sample_effect": {"mean": 0.05, "median": 0.06},
                                 "normalised": {"mean": 0.1}, "mean_response_length": 20.4}}})
    common.write_jsonl(out / "sample_effect" / "top.jsonl", [
        {"sample_effect": 0.3, "source_file": "/x/sft_teacher.jsonl"},
        {"sample_effect": 0.5, "source_file": "/x/redistill_A.jsonl"},
        {"sample_effect": 0.4, "source_file": "/x/redistill_A.jsonl"}])
    common.write_jsonl(out / "sample_effect" / "bottom.jsonl",
                       [{"sample_effect": -0.2, "source_file": "/x/sft_teacher.jsonl"}])
    common.write_jsonl(out / "sample_effect" / "random.jsonl",
                       [{"sample_effect": 0.1, "source_file": "/x/redistill_A.jsonl"}] * 2)
    common.write_json(out / "base_probe.json",
                      {"accuracy": 0.29, "people": {"2": {"accuracy": 0.34}, "3": {"accuracy": 0.27}}})
    return out


def test_the_heading_and_the_plot_say_how_the_test_samples_were_drawn(run_dir):
    """A study evaluated at avg@4 (e.g. MATH's usual protocol) is not headed "greedy, pass@1"; evaluations drawn two
    ways say both."""
    for name in ("base", "sft", "rl", "redistill_A"):
        sampled = summary(0.3, 0.2, 0.25, samples=4, temperature=1.0)
        common.write_json(run_dir / "eval" / name / "test" / "summary.json", sampled)
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert text.startswith("## Results: test accuracy (avg@4, temperature 1, top-p 1) per people")
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", summary(0.3, 0.2, 0.25))
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert (run_dir / "results.md").read_text(encoding="utf-8").startswith(
        "## Results: test accuracy (avg@4, temperature 1, top-p 1 / greedy, pass@1) per people")
    # a study evaluated by an older eval.py: the count of samples named "n" (2026-11-22) or "num_samples" (until
    # 2026-11-27); one whose settings say nothing of sampling is headed without it
    for count_name in ("n", "num_samples"):
        for name in ("base", "sft", "rl", "redistill_A"):
            old = summary(0.3, 0.2, 0.25)
            old["settings"][count_name] = old["settings"].pop("samples_per_prompt")
            common.write_json(run_dir / "eval" / name / "test" / "summary.json", old)
        report.main(["--out_dir", str(run_dir)])
        assert (run_dir / "results.md").read_text(encoding="utf-8").startswith("## Results: test accuracy (greedy, pass@1) per")
    for name in ("base", "sft", "rl", "redistill_A"):
        common.write_json(run_dir / "eval" / name / "test" / "summary.json",
                          summary(0.3, 0.2, 0.25) | {"settings": {"task": "kk"}})
    report.main(["--out_dir", str(run_dir)])
    assert (run_dir / "results.md").read_text(encoding="utf-8").startswith("## Results: test accuracy per people")


def test_table_rows_gain_compute_and_experiments(run_dir, capsys):
    report.main(["--out_dir", str(run_dir), "--preset", "tiny", "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert text in capsys.readouterr().out
    assert text.startswith("## Results (tiny): test accuracy (greedy, pass@1) per people")
    assert "| checkpoint | people 2 | people 3 | overall |" in text
    lines = text.splitlines()
    row = {name: next(line for line in lines if line.startswith(f"| {name} |"))
           for name in ("base", "sft", "rl", "redistill_A")}
    # rl: its own cpu-h is both RL attempts (360 s = 0.1 h); its total adds the teacher data and the cold start
    assert row["rl"].startswith("| rl | 0.500 | 0.400 | 0.425 |") and "| 40 | 384 | 0.100 | 0.106 |" in row["rl"]
    assert "| 13 | 0 |" in row["redistill_A"] and "| 40 | 0 |" in row["sft"]
    assert "GRPO gain over its start (rl - sft, overall): +17.5 points." in text
    assert "(shared by all): 0.052 cpu-h" in text
    assert ("own pre-training format (tiny_base.py --probe, greedy): 0.290 overall (people 2 0.340, people 3 0.270)"
            in text)
    assert "| sft_teacher.jsonl | 40 | 0.0500 | 0.0600 | 0.1000 | 20 |" in text
    # top/bottom: mean effect of the chosen samples and where they came from
    assert "| se_top | 0.1000 | 0.1000 | 0.1000 |" in text
    assert "| 3 | 0.4000 | redistill_A.jsonl 2, sft_teacher.jsonl 1 |" in text
    assert "| se_bottom |" in text and "| 1 | -0.2000 | sft_teacher.jsonl 1 |" in text
    assert "| se_random | 0.2000 | 0.2000 | 0.2000 |" in text and "| 2 | 0.1000 | redistill_A.jsonl 2 |" in text
    assert "K random samples by sample effect (pooled over the sets)\n" in text
    assert "| rl | 360 | 1 | cpu | 2 |" in text and "| data | 2 | 1 | cpu | 1 |" in text
    assert "| all | 605 |  | 10.1 min | 10 |" in text
    assert "### Wall time per stage\n" in text and "seed 1" not in text  # one seed: nothing is "seed 1"


def test_rl_rollouts_count_every_prompt_batch_dynamic_sampling_drew(run_dir):
    """With --dynamic_sampling a step draws several prompt batches: the rollouts it cost are all of them (2 + 3 + 1
    batches of 16 x 8 here), not steps x prompts x group."""
    common.write_jsonl(run_dir / "rl" / "metrics.jsonl", [{"step": 0, "val/acc": 0.25}] + [
        {"step": s, "reward": 0.1, "gen_batches": b} for s, b in ((1, 2), (2, 3), (3, 1))])
    assert report.rl_rollouts(str(run_dir / "rl"))[0] == 6 * 16 * 8
    assert report.rl_rollouts(str(run_dir / "rl"), up_to_step=2)[0] == 5 * 16 * 8
    report.main(["--out_dir", str(run_dir), "--preset", "tiny", "--plots", "false"])
    row = next(line for line in (run_dir / "results.md").read_text(encoding="utf-8").splitlines() if line.startswith("| rl |"))
    assert "| 40 | 768 |" in row


def test_math_runs_are_labelled_by_level(run_dir):
    for path in [*run_dir.glob("eval/*/test/summary.json"), *run_dir.glob("eval_se/*/test/summary.json")]:
        common.write_json(path, summary(0.1, 0.2, 0.15, task="math"))  # the same run, evaluated on a MATH split
    (run_dir / "base_probe.json").unlink()  # the tiny K&K base's probe: not part of a MATH run
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "per level" in text and "| checkpoint | level 2 | level 3 | overall |" in text and "people" not in text


def test_the_heading_is_the_key_eval_recorded_and_no_module_a_summary_names_is_imported(run_dir, monkeypatch):
    imported = []
    monkeypatch.setattr(report.tasks, "get_task", lambda name: imported.append(name))
    for path in [*run_dir.glob("eval/*/test/summary.json"), *run_dir.glob("eval_se/*/test/summary.json")]:
        common.write_json(path, {**summary(0.1, 0.2, 0.15, task="this"), "difficulty_key": "rooms"})  # a fork's task
    (run_dir / "base_probe.json").unlink()
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert "| checkpoint | rooms 2 | rooms 3 | overall |" in (run_dir / "results.md").read_text(encoding="utf-8")
    for path in run_dir.glob("eval*/*/test/summary.json"):  # an earlier eval's summary: the task's name alone
        common.write_json(path, summary(0.1, 0.2, 0.15, task="this"))
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert "| checkpoint | difficulty 2 | difficulty 3 | overall |" in (run_dir / "results.md").read_text(encoding="utf-8")
    assert imported == []


def test_a_run_without_evaluations_is_a_clear_error(tmp_path):
    with pytest.raises(common.UserError, match="no evaluation summaries yet"):
        report.main(["--out_dir", str(tmp_path), "--plots", "false"])
    with pytest.raises(common.UserError, match="nowhere: no such directory; run reproduce.sh first"):
        report.main(["--out_dir", str(tmp_path / "nowhere"), "--plots", "false"])
    assert not (tmp_path / "nowhere").exists()  # (its outputs' lock makes no directory of a typo)


def test_plots_or_a_note_without_matplotlib(run_dir, capsys):
    report.main(["--out_dir", str(run_dir), "--plots", "true"])
    names = ("rl_curve.png", "accuracy_by_difficulty.png")
    try:
        import matplotlib  # noqa: F401  (optional: plots when installed, a note and no files otherwise)
    except ImportError:
        assert "matplotlib not installed" in capsys.readouterr().out
        assert not any((run_dir / name).exists() for name in names)
        return
    for name in names:
        assert os.path.getsize(run_dir / name) > 1000


def add_limr(out, seeds=(1, 2)):
    """A synthetic LIMR experiment: a pool of 10, probe 6 steps of 4 x 2, arms 3 steps of 2 x 2; two splits."""
    acc = {"start": (0.1, 0.2), "full": (0.4, 0.5), "rand": (0.3, 0.4), "lim": (0.5, 0.5)}
    for seed in seeds:
        d = out / "limr" / f"seed_{seed}"
        common.write_jsonl(d / "scores.jsonl",
                           [{"id": i, "score": None if i < 2 else 0.5,  # (2 never drawn: too long for the probe)
                             "accuracy": [None, None] if i < 2 else [0.5, 0.5]} for i in range(10)])
        common.write_jsonl(d / "lim.jsonl", [{"id": i} for i in range(3)])
        common.write_jsonl(d / "rand.jsonl", [{"id": i} for i in range(3)])
        for run, steps, prompts in (("full", 6, 4), ("lim", 3, 2), ("rand", 3, 2)):
            common.write_json(d / run / "settings.json", {"prompts_per_step": prompts, "samples_per_prompt": 2})
            common.write_jsonl(d / run / "metrics.jsonl", [{"step": s, "reward": 0.1} for s in range(1, steps + 1)])
        for arm in ("full", "rand", "lim"):
            for split, a in zip(("aime", "math500"), acc[arm]):
                common.write_json(out / "limr" / "eval" / f"{arm}_{seed}" / split / "summary.json",
                                  summary(a, a, a + 0.01 * seed))
    (out / "limr" / "eval" / "results.md").write_text("eval.py's own table\n")  # not a model's directory
    for split, a in zip(("aime", "math500"), acc["start"]):
        common.write_json(out / "limr" / "eval" / "start" / split / "summary.json", summary(a, a, a))


def test_limr_table_rollouts_per_arm_and_the_mean_over_seeds(run_dir):
    add_limr(run_dir)
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| checkpoint | people 2 | people 3 | overall |" in text  # the study's table is still there
    assert "| model | seed | prompts | RL steps | RL rollouts | with the probe | aime | math500 | average |" in text
    # FULL: the probe's first 3 steps (3 x 4 x 2); LIM: its own 3 x 2 x 2 plus the whole probe's 6 x 4 x 2
    assert "| start |  |  | 0 | 0 | 0 | 0.100 | 0.200 | 0.150 |" in text
    assert "| FULL | 1 | 8 | 3 | 24 | 24 | 0.410 | 0.510 | 0.460 |" in text  # (the 8 prompts it drew)
    assert "| RAND | 2 | 3 | 3 | 12 | 12 | 0.320 | 0.420 | 0.370 |" in text
    assert "| LIM | 1 | 3 | 3 | 12 | 60 | 0.510 | 0.510 | 0.510 |" in text
    # (not drawn for their length alone: the probe may be too short to draw every prompt)
    assert ("seed 2: the probe ran 6 steps (48 rollouts) on 8 of the pool's 10 prompts (the others never drawn: "
            "longer than its --max_prompt_tokens, or the probe too short to draw them); 8 scored, 2 dropped") in text
    assert "| LIM | 2 | 0.515 ± 0.007 | 0.515 ± 0.007 | 0.515 ± 0.007 |" in text  # sample std of 0.51, 0.52
    # reproduce.sh passes its LIMR_SEEDS: seed_2 left by an earlier LIMR_SEEDS enters neither the rows nor a mean
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--limr_seeds", "1"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| LIM | 1 | 3 | 3 | 12 | 60 |" in text and "| LIM | 2 |" not in text and "seed 2:" not in text
    with pytest.raises(SystemExit):  # (a seed is an integer: "abc" selected nothing, without a word)
        report.main(["--out_dir", str(run_dir), "--plots", "false", "--limr_seeds", "abc"])
    assert "Mean ± std over seeds" not in text


def test_a_limr_seed_not_selected_yet_is_said_and_no_mean_of_one(run_dir):
    """LIMR seeds asked for whose probe has not reached the selection (no scores.jsonl, or no folder yet) are named,
    not dropped without a word, and one seed left gives no 'mean over seeds'."""
    add_limr(run_dir, seeds=(1, 2))
    os.remove(run_dir / "limr" / "seed_2" / "scores.jsonl")  # (the probe stopped part-way)
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--limr_seeds", "1", "2", "3"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "LIMR seeds 2, 3: not selected yet (no limr/seed_S/scores.jsonl), left out of the LIMR tables." in text
    assert "| LIM | 1 | 3 | 3 | 12 | 60 |" in text and "Mean ± std over seeds" not in text


def test_a_limr_only_run_reports_its_tables_alone(tmp_path):
    add_limr(tmp_path, seeds=(7,))
    report.main(["--out_dir", str(tmp_path), "--preset", "limr-x", "--plots", "false"])
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert text.startswith("## Results (limr-x): LIMR") and "| LIM | 7 | 3 | 3 | 12 | 60 |" in text
    assert "Mean ± std over seeds" not in text  # one seed


def test_seeds_table_mean_std_and_every_seeds_row(run_dir):
    # seed 2 of SEEDS=2 lives in OUT/seed_2: another RL gain (+10 vs seed 1's +17.5) and another redistill_A share
    seed2 = run_dir / "seed_2"
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (0.4, 0.4, 0.4), "redistill_A": (0.4, 0.35, 0.38)}.items():
        common.write_json(seed2 / "eval" / name / "test" / "summary.json", summary(*acc))
    common.write_jsonl(seed2 / "redistill_A.jsonl", [{"id": i} for i in range(9)])
    common.write_json(seed2 / "rl" / "settings.json", {"prompts_per_step": 16, "samples_per_prompt": 8})
    common.write_jsonl(seed2 / "rl" / "metrics.jsonl", [{"step": s, "reward": 0.1} for s in (1, 2)])
    (run_dir / "seed_x").mkdir()  # not a seed
    shutil.copytree(seed2, run_dir / "seed_02")  # nor a copy under another spelling (counted seed 2 twice)
    with open(run_dir / "times.tsv", "a") as f:  # LIMR=1 runs in seed 1's directory only: not its study's time
        f.write("limr_probe_1\t4500\t1\tcpu\tfinished\n")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert (f"### Over 2 seeds (seed 1: {run_dir}; seed S: {run_dir}/seed_S): test accuracy (greedy, pass@1), mean "
            f"± std") in text
    assert "Not comparable" not in text
    # what is above the seeds' tables is seed 1's, and says so
    assert text.startswith("## Results: test accuracy (greedy, pass@1) per people, seed 1 (the mean over seeds is "
                           "below)\n")
    assert "GRPO gain over its start (rl - sft, overall, seed 1): +17.5 points." in text
    assert "### Wall time per stage (seed 1's study, and LIMR if run; every seed's study: above)" in text
    # overall: sft 0.25, 0.30 -> 0.275 ± 0.035; rl 0.425, 0.40 -> 0.4125 ± 0.018; base only in seed 1 (std 0)
    assert "| sft | 2 | 0.350 ± 0.071 | 0.250 ± 0.071 | 0.275 ± 0.035 | 0.000 ± 0.000 |" in text
    assert "| rl | 2 | 0.450 ± 0.071 | 0.400 ± 0.000 | 0.412 ± 0.018 |" in text
    assert "| base | 1 | 0.000 | 0.000 | 0.000 | 0.000 |" in text  # one seed: no std
    assert "GRPO gain over its start (rl - sft, overall): +13.8 ± 5.3 points; per seed +17.5, +10.0." in text
    # redistill_A: (0.30 - 0.25) / 0.175 = 29%, (0.38 - 0.30) / 0.10 = 80%
    assert ("redistill_A recovers 54% ± 36% of RL's gain ((acc - sft) / (rl - sft), over the 2 of 2 seeds where RL "
            "gained); per seed 29%, 80%.") in text
    assert "| 1 | 0.250 | 0.425 | +17.5 | 384 | 0.300 | 29% | 13 | 0.290 | 10.1 |" in text  # 605 s in times.tsv
    assert "| 2 | 0.300 | 0.400 | +10.0 | 256 | 0.380 | 80% | 9 | – | 0.0 |" in text  # no probe, no times
    assert "| rl | 2 | 0.400 | 0.400 | 0.400 |" in text  # every seed's own row
    # reproduce.sh passes its SEEDS: seed_2 left by an earlier SEEDS=2 does not enter a SEEDS=1 report
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "1"])
    assert "seeds" not in (run_dir / "results.md").read_text(encoding="utf-8")
    # RL gained in both seeds, redistill_A evaluated in one: the share says so, with no ± for one value
    os.remove(seed2 / "eval" / "redistill_A" / "test" / "summary.json")
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "2"])
    assert ("redistill_A recovers 29% of RL's gain ((acc - sft) / (rl - sft), over 1 seed(s): where RL gained (2 of "
            "2) and redistill_A was evaluated); per seed 29%.") in (run_dir / "results.md").read_text(encoding="utf-8")


def test_summaries_evaluated_otherwise_are_named_in_the_table_and_over_the_seeds(run_dir):
    """A model evaluated by hand on another split, budget or sampling (or a stale seed's) entered the tables, the gain
    and the recovery as if alike, without a word."""
    def edit(path, **settings):
        s = common.read_json(str(path))
        s["settings"].update(settings)
        common.write_json(path, s)
    for name in ("sft", "rl", "redistill_A", "base"):  # (the fixture's summaries record no split or budget)
        edit(run_dir / "eval" / name / "test" / "summary.json", max_response_tokens=120, inputs={
            "split records (sha256)": "aaaa", "x/model.safetensors": [1, 2]})
    edit(run_dir / "eval" / "redistill_A" / "test" / "summary.json", max_response_tokens=4096,
         inputs={"split records (sha256)": "bbbb"})
    seed2 = run_dir / "seed_2"
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (0.4, 0.4, 0.4)}.items():
        common.write_json(seed2 / "eval" / name / "test" / "summary.json",
                          summary(*acc, samples=4 if name == "rl" else 1, temperature=1.0 if name == "rl" else 0.0))
    common.write_json(seed2 / "rl" / "settings.json", {"prompts_per_step": 16, "samples_per_prompt": 8})
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    differs = ('redistill_A was evaluated otherwise than base: split records (sha256) "bbbb" (not "aaaa"), '
               'max_response_tokens 4096 (not 120); evaluate them alike')
    assert f"**Not comparable:** {differs}" in text.split("### Over")[0]  # seed 1's table
    assert ("**Not comparable:** rl (seed 2) was evaluated otherwise than base (seed 1): samples_per_prompt 4 (not "
            "1), temperature 1.0 (not 0.0);") in text
    assert "test accuracy (greedy, pass@1 / avg@4, temperature 1, top-p 1), mean ± std" in text


def test_the_selection_experiment_names_its_pool_leaves_out_stale_models_and_is_averaged_over_seeds(run_dir):
    """The selection table says which set sample_effect ranked (--select_from); a model eval_se did not evaluate this
    time (an earlier run's se_random) is not in it; over seeds, each selection model gets its mean ± std."""
    path = run_dir / "sample_effect" / "effects.summary.json"
    common.write_json(path, {**common.read_json(str(path)), "settings": {"select_from": "/x/redistill_A.jsonl"}})
    (run_dir / "done").mkdir()
    (run_dir / "done" / "eval_se").write_text("6\neval.py --task kk --checkpoints a b --names se_top se_bottom "
                                              "--splits t\n", encoding="utf-8")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "K random samples by sample effect (of redistill_A.jsonl)\n" in text
    assert "| se_top |" in text and "| se_random |" not in text
    (run_dir / "done" / "eval_se").unlink()
    seed2 = run_dir / "seed_2"
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (0.4, 0.4, 0.4), "se_top": (0.3, 0.3, 0.3)}.items():
        common.write_json(seed2 / ("eval_se" if name.startswith("se_") else "eval") / name / "test" / "summary.json",
                          summary(*acc))
    common.write_json(seed2 / "rl" / "settings.json", {"prompts_per_step": 16, "samples_per_prompt": 8})
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| se_top | 2 | 0.200 ± 0.141 | 0.200 ± 0.141 | 0.200 ± 0.141 |" in text  # seeds 1 and 2: 0.1 and 0.3
    assert "| se_random | 1 | 0.200 | 0.200 | 0.200 |" in text  # seed 1 only
    assert text.index("| redistill_A | 1 |") < text.index("| se_top | 2 |")  # after the study's models


def test_an_integer_accuracy_enters_the_mean_over_seeds(run_dir):
    """read_summary takes an accuracy of 1 or 0 written as an integer: the seeds' table counted it as missing, its
    cell one seed's value "(1 of 2 seeds)", while the gain line used both."""
    seed2 = run_dir / "seed_2"
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (1, 1, 1)}.items():
        common.write_json(seed2 / "eval" / name / "test" / "summary.json", summary(*acc))
    common.write_json(seed2 / "rl" / "settings.json", {"prompts_per_step": 16, "samples_per_prompt": 8})
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| rl | 2 | 0.750 ± 0.354 | 0.700 ± 0.424 | 0.713 ± 0.407 |" in text  # seed 1: 0.5, 0.4, 0.425


def test_no_seeds_table_for_one_seed(run_dir):
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert "seeds" not in (run_dir / "results.md").read_text(encoding="utf-8")


def test_seeds_where_rl_gained_nothing_have_no_share(run_dir):
    seed3 = run_dir / "seed_3"  # seed_2 missing: seeds need not be consecutive
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (0.3, 0.3, 0.29), "redistill_A": (0.3, 0.3, 0.3)}.items():
        common.write_json(seed3 / "eval" / name / "test" / "summary.json", summary(*acc))
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "GRPO gain over its start (rl - sft, overall): +8.2 ± 13.1 points; per seed +17.5, -1.0." in text
    assert "over the 1 of 2 seeds where RL gained); per seed 29%." in text


def test_device_hours_count_each_attempt_at_its_own_number_of_devices(tmp_path):
    """A stopped attempt on 8 devices, then one finished on 4 (another number may take over a run), and a line of
    an older run without the status column."""
    path = tmp_path / "times.tsv"
    path.write_text("rl\t100\t8\tgpu\tstopped\nrl\t300\t4\tgpu\tfinished\neval\t60\t2\tgpu\n")
    times = report.read_times(str(path))
    assert times["rl"][:4] == (400, 4, "gpu", 2) and times["eval"][:4] == (60, 2, "gpu", 1)
    assert report.device_hours(times, ["rl"]) == (100 * 8 + 300 * 4) / 3600
    assert report.device_hours(times, ["rl", "eval", "absent"]) == (800 + 1200 + 120) / 3600
    # rl run again after it finished (its marker deleted, its outputs moved away): the table's model is the new
    # run's, whose attempts alone count (both runs' were summed, beside the new run's rollouts)
    with open(path, "a") as f:
        f.write("rl\t50\t2\tgpu\tstopped\nrl\t70\t2\tgpu\tfinished\n")
    assert report.read_times(str(path))["rl"] == (120, 2, "gpu", 2, 240)


def summary_with(section, key, value):
    """An eval summary's file with one field of `section` set to value, for a damage case."""
    def edit(path):
        summary = json.loads(path.read_text())
        summary[section][key] = value
        return json.dumps(summary)
    return edit


@pytest.mark.parametrize("damage", [
    ("eval/rl/test/summary.json", "", r"summary\.json: cannot read an eval summary"),
    ("eval/rl/test/summary.json", b"{\"a\": \"\xff\"}", r"summary\.json: cannot read an eval summary"),
    ("eval/rl/test/summary.json", '{"settings": {}}', r"summary\.json: not an eval summary \(KeyError"),
    ("eval/rl/test/summary.json", lambda path: json.dumps({**json.loads(path.read_text()), "settings": ["oops"]}),
     r"summary\.json: not an eval summary \(TypeError: field 'settings' is \['oops'\], expected an object"),
    ("eval_se/se_top/test/summary.json", "[]", r"summary\.json: an eval summary expected, got a JSON list"),
    # impossible numbers (a hand edit): "GRPO gain +2635.0 points" or +nan was tabled
    ("eval/rl/test/summary.json", summary_with("overall", "accuracy", 26.5),
     r"summary\.json: not an eval summary \(ValueError: overall accuracy is 26\.5, expected a number in \[0, 1\]"),
    ("eval/rl/test/summary.json", summary_with("overall", "accuracy", float("nan")), r"accuracy is NaN, expected"),
    ("eval/rl/test/summary.json", summary_with("overall", "mean_length", 10 ** 400), r"summary\.json: not an eval "
     r"summary \(ValueError: overall mean_length is 10+, expected a finite number >= 0"),
    ("sample_effect/top.jsonl", '{"sample_effect": true}\n', r"top\.jsonl:1: field 'sample_effect' must be a finite "
     r"number, got true"),
    ("sample_effect/top.jsonl", '{"sample_effect": 1e400}\n', r"got Infinity"),
    ("base_probe.json", '{"accuracy": NaN, "people": {}}', r"base_probe\.json: fields 'accuracy' and 'people'"),
    ("eval/rl/test/summary.json", summary_with("overall", "truncation_rate", "lots"), r"truncation_rate is \"lots\""),
    ("eval/rl/test/summary.json", summary_with("settings", "temperature", "0"), r"settings temperature is \"0\", "
     r"expected a finite number >= 0"),
    ("rl/settings.json", "{}", r"settings\.json: field 'prompts_per_step' missing"),
    ("rl/metrics.jsonl", '{"step": null, "reward": 1}\n', r"metrics\.jsonl:1: field 'step' must be a non-negative "
     r"integer, got null"),
    ("rl/metrics.jsonl", '{"step": 2, "reward": 1}\n{"step": 1, "reward": 1}\n', r"metrics\.jsonl:2: step 1 after "
     r"step 2"),
    ("rl/metrics.jsonl", '{"step": 1, "reward": 1}\n{"step": 1, "reward": 1}\n', r"metrics\.jsonl: two training "
     r"rows of step 1"),
    ("rl/metrics.jsonl", '{"step": 1, "reward": 1, "gen_batches": -1000}\n', r"metrics\.jsonl: step 1: field "
     r"'gen_batches' must be a positive integer, got -1000"),
    ("rl/settings.json", '{"prompts_per_step": -16, "samples_per_prompt": 8}', r"settings\.json: field "
     r"'prompts_per_step' missing or not a positive integer"),
    ("base_probe.json", '{"accuracy": 0.5}', r"base_probe\.json: fields 'accuracy' and 'people'"),
    ("sample_effect/effects.summary.json", "", r"effects\.summary\.json: cannot read sample_effect's summary"),
    ("redistill_A.jsonl", b"{\"id\": 1}\n\xff\n", r"redistill_A\.jsonl:2: not valid UTF-8"),
    ("sample_effect/effects.summary.json", '{"files": {"a.jsonl": {"count": 1}}}',
     r"effects\.summary\.json: a field is missing or of the wrong type \(KeyError"),
    ("sample_effect/top.jsonl", '{"source_file": "a.jsonl"}\n', r"top\.jsonl:1: missing field 'sample_effect'"),
    ("sample_effect/top.jsonl", "", r"top\.jsonl: no samples"),
    ("sample_effect/top.jsonl", '{"sample_effect": "0.5"}\n', r"top\.jsonl:1: field 'sample_effect' must be a finite number, got \"0\.5\""),
    ("sample_effect/top.jsonl", '{"sample_effect": 0.5, "source_file": 7}\n', r"top\.jsonl:1: field 'source_file'"),
    ("rl/metrics.jsonl", '{"step": 1, "reward": 1, "gen_batches": "2"}\n', r"metrics\.jsonl:1: field 'gen_batches'"),
    ("sample_effect/effects.summary.json", '{"files": {"a.jsonl": {"count": 1, "sample_effect": null}}}',
     r"effects\.summary\.json: a field is missing or of the wrong type \(TypeError"),
])
def test_a_damaged_input_is_one_line_naming_its_file(run_dir, damage):
    """report.py reads what every stage wrote: a damaged file (a hand edit, a copy cut short) is one line naming it,
    not a traceback at the end of a study."""
    name, text, message = damage
    text = text(run_dir / name) if callable(text) else text  # (a change to the file as it is)
    (run_dir / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(common.UserError, match=message):
        report.main(["--out_dir", str(run_dir), "--preset", "tiny", "--plots", "false"])


def test_a_damaged_times_line_is_dropped_with_a_warning(run_dir, capsys):
    """reproduce.sh killed mid-append leaves a line cut short; the re-run starts its own line after it. That line
    alone is dropped, with a warning naming it; the rest count."""
    with open(run_dir / "times.tsv", "a") as f:
        f.write("eval\t1")
    report.main(["--out_dir", str(run_dir), "--preset", "tiny", "--plots", "false"])
    assert "times.tsv:11: dropped a damaged line 'eval\\t1'" in capsys.readouterr().out
    with open(run_dir / "times.tsv", "a") as f:
        f.write("\nsample_A\tabc\t1\tcpu\tfinished\neval\t30\t1\tcpu\tfinished\n")
    report.main(["--out_dir", str(run_dir), "--preset", "tiny", "--plots", "false"])
    out = capsys.readouterr().out
    assert "times.tsv:11: dropped" in out and "times.tsv:12: dropped" in out
    assert report.read_times(str(run_dir / "times.tsv"))["eval"][:4] == (45, 1, "cpu", 2)


def test_only_this_studys_evaluation_is_tabled_at_its_rl_step(run_dir, capsys):
    """A summary an earlier run left (its model not in this run's eval stage, e.g. a set now under one SFT batch) is
    no row, and is named; the RL row counts the rollouts up to the step its summary evaluated (a re-run with fewer
    RL steps keeps the longer run's metrics), and its curve ends there."""
    (run_dir / "done").mkdir()
    (run_dir / "done" / "eval").write_text("15\neval.py --task kk --checkpoints a b c --names base sft rl "
                                           "--splits t.jsonl\n")
    rl = summary(0.5, 0.4, 0.425)
    rl["settings"]["checkpoint_path"] = str(run_dir / "rl" / "step_000002")
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", rl)
    (run_dir / "rl_curve.png").write_text("an earlier report's")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| redistill_A | 0.300 |" not in text
    assert f"{run_dir}/eval/redistill_A/test/summary.json: left by an earlier run" in text
    assert "No redistill_A row: no model in this study (its set: 13 samples)." in text
    assert "| rl | 0.500 | 0.400 | 0.425 | 22 | 0.000 | 40 | 256 |" in text  # 2 steps of 16 x 8, not 3
    assert not (run_dir / "rl_curve.png").exists()  # it would not match this table
    # evaluated, its summary since lost: said so (it read "no model in this study")
    (run_dir / "done" / "eval").write_text("15\neval.py --task kk --checkpoints a b c d --names base sft rl "
                                           "redistill_A --splits t.jsonl\n")
    os.remove(run_dir / "eval" / "redistill_A" / "test" / "summary.json")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert (f"No redistill_A row: evaluated, but {run_dir}/eval/redistill_A/test/summary.json is missing (run the "
            f"evaluation again).") in (run_dir / "results.md").read_text(encoding="utf-8")
    # ... and so is any evaluated model's (the rl row vanished without a word: only re-distilled ones were named)
    os.remove(run_dir / "eval" / "base" / "test" / "summary.json")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert (f"No base row: evaluated, but {run_dir}/eval/base/test/summary.json is missing (run the evaluation "
            f"again).") in (run_dir / "results.md").read_text(encoding="utf-8")


def test_seed_one_not_evaluated_still_gives_the_finished_seeds_table(run_dir):
    """Seed 1's evaluation killed while seeds 2 and 3 finished: the report stopped ("no evaluation summaries yet")
    and wrote nothing, the finished seeds' table with it."""
    import shutil
    for seed in (2, 3):
        shutil.copytree(run_dir, run_dir / f"seed_{seed}", ignore=shutil.ignore_patterns("seed_*"))
    shutil.rmtree(run_dir / "eval")
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "3"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert text.startswith(f"## Results: seed 1 ({run_dir}) not evaluated yet; the finished seeds")
    assert "### Over 2 seeds" in text and "Seed 1: not evaluated yet" in text
    shutil.rmtree(run_dir / "seed_2" / "eval")  # one finished seed: no seeds' table, and the error as before
    with pytest.raises(common.UserError, match="no evaluation summaries yet"):
        report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "3"])


def test_a_seeds_evaluated_model_without_its_summary_is_named_in_the_seeds_section(run_dir):
    """Over the seeds, a seed's evaluated model whose summary is gone was dropped from the mean silently (its count
    of seeds the only trace)."""
    import shutil
    seed_2 = run_dir / "seed_2"
    shutil.copytree(run_dir, seed_2)
    (seed_2 / "done").mkdir(exist_ok=True)
    (seed_2 / "done" / "eval").write_text("9\neval.py --task kk --names base sft rl redistill_A --splits t\n")
    shutil.rmtree(seed_2 / "eval" / "redistill_A")
    (run_dir / "done").mkdir(exist_ok=True)  # seed 1's own: named once, under its own table
    (run_dir / "done" / "eval").write_text("9\neval.py --task kk --names base sft rl redistill_A --splits t\n")
    shutil.rmtree(run_dir / "eval" / "base")
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "2"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert f"Seed 2: No redistill_A row: evaluated, but {seed_2}/eval/redistill_A/test/summary.json is missing" in text
    assert text.count(f"No base row: evaluated, but {run_dir}/eval/base/test/summary.json") == 1
    assert "Seed 1: " not in text


def test_a_missing_piece_is_said_not_averaged_away(run_dir):
    """A LIMR arm that never ran has no rollouts (not 0, not the probe's); a mean over fewer seeds than the table's
    says how many; a level one summary lacks is no traceback; a seed not yet evaluated is named."""
    import shutil
    add_limr(run_dir)
    shutil.rmtree(run_dir / "limr" / "seed_2" / "lim")
    shutil.rmtree(run_dir / "limr" / "eval" / "lim_2")
    for split in ("aime", "math500"):  # FULL evaluated at step 3 of its 6: its own step, not the missing LIM's
        path = run_dir / "limr" / "eval" / "full_2" / split / "summary.json"
        full = common.read_json(str(path), "a summary")
        full["settings"]["checkpoint_path"] = str(run_dir / "limr" / "seed_2" / "full" / "step_000003")
        common.write_json(path, full)
    rl = summary(0.5, 0.4, 0.425)
    del rl["by_difficulty"]["3"]
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", rl)
    report.main(["--out_dir", str(run_dir), "--plots", "true", "--seeds", "2"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| LIM | 2 | 3 | – | – | – | – | – | – |" in text and "| FULL | 2 | 8 | 3 | 24 | 24 |" in text
    assert "| RAND | 2 | 3 | 3 | 12 | 12 |" in text  # its own steps
    assert "| LIM | 2 | 0.510 (1 of 2 seeds) | 0.510 (1 of 2 seeds) | 0.510 (1 of 2 seeds) |" in text
    assert "Seed 2: not evaluated yet (no sft and rl test summaries), left out of the seeds' table." in text
    # FULL not evaluated either: the probe at LIM's steps, which are unknown, so no count (it read "0 | 0 | 0")
    shutil.rmtree(run_dir / "limr" / "eval" / "full_2")
    report.main(["--out_dir", str(run_dir), "--plots", "false", "--seeds", "2"])
    assert "| FULL | 2 | 8 | – | – | – |" in (run_dir / "results.md").read_text(encoding="utf-8")


def test_an_rl_run_deleted_to_free_disk_leaves_its_count_unknown_not_none(run_dir):
    """Without rl/settings.json the table's rollout cells are dashes; the caption read "(None rollouts)". (And what
    a killed report's writes left, which stayed for good, goes.)"""
    (run_dir / "rl" / "settings.json").unlink()
    left = [run_dir / ".tmp_results.md.k1ll3d_x", run_dir / ".tmp_rl_curve.png.k1ll3d_x"]
    for path in left:
        path.write_text("a kill inside a write")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "data came from the RL run (? rollouts)" in text and "None" not in text
    assert not any(path.exists() for path in left)


def test_an_older_eval_marker_without_its_command_tables_every_summary(run_dir):
    """A done/eval marker of an older reproduce.sh holds the seconds only (no command, so no --names): every summary
    there is this study's, as without a marker, not none of them."""
    (run_dir / "done").mkdir()
    (run_dir / "done" / "eval").write_text("15\n")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert "| redistill_A | 0.300 | 0.300 | 0.300 |" in (run_dir / "results.md").read_text(encoding="utf-8")
    (run_dir / "done" / "eval").write_text("15\neval.py --names base sft rl --stop $'a\\'b'\n")  # (bash's quoting)
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| redistill_A | 0.300 | 0.300 | 0.300 |" in text and "left by an earlier run" not in text


def test_the_evaluated_rl_step_is_the_checkpoints_own_folder():
    """step_N is the RL checkpoint's own folder name; a step_N elsewhere in the path (a run directory named after a
    sweep) is not the step that checkpoint was taken at."""
    def step(path):
        return report.evaluated_step({"settings": {"checkpoint_path": path}})
    assert step("/runs/rl/step_000075") == 75 and step("/runs/rl/step_000075/") == 75
    assert step("/runs/step_3_sweep/rl/final") is None and step("/runs/rl/step_000075/hf") is None
    assert step("/runs/rl_warm_step_50") is None and step("step_7") == 7
    assert report.evaluated_step({"settings": {}}) is None


def test_limr_means_over_the_seeds_an_arm_was_evaluated_in(run_dir):
    """An arm evaluated in no seed has no mean (a dash, not 0.000); an arm whose first seed is not evaluated still
    gets its average over the splits from the seed that is."""
    import shutil
    add_limr(run_dir)
    for name in ("lim_1", "rand_1", "rand_2"):
        shutil.rmtree(run_dir / "limr" / "eval" / name)
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| LIM | 2 | 0.520 (1 of 2 seeds) | 0.520 (1 of 2 seeds) | 0.520 (1 of 2 seeds) |" in text
    assert "| RAND | 2 | – | – | – |" in text


def test_seeds_table_counts_rl_rollouts_to_the_evaluated_step_and_says_a_missing_level(run_dir):
    """Each seed's RL rollouts stop at the step its RL summary evaluated (its metrics may run longer); a level one
    seed's summary lacks is a mean over the other seeds that says so, and a level the first row lacks is still a
    column of the means."""
    seed2 = run_dir / "seed_2"
    for name, acc in {"sft": (0.3, 0.3, 0.3), "rl": (0.4, 0.4, 0.4)}.items():
        common.write_json(seed2 / "eval" / name / "test" / "summary.json", summary(*acc))
    rl = summary(0.5, 0.4, 0.425)
    rl["settings"]["checkpoint_path"] = str(run_dir / "rl" / "step_000002")  # metrics.jsonl runs to step 3
    del rl["by_difficulty"]["3"]
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", rl)
    base = summary(0.0, 0.0, 0.0)
    del base["by_difficulty"]["3"]  # (base: the first row of the per-seed table)
    common.write_json(run_dir / "eval" / "base" / "test" / "summary.json", base)
    common.write_json(seed2 / "rl" / "settings.json", {"prompts_per_step": 16, "samples_per_prompt": 8})
    common.write_jsonl(seed2 / "rl" / "metrics.jsonl", [{"step": s, "reward": 0.1} for s in (1, 2)])
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert "| 1 | 0.250 | 0.425 | +17.5 | 256 |" in text  # 2 steps of 16 x 8, not metrics.jsonl's 3
    assert "| model | seeds | people 2 | overall | truncated | people 3 |" in text  # (columns as first seen)
    assert "| rl | 2 | 0.450 ± 0.071 | 0.412 ± 0.018 | 0.000 ± 0.000 | 0.400 (1 of 2 seeds) |" in text


def test_an_earlier_reports_plots_are_all_removed_when_not_redrawn(run_dir):
    for name in report.PLOTS:
        (run_dir / name).write_text("an earlier report's")
    report.main(["--out_dir", str(run_dir), "--plots", "false"])
    assert not any((run_dir / name).exists() for name in report.PLOTS)


def test_plots_show_every_level_and_the_rl_curve_up_to_the_evaluated_step(run_dir, monkeypatch):
    """The accuracy plot's levels are every summary's (the first summary lacks one here), a level a summary lacks
    is no bar (NaN, not a bar at 0), and the RL curve ends at the step the table's RL row evaluated."""
    import math
    from unittest import mock
    plt = mock.MagicMock()
    figures = []

    def subplots(*args, **kwargs):
        figures.append((mock.MagicMock(), mock.MagicMock()))
        return figures[-1]
    plt.subplots.side_effect = subplots
    monkeypatch.setattr(common, "pyplot", lambda: plt)
    base = summary(0.0, 0.0, 0.0)
    del base["by_difficulty"]["3"]
    common.write_json(run_dir / "eval" / "base" / "test" / "summary.json", base)
    rl = summary(0.5, 0.4, 0.425)
    rl["settings"]["checkpoint_path"] = str(run_dir / "rl" / "step_000002")
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", rl)
    report.main(["--out_dir", str(run_dir), "--plots", "true"])
    (_, curve), (_, bars) = figures
    assert curve.plot.call_args_list[0].args[:2] == ([1, 2], [0.1, 0.2])  # steps 1-2 of metrics.jsonl's 1-3
    assert bars.set_xticks.call_args.args[1] == ["people 2", "people 3"]
    # each model keeps its colour whichever others were evaluated (no redistill_B here); a missing level is said
    colours = {c.kwargs["label"]: c.kwargs["color"] for c in bars.bar.call_args_list}
    assert colours == {"base": "C0", "sft": "C1", "rl": "C2", "redistill_A": "C3"}
    assert [c.args[2] for c in bars.text.call_args_list] == ["n/a"] and bars.text.call_args.args[0] == 1  # base's 3
    assert curve.set_title.call_args.args == ("",) and bars.set_title.call_args.args == ("",)  # one seed
    heights = {c.kwargs["label"]: c.args[1] for c in bars.bar.call_args_list}
    assert heights["base"][0] == 0.0 and math.isnan(heights["base"][1]) and heights["rl"] == [0.5, 0.4]


def test_levels_sort_as_numbers_and_a_task_without_levels_draws_no_level_plot(run_dir, monkeypatch):
    """Decimal levels sort as eval's tables sort them ("2.5" before "10.5", as text it came after; a split's levels
    "9" and "10" as text were 10, 9 in the tables and 9, 10 in the plot: one key now); a task with DIFFICULTY None
    has no level, and its plot was an empty frame with a legend."""
    import scoring
    assert sorted(["10.5", "2.5", "3", "-1", "b", "10", "1e-05"], key=scoring.difficulty_order) == \
        ["-1", "1e-05", "2.5", "3", "10", "10.5", "b"]
    assert sorted([10, "9", 2.5, "b", "nan"], key=scoring.difficulty_order) == [2.5, "9", 10, "b", "nan"]
    from unittest import mock
    plt = mock.MagicMock()
    plt.subplots.side_effect = lambda *a, **k: (mock.MagicMock(), mock.MagicMock())
    monkeypatch.setattr(common, "pyplot", lambda: plt)
    for name in ("base", "sft", "rl", "redistill_A"):
        path = run_dir / "eval" / name / "test" / "summary.json"
        common.write_json(path, {**common.read_json(path), "by_difficulty": {}})
    report.main(["--out_dir", str(run_dir), "--plots", "true"])
    assert plt.subplots.call_count == 1  # the RL curve alone
    assert not (run_dir / "accuracy_by_difficulty.png").exists()


def test_two_seeds_before_seed_2_is_evaluated_name_seed_1_and_each_model_keeps_its_colour(run_dir, monkeypatch):
    from unittest import mock
    plt, figures = mock.MagicMock(), []

    def subplots(*args, **kwargs):
        figures.append((mock.MagicMock(), mock.MagicMock()))
        return figures[-1]
    plt.subplots.side_effect = subplots
    monkeypatch.setattr(common, "pyplot", lambda: plt)
    os.remove(run_dir / "eval" / "base" / "test" / "summary.json")
    rl = summary(0.5, 0.4, 0.425)
    del rl["by_difficulty"]["3"]
    common.write_json(run_dir / "eval" / "rl" / "test" / "summary.json", rl)
    report.main(["--out_dir", str(run_dir), "--plots", "true", "--seeds", "2"])
    text = (run_dir / "results.md").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "## Results: test accuracy (greedy, pass@1) per people, seed 1"  # no mean yet
    assert "Seed 2: not evaluated yet" in text and "### Wall time per stage (seed 1's study, and LIMR if run)\n" in text
    (_, curve), (_, bars) = figures
    assert curve.set_title.call_args.args == ("seed 1",) and bars.set_title.call_args.args == ("seed 1",)
    colours = {c.kwargs["label"]: c.kwargs["color"] for c in bars.bar.call_args_list}
    assert colours == {"sft": "C1", "rl": "C2", "redistill_A": "C3"}  # (base's C0 not taken by sft)
    (mark,) = bars.text.call_args_list  # rl's level 3: model 2 of 3 (width 0.8 / 3), level 1
    assert mark.args[2] == "n/a" and mark.args[0] == pytest.approx(1 + 1 * 0.8 / 3)
