"""bench.py --memory: the per-GPU memory table. The parameter count equals the model's own, the sharded state
scales as 1/W, the KV-cache bytes equal what engine.Slots allocates, the activation estimate is near the peak a
checkpointed forward + backward reaches on CPU, and the CLI prints the table for a preset, a config.json path or
its directory, and fails with one line on a bad path."""
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import gpu_memory
import common
import engine
import model
from common import UserError
from conftest import ROOT, subprocess_env

GIB = 2**30

TINY = {  # name -> HF config dict; every architecture and bias/tie/head_dim variant model.Transformer builds
    "qwen2_tied": model.tiny_config(1000, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                    intermediate_size=160, tie_word_embeddings=True),
    "qwen2_untied": model.tiny_config(1000, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                                      intermediate_size=160, tie_word_embeddings=False),
    "qwen3_head_dim": model.tiny_config(1000, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=96, tie_word_embeddings=True, arch="Qwen3ForCausalLM",
                                        head_dim=32),  # head_dim != hidden / heads, as in real Qwen3
    "llama": model.tiny_config(1000, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                               intermediate_size=128, tie_word_embeddings=False, arch="LlamaForCausalLM"),
}


def meta_params(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in model.Transformer(cfg).parameters())


@pytest.mark.parametrize("name", sorted(TINY))
def test_param_count_equals_the_meta_built_model(name):
    cfg = model.ModelConfig.from_hf(TINY[name])
    n = gpu_memory.param_counts(cfg)
    assert n["total"] == meta_params(cfg)
    with torch.device("meta"):
        m = model.Transformer(cfg)
    assert n["block"] == sum(p.numel() for p in m.model.layers[0].parameters())
    assert n["lm_head"] == (0 if cfg.tie_word_embeddings else m.lm_head.weight.numel())


def test_presets_equal_the_meta_built_models_and_the_model_card_sizes():
    published = {"qwen2.5-1.5b": 1_543_714_304, "qwen2.5-3b": 3_085_938_688, "qwen2.5-7b": 7_615_616_512,
                 "qwen2.5-14b": 14_770_033_664}  # 1.54B, 3.09B, 7.62B, 14.8B on the model cards
    for name, total in published.items():
        _, cfg = gpu_memory.memory_config(name)
        assert gpu_memory.param_counts(cfg)["total"] == meta_params(cfg) == total, name


def test_sharded_state_scales_as_one_over_world():
    _, cfg = gpu_memory.memory_config("qwen2.5-7b")
    one = gpu_memory.memory_estimate(cfg, world=1)
    P = one["params"]
    assert (one["master"], one["grads"], one["adam"], one["ref_model"]) == (4 * P, 4 * P, 8 * P, 4 * P)
    for world in (2, 3, 8, 64):
        e = gpu_memory.memory_estimate(cfg, world=world)
        for key in ("master", "grads", "adam", "persistent", "ref_model"):
            assert e[key] * world == pytest.approx(one[key], rel=1e-12), (key, world)
        for key in ("gen_copy", "kv_cache", "gen_temps", "fsdp_transient"):  # not sharded: the same on every W
            assert e[key] == one[key], (key, world)
        assert e["update_peak"] - e["persistent"] == pytest.approx(one["update_peak"] - one["persistent"])


def test_eight_bit_adam_and_recompute_settings_reach_the_estimate():
    """--adam_8bit: 2 bytes of optimizer state per parameter; --checkpoint_every / --checkpoint_keep: the
    activation terms of RL and SFT, ordered as they must be (keeping more, or recomputing fewer blocks, stores more)."""
    _, cfg = gpu_memory.memory_config("qwen2.5-1.5b")
    base, eight = gpu_memory.memory_estimate(cfg, world=2), gpu_memory.memory_estimate(cfg, world=2, adam_8bit=True)
    assert eight["adam"] == 2 * base["params"] / 2 and base["persistent"] - eight["persistent"] == 3 * base["params"]
    peaks = [gpu_memory.memory_estimate(cfg, checkpoint_every=every, checkpoint_keep=keep)["sft_peak"]
             for every, keep in ((1, "nothing"), (1, "attention"), (1, "matmuls"), (2, "matmuls"), (0, "nothing"))]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen3_head_dim", "llama"])
def test_kv_cache_bytes_equal_an_allocated_kv_cache(name):
    cfg = model.ModelConfig.from_hf(TINY[name])
    prompts, group, prompt_tokens, response_tokens = 3, 2, 5, 7
    slots = engine.Slots([cfg], prompts * group, prompt_tokens + response_tokens, response_tokens, [torch.bfloat16],
                         torch.device("cpu"))
    allocated = slots.caches[0].numel() * slots.caches[0].element_size()
    assert gpu_memory.kv_cache_bytes(cfg, prompts * group, prompt_tokens + response_tokens) == allocated
    e = gpu_memory.memory_estimate(cfg, prompts_per_rank=prompts, group_size=group, prompt_tokens=prompt_tokens,
                                   response_tokens=response_tokens)
    assert e["kv_cache"] == allocated
    # a generation call takes at most --gen_batch_size prompts: the cache shrinks with it
    e = gpu_memory.memory_estimate(cfg, prompts_per_rank=prompts, group_size=group, gen_batch_size=1,
                                   prompt_tokens=prompt_tokens, response_tokens=response_tokens)
    assert e["kv_cache"] == allocated // prompts


# the activation estimate against a measurement: a checkpointed forward + backward of train_rl.response_logprobs's
# shape (packed sequences, chunked lm_head) in bf16 on CPU, run in a child process (python this_file --measure) whose
# glibc malloc hands every buffer of 64 KiB or more to mmap, so mallinfo2().hblkhd is the bytes tensors hold (MKL
# keeps no buffer pool of its own there); the peak is sampled after every aten op by a TorchDispatchMode, the
# parameters' gradients exist beforehand
MEASURED = [  # (HF config, tokens, sequences, logprob chunk): block-dominated qwen2 / qwen3, lm_head-dominated
    (model.tiny_config(512, hidden_size=256, num_layers=3, num_heads=2, num_kv_heads=1, intermediate_size=1536,
                       head_dim=128), 2048, 4, 512),
    (model.tiny_config(512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256,
                       arch="Qwen3ForCausalLM", head_dim=64), 2048, 8, 512),
    (model.tiny_config(16384, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=384,
                       tie_word_embeddings=False), 1024, 2, 512),
]

RECOMPUTE_MEASURED = [  # (index into MEASURED, tokens, checkpoint_every (0: no checkpointing), checkpoint_keep)
    (0, 512, 1, "attention"), (0, 512, 1, "matmuls"), (0, 512, 2, "matmuls"), (0, 512, 0, "nothing"),
    (1, 512, 2, "nothing"),
]


def measured_runs():
    """(index into MEASURED, tokens, checkpoint_every, checkpoint_keep, entropy, compute dtype) of each measured peak,
    in order: bf16, and the first model in fp32 too (train_rl and redistill_sft --dtype float32 on a GPU)."""
    return ([(i, MEASURED[i][1], 1, "nothing", entropy, torch.bfloat16) for i in range(len(MEASURED))
             for entropy in (False, True)]
            + [(i, tokens, every, keep, False, torch.bfloat16) for i, tokens, every, keep in RECOMPUTE_MEASURED]
            + [(0, MEASURED[0][1], every, "nothing", False, torch.float32) for every in (1, 0)])


FP32_MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)


def peak_memory_mode():
    """A TorchDispatchMode whose .peak is the most bytes glibc held in mmapped blocks after any op while it was
    active (every tensor buffer, when the process runs with MALLOC_MMAP_THRESHOLD_=65536).

    Its bf16/fp16 matmuls run in fp32 and are rounded back: a CPU without native bf16 (e.g. AVX2 only) runs some
    bf16 GEMM layouts ~50x slower than fp32 (minutes for this file's measurement). The output has the same size
    and dtype, and the fp32 copies are freed inside the op, before the peak is sampled: the peaks move by < 2 %."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    class Peak(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.start = self.peak = libc.mallinfo2().hblkhd

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in FP32_MATMULS and args[0].dtype in (torch.bfloat16, torch.float16):
                out = func(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), **(kwargs or {}))
                out = out.to(args[0].dtype)
            else:
                out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, libc.mallinfo2().hblkhd)
            return out
    return Peak()


def measure_activation_peaks():
    torch.set_num_threads(1)
    out = []
    for i, tokens, every, keep, entropy, dtype in measured_runs():
        hf, _, seqs, chunk = MEASURED[i]
        cfg = model.ModelConfig.from_hf(hf)
        m = model.Transformer(cfg).to(dtype)
        m.gradient_checkpointing, m.checkpoint_every, m.checkpoint_keep = every > 0, max(every, 1), keep
        g = torch.Generator().manual_seed(0)
        ids, cu = model.pack([torch.randint(0, cfg.vocab_size, (tokens // seqs,), generator=g).tolist()
                              for _ in range(seqs)])

        def step():
            hidden = m(ids, cu_seqlens=cu)
            if entropy:  # train_rl: the positions' hidden states gathered, with the entropy
                pos = torch.arange(tokens - 1)
                lp, ent = m.token_logprobs(hidden[0, pos], ids[0, pos + 1], chunk_size=chunk, with_entropy=True)
                loss = lp.float().sum() + ent.float().sum()
            else:  # redistill_sft: every next token, no entropy
                loss = m.token_logprobs(hidden[0, :-1], ids[0, 1:], chunk_size=chunk).float().sum()
            loss.backward()
        with peak_memory_mode():  # warm-up (one-time buffers are not activations), with the same fast matmuls
            step()
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        mode = peak_memory_mode()
        with mode:
            step()
        out.append(mode.peak - mode.start)
    return out


@pytest.mark.slow
def test_activation_estimate_is_near_the_measured_peak():
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    r = subprocess.run([sys.executable, __file__, "--measure"], capture_output=True, text=True, timeout=600,
                       env=dict(subprocess_env(), MALLOC_MMAP_THRESHOLD_="65536", MKL_DISABLE_FAST_MM="1"), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])
    runs = measured_runs()
    assert len(measured) == len(runs)
    for (i, tokens, every, keep, entropy, dtype), peak in zip(runs, measured):
        hf, _, seqs, chunk = MEASURED[i]
        est = gpu_memory.activation_bytes(model.ModelConfig.from_hf(hf), tokens, chunk, with_entropy=entropy,
                                          gathered=entropy, checkpoint_every=every, keep=keep,
                                          compute_bytes=dtype.itemsize)["total"]
        assert 0.9 < peak / est < 1.1, (hf["architectures"], hf["vocab_size"], entropy, every, keep, dtype, peak, est)


def test_defaults_are_the_training_scripts_defaults():
    import redistill_sft
    import train_rl
    args = common.parse_settings(bench.get_parser(), [])
    rl, sft = train_rl.get_parser(), redistill_sft.get_parser()
    assert args.rl_micro_batch_tokens == rl.get_default("micro_batch_tokens")
    assert args.sft_micro_batch_tokens == sft.get_default("micro_batch_tokens")
    assert args.logprob_chunk == rl.get_default("logprob_chunk")
    assert args.samples_per_prompt == rl.get_default("samples_per_prompt")
    assert args.gen_batch_size == rl.get_default("gen_batch_size")
    assert args.prompts_per_step == rl.get_default("prompts_per_step")
    assert args.response_tokens == rl.get_default("max_response_tokens")
    # the paper preset's 16 prompts x 8 rollouts per rank
    assert gpu_memory.memory_settings(args)["prompts_per_rank"] == 16


def test_prompts_per_rank_is_the_largest_share_of_a_rank():
    """--prompts_per_step over --world ranks that do not divide it: the memory is that of the rank with the most
    prompts, train_rl's ceiling (parallel.rank_share deals the step's prompts round-robin), not the floor."""
    import parallel
    args = common.parse_settings(bench.get_parser(), ["--memory", "qwen2.5-1.5b", "--prompts_per_step", "100",
                                                      "--world", "8"])
    largest = max(len(parallel.rank_share(list(range(100)), rank, 8)) for rank in range(8))
    assert gpu_memory.memory_settings(args)["prompts_per_rank"] == largest == 13


def test_rl_micro_batch_holds_at_least_one_whole_sequence():
    """train_rl's micro-batch takes a sequence longer than --micro_batch_tokens alone: below one prompt + response,
    the token budget gives the activations of one whole sequence, as a budget of exactly that length does."""
    _, cfg = gpu_memory.memory_config("qwen2.5-1.5b")
    seq = 512 + 4096

    def estimate(rl_tokens):
        return gpu_memory.memory_estimate(cfg, rl_tokens=rl_tokens, prompt_tokens=512, response_tokens=4096)
    small, whole = estimate(2048), estimate(seq)
    assert small["rl_tokens"] == seq
    assert small["update_peak"] == whole["update_peak"] < estimate(2 * seq)["update_peak"]  # (the budget counts)


def test_keep_engine_auto_keeps_what_fits_three_quarters_of_the_gpu(monkeypatch):
    """train_rl --keep_engine auto: the update's computed peak, for train_rl's own settings, plus generation's copy,
    the KV cache it keeps (train_rl's reserve: slots x columns) and the graphs' pool (and the reference's shards with
    a KL) against 75 % of the GPU; true / false override; CPU keeps."""
    import ckpt
    import train_rl
    monkeypatch.setattr(ckpt, "eight_bit_adam_installed", lambda: True)  # (--adam_8bit true below)
    _, cfg = gpu_memory.memory_config("qwen2.5-1.5b")
    e = gpu_memory.memory_estimate(cfg, world=8, prompt_tokens=300)
    assert e["engine_kept"] == (e["gen_copy"] + e["kv_cache"]
                                + e["gen_rows"] * cfg.vocab_size * gpu_memory.decode_temp_bytes(2, 1.0))
    assert e["update_peak_kept"] == e["update_peak"] + e["engine_kept"]
    # settings away from every default, so a setting dropped or swapped on the way to the estimate shows
    args = common.parse_settings(train_rl.get_parser(), [
        "--model", "m", "--prompts_per_step", "48", "--samples_per_prompt", "4", "--gen_batch_size", "5",
        "--max_response_tokens", "1500", "--micro_batch_tokens", "20000", "--logprob_chunk", "1024",
        "--adam_8bit", "true", "--checkpoint_every", "2", "--checkpoint_keep", "attention", "--top_p", "0.9"])
    reserve = (5 * 4, 300 + 1700, 1700)  # validation's longer responses, as train_rl sizes them
    e = gpu_memory.memory_estimate(cfg, world=4, prompts_per_rank=12, group_size=4, gen_batch_size=5,
                                   prompt_tokens=300, response_tokens=1500, rl_tokens=20000, logprob_chunk=1024,
                                   checkpoint_every=2, checkpoint_keep="attention", adam_8bit=True, top_p=0.9)
    peak = e["update_peak"] + gpu_memory.engine_kept_bytes(cfg, e["params"], 20, 2000, 2, top_p=0.9)
    nucleus_sort = peak - e["update_peak"] - gpu_memory.engine_kept_bytes(cfg, e["params"], 20, 2000, 2)
    assert nucleus_sort == 20 * cfg.vocab_size * 16  # (its rows' sorted probabilities, int64 order and running sum)

    def keep(gpu_bytes, ref_bytes=0, dtype=torch.bfloat16):
        return train_rl.keep_engine_setting(args, cfg, 4, 12, 300, reserve, dtype, ref_bytes, gpu_bytes)[0]
    edge = peak / gpu_memory.AUTO_MEMORY_FRACTION
    assert keep(edge) and not keep(edge * 0.9999)
    assert not keep(edge, e["ref_model"]) and keep(edge + e["ref_model"] / gpu_memory.AUTO_MEMORY_FRACTION,
                                                   e["ref_model"])
    _, larger = gpu_memory.memory_config("qwen2.5-7b")  # a --ref_model of another size: its own shards
    assert e["ref_model"] == gpu_memory.reference_bytes(cfg, 4) < gpu_memory.reference_bytes(larger, 4)
    assert not keep(edge, dtype=torch.float32)  # an fp32 copy and cache are twice the size
    assert keep(None)  # CPU
    monkeypatch.setattr(ckpt, "eight_bit_adam_installed", lambda: False)  # torch's AdamW runs: counted so (it was
    assert not keep(edge)  # counted at 8-bit's 2 bytes a parameter, and the engine kept beside 6 more unseen)
    eight_bit_saves = 6 * e["params"] / 4 / gpu_memory.AUTO_MEMORY_FRACTION  # (world 4)
    assert keep(edge + eight_bit_saves * 1.0001) and not keep(edge + eight_bit_saves * 0.9999)
    args.gradient_checkpointing = False  # no recompute: the update's activations grow
    assert not keep(edge + eight_bit_saves)
    for setting, want in (("true", True), ("false", False)):
        args.keep_engine = setting
        assert keep(1) is want and keep(None) is want


def test_least_recompute_takes_the_first_choice_that_fits_three_quarters():
    gib = 2**30
    peaks = {0: 90, 8: 80, 4: 70, 3: 60, 2: 50, 1: 40}  # GiB: less recompute, more memory
    assert gpu_memory.least_recompute(lambda k: peaks[k] * gib, 100 * gib) == 4  # 70 <= 75, 80 > 75
    assert gpu_memory.least_recompute(lambda k: peaks[k] * gib, 120 * gib) == 0  # 90 <= 90
    assert gpu_memory.least_recompute(lambda k: peaks[k] * gib, 10 * gib) == 1  # nothing fits: the least memory
    assert [gpu_memory.recompute_words(k) for k in (0, 1, 2, 3, 8)] == [
        "no recompute", "every block", "every 2nd block", "every 3rd block", "every 8th block"]


def test_checkpoint_every_auto_is_resolved_into_the_settings():
    """--checkpoint_every auto, written into the settings prepare_training reads: on a GPU least_recompute's choice
    (none: gradient checkpointing off), on a CPU every block; with --gradient_checkpointing false nothing to choose;
    another value untouched. Only train_rl and redistill_sft take it (their peaks are modelled)."""
    import argparse
    import redistill_sft
    import sample_effect
    import train_rl
    gib = 2**30

    def resolve(every="auto", checkpointing=True, gpu_gib=100.0, peak_gib=(90, 80, 70, 60, 50, 40)):
        args = argparse.Namespace(checkpoint_every=every, gradient_checkpointing=checkpointing)
        peaks = dict(zip(gpu_memory.RECOMPUTE_CHOICES, peak_gib))
        why = gpu_memory.resolve_recompute(args, lambda k: peaks[k] * gib, gpu_gib and gpu_gib * gib)
        return args.gradient_checkpointing, args.checkpoint_every, why
    checkpointing, every, why = resolve()
    assert (checkpointing, every) == (True, 4) and "every 4th block, the computed peak 70.0 GiB <= 75%" in why
    assert resolve(gpu_gib=200)[:2] == (False, 1)  # none fits: no gradient checkpointing
    assert resolve(gpu_gib=None) == (True, 1, "--checkpoint_every auto: every block, on CPU")
    assert resolve(checkpointing=False) == (False, 1, None)
    assert resolve(every=3) == (True, 3, None)
    for script in (train_rl, redistill_sft):
        assert script.get_parser().parse_args(["--checkpoint_every", "auto"]).checkpoint_every == "auto"
    with pytest.raises(SystemExit):  # sample_effect's training is not in the memory model
        sample_effect.get_parser().parse_args(["--checkpoint_every", "auto"])


def test_train_rl_recompute_auto_fits_beside_the_kept_engine():
    """train_rl's --checkpoint_every auto on a GPU: the engine kept first (auto keeps it when it fits with every block
    recomputed), then the least recompute whose update peak, the kept buffers in it, fits 75 % of the GPU: the
    choice fits, the next one with less recompute does not. Without the engine kept (--keep_engine false) the
    buffers are left out, so as much or less recompute fits."""
    import train_rl
    _, cfg = gpu_memory.memory_config("qwen2.5-1.5b")
    reserve = (16 * 8, 512 + 4096, 4096)
    gpu = 139 * 2**30

    def choose(keep_engine):
        args = common.parse_settings(train_rl.get_parser(), ["--model", "m", "--checkpoint_every", "auto",
                                                             "--keep_engine", keep_engine, "--prompts_per_step", "16"])
        why = train_rl.recompute_setting(args, cfg, 1, 16, 512, reserve, torch.bfloat16, 0, gpu)
        every = args.checkpoint_every if args.gradient_checkpointing else 0
        kept_peak = (lambda k: train_rl.kept_update_peak(train_rl.memory_estimate(
            train_rl.with_recompute(args, k), cfg, 1, 16, 512, torch.bfloat16), cfg, reserve, torch.bfloat16, 0,
            1.0))
        return every, why, kept_peak
    every, why, kept_peak = choose("auto")
    assert "--checkpoint_every auto" in why and every > 1  # an H200 has room to recompute less than every block
    choices = gpu_memory.RECOMPUTE_CHOICES
    assert kept_peak(every) <= 0.75 * gpu < kept_peak(choices[choices.index(every) - 1])
    unkept = choose("false")[0]
    assert choices.index(unkept) <= choices.index(every)


def table(out):
    """The markdown table printed by --memory: {row label: [cells]}."""
    lines = [l for l in out.splitlines() if l.startswith("| ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines)}


def test_cli_preset_prints_the_table_and_verdict(capsys):
    res = bench.main(["--memory", "qwen2.5-1.5b", "qwen2.5-14b"])
    out = capsys.readouterr().out
    rows = table(out)
    assert rows["per GPU, GiB"] == ["qwen2.5-1.5b", "qwen2.5-14b"]
    assert rows["parameters P"] == ["1.54B", "14.77B"]
    P = res[0]["params"]
    assert rows["**persistent (sharded), 16P/W**"][0] == f"{16 * P / 8 / GIB:.1f}"
    for label in ("**RL generation peak**", "**RL update peak**", "**SFT peak**", "**RL peak with --kl_coef > 0**"):
        assert len(rows[label]) == 2
    assert float(rows["**RL generation peak**"][1]) == pytest.approx(res[1]["gen_peak"] / GIB, abs=0.05)
    assert rows["fits 80 GiB: RL / RL+KL / SFT"] == ["yes / yes / yes", "**no** / **no** / yes"]
    verdict = [l for l in out.splitlines() if l.startswith("verdict")]
    assert len(verdict) == 1 and "qwen2.5-1.5b: RL fits, SFT fits" in verdict[0]
    assert "qwen2.5-14b: RL does not (generation peak" in verdict[0]


def update_too_big(capsys, *argv):
    """qwen2.5-7b on 2 x 40 GiB: the RL update's peak alone is over the GPU. Returns (its estimate, the verdict)."""
    e = bench.main(["--memory", "qwen2.5-7b", "--world", "2", "--gpu_gib", "40", *argv])[0]
    verdict = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("verdict"))
    assert e["update_peak"] / GIB > 40
    return e, verdict


def test_verdict_names_the_phase_whose_peak_does_not_fit(capsys):
    """RL that does not fit names its larger phase: here the update (generation, one prompt per call, is smaller),
    so the user shrinks the micro-batch or recomputes more, not the generation batch."""
    e, verdict = update_too_big(capsys, "--gen_batch_size", "1")
    assert e["gen_peak"] < e["update_peak"]
    assert f"qwen2.5-7b: RL does not (update peak {e['rl_peak'] / GIB:.1f} GiB" in verdict


def test_no_gen_batch_size_advice_when_the_update_does_not_fit(capsys):
    """A smaller --gen_batch_size only lowers the generation peak: when the update itself is over the GPU, the verdict
    must not offer one (it would not make RL fit), even where generation is the larger peak (the default 32 prompts
    per call)."""
    e, verdict = update_too_big(capsys)
    assert e["gen_peak"] > e["update_peak"]
    assert f"RL does not (generation peak {e['rl_peak'] / GIB:.1f} GiB)" in verdict
    assert "gen_batch_size" not in verdict and "one prompt per call" not in verdict


def test_negative_checkpoint_every_is_refused():
    """--checkpoint_every k recomputes every k-th block, 0 none: -1 is no setting of train_rl's, and must be refused,
    not estimated as some recompute."""
    for bad in ("-1", "-2"):
        with pytest.raises(UserError, match=f"--checkpoint_every: 0 .* or more, not {bad}"):
            bench.main(["--memory", "qwen2.5-1.5b", "--checkpoint_every", bad])
    for bad in ("0", "-1", "inf"):  # (a table of "fits 0 GiB: **no**" and a verdict on 1 x -1 GiB)
        with pytest.raises(UserError, match=f"--gpu_gib: a GPU's memory in GiB, more than 0, not {float(bad)}"):
            bench.main(["--memory", "qwen2.5-1.5b", "--gpu_gib", bad])


def test_fits_is_peak_at_most_gpu_gib(capsys):
    e = bench.main(["--memory", "qwen2.5-7b"])[0]
    capsys.readouterr()
    for gpu_gib, want in ((e["sft_peak"] / GIB, "yes"), (e["sft_peak"] / GIB * 0.999, "**no**")):
        bench.main(["--memory", "qwen2.5-7b", "--gpu_gib", repr(gpu_gib)])
        cells = next(v for k, v in table(capsys.readouterr().out).items() if k.startswith("fits"))
        assert cells[0].split(" / ")[2] == want


def test_cli_reads_a_config_json_path_and_its_directory(tmp_path, capsys):
    bench.main(["--memory", "qwen2.5-7b", "--world", "4"])
    want = table(capsys.readouterr().out)
    d = tmp_path / "Qwen2.5-7B"
    d.mkdir()
    _, cfg = gpu_memory.memory_config("qwen2.5-7b")
    (d / "config.json").write_text(json.dumps(cfg.hf_config))
    for spec in (str(d / "config.json"), str(d)):
        bench.main(["--memory", spec, "--world", "4"])
        got = table(capsys.readouterr().out)
        assert got.pop("per GPU, GiB") == ["Qwen2.5-7B"]
        assert got == {k: v for k, v in want.items() if k != "per GPU, GiB"}


@pytest.mark.slow  # a subprocess that imports torch
def test_cli_bad_path_is_one_line_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "config.json")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--memory", missing], capture_output=True,
                       text=True, env=subprocess_env(), cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {missing}:"), r.stderr
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read a model config"):
        bench.main(["--memory", str(bad)])
    bad.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="unsupported architecture"):
        bench.main(["--memory", str(bad)])


def test_docs_tables_are_what_bench_prints_now(capsys):
    doc = open(os.path.join(ROOT, "docs", "memory.md")).read()
    for argv in (["qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "--world", "8", "--gpu_gib", "80"],
                 ["qwen2.5-1.5b", "--world", "1", "--gpu_gib", "80"]):
        assert "python bench.py --memory " + " ".join(argv) in doc
        bench.main(["--memory", *argv])
        out = capsys.readouterr().out
        tab = "\n".join(l for l in out.splitlines() if l.startswith("|"))
        verdict = next(l for l in out.splitlines() if l.startswith("verdict"))
        assert tab in doc and verdict in doc, argv


if __name__ == "__main__" and sys.argv[1:] == ["--measure"]:
    print(json.dumps(measure_activation_peaks()))


def test_train_rl_memory_counts_the_entropy_graph_when_the_loss_holds_it():
    """--entropy_coef > 0 keeps the entropy's graph through the update (probabilities and their gradient: 2 x chunk x
    V x 4 bytes more), which --checkpoint_every auto and --keep_engine auto must see; 0 (the default) keeps none."""
    import train_rl
    _, cfg = gpu_memory.memory_config("qwen2.5-1.5b")

    def update_peak(coef):
        args = common.parse_settings(train_rl.get_parser(), ["--model", "m", "--entropy_coef", coef])
        return train_rl.memory_estimate(args, cfg, 1, 16, 512, torch.bfloat16)["update_peak"]
    assert update_peak("0.01") - update_peak("0") == 2 * 4096 * cfg.vocab_size * 4


def test_kv_cache_bytes_count_the_cache_dtype():
    cfg = model.ModelConfig.from_hf(model.tiny_config(100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
    # layers x (k, v) x kv heads x head dim x bytes, per slot and column
    assert gpu_memory.kv_cache_bytes(cfg, 3, 10, dtype_bytes=4) == 3 * 10 * 2 * 2 * 2 * 16 * 4
    assert gpu_memory.kv_cache_bytes(cfg, 3, 10) == 3 * 10 * 2 * 2 * 2 * 16 * 2
