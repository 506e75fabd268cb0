"""
LIMR's learning-impact selection of RL prompts (Li, Zou and Liu, "LIMR: Less is More for RL Scaling",
arXiv 2502.11886): keep the prompts whose reward curve over a probe RL run follows the model's average
learning curve.

    python lim_select.py --rollouts runs/probe --train_data data/kk/train.jsonl --task kk \\
        --out data/kk/lim.jsonl --scores_out data/kk/lim_scores.jsonl --random_out data/kk/rand.jsonl

Reads the probe run's rollout log (train_rl.py's RUN_DIR/rollouts/step_N.jsonl) and does what LIMR's released
lim/lim_selection.py does (docs/limr.md): each prompt's accuracy per epoch, gaps back-filled once as their loop
does, the average curve over the complete prompts, and the score
    s_i = 1 - sum_k (r_ik - r_avg_k)^2 / sum_k (1 - r_avg_k)^2,   kept when s_i >= --threshold (LIMR: 0.6).
Writes --out (the selected pool records in pool order: a --train_data for train_rl.py), --scores_out (one row per
pool prompt: {"id", "score", "accuracy"}), --random_out (a seeded random subset of the same size from the prompts
the probe drew: LIMR's RAND baseline) and, with matplotlib, a plot of the curves. Bad input is one line naming the
file, line and field, and nothing is written.
"""
import os
import random

import numpy as np

import common
import tasks
from common import UserError, print0


def get_parser():
    p = common.new_parser("LIMR: select RL prompts by how closely their reward curve in a probe "
                          "RL run follows the average learning curve", prog="lim_select.py")
    p.add_argument("--rollouts", default=None,
                   help="the probe RL run directory: its rollouts/step_N.jsonl (train_rl.py) "
                   "cover the whole pool (required)")
    p.add_argument("--train_data", default=None,
                   help="the pool the probe run trained on: task records, jsonl (required)")
    p.add_argument("--task", default=None, help="task: kk, math, or a module name with the task interface (required)")
    p.add_argument("--steps_per_epoch", type=int, default=0,
                   help="group step files 1..N, N+1..2N, ... into epochs, as LIMR's code does (they used 8); "
                        "when given it wins over the rollouts' `epoch` field; 0 = use that field")
    p.add_argument("--epochs", type=int, default=0,
                   help="score the first this many epochs of the log (LIMR: 21); 0 = all complete ones: a last epoch "
                        "that drew fewer prompts than the one before (the probe stopped inside it) is left out, "
                        "since its gaps cannot be back-filled and would drop every prompt it did not draw")
    p.add_argument("--threshold", type=float, default=0.6, help="keep prompts with score >= this (LIMR: 0.6)")
    p.add_argument("--out", default=None, help="write the selected pool records here, in pool order (required)")
    p.add_argument("--scores_out", default=None,
                   help="also write one row per pool prompt: {id, score, accuracy}; score "
                   "is null for a dropped prompt; accuracy is the per-epoch list that was scored (after the back-fill; "
                   "null where an epoch stayed empty)")
    p.add_argument("--random_out", default=None, help="also write a random subset of the selected size (LIMR's RAND "
                   "baseline), in pool order, drawn from the pool prompts the probe drew in the epochs scored (all "
                   "of them, unless some were longer than its --max_prompt_tokens or it was too short to draw every "
                   "prompt)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --random_out subset")
    p.add_argument("--plot_out", default=None,
                   help="PNG of the average curve and a few prompts' curves, when matplotlib "
                   "is installed (default: --out with .png for .jsonl; '' = no plot)")
    return p


# -----------------------------------------------------------------------------
# reading the probe run's rollout log


def read_outcomes(run_dir, pool_ids, steps_per_epoch, prompts=None):
    """(epoch, pool index, solved) of every rollout in the log (steps 1..S, no hole), each row's fields checked; the
    logged epochs checked by check_step_epochs. The prompts the rows carry go into `prompts` (tasks.note_prompt)."""
    logs, folder, outcomes, last_epoch = tasks.rollout_logs(run_dir), os.path.join(run_dir, "rollouts"), [], -1
    prompts = {} if prompts is None else prompts
    if not logs:
        raise UserError(f"{folder}: no rollouts (no step_N.jsonl files; "
                        "the probe run writes them with --log_rollouts true)")
    if min(logs) < 1:  # (train_rl numbers its steps from 1)
        raise UserError(f"{tasks.rollout_log_path(run_dir, min(logs))}: step {min(logs)}, where a probe run's steps "
                        f"start at 1 (is {folder} a train_rl.py run's?)")
    for expected, step in enumerate(logs, 1):
        if step != expected:
            raise UserError(f"{tasks.rollout_log_path(run_dir, expected)}: file not found (the log has steps "
                            f"{min(logs)}..{max(logs)} with a hole: every step of the probe run is needed)")
    groups = {}  # (id, epoch) -> (the step that logged its group, its rows' sample numbers)
    for step, path in logs.items():
        epochs = []  # (line, epoch) of the step's rows
        for lineno, row in tasks.read_rollout_log(path, step, ("id", "reward", "step")):
            where, rid = f"{path}:{lineno}", row["id"]
            if str(rid) not in pool_ids:
                raise UserError(f"{where}: field 'id' {rid!r} is not a prompt of the pool (--train_data)")
            if "prompt" in row:  # (train_rl logs it: compared below with the pool's, as the run rendered them)
                tasks.note_prompt(prompts, row, where)
            if steps_per_epoch:
                epoch = (step - 1) // steps_per_epoch
            else:
                epoch = row.get("epoch")
                if epoch is None:
                    raise UserError(f"{where}: missing field 'epoch' (a log from before train_rl.py logged epochs: "
                                    f"pass --steps_per_epoch N)")
                if type(epoch) is not int or epoch < 0:
                    raise UserError(f"{where}: field 'epoch' is {epoch!r}, expected an integer >= 0")
                epochs.append((lineno, epoch))
                # one probe run draws a prompt once an epoch, as one group (checked with the logged epochs only:
                # --steps_per_epoch's cut of an old dynamic-sampling log may hold a prompt twice)
                group_step, numbers = groups.setdefault((str(rid), epoch), (step, set()))
                if group_step != step:
                    raise UserError(f"{where}: id {rid!r} was drawn in epoch {epoch} already, at step {group_step}: a "
                                    f"probe run draws a prompt once an epoch (logs of two runs mixed in {folder}?)")
                if "sample" in row:
                    if repr(row["sample"]) in numbers:
                        raise UserError(f"{where}: sample {row['sample']!r} of id {rid!r} in epoch {epoch} is logged "
                                        f"twice (a row repeated?)")
                    numbers.add(repr(row["sample"]))
            outcomes.append((epoch, pool_ids[str(rid)], tasks.is_correct(row["reward"])))
        if not steps_per_epoch:
            last_epoch = check_step_epochs(path, step, epochs, last_epoch)
    return outcomes


def check_step_epochs(path, step, epochs, last_epoch):
    """The epochs (line, epoch) of one step's rows, after steps whose last epoch was last_epoch (-1: none): train_rl.py
    draws its prompt batches in order, so a step's epochs are a run without a gap (more than one where dynamic
    sampling's refills cross an epoch's end; its rows in rank order then alternate), the first step's from 0, and
    each later step's from where the one before ended or the next. Returns the step's last epoch; a UserError naming
    the line of another (a row of another run, an edited log)."""
    seen = {epoch for _, epoch in epochs}
    first, last = min(seen), max(seen)
    allowed = (0,) if last_epoch < 0 else (last_epoch, last_epoch + 1)
    if first not in allowed:
        bad, why = first, ("expected 0 (the log's first step)" if last_epoch < 0 else
                           f"expected {last_epoch} or {last_epoch + 1} (step {step - 1} ended in epoch {last_epoch})")
    elif len(seen) != last - first + 1:
        hole = min(set(range(first, last + 1)) - seen)
        bad, why = min(epoch for epoch in seen if epoch > hole), f"but no row of step {step} is of epoch {hole}"
    else:
        return last
    line = next(lineno for lineno, epoch in epochs if epoch == bad)
    raise UserError(f"{path}:{line}: field 'epoch' is {bad}, {why}: a probe run's epochs, step after step, start at 0 "
                    f"and never go down or skip one")


# -----------------------------------------------------------------------------
# the scoring, as LIMR's code does it (tests/test_lim_select.py checks it against a hand computation)


def epoch_accuracy(outcomes, num_prompts, epochs):
    """(num_prompts, len(epochs)) array: the share of each prompt's rollouts in each epoch right (reward >= 1), NaN
    where it had none."""
    column = {e: k for k, e in enumerate(epochs)}
    solved, drawn = np.zeros((num_prompts, len(epochs))), np.zeros((num_prompts, len(epochs)))
    for epoch, i, ok in outcomes:
        if epoch in column:
            drawn[i, column[epoch]] += 1
            solved[i, column[epoch]] += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(drawn > 0, solved / drawn, np.nan)


def backfill_once(acc):
    """LIMR's gap handling: one pass over k = 0..K-2, an empty epoch k takes epoch k+1's value if that one has
    one (a value back-filled at k+1 comes later in the pass, so it never reaches k)."""
    acc = acc.copy()
    for k in range(acc.shape[1] - 1):
        fill = np.isnan(acc[:, k]) & ~np.isnan(acc[:, k + 1])
        acc[fill, k] = acc[fill, k + 1]
    return acc


def lim_scores(acc):
    """(scores with NaN for incomplete prompts, the average curve over the complete ones)."""
    complete = ~np.isnan(acc).any(axis=1)
    if not complete.any():
        raise UserError("no prompt has a rollout in every epoch, even after the back-fill: nothing to score "
                        "(is the probe run a few epochs long, and is --steps_per_epoch right?)")
    average = acc[complete].mean(axis=0)
    denominator = ((1.0 - average) ** 2).sum()
    if denominator == 0:
        raise UserError("every scored prompt was solved by every rollout in every epoch: the average curve is 1 "
                        "throughout and the score 1 - sum (r - avg)^2 / sum (1 - avg)^2 is 0/0")
    scores = np.full(len(acc), np.nan)
    scores[complete] = 1.0 - ((acc[complete] - average) ** 2).sum(axis=1) / denominator
    return scores, average


# a score the threshold in exact arithmetic, 3/5 computed as 0.5999999999999999, is kept: floats round the sums of
# squares by ~1e-16, and two distinct scores of one log (rationals of its rollout counts) lie at least 1 / (n^2 N K)
# apart (n rollouts a prompt, N prompts, K epochs): ~9e-8 at LIMR's 8, 8,523 and 21
SCORE_ROUNDING = 1e-9


def plot_curves(path, acc, scores, average, threshold):
    """The average curve and, for a few prompts across the range of scores, their own."""
    plt = common.pyplot()
    if plt is None:
        return
    scored = np.flatnonzero(~np.isnan(scores))
    by_score = scored[np.argsort(-scores[scored], kind="stable")]
    picks = sorted({int(by_score[round(q * (len(by_score) - 1))]) for q in (0.0, 0.25, 0.5, 0.75, 1.0)},
                   key=lambda i: -scores[i])
    epochs = np.arange(1, len(average) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, average, "k-", lw=3, label=f"average ({len(scored)} prompts)")
    for i in picks:
        kept = scores[i] >= threshold - SCORE_ROUNDING
        ax.plot(epochs, acc[i], "o--" if kept else ".:", lw=1,
                label=f"score {scores[i]:.2f}" + (" (kept)" if kept else ""))
    ax.set_xlabel("epoch of the probe run"), ax.set_ylabel("accuracy (reward 1)"), ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7), ax.grid(alpha=0.3)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=120)
    print0(f"wrote {path}")


# -----------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    for name in ("rollouts", "train_data", "task", "out"):
        if not getattr(args, name):
            raise UserError(f"--{name} is required")
    common.check_non_negative(args, "steps_per_epoch", "epochs")
    plot_out = os.path.splitext(args.out)[0] + ".png" if args.plot_out is None else args.plot_out
    logs = tasks.rollout_logs(args.rollouts)
    common.check_distinct_outputs([("--out", args.out), ("--scores_out", args.scores_out),
                                   ("--random_out", args.random_out), ("--plot_out", plot_out)],
                                  [("--train_data", args.train_data)]
                                  + [("--rollouts", path) for path in logs.values()])

    # ---- the pool and the log
    task = tasks.get_task(args.task)
    pool = tasks.load_records(task, args.task, args.train_data, None, "plain")
    pool_ids = {str(r["id"]): i for i, r in enumerate(pool)}  # (load_records refuses an id repeated, as text too)
    if live := common.run_in_progress(args.rollouts):
        raise UserError(f"{args.rollouts}: the probe run is still running ({live}), so its rollout log is not "
                        f"complete; run lim_select.py once it has ended")
    prompts = {}  # id -> (logged prompt, where)
    outcomes = read_outcomes(args.rollouts, pool_ids, args.steps_per_epoch, prompts)
    tokenizer = tasks.run_tokenizer(args.rollouts)
    if tokenizer is None:
        print0(f"note: no saved weights in {args.rollouts}, so no tokenizer: the logged prompts are not compared with "
               f"the pool's")
    tasks.check_rollouts_of(args.rollouts, tokenizer, task, args.task, pool, prompts, args.train_data)
    epochs = sorted({e for e, _, _ in outcomes})
    drawn = {e: len({i for epoch, i, _ in outcomes if epoch == e}) for e in epochs[-2:]}
    steps = len(logs)  # (read_outcomes refused a hole: steps 1..len)
    if args.steps_per_epoch:  # an epoch is that many step files: one with fewer is the one the probe stopped in
        stopped = (f"the log's last epoch has {steps % args.steps_per_epoch} of --steps_per_epoch "
                   f"{args.steps_per_epoch} steps" if steps % args.steps_per_epoch else None)
    else:  # an epoch draws every prompt the probe can: one that drew fewer is the one it stopped in
        stopped = (f"the log's last epoch drew {drawn[epochs[-1]]} prompts, the one before {drawn[epochs[-2]]}"
                   if len(epochs) > 1 and drawn[epochs[-1]] < drawn[epochs[-2]] else None)
    if not args.epochs and len(epochs) > 1 and stopped:
        print0(f"warning: {stopped}: the probe stopped inside it, so it is left out (--epochs {len(epochs)} would "
               f"score it)")
        epochs = epochs[:-1]
    if args.epochs:
        if len(epochs) < args.epochs:
            raise UserError(f"{args.rollouts}: the log has {len(epochs)} epochs, fewer than --epochs {args.epochs}")
        epochs = epochs[:args.epochs]
    outcomes = [o for o in outcomes if o[0] in epochs]  # (an epoch left out is not counted below either)
    if len(epochs) < 2:
        print0(f"warning: {len(epochs)} epoch in the log: the score compares one number per prompt, not a curve")

    # ---- the scores and the selection
    raw = epoch_accuracy(outcomes, len(pool), epochs)
    acc = backfill_once(raw)
    scores, average = lim_scores(acc)
    scored = ~np.isnan(scores)
    kept = scored & (scores >= args.threshold - SCORE_ROUNDING)
    selected = np.flatnonzero(kept)
    never_drawn = int(np.isnan(raw).all(axis=1).sum())
    print0(f"{len(outcomes)} rollouts of {len(pool)} pool prompts over {len(epochs)} epochs: {len(pool) - never_drawn} "
           f"drawn; {int(np.isnan(raw).sum() - np.isnan(acc).sum())} empty epochs back-filled")
    print0(f"scored {int(scored.sum())}, dropped {len(pool) - int(scored.sum())} (a gap left after the back-fill; "
           f"{never_drawn} never drawn), selected {len(selected)} with score >= {args.threshold:g}")
    print0("average curve: " + " ".join(f"{a:.3f}" for a in average))
    print0(f"scores: min {np.nanmin(scores):.3f}, median {np.nanmedian(scores):.3f}, max {np.nanmax(scores):.3f}")
    if not len(selected):
        raise UserError(f"no prompt scored >= --threshold {args.threshold:g} (the highest is {np.nanmax(scores):.3f}); "
                        f"nothing written")
    # RAND from the prompts the probe drew in the epochs scored: one it never drew (longer than its --max_prompt_tokens,
    # which RL on RAND would drop too) can no more be in RAND than in LIM, or RAND trains on fewer prompts than it is
    # said to hold
    probed = np.flatnonzero(~np.isnan(raw).all(axis=1))
    random_pick = sorted(int(probed[j]) for j in random.Random(args.seed).sample(range(len(probed)), len(selected)))

    # ---- the outputs (everything above can fail; nothing is written before this point)
    common.lock_output([args.out, args.scores_out, args.random_out, plot_out])  # (and a killed run's leftovers go)
    common.write_jsonl(args.out, [pool[i] for i in selected])
    print0(f"wrote {len(selected)} selected prompts to {args.out}")
    if args.scores_out:
        common.write_jsonl(args.scores_out, [
            {"id": r["id"], "score": float(scores[i]) if scored[i] else None,
             "accuracy": [None if np.isnan(a) else float(a) for a in acc[i]]} for i, r in enumerate(pool)])
        print0(f"wrote {len(pool)} scores to {args.scores_out}")
    if args.random_out:
        common.write_jsonl(args.random_out, [pool[i] for i in random_pick])
        print0(f"wrote a random {len(random_pick)} of the {len(probed)} pool prompts the probe drew (seed {args.seed}) "
               f"to {args.random_out}")
    if plot_out:
        plot_curves(plot_out, acc, scores, average, args.threshold)


if __name__ == "__main__":
    common.run_main(main)
