"""
Scoring generated responses: unbiased pass@k, per-difficulty summaries, the accuracy tables, and the sharded
generate-score-gather that eval.py and training-time validation share.
"""
import json
import math
import time

import common
from common import UserError, derive_seed, rank, world_size
from engine import sample_responses
from parallel import gather_lists, on_every_rank, rank_share
from tasks import check_prompts_fit, is_correct, rescore, task_prompt_ids

SPLIT_DIGEST = "split records (sha256)"  # a summary's settings' inputs: the digest of the split's records as loaded


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) from n samples of which c are correct.

    Computed as a product (1 - k/i for i = n-c+1..n) so it is stable for large n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def difficulty_order(value):
    """Sort key for difficulty values (and seeds): numbers numerically, a number written as text too (a split's "10"
    after its "9"; report.py reads the levels back as text), then the other strings."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
        if number is not None and math.isfinite(number):
            return (0, number, value)
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _metrics(groups, ks):
    """Metrics of a list of per-prompt sample lists."""
    samples = [s for g in groups for s in g]
    out = {"prompts": len(groups), "samples": len(samples),  # accuracy = avg@n = pass@1
           "accuracy": round(sum(is_correct(s["reward"]) for s in samples) / len(samples), 6),
           "mean_reward": round(sum(s["reward"] for s in samples) / len(samples), 6)}
    for k in ks:
        out[f"pass@{k}"] = round(sum(pass_at_k(len(g), sum(is_correct(s["reward"]) for s in g), k)
                                     for g in groups) / len(groups), 6)
    out["mean_length"] = round(sum(s["length"] for s in samples) / len(samples), 3)
    out["truncation_rate"] = round(sum(not s["finished"] for s in samples) / len(samples), 6)
    return out


def summarize(samples, records, difficulty_key, pass_k=(1,)):
    """Metrics overall and per difficulty from scored samples ({"id", "reward", "finished", "length"}).

    Every record must have the same number n of samples. accuracy = the share of samples right
    (tasks.is_correct: avg@n; for a greedy run, the paper's pass@1); mean_reward (the same for 0/1 rewards);
    pass@k (unbiased, k <= n) over the right samples; mean_length in tokens (the stop token included);
    truncation_rate = share without EOS.
    Returns {"n", "pass_k", "overall": {...}, "by_difficulty": {str(difficulty): {...}}} with
    difficulties in natural order.
    """
    if not records:
        raise UserError("no records to summarize")
    by_id = {r["id"]: [] for r in records}
    for s in samples:
        if s["id"] not in by_id:
            raise UserError(f"sample for unknown record id {s['id']!r}")
        by_id[s["id"]].append(s)
    counts = {len(v) for v in by_id.values()}
    if len(counts) != 1 or 0 in counts:
        raise UserError(f"every record needs the same number (>= 1) of samples; got counts {sorted(counts)}")
    n = counts.pop()
    ks = sorted(k for k in set(pass_k) if 1 <= k <= n)
    summary = {"n": n, "pass_k": ks, "overall": _metrics(list(by_id.values()), ks), "by_difficulty": {}}
    if difficulty_key is not None:
        levels = {}  # by the value as text, as load_records tells them apart: a dict's key took 1, 1.0, True for one
        for r in records:
            levels.setdefault(str(r[difficulty_key]), (r[difficulty_key], []))[1].append(by_id[r["id"]])
        for text, (_, groups) in sorted(levels.items(), key=lambda item: difficulty_order(item[1][0])):
            summary["by_difficulty"][text] = _metrics(groups, ks)
    return summary


def how_evaluated(summaries):
    """How the summaries' samples were drawn and scored, for headings and labels: "greedy, pass@1" or "avg@n,
    temperature T, top-p P", then ", truncated answers scored as ended" under eval.py --score_truncated; several ways
    joined by " / " (each distinct once); "" where no summary records its settings."""
    ways = []
    for summary in summaries:
        s = summary.get("settings") or {}
        # samples per prompt: "n" (eval.py of 2026-11-22), "num_samples" (until 2026-11-27), then this name
        n = next((s[k] for k in ("samples_per_prompt", "num_samples", "n") if k in s), None)
        if n is None or "temperature" not in s:  # (a summary that does not say how it was drawn)
            continue
        how = ("greedy, pass@1" if s["temperature"] == 0 and n == 1 else
               f"avg@{n}, temperature {s['temperature']:g}, top-p {s.get('top_p', 1.0):g}")
        how += ", truncated answers scored as ended" if s.get("score_truncated") else ""
        if how not in ways:
            ways.append(how)
    return " / ".join(ways)


def summary_row(summary, name=None, difficulty_label=""):
    """One table row (an ordered dict: column -> value) from a summary: accuracy per difficulty, overall,
    pass@k (k > 1) overall, mean response length and truncation rate."""
    row = {"checkpoint": name or summary.get("checkpoint", "")}
    for d, m in summary["by_difficulty"].items():
        row[f"{difficulty_label} {d}".strip()] = m["accuracy"]
    row["overall"] = summary["overall"]["accuracy"]
    for k in summary["pass_k"]:
        if k > 1:
            row[f"pass@{k}"] = summary["overall"][f"pass@{k}"]
    row["mean len"] = f"{summary['overall']['mean_length']:.0f}"
    row["truncated"] = summary["overall"]["truncation_rate"]
    return row


def read_summary(path):
    """An eval summary.json (eval.py reuses it, report.py tabulates it), checked to hold what summary_row reads:
    a damaged one is one line naming the file, not a traceback."""
    summary = common.read_json(path, "an eval summary")

    def number(where, value, fraction=True):
        if not (common.is_fraction(value) if fraction else common.finite_number(value) and value >= 0):
            raise ValueError(f"{where} is {json.dumps(value)}, expected "
                             f"{'a number in [0, 1]' if fraction else 'a finite number >= 0'}")
    try:
        overall = summary["overall"]
        for key in ["accuracy", "truncation_rate"] + [f"pass@{k}" for k in summary["pass_k"] if k > 1]:
            number(f"overall {key}", overall[key])
        number("overall mean_length", overall["mean_length"], fraction=False)
        for difficulty, metrics in summary["by_difficulty"].items():
            number(f"by_difficulty {difficulty} accuracy", metrics["accuracy"])
        if not isinstance(summary.get("settings", {}), dict):  # (report.py and eval.py read fields of it)
            raise TypeError(f"field 'settings' is {summary['settings']!r}, expected an object")
        for key in ("temperature", "top_p"):  # (how_evaluated formats them)
            if key in summary.get("settings", {}):
                number(f"settings {key}", summary["settings"][key], fraction=False)
        summary_row(summary)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: not an eval summary ({type(e).__name__}: {e})")
    return summary


def markdown_table(rows, digits=3):
    """A markdown table from rows (dicts column -> value); its columns are their keys' union in first-seen order.
    Floats get `digits` decimals, missing cells a dash; the first column is left-aligned, the rest right."""
    columns = list(dict.fromkeys(c for r in rows for c in r))

    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# generation, scored and gathered over ranks


def generate_and_score(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seed=0,
                       template="auto", batch_size=64, pass_k=(1,), desc="eval", progress=True, reserve=None,
                       score_truncated=False):
    """Generate n responses per record on this rank's shard of `records`, score them with task.score, and
    gather: every rank returns the same (samples, summary). samples are in record order, then sample order:
    {"id", "difficulty", "sample", "response", "reward", "finished", "length"}; summary = `summarize(...)`.
    (Also for validation inside training: call it on every rank.) reserve: engine.generate's. score_truncated: a
    truncated response is scored as if it had ended (eval.py --score_truncated)."""
    this_rank, world = rank(), world_size()
    # every rank checks every prompt fits, so a too-long one stops all ranks alike (not one, mid-collective)
    check_prompts_fit(task_prompt_ids(tokenizer, task, records, template), records, max_new_tokens,
                      model.config.max_position_embeddings, desc)
    indices = rank_share(list(range(len(records))), this_rank, world)
    # (full weights: no collective inside; a task's score failing on one rank's share stops every rank)
    out = on_every_rank(lambda: sample_responses(
        model, tokenizer, task, [records[j] for j in indices], n=n, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens,
        # one stream for every rank, each record keyed by its index in `records`: the samples do not depend on the
        # number of ranks (rank 0's stream: one rank samples as before)
        seed=derive_seed(seed, 0), prompt_numbers=indices, template=template, batch_size=batch_size, desc=desc,
        progress=progress, reserve=reserve))
    # the record index travels with each sample, so the merged list has the same order for any world size
    mine = [{"index": indices[k // n], "sample": s["sample"], "response": s["response"], "reward": float(s["reward"]),
             "finished": bool(s["finished"]), "length": s["length"]} for k, s in enumerate(out)]
    rows = gather_lists(mine, key=lambda row: (row["index"], row["sample"]))
    samples = [{"id": records[row["index"]]["id"],
                "difficulty": records[row["index"]].get(task.DIFFICULTY) if task.DIFFICULTY else None,
                "sample": row["sample"], "response": row["response"], "reward": row["reward"],
                "finished": row["finished"], "length": row["length"]} for row in rows]
    if score_truncated:  # (every rank the same samples, the same scores)
        rescore(task, [s for s in samples if not s["finished"]], records, desc, score_truncated=True)
    return samples, summarize(samples, records, task.DIFFICULTY, pass_k)


def validate(model, tokenizer, task, records, step, max_new_tokens, template, batch_size, progress=True,
             reserve=None):
    """Greedy validation inside a training loop (every rank calls it): accuracy, truncation and seconds, overall
    and by difficulty, as "val/..." metrics. reserve: engine.generate's."""
    t0 = time.time()
    _, summary = generate_and_score(model, tokenizer, task, records, n=1, temperature=0.0,
                                    max_new_tokens=max_new_tokens, seed=0, template=template,
                                    batch_size=batch_size, desc=f"validate {step}", progress=progress,
                                    reserve=reserve)
    m = {"val/acc": summary["overall"]["accuracy"], "val/truncated": summary["overall"]["truncation_rate"],
         "val/seconds": time.time() - t0}
    m.update({f"val/acc_{task.DIFFICULTY}_{level}": g["accuracy"] for level, g in summary["by_difficulty"].items()})
    return m
