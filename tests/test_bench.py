"""bench.py --gpu_suite --smoke: the GPU suite's code runs end to end on CPU, so a lent GPU's few minutes are not
spent finding a typo, and the checks it makes on a GPU hold on CPU where they must (fp32 equals transformers)."""
import gc
import json
import math
import re
import weakref

import pytest
import torch

import bench
import engine
import parallel
import speed
from common import UserError


def test_generations_agree_splits_each_row_where_its_tokens_first_differ():
    """The log-prob difference before a row's tokens part is the paths' rounding; after it, different texts."""
    from types import SimpleNamespace as Row
    first = [Row(tokens=[5, 6, 7], logprobs=[-1.0, -2.0, -3.0]), Row(tokens=[5, 6, 7], logprobs=[-1.0, -2.0, -3.0]),
             Row(tokens=[5, 6], logprobs=[-1.0, -2.0])]
    second = [Row(tokens=[5, 6, 7], logprobs=[-1.0, -2.5, -3.0]), Row(tokens=[5, 9, 8], logprobs=[-1.25, -9.0, -9.0]),
              Row(tokens=[5, 6, 4], logprobs=[-1.0, -2.0, -4.0])]
    got = speed.generations_agree(first, second)
    assert got["rows"] == 3 and got["identical_tokens"] == 1
    assert got["first_difference"] == [None, 1, 2]  # a row that runs longer differs where the shorter one ended
    assert got["max_abs_logprob_diff"] == 7.0
    assert got["max_abs_logprob_diff_before_tokens_differ"] == 0.5  # row 0's -2.0 vs -2.5; row 1 only up to 1


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_and_its_checks_hold(tmp_path):
    out = tmp_path / "suite.json"
    bench.main(["--gpu_suite", "true", "--smoke", "true", "--json_out", str(out)])
    result = json.loads(out.read_text(encoding="utf-8"))
    for section in bench.SUITE_SECTIONS:
        assert "error" not in result[section], result[section].get("traceback")
    c = result["correctness"]
    assert c["greedy_fp32"]["identical"] == c["greedy_fp32"]["prompts"] == 4
    assert c["logits_fp32_vs_transformers"]["rel"] < 1e-5
    assert c["logprob_gap_fp32"]["max_abs"] < 1e-4 and c["logprob_gap_fp32_blocked_sampler"]["max_abs"] < 1e-4
    assert 0 < c["logits_bf16_vs_fp32"]["ours"]["rel"] < 0.05  # bf16 differs from fp32, but not wildly
    assert c["logprob_gap_bf16"]["tokens"] == 4 * 4 * result["sizes"]["gap_new"]
    assert c["graphs_vs_eager_fp32"]["identical_tokens"] == c["graphs_vs_eager_fp32"]["rows"] == 16
    assert c["graphs_vs_eager_fp32"]["first_difference"] == [None] * 16
    refill = c["graphs_after_refill_vs_eager_fp32"]  # on CPU both eager: the kept copy refilled with other weights
    assert refill["identical_tokens"] == refill["rows"] == 16 and refill["max_abs_logprob_diff"] == 0
    assert refill["captures_after_refill"] == 0 and not refill["graphs"] and refill["rows_changed_by_the_new_weights"]
    gen = result["generation"]
    assert [w["prompts"] for w in gen["workloads"]] == result["sizes"]["gen_prompts"]
    assert all(w["ours_tok_s"] > 0 and w["hf_tok_s"] > 0 and w["ours_blocked_sampler_tok_s"] > 0
               for w in gen["workloads"])
    # each variant against transformers (on a GPU the default, "fa2", is the one issue 34's 10x is judged on)
    for w in gen["workloads"]:  # (the JSON's 4 significant digits)
        speedup = w["hf_s"] / w["ours_blocked_sampler_s"]
        assert w["ours_blocked_sampler_speedup_vs_hf"] == pytest.approx(speedup, rel=2e-3)
    # a difference of two timings: on a busy CPU it can come out <= 0, so only its presence is checked here
    assert gen["decode_step"][0]["rows"] == 16 and math.isfinite(gen["decode_step"][0]["step_ms_wall"])
    assert result["sft"]["measured_steps"] == [2] and result["sft"]["tokens_per_s"] > 0
    assert result["sft"]["first_step_s"] > 0 and result["sft"]["optimizer"] == "torch AdamW, sharded"
    assert result["sft"]["recompute"] == "every block"  # --checkpoint_every auto, on a CPU
    attn = {v["variant"]: v for v in result["attention"]["variants"]}
    assert sum(result["attention"]["lengths"]) == result["sizes"]["attn_tokens"]
    for name in ("sdpa_default", "sdpa_pinned"):  # the CPU runs both; the loop pinned or not computes the same
        assert attn[name]["max_abs_diff_out"] == 0 and attn[name]["max_abs_diff_dq"] == 0 and attn[name]["repeat_s"] > 0
    gpu_only = {"torch_varlen", "torch_varlen_gqa", "flash_attn", "sdpa_cudnn_deprioritized"}
    assert {v for v in attn if "skipped" in attn[v]} == gpu_only
    steps = result["train_step"]["settings"]
    assert [s["setting"] for s in steps] == ["every 1, keep nothing", "every 1, keep attention",
                                             "every 1, keep matmuls", "every 2, keep nothing", "none",
                                             "every 1, keep nothing, blocks kept gathered"]
    assert all("error" not in s and s["tokens_per_s"] > 0 and s["activation_model_gib"] > 0 for s in steps)
    assert all(s["sharded"] for s in steps)  # bf16 on one CPU rank: FSDP2 shards, as on the GPU
    rl = result["rl"]
    assert rl["rollouts"] == 4 * 2 and rl["train_tokens"] > 0
    assert rl["measured_step"] == 2 and rl["first_step_s"] > 0 and rl["engine_kept"]  # auto keeps it on CPU
    assert rl["step_s"] >= rl["gen_s"] + rl["train_s"] and rl["logprob_gap"] < 1e-4
    assert rl["gpu_hours_per_100_steps_at_8_gpus"] == pytest.approx(rl["step_s"] * 800 / 3600, rel=1e-3)
    for case in result["decode_attention"]["cases"]:
        by = {v["variant"]: v for v in case["variants"]}
        assert by["written_out"]["max_abs_diff_vs_sdpa_mask"] < 1e-5 and by["sdpa_mask"]["eager_us"] > 0
        assert {v for v in by if "skipped" in by[v]} == {v for v in speed.DECODE_ATTENTION_VARIANTS
                                                         if v.startswith("flash")}  # CUDA only
    for case, rows in zip(result["sampler"]["cases"], result["sizes"]["sampler_rows"]):
        assert case["rows"] == rows and case["block"] == 1024  # the smoke vocabulary: 2,048
        assert set(case["variants"]) == {"sample_next", "sample_blocked_eager"}  # the compiled one: not in the smoke
        assert all(v["eager_us"] > 0 for v in case["variants"].values())
        blocked = case["variants"]["sample_blocked_eager"]
        assert blocked["same_tokens"] == 1 and blocked["max_abs_logprob_diff"] < 1e-5
    larger = result["rl_larger"]  # its own, larger checkpoint; gpu_memory's peaks grow with it
    assert larger["params"] > result["model"]["params"] and larger["max_response_tokens"] == 16
    assert larger["rollouts"] == 8 and larger["computed_update_peak_gib"] > rl["computed_update_peak_gib"] > 0
    assert all(w["hf_tok_s"] > 0 for w in gen["workloads"]) and "compiled" not in result["sft"]  # no compile here


@pytest.mark.slow
def test_gpu_suite_generation_without_transformers_times_ours_alone(tmp_path):
    out = tmp_path / "suite.json"
    bench.main(["--gpu_suite", "true", "--smoke", "true", "--sections", "generation", "--suite_hf", "false",
                "--json_out", str(out)])
    gen = json.loads(out.read_text(encoding="utf-8"))["generation"]
    assert all(w["ours_tok_s"] > 0 and "hf_tok_s" not in w and "speedup_vs_hf" not in w for w in gen["workloads"])


@pytest.mark.slow
def test_gpu_suite_times_transformers_with_our_engines_buffers_released(tmp_path, monkeypatch):
    """transformers ran beside our engine's kept weights, KV cache and graph pool (at the 1.5B shape and 1,024 rows,
    ~23 GB): its measured peak counted them and its own cache had that much less room."""
    held = []
    real_hf = speed.run_hf

    def run_hf(*args, **kwargs):
        held.append(sorted(engine._kept))
        return real_hf(*args, **kwargs)
    monkeypatch.setattr(speed, "run_hf", run_hf)
    bench.main(["--gpu_suite", "true", "--smoke", "true", "--sections", "generation", "--json_out",
                str(tmp_path / "suite.json")])
    timed_runs = held[1::2]  # (each workload: a warm-up on 2 prompts beside the engine, then the timed run)
    assert timed_runs and all(kept == [] for kept in timed_runs), held


@pytest.mark.slow
def test_gpu_suite_frees_one_sections_sharded_model_before_the_next(tmp_path, monkeypatch):
    """An FSDP2-sharded model lives in reference cycles, so it outlives train_rl.main() until the cyclic collector
    runs: the suite collects after each section, or the next one's measured memory counts it (on one H200 the 3B
    step began with 5.8 GiB of the 1.5B step's weights). The collector's own runs are off here, so only the
    suite's can free it."""
    trained, seen_by_larger = [], []
    real_prepare, real_larger = parallel.prepare_training, speed.suite_rl_larger

    def prepare(*args, **kwargs):
        model = real_prepare(*args, **kwargs)
        trained.append(weakref.ref(model))
        return model

    def larger(*args, **kwargs):
        seen_by_larger.extend(ref() is not None for ref in trained)
        return real_larger(*args, **kwargs)
    monkeypatch.setattr(parallel, "prepare_training", prepare)
    monkeypatch.setattr(speed, "suite_rl_larger", larger)
    gc.disable()
    try:
        bench.main(["--gpu_suite", "true", "--smoke", "true", "--sections", "rl", "rl_larger", "--json_out",
                    str(tmp_path / "suite.json")])
    finally:
        gc.enable()
    assert seen_by_larger == [False]  # the rl section's model, gone before rl_larger began


def test_each_train_step_setting_frees_its_model_before_the_next_loads(tmp_path, monkeypatch):
    """The train_step section's settings each load the 1.5B model sharded: one left to the cyclic collector (its fp32
    weights and grads, 11.5 GiB) stayed for every later setting, which would run out of memory on an H100. The
    collector's own runs are off here, so only the section's can free it."""
    trained, alive_at_load = [], []
    real_prepare = parallel.prepare_training

    def prepare(*args, **kwargs):
        alive_at_load.append(sum(ref() is not None for ref in trained))
        model = real_prepare(*args, **kwargs)
        trained.append(weakref.ref(model))
        return model
    monkeypatch.setattr(parallel, "prepare_training", prepare)
    gc.disable()
    try:
        bench.main(["--gpu_suite", "true", "--smoke", "true", "--sections", "train_step", "--json_out",
                    str(tmp_path / "suite.json")])
    finally:
        gc.enable()
    assert len(alive_at_load) > 1 and set(alive_at_load) == {0}


def test_gpu_suite_without_cuda_says_so():
    with pytest.raises(UserError, match="--smoke"):
        bench.main(["--gpu_suite", "true"])
    if not torch.cuda.is_available():  # (the generation benchmark's GPU mode: an assert's traceback, before)
        with pytest.raises(UserError, match="--gpu true needs CUDA"):
            bench.main(["--gpu", "true"])


def test_a_setting_of_another_mode_is_noted_not_silently_dropped(capsys):
    """--smoke or --json_out without --gpu_suite ran the whole CPU benchmark and wrote nothing, without a word."""
    with pytest.raises(UserError):  # (stopped at once by a size it refuses, after the notes)
        bench.main(["--smoke", "true", "--json_out", "x.json", "--world", "4", "--repeats", "0"])
    out = capsys.readouterr().out
    assert "note: --smoke and --json_out not used: only --gpu_suite true uses them" in out
    assert "note: --world not used: only --memory CONFIG uses it" in out


@pytest.mark.parametrize("argv,message", [
    # the first mode ran and the others were dropped without a word
    (["--rl", "true", "--memory", "qwen2.5-1.5b"], "one mode at a time: --rl and --memory given"),
    (["--gpu_suite", "true", "--count_kernels", "true"], "one mode at a time: --gpu_suite and --count_kernels"),
    # a section's second run overwrote its first one's record (a FileExistsError in place of its measurements)
    (["--gpu_suite", "true", "--smoke", "true", "--sections", "sampler", "sampler"], "--sections: each section once"),
    # named as train_rl.py's settings, which bench.py does not have
    (["--rl", "true", "--rl_prompts", "0"], "--rl_prompts must be at least 1, got 0"),
    (["--rl", "true", "--rl_max_len", "0"], "--rl_max_len must be at least 1, got 0"),
])
def test_bench_refuses_what_it_would_drop_or_name_wrongly(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        bench.main(argv)


def test_settings_the_suite_fixes_itself_are_noted(capsys):
    """The suite's 8 samples per prompt and the smoke's RL cap replace these settings."""
    with pytest.raises(UserError, match="each section once"):  # (stopped after the notes)
        bench.main(["--gpu_suite", "true", "--smoke", "true", "--samples_per_prompt", "4",
                    "--suite_rl_response_tokens", "8", "--sections", "rl", "rl"])
    out = capsys.readouterr().out
    assert "note: --samples_per_prompt not used" in out
    assert "note: --suite_rl_response_tokens not used: only --gpu_suite without --smoke uses it" in out


@pytest.mark.parametrize("steps", [0, 1])
def test_the_rl_benchmark_needs_a_step_beyond_its_warm_up(steps):
    """The first step is a warm-up, left out of the median: with none left the benchmark would fail after its run."""
    with pytest.raises(UserError, match=rf"--rl_steps must be at least 2 \(the first is a warm-up\), got "
                                               rf"{steps}"):
        bench.main(["--rl", "true", "--rl_steps", str(steps)])


def test_the_rl_benchmark_times_the_engine_alone_on_the_last_steps_own_rollouts(capsys):
    """The engine-alone rate it compares the step's generation with came from other weights (the run's final ones),
    another seed and sorted prompts: another workload. Now it regenerates the last step's rollouts from the weights
    that step started from, and says so only where they are the very rollouts the step logged."""
    result = bench.main(["--rl", "true", "--rl_steps", "2", "--rl_prompts", "2", "--samples_per_prompt", "2",
                         "--rl_max_len", "8"])
    assert result["same_rollouts"] is True and result["engine_alone_tok_s"] > 0
    assert "(the same rollouts, 32 tokens)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--prompts", "0"], "--prompts: each number of prompts must be at least 1"),
    (["--samples_per_prompt", "0"], "--samples_per_prompt must be"),
    (["--fixed_len", "0"], "--fixed_len must be"),
    (["--min_len", "16", "--max_len", "8"], "--min_len 16 > --max_len 8"),
    (["--max_len", "32"], "--min_len 64 > --max_len 32 (defaults: 64"),
    (["--repeats", "-1"], "--repeats must be"),
    (["--threads", "-1"], "--threads must be"),
    # 0 passed the check and was read as "unset": the default ran, or an error named a value never given
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--min_len", "0", "--max_len", "10"], "--min_len must be at least 1, got 0"),
    (["--max_len", "0"], "--max_len must be at least 1, got 0"),
])
def test_the_generation_benchmark_refuses_sizes_it_cannot_run(argv, message):
    """Each of these ended in a traceback after the 28M model was built (the --rl and --memory modes checked theirs)."""
    with pytest.raises(UserError, match=re.escape(message)):
        bench.main(argv)


def test_memory_at_peak_names_what_is_live_at_the_highest_point():
    """The replay of an allocator trace: the peak is where live bytes are highest (frees counted once, whether
    requested or completed), and what is live then is grouped by the innermost frame in the project's files."""
    root = "/repo"

    def at(line, name="f"):
        return [{"filename": "/torch/x.py", "line": 1, "name": "inner"}, {"filename": f"{root}/model.py", "line": line,
                                                                          "name": name}]
    trace = [{"action": "alloc", "addr": 1, "size": 100, "frames": at(10)},
             {"action": "alloc", "addr": 6, "size": 50, "frames": []},  # autograd's backward thread: no Python frame
             {"action": "alloc", "addr": 2, "size": 300, "frames": at(20)},
             {"action": "free_requested", "addr": 2, "size": 300},
             {"action": "free_completed", "addr": 2, "size": 300},  # the same free, once
             {"action": "alloc", "addr": 3, "size": 250, "frames": at(30)},
             {"action": "alloc", "addr": 4, "size": 250, "frames": at(30)},  # peak: 100 + 50 + 250 + 250
             {"action": "free_completed", "addr": 3, "size": 250},
             {"action": "alloc", "addr": 5, "size": 200, "frames": [{"filename": "/torch/y.py", "line": 7,
                                                                     "name": "g"}]}]
    r = speed.memory_at_peak(trace, baseline=2**30, source_root=root)
    assert r["peak_gib"] == (2**30 + 650) / 2**30 and r["baseline_gib"] == 1.0
    assert r["live_at_peak_gib"] == {"model.py:30 f": 500 / 2**30, "model.py:10 f": 100 / 2**30,
                                     "(no Python frame):0 backward": 50 / 2**30}
    # a block of the baseline (allocated before the trace) freed in it: the live bytes drop (once), and the peak
    # is the baseline's 400 bytes, not 400 + the 300 allocated after the free
    before = [{"action": "free_requested", "addr": 9, "size": 400},
              {"action": "free_completed", "addr": 9, "size": 400},
              {"action": "alloc", "addr": 9, "size": 300, "frames": at(40)},  # the address again: a new block
              {"action": "free_requested", "addr": 9, "size": 300},
              {"action": "free_completed", "addr": 9, "size": 300},
              {"action": "alloc", "addr": 8, "size": 350, "frames": at(50)}]
    r = speed.memory_at_peak(before, baseline=400, source_root=root)
    assert r["peak_gib"] == 400 / 2**30 and r["live_at_peak_gib"] == {}
    r = speed.memory_at_peak(before + [{"action": "alloc", "addr": 7, "size": 100, "frames": at(60)}], baseline=400,
                             source_root=root)
    assert r["peak_gib"] == 450 / 2**30 and r["live_at_peak_gib"] == {"model.py:50 f": 350 / 2**30,
                                                                      "model.py:60 f": 100 / 2**30}


def test_kernel_count_leaves_out_views_and_no_op_casts_and_splits_composites():
    import torch
    import torch.nn.functional as F
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    q = torch.randn(2, 1, 3, 4)
    bool_mask = torch.tensor([[True, False, True]])
    float_mask = torch.zeros(1, 3).masked_fill(~bool_mask, float("-inf"))

    def count(fn):
        return sum(speed.kernels_by_op(fn)[1].values())
    assert count(lambda: (x.view(8, 4), x.t(), x[:2], x.to(torch.float32), x.reshape(2, 16))) == 0
    assert count(lambda: x.to(torch.float64)) == 1 and count(lambda: x.t().reshape(32)) == 1  # a cast, a copy
    assert count(lambda: F.linear(x, w)) == 1 and count(lambda: x.mean(-1)) == 1  # however the CPU splits them
    # SDPA turns a boolean mask into an additive one before its kernel (what the decode step avoids)
    assert count(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=float_mask)) == 1
    assert count(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=bool_mask)) > 1
    # dynamo's guard check runs on the host: torch 2.11 wraps a float argument there as a CPU scalar and reads it
    # back (.item()), which would launch nothing on a GPU; the compiled region after it counts one
    from types import SimpleNamespace as Event
    item = Event(name="aten::item", cpu_children=[Event(name="aten::_local_scalar_dense", cpu_children=[])])
    assert speed.kernel_count(item) == 1  # elsewhere a read-back is a GPU copy
    assert speed.kernel_count(Event(name="TorchDynamo Cache Lookup", cpu_children=[item])) == 0
    assert speed.kernel_count(Event(name="Torch-Compiled Region: 0/0", cpu_children=[item, item])) == 1


def test_gpu_kernel_counts_leave_out_copies_and_a_busy_fraction_above_one_is_flagged():
    """A GPU profile's kernels per step counted its memcpy and memset activity as kernels, and a busy fraction above 1
    (kernel time summed over overlapping streams, or a wall time from another run) was recorded as if a share of
    the time (docs/gpu_h200_stage1.json: 4.4)."""
    from types import SimpleNamespace as Event
    from torch.autograd import DeviceType
    cuda = [Event(name=n, device_type=DeviceType.CUDA) for n in (
        "void gemv_kernel<float>", "Memcpy HtoD (Pageable -> Device)", "Memset (Device)", "triton_poi_fused_0")]
    host = [Event(name="aten::mm", device_type=DeviceType.CPU)]
    assert speed.gpu_kernel_count(cuda + host) == 2
    assert speed.busy_fraction(0.5, 2.0) == {"gpu_busy_fraction": 0.25}
    over = speed.busy_fraction(4.4, 1.0)
    assert over["gpu_busy_fraction"] == 4.4 and "not a share of the time" in over["gpu_busy_note"]
    for wall in (0.0, -0.001):  # (a difference of two runs)
        assert speed.busy_fraction(0.5, wall) == {"gpu_busy_fraction": None,
                                                  "gpu_busy_note": f"wall time {wall:.3g} s: no share to take"}


def test_compiled_since_counts_new_graphs_and_names_the_guard_that_recompiled():
    """The GPU suite's compiled SFT run says why torch.compile compiled again: here a new dtype fails the first
    graph's guard; the second call with the same input adds nothing, and what came before is not counted."""
    import torch

    def scaled(x):
        return x * 2 + 1
    compiled = torch.compile(scaled, backend="eager", dynamic=True)  # dynamo's guards without a compiler's seconds
    compiled(torch.ones(3))
    before = speed.compile_record()
    compiled(torch.ones(5))  # another size: dynamic shapes, no new graph
    assert speed.compiled_since(before) == {"compiled_graphs": 0, "recompile_reasons": []}
    compiled(torch.ones(4, dtype=torch.float64))
    compiled(torch.ones(6, dtype=torch.float64))
    new = speed.compiled_since(before)
    assert new["compiled_graphs"] == 1 and len(new["recompile_reasons"]) == 1
    assert new["recompile_reasons"][0]["times"] == 1 and "dtype" in new["recompile_reasons"][0]["guard"].lower()


def test_decode_step_writes_the_cache_once_per_layer_and_builds_masks_once_per_step():
    """Per layer, eagerly: four matmuls, one KV-cache write (keys and values together), one SDPA per attention group
    with no mask conversion inside; the masks are built once per step, outside the layers."""
    from model import tiny_config
    cfg = tiny_config(256, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, max_position_embeddings=256)
    for groups in (1, 2):
        r = speed.decode_kernels_per_layer(cfg, rows=4, attention_groups=groups)
        per_layer = r["per_layer_ops"]
        assert per_layer["aten::linear"] == 4 and per_layer["aten::index_put_"] == 1
        assert per_layer["aten::scaled_dot_product_attention"] == groups
        assert not {"aten::where", "aten::logical_not", "aten::masked_fill_", "aten::index"} & set(per_layer)
        assert r["per_step"] == 3 * r["per_layer"] + r["outside_layers"] and r["outside_layers"] > 0


@pytest.mark.slow
def test_fused_decode_step_launches_about_ten_kernels_per_layer():
    """With the fused ops (torch.compile): the four matmuls, RoPE with the K/V join, one cache write, SDPA, two
    residual adds with their RMSNorms and SiLU * up; the sampler's hash is one compiled region outside the layers."""
    from model import tiny_config
    cfg = tiny_config(256, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2, max_position_embeddings=256)
    r = speed.decode_kernels_per_layer(cfg, rows=4, attention_groups=1, fused=True)
    assert r["per_layer"] == 10, r["per_layer_ops"]
    assert r["outside_layers"] < 40, r


def test_decode_floor_takes_the_larger_floor_at_each_step():
    """Bandwidth: the weights and the live cache each step (an untied embedding only at the live rows' tokens);
    compute: 2 FLOPs per matmul weight per live row (a tied lm_head counted once, an untied embedding not at all)
    and attention over the cache, the prefill's once per prompt token (not per row); the roofline is the sum of each
    step's larger one, so one row is bound by bandwidth and many rows by compute."""
    from model import build_model, kv_bytes_per_token, tiny_config
    for tied in (True, False):
        cfg = tiny_config(64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=tied)
        model = build_model(cfg, seed=0)
        c, params = model.config, model.num_params()
        matmul = params - (0 if tied else 64 * 16)
        prompts, lengths = [[1, 2, 3]], [2, 1]  # one prompt, 2 samples: 2 live rows at step 0, 1 at step 1
        kv, per_cached = kv_bytes_per_token(c, 2), 4 * 2 * 4 * c.head_dim
        row = 0 if tied else 16 * 2  # an untied embedding: only the live rows' entries are read
        bytes_ = [2 * matmul + 2 * row + kv * (3 + 3), 2 * matmul + row + kv * 4]
        # step 0 is the prefill: the prompt's 3 tokens once (not once per row), the lm_head at its last token only,
        # causal attention over 1 + 2 + 3 keys
        flops = [2 * (matmul - 64 * 16) * 3 + 2 * 64 * 16 + per_cached * (1 + 2 + 3), 2 * matmul * 1 + per_cached * 4]
        assert speed.decode_floor(c, model, prompts, lengths, 2, 2, bandwidth=10.0) == pytest.approx(sum(bytes_) / 10)
        assert speed.decode_floor(c, model, prompts, lengths, 2, 2, flops=7.0) == pytest.approx(sum(flops) / 7)
        # FLOPs per byte: 2 rows at step 0, 1 row at step 1; a card whose ratio lies between is bound by compute at
        # step 0 and by bandwidth at step 1
        bw, fl = 1.0, (flops[0] / bytes_[0] + flops[1] / bytes_[1]) / 2
        assert flops[0] / fl > bytes_[0] / bw and flops[1] / fl < bytes_[1] / bw
        assert speed.decode_floor(c, model, prompts, lengths, 2, 2, bw, fl) == pytest.approx(
            flops[0] / fl + bytes_[1] / bw)


def test_decode_attention_variants_read_each_rows_own_columns(monkeypatch):
    """The decode attention A/B's variants compute the same attention on CPU (fp32): the written-out one, and the
    FA2 calls (split or not) through a stand-in that reads what FA2 would: sequence b's keys from token cu_k[b],
    seqused_k[b] of them, out of the (tokens, kv_heads, hd) views the variants build on the engine's cache and on a
    token-major one."""
    import torch
    from test_engine import fa2_stand_in, record_fa2_layouts
    monkeypatch.setattr(engine, "flash_varlen_forward", fa2_stand_in)
    seen = record_fa2_layouts(monkeypatch)
    g = torch.Generator().manual_seed(0)
    rows, nh, nkv, cols, hd, span = 5, 6, 2, 24, 8, 16
    q = torch.randn(rows, nh, hd, generator=g)
    cache = torch.randn(2, rows, nkv, cols, hd, generator=g)  # columns past span hold values no row may read
    lengths = torch.tensor([0, 3, 15, 7, 11])
    mask = torch.zeros(rows, 1, 1, span).masked_fill_(torch.arange(span) > lengths[:, None, None, None], float("-inf"))
    ref = speed.decode_attention_call("sdpa_mask", q, *cache, lengths, mask)()
    token_major = cache.transpose(2, 3).contiguous()
    for variant in speed.DECODE_ATTENTION_VARIANTS:
        k, v = token_major if variant.endswith("token_major") else cache
        got = speed.decode_attention_call(variant, q, k, v, lengths, mask)()
        assert got.shape == (rows, nh, hd) and (got - ref).abs().max() < 1e-5, variant
    assert [splits for splits, _ in seen] == [1, 1, 2, 4, 8, 16, 1]  # auto: 1 on a CPU, 16 columns
    assert [empty for _, empty in seen] == [False, False, True, True, True, True, False]  # row 0 reads 1 column
    bad = cache.clone()
    bad[:, 2, :, 16] = 1e4  # row 2's column 16, past its length 15: no variant reads it
    assert torch.equal(speed.decode_attention_call("flash_seqused", q, *bad, lengths, mask)(),
                       speed.decode_attention_call("flash_seqused", q, *cache, lengths, mask)())


def test_datasheet_takes_the_longest_name_that_matches():
    """An H200 NVL is not an H200 SXM: the ceilings come from the most specific name in the device's."""
    assert speed.datasheet(speed.PEAK_BF16_FLOPS, "NVIDIA H200") == 989e12
    assert speed.datasheet(speed.PEAK_BF16_FLOPS, "NVIDIA H200 NVL") == 835e12
    assert speed.datasheet(speed.PEAK_BANDWIDTH, "NVIDIA H100 PCIe") == 2.0e12
    assert speed.datasheet(speed.PEAK_BANDWIDTH, "NVIDIA H100 80GB HBM3") == 3.35e12
    assert speed.datasheet(speed.PEAK_BANDWIDTH, "Tesla T4") is None
    assert speed.datasheet(speed.PEAK_BANDWIDTH, "NVIDIA GH200 480GB") is None  # (not the H200's 4.8 TB/s)
    assert speed.datasheet(speed.PEAK_BF16_FLOPS, "NVIDIA GH200 480GB") == 989e12  # the H100 SXM's compute
    # the A100's four parts (torch.cuda.get_device_name's spelling): 40 GB HBM2 at 1.555 TB/s, 80 GB HBM2e faster
    assert [speed.datasheet(speed.PEAK_BANDWIDTH, f"NVIDIA A100{part}") for part in (
        "-SXM4-40GB", "-PCIE-40GB", " 80GB PCIe", "-SXM4-80GB")] == [1.555e12, 1.555e12, 1.935e12, 2.039e12]
    assert speed.datasheet(speed.PEAK_BF16_FLOPS, "NVIDIA A100-PCIE-40GB") == 312e12
    # a MIG slice has a share of the card's bandwidth and compute, which its name does not give: unknown, where the
    # whole card's figures made MFU and the fraction of floor up to 7x too low
    for table in (speed.PEAK_BANDWIDTH, speed.PEAK_BF16_FLOPS):
        assert speed.datasheet(table, "NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None
        assert speed.datasheet(table, "NVIDIA A100-SXM4-40GB MIG 3g.20gb") is None


def test_train_flops_by_hand():
    """6 per block weight per token, 6 per lm_head weight per log-prob token, causal attention 6 L width s^2."""
    from model import ModelConfig, tiny_config
    cfg = ModelConfig.from_hf(tiny_config(100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))
    block = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 192)  # q, o; k, v; gate, up, down
    assert speed.train_flops(cfg, [10], 4) == 6 * block * 10 + 6 * 100 * 64 * 4 + 6 * 2 * 64 * 10 * 10 == 6_128_640


def test_samples_per_prompt_sizes_the_generation_benchmark(capsys):
    """One name for samples per prompt in every script: bench.py's workloads take --samples_per_prompt (it once had
    --samples, with --samples_per_prompt accepted and ignored outside --memory)."""
    bench.main(["--workloads", "fixed", "--prompts", "1", "--samples_per_prompt", "3", "--fixed_len", "2",
                "--repeats", "1", "--skip_hf", "true", "--threads", "1"])
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[:3] == ["fixed", "3", "6"]  # rows, new tokens
    # the fixed workload reads neither --min_len nor --max_len: their order is not its business
    bench.main(["--workloads", "fixed", "--prompts", "1", "--samples_per_prompt", "1", "--fixed_len", "2",
                "--min_len", "600", "--repeats", "1", "--skip_hf", "true", "--threads", "1"])
    assert capsys.readouterr().out.splitlines()[-1].split()[:3] == ["fixed", "1", "2"]
    with pytest.raises(UserError, match="--samples is now --samples_per_prompt"):
        bench.main(["--samples", "3"])
