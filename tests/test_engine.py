"""engine.py: batched generation with the KV cache against transformers (greedy, a ragged batch, stop ids), its
tokens and log-probs against the training forward, seeded sampling with top-p, samples that do not depend on the
slots, buckets or look interval (refill and compaction), a decode step with no host sync whose buffers never move,
the uniform numbers and sample_next's tempered and nucleus distribution, a prompt longer than the cache, and the
decode step's attention rule (flash or written out) with the KV cache's dtype. (Cross-sampling with a partner:
test_token_shift.py.)"""
import types
import weakref
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import engine
from engine import GPU_BUCKETS, decode_flash, generate, keyed_uniforms, sample_keys, sample_next
from model import ModelConfig, build_model, pack, response_positions, save_model, tiny_config
import padded
from test_model import CONFIGS, VOCAB, cuda_autocast, random_model
from test_model import pretend_gpu  # noqa: F401  (a fixture: the model's attention as if on a GPU with flash-attn)


def test_greedy_generation_matches_transformers_ragged_batch(tmp_path):
    cfg = CONFIGS["qwen2_tied"]
    model = random_model(cfg, seed=6)
    save_model(model, str(tmp_path / "ck"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ck"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (4, 11, 7, 2, 15)]
    max_new = 24
    # pick stop ids the model actually emits, so some rows end early and some hit the length limit
    free_run = generate(model, prompts, max_new_tokens=max_new, temperature=0)
    runs = [set(g.tokens) for g in free_run]
    candidates = [t for g in free_run for t in g.tokens[2:]]
    stop = next([a, b] for a in candidates for b in candidates
                if a != b and any(a not in r and b not in r for r in runs))
    ours = generate(model, prompts, max_new_tokens=max_new, temperature=0, stop_ids=stop)
    finished = [g.finished for g in ours]
    assert any(finished) and not all(finished)
    for i, p in enumerate(prompts):
        ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        ref = ref[0, len(p):].tolist()
        assert ours[i].tokens == ref, i
        assert ours[i].finished == (ref[-1] in stop)
        assert ours[i].finished or len(ours[i].tokens) == max_new


def ragged_prompts(seed=0, lengths=(4, 11, 7, 2, 15, 9)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_decode_equals_the_training_forward(arch):
    """Greedy tokens are the training forward's argmax at every position, and sampled or greedy log-probs equal its
    log-probs (fp32, <= 1e-6), on a ragged batch where rows stop at different steps."""
    model = build_model(CONFIGS[arch], 7, std=0.05)
    prompts = ragged_prompts()
    for temperature in (0, 1.0):
        free = generate(model, prompts, n=2, max_new_tokens=20, temperature=temperature, seed=3)
        stop = [free[0].tokens[3], free[-1].tokens[5]]  # ids the model emits: rows stop at different steps
        gens = generate(model, prompts, n=2, max_new_tokens=20, temperature=temperature, stop_ids=stop, seed=3)
        assert len({len(g.tokens) for g in gens}) > 1  # rows of different lengths
        full = [prompts[g.prompt_index] + g.tokens for g in gens]
        ids, cu = pack(full)
        pos = response_positions(cu, [len(prompts[g.prompt_index]) for g in gens], [len(g.tokens) for g in gens])
        with torch.no_grad():
            logits = model.lm_head(model(ids, cu_seqlens=cu)[0, pos]).float()
        targets = ids[0, pos + 1]
        lp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, targets[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor([x for g in gens for x in g.logprobs]), lp, atol=1e-6, rtol=1e-6)
        if temperature == 0:
            assert torch.equal(logits.argmax(-1), targets)


def test_samples_do_not_depend_on_slots_buckets_or_look_interval():
    """A row's tokens depend only on (seed, row, position): streaming 18 rows through 1 or 8 slots (refill), with
    other row buckets (compaction), looks every few steps, rounded column bounds and other attention groups, gives
    the same samples. In fp64:
    in fp32 the logits' rounding follows the matmul's batch shape (~1e-6), which can move a token that sits on the
    nucleus's edge or a CDF boundary; the random numbers and the bookkeeping are what this checks."""
    model = random_model(CONFIGS["qwen2_tied"], seed=4).double()
    prompts = ragged_prompts(1)
    kw = dict(n=3, max_new_tokens=24, temperature=1.0, top_p=0.9, stop_ids=[3, 4, 5], seed=5)
    ref = generate(model, prompts, **kw)
    assert any(g.finished for g in ref) and not all(g.finished for g in ref)
    assert len({len(g.tokens) for g in ref}) > 3
    for setting in (dict(slots=1), dict(slots=8), dict(slots=256), dict(slots=5, sync_every=2),
                    dict(slots=8, buckets=(2, 4, 8), sync_every=3, block=16),
                    dict(buckets=GPU_BUCKETS, sync_every=16, block=256), dict(attention_groups=1),
                    dict(slots=7, attention_groups=3)):
        out = generate(model, prompts, **kw, **setting)
        assert [g.tokens for g in out] == [g.tokens for g in ref], setting
        assert [g.finished for g in out] == [g.finished for g in ref], setting
        assert [g.prompt_index for g in out] == [g.prompt_index for g in ref]
        torch.testing.assert_close(torch.tensor([x for g in out for x in g.logprobs]),
                                   torch.tensor([x for g in ref for x in g.logprobs]), atol=1e-5, rtol=1e-5)


def test_prompt_numbers_give_a_prompts_samples_whatever_share_it_is_in():
    """A caller that shards its prompts over ranks (eval, sample_policy, token_shift) keys each prompt's rows by its
    index in the whole list: two strided shards, generated apart, give the samples of one call over all prompts (in
    fp64, as above). Without the numbers, a shard's prompt takes the keys of its place in the shard."""
    model = random_model(CONFIGS["qwen2_tied"], seed=4).double()
    prompts = ragged_prompts(1)
    kw = dict(n=3, max_new_tokens=16, temperature=1.0, stop_ids=[3, 4, 5], seed=5)
    whole = [g.tokens for g in generate(model, prompts, **kw)]
    for rank in (0, 1):
        numbers = list(range(rank, len(prompts), 2))
        share = generate(model, [prompts[i] for i in numbers], prompt_numbers=numbers, **kw)
        assert [g.tokens for g in share] == [whole[i * 3 + j] for i in numbers for j in range(3)]
    plain = generate(model, prompts[1::2], **kw)
    assert [g.tokens for g in plain] != [whole[i * 3 + j] for i in range(1, len(prompts), 2) for j in range(3)]
    with pytest.raises(ValueError, match="prompt_numbers: one distinct integer >= 0 per prompt"):
        generate(model, prompts, prompt_numbers=[0], **kw)


def fa2_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k):
    """A CPU stand-in for engine.flash_varlen_forward (aten's FA2 varlen kernel with seqused_k), reading what it reads:
    sequence b's keys from token cu_k[b], seqused_k[b] of them, out of (tokens, kv_heads, hd) inputs. Returns (out,
    lse (heads, total_q)) as the kernel does: a sequence with no keys gets out 0 and lse +inf (FA2's mark)."""
    assert cu_q.dtype == cu_k.dtype == seqused_k.dtype == torch.int32 and k.stride(-1) == 1 and q.stride(-1) == 1
    assert len(cu_k) == len(cu_q) == len(seqused_k) + 1
    groups = q.shape[1] // k.shape[1]
    # (lse in fp32 as FA2 gives it, or in fp64 for fp64 inputs, which FA2 never takes and the tests compare closely)
    lse = torch.full(q.shape[:2][::-1], float("inf"), dtype=torch.promote_types(q.dtype, torch.float32))
    out = torch.zeros_like(q)
    for b in range(len(cu_q) - 1):
        start, n, qa, qb = int(cu_k[b]), int(seqused_k[b]), int(cu_q[b]), int(cu_q[b + 1])
        assert qb - qa <= max_q and 0 <= n <= max_k and start + n <= k.shape[0]
        if n == 0:
            continue
        kb, vb = (t[start:start + n].transpose(0, 1).repeat_interleave(groups, 0) for t in (k, v))  # (heads, n, hd)
        scores = q[qa:qb].transpose(0, 1) @ kb.transpose(1, 2) * q.shape[-1] ** -0.5  # (heads, queries, n)
        out[qa:qb] = (torch.softmax(scores, -1) @ vb).transpose(0, 1)
        lse[:, qa:qb] = torch.logsumexp(scores, -1)
    return out, lse


def test_fa2_stand_in_returns_what_the_real_op_declares(monkeypatch):
    """The stand-in's (out, lse) have the shapes, dtypes and layout torch's FA2 op declares for fa2_decode's calls
    (its meta kernel runs without a GPU), split or not: lse (heads, sequences) in fp32, which merge_splits reads."""
    rows, nh, nkv, cols, hd = 5, 12, 2, 64, 128
    q = torch.randn(rows, nh, hd, dtype=torch.bfloat16)
    cache = torch.randn(2, rows, nkv, cols, hd, dtype=torch.bfloat16)
    for splits in (1, 3, 8):
        layout = engine.fa2_layout(torch.tensor([1, 5, 64, 30, 2], dtype=torch.int32), nkv, cols, cols, splits)
        on_meta = types.SimpleNamespace(**{k: v.to("meta") if torch.is_tensor(v) else v
                                           for k, v in vars(layout).items()})
        got = {}
        for name, kernel, lay, inputs in (("real", real_fa2_on_meta, on_meta, [t.to("meta") for t in (q, *cache)]),
                                          ("stand-in", fa2_stand_in, layout, [q, *cache])):
            calls = []
            monkeypatch.setattr(engine, "flash_varlen_forward", lambda *a: calls.append(kernel(*a)) or calls[-1])
            y = engine.fa2_decode(*inputs, lay)
            (out, lse), = calls
            got[name] = [(tuple(t.shape), t.dtype, t.stride()) for t in (out, lse, y)]
        assert got["real"] == got["stand-in"], splits
        assert got["real"][1] == ((nh, rows * splits), torch.float32, (rows * splits, 1))


def real_fa2_on_meta(q, k, v, cu_q, cu_k, max_q, max_k, seqused_k):
    """engine.flash_varlen_forward's op on meta tensors: shapes only."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, False, False,
                                                   seqused_k=seqused_k)[:2]


def record_fa2_layouts(monkeypatch):
    """engine.fa2_layout, recording each layout's (splits, whether a part of some row has no keys) in the list
    returned."""
    seen, layout = [], engine.fa2_layout

    def recording(*args, **kwargs):
        got = layout(*args, **kwargs)
        seen.append((got.splits, bool((got.used == 0).any())))
        return got
    monkeypatch.setattr(engine, "fa2_layout", recording)
    return seen


def test_fa2_decode_attention_gives_the_sdpa_samples(monkeypatch):
    """generate(fa2_decode_attention=True): each row's attention reads its own columns of the cache through FA2's
    per-row lengths (engine.fa2_decode's view of the cache) instead of its group's span under a mask. Through a CPU
    stand-in for the kernel, in fp64 (see above), with refill, compaction, groups and graphs' buckets: the same
    samples and log-probs as the SDPA path (a refilled slot's earlier row leaves columns that must not be read)."""
    monkeypatch.setattr(engine, "flash_varlen_forward", fa2_stand_in)
    model = random_model(CONFIGS["qwen3"], seed=6).double()
    prompts = ragged_prompts(2)
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, top_p=0.9, stop_ids=[3, 4, 5], seed=7)
    ref = generate(model, prompts, **kw)
    assert any(g.finished for g in ref) and not all(g.finished for g in ref)
    seen = record_fa2_layouts(monkeypatch)
    for setting in (dict(), dict(slots=5, sync_every=2), dict(buckets=GPU_BUCKETS, sync_every=16, block=256),
                    dict(slots=7, attention_groups=3), dict(fa2_splits=4), dict(slots=5, fa2_splits="auto"),
                    dict(slots=5, fa2_splits=32)):
        seen.clear()
        out = generate(model, prompts, **kw, **setting, fa2_decode_attention=True)
        assert [g.tokens for g in out] == [g.tokens for g in ref], setting
        torch.testing.assert_close(torch.tensor([x for g in out for x in g.logprobs]),
                                   torch.tensor([x for g in ref for x in g.logprobs]), atol=1e-9, rtol=1e-9)
        # the parts each row's keys were cut into ("auto" on this 1-"multiprocessor" CPU, short spans: 1), some of
        # them empty (past a shorter row's end; 32 parts: more parts than some spans have columns)
        assert {splits for splits, _ in seen} == {setting.get("fa2_splits", 1) if setting.get("fa2_splits") != "auto"
                                                  else 1}, setting
        assert any(empty for _, empty in seen) == (setting.get("fa2_splits") in (4, 32)), setting
    # the long prompt's 3 rows finish first and stay in the 16-row bucket (9 live rows fit no smaller one), longer
    # than the span the live rows need: the kernel is still asked for no more than its max_k columns (the stand-in
    # checks), and the live rows' samples are the SDPA path's
    prompts = ragged_prompts(3, lengths=(30, 3, 4, 3))
    kw = dict(n=3, max_new_tokens=20, temperature=1.0, stop_ids=[3], seed=8, buckets=GPU_BUCKETS, sync_every=3,
              block=1, forced_lengths=[2, 2, 2] + [20] * 9)
    ref = generate(model, prompts, **kw)
    out = generate(model, prompts, **kw, fa2_decode_attention=True)
    assert [len(g.tokens) for g in out] == [2, 2, 2] + [20] * 9 and [g.tokens for g in out] == [g.tokens for g in ref]


def test_fa2_split_count_fills_the_gpu_where_rows_are_few():
    """fa2_splits="auto": about 8 thread blocks per multiprocessor, each part of a row's keys at least 256 columns,
    at most FA2's 128 parts; never below 1. (An H200 has 132 multiprocessors; Qwen2.5-1.5B 2 kv heads.)"""
    count = engine.fa2_split_count
    assert count(128, 2, 4096, 132) == 5 and count(128, 2, 512, 132) == 2  # the RL rollouts' 16 prompts x 8
    assert count(1024, 2, 4096, 132) == 1  # 2,048 blocks fill it already
    assert count(16, 2, 4096, 132) == 16 and count(1, 2, 10**6, 132) == engine.FA2_MAX_SPLITS  # a long tail
    assert count(1, 2, 100, 132) == 1  # under 256 columns: one part


def test_fa2_splits_keep_one_call_within_a_cuda_grid(monkeypatch):
    """rows x parts sequences make one FA2 launch's grid rows, at most 65,535: a fa2_splits that would pass that at
    a large bucket is cut down there (here with the limit lowered to 12: 5 rows, 32 parts asked, 2 given), with the
    same samples."""
    monkeypatch.setattr(engine, "flash_varlen_forward", fa2_stand_in)
    monkeypatch.setattr(engine, "FA2_MAX_SEQUENCES", 12)
    seen = record_fa2_layouts(monkeypatch)
    model = random_model(CONFIGS["qwen3"], seed=6).double()
    kw = dict(n=5, max_new_tokens=6, temperature=1.0, seed=7, slots=5, buckets=None)
    out = generate(model, [[1, 2, 3]], **kw, fa2_decode_attention=True, fa2_splits=32)
    assert {splits for splits, _ in seen} == {2}
    assert [g.tokens for g in out] == [g.tokens for g in generate(model, [[1, 2, 3]], **kw)]


def test_fa2_splits_are_checked():
    model = random_model(CONFIGS["qwen2_tied"], seed=1)
    for bad in (dict(fa2_splits=4), dict(fa2_splits=0, fa2_decode_attention=True),
                dict(fa2_splits=True, fa2_decode_attention=True), dict(fa2_splits="many", fa2_decode_attention=True)):
        with pytest.raises(ValueError, match="fa2_splits needs fa2_decode_attention"):
            generate(model, ragged_prompts(2), n=2, max_new_tokens=3, **bad)


def test_fa2_decode_attention_on_cpu_says_it_needs_cuda():
    with pytest.raises(ValueError, match="FA2's CUDA kernel"):
        generate(random_model(CONFIGS["qwen2_tied"], seed=1), ragged_prompts(2), n=2, max_new_tokens=3,
                 fa2_decode_attention=True)
    # its default (None) takes it only where it runs: never on a CPU, whatever the dtype
    assert not any(engine.fa2_runs(torch.device("cpu"), [d]) for d in (torch.bfloat16, torch.float16, torch.float32))


@contextmanager
def no_host_sync():
    """Every way a tensor's value reaches the host raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the decode step")
    names = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")
    with mock.patch.multiple(torch.Tensor, **{name: refuse for name in names}), \
            mock.patch.object(torch, "nonzero", refuse):
        yield


def test_decode_step_never_syncs_and_its_buffers_never_move(monkeypatch):
    """The decode step runs with every host sync made to raise (sampling with top-p, greedy, forced stops), and every
    buffer it reads or writes keeps its address across steps and across calls (what CUDA graphs need)."""
    step, seen = engine.decode_step, []

    def guarded(weights, slots, *args, **kwargs):
        buffers = list(slots.caches) + [
            slots.sample, slots.lengths, slots.tok, slots.pos, slots.alive, slots.stopped, slots.out_tok, slots.out_lp,
            slots.seed, slots.stop, slots.key] + [t for gw in weights for t in (*gw.w.values(), gw.rope)]
        seen.append([t.data_ptr() for t in buffers])
        with no_host_sync():
            return step(weights, slots, *args, **kwargs)
    monkeypatch.setattr(engine, "decode_step", guarded)
    engine.release()
    model = random_model(CONFIGS["qwen2_tied"], seed=4)
    prompts = ragged_prompts(2)
    generate(model, prompts, n=3, max_new_tokens=16, temperature=1.0, top_p=0.8, stop_ids=[3, 4], seed=1, slots=8)
    calls = len(seen)
    other = random_model(CONFIGS["qwen2_tied"], seed=5)  # the next policy: same shapes, new weights
    generate(other, prompts[:3], n=2, max_new_tokens=12, temperature=0, stop_ids=[3], slots=4)
    generate(other, prompts, n=2, max_new_tokens=10, stop_ids=[3], forced_lengths=[5] * 12, slots=8)
    for temperature in (1.0, 0):
        generate(other, prompts, n=2, max_new_tokens=10, temperature=temperature, stop_ids=[3], slots=8,
                 blocked_sampler=True)
    assert calls > 10 and len(seen) > calls + 10
    assert all(ptrs == seen[0] for ptrs in seen)


def test_decode_step_attention_never_on_cudnn(monkeypatch):
    """The decode step's SDPA runs with cuDNN attention switched off (on sm90 it would build a plan per shape)."""
    sdpa, cudnn_on = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)
    step = engine.decode_step

    def decode_step(*args, **kwargs):
        with mock.patch.object(engine.F, "scaled_dot_product_attention", spy):
            return step(*args, **kwargs)
    monkeypatch.setattr(engine, "decode_step", decode_step)
    generate(random_model(CONFIGS["qwen2_tied"], seed=4), ragged_prompts(2), n=2, max_new_tokens=6)
    assert cudnn_on and not any(cudnn_on)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # switched off for the step only


def test_reserved_buffers_change_no_sample():
    """generate(reserve=(slots, columns, new tokens)) allocates the kept buffers at least that large (train_rl sizes
    them once for its run) and changes no token or log-prob."""
    model, prompts = random_model(CONFIGS["qwen2_tied"], seed=4), ragged_prompts(2)
    engine.release()
    plain = generate(model, prompts, n=2, max_new_tokens=12, temperature=1.0, stop_ids=[3], seed=2, slots=4)
    engine.release()
    reserved = generate(model, prompts, n=2, max_new_tokens=12, temperature=1.0, stop_ids=[3], seed=2, slots=4,
                        reserve=(24, 200, 40))
    slots = engine._kept["slots"]
    assert (slots.count, slots.max_len, slots.width) == (24, 200, 41)
    assert [(g.tokens, g.logprobs) for g in reserved] == [(g.tokens, g.logprobs) for g in plain]
    engine.release()


def test_kept_buffers_are_freed_before_new_ones_are_allocated(monkeypatch):
    """A call that needs a bigger KV cache or another weight copy frees the kept one first: the peak is never both."""
    engine.release()
    generate(random_model(CONFIGS["qwen2_tied"], seed=4), ragged_prompts(2), n=2, max_new_tokens=8)
    old = {engine.Slots: weakref.ref(engine._kept["slots"]), engine.GenWeights: weakref.ref(engine._kept["weights0"])}
    alive = []
    for cls, ref in old.items():
        def spy(self, *args, _init=cls.__init__, _ref=ref, **kwargs):
            alive.append(_ref() is not None)
            _init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", spy)
    generate(random_model(CONFIGS["qwen3"], seed=4), ragged_prompts(2), n=4, max_new_tokens=16)
    assert alive == [False, False]


@pytest.mark.parametrize("refusal", [
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 890880000000 bytes"),
    MemoryError()])
def test_a_kv_cache_that_does_not_fit_is_one_line_naming_its_size(monkeypatch, refusal):
    """The KV cache is rows x columns, allocated at once: eval's --samples_per_prompt 1000000 ended in the allocator's
    traceback (a GPU: torch.OutOfMemoryError). It is a UserError naming the rows, the columns and the GiB; any other
    error passes as it is."""
    model, prompts = random_model(CONFIGS["qwen2_tied"], seed=4), ragged_prompts(2)
    engine.release()
    asked = []

    def refuse(self, cfgs, count, max_len, *args):
        asked.append((count, max_len))
        raise refusal
    monkeypatch.setattr(engine.Slots, "__init__", refuse)
    with pytest.raises(common.UserError) as e:
        generate(model, prompts, n=3, max_new_tokens=12)
    (rows, columns), cfg = asked[0], model.config
    gib = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * rows * columns / 2**30  # (fp32)
    assert rows >= 6 and columns >= max(map(len, prompts)) + 12
    assert str(e.value) == (f"the KV cache of {rows} rows x {columns} tokens ({gib:.1f} GiB) does not fit in cpu "
                            f"memory: generate fewer rows at once (the stage's batch size x samples per prompt) or "
                            f"fewer tokens")
    monkeypatch.setattr(engine.Slots, "__init__", lambda *a, **k: (_ for _ in ()).throw(ValueError("other")))
    with pytest.raises(ValueError, match="other"):
        generate(model, prompts, n=3, max_new_tokens=12)
    engine.release()


def test_kept_slots_for_fewer_new_tokens_are_not_reused_for_more():
    """Kept Slots hold max_new_tokens + 1 output columns (the spare one that rows past their end write into): slots
    kept from a max_new_tokens=8 call must not serve a max_new_tokens=9 call (shorter prompts, so the columns and
    slots would fit), which would lose the spare column. Its samples equal the same call on fresh buffers."""
    model = random_model(CONFIGS["qwen2_tied"], seed=4).double()  # fp64: as in the samples test above

    def call():
        return generate(model, ragged_prompts(1, lengths=(6, 5)), n=4, max_new_tokens=9, temperature=1.0, seed=5,
                        sync_every=3)
    engine.release()
    fresh = call()
    engine.release()
    generate(model, ragged_prompts(1, lengths=(12,)), n=8, max_new_tokens=8, seed=1)
    reused = call()
    assert [(g.tokens, g.logprobs) for g in reused] == [(g.tokens, g.logprobs) for g in fresh]
    assert engine._kept["slots"].width > 9  # 9 new tokens and the spare column
    engine.release()


def dtype_calls(model):
    """generate(model, dtype) -> its (tokens, log-probs), on the kept buffers or (fresh=True) on new ones."""
    def call(dtype=None, fresh=False):
        if fresh:
            engine.release()
        out = generate(model, ragged_prompts(1), n=2, max_new_tokens=8, temperature=1.0, seed=5, dtype=dtype)
        return [(g.tokens, g.logprobs) for g in out]
    return call


def test_kept_weights_follow_the_dtype():
    """generate(dtype=...) decodes on a copy of the weights in that dtype: the fp64 copy kept by an fp64 call must not
    serve the next call in the default dtype (the model's fp32), whose samples and log-probs must be the fp32 ones."""
    call = dtype_calls(random_model(CONFIGS["qwen2_tied"], seed=4))
    fresh = call(fresh=True)
    call(torch.float64, fresh=True)
    assert call() == fresh
    assert engine._kept["weights0"].dtype == torch.float32
    engine.release()


def test_kept_kv_cache_follows_the_dtype():
    """The KV cache is in the weights' dtype: the fp32 cache kept by an fp32 call must not serve an fp64 call (its
    keys and values would be rounded to fp32); that call's samples and log-probs equal a fresh fp64 call's."""
    call = dtype_calls(random_model(CONFIGS["qwen2_tied"], seed=4))
    fresh = call(torch.float64, fresh=True)
    call(fresh=True)
    assert call(torch.float64) == fresh
    assert engine._kept["slots"].caches[0].dtype == torch.float64
    engine.release()


def test_alternating_calls_keep_one_slots_object():
    """Kept Slots that a call outgrows are regrown to cover both calls (slots, columns and new tokens), so calls that
    alternate between shapes (train_rl's rollouts and validation) reallocate once, not at every call: each
    reallocation also drops the CUDA graphs captured on the old buffers."""
    model = random_model(CONFIGS["qwen2_tied"], seed=4)
    engine.release()

    def few_rows_long():
        generate(model, ragged_prompts(2, lengths=(5,)), n=2, max_new_tokens=12, seed=1)

    def many_rows_short():
        generate(model, ragged_prompts(2, lengths=(5, 7, 3)), n=4, max_new_tokens=4, seed=1)
    few_rows_long()
    many_rows_short()  # more slots, fewer new tokens: regrown to cover both
    kept = engine._kept["slots"]
    for _ in range(2):
        few_rows_long()
        assert engine._kept["slots"] is kept
        many_rows_short()
        assert engine._kept["slots"] is kept
    engine.release()


def test_fused_ops_are_not_the_default_on_cpu():
    """Without fused=, the decode step runs the eager ops on CPU (the fused ones are slower there and compile for
    ~20 s); on CUDA without a partner it runs the fused ones (measured faster on an H200; no GPU here)."""
    generate(build_model(CONFIGS["qwen2_tied"], 3), ragged_prompts(2), n=2, max_new_tokens=4)
    assert engine._kept["slots"].ops is engine.EAGER_OPS


@pytest.mark.slow
def test_fused_ops_give_the_eager_samples():
    """generate(fused=True): residual add + RMSNorm, RoPE and SiLU * up compiled by torch.compile (Qwen3: q/k norms)
    give the eager path's tokens and log-probs (<= 1e-6), also with the blocked sampler compiled. Slow: the first
    compile takes ~10 s on a CPU."""
    model = build_model(CONFIGS["qwen3"], 7, std=0.05)
    kw = dict(n=2, max_new_tokens=20, temperature=1.0, seed=3)
    eager = generate(model, ragged_prompts(), **kw)
    for fused in (generate(model, ragged_prompts(), fused=True, **kw),
                  generate(model, ragged_prompts(), fused=True, blocked_sampler=True, **kw)):
        assert [g.tokens for g in fused] == [g.tokens for g in eager]
        torch.testing.assert_close(torch.tensor([x for g in fused for x in g.logprobs]),
                                   torch.tensor([x for g in eager for x in g.logprobs]), atol=1e-6, rtol=1e-6)


def uniforms(seed, samples, positions):
    return keyed_uniforms(sample_keys(torch.tensor(seed), samples), positions)


def test_uniforms_are_uniform_and_keyed():
    samples, positions = torch.arange(400).repeat_interleave(250), torch.arange(250).repeat(400)
    u = uniforms(7, samples, positions)[:, 0]
    assert u.min() >= 0 and u.max() < 1
    assert (torch.histc(u, 20, 0, 1) / len(u) - 0.05).abs().max() < 0.003  # 100K draws in 20 bins
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01  # neighbours independent
    assert not torch.equal(u, uniforms(8, samples, positions)[:, 0])
    assert torch.equal(uniforms(7, samples[5:9], positions[5:9])[:, 0], u[5:9])


def test_the_draw_that_hashes_to_zero_is_not_zero():
    """Seed 1, sample 0, position 36,888,428 hashes to 0 (one draw in 2**24): at u = 0 the inverse-CDF search drew
    the lowest-id token of non-zero probability, whatever its probability; it is taken at 2**-25, and its neighbours
    are unchanged."""
    positions = torch.tensor([36888427, 36888428, 36888429])
    u = uniforms(1, torch.zeros(3, dtype=torch.long), positions)[:, 0]
    assert u[1] == 2.0**-25 and bool((u[[0, 2]] > 2.0**-24).all())
    logits = torch.zeros(1, 50)
    logits[0, 0] = -90.0  # token 0: p ~ 1e-40, non-zero in fp32
    assert sample_next(logits, 1.0, 1.0, u[1:2, None])[0].item() == 1  # the first token of real mass
    assert sample_next(logits, 1.0, 1.0, torch.zeros(1, 1))[0].item() == 0  # (what u = 0 drew)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_generation_logprobs_equal_teacher_forced(temperature):
    model = build_model(CONFIGS["llama3_scaled"], 7, std=0.05)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16], [20]]
    gens = generate(model, prompts, n=3, max_new_tokens=16, temperature=temperature, stop_ids=[1, 2], seed=1)
    assert len(gens) == 9 and [g.prompt_index for g in gens] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with torch.no_grad():
        for g in gens:
            full = torch.tensor([prompts[g.prompt_index] + g.tokens])
            p = len(prompts[g.prompt_index])
            lp = model.token_logprobs(padded.forward(model, full)[:, p - 1:-1], full[:, p:], temperature=temperature)
            assert (lp[0] - torch.tensor(g.logprobs)).abs().max() <= 1e-4


def test_sampling_seeded_and_top_p():
    model = random_model(CONFIGS["qwen2_tied"], seed=8)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, seed=11)
    b = generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, seed=11)
    c = generate(model, prompts, n=4, max_new_tokens=12, temperature=1.0, seed=12)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert len({tuple(g.tokens) for g in a[:4]}) > 1  # the n samples of one prompt differ
    # top_p tiny => only the most likely token survives => same as greedy
    nucleus = generate(model, prompts, n=2, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    greedy = generate(model, prompts, n=1, max_new_tokens=12, temperature=0)
    assert nucleus[0].tokens == nucleus[1].tokens == greedy[0].tokens


def test_sample_next_follows_the_tempered_and_nucleus_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(100_000, 1)
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        tok, lp = sample_next(logits, temperature, 1.0, torch.rand(len(logits), 1, generator=g))
        want = torch.softmax(logits[0] / temperature, -1)
        assert (torch.bincount(tok, minlength=4) / len(tok) - want).abs().max() < 0.01
        assert torch.allclose(lp, want.log()[tok])
    # nucleus of mass >= 0.8: the two likeliest tokens, renormalised
    tok, _ = sample_next(logits, 1.0, 0.8, torch.rand(len(logits), 1, generator=g))
    p = torch.softmax(logits[0], -1)
    freq = torch.bincount(tok, minlength=4) / len(tok)
    assert freq[0] == 0 and freq[3] == 0
    assert abs(freq[2] - p[2] / (p[1] + p[2])) < 0.01
    # the smallest set whose mass reaches top_p: at an exact boundary the next token is out (two of four equal
    # tokens at 0.5; one of two), and top_p 0 keeps the most likely one
    for row, top_p, kept in (([0.0] * 4, 0.5, 2), ([0.0, 0.0], 0.5, 1), ([0.0, 1.0, 2.0], 0.0, 1)):
        probs = engine.sampling_probs(torch.tensor([row]), 1.0, top_p)[1]
        assert int((probs > 0).sum()) == kept
    assert int(engine.sampling_probs(torch.tensor([[0.0, 1.0, 2.0]]), 1.0, 0.0)[1].argmax()) == 2
    # tokens tied at the edge are taken in id order (the CPU's unstable sort kept any of them): in a large
    # vocabulary, ids 1000-1003 tied behind 1 and 2, a nucleus that takes one of the four takes id 1000
    row = torch.full((1, 151_936), -30.0)
    row[0, 1], row[0, 2], row[0, 1000:1004] = 2.0, 2.0, 1.0
    probs = engine.sampling_probs(row, 1.0, 0.6)[1]
    p = torch.softmax(row[0], -1)
    assert 2 * p[1] < 0.6 < 2 * p[1] + p[1000]  # (the edge falls inside the tied four)
    assert (probs[0] > 0).nonzero().flatten().tolist() == [1, 2, 1000]


def test_sample_blocked_draws_sample_next_tokens():
    """The blocked sampler (each block's mass, then the token inside the drawn block) is sample_next at top_p = 1: in
    fp64, where its other order of summing cannot move a token, the same tokens and log-probs for the same uniform
    numbers, 0 and the largest included; at temperatures 1, 0.7 and greedy; with blocks of 128, 32 and 1 (a prime
    vocabulary); with banned (-inf) tokens, whole blocks of them and a row with one token left."""
    g = torch.Generator().manual_seed(0)
    for vocab in (384, 96, 7):
        logits = torch.randn(300, vocab, generator=g, dtype=torch.float64) * 3
        logits[::3, :vocab // 2] = -float("inf")
        logits[1::5, 5] = -float("inf")
        logits[2, :] = -float("inf")
        logits[2, 4] = 0.0
        u = torch.rand(300, 1, generator=g, dtype=torch.float64)
        u[0], u[1] = 0.0, 1 - 2**-24
        for temperature in (1.0, 0.7, 0):
            draw = None if temperature == 0 else u
            want_tok, want_lp = sample_next(logits, temperature, 1.0, draw)
            tok, lp = engine.sample_blocked(logits, temperature, draw)
            assert torch.equal(tok, want_tok), (vocab, temperature)
            torch.testing.assert_close(lp, want_lp, atol=1e-12, rtol=1e-12)
            assert tok[2] == 4 and lp[2] == 0.0
    assert [engine.sampler_block(v) for v in (151936, 2048, 96, 7)] == [128, 1024, 32, 1]


def test_sample_blocked_never_draws_a_token_of_probability_0():
    """fp32 sums a block's mass (for the block's draw) and its running sum (for the token's) in different orders, so
    a uniform number just under a block's end can overshoot the block's own total: the draw must then end on the
    block's last token of non-zero probability, not on its last token. Here every block's last token is banned and
    each row's number sits one ulp under the top of a random block."""
    g = torch.Generator().manual_seed(0)
    rows, vocab, block = 4000, 1024, engine.sampler_block(1024)
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits.view(rows, -1, block)[:, :, -1] = -float("inf")
    ends = (logits - logits.amax(-1, keepdim=True)).exp().view(rows, -1, block).sum(-1).cumsum(-1)
    b = torch.randint(0, vocab // block, (rows, 1), generator=g)
    u = torch.nextafter(ends.gather(-1, b) / ends[:, -1:], torch.tensor(0.0))
    tok, lp = engine.sample_blocked(logits, 1.0, u)
    assert torch.isfinite(lp).all() and (tok % block != block - 1).all()
    assert (tok // block == b[:, 0]).float().mean() > 0.5  # the uniform numbers do sit at the blocks' tops


def test_blocked_sampler_gives_the_default_samples():
    """generate(blocked_sampler=True) draws what the default draws (fp32 logits, either sampler), through refill and
    compaction, greedy, and with top-p (where it leaves sampling to sample_next)."""
    model = random_model(CONFIGS["qwen3"], seed=6)
    prompts = ragged_prompts(2)
    for kw in (dict(temperature=1.0), dict(temperature=0.7, slots=5, sync_every=2), dict(temperature=0),
               dict(temperature=1.0, top_p=0.9, slots=7)):
        kw = dict(n=3, max_new_tokens=20, stop_ids=[3, 4, 5], seed=7, **kw)
        ref, out = generate(model, prompts, **kw), generate(model, prompts, **kw, blocked_sampler=True)
        assert [g.tokens for g in out] == [g.tokens for g in ref], kw
        torch.testing.assert_close(torch.tensor([x for g in out for x in g.logprobs]),
                                   torch.tensor([x for g in ref for x in g.logprobs]), atol=1e-6, rtol=1e-6)
    assert any(g.finished for g in ref) and not all(g.finished for g in ref)


@pytest.mark.parametrize("blocked_sampler", [False, True])
def test_forced_lengths_end_each_row_at_its_length(blocked_sampler):
    """A benchmark's forced stops: each row ends exactly at its length, on the stop id, drawn with log-prob 0 (the
    only token left), and never draws the stop id before (banned there, with finite log-probs elsewhere)."""
    model = random_model(CONFIGS["qwen2_tied"], seed=2)
    lengths = [1, 5, 9, 3, 9, 2]
    for temperature in (1.0, 0.0):
        out = generate(model, ragged_prompts(3, lengths=(4, 7, 2)), n=2, max_new_tokens=9, temperature=temperature,
                       stop_ids=[3], seed=4, forced_lengths=lengths, blocked_sampler=blocked_sampler)
        assert [len(g.tokens) for g in out] == lengths and all(g.finished for g in out)
        assert all(g.tokens[-1] == 3 and 3 not in g.tokens[:-1] and g.logprobs[-1] == 0.0 for g in out)
        assert all(-float("inf") < lp < 0 for g in out for lp in g.logprobs[:-1])


def test_error_prompt_longer_than_cache():
    model = random_model(tiny_config(VOCAB, max_position_embeddings=32))
    with pytest.raises(common.UserError, match="prompt 1 has 30 tokens.*32-token context"):
        generate(model, [[1, 2], [3] * 30], max_new_tokens=8)
    for max_seq_len in (64, 0):  # (64: an IndexError in RoPE; 0 was read as "no limit")
        with pytest.raises(ValueError, match=f"max_seq_len {max_seq_len} is not an integer in 1..32, the model's"):
            generate(model, [[1, 2], [3] * 30], max_new_tokens=8, max_seq_len=max_seq_len)
    # ids past the embedding (a tokenizer larger than the model's): an IndexError naming no prompt, a device-side
    # assert on a GPU, or, for a stop id, responses that never end
    for prompts, stop_ids, said in (([[1, 2], [3, VOCAB]], [3], f"prompt 1 holds token id {VOCAB}, outside"),
                                    ([[1, 2], torch.tensor([-1, 2])], [3], "prompt 1 holds token id -1, outside"),
                                    ([[1, 2]], [3, VOCAB + 3], "stop token ids .* are not all in the model's vocab")):
        with pytest.raises(common.UserError, match=said):
            generate(model, prompts, max_new_tokens=4, stop_ids=stop_ids)
    with pytest.raises(ValueError, match="dtype torch.bfloat16 asked of GenWeights in torch.float32"):  # (ignored)
        generate(engine.GenWeights(model, torch.float32), [[1, 2]], max_new_tokens=4, dtype=torch.bfloat16)
    for seed in (-1, 1.5):  # (-1 repeated seed 0's samples; 1.5 failed deep in seed32 with a TypeError)
        with pytest.raises(ValueError, match=f"seed must be an integer >= 0, got {seed}"):
            generate(model, [[1, 2]], max_new_tokens=4, seed=seed)
    for bad in (0, 2.0, 2.5, True):  # (2.5 ran as 2 once a call had left its buffers; 2.0 a TypeError in zeros())
        with pytest.raises(ValueError, match=f"max_new_tokens must be an integer >= 1, got {bad}"):
            generate(model, [[1, 2]], max_new_tokens=bad)
    with pytest.raises(common.UserError, match="it needs 32 > max_seq_len 31$"):  # (it said "the model's 31-token")
        generate(model, [[1] * 30], max_new_tokens=2, max_seq_len=31)
    with pytest.raises(ValueError, match="at most 8 stop ids"):
        generate(model, [[1, 2]], max_new_tokens=8, stop_ids=range(9))
    for stop_ids, lengths in (([], [4]), ([3, 5], [4]), ([3], [4, 4]), ([3], [0]), ([3], [9])):  # a benchmark's
        with pytest.raises(ValueError, match="forced_lengths needs one stop id"):  # forced lengths
            generate(model, [[1, 2]], max_new_tokens=8, stop_ids=stop_ids, forced_lengths=lengths)
    assert generate(model, [], max_new_tokens=8) == []
    with pytest.raises(ValueError, match="graphs=True needs CUDA"):
        generate(model, [[1, 2]], max_new_tokens=8, graphs=True)
    generate(model, [[1, 2]], n=2, max_new_tokens=4, slots=2)  # kept slots that a count of -1 would "fit"
    for bad in (dict(n=0), dict(n=-2), dict(slots=-1), dict(slots=0), dict(sync_every=-1), dict(block=0),
                dict(attention_groups=-1), dict(n=2.0), dict(n=True), dict(slots=2.0)):
        # (sync_every=-1 used to loop for ever; n=-2 gave [])
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer >= 1"):
            generate(model, [[1, 2]], max_new_tokens=4, **bad)
    for bad in (dict(temperature=-0.5), dict(top_p=1.5), dict(top_p=-0.1), dict(temperature=float("nan")),
                dict(temperature=float("inf"))):  # (inf sampled every token uniformly)
        with pytest.raises(ValueError, match="temperature must be >= 0 and top_p in"):
            generate(model, [[1, 2]], max_new_tokens=4, **bad)
    with pytest.raises(ValueError, match="temperature must be 0 .greedy. or at least 1e-06"):  # (it drew the last
        generate(model, [[1, 2]], max_new_tokens=4, temperature=1e-39)  # id with NaN log-probs: logits / T = inf)
    with pytest.raises(ValueError, match="at least 1e-06"):
        generate(model, [[1, 2]], max_new_tokens=4, temperature=common.MIN_TEMPERATURE / 2)
    generate(model, [[1, 2]], max_new_tokens=4, temperature=common.MIN_TEMPERATURE)
    # arguments of the wrong kind: one line, not a TypeError deep inside, and no value silently cut to an integer
    for bad, said in ((dict(prompts=[[1.9, 2.9]]), r"prompt 0 must be a list \(or 1-D tensor\) of integer token ids"),
                      (dict(prompts=[torch.tensor([1.0, 2.0])]), "prompt 0 must be a list"),
                      (dict(prompts=[[1, 2], "ab"]), "prompt 1 must be a list"),
                      (dict(prompts=[torch.tensor(3)]), "prompt 0 must be a list"),
                      (dict(prompts="ab"), "prompts must be a list of token-id lists"),
                      (dict(stop_ids=[25.7]), "stop_ids must be a list of integer token ids"),
                      (dict(stop_ids=None), "stop_ids must be a list"), (dict(stop_ids=3), "stop_ids must be a list"),
                      (dict(temperature=None), "temperature must be a number, got None"),
                      (dict(top_p="0.9"), "top_p must be a number"),
                      (dict(prompt_numbers=[1.5]), "prompt_numbers: one distinct integer >= 0 per prompt"),
                      (dict(prompt_numbers=[0, 0], prompts=[[1, 2], [1, 2]]), "prompt_numbers: one distinct"),
                      (dict(prompt_numbers=[-1]), "prompt_numbers: one distinct"),
                      (dict(prompt_numbers=[0, 1]), "prompt_numbers: one distinct"),
                      (dict(reserve=(1,)), r"reserve: \(slots, columns, new tokens\), three integers"),
                      (dict(switch=lambda *a: None), "a switch needs a partner")):
        with pytest.raises(ValueError, match=said):
            generate(model, **{"prompts": [[1, 2]], "max_new_tokens": 4, **bad})
    # no autograd in generation, whatever the caller's mode (a decorator once slipped onto a helper above it)
    grad_seen = []
    generate(model, [[1, 2]], max_new_tokens=4, on_finish=lambda k: grad_seen.append(torch.is_grad_enabled()))
    assert torch.is_grad_enabled() and grad_seen == [False]
    # what is of the right kind in another container works: a 2-D tensor's rows, a generator, NumPy integers
    want = [g.tokens for g in generate(model, [[1, 2], [3, 4]], n=2, max_new_tokens=3)]
    for prompts in (torch.tensor([[1, 2], [3, 4]]), (p for p in [[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]])):
        out = generate(model, prompts, n=np.int64(2), max_new_tokens=np.int32(3))
        assert [g.tokens for g in out] == want and all(type(g.prompt_index) is int for g in out)
    with pytest.raises(ValueError, match="and no partner"):  # forcing the model's logits only: a switched row ran on
        generate(model, [[1, 2]], max_new_tokens=4, stop_ids=[3], forced_lengths=[2], partner=model,
                 switch=lambda *a: torch.ones(1, dtype=torch.bool))


def test_a_prompt_that_exactly_fills_the_context_is_accepted():
    """A prompt plus max_new_tokens of exactly the context (24 + 8 = 32 positions) fits: the last new token sits at
    position 31, the context's last. Only one more (the check above) is refused."""
    model = random_model(tiny_config(VOCAB, max_position_embeddings=32))
    context, new = model.config.max_position_embeddings, 8
    out = generate(model, [[5] * (context - new)], max_new_tokens=new, temperature=0)
    assert len(out[0].tokens) == new
    with pytest.raises(common.UserError, match="32-token context"):
        generate(model, [[5] * (context - new + 1)], max_new_tokens=new, temperature=0)


def test_stale_cache_columns_never_reach_a_later_row():
    """A masked-out cache column still enters SDPA's sum as 0 * value: what earlier rows left in the kept cache, even
    inf or NaN (a diverged policy, a half-precision overflow), must not reach a later call's samples, and a
    compaction's holes take zeros beyond the columns moved."""
    model = random_model(CONFIGS["qwen2_tied"], seed=5)
    prompts = ragged_prompts(2, lengths=(3, 9, 5))
    kw = dict(n=2, max_new_tokens=8, temperature=1.0, seed=6, block=16, slots=4)  # block: CUDA's 256, in small
    engine.release()
    fresh = generate(model, prompts, **kw)
    engine._kept["slots"].caches[0].fill_(float("nan"))
    again = generate(model, prompts, **kw)
    assert [(g.tokens, g.logprobs) for g in again] == [(g.tokens, g.logprobs) for g in fresh]
    slots = engine._kept["slots"]
    cache = slots.caches[0]
    cache[:, :, 1].fill_(float("nan"))
    slots.move(torch.tensor([1]), torch.tensor([3]), span=5)
    assert torch.equal(cache[:, :, 1, :, :5], cache[:, :, 3, :, :5]) and not cache[:, :, 1, :, 5:].any()


def test_decode_attention_follows_the_flash_rule(pretend_gpu):
    """flash-attn decodes only in the cache's own dtype (it cannot cast the cache); otherwise SDPA on the cache."""
    cfg = ModelConfig.from_hf(CONFIGS["qwen2_tied"])

    def flash(dtype):
        return decode_flash(torch.zeros((cfg.num_layers, 2, 3, cfg.num_kv_heads, 16, cfg.head_dim), dtype=dtype))
    assert flash(torch.float32) is None  # an fp32 cache on the GPU: SDPA
    assert flash(torch.bfloat16) == torch.bfloat16
    with cuda_autocast(torch.bfloat16):  # the cache cannot be cast: an fp32 cache stays off flash under autocast
        assert flash(torch.float32) is None and flash(torch.bfloat16) == torch.bfloat16
    with cuda_autocast(torch.float16):
        assert flash(torch.bfloat16) is None
