"""
Accuracy tables: evaluate one or more checkpoints on one or more task splits.

    python eval.py --task kk --checkpoints runs/base runs/rl/step_000200 --splits data/kk/test.jsonl --out_dir out/eval
    torchrun --nproc_per_node=8 eval.py --task math --checkpoints ... --splits data/math/test.jsonl --out_dir out/eval

The paper's protocol (paper.md section 9): greedy decoding (temperature 0, one sample), max 4096 new
tokens, accuracy per difficulty (K&K: number of people, MATH: level) and overall, and the truncation
("clip") rate. Sampled evaluation (--samples_per_prompt, --temperature, --top_p) adds avg@n and unbiased pass@k.

Scoring is the task's own `score`, the very function that rewards training: a truncated response (no EOS
within max_new_tokens) is wrong. NOTE: the paper's verl `main_eval` appended <|endoftext|> to every
response before scoring, so there a truncated response whose last \\boxed{} was right still counted. We
deliberately don't; the truncation rate is reported beside the accuracy so the difference can be judged.

Generation is our KV-cache engine (common.sample_responses); the prompts of a split are sharded across
torchrun ranks (common.shard), gathered in record order (common.all_gather_json) and written by rank 0, so
greedy output files do not depend on the number of ranks (up to floating-point batch effects: another
batch composition can flip a near-tie argmax, more likely in bf16). Sampled runs are seeded and
reproducible for a fixed world size and batch size; the random streams follow the batches.

Outputs, for each (checkpoint, split), in out_dir/<checkpoint name>/<split name>/:
  samples.jsonl  one line per (prompt, sample): {"id", "difficulty", "sample", "response", "reward", "finished", "length"}
  summary.json   settings and metrics overall and per difficulty (see `summarize`)
and out_dir/results.md: one markdown table per split, rows = checkpoints, ready for the README.
Files are written atomically, summary.json last: a (checkpoint, split) pair is done when its summary.json
exists, and a re-run skips done pairs (unless --overwrite). Output bytes are deterministic (no timings).

Importable by other stages: `pass_at_k`, `summarize`, `evaluate` (sharded generate + score + gather, for
validation inside training), `summary_row` and `markdown_table`.
"""
import argparse
import json
import os
import re
import time

import common
from common import UserError, print0

# -----------------------------------------------------------------------------
# settings (defaults follow the paper's evaluation, paper.md section 9)
parser = argparse.ArgumentParser(description="Evaluate checkpoints on task splits: accuracy tables.")
parser.add_argument("--task", default="kk", help="task: kk, math, or an importable task module name")
parser.add_argument("--checkpoints", nargs="+", default=None, help="HF checkpoint directories to evaluate (rows of the table)")
parser.add_argument("--names", nargs="+", default=None, help="row names for the checkpoints (default: each directory's basename)")
parser.add_argument("--splits", nargs="+", default=None, help="task split files to evaluate on (one table each)")
parser.add_argument("--split_names", nargs="+", default=None, help="names for the splits (default: each file's basename without extension)")
parser.add_argument("--out_dir", default="out/eval", help="output directory: <name>/<split>/{samples.jsonl,summary.json} and results.md")
# not --n: torchrun's own parser rejects "--n" after the script name as an ambiguous prefix of --nnodes etc.
parser.add_argument("--samples_per_prompt", type=int, default=1, help="samples per prompt, n of avg@n and pass@k (paper: 1, greedy)")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (paper)")
parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (ignored when greedy)")
parser.add_argument("--max_new_tokens", type=int, default=4096, help="response budget in tokens (paper: 4096); longer = truncated = wrong")
parser.add_argument("--pass_k", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64], help="k values for unbiased pass@k (only k <= n are reported)")
parser.add_argument("--template", default="auto", choices=["auto", "chat", "plain"], help="prompt template: chat (system prompt), plain Question/Answer, or auto")
parser.add_argument("--batch_size", type=int, default=64, help="prompts per generation batch (x n rows)")
parser.add_argument("--dtype", default="auto", help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
parser.add_argument("--seed", type=int, default=0, help="generation seed (matters only when sampling)")
parser.add_argument("--overwrite", type=common.str2bool, default=False, help="re-evaluate pairs that already have a summary.json")
parser.add_argument("--progress", type=common.str2bool, default=True, help="tqdm progress bar on rank 0")

# settings that change what is generated: a done pair is reused only when these match
GENERATION_SETTINGS = ("task", "checkpoint_path", "split_path", "samples_per_prompt", "temperature", "top_p", "max_new_tokens",
                       "template", "dtype", "seed")


# -----------------------------------------------------------------------------
# metrics (importable)


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
    """Sort key for difficulty values: numbers numerically, then strings."""
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _metrics(groups, ks):
    """Metrics of a list of per-prompt sample lists."""
    samples = [s for g in groups for s in g]
    out = {"prompts": len(groups), "samples": len(samples),
           "accuracy": round(sum(s["reward"] for s in samples) / len(samples), 6)}  # = avg@n = pass@1
    for k in ks:
        out[f"pass@{k}"] = round(sum(pass_at_k(len(g), sum(s["reward"] >= 1.0 for s in g), k)
                                     for g in groups) / len(groups), 6)
    out["mean_length"] = round(sum(s["length"] for s in samples) / len(samples), 3)
    out["truncation_rate"] = round(sum(not s["finished"] for s in samples) / len(samples), 6)
    return out


def summarize(samples, records, difficulty_key, pass_k=(1,)):
    """Metrics overall and per difficulty from scored samples ({"id", "reward", "finished", "length"}).

    Every record must have the same number n of samples. accuracy = mean reward over all samples
    (avg@n; for a greedy run, the paper's pass@1); pass@k (unbiased, k <= n) counts reward >= 1 as
    correct; mean_length in tokens (the stop token included); truncation_rate = share without EOS.
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
        levels = {}
        for r in records:
            levels.setdefault(r[difficulty_key], []).append(by_id[r["id"]])
        for d in sorted(levels, key=difficulty_order):
            summary["by_difficulty"][str(d)] = _metrics(levels[d], ks)
    return summary


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


def markdown_table(rows, columns=None, digits=2):
    """A markdown table from rows (dicts column -> value); columns default to the union in first-seen order.
    Floats get `digits` decimals, missing cells a dash; the first column is left-aligned, the rest right."""
    if columns is None:
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


def split_heading(summary):
    """Markdown heading naming the split and how it was evaluated."""
    s = summary["settings"]
    how = ("greedy, pass@1" if s["temperature"] == 0 and s["samples_per_prompt"] == 1 else
           f"avg@{s['samples_per_prompt']}, temperature {s['temperature']:g}, top-p {s['top_p']:g}")
    return f"### {summary['split']} ({s['task']}; {how}; max {s['max_new_tokens']} new tokens)"


def evaluate(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=4096, seed=0,
             template="auto", batch_size=64, pass_k=(1,), desc="eval", progress=True):
    """Generate n responses per record on this rank's shard of `records`, score them with task.score, and
    gather: every rank returns the same (samples, summary). samples are in record order, then sample order:
    {"id", "difficulty", "sample", "response", "reward", "finished", "length"}; summary = `summarize(...)`.
    (Also for validation inside training: call it on every rank.)"""
    rank, world = common.rank(), common.world_size()
    # every rank checks every prompt fits, so a too-long one stops all ranks alike (not one, mid-collective)
    common.check_prompts_fit(common.task_prompt_ids(tokenizer, task, records, template), records, max_new_tokens,
                             model.config.max_position_embeddings, desc)
    indices = common.shard(list(range(len(records))), rank, world)
    out = common.sample_responses(model, tokenizer, task, [records[j] for j in indices], n=n, temperature=temperature,
                                  top_p=top_p, max_new_tokens=max_new_tokens, seed=seed * 1000 + rank,  # own stream per rank
                                  template=template, batch_size=batch_size, desc=desc, progress=progress)
    # the record index travels with each sample, so the merged list has the same order for any world size
    mine = [{"index": indices[k // n], "sample": s["sample"], "response": s["response"], "reward": float(s["reward"]),
             "finished": bool(s["finished"]), "length": s["length"]} for k, s in enumerate(out)]
    rows = common.gather_lists(mine, key=lambda row: (row["index"], row["sample"]))
    samples = [{"id": records[row["index"]]["id"],
                "difficulty": records[row["index"]].get(task.DIFFICULTY) if task.DIFFICULTY else None,
                "sample": row["sample"], "response": row["response"], "reward": row["reward"],
                "finished": row["finished"], "length": row["length"]} for row in rows]
    return samples, summarize(samples, records, task.DIFFICULTY, pass_k)


def validate(model, tokenizer, task, records, step, max_new_tokens, template, batch_size, progress=True):
    """Greedy validation inside a training loop (every rank calls it): accuracy, truncation and seconds, overall
    and by difficulty, as "val/..." metrics."""
    t0 = time.time()
    _, summary = evaluate(model, tokenizer, task, records, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0,
                          template=template, batch_size=batch_size, desc=f"validate {step}", progress=progress)
    m = {"val/acc": summary["overall"]["accuracy"], "val/truncated": summary["overall"]["truncation_rate"],
         "val/seconds": time.time() - t0}
    m.update({f"val/acc_{task.DIFFICULTY}_{level}": g["accuracy"] for level, g in summary["by_difficulty"].items()})
    return m


# -----------------------------------------------------------------------------
# checking the inputs (every rank runs the same checks, before any collective call)


def safe_name(text):
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_") or "unnamed"


def split_label(path):
    base = os.path.basename(str(path).rstrip("/"))
    for ext in (".jsonl", ".json", ".parquet"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return safe_name(base)


def unique_names(names, given, flag, what):
    if given is not None:
        if len(given) != len(names):
            raise UserError(f"{flag} has {len(given)} name(s) for {len(names)} {what}")
        names = [safe_name(g) for g in given]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise UserError(f"two {what} share the name(s) {dup}; give distinct names with {flag}")
    return names


def read_done(summary_path, samples_path, settings, records, task):
    """A finished pair's summary, if its settings match this run's; recomputed when pass_k changed."""
    try:
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        old = summary["settings"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{summary_path}: cannot read this earlier result ({e}); pass --overwrite true")
    diff = [k for k in GENERATION_SETTINGS if old.get(k) != settings[k]]
    if diff:
        raise UserError(f"{summary_path} was made with other settings ({', '.join(f'{k}={old.get(k)!r}' for k in diff)}; "
                        f"now {', '.join(f'{k}={settings[k]!r}' for k in diff)}); pass --overwrite true or use another --out_dir")
    if old.get("pass_k_asked") != settings["pass_k_asked"]:
        samples = common.read_jsonl(samples_path, required=("id", "reward", "finished", "length"))
        summary.update(summarize(samples, records, task.DIFFICULTY, settings["pass_k_asked"]))
        summary["settings"] = settings
        common.write_json(summary_path, summary)
    return summary


# -----------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_settings(parser, argv)
    if not args.checkpoints or not args.splits:
        raise UserError("give --checkpoints DIR [DIR ...] and --splits PATH [PATH ...]")
    if args.samples_per_prompt < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--samples_per_prompt, --max_new_tokens and --batch_size must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be >= 0 and --top_p in (0, 1]")
    if args.temperature == 0 and args.samples_per_prompt > 1:
        raise UserError("greedy decoding (--temperature 0) gives n identical samples; use --samples_per_prompt 1 or a temperature > 0")
    if any(k < 1 for k in args.pass_k):
        raise UserError("--pass_k values must be >= 1")
    task = common.get_task(args.task)
    for path in args.checkpoints:
        common.check_checkpoint(path)
    names = unique_names([safe_name(os.path.basename(os.path.abspath(p))) for p in args.checkpoints],
                         args.names, "--names", "checkpoints")
    split_names = unique_names([split_label(p) for p in args.splits], args.split_names, "--split_names", "splits")

    import torch
    from model import load_model, load_tokenizer, parse_dtype
    rank, world, device = common.dist_setup()
    dtype = parse_dtype(args.dtype, device)
    common.seed_everything(args.seed)

    # the splits, checked once with the first checkpoint's tokenizer (prompts render the same for any)
    tokenizer = load_tokenizer(args.checkpoints[0])
    splits = [common.load_records(task, args.task, p, tokenizer, args.template) for p in args.splits]

    def settings_of(ckpt, split_path):
        return {"task": args.task, "checkpoint_path": os.path.abspath(ckpt), "split_path": os.path.abspath(split_path),
                "samples_per_prompt": args.samples_per_prompt, "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "template": args.template, "dtype": str(dtype).replace("torch.", ""), "seed": args.seed, "pass_k_asked": sorted(set(args.pass_k))}

    # which pairs are done: rank 0 decides (its file system holds out_dir) and tells the others
    plan = {"error": None, "done": {}}
    if rank == 0:
        try:
            for ckpt, name in zip(args.checkpoints, names):
                for split_path, split_name, records in zip(args.splits, split_names, splits):
                    pair_dir = os.path.join(args.out_dir, name, split_name)
                    summary_path = os.path.join(pair_dir, "summary.json")
                    if os.path.isfile(summary_path) and not args.overwrite:
                        plan["done"][f"{name}/{split_name}"] = read_done(
                            summary_path, os.path.join(pair_dir, "samples.jsonl"), settings_of(ckpt, split_path), records, task)
        except UserError as e:
            plan["error"] = str(e)
    plan = common.all_gather_json(plan)[0]
    if plan["error"]:
        raise UserError(plan["error"])

    summaries = {}  # (name, split_name) -> summary
    for ckpt, name in zip(args.checkpoints, names):
        todo = [i for i, s in enumerate(split_names) if f"{name}/{s}" not in plan["done"]]
        for i, s in enumerate(split_names):
            if i not in todo:
                summaries[name, s] = plan["done"][f"{name}/{s}"]
                print0(f"{name} on {s}: done before, skipped (accuracy {summaries[name, s]['overall']['accuracy']:.4f})")
        if not todo:
            continue
        t0 = time.time()
        model = load_model(ckpt, dtype=dtype, device=device).eval()
        tokenizer = load_tokenizer(ckpt)
        print0(f"loaded {ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}) "
               f"in {time.time() - t0:.1f}s")
        for i in todo:
            split_path, split_name, records = args.splits[i], split_names[i], splits[i]
            t0 = time.time()
            samples, metrics = evaluate(model, tokenizer, task, records, n=args.samples_per_prompt, temperature=args.temperature,
                                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                        template=args.template, batch_size=args.batch_size, pass_k=args.pass_k,
                                        desc=f"{name}/{split_name}", progress=args.progress)
            seconds = time.time() - t0
            summary = {"checkpoint": name, "split": split_name, "settings": settings_of(ckpt, split_path), **metrics}
            if rank == 0:
                pair_dir = os.path.join(args.out_dir, name, split_name)
                common.write_jsonl(os.path.join(pair_dir, "samples.jsonl"), samples)
                common.write_json(os.path.join(pair_dir, "summary.json"), summary)  # last: marks the pair done
            tokens = sum(s["length"] for s in samples)
            o = summary["overall"]
            print0(f"{name} on {split_name}: accuracy {o['accuracy']:.4f} | truncated {o['truncation_rate']:.3f} | "
                   f"mean length {o['mean_length']:.0f} | {len(samples)} samples in {seconds:.1f}s | "
                   f"{tokens / max(seconds, 1e-9):.0f} tok/s ({world} rank(s))")
            summaries[name, split_name] = summary
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # the tables: one per split, rows = checkpoints in the order given
    parts = []
    for split_name in split_names:
        rows = [summary_row(summaries[name, split_name], name, task.DIFFICULTY or "") for name in names]
        parts.append(split_heading(summaries[names[0], split_name]) + "\n\n" + markdown_table(rows))
    text = "\n".join(parts)
    if rank == 0:
        with common.atomic_open(os.path.join(args.out_dir, "results.md")) as f:
            f.write(text)
    print0("\n" + text)
    print0(f"wrote {os.path.join(args.out_dir, 'results.md')}")
    common.dist_cleanup()


if __name__ == "__main__":
    common.run_main(main)
