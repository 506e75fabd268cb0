"""
Turn an RL policy into a re-distillation SFT set (the paper's section 3 recipe).

  --from_checkpoint DIR   sample n responses per prompt of a task split with our engine (the paper's set A:
                          greedy, n=1, on the cold-start SFT prompts), prompts shared out over torchrun ranks
  --from_rollouts RUN_DIR read train_rl.py's RUN_DIR/rollouts/step_NNNNNN.jsonl for a range of steps (the
                          paper's set B: steps 115-125 of the K&K run, T=0.7, n=8)

Then, as the paper: keep the right responses (reward 1) that finished with EOS, drop repeats, keep at most
--max_per_prompt per prompt (by its text: a prompt under two ids is one), shuffle with --seed and keep --num_examples
(and drop what redistill_sft.py would refuse: a response holding a stop token's text, an example longer than
--max_length). Writes SFT jsonl {"id", "task", "prompt", "response", "source", "reward"} atomically: the exact prompt
the policy saw and its decoded response without the stop token (redistill_sft.py appends EOS).

  python sample_policy.py --from_checkpoint runs/rl_kk/step_000125 --task kk --split data/kk/sft.jsonl \\
      --out data/kk/redistill_a.jsonl --temperature 0 --max_response_tokens 4096
  torchrun --nproc_per_node=8 sample_policy.py --from_checkpoint ... (same settings; a share per rank)
  python sample_policy.py --from_rollouts runs/rl_kk --steps 125,115-124 --task kk --out data/kk/redistill_b.jsonl
"""
import os
import random
import re

import common
import engine
import parallel
import tasks
from common import STOP_TOKENS, UserError, print0, stop_token_ids


def get_parser():
    p = common.new_parser("Sample a policy (checkpoint or RL rollout log) into a re-distillation SFT set.")
    p.add_argument("--from_checkpoint", default=None, help="policy checkpoint (Hugging Face directory) to sample")
    p.add_argument("--from_rollouts", default=None,
                   help="instead: an RL run directory holding rollouts/step_NNNNNN.jsonl (train_rl.py's log): "
                   "every rollout a step drew, trained on or not (trained false: a group the step drew and did not "
                   "train on, e.g. under --dynamic_sampling one without reward variance; set B reads them too)")
    p.add_argument("--task", default=None, help="task: kk, math, or a module name with the task interface (required)")
    p.add_argument("--split", nargs="+", default=None,
                   help="task split jsonl file(s): the prompts to sample, in order (--from_checkpoint; several: a "
                        "larger set than one split gives, e.g. the SFT prompts then the RL pool); with "
                        "--from_rollouts optional: re-score the kept rollouts with the task's score (the paper "
                        "re-checks)")
    p.add_argument("--out", default=None, help="the SFT jsonl to write (required)")
    # sampling (--from_checkpoint only: CHECKPOINT_ONLY)
    # not --n: torchrun's own parser rejects "--n" after the script name as an ambiguous prefix of --nnodes etc.
    p.add_argument("--samples_per_prompt", type=int, default=1,
                   help="--from_checkpoint: responses per prompt (paper's variant A: 1)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="--from_checkpoint: sampling temperature; 0 = greedy (paper's variant A)")
    p.add_argument("--top_p", type=float, default=1.0, help="--from_checkpoint: nucleus sampling mass (paper: 1.0)")
    p.add_argument("--max_response_tokens", type=int, default=4096,
                   help="--from_checkpoint: response length limit; truncated responses are dropped (paper: 4096)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"),
                   help="--from_checkpoint: prompt template (auto = chat when the tokenizer has one)")
    p.add_argument("--gen_batch_size", type=int, default=64,
                   help="--from_checkpoint: prompts decoded at once: this x n rows = the KV cache's slots, which all "
                        "rows stream through; sets memory and speed, not the samples (but for rounding, which moves "
                        "a token now and then: a sampled one in fp32, in bf16 a greedy one at a near-tie too)")
    p.add_argument("--dtype", default="auto",
                   help="--from_checkpoint: weights dtype for sampling: auto (bfloat16 on CUDA, float32 on CPU), "
                        "float32, bfloat16, float64 (exact on a CPU, slow)")
    p.add_argument("--limit", type=int, default=0,
                   help="--from_checkpoint: use only this many records of --split, each difficulty in proportion "
                        "(seeded by --seed; 0 = all)")
    # rollouts (--from_rollouts)
    p.add_argument("--steps", default=None, help="--from_rollouts: RL steps to read, in order, e.g. 115-125 or "
                   "125,115-124 (the paper's variant B reads step 125 first, then 115..124)")
    # selection
    p.add_argument("--max_per_prompt", type=int, default=1,
                   help="keep at most this many distinct correct responses per prompt, first found first "
                        "(paper: 1, dedupe by puzzle keeping the first occurrence; a prompt is its text, under any "
                        "id); 0 = no limit")
    p.add_argument("--max_length", type=int, default=5000,
                   help="drop a right response whose SFT example (prompt + response + EOS, tokenized as "
                        "redistill_sft.py does) is longer than this: redistill_sft.py refuses a set holding one (its "
                        "--max_length, the paper's 5000: a 1,024-token prompt and a 4,096-token answer exceed it; "
                        "SFT takes the base's context where that is shorter: pass the smaller); 0 = no limit")
    p.add_argument("--num_examples", type=int, default=1000,
                   help="keep this many after the shuffle (paper: 1000 for K&K's set B; its sets A kept every "
                        "correct answer, ~700 for K&K and ~500 for MATH); 0 = all")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shuffle (paper: random.seed(0)) and of sampling (each record's samples keyed by "
                        "it and the record's index, the same at any world size)")
    p.add_argument("--samples_out", default=None, help="also write every sample before filtering (jsonl, with reward, "
                   "finished, rank) for inspection")
    p.add_argument("--allow_empty", type=common.str2bool, default=False,
                   help="when no response is correct, write an empty --out and say so instead of failing "
                        "(reproduce.sh: a weak policy then just has no re-distilled model)")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    return p


# the settings of sampling a checkpoint: with --from_rollouts they would do nothing, so giving one is an error
CHECKPOINT_ONLY = ("samples_per_prompt", "temperature", "top_p", "max_response_tokens", "template", "gen_batch_size",
                   "dtype", "limit")


# -----------------------------------------------------------------------------
# sources: a checkpoint sampled now, or the rollout log of an RL run


def parse_steps(text, last=None):
    """'115-125' or '125,115-124' -> [125, 115, ..., 124] (order kept; duplicates are an error). last: the newest
    step with a rollout log, if known: a range is not expanded past its first missing step (1-1000000000 filled the
    machine's memory before any file was looked at)."""
    steps = []
    for part in (text or "").split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"--steps {text!r}: expected steps like 115-125 or 125,115-124")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if last is not None and b > last + 1:  # past the newest log: cut at the first missing step, which
            b = max(a, last + 1)               # read_rollouts then names (not a list of a billion steps)
        steps += range(a, b + 1)
    if len(set(steps)) != len(steps):
        raise UserError(f"--steps {text!r}: a step is listed twice")
    return steps


def read_rollouts(run_dir, steps, split_ids=None, splits=""):
    """The rows of RUN_DIR/rollouts/step_N.jsonl for each step, in the order given, each field checked, the rows of
    one id holding one prompt (tasks.note_prompt); where split_ids (the ids of the records of `splits`) is given, each
    row's id one of them. Returns them and the prompts (id -> (prompt, where first seen))."""
    logs, samples, prompts = tasks.rollout_logs(run_dir), [], {}  # prompts: id -> (its prompt, where first seen)
    for step in steps:
        if step not in logs:
            have = sorted(logs)
            raise UserError(f"{tasks.rollout_log_path(run_dir, step)}: file not found (rollout steps present: "
                            f"{f'{have[0]}..{have[-1]} ({len(have)} files)' if have else 'none'})")
        rows = tasks.read_rollout_log(logs[step], step,
                                      ("step", "id", "prompt", "response", "reward", "finished", "length"))
        for lineno, row in rows:
            if split_ids is not None and str(row["id"]) not in split_ids:
                raise UserError(f"{logs[step]}:{lineno}: field 'id' {row['id']!r} is the id of no record in --split "
                                f"{splits}, so its answer cannot be re-scored (give the RL run's --train_data)")
            tasks.note_prompt(prompts, row, f"{logs[step]}:{lineno}")
        samples += [{**row, "source": os.path.abspath(logs[step])} for _, row in rows]  # (as set A's: however spelt)
    return samples, prompts


def load_splits(task, args, tokenizer, template):
    """The records of every --split, file after file; an id in two of them is an error naming both."""
    records, source = [], {}
    for path in args.split:
        for r in tasks.load_records(task, args.task, path, tokenizer, template):
            if str(r["id"]) in source:
                raise UserError(f"split {path}: id {r['id']!r} is also in {source[str(r['id'])]}: the --split files "
                                "must not share an id")
            source[str(r["id"])] = path
            records.append(r)
    return records


def sample_checkpoint(args, task, rank, world, device):
    """Every (record, sample) of the splits, merged from all ranks in record order; and the records."""
    import torch
    from model import load_model, parse_dtype, read_config
    from tasks import load_tokenizer
    read_config(args.from_checkpoint)  # a clear error when it is no checkpoint
    tokenizer = load_tokenizer(args.from_checkpoint)
    tasks.check_apart_tokenization(tokenizer)  # (now, not at the first kept sample's length check, after sampling)
    records = load_splits(task, args, tokenizer, args.template)
    parallel.same_on_every_rank(common.data_digest(records), " + ".join(args.split))
    records, subset = tasks.stratified_subset(records, args.limit, task.DIFFICULTY, args.seed)
    dtype = parse_dtype(args.dtype, device)
    model = load_model(args.from_checkpoint, dtype=dtype, device=device)
    model.eval()
    # Check every prompt's length on every rank before sharding, so that all ranks stop together.
    prompt_ids = tasks.task_prompt_ids(tokenizer, task, records, args.template)
    tasks.check_prompts_fit(prompt_ids, records, args.max_response_tokens, model.config.max_position_embeddings,
                            " + ".join(args.split))
    shortest = min(map(len, prompt_ids))
    if args.max_length and shortest + 1 > args.max_length:  # (+ EOS: even an empty answer)
        raise UserError(f"--max_length {args.max_length}: every prompt of {' + '.join(args.split)} is at least "
                        f"{shortest} tokens, so no SFT example (prompt + response + EOS) could be kept; raise "
                        f"--max_length or give 0 (no limit)")
    order = parallel.rank_share(list(range(len(records))), rank, world)
    print0(f"sampling {args.from_checkpoint}: {subset} prompts x {args.samples_per_prompt} on {world} rank(s), "
           f"T={args.temperature}, top_p={args.top_p}, max_response_tokens={args.max_response_tokens}")
    with torch.no_grad():  # (an error on one rank's share, a task's score's, stops every rank)
        mine = parallel.on_every_rank(lambda: engine.sample_responses(
            model, tokenizer, task, [records[i] for i in order], n=args.samples_per_prompt,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_response_tokens,
            seed=common.derive_seed(args.seed, 0),
            prompt_numbers=order,  # (keyed by index: the same samples at any world size)
            template=args.template, batch_size=args.gen_batch_size, desc="sample", progress=args.progress))
    # sample_responses returns record order then sample order: attach each sample's record index
    for k, s in enumerate(mine):
        s["index"], s["rank"] = order[k // args.samples_per_prompt], rank
        s["source"] = os.path.abspath(args.from_checkpoint)
        del s["logprobs"]
    return parallel.gather_lists(mine, key=lambda s: (s["index"], s["sample"])), records


# -----------------------------------------------------------------------------
# selection


def select(samples, max_per_prompt, num_examples, seed, stop_texts=STOP_TOKENS, too_long=None):
    """The paper's filter: correct (tasks.is_correct: reward 1 or more) and finished; identical responses to one
    prompt (its text, under any id) once; at most max_per_prompt per prompt, first found first; a seeded shuffle; the
    first num_examples. Dropped too, as SFT would refuse them: a response that holds one of stop_texts (a stop token
    written in pieces by the policy: the tokenizer reads the text back as the stop id) and, where too_long(sample) says
    so, one too long (asked only of a response that would be kept otherwise). Returns (kept, counts)."""
    by_prompt, seen, counts = {}, set(), {"samples": len(samples), "correct": 0, "stop_text": 0, "too_long": 0,
                                          "duplicates": 0, "over_limit": 0}
    prompts, answered = [], set()
    for s in samples:
        key = s["prompt"]  # (as rendered: a prompt under two ids, one puzzle given twice, is one prompt)
        if key not in by_prompt:
            by_prompt[key] = []
            prompts.append(key)
        if not (tasks.is_correct(s["reward"]) and s["finished"]):
            continue
        counts["correct"] += 1
        answered.add(key)
        if any(t in s["response"] for t in stop_texts):
            counts["stop_text"] += 1
            continue
        if (key, s["response"]) in seen:
            counts["duplicates"] += 1
            continue
        seen.add((key, s["response"]))
        if max_per_prompt and len(by_prompt[key]) >= max_per_prompt:
            counts["over_limit"] += 1
            continue
        if too_long is not None and too_long(s):  # last: it tokenizes, so only what would be kept (a longer one
            counts["too_long"] += 1                # leaves its prompt's place to the next right answer)
            continue
        by_prompt[key].append(s)
    counts["prompts"] = len(prompts)
    counts["prompts_without_correct"] = sum(1 for k in prompts if k not in answered)
    pool = [s for k in prompts for s in by_prompt[k]]
    counts["distinct"] = len(pool)
    random.Random(seed).shuffle(pool)
    kept = pool[:num_examples] if num_examples else pool
    return kept, counts


def sft_too_long(tokenizer, max_length):
    """too_long(sample) for select: whether the sample's SFT example (tasks.sft_token_ids: prompt + response + EOS)
    has more than max_length tokens; None where nothing can be counted (no tokenizer, or no limit)."""
    if tokenizer is None or not max_length:
        return None
    return lambda s: len(tasks.sft_token_ids(tokenizer, [s["prompt"]], [s["response"]])[0][0]) > max_length


def stop_texts(tokenizer):
    """The texts a kept response must not hold: each stop id's token (the EOS and the usual chat terminators the
    tokenizer knows: common.stop_token_ids), as the tokenizer reads it back from text; without a tokenizer, the usual
    terminators' names."""
    return STOP_TOKENS if tokenizer is None else tuple(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)))


def strip_stop_text(response, texts=STOP_TOKENS):
    """Remove a trailing stop-token string (a rollout log that decoded the stop token too); SFT appends EOS itself."""
    for t in texts:
        if response.endswith(t):
            return response[: -len(t)], True
    return response, False


# -----------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    if bool(args.from_checkpoint) == bool(args.from_rollouts):
        raise UserError("give exactly one of --from_checkpoint DIR and --from_rollouts RUN_DIR")
    if not args.task:
        raise UserError("--task is required (kk, math, or a task module name)")
    if not args.out:
        raise UserError("--out FILE is required (the SFT jsonl to write)")
    if args.from_checkpoint and not args.split:
        raise UserError("--from_checkpoint needs --split FILE (the prompts to sample)")
    if args.from_rollouts and not args.steps:
        raise UserError("--from_rollouts needs --steps, e.g. 115-125")
    if args.from_checkpoint and args.steps:
        raise UserError("--steps applies to --from_rollouts only")
    defaults = get_parser()  # a fresh one: --config changed this run's defaults
    given = [f"--{name}" for name in CHECKPOINT_ONLY if getattr(args, name) != defaults.get_default(name)]
    if args.from_rollouts and given:
        raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --from_checkpoint only: the "
                        f"rollouts were sampled by the RL run")
    common.check_positive(args, "samples_per_prompt", "max_response_tokens", "gen_batch_size")
    common.check_non_negative(args, "limit", "max_per_prompt", "num_examples", "max_length")
    common.check_distinct_outputs([("--out", args.out), ("--samples_out", args.samples_out)],
                                  [("--split", path) for path in args.split or []]
                                  + [("--from_rollouts", path) for path in
                                     (tasks.rollout_logs(args.from_rollouts).values() if args.from_rollouts else ())]
                                  # (the run's settings, read here, and its metrics, which its resume reads)
                                  + [("--from_rollouts", os.path.join(args.from_rollouts, name))
                                     for name in ("settings.json", "metrics.jsonl") if args.from_rollouts])
    common.check_sampling(args)
    task = tasks.get_task(args.task)

    rank, world, device = parallel.dist_setup(args)
    # what a SIGKILL left of this output's atomic writes (.tmp_NAME.XXXXXXXX, never reused), under a lock on the
    # output so that no live run's temporary file goes (as sample_effect.py does for its --out); a directory that
    # does not exist yet holds none, and is made only at the write (bad input leaves no directory behind)
    lock = (os.path.dirname(os.path.abspath(args.out)), f".{os.path.basename(args.out)}.lock")
    parallel.lock_on_rank0(*lock, if_exists=True)
    parallel.on_rank0(lambda: common.remove_stale_temps([p for p in (args.out, args.samples_out) if p], lock[0]))
    if args.from_checkpoint:
        samples, _ = sample_checkpoint(args, task, rank, world, device)
        tokenizer = tasks.load_tokenizer(args.from_checkpoint)
    else:  # every rank reads and selects (cheap), so that an error stops all of them; rank 0 writes
        if live := common.run_in_progress(args.from_rollouts):  # (a resume rewrites the logs past its checkpoint)
            raise UserError(f"{args.from_rollouts}: the RL run is still running ({live}), so its rollout logs may yet "
                            f"change; run sample_policy.py once it has ended")
        steps = parse_steps(args.steps, max(tasks.rollout_logs(args.from_rollouts), default=0))
        records = load_splits(task, args, None, "plain") if args.split else None
        samples, prompts = read_rollouts(args.from_rollouts, steps,
                                         None if records is None else {str(r["id"]) for r in records},
                                         " ".join(args.split or ()))
        tokenizer = tasks.run_tokenizer(args.from_rollouts)
        if tokenizer is None:
            print0(f"note: no saved weights in {args.from_rollouts}, so no tokenizer: responses are checked for the "
                   f"usual stop tokens' text only ({', '.join(STOP_TOKENS)}), and not for --max_length"
                   + (", and their prompts are not compared with --split's" if records else ""))
        # (the run's --task always; with --split, which re-scores against its records, every prompt)
        tasks.check_rollouts_of(args.from_rollouts, tokenizer, task, args.task, records or [],
                                prompts if records else {}, " + ".join(args.split or ()))
        texts = stop_texts(tokenizer)
        stripped = 0
        for s in samples:
            s["response"], cut = strip_stop_text(s["response"], texts)
            stripped += cut
        print0(f"read {len(samples)} rollouts of {len(steps)} steps from "
               f"{os.path.join(args.from_rollouts, 'rollouts')}")
        if stripped:
            print0(f"note: removed a trailing stop-token string from {stripped} rollout responses (SFT appends EOS)")
        if args.split:  # the paper re-checks the rollouts with the task's score; the score of now is what counts
            changed = tasks.rescore(task, samples, records, " + ".join(args.split))
            print0(f"re-scored {len(samples)} rollouts with {args.task}'s score: {changed} rewards changed")

    parallel.lock_on_rank0(*lock)  # (held already, or a fresh directory's, made now)
    if args.samples_out:  # (--out's directory removed or moved away meanwhile: nothing written)
        parallel.write_on_rank0(lambda: common.write_jsonl(args.samples_out, samples), *lock)
        print0(f"wrote all {len(samples)} samples (before filtering) to {args.samples_out}")
    kept, counts = select(samples, args.max_per_prompt, args.num_examples, args.seed, stop_texts(tokenizer),
                          sft_too_long(tokenizer, args.max_length))
    print0(f"{counts['samples']} samples of {counts['prompts']} prompts: {counts['correct']} correct and finished, "
           f"{counts['stop_text']} holding a stop token's text, {counts['too_long']} longer than --max_length "
           f"{args.max_length}, {counts['duplicates']} duplicate responses, "
           f"{counts['over_limit']} over --max_per_prompt {args.max_per_prompt}, {counts['distinct']} distinct")
    print0(f"{counts['prompts_without_correct']} of {counts['prompts']} prompts had no correct sample")
    if not kept and not args.allow_empty:
        stale = (f" (the {args.out} there is an earlier run's, and --samples_out {args.samples_out} this run's "
                 f"samples)" if args.samples_out and os.path.exists(args.out) else "")
        raise UserError(f"no correct, finished response"
                        f"{' without a stop token, within --max_length' if counts['correct'] else ''} "
                        f"among {counts['samples']} samples; nothing written to {args.out}{stale}")
    if args.num_examples and len(kept) < args.num_examples:
        print0(f"note: only {len(kept)} samples available, fewer than --num_examples {args.num_examples}")
    rows = [{"id": s["id"], "task": args.task, "prompt": s["prompt"], "response": s["response"],
             "source": s["source"], "reward": s["reward"],
             **({"step": s["step"]} if "step" in s else {"sample": s["sample"]})} for s in kept]
    parallel.write_on_rank0(lambda: common.write_jsonl(args.out, rows), *lock)
    print0(f"wrote {len(rows)} SFT examples to {args.out}" + ("" if rows else " (none correct: --allow_empty true)"))
    engine.release()  # (--from_checkpoint filled it)
    parallel.dist_cleanup()


if __name__ == "__main__":
    common.run_main(main)
