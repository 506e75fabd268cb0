"""
Our batched generation with a preallocated KV cache (after nanochat's engine.py): every prompt is prefilled
once, packed without padding, and copied into its n cache rows; then one token per live row per step, and a
row that emits a stop token leaves the batch. Sampling (temperature, top-p) draws with one uniform number per
row. token_shift.py's cross-sampling runs a second model in lock-step (generate's partner). sample_responses
generates and scores over a task's records: what sampling, evaluation and RL rollouts share.
"""
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import UserError, derive_seed, rank
from model import HAVE_FLASH_ATTN, ModelConfig, Packed, flash_dtype, flash_inputs, pack, stop_token_ids
from parallel import is_sharded
from tasks import encode_prompts

if HAVE_FLASH_ATTN:
    from flash_attn import flash_attn_with_kvcache


class Decode:
    """One new token per cache row: write its key/value at the row's length, attend to the row's prefix."""

    def __init__(self, cache, span=None):
        self.cache = cache
        n = cache.rows
        self.lengths = cache.lengths[:n]
        # columns any row can see this step: generate passes a bound it knows on the host (no GPU sync)
        self.span = span or int(self.lengths.max().item()) + 1
        # decided once, from the cache: it cannot be cast, so flash runs only in the cache's own dtype
        # (the new token's q/k/v are cast to it; the SDPA path stores k/v in it too)
        dtype = flash_dtype(cache.k, cache.v)
        self.flash = dtype if dtype == cache.k.dtype else None
        if self.flash is None:
            cols = torch.arange(self.span, device=cache.k.device)
            self.mask = (cols[None, :] <= self.lengths[:, None])[:, None, None, :]  # (n, 1, 1, span)

    def attend(self, attn, q, k, v):
        c, n, i = self.cache, self.cache.rows, attn.layer_idx
        kc, vc = c.k[i, :n], c.v[i, :n]  # (n, nkv, max_len, hd)
        if self.flash is not None:  # writes k, v into the cache at self.lengths
            y = flash_attn_with_kvcache(*flash_inputs(self.flash, q, kc, vc, k, v),
                                        cache_seqlens=self.lengths.to(torch.int32), causal=True)
            return y.transpose(1, 2)
        rows = torch.arange(n, device=q.device)
        kc[rows, :, self.lengths] = k[:, :, 0]
        vc[rows, :, self.lengths] = v[:, :, 0]
        # attention of one query per row, written out: the query heads that share a kv head form one
        # matrix (no copies of the cache to repeat kv heads, as SDPA's GQA fallback makes)
        nh, nkv, hd = q.shape[1], kc.shape[1], q.shape[-1]
        scores = (q.view(n, nkv, nh // nkv, hd) @ kc[:, :, :self.span].transpose(-1, -2)).float() / math.sqrt(hd)
        scores.masked_fill_(~self.mask, float("-inf"))
        y = torch.softmax(scores, dim=-1).to(q.dtype) @ vc[:, :, :self.span]  # (n, nkv, group, hd)
        return y.view(n, nh, 1, hd)


class KVCache:
    """Preallocated keys/values for all layers: (layers, rows, kv_heads, max_len, head_dim).

    Row r holds its sequence from column 0; lengths[r] = tokens stored. Only the first `rows` rows
    are live: finished rows are dropped by moving live rows into their places (`drop`).
    """

    def __init__(self, cfg: ModelConfig, rows, max_len, dtype, device):
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, max_len, cfg.head_dim)
        # zeros, not empty: masked-out columns still enter attention as 0 * value, and uninitialised
        # memory can hold NaN/inf bit patterns (0 * NaN = NaN), which made greedy outputs nondeterministic
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows, self.max_len = rows, max_len

    def store_prefill(self, layer, k, v, bounds, cache_rows):
        # k, v: (nkv, N, hd) for the packed prompts; sequence i goes to every row in cache_rows[i]
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            self.k[layer, cache_rows[i], :, : b - a] = k[:, a:b]
            self.v[layer, cache_rows[i], :, : b - a] = v[:, a:b]

    def drop(self, done, num_done=None, span=None):
        """Remove finished rows (done: bool per live row; num_done = their count and span a bound on the live
        lengths, when the caller knows them). The last live rows move into the holes, so a step copies only as
        many rows as finished. Returns each remaining row's previous index."""
        m = self.rows
        kept = m - (int(done.sum()) if num_done is None else num_done)
        order = torch.arange(kept, device=done.device)
        holes = done[:kept].nonzero().squeeze(-1)
        if holes.numel():
            movers = (~done[kept:]).nonzero().squeeze(-1) + kept
            span = span or int(self.lengths[movers].max())
            self.k[:, holes, :, :span] = self.k[:, movers, :, :span]
            self.v[:, holes, :, :span] = self.v[:, movers, :, :span]
            self.lengths[holes] = self.lengths[movers]
            order[holes] = movers
        self.rows = kept
        return order


@dataclass
class Generation:
    prompt_index: int     # which prompt this sample answers
    tokens: list          # new token ids, including the stop token when finished
    logprobs: list        # log-prob of each new token under softmax(logits / temperature) (T=1 when greedy)
    finished: bool        # True when it ended with a stop token, False when it hit max_new_tokens
    switched: list | None = None  # cross-sampling: per token, True where it was drawn from the partner's distribution
    differs: list | None = None   # cross-sampling: per token, True where switched and the model's own distribution
    #                               would have given another token with the same random number


def sampling_probs(logits, temperature, top_p):
    """The distribution sample_next draws from, for fp32 logits (rows, V) and temperature > 0: (log-probs of
    softmax(logits / T), its probabilities with everything outside the top-p nucleus set to 0, not renormalised)."""
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return logp, probs


def nucleus(logits, temperature, top_p):
    """softmax(logits / T) truncated to its top-p nucleus and renormalised: what a row is sampled from."""
    probs = sampling_probs(logits, temperature, top_p)[1]
    return probs / probs.sum(-1, keepdim=True)


def draw(probs, u):
    """Inverse CDF: for each row the first token whose cumulative mass exceeds u (in [0, 1)) times the row's mass;
    that token has non-zero probability."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def sample_next(logits, temperature, top_p, generator):
    """Pick next tokens from fp32 logits (rows, V); returns (tokens, their log-probs)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp, probs = sampling_probs(logits, temperature, top_p)
    # one uniform number per row (far cheaper than torch.multinomial on CPU, no host sync on GPU)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    tok = draw(probs, u)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def cross_next(logits, partner_logits, temperature, top_p, generator, switch):
    """Cross-sampling's pick: each row draws from its model's distribution, or, where switch(p, q) (p, q: the two
    renormalised nuclei) is True, from the partner's. Both draws use the row's one uniform number, as sample_next
    does, so a row that never switches gets exactly sample_next's tokens. Returns (tokens, their log-probs under
    the distribution each came from, switched, differs: switched and the own draw would have been another token)."""
    if temperature == 0:
        raise ValueError("cross-sampling needs temperature > 0")
    logp, probs = sampling_probs(logits, temperature, top_p)
    logq, partner_probs = sampling_probs(partner_logits, temperature, top_p)
    switched = switch(probs / probs.sum(-1, keepdim=True), partner_probs / partner_probs.sum(-1, keepdim=True))
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    own, other = draw(probs, u), draw(partner_probs, u)
    tok = torch.where(switched, other, own)
    lp = torch.where(switched, logq.gather(-1, tok[:, None]).squeeze(-1), logp.gather(-1, tok[:, None]).squeeze(-1))
    return tok, lp, switched, switched & (other != own)


def prefill(model, prompts, n, cache):
    """Run the prompts packed in one row, storing each one's keys/values in its n cache rows; returns the fp32
    logits of every row's first new token (rows, V)."""
    device = model.lm_head.weight.device
    ids, cu = pack(prompts, device)
    cache_rows = [torch.arange(i * n, (i + 1) * n, device=device) for i in range(len(prompts))]
    hidden = model.forward(ids, cu_seqlens=cu, ctx=Packed(cu, cache, cache_rows))
    last = hidden[0, cu[1:] - 1]  # (P, hidden)
    cache.lengths[:] = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(n)
    return model.lm_head(last).float().repeat_interleave(n, 0)


def decode_step(model, tok, cache, span=None):
    """Feed one token per live cache row; returns the fp32 logits of the next one (rows, V). span: a bound on the
    columns any row can see (see Decode)."""
    hidden = model.forward(tok[:, None], positions=cache.lengths[: cache.rows, None], ctx=Decode(cache, span))
    cache.lengths[: cache.rows] += 1
    return model.lm_head(hidden[:, -1]).float()


@torch.no_grad()
def generate(model, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, stop_ids=(), seed=0,
             max_seq_len=None, cache_dtype=None, partner=None, switch=None):
    """Sample n responses for each prompt (lists of token ids, any lengths) in one batch.

    Each prompt is prefilled once (packed, no padding) and its keys/values copied into its n cache rows.
    Then one token per live row per step; a row that emits a stop id is finished and removed from the
    batch, so it costs nothing further. temperature=0 is greedy. Returns a list of Generation, prompt-major
    (all samples of prompt 0, then prompt 1, ...).

    Cross-sampling (token_shift.py): partner, a second model of the same vocabulary, decodes in lock-step with
    its own KV cache and is fed the same tokens; switch(p, q, rows, step) -> bool per live row chooses the rows
    that draw their next token from the partner's distribution q instead of the model's p (cross_next). Each
    Generation then also holds `switched` and `differs` per token. A switch that is never True gives exactly
    the model's own samples of the same seed, one that is always True the partner's.
    """
    if is_sharded(model):  # FSDP's forward would all-gather every block at every decode step
        raise ValueError("generate() needs full weights: pass full_copy(model, dtype), not the sharded model")
    models = [model] if partner is None else [model, partner]
    device = model.lm_head.weight.device
    if partner is not None and (switch is None or temperature == 0 or is_sharded(partner)
                                or partner.config.vocab_size != model.config.vocab_size
                                or partner.lm_head.weight.device != device):
        raise ValueError("cross-sampling needs a switch, temperature > 0 and an unsharded partner of the same "
                         "vocabulary on the same device")
    max_seq_len = max_seq_len or min(m.config.max_position_embeddings for m in models)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) + max_new_tokens > max_seq_len:
            raise UserError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
                            f"{len(p) + max_new_tokens} > the model's {max_seq_len}-token context")
    rows = len(prompts) * n
    longest = max(map(len, prompts))
    caches = [KVCache(m.config, rows, longest + max_new_tokens, cache_dtype or m.lm_head.weight.dtype, device)
              for m in models]
    gen = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    # prefill: all prompts packed in one row; sample n first tokens from each prompt's last position
    logits = [prefill(m, prompts, n, c) for m, c in zip(models, caches)]

    out_tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    out_switched = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    out_differs = torch.zeros(rows, max_new_tokens, dtype=torch.bool, device=device)
    out_len = torch.zeros(rows, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    live = torch.arange(rows, device=device)  # original row index of each live cache row
    for step in range(max_new_tokens):
        if partner is None:
            tok, lp = sample_next(logits[0], temperature, top_p, gen)
        else:
            tok, lp, switched, differs = cross_next(logits[0], logits[1], temperature, top_p, gen,
                                                    lambda p, q: switch(p, q, live, step))
            out_switched[live, step], out_differs[live, step] = switched, differs
        out_tokens[live, step] = tok
        out_logprobs[live, step] = lp
        out_len[live] = step + 1
        done = torch.isin(tok, stop)
        finished[live] = done
        if step == max_new_tokens - 1:
            break
        span = longest + step + 1  # every live row holds its prompt + `step` tokens: a bound known on the host
        num_done = int(done.sum())  # the step's host sync (drop's two nonzero() add two more where rows finish)
        if num_done:  # drop finished rows from the batch (and their cache rows, in every cache alike)
            order = [c.drop(done, num_done, span) for c in caches][0]
            if order.numel() == 0:
                break
            live, tok = live[order], tok[order]
        logits = [decode_step(m, tok, c, span) for m, c in zip(models, caches)]

    out_tokens, out_logprobs, out_switched, out_differs, out_len, finished = (
        t.cpu() for t in (out_tokens, out_logprobs, out_switched, out_differs, out_len, finished))
    cross = partner is not None
    return [Generation(r // n, out_tokens[r, :out_len[r]].tolist(), out_logprobs[r, :out_len[r]].tolist(),
                       bool(finished[r]), out_switched[r, :out_len[r]].tolist() if cross else None,
                       out_differs[r, :out_len[r]].tolist() if cross else None) for r in range(rows)]


# -----------------------------------------------------------------------------
# generation over task records (sampling, evaluation, RL rollouts and validation share this)


def sample_responses(model, tokenizer, task, records, n=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                     seed=0, template="auto", batch_size=64, desc="generate", progress=True, partner=None, switch=None,
                     timings=None):
    """Generate n responses for each record with our KV-cache engine and score them with task.score.

    Prompts are sorted by length and generated `batch_size` prompts (x n rows) at a time. Returns one
    dict per (record, sample), in record order then sample order:
    {"id", "prompt", "response", "tokens", "logprobs", "finished", "length", "reward", "sample"}.
    partner, switch: cross-sampling with a second model (engine.generate); each dict then also holds
    "switched" and "differs", one bool per token. timings: a dict whose "score_s" gains the seconds spent scoring.
    """
    stop = stop_token_ids(tokenizer)
    prompts = [task.render_prompt(r, tokenizer, template) for r in records]
    prompt_ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(records)), key=lambda i: len(prompt_ids[i]))
    results = [None] * len(records)
    bar = tqdm(total=len(records) * n, desc=desc, disable=not progress or rank() != 0, dynamic_ncols=True)
    for b, start in enumerate(range(0, len(order), batch_size)):
        chunk = order[start:start + batch_size]
        gens = generate(model, [prompt_ids[i] for i in chunk], n=n, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, stop_ids=stop, seed=derive_seed(seed, b),
                        partner=partner, switch=switch)
        for g_idx, g in enumerate(gens):
            i = chunk[g.prompt_index]
            text = tokenizer.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special_tokens=False)
            t_score = time.time()
            reward = task.score(text, records[i], g.finished)
            if timings is not None:
                timings["score_s"] = timings.get("score_s", 0.0) + time.time() - t_score
            results[i] = results[i] or []
            results[i].append({"id": records[i]["id"], "prompt": prompts[i], "response": text, "tokens": g.tokens,
                               "logprobs": g.logprobs, "finished": g.finished, "length": len(g.tokens),
                               "reward": reward, "sample": g_idx % n,
                               **({"switched": g.switched, "differs": g.differs} if partner is not None else {})})
        bar.update(len(gens))
    bar.close()
    return [s for per_record in results for s in per_record]
