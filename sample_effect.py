"""
Sample effect of SFT data on a policy: how much one SFT step on a sample raises the expected test reward.
SE(x, y) = <grad log pi(y|x), grad J>, J the expected 0/1 reward over evaluation prompts at the RL temperature;
our reconstruction of the paper's section 2.2-2.3, whose equations could not be read (docs/sample_effect.md).

    python sample_effect.py --task kk --checkpoint runs/base --eval_data data/kk/test.jsonl \\
        --sft_data data/kk/teacher.jsonl data/kk/redistill.jsonl --out out/se/effects.jsonl \\
        --select 100 --select_out out/se/top.jsonl --select_bottom out/se/bottom.jsonl \\
        --select_random out/se/random.jsonl --select_from data/kk/redistill.jsonl
    torchrun --nproc_per_node=8 sample_effect.py ... --params 'layers\\.2[0-7]\\.|^model\\.norm\\.' --proj_dim 8192
                                         # (the last 8 of 28 layers and the final norm)

grad J is a leave-one-out policy gradient from --samples_per_prompt rollouts per prompt, computed once on the
FSDP-sharded model; each SFT sample then costs one backward, reduced at once to an inner product with grad J:
exact (--exact), through a seeded CountSketch (--proj_dim), or both, optionally on a --params subset.

Writes (rank 0, atomically): --out effects.jsonl (one line per SFT sample: sample_effect, normalised = the
cosine, grad_norm, logprob, ...), <out stem>.summary.json (per input file: mean, median, share positive, ...),
and with --select K the top-K (--select_out), bottom-K (--select_bottom) and K random (--select_random) samples
of all files, or of one (--select_from), as SFT files.
A stopped run resumes (--resume, on by default): <out stem>.partial/ keeps its ∇J and every sample's effect as it
is done, for a re-run of the same settings and data; it is deleted once the outputs are written.
"""
import glob
import json
import math
import os
import random
import re
import shutil
import statistics
import time
from contextlib import nullcontext

import ckpt
import common
import engine
import parallel
import tasks
from common import UserError, print0
from model import check_checkpoint, checkpoint_stamps, kv_bytes_per_token, read_config, response_logprobs

# -----------------------------------------------------------------------------
# settings


def get_parser():
    p = common.new_parser("Per-sample effect of SFT data on a policy's expected test reward.")
    p.add_argument("--task", default="kk", help="task: kk, math, or an importable task module name")
    p.add_argument("--checkpoint", default=None, help="the policy θ (HF checkpoint directory; required)")
    p.add_argument("--eval_data", default=None,
                   help="task split whose prompts define J (e.g. the test or a held-out split; required)")
    p.add_argument("--num_eval_prompts", type=int, default=0,
                   help="use N evaluation prompts, each difficulty in proportion, drawn with --seed (0 = all)")
    p.add_argument("--sft_data", nargs="+", default=None,
                   help="SFT jsonl file(s) {id, task, prompt, response}; each gets its own summary "
                        "(e.g. teacher traces vs re-distilled samples; required); a record that says it is cut off "
                        "('finished': false) or wrong (a 'reward' below 1) is refused, as redistill_sft.py refuses it")
    p.add_argument("--max_length", type=int, default=5000,
                   help="longest SFT sample (prompt + response + EOS), at most the model's context; longer is an "
                        "error (as in redistill_sft.py)")
    p.add_argument("--samples_per_prompt", type=int, default=8,
                   help="responses per evaluation prompt for the ∇J estimate (paper's rollout.n = 8); >= 2")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="sampling temperature of J (paper's RL rollouts: 0.7)")
    p.add_argument("--max_response_tokens", type=int, default=4096,
                   help="response budget of the rollouts (paper: 4096); truncated = reward 0")
    p.add_argument("--template", default="auto", choices=["auto", "chat", "plain"],
                   help="prompt template of the evaluation prompts")
    p.add_argument("--gen_batch_size", type=int, default=64,
                   help="most evaluation prompts per generation call (x --samples_per_prompt rows)")
    p.add_argument("--kv_cache_gib", type=float, default=16.0,
                   help="bound on one generation call's KV cache (GiB): fewer prompts per call when rows x "
                        "(prompt + --max_response_tokens) would need more; inf: no bound")
    p.add_argument("--seed", type=int, default=0, help="seed of the rollouts and of the --num_eval_prompts subset")
    # The paper's convention is unknown (paper.md 2.3): `mean` matches redistill_sft.py's default per-sequence-mean
    # loss (so η·mean SE predicts its SGD step), `sum` is the plain log-likelihood log π(y|x).
    p.add_argument("--token_reduction", default="mean", choices=["mean", "sum"],
                   help="log-likelihood of an SFT sample: mean or sum over its response tokens + EOS")
    p.add_argument("--exact", type=common.str2bool, default=False,
                   help="inner products with the full gradient of the chosen parameters "
                        "(∇J held once in fp32; small models)")
    p.add_argument("--proj_dim", type=int, default=4096,
                   help="CountSketch dimension for the projected inner product (0 = off, which needs --exact true)")
    p.add_argument("--proj_seed", type=int, default=0, help="seed of the CountSketch (keep it fixed to compare runs)")
    p.add_argument("--params", default="",
                   help="regex: only parameters whose names match (re.search) count (default: all); a tied lm_head "
                        "is the embedding, matched under either name")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype: auto (bfloat16 autocast on CUDA, float32 on CPU), float32, bfloat16")
    p.add_argument("--micro_batch_tokens", type=int, default=16384,
                   help="tokens per packed forward/backward of the ∇J rollouts")
    p.add_argument("--gradient_checkpointing", type=common.str2bool, default=False,
                   help="recompute blocks in backward (long sequences)")
    parallel.add_recompute_args(p)
    p.add_argument("--out", default="out/sample_effect/effects.jsonl",
                   help="effects jsonl (summary written beside it as <stem>.summary.json)")
    p.add_argument("--select", type=int, default=0,
                   help="write the top-K samples of the pool (--select_from) to --select_out (0 = off)")
    p.add_argument("--select_out", default=None, help="SFT jsonl for the top-K samples")
    p.add_argument("--select_bottom", default=None,
                   help="also write the bottom-K samples here (a control of the top-K experiment; needs 2K <= the "
                        "pool's samples, so the two sets do not overlap)")
    p.add_argument("--select_random", default=None,
                   help="also write K samples of the pool drawn at random (seeded by --seed) here: the control that "
                        "says whether the ranking beats chance at the same K")
    p.add_argument("--select_from", default=None,
                   help="rank only this --sft_data file's samples (default: all files pooled; a pool of one set "
                        "compares samples of one kind, not the sets' kinds)")
    p.add_argument("--select_by", default="sample_effect", choices=["sample_effect", "normalised"],
                   help="ranking of --select")
    p.add_argument("--resume", type=common.str2bool, default=True,
                   help="continue a stopped run of the same settings and data from <out stem>.partial/ (its ∇J and "
                        "the samples it finished); false = start over")
    p.add_argument("--log_every", type=int, default=100, help="a log line every this many of rank 0's SFT samples")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    return p


# -----------------------------------------------------------------------------
# the ∇J rollouts: how many prompts per generation call


def gen_chunk_size(num_prompts, world, gen_batch_size, k, cache_bytes_per_token, max_tokens, cache_budget_bytes):
    """Prompts per generation call: at most gen_batch_size; at most what keeps the KV cache (k rows per prompt, each
    max_tokens long) within the budget (inf: no bound); at most ⌈num_prompts / world⌉, so that the chunks spread over
    the ranks."""
    by_memory = int(cache_budget_bytes // (k * max_tokens * cache_bytes_per_token)) \
        if math.isfinite(cache_budget_bytes) else gen_batch_size
    return max(1, min(gen_batch_size, by_memory, math.ceil(num_prompts / world)))


def chosen_parameters(model, param_re):
    """The names (as named_parameters gives them) of the parameters param_re matches (re.search); a tied tensor is
    matched under each of its names (a tied lm_head is the embedding)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if param_re.search(n)}


# -----------------------------------------------------------------------------
# the ∇J estimator's baseline


def rloo_weights(rewards):
    """Leave-one-out baseline for one group: r_i - mean of the others = K/(K-1) (r_i - mean r)."""
    k = len(rewards)
    if k < 2:
        raise ValueError("a group baseline needs at least 2 samples per prompt")
    total = sum(rewards)
    return [r - (total - r) / (k - 1) for r in rewards]


# -----------------------------------------------------------------------------
# log-probs and gradients


def example_logprobs(model, examples, temperature=1.0):
    """The log-probs (under softmax(logits / T)) of each example's tokens input_ids[start:], one tensor per example."""
    lp = response_logprobs(model, [e["input_ids"][:e["start"]] for e in examples],
                           [e["input_ids"][e["start"]:] for e in examples], temperature)
    return lp.split([len(e["input_ids"]) - e["start"] for e in examples])


def accumulate_policy_gradient(model, items, temperature, micro_batch_tokens, scale=1.0):
    """Add scale * ∇ Σ_i w_i log π_T(y_i|x_i) to the parameters' .grad; items: {"input_ids", "start", "weight"}.
    Identical sequences are merged (weights summed; short answers repeat often), zero weights skipped, the rest
    packed into micro-batches of at most micro_batch_tokens. Every rank runs as many micro-batches (FSDP's
    forward and backward are collectives). Returns the number of tokens back-propagated."""
    from parallel import idle_pass
    merged = {}
    for it in items:
        key = (tuple(it["input_ids"]), it["start"])
        merged[key] = merged.get(key, 0.0) + it["weight"]
    items = sorted(({"input_ids": list(ids), "start": start, "weight": w}
                    for (ids, start), w in merged.items() if w != 0),
                   key=lambda it: (-len(it["input_ids"]), it["input_ids"]))
    batches = [[items[i] for i in mb] for mb in parallel.micro_batches([len(it["input_ids"]) for it in items],
                                                                       micro_batch_tokens)]
    tokens = 0
    for batch in parallel.even_out(batches):
        if batch is None:  # this rank is done; join the others' collectives
            idle_pass(model)
            continue
        lps = example_logprobs(model, batch, temperature)  # (compute dtype: FSDP's mixed precision, see shard_model)
        objective = sum(b["weight"] * lp.sum() for b, lp in zip(batch, lps)) * scale
        objective.backward()
        tokens += sum(len(b["input_ids"]) for b in batch)
    return tokens


class CountSketch:
    """A fixed-seed CountSketch of a list of tensors (the gradients of `shapes`) into `dim` buckets.

    Coordinate i of tensor j goes to bucket h_j(i) with sign s_j(i); h and s come from a generator seeded
    by (seed, j) on the tensors' device, drawn chunk by chunk every call and never stored. The same seed,
    shapes and device type give the same sketch. E[<S a, S b>] = <a, b>."""

    def __init__(self, numels, dim, seed, device, chunk=1 << 22):
        self.numels, self.dim, self.seed, self.device, self.chunk = list(numels), dim, seed, device, chunk

    def __call__(self, tensors):
        import torch
        out = torch.zeros(self.dim, dtype=torch.float32, device=self.device)
        for j, (n, t) in enumerate(zip(self.numels, tensors)):
            g = torch.Generator(device=self.device).manual_seed(common.derive_seed(self.seed, j))
            flat = t.reshape(-1)
            for s in range(0, n, self.chunk):
                m = min(self.chunk, n - s)
                buckets = torch.randint(self.dim, (m,), generator=g, device=self.device)
                signs = torch.randint(2, (m,), generator=g, device=self.device, dtype=torch.int8)
                vals = flat[s:s + m].float()
                out.index_add_(0, buckets, torch.where(signs.bool(), vals, -vals))
        return out


def grad_dot(grads, ref):
    """<grads, ref> over lists of tensors, accumulated in float64."""
    return float(sum((g.double() * r.double()).sum() for g, r in zip(grads, ref)))


def sample_effects(model, params, examples, reduction, exact_ref=None, sketch=None, sketch_ref=None,
                   autocast=nullcontext, on_sample=None):
    """SE of each example: one forward/backward of its response log-likelihood (T = 1, `reduction` over
    response tokens + EOS), then inner products of the gradient with the exact ∇J (exact_ref: one tensor
    per parameter) and/or with the sketched ∇J (sketch_ref = sketch(∇J)). Returns one dict per example;
    on_sample(k, result) is called as example k is done."""
    import torch
    results = []
    for k, ex in enumerate(examples):
        for p in params:
            p.grad = None
        with autocast():
            lp = example_logprobs(model, [ex])[0]
        ll = lp.sum() if reduction == "sum" else lp.mean()
        ll.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        rec = {"logprob": float(lp.detach().sum()), "response_length": len(ex["input_ids"]) - ex["start"]}
        if exact_ref is not None:
            se = grad_dot(grads, exact_ref["grad"])
            norm = math.sqrt(grad_dot(grads, grads))
            rec.update(sample_effect=se, normalised=se / max(norm * exact_ref["norm"], 1e-30), grad_norm=norm)
        if sketch is not None:
            sg = sketch(grads).double()
            se = float(sg @ sketch_ref["sketch"])
            norm = float(sg.norm())
            key = "_proj" if exact_ref is not None else ""
            rec.update({"sample_effect" + key: se, "normalised" + key: se / max(norm * sketch_ref["norm"], 1e-30)})
            if exact_ref is None:
                rec["grad_norm"] = norm
        results.append(rec)
        if on_sample is not None:
            on_sample(k, rec)
    for p in params:
        p.grad = None
    return results


# -----------------------------------------------------------------------------
# ∇J


def estimate_grad_j(model, params, tokenizer, task, records, prompt_ids, eval_subset, sketch, compute_dtype, args,
                    rank, world, device):
    """∇J: --samples_per_prompt rollouts per evaluation prompt, chunks of prompts spread over the ranks, then the
    leave-one-out policy gradient through the FSDP-sharded model. Returns (grad_j: its numbers for the summary,
    exact_ref: the full gradient (--exact), sketch_ref: its sketch (--proj_dim)), the same on every rank."""
    import torch
    from parallel import full_tensor
    t0 = time.time()
    gen_model = engine.GenWeights(model, compute_dtype)
    cfg = model.config  # bytes per cached token: keys and values of every layer, in the compute dtype
    per_token = kv_bytes_per_token(cfg, compute_dtype.itemsize)
    longest = max(map(len, prompt_ids))
    size = gen_chunk_size(len(records), world, args.gen_batch_size, args.samples_per_prompt, per_token,
                          longest + args.max_response_tokens, args.kv_cache_gib * 2**30)
    chunks = [list(range(s, min(s + size, len(records)))) for s in range(0, len(records), size)]
    print0(f"rollouts: {len(chunks)} generation call(s) of <= {size} prompts x {args.samples_per_prompt} "
           f"over {world} rank(s); KV cache <= "
           f"{size * args.samples_per_prompt * (longest + args.max_response_tokens) * per_token / 2**30:.1f} "
           "GiB per call")
    items, rewards = [], []
    my_chunks = parallel.rank_share(list(range(len(chunks))), rank, world)
    bar = common.progress_bar(sum(len(chunks[c]) for c in my_chunks) * args.samples_per_prompt, "rollouts",
                              args.progress)

    def roll_out():  # this rank's chunks, which may be one fewer than another's: no collective inside; its tokens
        tokens = 0
        for c in my_chunks:
            out = engine.sample_responses(gen_model, tokenizer, task, [records[i] for i in chunks[c]],
                                          n=args.samples_per_prompt, temperature=args.temperature, top_p=1.0,
                                          max_new_tokens=args.max_response_tokens,
                                          seed=common.derive_seed(args.seed, 0), prompt_numbers=chunks[c],
                                          template=args.template, batch_size=size, progress=False)
            for j, i in enumerate(chunks[c]):
                group = out[j * args.samples_per_prompt:(j + 1) * args.samples_per_prompt]
                ids = prompt_ids[i]  # (the ids the engine was given: sample_responses encodes the same rendered prompt)
                rs = [float(s["reward"]) for s in group]
                rewards.append(rs)
                for s, w in zip(group, rloo_weights(rs)):
                    items.append({"input_ids": ids + s["tokens"], "start": len(ids), "weight": w})
                    tokens += s["length"]
            bar.update(len(out))
        return tokens
    gen_tokens = parallel.on_every_rank(roll_out)  # (a task's score failing on one rank's share stops every rank)
    bar.close()
    gen_model = None  # (freed: roll_out holds the name, not the weights)
    engine.release()
    gen_seconds = time.time() - t0
    t0 = time.time()
    for p in params:
        p.grad = None
    # FSDP sums the ranks' gradients (sharded); every rank then holds the full ∇J, in fp32
    bwd_tokens = accumulate_policy_gradient(model, items, args.temperature, args.micro_batch_tokens,
                                            scale=1.0 / (len(records) * args.samples_per_prompt))
    grads = [full_tensor(p.grad) if p.grad is not None else torch.zeros(p.shape, device=device) for p in params]
    stats = parallel.all_reduce(torch.tensor([sum(map(sum, rewards)), sum(len(set(r)) > 1 for r in rewards),
                                              gen_tokens, bwd_tokens], dtype=torch.float64))
    mean_reward, informative, gen_tokens, bwd_tokens = stats.tolist()
    mean_reward /= len(records) * args.samples_per_prompt
    grad_j = {"mean_reward": mean_reward, "prompts": len(records), "prompt_subset": eval_subset,
              "k": args.samples_per_prompt, "temperature": args.temperature,
              "informative_prompts": int(informative), "ranks": world}
    if informative == 0:
        raise UserError(f"all {args.samples_per_prompt} rollouts of every evaluation prompt got the same reward "
                        f"(mean reward {mean_reward:.3f}), so the ∇J estimate is zero; use more prompts, "
                        "a larger --samples_per_prompt, or a policy whose accuracy on --eval_data lies strictly "
                        "between 0 and 1")
    exact_ref = sketch_ref = None
    if args.exact:
        exact_ref = {"grad": [g.detach().clone() for g in grads]}
        exact_ref["norm"] = math.sqrt(grad_dot(exact_ref["grad"], exact_ref["grad"]))
        grad_j["norm"] = exact_ref["norm"]
    if args.proj_dim:
        s = sketch(grads).double()
        sketch_ref = {"sketch": s, "norm": float(s.norm())}
        grad_j["norm_proj"] = sketch_ref["norm"]
    if not all(math.isfinite(grad_j[k]) for k in ("norm", "norm_proj") if k in grad_j):  # (every rank alike)
        raise UserError(f"the ∇J estimate is not finite (‖∇J‖ {grad_j.get('norm', grad_j.get('norm_proj'))}): a NaN or "
                        f"inf in the policy's log-probs or gradients (--dtype {args.dtype}); every effect would be NaN")
    del grads
    for p in params:
        p.grad = None
    print0(f"∇J from {len(records)} prompts x {args.samples_per_prompt} rollouts (T={args.temperature}): "
           f"mean reward {mean_reward:.4f}, {int(informative)} prompts with mixed rewards | "
           f"generation {gen_tokens / max(gen_seconds, 1e-9):.0f} tok/s "
           f"({gen_seconds:.1f}s) | backward {bwd_tokens:.0f} tokens in {time.time() - t0:.1f}s | "
           f"‖∇J‖ {grad_j.get('norm', grad_j.get('norm_proj')):.4g}")
    return grad_j, exact_ref, sketch_ref


# -----------------------------------------------------------------------------
# a stopped run, resumed: once ∇J is computed, <out stem>.partial/ holds identity.json (the settings and data it is
# for), grad_j.safetensors and grad_j.json (written last: it marks the directory complete), then done.jsonl and
# effects.rankR.jsonl (one line per finished sample, appended by the rank that did it)

# settings that change neither ∇J nor any sample's effect (recompute is exact; --dtype counts as the compute dtype it
# resolves to, --config as the settings it holds): a resume may change them. (--compile may change the round-off.)
RESUME_FREE = ("out", "select", "select_out", "select_bottom", "select_random", "select_from", "select_by", "resume",
               "log_every", "progress", "gradient_checkpointing", "checkpoint_every", "checkpoint_keep", "dtype",
               "config")


def open_partial(path, identity, resume, n_samples):
    """Rank 0, before any work: the finished samples' rows of a stopped run in `path`, or None for a fresh start.
    With resume and the run's ∇J there: checked to be for the same settings and data, its ranks' logs gathered into
    done.jsonl, one row per sample (a torn last line, left by a kill mid-write, dropped: that sample is done again;
    a row twice, left by a kill between writing done.jsonl and removing the logs, kept once), each row checked
    (a damaged one failed the run only after every remaining sample was done). Otherwise whatever is in `path` goes
    (a run stopped before its ∇J kept nothing)."""
    if resume and os.path.exists(os.path.join(path, "grad_j.json")):
        try:
            saved = common.read_json(os.path.join(path, "identity.json"), "the stopped run's identity")
        except UserError as e:
            raise UserError(f"{e}; pass --resume false to start over")
        code = saved.pop("code", None)  # (recorded, not compared: ckpt.note_code_changes)
        if "checkpoint_files" in identity:  # (an earlier version stamped the weights and config only)
            identity = {**identity, "checkpoint_files": tasks.stamps_as_recorded(saved.get("checkpoint_files"),
                                                                                 identity["checkpoint_files"])}
        try:
            # (as written: an inf setting reads back as "inf"; an earlier version wrote it bare, read back as inf)
            ckpt.check_run_identity(path, common.json_safe(saved), common.json_safe(identity),
                                    recorded_since=(*parallel.COMPUTE_KEYS, "prompt_digest"))
        except UserError as e:
            raise UserError(f"{e}; pass --resume false to start over (or another --out)")
        ckpt.note_code_changes(code, "the stopped run computed its ∇J")
        logs = sorted(glob.glob(os.path.join(glob.escape(path), "effects.rank*.jsonl")))
        done = os.path.join(path, "done.jsonl")
        rows, fields, seen = {}, None, {}  # seen: index -> where its row was read
        try:
            for log in ([done] if os.path.exists(done) else []) + logs:
                for lineno, row in common.iter_jsonl(log, torn_tail=True):
                    fields = fields or set(row)
                    check_effect_row(f"{log}:{lineno}", row, n_samples, fields)
                    if row["index"] in rows and rows[row["index"]] != row:  # (a kill's repeat is the same row)
                        raise UserError(f"{log}:{lineno}: a second row of sample {row['index']}, with other values "
                                        f"than at {seen[row['index']]}")
                    rows[row["index"]], seen[row["index"]] = row, f"{log}:{lineno}"
        except UserError as e:
            raise UserError(f"{e}; pass --resume false to start over") from None
        rows = [rows[i] for i in sorted(rows)]
        common.write_jsonl(done, rows)
        for log in logs:
            os.remove(log)
        return rows
    if os.path.exists(os.path.join(path, "grad_j.json")):
        print0(f"note: --resume false: removed the stopped run's {path}")
    remove_partial(path)
    return None


def check_effect_row(where, row, n_samples, fields):
    """A stopped run's row (on_sample wrote it): 'index' a sample's number, every other field a finite number, the
    fields those of the run's first row; else a UserError naming the file, line and field."""
    index = row.get("index")
    if type(index) is not int or not 0 <= index < n_samples:
        got = json.dumps(index) if "index" in row else "none"
        raise UserError(f"{where}: field 'index' must be a sample's number, 0 to {n_samples - 1}, got {got}")
    if set(row) != fields:
        raise UserError(f"{where}: fields {sorted(row)}, where the run's first row has {sorted(fields)}")
    for key, value in row.items():
        if not common.finite_number(value):
            raise UserError(f"{where}: field {key!r} must be a finite number, got {json.dumps(value)}")


def remove_partial(path, done=False):
    """The marker first: a kill mid-removal leaves an incomplete directory, which a resume starts over, not a marker
    vouching for files that are gone. A file that cannot go is an error before a fresh run (its samples would mix
    with the new ones), a note after a finished one (done: its outputs are written)."""
    try:
        if os.path.exists(os.path.join(path, "grad_j.json")):
            os.remove(os.path.join(path, "grad_j.json"))
        if os.path.exists(path):
            shutil.rmtree(path)
    except OSError as e:
        if not done:
            raise UserError(f"{path}: a stopped run's files, which this run must remove first, cannot be removed "
                            f"({e.strerror}: {e.filename}); remove the directory and run again")
        print0(f"note: the outputs are written, but {path} could not be removed ({e.strerror}: {e.filename}); "
               f"remove it")


def save_grad_j(path, identity, grad_j, exact_ref, sketch_ref):
    """Rank 0: the run's identity, ∇J as the effects use it (the exact gradient and/or its sketch), then
    grad_j.json, which marks them complete."""
    from safetensors.torch import save
    common.write_json(os.path.join(path, "identity.json"), identity | {"code": ckpt.code_stamp()})
    tensors = {f"grad.{i}": g.cpu() for i, g in enumerate(exact_ref["grad"])} if exact_ref else {}
    if sketch_ref:
        tensors["sketch"] = sketch_ref["sketch"].cpu()
    with common.atomic_open(os.path.join(path, "grad_j.safetensors"), "wb") as f:
        f.write(save(tensors))
    common.write_json(os.path.join(path, "grad_j.json"), grad_j)


def load_grad_j(path, device):
    """(grad_j, exact_ref, sketch_ref) that save_grad_j wrote, or None before it finished."""
    if not os.path.exists(os.path.join(path, "grad_j.json")):
        return None
    from safetensors.torch import load_file
    grad_j = common.read_json(os.path.join(path, "grad_j.json"), "the run's ∇J norms")
    # cloned into fresh allocations: a BLAS reduction over a file-backed tensor at another alignment can round
    # differently in the last bit, and a resumed run should equal an uninterrupted one exactly
    tensors = {k: v.clone() for k, v in load_file(os.path.join(path, "grad_j.safetensors"), device=str(device)).items()}
    n = sum(k.startswith("grad.") for k in tensors)
    exact_ref = {"grad": [tensors[f"grad.{i}"] for i in range(n)], "norm": grad_j["norm"]} if n else None
    sketch_ref = {"sketch": tensors["sketch"], "norm": grad_j["norm_proj"]} if "sketch" in tensors else None
    return grad_j, exact_ref, sketch_ref


# -----------------------------------------------------------------------------
# summaries and selection


def summarize(values):
    if not values:
        return {"count": 0}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "share_positive": sum(v > 0 for v in values) / len(values),
            "std": statistics.pstdev(values)}


def summary_table(per_file, columns):
    head = "| file | n | " + " | ".join(f"mean {c} | median {c}" for c in columns) + " | share SE > 0 | mean length |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, s in per_file.items():
        cells = [f"{s[c]['mean']:.4g} | {s[c]['median']:.4g}" for c in columns]
        lines.append(f"| {name} | {s['count']} | " + " | ".join(cells) +
                     f" | {s['sample_effect']['share_positive']:.3f} | {s['mean_response_length']:.1f} |")
    return "\n".join(lines)


def out_stem(path):
    """--out without .jsonl: the summary is written beside it as <stem>.summary.json."""
    return path[:-len(".jsonl")] if path.endswith(".jsonl") else path


def write_selection(path, chosen, cache):
    """Copy the chosen effect rows' original records verbatim (plus "sample_effect" and "source_file") into an SFT
    jsonl. cache: each source file's records by line, read once for all the selections."""
    out = []
    for row in chosen:
        if row["file"] not in cache:
            with common.open_lines(row["file"]) as lines:
                cache[row["file"]] = dict(lines)
        rec = dict(cache[row["file"]][row["line"]])
        rec["sample_effect"] = row["sample_effect"]
        rec["source_file"] = row["file"]
        out.append(rec)
    common.write_jsonl(path, out)


def in_pool(path, select_from):
    """Whether a sample of this --sft_data file is ranked by --select (select_from None: every file's are)."""
    return select_from is None or os.path.abspath(path) == os.path.abspath(select_from)


def select(effects, pool, args):
    """{path: effect rows} for --select_out (the pool's top K by --select_by, best first), --select_bottom (its
    bottom K, worst first) and --select_random (K of the pool drawn by random.Random(--seed), in the files' order).
    pool: the indices of the effects that may be chosen."""
    ranked = sorted((effects[i] for i in pool), key=lambda e: e[args.select_by], reverse=True)
    out = {args.select_out: ranked[:args.select]}
    if args.select_bottom:
        out[args.select_bottom] = ranked[-args.select:][::-1]
    if args.select_random:
        out[args.select_random] = [effects[i] for i in sorted(random.Random(args.seed).sample(pool, args.select))]
    return out


# -----------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_settings(get_parser(), argv)
    if not args.checkpoint or not args.eval_data or not args.sft_data:
        raise UserError("give --checkpoint DIR, --eval_data SPLIT.jsonl and --sft_data FILE [FILE ...]")
    if args.samples_per_prompt < 2:
        raise UserError("--samples_per_prompt must be >= 2 (the group baseline needs two samples per prompt), "
                        f"got {args.samples_per_prompt}")
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (J is the expected reward of sampling)")
    common.check_temperature(args)
    if args.proj_dim < 0 or (args.proj_dim == 0 and not args.exact):
        raise UserError("give --proj_dim > 0, --exact true, or both")
    common.check_positive(args, "max_response_tokens", "gen_batch_size", "micro_batch_tokens", "max_length",
                          "log_every")
    if args.kv_cache_gib <= 0:
        raise UserError(f"--kv_cache_gib must be > 0, got {args.kv_cache_gib}")
    common.check_non_negative(args, "num_eval_prompts", "select")
    if args.select and not args.select_out:
        raise UserError("--select K needs --select_out PATH (and optionally --select_bottom/--select_random PATH)")
    common.check_distinct_inputs([("--sft_data", path) for path in args.sft_data])
    if (args.select_out or args.select_bottom or args.select_random or args.select_from) and not args.select:
        raise UserError("--select_out/--select_bottom/--select_random/--select_from need --select K")
    if args.select_from and not any(in_pool(f, args.select_from) for f in args.sft_data):
        raise UserError(f"--select_from {args.select_from}: not one of the --sft_data files "
                        f"({' '.join(args.sft_data)})")
    try:
        param_re = re.compile(args.params)
    except re.error as e:
        raise UserError(f"--params {args.params!r}: not a valid regular expression ({e})")
    common.check_distinct_outputs(
        [("--out", args.out), ("(the summary)", out_stem(args.out) + ".summary.json"),
         ("--select_out", args.select_out), ("--select_bottom", args.select_bottom),
         ("--select_random", args.select_random)],
        [("--sft_data", f) for f in args.sft_data] + [("--eval_data", args.eval_data)])
    stem = out_stem(args.out)  # this run's own files: <stem>.partial/, removed as it ends, and its lock <stem>.lock
    for flag, path in (("--select_out", args.select_out), ("--select_bottom", args.select_bottom),
                       ("--select_random", args.select_random)):
        if path and (common.file_key(path) == common.file_key(stem + ".lock") or os.path.realpath(stem + ".partial")
                     in map(os.path.realpath, common.path_and_parents(path))):  # (the folder itself, or in it)
            raise UserError(f"{flag} {path}: one of this run's own files ({stem}.partial/ is removed as the run ends, "
                            f"{stem}.lock rewritten by the next); give a path outside them")
    task = tasks.get_task(args.task)
    check_checkpoint(args.checkpoint)
    context = read_config(args.checkpoint).max_position_embeddings

    import torch
    from parallel import full_copy
    from model import load_model, parse_dtype
    from tasks import load_tokenizer
    rank, world, device = parallel.dist_setup(args)
    compute_dtype = parse_dtype(args.dtype, device, training=True)  # (gradients)
    autocast = (nullcontext if compute_dtype == torch.float32
                else (lambda: torch.autocast(device.type, dtype=compute_dtype)))
    common.seed_everything(args.seed)

    # ---- data: SFT samples (checked against --task) and evaluation prompts
    tokenizer = load_tokenizer(args.checkpoint)
    max_length, limit = tasks.sft_length_limit(args.max_length, context)
    # stamped before they are read (outputs name samples by file and line); a missing one fails to load, by name
    sft_files = [p for p in args.sft_data if os.path.isfile(p)]
    sft_stamps = common.file_stamps(sft_files)
    examples = tasks.load_sft_examples(args.sft_data, tokenizer, max_length, limit)
    records = tasks.load_records(task, args.task, args.eval_data, tokenizer, args.template)
    sft_digest = common.data_digest([[e["input_ids"], e["start"]] for e in examples])
    parallel.same_on_every_rank([sft_digest, common.data_digest(records)],
                                f"{' '.join(args.sft_data)} {args.eval_data}")
    for ex in examples:
        if ex["task"] is not None and tasks.task_module_name(ex["task"]) != tasks.task_module_name(args.task):
            raise UserError(f"{ex['file']}:{ex['line']}: sample {ex['id']!r} is for task {ex['task']!r}, "
                            f"but --task is {args.task!r}")
    pool = [i for i, ex in enumerate(examples) if in_pool(ex["file"], args.select_from)]
    what = f"the {len(pool)} SFT samples " + (f"of --select_from {args.select_from}" if args.select_from else "given")
    if args.select > len(pool):
        raise UserError(f"--select {args.select} > {what}")
    if args.select_bottom and 2 * args.select > len(pool):
        raise UserError(f"--select {args.select} with --select_bottom: top and bottom would share "
                        f"{2 * args.select - len(pool)} of {what}; use --select <= {len(pool) // 2}")
    records, eval_subset = tasks.stratified_subset(records, args.num_eval_prompts, task.DIFFICULTY, args.seed)
    prompt_ids = tasks.task_prompt_ids(tokenizer, task, records, args.template)
    tasks.check_prompts_fit(prompt_ids, records, args.max_response_tokens, context, args.eval_data)
    print0(f"evaluation prompts: {eval_subset}")

    # ---- a stopped run of these settings and data (--resume): its ∇J and finished samples, kept in PARTIAL
    partial = out_stem(args.out) + ".partial"
    # held until the run ends: a second run on this --out (another terminal, a re-run while a killed torchrun's
    # workers still write) would remove or interleave this one's partial files
    lock = (os.path.dirname(args.out), os.path.basename(out_stem(args.out)) + ".lock")
    parallel.lock_on_rank0(*lock)
    outputs = [args.out, out_stem(args.out) + ".summary.json"] + [
        p for p in (args.select_out, args.select_bottom, args.select_random) if p]
    parallel.on_rank0(lambda: common.remove_stale_temps(outputs, os.path.dirname(os.path.abspath(args.out))))
    identity = {**{k: v for k, v in vars(args).items() if k not in RESUME_FREE},
                "checkpoint": os.path.abspath(args.checkpoint), "eval_data": os.path.abspath(args.eval_data),
                "sft_data": [os.path.abspath(f) for f in args.sft_data],
                **parallel.compute_identity(compute_dtype, device),  # (a CPU's thread count rounds otherwise too)
                "device_type": device.type,  # (the CountSketch's hashes are drawn on the device)
                "sft_digest": sft_digest,
                "eval_digest": common.data_digest(records),
                # the prompts as rendered (the task's render_prompt, the chat template, --template auto's choice)
                "prompt_digest": common.data_digest(prompt_ids),
                # its weights, config and tokenizer files (a chat template fixed in place: another ∇J)
                "checkpoint_files": checkpoint_stamps(args.checkpoint, tasks.TOKENIZER_FILES)}
    ckpt.code_stamp()  # (the code as the run starts: identity.json records it once ∇J is computed, minutes later)
    # rank 0 decides and tells the others, so that all share out the same remaining samples
    partial_rows = parallel.on_rank0(lambda: open_partial(partial, identity, args.resume, len(examples)))
    resumed = partial_rows is not None
    # each rank loads the stopped run's ∇J itself: every rank must see the directory (not a node-local --out)
    if not all(parallel.all_gather_json(os.path.exists(os.path.join(partial, "grad_j.json")) == resumed)):
        raise UserError(f"{partial}: not every rank sees the stopped run's files (a --out on a node-local disk?); "
                        "pass --resume false")
    done_rows = partial_rows or []
    done_before = {r["index"] for r in done_rows}
    if resumed:
        print0(f"resuming {partial}: {len(done_before)} of {len(examples)} samples done before")

    # ---- model and the parameters that count
    t0 = time.time()
    model = load_model(args.checkpoint, dtype=torch.float32, device=device).eval()
    chosen = chosen_parameters(model, param_re)
    if not chosen:
        raise UserError(f"--params {args.params!r} matches no parameter; names look like "
                        f"{', '.join(n for n, _ in list(model.named_parameters())[:4])}, ...")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    model = parallel.prepare_training(model, compute_dtype, args)
    params = [p for p in model.parameters() if p.requires_grad]  # the same tensors, now sharded
    n_params = sum(p.numel() for p in params)
    print0(f"loaded {args.checkpoint} in {time.time() - t0:.1f}s: {model.num_params() / 1e6:.2f}M parameters, "
           f"{n_params / 1e6:.2f}M counted "
           f"({len(params)} tensors{', --params ' + repr(args.params) if args.params else ''}); "
           f"compute {str(compute_dtype).replace('torch.', '')}; "
           f"{'exact' if args.exact else ''}{' + ' if args.exact and args.proj_dim else ''}"
           f"{f'CountSketch {args.proj_dim}' if args.proj_dim else ''}; {world} rank(s)")

    # ---- ∇J: a stopped run's, or K rollouts per evaluation prompt and the RLOO policy gradient
    sketch = CountSketch([p.numel() for p in params], args.proj_dim, args.proj_seed, device) if args.proj_dim else None
    loaded = load_grad_j(partial, device) if resumed else None
    if loaded is None:
        grad_j, exact_ref, sketch_ref = estimate_grad_j(model, params, tokenizer, task, records, prompt_ids,
                                                        eval_subset, sketch, compute_dtype, args, rank, world, device)
        # (every rank waits for it: no rank's effects are on disk before the ∇J they are for)
        parallel.write_on_rank0(lambda: save_grad_j(partial, identity, grad_j, exact_ref, sketch_ref), *lock)
    else:
        grad_j, exact_ref, sketch_ref = loaded
        print0(f"∇J of the stopped run ({partial}; {grad_j['ranks']} rank(s)): "
               f"mean reward {grad_j['mean_reward']:.4f}, "
               f"{grad_j['informative_prompts']} prompts with mixed rewards | "
               f"‖∇J‖ {grad_j.get('norm', grad_j.get('norm_proj')):.4g}")

    # ---- per-sample effects: this rank's share of the SFT samples, one backward each, on this rank's own full
    # fp32 copy (a sharded model would sum the ranks' gradients, mixing their samples)
    plain = full_copy(model, torch.float32)
    parallel.set_recompute(plain, args)
    for n, p in plain.named_parameters():
        p.requires_grad_(n in chosen)
    params = [p for n, p in plain.named_parameters() if n in chosen]
    del model
    mine = parallel.rank_share([i for i in range(len(examples)) if i not in done_before], rank, world)
    bar = common.progress_bar(len(mine), "sample effects", args.progress)
    t0, done, tokens = time.time(), [0], [0]
    log = os.path.join(partial, f"effects.rank{rank}.jsonl")

    lock_id = parallel.on_rank0(lambda: common.file_identity(os.path.join(*lock)))  # (every rank checks it below)

    def on_sample(k, result):  # each effect on disk as it is done: a stopped run resumes after it
        common.check_lock_held(*lock, identity=lock_id)  # (--out's directory removed or moved away: write nothing)
        broken = next((key for key, v in result.items() if isinstance(v, float) and not math.isfinite(v)), None)
        if broken is not None:  # (not saved: a NaN on disk failed every resume's summary with a traceback)
            ex = examples[mine[k]]
            raise UserError(f"{ex['file']}:{ex['line']} (sample {ex['id']!r}): its {broken} is {result[broken]} (an "
                            f"inf or NaN in its log-probs or gradient, --dtype {args.dtype}); no effect of it is saved")
        common.append_jsonl(log, {"index": mine[k], **result})
        done[0] += 1
        tokens[0] += len(examples[mine[k]]["input_ids"])
        bar.update(1)
        if rank == 0 and (done[0] % args.log_every == 0 or done[0] == len(mine)):
            dt = time.time() - t0
            bar.write(f"{done[0]}/{len(mine)} samples on rank 0 | {done[0] / dt:.2f} samples/s | "
                      f"{tokens[0] / dt:.0f} tok/s")

    # (an error on one rank stops every rank with its line, not the others in the gather below)
    res = parallel.on_every_rank(lambda: sample_effects(plain, params, [examples[i] for i in mine],
                                                        args.token_reduction, exact_ref, sketch, sketch_ref, autocast,
                                                        on_sample=on_sample))
    bar.close()
    seconds = time.time() - t0
    rows = done_rows + parallel.gather_lists([{"index": i, **r} for i, r in zip(mine, res)])
    rows.sort(key=lambda r: r["index"])
    if [r["index"] for r in rows] != list(range(len(examples))):
        raise RuntimeError("sample_effect: the rows do not cover every SFT sample exactly once")
    effects = []
    for r in rows:
        ex = examples[r.pop("index")]
        effects.append({"id": ex["id"], "file": ex["file"], "line": ex["line"], **r})

    # ---- outputs (rank 0)
    # (decided by all ranks together: one alone would wait in the barrier below, the others' outputs written)
    if any(parallel.all_gather_json(common.file_stamps(sft_files) != sft_stamps)):
        raise UserError(f"{', '.join(args.sft_data)}: changed while this run read them (a stage writing them again?): "
                        f"the effects name samples by file and line, and --select copies records from them; run "
                        f"again once they are written")
    columns = ["sample_effect", "normalised"] + (["sample_effect_proj", "normalised_proj"]
                                                 if args.exact and args.proj_dim else [])
    per_file = {}
    for path in args.sft_data:
        mine_rows = [e for e in effects if e["file"] == path]
        per_file[path] = {"count": len(mine_rows), **{c: summarize([e[c] for e in mine_rows]) for c in columns},
                          "mean_response_length": statistics.fmean(e["response_length"] for e in mine_rows)}
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("progress", "log_every", "resume")},
               "grad_j": grad_j, "files": per_file}

    selections = select(effects, pool, args) if args.select else {}

    def write_outputs():
        common.write_jsonl(args.out, effects)
        common.write_json(out_stem(args.out) + ".summary.json", summary)
        cache = {}
        for path, chosen in selections.items():
            write_selection(path, chosen, cache)
    parallel.write_on_rank0(write_outputs, *lock)  # (--out's directory removed or moved away meanwhile: nothing)
    parallel.barrier()  # every rank is past the partial files before they go
    if rank == 0:
        remove_partial(partial, done=True)
    now = len(effects) - len(done_before)
    print0(f"{now} samples in {seconds:.1f}s ({now / max(seconds, 1e-9):.2f} samples/s over {world} "
           f"rank(s)){f', {len(done_before)} done before' if done_before else ''}; token reduction "
           f"{args.token_reduction}\n\n" + summary_table(per_file, columns) + "\n")
    for path, chosen in selections.items():
        print0(f"{path}: {len(chosen)} samples, mean {args.select_by} "
               f"{statistics.fmean(e[args.select_by] for e in chosen):.4g}")
    print0(f"wrote {args.out}" + "".join(f", {path}" for path in selections))
    parallel.dist_cleanup()


if __name__ == "__main__":
    common.run_main(main)
