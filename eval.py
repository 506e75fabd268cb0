"""
Accuracy tables: evaluate one or more checkpoints on one or more task splits.

    python eval.py --task kk --checkpoints runs/base runs/rl/step_000200 --splits data/kk/test.jsonl --out_dir out/eval
    torchrun --nproc_per_node=8 eval.py --task math --checkpoints ... --splits data/math/test.jsonl --out_dir out/eval

The paper's protocol is the default: greedy, one sample, at most 4096 new tokens, accuracy per difficulty and
overall, and the truncation rate; --samples_per_prompt and --temperature add avg@n and unbiased pass@k. Scoring is
the task's own `score`, the one that rewards training: a truncated response is wrong (the paper's verl eval
appended EOS first, which --score_truncated true does; docs/eval.md). A split's prompts are shared out over torchrun
ranks and gathered in record order (scoring.generate_and_score), so in fp32 greedy outputs do not depend on the
number of ranks or --gen_batch_size; in bf16 (a GPU's default) another batch shape rounds the logits otherwise and
flips a greedy token at a near-tie now and then (summary.json records both).

Writes, per (checkpoint, split), OUT_DIR/<checkpoint>/<split>/samples.jsonl (every response with its reward,
finished flag and length) and summary.json (written last: it marks the pair done, and a re-run skips it unless
--overwrite true), then OUT_DIR/results.md: one table per split, a row per checkpoint.
"""
import os
import re
import time

import common
import engine
import parallel
import tasks
from common import UserError, print0
from model import check_checkpoint, checkpoint_stamps, dtype_name, read_config
from scoring import (SPLIT_DIGEST, generate_and_score, how_evaluated, markdown_table, read_summary, summarize,
                     summary_row)

# -----------------------------------------------------------------------------
# settings (defaults follow the paper's evaluation, paper.md section 9)


def get_parser():
    p = common.new_parser("Evaluate checkpoints on task splits: accuracy tables.")
    p.add_argument("--task", default="kk", help="task: kk, math, or an importable task module name")
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="HF checkpoint directories to evaluate (rows of the table; required)")
    p.add_argument("--names", nargs="+", default=None,
                   help="row names for the checkpoints (default: each directory's basename)")
    p.add_argument("--splits", nargs="+", default=None,
                   help="task split files to evaluate on (one table each; required)")
    p.add_argument("--split_names", nargs="+", default=None,
                   help="names for the splits (default: each file's basename without extension)")
    p.add_argument("--out_dir", default="out/eval",
                   help="output directory: <name>/<split>/{samples.jsonl,summary.json} and results.md")
    # not --n: torchrun's own parser rejects "--n" after the script name as an ambiguous prefix of --nnodes etc.
    p.add_argument("--samples_per_prompt", type=int, default=1,
                   help="samples per prompt, n of avg@n and pass@k (paper: 1, greedy)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (paper)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (ignored when greedy)")
    p.add_argument("--max_response_tokens", type=int, default=4096,
                   help="response budget in tokens (paper: 4096); longer = truncated = wrong (see --score_truncated)")
    p.add_argument("--score_truncated", type=common.str2bool, default=False,
                   help="score a truncated response as if it had ended, so a right answer in it counts: the paper's "
                        "scorer (its verl main_eval appended EOS to every response before scoring: "
                        "docs/paper_preset.md); false: a truncated response is wrong, as in training. A change "
                        "re-scores done pairs, generating nothing")
    p.add_argument("--pass_k", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64],
                   help="k values for unbiased pass@k (only k <= n are reported)")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="prompt template: chat (system prompt), plain Question/Answer, or auto")
    p.add_argument("--gen_batch_size", type=int, default=64,
                   help="prompts decoded at once: this x n rows = the KV cache's slots, which all rows stream through; "
                        "sets memory and speed, not the samples (but for rounding, which moves a token now and then: "
                        "a sampled one in fp32, in bf16 a greedy one at a near-tie too; summary.json records it)")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16, float64 "
                        "(exact on a CPU, slow)")
    p.add_argument("--seed", type=int, default=0,
                   help="generation seed (matters only when sampling): each record's samples are keyed by it and the "
                        "record's index in the split, the same at any world size")
    p.add_argument("--overwrite", type=common.str2bool, default=False,
                   help="re-evaluate pairs that already have a summary.json")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    return p


# settings that change what is generated: a done pair is reused only when these match
GENERATION_SETTINGS = ("task", "checkpoint_path", "split_path", "samples_per_prompt", "temperature", "top_p",
                       "max_response_tokens", "template", "dtype", "seed")
SAMPLING_ONLY = ("top_p", "seed")  # (greedy decoding reads neither: a greedy pair is reused whatever they are)
GENERATED_IN = ("world_size", "gen_batch_size")  # recorded, not compared (bf16: they can flip a greedy near-tie)


# -----------------------------------------------------------------------------
# the results table


def split_heading(summary):
    """Markdown heading naming the split and how it was evaluated."""
    s = summary["settings"]
    return (f"### {summary['split']} ({s['task']}; {how_evaluated([summary])}; "
            f"max {s['max_response_tokens']} new tokens)")


# -----------------------------------------------------------------------------
# checking the inputs (every rank runs the same checks, before any collective call)


def safe_name(text):
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text).strip("_")[:100]  # (a directory's name: 255 bytes at most)
    return name if name.strip(".") else "unnamed"  # (".." would write outside --out_dir)


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
        for g, name in zip(given, names):  # (a directory name: "a b" or "../x" cannot be one as given)
            if name != g:
                print0(f"note: {flag} {g!r} is written as {name!r} (a name of letters, digits and ._=+- only)")
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise UserError(f"two {what} share the name(s) {dup}; give distinct names with {flag}")
    return names


PROMPT_DIGEST = "prompts as rendered (sha256)"  # the task's render_prompt, tasks.SYSTEM_PROMPT, --template


def prompt_digest(tokenizer, task, records, template):
    """The digest of a split's prompts as this checkpoint's tokenizer renders them: a prompt edited in the task
    module or in tasks.py since a pair was evaluated makes it stale (the task's source alone only re-scores)."""
    return common.data_digest(tasks.task_prompt_ids(tokenizer, task, records, template))


def inputs_of(ckpt, split_digest):
    """What a pair is computed from: [size, modification time] of the checkpoint's files (weights, config,
    tokenizer), and the digest of the split's records as loaded (common.data_digest: a file, a directory of problem
    files edited in place, a hub split alike). A checkpoint rebuilt under the same path (a re-run stage), a chat
    template fixed in place or an edited split then gives other numbers, and the pair is evaluated again."""
    return {**checkpoint_stamps(ckpt, tasks.TOKENIZER_FILES), SPLIT_DIGEST: split_digest}


def changed_files(old, new):
    return [f for f in {**old, **new} if old.get(f) != new.get(f)]


def read_done(summary_path, samples_path, settings, records, task):
    """A finished pair's summary, if its settings match this run's (None: its inputs changed since, evaluate it
    again); its numbers recomputed from its samples, which are re-scored when what decides the task's score changed
    (the score of now is what counts; the responses stand)."""
    try:
        summary = read_summary(summary_path)
        old = summary.get("settings")
        if not isinstance(old, dict) or not isinstance(old.get("inputs", {}), (dict, type(None))):
            raise UserError(f"{summary_path}: field 'settings' (and its 'inputs') missing or not an object")
    except UserError as e:
        raise UserError(f"cannot read this earlier result: {e}; pass --overwrite true")
    if "max_new_tokens" in old:  # (an earlier version's name of --max_response_tokens)
        old["max_response_tokens"] = old.pop("max_new_tokens")
    hub = settings["split_path"]  # (an earlier version recorded a hub split as CWD/hf:NAME:SPLIT)
    if hub.startswith("hf:") and isinstance(old.get("split_path"), str) and old["split_path"].endswith("/" + hub):
        old["split_path"] = hub
    greedy = old.get("temperature") == 0 and settings["temperature"] == 0
    diff = [k for k in GENERATION_SETTINGS if old.get(k) != settings[k]
            and not (k.endswith("_path") and common.same_files(old.get(k), settings[k]))  # (another spelling)
            and not (greedy and k in SAMPLING_ONLY)]
    if diff:
        raise UserError(f"{summary_path} was made with other settings "
                        f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}; "
                        f"now {', '.join(f'{k}={settings[k]!r}' for k in diff)}); "
                        "pass --overwrite true or use another --out_dir")
    inputs = settings["inputs"]
    if old.get("inputs") is not None and SPLIT_DIGEST not in old["inputs"]:  # an earlier version's: the split's stamp
        inputs = {k: v for k, v in inputs.items() if k != SPLIT_DIGEST}
        if os.path.isfile(settings["split_path"]):
            inputs |= common.file_stamps([settings["split_path"]])
    if old.get("inputs") is not None:
        inputs = tasks.stamps_as_recorded(old["inputs"], inputs)
    if old.get("inputs") is not None and PROMPT_DIGEST not in old["inputs"]:  # (before the prompts were digested)
        inputs = {f: v for f, v in inputs.items() if f != PROMPT_DIGEST}
    if old.get("inputs") not in (None, inputs):  # (a summary from before inputs were recorded: as is)
        print0(f"{summary_path}: its checkpoint, split or prompts changed since "
               f"({', '.join(sorted(os.path.basename(p) for p in changed_files(old['inputs'], inputs)))}); "
               f"evaluating again")
        return None
    new_source = old.get("task_source") != settings["task_source"]  # (none recorded: an earlier version's, once)
    new_rule = old.get("score_truncated", False) != settings["score_truncated"]  # (none: before it was a setting)
    rescore = new_source or new_rule
    fields = ("id", "reward", "finished", "length") + (("response",) if rescore else ())
    try:
        rows = tasks.read_rollout_log(samples_path, None, fields)
        ids, counts = {r["id"] for r in records}, {}
        for lineno, row in rows:  # (a line of another split, or one twice: named here, where summarize cannot)
            key = row["id"]  # (as summarize matches them: 5 is not "5")
            counts[key] = counts.get(key, 0) + 1
            if key not in ids or counts[key] > settings["samples_per_prompt"]:
                raise UserError(f"{samples_path}:{lineno}: " + (
                    f"field 'id' {row['id']!r} is the id of no record of the split" if key not in ids else
                    f"sample {counts[key]} of id {key!r}, where each prompt has {settings['samples_per_prompt']}"))
        short = next((key for key in ids if counts.get(key, 0) < settings["samples_per_prompt"]), None)
        if short is not None:  # (every prompt short alike would summarise as avg@4 under the heading avg@8)
            raise UserError(f"{samples_path}: {counts.get(short, 0)} samples of id {short!r}, where each prompt has "
                            f"{settings['samples_per_prompt']}")
    except UserError as e:  # (missing, or a line damaged or lost: the pair's samples are lost)
        raise UserError(f"{e}; pass --overwrite true to evaluate again") from e
    samples = [row for _, row in rows]
    changed = tasks.rescore(task, samples, records, samples_path, settings["score_truncated"]) if rescore else 0
    if changed:  # the summary's stamps voided first, then the samples: a kill before the new summary leaves stamps
        # that match no run (None: re-scored by any rule), where the old ones would let a run of the old rule take
        # the re-scored samples for its own
        summary["settings"] = {**old, "task_source": None, "score_truncated": None}
        common.write_json(summary_path, summary)
        why = (["the task's score changed since it was evaluated"] if new_source else []) + (
            [f"--score_truncated {str(settings['score_truncated']).lower()}"] if new_rule else [])
        print0(f"{samples_path}: {' and '.join(why)}: {changed} of {len(samples)} rewards re-scored")
        common.write_jsonl(samples_path, samples)
    # the numbers are recomputed from the samples every time (reading them costs no generation): a summary of an
    # earlier version (accuracy as the mean reward, other pass@k) or of a metric since fixed (scoring.py) is not kept
    try:
        now = {**summary, **summarize(samples, records, task.DIFFICULTY, settings["pass_k_asked"])}
    except UserError as e:  # (samples of another split, or a line lost: the file is no result of these settings)
        raise UserError(f"{samples_path}: {e}; pass --overwrite true to evaluate again") from e
    if now != summary or rescore:  # (its stamp: re-scored by today's rule; the batch shape it was generated in stays)
        generated_in = {k: old.get(k) for k in GENERATED_IN}  # (None: an earlier version's, not recorded)
        now |= {"settings": {**settings, **generated_in}, "difficulty_key": task.DIFFICULTY}
        common.write_json(summary_path, now)
    return now


# -----------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    if not args.checkpoints or not args.splits:
        raise UserError("give --checkpoints DIR [DIR ...] and --splits PATH [PATH ...]")
    common.check_positive(args, "samples_per_prompt", "max_response_tokens", "gen_batch_size")
    common.check_sampling(args)
    if any(k < 1 for k in args.pass_k):
        raise UserError("--pass_k values must be >= 1")
    task = tasks.get_task(args.task)
    common.check_not_in_a_run("--out_dir", args.out_dir, "eval.py")
    for path in args.checkpoints:  # (each, before the first one's generation: a late one could stop a run of hours)
        check_checkpoint(path)
        tasks.check_tokenizer_files(path)
    names = unique_names([safe_name(os.path.basename(os.path.abspath(p))) for p in args.checkpoints],
                         args.names, "--names", "checkpoints")
    split_names = unique_names([split_label(p) for p in args.splits], args.split_names, "--split_names", "splits")

    import torch
    from model import load_model, parse_dtype
    from tasks import load_tokenizer
    _, world, device = parallel.dist_setup(args)
    dtype = parse_dtype(args.dtype, device)
    common.seed_everything(args.seed)

    # the splits, checked once with the first checkpoint's tokenizer; then every checkpoint's own tokenizer and
    # context, before the first one's generation (a late one stopped a run after hours): its vocabulary fits the
    # model, a response can end, its prompts render (a chat template) and fit; their digest is kept for pairs_done
    tokenizer = load_tokenizer(args.checkpoints[0])
    splits = [tasks.load_records(task, args.task, p, tokenizer, args.template) for p in args.splits]
    rendered = {}  # (checkpoint, split path) -> the digest of its prompts as rendered (prompt_digest)
    for path in args.checkpoints:
        own, config = load_tokenizer(path), read_config(path)
        tasks.check_vocab(own, config.vocab_size, path)
        common.generation_stop_ids(own, path)
        for split_path, records in zip(args.splits, splits):
            try:
                ids = tasks.task_prompt_ids(own, task, records, args.template)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
            tasks.check_prompts_fit(ids, records, args.max_response_tokens, config.max_position_embeddings,
                                    f"{split_path} with {path}")
            rendered[path, split_path] = common.data_digest(ids)
    digests = {p: common.data_digest(records) for p, records in zip(args.splits, splits)}  # once per split
    parallel.same_on_every_rank(digests, " ".join(args.splits))
    task_source = tasks.task_source_digest(task)

    def settings_of(ckpt, split_path, prompts, stamps=None):  # stamps: the checkpoint's, taken before it was loaded
        return {"task": args.task, "checkpoint_path": os.path.abspath(ckpt),
                "split_path": split_path if split_path.startswith("hf:") else os.path.abspath(split_path),  # (a hub's)
                "samples_per_prompt": args.samples_per_prompt, "temperature": args.temperature, "top_p": args.top_p,
                "max_response_tokens": args.max_response_tokens, "template": args.template,
                "dtype": dtype_name(dtype), "seed": args.seed, "pass_k_asked": sorted(set(args.pass_k)),
                "world_size": world, "gen_batch_size": args.gen_batch_size,  # GENERATED_IN
                "task_source": task_source, "score_truncated": args.score_truncated,
                "inputs": {**(inputs_of(ckpt, None) if stamps is None else stamps), SPLIT_DIGEST: digests[split_path],
                           PROMPT_DIGEST: prompts}}

    # which pairs are done: rank 0 decides (its file system holds out_dir) and tells the others, holding out_dir's
    # lock until the run ends (two runs there could pair one's summary.json with the other's samples.jsonl)
    parallel.lock_on_rank0(args.out_dir)
    outputs = [os.path.join(args.out_dir, "results.md")] + [
        os.path.join(args.out_dir, name, split_name, file) for name in names for split_name in split_names
        for file in ("samples.jsonl", "summary.json")]
    parallel.on_rank0(lambda: common.remove_stale_temps(outputs, args.out_dir))  # (what a SIGKILL left of a write)

    def drop_old_table():  # a run stopped before its own table left the last run's beside summaries it does not show
        if os.path.exists(outputs[0]):
            os.remove(outputs[0])
    parallel.write_on_rank0(drop_old_table, args.out_dir)

    def pairs_done():
        done = {}
        for ckpt, name in zip(args.checkpoints, names):
            for split_path, split_name, records in zip(args.splits, split_names, splits):
                pair_dir = os.path.join(args.out_dir, name, split_name)
                summary_path = os.path.join(pair_dir, "summary.json")
                if os.path.exists(summary_path) and not args.overwrite:
                    summary = read_done(summary_path, os.path.join(pair_dir, "samples.jsonl"),
                                        settings_of(ckpt, split_path, rendered[ckpt, split_path]), records, task)
                    if summary is not None:
                        done[f"{name}/{split_name}"] = summary
        return done
    done_pairs = parallel.on_rank0(pairs_done)

    summaries = {}  # (name, split_name) -> summary
    for ckpt, name in zip(args.checkpoints, names):
        todo = [i for i, s in enumerate(split_names) if f"{name}/{s}" not in done_pairs]
        for i, s in enumerate(split_names):
            if i not in todo:
                summaries[name, s] = done_pairs[f"{name}/{s}"]
                print0(f"{name} on {s}: done before, skipped "
                       f"(accuracy {summaries[name, s]['overall']['accuracy']:.4f})")
        if not todo:
            continue
        t0 = time.time()
        # the checkpoint's stamps, taken before its files are read and kept for every split: stamps taken later (after
        # a split's generation) could be those of a checkpoint rebuilt at the path meanwhile, marking its pair done
        stamps = inputs_of(ckpt, None)
        model = load_model(ckpt, dtype=dtype, device=device).eval()
        tokenizer = load_tokenizer(ckpt)
        if any(parallel.all_gather_json(inputs_of(ckpt, None) != stamps)):  # (every rank loaded what it stamped)
            raise UserError(f"{ckpt}: its files changed while it was loaded (a stage writing it again?); run again "
                            f"once it is written")
        print0(f"loaded {ckpt} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {dtype}) "
               f"in {time.time() - t0:.1f}s")
        for i in todo:
            split_path, split_name, records = args.splits[i], split_names[i], splits[i]
            # before the generation: any error costs nothing
            settings = settings_of(ckpt, split_path, prompt_digest(tokenizer, task, records, args.template), stamps)
            t0 = time.time()
            samples, metrics = generate_and_score(model, tokenizer, task, records, n=args.samples_per_prompt,
                                                  temperature=args.temperature, top_p=args.top_p,
                                                  max_new_tokens=args.max_response_tokens, seed=args.seed,
                                                  template=args.template, batch_size=args.gen_batch_size,
                                                  pass_k=args.pass_k, desc=f"{name}/{split_name}",
                                                  progress=args.progress, score_truncated=args.score_truncated)
            seconds = time.time() - t0
            summary = {"checkpoint": name, "split": split_name, "settings": settings,
                       "difficulty_key": task.DIFFICULTY, **metrics}  # (report.py's heading: it imports no task)
            pair_dir = os.path.join(args.out_dir, name, split_name)

            def write_pair():  # (called at once: the loop's names are this pair's)
                if os.path.exists(os.path.join(pair_dir, "summary.json")):  # an old summary must not mark new samples
                    os.remove(os.path.join(pair_dir, "summary.json"))
                common.write_jsonl(os.path.join(pair_dir, "samples.jsonl"), samples)
                common.write_json(os.path.join(pair_dir, "summary.json"), summary)  # last: marks the pair done
            parallel.write_on_rank0(write_pair, args.out_dir)  # (out_dir removed or moved away meanwhile: nothing)
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

    def write_results():
        with common.atomic_open(os.path.join(args.out_dir, "results.md")) as f:
            f.write(text)
    parallel.write_on_rank0(write_results, args.out_dir)
    print0("\n" + text)
    print0(f"wrote {os.path.join(args.out_dir, 'results.md')}")
    engine.release()  # generation's weight copy and KV cache, kept across this run's checkpoints: not the caller's
    parallel.dist_cleanup()


if __name__ == "__main__":
    common.run_main(main)
