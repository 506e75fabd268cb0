"""
What RL changed, token by token: a base and an RL policy compared at every position of responses, and the causal
test of whether those few positions carry RL's gain. After "Sparse but Critical" (Meng et al., arXiv 2603.22446),
which released no code; the definitions we use and every output field: docs/token_shift.md.

1. Divergence along responses (the default mode): JS between the two models' tempered, top-p next-token
   distributions at every response token and the EOS, with entropies, top-k overlaps at high-JS positions, and the
   tokens where it is high. Writes OUT_DIR/tokens.jsonl, summary.json and token_shift.png.

    python token_shift.py --base runs/tiny/sft/final --policy runs/tiny/rl/step_000100 \\
        --responses runs/tiny/rl/rollouts/step_000100.jsonl --out_dir out/shift
    torchrun --nproc_per_node=8 token_shift.py ...     # responses sharded over ranks, both models FSDP-sharded

2. Cross-sampling (--cross forward|backward): the two models decode in lock-step and the intervention model draws
   where JS > eps; accuracy and the switched budget per eps, against a random-position control at the same
   budget. Writes OUT_DIR/cross_DIRECTION.json, cross_DIRECTION_samples.jsonl and cross_sampling.png.

    python token_shift.py --base ... --policy ... --cross forward --task kk --split runs/tiny/data/test.jsonl \\
        --eps inf 0.3 0.1 0.03 0.01 -1 --samples_per_prompt 4 --out_dir out/shift

The divergence-weighted advantage (DWA) is train_rl.py's --adv_weight dwa.
"""
import math
import os
from collections import Counter

import torch

import common
import engine
import parallel
import tasks
from common import UserError, print0

# -----------------------------------------------------------------------------
# settings


def get_parser():
    p = common.new_parser("Token-level shift between a base and an RL policy: JS divergence along "
                          "responses, and cross-sampling", prog="token_shift.py")
    p.add_argument("--base", default=None,
                   help="the model before RL (Hugging Face checkpoint directory), e.g. the cold start (required)")
    p.add_argument("--policy", default=None,
                   help="the model after RL (Hugging Face checkpoint directory); same tokenizer as --base (required)")
    p.add_argument("--out_dir", default="out/token_shift",
                   help="where the outputs go: tokens.jsonl, summary.json and token_shift.png (the divergence), or "
                        "cross_DIRECTION.json, cross_DIRECTION_samples.jsonl and cross_sampling.png (--cross)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="both distributions are softmax(logits / T) (the paper: 1)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="each distribution is truncated to its own top-p nucleus and "
                   "renormalised before JS, entropy and sampling (the paper: 0.7); 1 = the full distribution")
    # 1. divergence along responses
    p.add_argument("--responses", nargs="+", default=None, help="jsonl file(s) of responses: SFT format {id, prompt, "
                   "response} or train_rl.py's rollouts/step_N.jsonl (a row with \"finished\": false gets no EOS)")
    p.add_argument("--limit", type=int, default=0,
                   help="use the first this many responses (with --cross: this many split records, each "
                   "difficulty in proportion, drawn with --seed); 0 = all")
    p.add_argument("--high_js", type=float, default=0.1,
                   help="positions with JS above this are 'high-JS' (the paper: 0.1; JS in nats lies in "
                   "[0, ln 2 = 0.693])")
    p.add_argument("--top_tokens", type=int, default=20,
                   help="how many of the most frequent high-JS tokens the summary lists")
    p.add_argument("--batch_size", type=int, default=16,
                   help="responses per packed forward (1.) or prompts decoded at once (2.: x n rows = the KV cache's "
                        "slots)")
    p.add_argument("--logit_chunk", type=int, default=1024,
                   help="positions per chunk of lm_head + softmax + JS (memory: chunk x vocabulary)")
    # 2. cross-sampling
    p.add_argument("--cross", default=None, choices=("forward", "backward"), help="cross-sample instead of measuring: "
                   "forward = base primary, policy intervening; backward = policy primary, base intervening")
    p.add_argument("--eps", type=float, nargs="+", default=[math.inf, 0.3, 0.1, 0.03, 0.01, -1.0],
                   help="JS thresholds, one run each (inf: the primary alone; < 0: the intervention model alone, "
                   "written -1: argparse reads -inf or -1e-3 after another value as an option; a finite one is "
                   "below ln 2 = 0.693, JS's largest value in nats)")
    p.add_argument("--task", default="kk", help="--cross: task module (kk, math, or a module with the task interface)")
    p.add_argument("--split", default=None, help="--cross: the task split whose prompts are answered")
    p.add_argument("--samples_per_prompt", type=int, default=4, help="--cross: samples per prompt (the paper: 32)")
    p.add_argument("--max_response_tokens", type=int, default=512,
                   help="--cross: response budget (the paper: 8000); longer = truncated = wrong")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"), help="--cross: prompt template")
    p.add_argument("--seed", type=int, default=0,
                   help="--cross: the sampling seed of every run (and of the random control)")
    p.add_argument("--dtype", default="float32",
                   help="compute dtype: float32 (on a GPU too: bfloat16's rounding, independent in the two models, "
                        "puts a floor under JS and switches --eps's small thresholds on noise; a policy 0.002 from its "
                        "base, a random tiny model on the CPU: mean JS 6.5e-5 in bfloat16, 9.6e-6 in float32), "
                        "bfloat16, or auto (bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--plots", type=common.str2bool, default=True, help="write PNG plots when matplotlib is installed")
    p.add_argument("--progress", type=common.str2bool, default=True, help=common.PROGRESS_HELP)
    return p


# -----------------------------------------------------------------------------
# inputs, checked before anything runs or is written


def read_responses(paths, tokenizer, context, limit=0):
    """Responses tokenized as SFT data: [{"id", "file", "line", "ids", "start"}]; every field checked, and a
    response longer than the context or holding a stop token (as SFT refuses it) is an error naming its file and
    line."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no eos_token; responses end with EOS")
    rows = []
    for path in paths:
        for lineno, rec in common.iter_jsonl(path):
            if limit and len(rows) == limit:
                break
            tasks.check_sft_record(path, lineno, rec)
            if not isinstance(rec.get("finished", True), bool):
                raise UserError(f"{path}:{lineno}: field 'finished' must be true or false, got {rec['finished']!r}")
            sampled = rec.get("length")  # (a rollout log's, sample_policy --samples_out's: tokens sampled, the stop
            # token counted)
            rows.append({"id": rec["id"], "file": path, "line": lineno, "prompt": rec["prompt"],
                         "response": rec["response"], "eos": rec.get("finished", True),
                         "sampled": sampled if type(sampled) is int else None})
    if not rows:
        raise UserError(f"{', '.join(paths)}: no responses")
    tokenized = tasks.sft_token_ids(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                                    [r["eos"] for r in rows])
    examples, empty, retokenized = [], 0, []
    stops = set(common.stop_token_ids(tokenizer))
    for r, (ids, start) in zip(rows, tokenized):
        if r["sampled"] is not None and len(ids) - start != r["sampled"]:
            retokenized.append((r, len(ids) - start))
        tasks.check_no_stop_tokens(r["file"], r["line"], tokenizer, ids[start:len(ids) - r["eos"]], stops)
        if len(ids) > context:
            raise UserError(f"{r['file']}:{r['line']}: field 'response' of {r['id']!r}: {len(ids)} tokens "
                            f"(prompt {start} + response{' + EOS' if r['eos'] else ''}) "
                            f"> the models' {context}-token context")
        if len(ids) == start:  # an empty response cut off before its EOS: no position to compare
            empty += 1
            continue
        examples.append({"id": r["id"], "file": r["file"], "line": r["line"], "ids": ids, "start": start})
    if empty:
        common.print0(f"note: skipped {empty} empty unfinished response(s): no token to compare")
    if retokenized:  # (text that does not round-trip: bytes of no character decode to U+FFFD, 3 tokens again; or
        #              another BPE split of the same text than the one sampled)
        r, now = retokenized[0]
        common.print0(f"note: {len(retokenized)} of the {len(rows)} responses tokenize to another number of tokens "
                      f"than their 'length' sampled (the first: {r['file']}:{r['line']}, {r['sampled']} sampled, "
                      f"{now} now): their positions are the text's tokens, not the ones the model drew")
    if not examples:
        raise UserError(f"{', '.join(paths)}: the responses hold no positions to compare")
    return examples


# -----------------------------------------------------------------------------
# 1. divergence along responses


def js_divergence(p, q):
    """Jensen-Shannon divergence in nats of each row of p from the same row of q (distributions over the last
    dimension): KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2, between 0 and ln 2. Zero entries add nothing,
    so distributions of different supports (top-p truncated) are fine. In float64: near-equal rows cancel."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl_to_m(a):  # where a > 0, m >= a / 2 > 0
        return torch.where(a > 0, a * (a.log() - m.log()), 0.0).sum(-1)
    return 0.5 * kl_to_m(p) + 0.5 * kl_to_m(q)


def entropy(p):
    """Entropy in nats of each row of a distribution (zero entries add nothing)."""
    return -torch.where(p > 0, p * p.clamp_min(1e-38).log(), 0.0).sum(-1)


@torch.no_grad()
def compare_along(base, policy, examples, temperature, top_p, high_js, chunk):
    """Both models' packed training forward over examples, compared at every response position.

    Returns (per example {"js", "entropy_base", "entropy_policy", "targets"}: lists over its positions, and
    "nonfinite": the models ("--base", "--policy") whose logits held an inf or NaN at one of them;
    high: one {"token", "overlap" (k = 1..5), "base_rank", "base_prob", "example" (its index in examples), "at" (its
    packed position)} per position with JS > high_js)."""
    from engine import nucleus
    from model import pack, response_positions
    device = base.lm_head.weight.device
    ids, cu = pack([e["ids"] for e in examples], device)
    hidden = [m(ids, cu_seqlens=cu)[0] for m in (base, policy)]
    pos = response_positions(cu, [e["start"] for e in examples], [len(e["ids"]) - e["start"] for e in examples])
    js, ent_b, ent_p, high, finite = [], [], [], [], []
    for s in range(0, pos.numel(), chunk):
        at = pos[s:s + chunk]
        logits_b, logits_p = (m.lm_head(h[at]).float() for m, h in zip((base, policy), hidden))
        finite.append(torch.stack([torch.isfinite(logits_b).all(-1), torch.isfinite(logits_p).all(-1)], -1))
        p, q = nucleus(logits_b, temperature, top_p), nucleus(logits_p, temperature, top_p)
        d = js_divergence(p, q)
        js.append(d)
        ent_b.append(entropy(p))
        ent_p.append(entropy(q))
        rows = (d > high_js).nonzero().squeeze(-1)
        if rows.numel():  # how the mass moved, on the full tempered distributions
            full_b = torch.softmax(logits_b[rows] / temperature, -1)
            top_b = full_b.topk(5, -1).indices
            top_p_ = torch.softmax(logits_p[rows] / temperature, -1).topk(5, -1).indices
            overlap = torch.stack([(top_b[:, :k, None] == top_p_[:, None, :k]).any(-1).sum(-1) / k
                                   for k in range(1, 6)], -1)
            base_prob = full_b.gather(-1, top_p_[:, :1]).squeeze(-1)
            base_rank = (full_b > base_prob[:, None]).sum(-1) + 1
            tokens = ids[0, at[rows] + 1]
            which = torch.searchsorted(cu, at[rows], right=True) - 1  # the example each position is in
            high += [{"token": int(t), "overlap": o, "base_rank": int(r), "base_prob": float(b), "example": e, "at": a}
                     for t, o, r, b, e, a in zip(tokens.tolist(), overlap.tolist(), base_rank.tolist(),
                                                 base_prob.tolist(), which.tolist(), at[rows].tolist())]
    lens = [len(e["ids"]) - e["start"] for e in examples]
    targets = ids[0, pos + 1].tolist()
    js, ent_b, ent_p = (torch.cat(x).tolist() for x in (js, ent_b, ent_p))
    finite = torch.cat(finite)
    out, a = [], 0
    for n in lens:
        ok = finite[a:a + n].all(0).tolist()
        out.append({"js": js[a:a + n], "entropy_base": ent_b[a:a + n], "entropy_policy": ent_p[a:a + n],
                    "targets": targets[a:a + n], "nonfinite": [m for m, f in zip(("--base", "--policy"), ok) if not f]})
        a += n
    return out, high


ENTROPY_BINS = (0.0, 0.1, 0.5, 1.0, 2.0, math.inf)  # nats
JS_BINS = (0.0, 1e-3, 1e-2, 0.1, math.inf)


def bin_label(lo, hi):
    return f"[{lo:g}, {hi:g})"


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def summarize(rows, high, tokenizer, high_js, top_tokens):
    """The summary of tokens.jsonl's rows (at least one position: read_responses keeps only responses with one) and
    the high-JS records (see the docstring)."""
    js = [x for r in rows for x in r["js"]]
    n = len(js)
    share = lambda xs, cond: sum(1 for x in xs if cond(x)) / len(xs) if xs else None  # noqa: E731
    ordered = sorted(js)
    summary = {"responses": len(rows), "positions": n, "js_mean": mean(js),
               # nearest rank: the smallest value with at least q % of the positions at or below it
               "js_quantiles": {str(q): ordered[max(0, -(-q * n // 100) - 1)] if n else None for q in (50, 90, 95, 99)},
               "share_js_below_1e-3": share(js, lambda x: x < 1e-3),
               "share_js_below_1e-2": share(js, lambda x: x < 1e-2),
               f"share_js_above_{high_js:g}": share(js, lambda x: x > high_js)}
    deciles = [[] for _ in range(10)]
    for r in rows:
        for j, x in enumerate(r["js"]):
            deciles[min(9, 10 * j // len(r["js"]))].append(x)
    summary["by_relative_position"] = [{"decile": d + 1, "positions": len(xs), "js_mean": mean(xs),
                                        "share_high": share(xs, lambda x: x > high_js)} for d, xs in enumerate(deciles)]
    triples = [(x, hb, hp) for r in rows for x, hb, hp in zip(r["js"], r["entropy_base"], r["entropy_policy"])]
    summary["by_base_entropy"] = []
    for lo, hi in zip(ENTROPY_BINS[:-1], ENTROPY_BINS[1:]):
        xs = [x for x, hb, _ in triples if lo <= hb < hi]
        summary["by_base_entropy"].append({"bin": bin_label(lo, hi), "positions": len(xs), "share": len(xs) / n,
                                           "js_mean": mean(xs), "share_high": share(xs, lambda x: x > high_js)})
    summary["by_js"] = []
    for lo, hi in zip(JS_BINS[:-1], JS_BINS[1:]):
        sel = [(hb, hp) for x, hb, hp in triples if lo <= x < hi]
        summary["by_js"].append({"bin": bin_label(lo, hi), "positions": len(sel), "share": len(sel) / n,
                                 "entropy_base_mean": mean([a for a, _ in sel]),
                                 "entropy_policy_mean": mean([b for _, b in sel])})
    ranks = [h["base_rank"] for h in high]
    summary["high_js"] = {
        "positions": len(high),
        "topk_overlap": {str(k): mean([h["overlap"][k - 1] for h in high]) for k in range(1, 6)},
        "policy_top1_base_rank": {"1": share(ranks, lambda r: r == 1), "2": share(ranks, lambda r: r == 2),
                                  "3": share(ranks, lambda r: r == 3), "4-10": share(ranks, lambda r: 4 <= r <= 10),
                                  ">10": share(ranks, lambda r: r > 10)},
        "policy_top1_within_base_top3": share(ranks, lambda r: r <= 3),
        "policy_top1_base_prob_mean": mean([h["base_prob"] for h in high]),
        "policy_top1_base_prob_below_0.01": share([h["base_prob"] for h in high], lambda b: b < 0.01)}
    every = Counter(t for r in rows for t in r["targets"])
    at_high = Counter(h["token"] for h in high)
    summary["top_high_js_tokens"] = [{"token": tokenizer.decode([t]), "id": t, "high_js": c, "occurrences": every[t],
                                      "share_of_occurrences_high": c / every[t]}
                                     # (ties by token id: the same list whatever the responses' order)
                                     for t, c in sorted(at_high.items(), key=lambda tc: (-tc[1], tc[0]))[:top_tokens]]
    return summary


def describe(summary, high_js):
    """A few readable lines of a summary (printed at the end of a run)."""
    h = summary["high_js"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"{summary['positions']} positions in {summary['responses']} responses: "
             f"JS < 1e-3 {summary['share_js_below_1e-3']:.1%}, < 1e-2 {summary['share_js_below_1e-2']:.1%}, "
             f"> {high_js:g} {summary[f'share_js_above_{high_js:g}']:.1%}; "
             f"mean {summary['js_mean']:.4f} nats",
             "JS by decile of the response: " + " ".join(fmt(d["js_mean"]) for d in summary["by_relative_position"]),
             "JS by base entropy: " + "; ".join(f"{b['bin']} {b['share']:.0%} of positions, mean {fmt(b['js_mean'])}"
                                                for b in summary["by_base_entropy"]),
             f"high-JS positions {h['positions']}: top-k overlap "
             + " ".join(f"k={k} {fmt(v)}" for k, v in h["topk_overlap"].items())
             + f"; policy's top-1 is the base's top-1 {fmt(h['policy_top1_base_rank']['1'])}, within its top-3 "
             f"{fmt(h['policy_top1_within_base_top3'])}, base prob < 0.01 {fmt(h['policy_top1_base_prob_below_0.01'])}",
             "most frequent high-JS tokens: " + ", ".join(f"{t['token']!r} {t['high_js']}/{t['occurrences']}"
                                                          for t in summary["top_high_js_tokens"][:10])]
    if summary["positions"] and summary["js_mean"] == 0:  # (--base and --policy: copies of one checkpoint?)
        lines.append("note: the JS is 0 at every position: the two models give the same distributions")
    return "\n".join(lines)


def plot_shift(summary, rows, path, high_js):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    js = [max(x, 1e-9) for r in rows for x in r["js"]]
    axes[0].hist([math.log10(x) for x in js], bins=60, color="tab:blue")
    for t in (1e-3, 1e-2, high_js):  # (--high_js 0: at the histogram's floor)
        axes[0].axvline(math.log10(max(t, 1e-9)), color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="log10 JS (nats; 1e-9 = below)", ylabel="positions", title=f"{len(js)} positions")
    dec = summary["by_relative_position"]
    axes[1].bar([d["decile"] for d in dec], [d["js_mean"] or 0 for d in dec], color="tab:blue")
    axes[1].set(xlabel="decile of the response", ylabel="mean JS (nats)", title="JS by relative position")
    ax = axes[1].twinx()
    ax.plot([d["decile"] for d in dec], [d["share_high"] or 0 for d in dec], "o-", color="tab:red")
    ax.set_ylabel(f"share JS > {high_js:g}", color="tab:red")
    ent = summary["by_base_entropy"]
    axes[2].bar(range(len(ent)), [b["js_mean"] or 0 for b in ent], color="tab:blue")
    axes[2].set_xticks(range(len(ent)), [f"{b['bin']}\n{b['share']:.0%}" for b in ent], fontsize=7)
    axes[2].set(xlabel="base entropy (nats); share of positions", ylabel="mean JS (nats)", title="JS by base entropy")
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def lock_name(args):
    return f".lock_{args.cross or 'divergence'}"


def data_outputs(args):
    """This kind's data files in --out_dir (its figure aside: cross_sampling.png is both directions')."""
    return ([f"cross_{args.cross}_samples.jsonl", f"cross_{args.cross}.json"] if args.cross
            else ["tokens.jsonl", "summary.json"])


def lock_out_dir(args):
    """A second run of the same kind into --out_dir is refused (each of its files is written whole, but one run's would
    replace the other's without a word); the divergence and the two cross-sampling directions may share it. Taken once
    the inputs are read: bad input leaves no directory behind. Holding it, the temporary files a SIGKILL left of this
    kind's outputs' writes go."""
    from model import weight_files
    for checkpoint in (args.base, args.policy):  # (one without weights: refused before the directory is made)
        weight_files(checkpoint)
    parallel.lock_on_rank0(args.out_dir, lock_name(args))
    names = data_outputs(args) + ([] if args.cross else ["token_shift.png"])  # (cross_sampling.png: not this run's)
    parallel.on_rank0(lambda: common.remove_stale_temps([os.path.join(args.out_dir, n) for n in names], args.out_dir))


def measure(args, tokenizer, device, dtype):
    """Part 1: JS along the responses, both models FSDP-sharded, responses sharded over ranks."""
    from parallel import idle_pass, shard_model
    from model import dtype_name, load_model, read_config
    context = min(read_config(d).max_position_embeddings for d in (args.base, args.policy))
    examples = read_responses(args.responses, tokenizer, context, args.limit)
    parallel.same_on_every_rank(common.data_digest([[e["id"], e["ids"], e["start"]] for e in examples]),
                                " ".join(args.responses))
    lock_out_dir(args)
    rank, world = common.rank(), common.world_size()
    base, policy = (shard_model(load_model(d, torch.float32, device), dtype).eval() for d in (args.base, args.policy))
    mine = parallel.rank_share(list(range(len(examples))), rank, world)
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    bar = common.progress_bar(sum(len(examples[i]["ids"]) - examples[i]["start"] for i in mine), "compare",
                              args.progress, unit="tok")
    rows, high = [], []
    for batch in parallel.even_out(batches):
        if batch is None:  # this rank is done; join the others' FSDP collectives
            idle_pass(base, backward=False)
            idle_pass(policy, backward=False)
            continue
        out, h = compare_along(base, policy, [examples[i] for i in batch], args.temperature, args.top_p,
                               args.high_js, args.logit_chunk)
        rows += [{"index": i, **o} for i, o in zip(batch, out)]
        high += [dict(x, example=batch[x["example"]]) for x in h]
        bar.update(sum(len(o["js"]) for o in out))
    bar.close()
    gathered = parallel.all_gather_json({"rows": rows, "high": high})
    # (after the gather, so every rank stops: a NaN read as a JS counts in no bin and reads as a result)
    broken = next((r for g in gathered for r in g["rows"] if r["nonfinite"]), None)
    if broken is not None:
        e = examples[broken["index"]]
        raise UserError(f"{e['file']}:{e['line']} (id {e['id']!r}): {' and '.join(broken['nonfinite'])} gave "
                        f"non-finite logits (inf or NaN) in {dtype_name(dtype)}: a diverged checkpoint, or float16's "
                        f"range overflowed (use bfloat16 or float32); nothing written")

    def write():  # rank 0 (removed or moved away meanwhile: nothing written; a refused write stops every rank)
        every = sorted((r for g in gathered for r in g["rows"]), key=lambda r: r["index"])
        # in the examples' order, as one rank finds them: the most frequent tokens' ties and the means' sums do not
        # depend on the number of ranks
        highs = sorted((h for g in gathered for h in g["high"]), key=lambda h: (h["example"], h["at"]))
        summary = summarize(every, highs, tokenizer, args.high_js, args.top_tokens)
        summary["settings"] = {k: getattr(args, k) for k in ("base", "policy", "responses", "limit", "temperature",
                                                             "top_p", "high_js")} | {"dtype": dtype_name(dtype)}

        def short(xs):
            return [float(f"{x:.6g}") for x in xs]
        common.write_jsonl(os.path.join(args.out_dir, "tokens.jsonl"), (
            {"id": examples[r["index"]]["id"], "file": examples[r["index"]]["file"],
             "line": examples[r["index"]]["line"], "token_ids": r["targets"],
             "tokens": [tokenizer.decode([t]) for t in r["targets"]], "js": short(r["js"]),
             "entropy_base": short(r["entropy_base"]), "entropy_policy": short(r["entropy_policy"])} for r in every))
        common.write_json(os.path.join(args.out_dir, "summary.json"), summary)
        if draws_plot(args, os.path.join(args.out_dir, "token_shift.png")):
            plot_shift(summary, every, os.path.join(args.out_dir, "token_shift.png"), args.high_js)
        print0(describe(summary, args.high_js))
        print0(f"wrote {os.path.join(args.out_dir, 'tokens.jsonl')} and summary.json")
    parallel.write_on_rank0(write, args.out_dir, lock_name(args))


# -----------------------------------------------------------------------------
# 2. cross-sampling


CROSS_ROLES = {"forward": ("base", "policy"), "backward": ("policy", "base")}  # --cross: (decodes, intervenes)


class ThresholdSwitch:
    """Switch where the two nuclei diverge by more than eps (JS in nats). It also notes, per model (the decoding one,
    the partner), whether a distribution held a NaN (from inf or NaN logits: its JS is NaN, which switches nowhere,
    even at eps < 0, and the curve would read as a result); the flags stay on the device until nonfinite() reads
    them once, after the decode."""

    def __init__(self, eps):
        self.eps, self.nan = eps, None

    def __call__(self, p, q, rows, step):
        nan = torch.stack([p.isnan().any(), q.isnan().any()])
        self.nan = nan if self.nan is None else self.nan | nan
        return js_divergence(p, q) > self.eps

    def nonfinite(self):
        return [False, False] if self.nan is None else self.nan.tolist()


def random_switch(rate, seed):
    """Switch each position with probability rate, whatever the models say (the control). Each (sample, position)
    has its own random number, keyed on seed as the engine's sampler is on its own (engine.keyed_uniforms), so which
    positions switch does not depend on --batch_size or on the slots the engine happens to use."""
    def switch(p, q, samples, positions):
        keys = engine.sample_keys(torch.tensor(engine.seed32(seed), device=p.device), samples)
        return engine.keyed_uniforms(keys, positions)[:, 0] < rate
    return switch


def cross_run(primary, intervention, tokenizer, task, records, numbers, args, switch, desc):
    """One cross-sampled decode of this rank's records (numbers: their indices in the split, which key their random
    numbers: the same samples at any world size); the counts summed over ranks, and this rank's samples."""
    out = parallel.on_every_rank(lambda: engine.sample_responses(  # (a score failing on one rank stops every rank)
        primary, tokenizer, task, records, n=args.samples_per_prompt, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_response_tokens, seed=common.derive_seed(args.seed, 0), template=args.template,
        batch_size=args.batch_size, desc=desc, progress=args.progress, partner=intervention, switch=switch,
        prompt_numbers=numbers))
    nan = switch.nonfinite() if isinstance(switch, ThresholdSwitch) else [False, False]
    g = parallel.all_reduce_numbers({"nan_primary": int(nan[0]), "nan_intervention": int(nan[1]),
                                     "responses": len(out), "correct": sum(tasks.is_correct(s["reward"]) for s in out),
                                     "tokens": sum(s["length"] for s in out),
                                     "switched": sum(sum(s["switched"]) for s in out),
                                     "differs": sum(sum(s["differs"]) for s in out),
                                     "truncated": sum(not s["finished"] for s in out)})
    n, tokens = max(g["responses"], 1), max(g["tokens"], 1)
    if g["nan_primary"] or g["nan_intervention"]:  # (summed over the ranks: every rank stops)
        which = [f"--{name} {getattr(args, name)}" for name, bad in zip(CROSS_ROLES[args.cross],
                                                                        (g["nan_primary"], g["nan_intervention"]))
                 if bad]
        from model import dtype_name
        raise UserError(f"{' and '.join(which)} gave non-finite logits (inf or NaN) in "
                        f"{dtype_name(next(primary.parameters()).dtype)}, cross-sampling at "
                        f"{desc}: a diverged checkpoint, or float16's range overflowed (use bfloat16 or float32); "
                        f"nothing written")
    stats = {"accuracy": g["correct"] / n, "responses": int(g["responses"]), "tokens": int(g["tokens"]),
             "switched": int(g["switched"]), "switched_share": g["switched"] / tokens,
             "switched_per_response": g["switched"] / n,
             "differs": int(g["differs"]), "differs_share": g["differs"] / tokens,
             "differs_per_response": g["differs"] / n,
             "truncated": g["truncated"] / n}
    samples = [{"id": s["id"], "sample": s["sample"], "tokens": s["tokens"], "response": s["response"],
                "reward": s["reward"], "finished": s["finished"], "switched": sum(s["switched"]),
                "differs": sum(s["differs"])} for s in out]
    return stats, samples


def same_pair(a, b):
    """Two cross-sampling results of one (base, policy) pair and one setting (either direction). Compared by role:
    forward's base decodes, backward's policy does, so the two directions of one pair swap primary and intervention
    (base X with policy Y forward, and base Y with policy X backward, are one decode: not the other direction)."""
    def roles(c):  # (base, policy)
        pair = [os.path.realpath(str(c.get(k))) for k in ("primary", "intervention")]
        return tuple(pair if c.get("direction") == "forward" else pair[::-1])
    return roles(a) == roles(b) and a.get("settings") == b.get("settings")


def plot_cross(out_dir, path, current):
    """Both directions' curves in one figure: the one just written (current) and the other direction's, if that
    is of the same model pair and setting (an earlier run's of another policy is left out, and said)."""
    plt = common.pyplot()
    curves = []
    for direction in ("forward", "backward"):
        if direction == current["direction"]:
            curves.append(current)
        elif os.path.isfile(os.path.join(out_dir, f"cross_{direction}.json")):
            other = common.read_json(os.path.join(out_dir, f"cross_{direction}.json"), "a cross-sampling curve")
            if same_pair(other, current):
                curves.append(other)
            else:
                print0(f"note: {os.path.join(out_dir, f'cross_{direction}.json')} is of another model pair or "
                       f"setting ({other.get('primary')} and {other.get('intervention')}); left out of the figure")
    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
    for ax, c in zip(axes[0], curves):
        # eps < 0 is the intervention model alone (100 % switched): a line, so the curve's low budgets stay readable
        alone = [r for r in c["runs"] if float(r["eps"]) < 0]
        runs = sorted((r for r in c["runs"] if float(r["eps"]) >= 0), key=lambda r: r["switched_share"])
        x = [100 * r["switched_share"] for r in runs]
        ax.plot(x, [r["accuracy"] for r in runs], "o-", label="switch where JS > eps")
        ax.plot([100 * r["control"]["switched_share"] for r in runs], [r["control"]["accuracy"] for r in runs], "s--",
                color="grey", label="random positions, same budget")
        for r, xi in zip(runs, x):
            ax.annotate(f"{float(r['eps']):g}", (xi, r["accuracy"]), textcoords="offset points", xytext=(3, 4),
                        fontsize=7)
        for r in alone[:1]:
            ax.axhline(r["accuracy"], ls=":", color="tab:green", label=f"{c['intervention_name']} alone")
        ax.set(xlabel="positions drawn from the intervention model (%)", ylabel="accuracy",
               title=f"{c['direction']}: {c['primary_name']} decodes, {c['intervention_name']} intervenes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def cross_sample(args, tokenizer, device, dtype):
    """Part 2: accuracy and intervention budget per eps, and the random control at each budget."""
    import time
    from model import dtype_name, load_model, read_config
    if not args.split:
        raise UserError("--cross needs --split (the task split whose prompts are answered)")
    task = tasks.get_task(args.task)
    records = tasks.load_records(task, args.task, args.split, tokenizer, args.template)
    parallel.same_on_every_rank(common.data_digest(records), args.split)
    records, subset = tasks.stratified_subset(records, args.limit, task.DIFFICULTY, args.seed)
    print0(f"cross-sampling prompts: {subset}")
    context = min(read_config(d).max_position_embeddings for d in (args.base, args.policy))
    tasks.check_prompts_fit(tasks.task_prompt_ids(tokenizer, task, records, args.template), records,
                            args.max_response_tokens, context, args.split)
    lock_out_dir(args)
    names = CROSS_ROLES[args.cross]
    primary, intervention = (load_model(getattr(args, name), dtype, device).eval() for name in names)
    numbers = parallel.rank_share(list(range(len(records))), common.rank(), common.world_size())
    mine = [records[i] for i in numbers]
    runs, samples = [], []
    for eps in args.eps:
        t0 = time.time()
        stats, s = cross_run(primary, intervention, tokenizer, task, mine, numbers, args, ThresholdSwitch(eps),
                             f"eps {eps:g}")
        label = eps if math.isfinite(eps) else str(eps)  # JSON has no infinity: "inf", "-inf"
        samples += [{"eps": label, "control": False, **x} for x in s]
        # the control: the same budget (this run's switched share) at random positions. One random stream for every
        # eps (common random numbers): a budget's control does not depend on which other eps the list holds or
        # where, and a larger budget switches where a smaller one would (until the decodes part)
        control = random_switch(stats["switched_share"], common.derive_seed(args.seed, 0, 1))
        stats["control"], s = cross_run(primary, intervention, tokenizer, task, mine, numbers, args, control,
                                        f"control {eps:g}")
        samples += [{"eps": label, "control": True, **x} for x in s]
        runs.append({"eps": label, **stats})
        seconds = time.time() - t0
        c = stats["control"]
        print0(f"{args.cross} eps {eps:g}: accuracy {stats['accuracy']:.3f} | switched {stats['switched_share']:.2%} "
               f"({stats['switched_per_response']:.1f}/response), differs {stats['differs_share']:.2%} "
               f"({stats['differs_per_response']:.1f}/response) | random control: accuracy {c['accuracy']:.3f} at "
               f"{c['switched_share']:.2%} | {stats['responses'] + c['responses']} responses in {seconds:.1f}s, "
               f"{(stats['tokens'] + c['tokens']) / max(seconds, 1e-9):.0f} tok/s")
    # in run order, then split order: the same file at any world size
    run_at, at = {r["eps"]: k for k, r in enumerate(runs)}, {str(r["id"]): i for i, r in enumerate(records)}
    samples = parallel.gather_lists(
        samples, key=lambda x: (run_at[x["eps"]], x["control"], at[str(x["id"])], x["sample"]))

    def write():  # rank 0 (removed or moved away meanwhile: nothing written; a refused write stops every rank)
        result = {"direction": args.cross, "primary_name": names[0], "intervention_name": names[1],
                  "primary": getattr(args, names[0]), "intervention": getattr(args, names[1]),
                  # (the dtype it resolved to: "auto" is bfloat16 on a GPU and float32 on a CPU, "bf16" is bfloat16)
                  "settings": {k: getattr(args, k) for k in ("task", "split", "limit", "samples_per_prompt",
                                                             "max_response_tokens", "temperature", "top_p", "template",
                                                             "seed")} | {"dtype": dtype_name(dtype)},
                  "runs": runs}
        common.write_jsonl(os.path.join(args.out_dir, f"cross_{args.cross}_samples.jsonl"), samples)
        common.write_json(os.path.join(args.out_dir, f"cross_{args.cross}.json"), result)
        if draws_plot(args, os.path.join(args.out_dir, "cross_sampling.png")):
            plot_cross(args.out_dir, os.path.join(args.out_dir, "cross_sampling.png"), result)
        print0(f"wrote {os.path.join(args.out_dir, f'cross_{args.cross}.json')}")
    parallel.write_on_rank0(write, args.out_dir, lock_name(args))


def draws_plot(args, path):
    """Whether this run draws its figure at path; where it does not, an earlier run's there goes (it would show
    other numbers than the files beside it)."""
    if args.plots and common.pyplot() is not None:
        return True
    if os.path.exists(path):
        os.remove(path)
        print0(f"removed {path}, an earlier run's figure (this run draws none: --plots false or no matplotlib)")
    return False


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)
    if not args.base or not args.policy:
        raise UserError("give --base and --policy (Hugging Face checkpoint directories)")
    common.check_not_in_a_run("--out_dir", args.out_dir, "token_shift.py")
    if common.same_files(args.base, args.policy):  # (every divergence 0, every cross-sample the primary's own)
        raise UserError(f"--base {args.base} and --policy {args.policy} are one checkpoint: there is nothing to "
                        f"compare")
    if args.cross is None and not args.responses:
        raise UserError("give --responses FILE (the divergence along responses) or --cross forward|backward")
    # one mode's settings in the other: noted, not refused (the divergence and cross-sampling share a command line)
    common.note_unused(args, parser, ("responses", "high_js", "top_tokens", "logit_chunk"), args.cross is not None,
                       "the divergence along responses (no --cross)")
    common.note_unused(args, parser, ("eps", "task", "split", "samples_per_prompt", "max_response_tokens", "template",
                                      "seed"), args.cross is None, "--cross forward or backward")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise UserError("--temperature must be > 0 and --top_p in (0, 1]")
    common.check_temperature(args)
    common.check_positive(args, "batch_size", "logit_chunk", "samples_per_prompt", "max_response_tokens")
    common.check_non_negative(args, "limit", "top_tokens")
    if args.cross is None:  # (a file twice: each of its responses counted twice)
        common.check_distinct_inputs([("--responses", path) for path in args.responses])
    # (an input among the outputs was overwritten by this run's result)
    common.check_distinct_outputs([(f"--out_dir's {name}", os.path.join(args.out_dir, name))
                                   for name in data_outputs(args)],
                                  [("--split", args.split)] if args.cross else
                                  [("--responses", path) for path in args.responses])
    if not 0 <= args.high_js < math.log(2):
        raise UserError(f"--high_js {args.high_js:g}: JS is measured in nats, in [0, ln 2 = 0.693]; a threshold "
                        f"outside [0, 0.693) marks every position or none")
    beyond = [e for e in args.eps if math.log(2) <= e < math.inf]
    if beyond:
        raise UserError(f"--eps {' '.join(f'{e:g}' for e in beyond)}: JS never exceeds ln 2 = 0.693, so such a "
                        f"threshold is the primary alone; write inf")
    if len(set(args.eps)) < len(args.eps):  # (0 and -0 are one): a run twice would be the same decode
        raise UserError(f"--eps: a threshold given twice ({' '.join(f'{e:g}' for e in args.eps)})")
    from model import parse_dtype, read_config
    rank, world, device = parallel.dist_setup(args)
    dtype = parse_dtype(args.dtype, device)
    tokenizer = tasks.check_same_tokenizer(args.base, args.policy, "--base", "--policy",
                                           "a token-by-token comparison needs one vocabulary",
                                           [read_config(d).vocab_size for d in (args.base, args.policy)])
    if args.cross:
        if tasks.load_tokenizer(args.policy).chat_template != tokenizer.chat_template:  # (the vocabularies are one)
            print0("note: --base and --policy have different chat templates; both models read every prompt as "
                   "--base's renders it (--template names the form)")
        cross_sample(args, tokenizer, device, dtype)
    else:
        measure(args, tokenizer, device, dtype)
    engine.release()  # both models' kept copies and KV caches
    parallel.dist_cleanup()


if __name__ == "__main__":
    common.run_main(main)
