"""
The final table of reproduce.sh: accuracy per model and difficulty, and what each model cost.

    python report.py --out_dir runs/tiny          # prints the table, writes runs/tiny/results.md (+ plots)

Reads what the stages wrote under OUT_DIR (eval/*/test/summary.json, times.tsv, the SFT sets, rl/metrics.jsonl,
the sample effect's summary, the LIMR runs, and seed_S/ for SEEDS=N: each model's mean ± std over seeds).
Compute = measured wall time (every attempt of the run that made the outputs, stopped ones too) x devices, in
device-hours: "own" counts the stages that made a model from its inputs (for re-distilled models: sampling the RL
policy + their SFT); "total" adds everything it built on (the cold start and RL). Pre-training the tiny base is
shared by all and listed apart.
Plots (matplotlib, optional): RL reward and validation accuracy per step; accuracy per difficulty.
"""
import json
import os
import re
import shlex
import textwrap

import common
import tasks
from common import UserError
from scoring import SPLIT_DIGEST, difficulty_order, how_evaluated, markdown_table, read_summary, summary_row


def get_parser():
    p = common.new_parser("The final table of reproduce.sh (and optional plots).")
    p.add_argument("--out_dir", default="runs/tiny", help="reproduce.sh's output directory")
    p.add_argument("--preset", default="", help="preset name, for the heading")
    p.add_argument("--plots", type=common.str2bool, default=True, help="write PNG plots when matplotlib is installed")
    p.add_argument("--seeds", type=int, default=0,
                   help="the seeds of the study (reproduce.sh's SEEDS): seed 1 in --out_dir, seed S in seed_S/; "
                        "0 = every seed_S/ there (reproduce.sh passes its SEEDS, so a folder left by an earlier, "
                        "larger SEEDS does not enter the mean)")
    p.add_argument("--limr_seeds", nargs="*", type=int, default=[],
                   help="the seeds of the LIMR experiment (reproduce.sh's LIMR_SEEDS): only limr/seed_S/ of these "
                        "enter its tables; none = every limr/seed_S/ there (reproduce.sh passes its LIMR_SEEDS, so a "
                        "folder left by an earlier LIMR_SEEDS does not enter the mean)")
    return p


MODELS = ("base", "sft", "rl", "redistill_A", "redistill_B")
# the sample-effect experiment's models (reproduce.sh step 8b): the base SFT'd on the top-K, bottom-K and K random
# samples by sample effect, evaluated into eval_se/, from sample_effect/{top,bottom,random}.jsonl
SELECTION_MODELS = ("se_top", "se_bottom", "se_random")
# the stages each model is made by (own) and builds on (upstream); pre-training the tiny base is shared
OWN = {"base": ["base_text", "base"], "sft": ["teacher_data", "sft"], "rl": ["rl"],
       "redistill_A": ["sample_A", "redistill_A"], "redistill_B": ["sample_B", "redistill_B"]}
UPSTREAM = {"base": [], "sft": [], "rl": ["teacher_data", "sft"],
            "redistill_A": ["teacher_data", "sft", "rl"], "redistill_B": ["teacher_data", "sft", "rl"]}
SFT_SET = {"sft": "sft_teacher.jsonl", "rl": "sft_teacher.jsonl",
           "redistill_A": "redistill_A.jsonl", "redistill_B": "redistill_B.jsonl"}


def count_lines(path):
    if not os.path.exists(path):
        return None
    return sum(1 for _, line in common.text_lines(path) if line.strip())


def read_probe(path):
    """tiny_base.py --probe's result, with the accuracies report.py prints."""
    probe = common.read_json(path, "a base probe result")
    people = probe.get("people")
    if not (common.is_fraction(probe.get("accuracy")) and isinstance(people, dict) and all(
            isinstance(r, dict) and common.is_fraction(r.get("accuracy")) for r in people.values())):
        raise UserError(f"{path}: fields 'accuracy' and 'people' (people -> accuracy) missing, of the wrong type or "
                        f"not in [0, 1]")
    return probe


def mean_std(values):
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, var ** 0.5


def mean_pm_std(values):
    return "{:.3f} ± {:.3f}".format(*mean_std(values)) if len(values) > 1 else f"{values[0]:.3f}"


def mean_cell(values):
    """A table cell of the mean ± std over the seeds that have a value (None: missing), naming how many those are
    when some are missing: a mean of one seed must not read as one of all."""
    have = [v for v in values if v is not None]
    if not have:
        return None
    return mean_pm_std(have) + (f" ({len(have)} of {len(values)} seeds)" if len(have) < len(values) else "")


def read_times(path):
    """stage -> (seconds, devices, kind, attempts, device seconds): every attempt of the run that made the stage's
    outputs counts, finished or stopped (a failure or a kill that reproduce.sh logged), each at its own number of
    devices (another number may take over a run); devices is the last attempt's. A stage run again after it finished
    (its marker deleted and its outputs moved away, as reproduce.sh's error says) starts its tally again: the outputs
    are the new run's. Lines of older runs have no status column."""
    times, finished = {}, set()
    if os.path.exists(path):
        for lineno, line in common.text_lines(path, torn_tail=True):
            parts = line.rstrip("\n").split("\t")
            if len(parts) not in (4, 5) or not (parts[1].isdigit() and parts[2].isdigit()):
                # a line cut short by a kill (reproduce.sh starts the next one on a line of its own)
                print(f"warning: {path}:{lineno}: dropped a damaged line {line.rstrip()!r} (expected stage, whole "
                      f"seconds, devices, kind[, status], tab-separated): that attempt's time is not counted")
                continue
            stage, seconds, devices, kind = parts[0], int(parts[1]), int(parts[2]), parts[3]
            old = (0, 0, kind, 0, 0) if stage in finished else times.get(stage, (0, 0, kind, 0, 0))
            finished.discard(stage)
            times[stage] = (old[0] + seconds, devices, kind, old[3] + 1, old[4] + seconds * devices)
            if parts[4:] == ["finished"]:
                finished.add(stage)
    return times


def device_hours(times, stages):
    return sum(times[s][4] for s in stages if s in times) / 3600


def rl_rollouts(run_dir, up_to_step=None):
    """(rollouts generated, metrics, settings) of an RL run directory (of its first up_to_step steps), or (None, [], {})
    before it exists."""
    path = os.path.join(run_dir, "settings.json")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not (os.path.exists(path) and os.path.exists(metrics)):
        return None, [], {}
    settings = common.read_json(path, "an RL run's settings")
    for key in ("prompts_per_step", "samples_per_prompt"):
        if type(settings.get(key)) is not int or settings[key] < 1:
            raise UserError(f"{path}: field {key!r} missing or not a positive integer")
    rows = common.read_metrics(metrics, types={"gen_batches": int})
    steps = [m for m in rows if 0 < m["step"] <= (m["step"] if up_to_step is None else up_to_step) and "reward" in m]
    for m, after in zip(steps, steps[1:]):
        if after["step"] == m["step"]:
            raise UserError(f"{metrics}: two training rows of step {m['step']} (one step's rollouts counted twice)")
    for m in steps:  # (read_metrics named a non-integer's line; a bool passes isinstance int, and is no count)
        if type(m.get("gen_batches", 1)) is not int or m.get("gen_batches", 1) < 1:
            raise UserError(f"{metrics}: step {m['step']}: field 'gen_batches' must be a positive integer, got "
                            f"{json.dumps(m['gen_batches'])}")
    batches = sum(m.get("gen_batches", 1) for m in steps)  # (more than one a step with dynamic sampling)
    return batches * settings["prompts_per_step"] * settings["samples_per_prompt"], rows, settings


def difficulty_key(summary):
    """The task's difficulty key ("people" for K&K, "level" for MATH), as eval.py recorded it. A summary from before
    it was recorded names its task: a shipped one's key is known; no module a file names is imported (data is
    data), so a fork's task's heading is then "difficulty"."""
    if "difficulty_key" in summary:
        key = summary["difficulty_key"]
    else:
        task = summary.get("settings", {}).get("task")
        shipped = isinstance(task, str) and tasks.task_module_name(task) in ("kk_data", "math_data")
        key = tasks.get_task(task).DIFFICULTY if shipped else None
    return key if isinstance(key, str) and key else "difficulty"


def limr_tables(out_dir, only_seeds=()):
    """The LIMR experiment of reproduce.sh (LIMR=1): test accuracy of the start, FULL, RAND and LIM per seed and
    split, with the prompts, steps and rollouts each spent (and their mean over seeds); [] when there is none.
    only_seeds: these seeds' folders (limr/seed_S), or every one there."""
    only_seeds = [str(s) for s in only_seeds]  # (as the folders name them)
    limr_dir, eval_dir = os.path.join(out_dir, "limr"), os.path.join(out_dir, "limr", "eval")
    seeds = (sorted((name[5:] for name in os.listdir(limr_dir)
                     if name.startswith("seed_") and (not only_seeds or name[5:] in only_seeds)),
                    key=difficulty_order)
             if os.path.isdir(limr_dir) else [])
    accuracy, evaluated_at = {}, {}  # (model, split) -> overall accuracy; model -> the step its checkpoint is at
    for name in os.listdir(eval_dir) if os.path.isdir(eval_dir) else []:
        for split in os.listdir(os.path.join(eval_dir, name)) if os.path.isdir(os.path.join(eval_dir, name)) else []:
            path = os.path.join(eval_dir, name, split, "summary.json")
            if os.path.exists(path):
                summary = read_summary(path)
                accuracy[name, split] = summary["overall"]["accuracy"]
                evaluated_at[name] = evaluated_step(summary)
    if not accuracy:
        return []
    splits = sorted({split for _, split in accuracy})

    def with_accuracy(row, name):
        row.update({split: accuracy.get((name, split)) for split in splits})
        if len(splits) > 1 and all(accuracy.get((name, split)) is not None for split in splits):
            row["average"] = sum(accuracy[name, split] for split in splits) / len(splits)
        return row

    rows = [with_accuracy({"model": "start", "seed": "", "prompts": "", "RL steps": 0, "RL rollouts": 0,
                           "with the probe": 0}, "start")]
    notes, by_arm = [], {}
    unselected = list(set(only_seeds) - set(seeds))  # asked for, no folder yet
    for seed in seeds:
        dir_ = os.path.join(limr_dir, f"seed_{seed}")
        scores_path = os.path.join(dir_, "scores.jsonl")
        if not os.path.exists(scores_path):
            unselected.append(seed)
            continue
        score_rows = common.read_jsonl(scores_path, required=("score",), types={"score": (int, float, type(None)),
                                                                                "accuracy": list})
        scores = [r["score"] for r in score_rows]
        # the prompts the probe drew (FULL's pool): the rest were longer than its --max_prompt_tokens, or it was too
        # short to draw them
        drawn = sum(any(a is not None for a in r.get("accuracy", [0])) for r in score_rows)
        probe_rollouts, probe_metrics, _ = rl_rollouts(os.path.join(dir_, "full"))
        probe_steps = sum(1 for m in probe_metrics if m.get("step", 0) > 0 and "reward" in m)

        def arm_steps(arm):  # the step its evaluated checkpoint is at, else the last one its run trained (or None)
            if evaluated_at.get(f"{arm}_{seed}") is not None:
                return evaluated_at[f"{arm}_{seed}"]
            return max((m["step"] for m in rl_rollouts(os.path.join(dir_, arm))[1] if "reward" in m), default=None)
        steps = {arm: arm_steps(arm) for arm in ("lim", "rand")}
        full_at = evaluated_at.get(f"full_{seed}")
        steps["full"] = steps["lim"] if full_at is None else full_at  # (FULL not evaluated: the probe at LIM's steps)
        arms = {"FULL": (drawn, 0), "RAND": (count_lines(os.path.join(dir_, "rand.jsonl")), 0),
                "LIM": (count_lines(os.path.join(dir_, "lim.jsonl")), probe_rollouts)}
        for arm, (prompts, probe) in arms.items():
            at = steps[arm.lower()]  # (None: no step known yet, so no count, where 0 would read as measured)
            spent = None if at is None else rl_rollouts(os.path.join(dir_, arm.lower()), at)[0]
            with_probe = None if spent is None else spent + (probe or 0)  # (an arm that never ran: none)
            row = with_accuracy({"model": arm, "seed": seed, "prompts": prompts, "RL steps": steps[arm.lower()],
                                 "RL rollouts": spent, "with the probe": with_probe},
                                f"{arm.lower()}_{seed}")
            rows.append(row)
            by_arm.setdefault(arm, []).append(row)
        pool = (f"the {len(scores)} prompts of the pool" if drawn == len(scores) else
                f"{drawn} of the pool's {len(scores)} prompts (the others never drawn: longer than its "
                f"--max_prompt_tokens, or the probe too short to draw them)")
        notes.append(f"seed {seed}: the probe ran {probe_steps} steps ({probe_rollouts} rollouts) on {pool}; "
                     f"{sum(x is not None for x in scores)} scored, "
                     f"{len(scores) - sum(x is not None for x in scores)} dropped (as lim_select.py counts them: a "
                     f"gap in their curve, or never drawn), {arms['LIM'][0]} selected.")
    lines = ["", "### LIMR: RL on the LIM subset, the whole pool (FULL) and a random subset of LIM's size (RAND), "
             "from the same start for equal steps", "", markdown_table(rows, digits=3),
             "FULL is the probe run at that step (RL on the whole pool); RL rollouts: steps x prompts x group; "
             "with the probe: LIM's own rollouts plus the probe run's, which its selection needed. "
             "Test accuracy is overall, per split.", *notes]
    if unselected:
        unselected.sort(key=difficulty_order)
        lines.append(f"LIMR seed{'s' if len(unselected) > 1 else ''} {', '.join(map(str, unselected))}: not selected "
                     f"yet (no limr/seed_S/scores.jsonl), left out of the LIMR tables.")
    if len({r["seed"] for arm_rows in by_arm.values() for r in arm_rows}) > 1:  # a mean over two seeds or more
        mean_rows = []
        for arm, arm_rows in by_arm.items():
            row = {"model": arm, "seeds": len(arm_rows)}
            for split in splits + (["average"] if any("average" in r for r in arm_rows) else []):
                row[split] = mean_cell([r.get(split) for r in arm_rows])
            mean_rows.append(row)
        lines += ["", "Mean ± std over seeds:", "", markdown_table(mean_rows)]
    return lines


def evaluated_names(run_dir, stage="eval"):
    """The models reproduce.sh's eval stage (or eval_se) evaluated in run_dir (the --names of the command its marker
    done/STAGE holds), or None without the marker (report.py run by hand before that stage finished: every summary
    there)."""
    path = os.path.join(run_dir, "done", stage)
    if not os.path.exists(path):
        return None
    try:
        words = shlex.split(" ".join(line for lineno, line in common.text_lines(path) if lineno > 1))
    except ValueError:  # (quoting shlex does not read as bash did)
        return None
    if "--names" not in words:
        return None
    names = []
    for word in words[words.index("--names") + 1:]:
        if word.startswith("--"):
            break
        names.append(word)
    return set(names)


def read_summaries(run_dir, notes=None):
    """model -> its test summary (eval.py), for the models of the study evaluated in run_dir: a summary an earlier
    run left (its model not in this run's evaluation, e.g. a re-distillation set now under one SFT batch) is left out,
    and named in notes, as is why a re-distilled model has no row."""
    summaries, evaluated = {}, evaluated_names(run_dir)
    for name in MODELS:
        path = os.path.join(run_dir, "eval", name, "test", "summary.json")
        if os.path.exists(path):
            if evaluated is not None and name not in evaluated:
                if notes is not None:
                    notes.append(f"{path}: left by an earlier run ({name} is not in this study's evaluation, "
                                 f"{os.path.join(run_dir, 'done', 'eval')}): not in the table.")
                continue
            summaries[name] = read_summary(path)
    for name in MODELS:  # (a model the evaluation ran whose summary is gone, and why a re-distilled one has none)
        if notes is None or name in summaries:
            continue
        path = os.path.join(run_dir, "eval", name, "test", "summary.json")
        if evaluated is not None and name in evaluated:
            notes.append(f"No {name} row: evaluated, but {path} is missing (run the evaluation again).")
        elif name in ("redistill_A", "redistill_B"):
            samples = count_lines(os.path.join(run_dir, SFT_SET[name]))
            why = ("not evaluated yet" if evaluated is None else
                   "not in this study" if samples is None else f"no model in this study (its set: {samples} samples)")
            notes.append(f"No {name} row: {why}.")
    return summaries


def selection_summaries(run_dir):
    """model -> its test summary, for the sample-effect experiment's models that eval_se evaluated in run_dir."""
    evaluated = evaluated_names(run_dir, "eval_se")
    found = {}
    for name in SELECTION_MODELS:
        path = os.path.join(run_dir, "eval_se", name, "test", "summary.json")
        if os.path.exists(path) and (evaluated is None or name in evaluated):
            found[name] = read_summary(path)
    return found


def evaluated_step(summary):
    """The step of the RL checkpoint (step_N) a summary evaluated, or None (another name: the run's every step)."""
    found = re.search(r"(?:^|/)step_(\d+)$", str(summary.get("settings", {}).get("checkpoint_path", "")).rstrip("/"))
    return int(found.group(1)) if found else None


# what makes two summaries' numbers comparable: the same test records, drawn and scored the same way
PROTOCOL = ("task", SPLIT_DIGEST, "samples_per_prompt", "temperature", "top_p", "max_response_tokens", "template",
            "score_truncated", "dtype")


def protocol(summary):
    """A summary's PROTOCOL fields that it records (an older eval.py's: fewer; the split's digest among its inputs)."""
    s = summary.get("settings") or {}
    found = {k: s[k] for k in PROTOCOL if k in s}
    if isinstance(s.get("inputs"), dict) and SPLIT_DIGEST in s["inputs"]:
        found[SPLIT_DIGEST] = s["inputs"][SPLIT_DIGEST]
    return found


def protocol_notes(labelled):
    """One note for each summary evaluated otherwise than the first (labelled: [(label, summary)]): another test
    split, other samples per prompt, temperature, top-p, token budget, template, scoring or dtype (an evaluation run
    by hand, or a stale seed's), whose accuracy a table, a gain or a recovery would compare as if it were like."""
    if not labelled:
        return []
    first_label, first = labelled[0][0], protocol(labelled[0][1])
    notes = []
    for label, summary in labelled[1:]:
        other = protocol(summary)
        differ = [f"{k} {json.dumps(other[k])} (not {json.dumps(first[k])})" for k in PROTOCOL
                  if k in first and k in other and other[k] != first[k]]
        if differ:
            notes.append(f"**Not comparable:** {label} was evaluated otherwise than {first_label}: "
                         f"{', '.join(differ)}; evaluate them alike before reading the two side by side.")
    return notes


def seed_runs(out_dir, seeds=0):
    """reproduce.sh's seeds (SEEDS=N): seed 1 is OUT_DIR itself, seed S > 1 is OUT_DIR/seed_S; seeds > 0: only
    1..seeds. [(seed, dir)]."""
    more = [(int(name[5:]), os.path.join(out_dir, name)) for name in os.listdir(out_dir)
            if re.fullmatch(r"seed_([2-9]|[1-9]\d+)", name) and os.path.isdir(os.path.join(out_dir, name))]
    # (as reproduce.sh names them: seed_01 or seed_1, copied or renamed by hand, would count a seed twice)
    return [(1, out_dir)] + sorted(r for r in more if not seeds or r[0] <= seeds)


def seed_tables(out_dir, difficulty, seeds=0):
    """Over the seeds of reproduce.sh (SEEDS=N): each model's test accuracy as mean ± std, every seed's row, and
    the two headline figures per seed: RL's gain over its cold start and the share of it that re-distillation
    recovers. [] with fewer than two finished seeds."""
    runs, missing, found = [], [], seed_runs(out_dir, seeds)
    if len(found) < 2 and seeds < 2:  # one seed: no seeds' table
        return []
    seed_notes = []  # (a seed's evaluated model without its summary, or one an earlier run left: named)
    for seed, run_dir in found:
        notes = []
        summaries = read_summaries(run_dir, notes)
        if "sft" in summaries and "rl" in summaries:  # a seed counts once its study is evaluated
            runs.append((seed, run_dir, {**summaries, **selection_summaries(run_dir)}))
            seed_notes += [f"Seed {seed}: {note}" for note in notes] if seed > 1 else []  # (seed 1's: its own table)
        else:
            missing.append(seed)
    missing += [s for s in range(2, seeds + 1) if not os.path.isdir(os.path.join(out_dir, f"seed_{s}"))]
    left_out = ([f"Seed{'s' if len(missing) > 1 else ''} {', '.join(map(str, sorted(missing)))}: not evaluated yet "
                 f"(no sft and rl test summaries), left out of the seeds' table."] if missing else [])
    if len(runs) < 2:
        return [""] + left_out
    per_seed, headline, gains, shares = [], [], [], {"redistill_A": [], "redistill_B": []}
    for seed, run_dir, summaries in runs:
        for name, s in summaries.items():
            row = summary_row(s, name, difficulty)
            per_seed.append({"model": name, "seed": seed, **{k: v for k, v in row.items() if k != "checkpoint"}})
        sft, rl = summaries["sft"]["overall"]["accuracy"], summaries["rl"]["overall"]["accuracy"]
        rollouts = rl_rollouts(os.path.join(run_dir, "rl"), evaluated_step(summaries["rl"]))[0]
        gains.append(100 * (rl - sft))
        h = {"seed": seed, "sft": sft, "rl": rl, "RL gain": f"{gains[-1]:+.1f}", "RL rollouts": rollouts}
        for name, share in shares.items():
            if name in summaries:
                h[name] = summaries[name]["overall"]["accuracy"]
                if rl > sft:  # a share of a gain; none where RL gained nothing
                    share.append((h[name] - sft) / (rl - sft))
                    h[f"{name}: share of RL gain"] = f"{100 * share[-1]:.0f}%"
                h[f"{name}: samples"] = count_lines(os.path.join(run_dir, SFT_SET[name]))
        probe_path = os.path.join(run_dir, "base_probe.json")
        if os.path.exists(probe_path):  # tiny only: the base in its own format, roughly what the table can reach
            h["base probe"] = read_probe(probe_path)["accuracy"]
        # the study's own stages: with SEEDS > 1, LIMR=1 runs in seed 1's directory only
        study = [t[0] for stage, t in read_times(os.path.join(run_dir, "times.tsv")).items()
                 if not stage.startswith("limr_")]
        h["wall min"] = f"{sum(study) / 60:.1f}"
        headline.append(h)
    columns = list(dict.fromkeys(c for r in per_seed for c in r if c not in ("model", "seed", "mean len")))
    mean_rows = []
    for name in MODELS + SELECTION_MODELS:
        rows = [r for r in per_seed if r["model"] == name]
        if not rows:
            continue
        row = {"model": name, "seeds": len(rows)}
        for c in columns:
            # (a number; an int too, as read_summary takes from a summary written by hand or another tool)
            values = [float(v) if isinstance(v := r.get(c), (int, float)) and not isinstance(v, bool) else None
                      for r in rows]
            if any(v is not None for v in values):
                row[c] = mean_cell(values)
        mean_rows.append(row)
    every = [(f"{name} (seed {seed})", summary) for seed, _, summaries in runs for name, summary in summaries.items()]
    how = how_evaluated(summary for _, summary in every)
    lines = ["", f"### Over {len(runs)} seeds (seed 1: {out_dir}; seed S: {out_dir}/seed_S): test accuracy"
             f"{' (' + how + ')' if how else ''}, mean ± std (sample std over seeds)", "", markdown_table(mean_rows),
             *left_out, *seed_notes, *protocol_notes(every),
             "GRPO gain over its start (rl - sft, overall): {:+.1f} ± {:.1f} points; "
             "per seed ".format(*mean_std(gains))
             + ", ".join(f"{g:+.1f}" for g in gains) + "."]
    gained = sum(g > 0 for g in gains)
    for name, share in shares.items():
        if share:
            mean, std = mean_std(share)
            over = (f"the {len(share)} of {len(runs)} seeds where RL gained" if len(share) == gained else
                    f"{len(share)} seed(s): where RL gained ({gained} of {len(runs)}) and {name} was evaluated")
            lines.append(f"{name} recovers {100 * mean:.0f}%" + (f" ± {100 * std:.0f}%" if len(share) > 1 else "")
                         + f" of RL's gain ((acc - sft) / (rl - sft), over {over}); per seed "
                         + ", ".join(f"{100 * x:.0f}%" for x in share) + ".")
    lines += ["", "Per seed:", "", markdown_table(headline, digits=3), "", markdown_table(per_seed, digits=3)]
    return lines


PLOTS = ("rl_curve.png", "accuracy_by_difficulty.png")


def plots(out_dir, metrics, summaries, temperature, difficulty, title=""):
    """The RL curve and the accuracy per level; title: what they are of ("seed 1" in a study of several seeds)."""
    plt = common.pyplot()
    if plt is None:
        return []
    written = []
    if metrics:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        train = [m for m in metrics if "reward" in m]
        val = [m for m in metrics if "val/acc" in m]
        ax.plot([m["step"] for m in train], [m["reward"] for m in train], label=f"rollout reward (T={temperature})")
        # (train_rl validates on its --test_data: in reproduce.sh the test split the table is of)
        ax.plot([m["step"] for m in val], [m["val/acc"] for m in val], "o-", label="test-split accuracy (greedy)")
        ax.set_xlabel("RL step"), ax.set_ylabel("accuracy"), ax.set_ylim(-0.02, 1.02), ax.legend(), ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)  # (steps, not 0.5 steps)
        ax.set_title(title)
        fig.tight_layout()
        written.append(os.path.join(out_dir, PLOTS[0]))
        common.save_figure(fig, written[-1], dpi=120)
    levels = sorted({lv for s in summaries.values() for lv in s["by_difficulty"]}, key=difficulty_order)
    if levels:  # (a task without difficulties, DIFFICULTY None, has none to plot)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(summaries)
        for i, (name, s) in enumerate(summaries.items()):  # a model keeps its colour whichever others were evaluated
            heights = [s["by_difficulty"].get(lv, {}).get("accuracy", float("nan")) for lv in levels]
            ax.bar([j + i * width for j in range(len(levels))], heights, width, label=name,
                   color=f"C{MODELS.index(name) if name in MODELS else len(MODELS) + i}")
            for j, height in enumerate(heights):  # a level a summary lacks: no bar, said (a 0.0 is no bar either)
                if height != height:
                    ax.text(j + i * width, 0.01, "n/a", ha="center", va="bottom", rotation=90, fontsize=6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(levels))], [f"{difficulty} {lv}" for lv in levels])
        how = how_evaluated(summaries.values())  # (wrapped: a long one ran off the figure, cut where it said most)
        ax.set_ylabel(textwrap.fill(f"test accuracy{' (' + how + ')' if how else ''}", 45),
                      fontsize=8 if len(how) > 20 else None)
        ax.set_ylim(0, 1), ax.legend(fontsize=8), ax.grid(axis="y", alpha=0.3)
        ax.set_title(title)
        fig.tight_layout()
        written.append(os.path.join(out_dir, PLOTS[1]))
        common.save_figure(fig, written[-1], dpi=120)
    return written


def wall_time_lines(times, of=""):
    stage_rows = [{"stage": st, "wall s": sec, "devices": dev, "kind": k, "attempts": n}
                  for st, (sec, dev, k, n, _) in times.items()]
    if not stage_rows:
        return []
    total = sum(r["wall s"] for r in stage_rows)
    stage_rows.append({"stage": "all", "wall s": total, "devices": "", "kind": f"{total / 60:.1f} min",
                       "attempts": sum(r["attempts"] for r in stage_rows)})
    return ["", f"### Wall time per stage{f' ({of})' if of else ''}", "", markdown_table(stage_rows)]


def write_results(out, lines):
    """OUT/results.md, written atomically, and printed."""
    text = "\n".join(lines) + "\n"
    with common.atomic_open(os.path.join(out, "results.md")) as f:
        f.write(text)
    print(text)
    print(f"wrote {os.path.join(out, 'results.md')}")


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    common.check_non_negative(args, "seeds")
    out = args.out_dir
    if not os.path.isdir(out):  # (before the lock below, which would make it)
        raise common.UserError(f"{out}: no such directory; run reproduce.sh first (--out_dir: its OUT)")
    common.lock_output([os.path.join(out, name) for name in ("results.md",) + PLOTS])  # (and a killed run's leftovers)
    times = read_times(os.path.join(out, "times.tsv"))
    notes = []
    summaries = read_summaries(out, notes)
    rl_step = evaluated_step(summaries["rl"]) if "rl" in summaries else None  # what the table's RL row is
    rollouts, metrics, rl_settings = rl_rollouts(os.path.join(out, "rl"), rl_step)
    limr = limr_tables(out, args.limr_seeds)
    if not summaries:
        # seed 1 not evaluated (killed in its evaluation) while later seeds are: their table, which says so
        later = [s for seed, run_dir in seed_runs(out, args.seeds) if seed > 1
                 for s in read_summaries(run_dir).values()]
        seed_lines = seed_tables(out, difficulty_key(later[0]), args.seeds) if later else []
        seed_lines = seed_lines if any(line.startswith("### Over") for line in seed_lines) else []
        if not limr and not seed_lines:
            raise common.UserError(f"{out}/eval: no evaluation summaries yet; run reproduce.sh first")
        # a preset of LIMR's own setting (LIMR_ONLY=1): its tables alone
        heading = f"## Results{' (' + args.preset + ')' if args.preset else ''}: " + (
            f"seed 1 ({out}) not evaluated yet; the finished seeds" if seed_lines else "LIMR")
        write_results(out, [heading] + seed_lines + limr + wall_time_lines(times))
        return
    kind = next(iter(times.values()))[2] if times else "device"
    difficulty = difficulty_key(next(iter(summaries.values())))
    # with several seeds (seed_tables says something), what is above its tables is seed 1's (OUT_DIR), and says so
    seed_lines = seed_tables(out, difficulty, args.seeds)
    seed_one = "seed 1" if seed_lines else ""
    mean_below = " (the mean over seeds is below)" if any(line.startswith("### Over") for line in seed_lines) else ""

    rows, how = [], how_evaluated(summaries.values())
    for name, s in summaries.items():
        row = summary_row(s, name, difficulty)
        row["SFT samples"] = count_lines(os.path.join(out, SFT_SET[name])) if name in SFT_SET else 0
        row["RL rollouts"] = rollouts if name in ("rl",) else 0
        row[f"own {kind}-h"] = round(device_hours(times, OWN[name]), 3)
        row[f"total {kind}-h"] = round(device_hours(times, OWN[name] + UPSTREAM[name]), 3)
        rows.append(row)
    lines = [f"## Results{' (' + args.preset + ')' if args.preset else ''}: "
             f"test accuracy{' (' + how + ')' if how else ''} per {difficulty}"
             f"{', ' + seed_one + mean_below if seed_one else ''}",
             "", markdown_table(rows)]
    spent = "?" if rollouts is None else rollouts  # (no rl/settings.json: its count unknown)
    lines.append(f"SFT samples: the set the model was fine-tuned on (RL: its cold start's). RL rollouts: every one "
                 f"generated, prompts x group x prompt batches (one a step; more with dynamic sampling). {kind}-h: "
                 f"measured wall time x devices; own = the stages that made it from its inputs, total = with the cold "
                 f"start and RL it builds on. Re-distilled models' data came from the RL run ({spent} rollouts), "
                 f"counted in their total.")
    lines += notes + protocol_notes(list(summaries.items()) + list(selection_summaries(out).items()))
    if "base" in times:
        lines.append("Pre-training the tiny base (shared by all): "
                     f"{device_hours(times, ['base_text', 'base']):.3f} {kind}-h.")
    if "sft" in summaries and "rl" in summaries:
        gain = summaries["rl"]["overall"]["accuracy"] - summaries["sft"]["overall"]["accuracy"]
        lines.append(f"GRPO gain over its start (rl - sft, overall{', ' + seed_one if seed_one else ''}): "
                     f"{100 * gain:+.1f} points.")
    probe_path = os.path.join(out, "base_probe.json")
    if os.path.exists(probe_path):  # tiny only: what the base knew before any chat-format SFT
        probe = read_probe(probe_path)
        per = ", ".join(f"people {k} {r['accuracy']:.3f}" for k, r in probe["people"].items())
        lines.append(f"The base asked in its own pre-training format (tiny_base.py --probe, greedy): "
                     f"{probe['accuracy']:.3f} overall ({per}).")

    effect_path = os.path.join(out, "sample_effect", "effects.summary.json")
    if os.path.exists(effect_path):
        eff = common.read_json(effect_path, "sample_effect's summary")
        erows = []
        try:
            for path, st in eff["files"].items():
                effect = st["sample_effect"]
                erows.append({"SFT set": os.path.basename(path), "samples": st["count"],
                              "mean effect": effect["mean"], "median effect": effect["median"],
                              "mean normalised": st["normalised"]["mean"],
                              "mean response tokens": round(st["mean_response_length"])})
                if not all(map(common.finite_number, [erows[-1][k] for k in ("samples", "mean effect",
                                                                             "median effect", "mean normalised")])):
                    raise ValueError(f"the numbers of {path} are not all finite")
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError) as e:
            raise UserError(f"{effect_path}: a field is missing or of the wrong type ({type(e).__name__}: {e}); "
                            f"sample_effect.py writes it whole: run that stage again")
        lines += ["", "### Sample effect on the cold-start policy (<grad log p(sample), grad J>, J = test reward)", "",
                  markdown_table(erows, digits=4)]
    select_rows = []
    for name, summary in selection_summaries(out).items():
        chosen_path = os.path.join(out, "sample_effect", name[3:] + ".jsonl")
        if os.path.exists(chosen_path):
            row = summary_row(summary, name, difficulty)
            chosen = []
            for lineno, rec in common.iter_jsonl(chosen_path):
                common.check_fields(f"{chosen_path}:{lineno}", rec, ("sample_effect",), {"source_file": str})
                if not common.finite_number(rec["sample_effect"]):
                    raise UserError(f"{chosen_path}:{lineno}: field 'sample_effect' must be a finite number, got "
                                    f"{json.dumps(rec['sample_effect'])}")
                chosen.append(rec)
            if not chosen:
                raise UserError(f"{chosen_path}: no samples (sample_effect.py writes K of them: run it again)")
            sources = {}
            for rec in chosen:
                source = os.path.basename(rec.get("source_file", "?"))
                sources[source] = sources.get(source, 0) + 1
            row["SFT samples"] = len(chosen)
            row["mean effect"] = sum(r["sample_effect"] for r in chosen) / len(chosen)
            row["drawn from"] = ", ".join(f"{k} {v}" for k, v in sorted(sources.items()))
            select_rows.append(row)
    if select_rows:
        pool = eff.get("settings", {}).get("select_from") if os.path.exists(effect_path) else None
        of = f"of {os.path.basename(pool)}" if pool else "pooled over the sets"
        lines += ["", "### SFT of the base on the top-K, the bottom-K and K random samples by sample effect "
                  f"({of}{', ' + seed_one if seed_one else ''})", "", markdown_table(select_rows, digits=4)]

    write_results(out, lines + seed_lines + limr
                  + wall_time_lines(times, seed_one and "seed 1's study, and LIMR if run"
                                    + ("; every seed's study: above" if mean_below else "")))
    for name in PLOTS:  # an earlier report's plots: redrawn below, or gone (they would not match this table)
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    if args.plots:
        for path in plots(out, [m for m in metrics if m.get("step") is not None
                                and (rl_step is None or m["step"] <= rl_step)], summaries,
                          rl_settings.get("temperature"), difficulty, seed_one):
            print(f"wrote {path}")


if __name__ == "__main__":
    common.run_main(main)
