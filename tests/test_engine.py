"""engine.py: batched generation with the KV cache against transformers (greedy, a ragged batch, stop ids), its
log-probs against teacher forcing, seeded sampling with top-p, sample_next's tempered and nucleus distribution, a
prompt longer than the cache, and the decode step's attention rule (flash or SDPA with a mask) with the KV cache's
dtype. (Cross-sampling with a partner: test_token_shift.py.)"""
import pytest
import torch
from transformers import AutoModelForCausalLM

import common
from engine import Decode, KVCache, generate, sample_next
from model import ModelConfig, build_model, save_model, tiny_config
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
        tok, lp = sample_next(logits, temperature, 1.0, g)
        want = torch.softmax(logits[0] / temperature, -1)
        assert (torch.bincount(tok, minlength=4) / len(tok) - want).abs().max() < 0.01
        assert torch.allclose(lp, want.log()[tok])
    tok, _ = sample_next(logits, 1.0, 0.8, g)  # nucleus of mass >= 0.8: the two likeliest tokens, renormalised
    p = torch.softmax(logits[0], -1)
    freq = torch.bincount(tok, minlength=4) / len(tok)
    assert freq[0] == 0 and freq[3] == 0
    assert abs(freq[2] - p[2] / (p[1] + p[2])) < 0.01


def test_error_prompt_longer_than_cache():
    model = random_model(tiny_config(VOCAB, max_position_embeddings=32))
    with pytest.raises(common.UserError, match="prompt 1 has 30 tokens.*32-token context"):
        generate(model, [[1, 2], [3] * 30], max_new_tokens=8)


def test_decode_mask_follows_the_same_rule(pretend_gpu):
    cfg = ModelConfig.from_hf(CONFIGS["qwen2_tied"])

    def decode(dtype):
        cache = KVCache(cfg, rows=3, max_len=16, dtype=dtype, device="cpu")
        cache.lengths[:] = torch.tensor([4, 7, 2])
        return Decode(cache)
    fp32 = decode(torch.float32)  # fp32 cache on the GPU: SDPA, with its mask
    assert fp32.flash is None and fp32.mask.shape == (3, 1, 1, 8)
    bf16 = decode(torch.bfloat16)
    assert bf16.flash == torch.bfloat16 and not hasattr(bf16, "mask")
    with cuda_autocast(torch.bfloat16):  # the cache cannot be cast: an fp32 cache stays on SDPA under autocast
        assert decode(torch.float32).flash is None and hasattr(decode(torch.float32), "mask")
        assert decode(torch.bfloat16).flash == torch.bfloat16
    with cuda_autocast(torch.float16):
        assert decode(torch.bfloat16).flash is None and hasattr(decode(torch.bfloat16), "mask")
