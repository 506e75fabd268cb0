"""sample_effect.py: SE against a finite-difference of the exact expected reward on an enumerable toy, the
policy-gradient ∇J estimator against the exact ∇J, CountSketch against exact inner products, the CLI
(outputs, selection, torchrun sharding) and bad input."""
import contextlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import ckpt
import common
import sample_effect as se
from common import UserError
from engine import generate
from model import build_model, tiny_config
from conftest import (ROOT, end_of_process_locks, free_port, lock_held_elsewhere, refuse_different_data,
                      subprocess_env)
import padded


# ---------------------------------------------------------------------------------------------------------
# an enumerable toy: vocabulary of 6 (EOS = 0), responses of at most 2 new tokens, so every response and its
# probability can be listed: [EOS] and [a, EOS] finish, [a, b != EOS] are truncated (reward 0).
V, EOS, T = 6, 0, 0.7
PROMPTS = [[1, 2, 3], [4, 2], [5, 5, 1]]


def toy_lm():
    model = build_model(tiny_config(V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32),
                        seed=0, std=0.3)
    return model.eval()  # std 0.3: peaked, far from uniform


def toy_reward(j, response):
    """1 for a finished two-token response whose first token has the parity asked by prompt j."""
    return 1.0 if len(response) == 2 and response[1] == EOS and (response[0] + j) % 2 == 1 else 0.0


def exact_J(model):
    """J = mean_j sum_y p_T(y|x_j) r(j, y), enumerated with full logits (independent of sample_effect.py)."""
    total = 0.0
    for j, x in enumerate(PROMPTS):
        logits = padded.logits(model, torch.tensor([x + [a] for a in range(1, V)])) / T
        first = torch.log_softmax(logits[0, len(x) - 1], -1)
        second = torch.log_softmax(logits[:, len(x)], -1)  # row a-1: after first token a
        total = total + sum(toy_reward(j, [a, EOS]) * (first[a] + second[a - 1, EOS]).exp() for a in range(1, V))
    return total / len(PROMPTS)


def exact_grad_J(model, params):
    grad = torch.autograd.grad(exact_J(model), params)
    return {"grad": list(grad), "norm": math.sqrt(sum(float((g * g).sum()) for g in grad))}


SFT = [(PROMPTS[0], [2, EOS]), (PROMPTS[0], [EOS]), (PROMPTS[1], [3, EOS]), (PROMPTS[1], [2, 4, EOS]),
       (PROMPTS[2], [1, EOS]), ([2, 2], [1, EOS]), (PROMPTS[2], [3, 3, 3, EOS])]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sample_effect_is_the_first_order_change_of_exact_J(reduction):
    model = toy_lm()
    params = list(model.parameters())
    ref = exact_grad_J(model, params)
    examples = [{"input_ids": x + y, "start": len(x)} for x, y in SFT]
    effects = se.sample_effects(model, params, examples, reduction, exact_ref=ref)
    j0 = float(exact_J(model).detach())
    for ex, eff in zip(examples, effects):
        # an SFT step on the sample, computed independently: SGD on -log-likelihood (sum or mean over response + EOS)
        ids = torch.tensor(ex["input_ids"])
        lp = torch.log_softmax(padded.logits(model, ids[None])[0, :-1], -1).gather(-1, ids[1:, None])
        lp = lp[ex["start"] - 1:, 0]
        ll = lp.sum() if reduction == "sum" else lp.mean()
        assert eff["logprob"] == pytest.approx(float(lp.detach().sum()), abs=1e-4)
        assert eff["response_length"] == len(ex["input_ids"]) - ex["start"]
        g = torch.autograd.grad(ll, params)
        gnorm = math.sqrt(sum(float((d * d).sum()) for d in g))
        assert eff["grad_norm"] == pytest.approx(gnorm, rel=1e-4)

        def J_after(eta):
            with torch.no_grad():
                for p, d in zip(params, g):
                    p.add_(eta * d)
                value = float(exact_J(model))
                for p, d in zip(params, g):
                    p.sub_(eta * d)
            return value

        se_value = eff["sample_effect"]
        eta = 1e-3 / gnorm  # a step of relative size 1e-3 in parameter space
        central = (J_after(eta) - J_after(-eta)) / (2 * eta)  # = dJ/dη + O(η²)
        assert central == pytest.approx(se_value, rel=1e-2, abs=1e-3 * ref["norm"])
        if abs(eff["normalised"]) > 0.05:  # one small SGD step: ΔJ = η SE to first order
            eta = 1e-4 / gnorm
            assert J_after(eta) - j0 == pytest.approx(eta * se_value, rel=0.2)
        assert eff["normalised"] == pytest.approx(se_value / (gnorm * ref["norm"]), rel=1e-4)


def test_policy_gradient_estimator_approaches_exact_grad_J():
    model = toy_lm()
    params = list(model.parameters())
    ref = exact_grad_J(model, params)
    k, items = 1024, []
    for j, x in enumerate(PROMPTS):
        gens = generate(model, [x], n=k, max_new_tokens=2, temperature=T, stop_ids=[EOS], seed=j)
        rewards = [toy_reward(j, g.tokens) if g.finished else 0.0 for g in gens]
        for g, w in zip(gens, se.rloo_weights(rewards)):
            items.append({"input_ids": x + g.tokens, "start": len(x), "weight": w})
    se.accumulate_policy_gradient(model, items, T, micro_batch_tokens=4096, scale=1.0 / (len(PROMPTS) * k))
    est = [p.grad for p in params]
    norm = math.sqrt(sum(float((g * g).sum()) for g in est))
    cos = se.grad_dot(est, ref["grad"]) / (norm * ref["norm"])
    assert cos > 0.9
    assert 0.75 < norm / ref["norm"] < 1.33  # unbiased (leave-one-out baseline), not shrunk by (K-1)/K


def test_rollout_chunks_keep_every_rank_busy_within_the_cache_bound():
    """The paper preset's shape (Qwen2.5-1.5B: 28 layers, 2 KV heads of 128, bf16), 100 prompts x 8 rollouts of up to
    4,608 tokens: 1.06 GB of KV cache per prompt, so a 16 GiB bound allows 16 prompts per call."""
    per_token = 2 * 28 * 2 * 128 * 2
    size = se.gen_chunk_size(100, 8, 64, 8, per_token, 4608, 16 * 2**30)
    assert size == 13 and len(range(0, 100, size)) == 8  # ⌈100 / 8⌉: one call on each of the 8 ranks
    assert se.gen_chunk_size(100, 1, 64, 8, per_token, 4608, 16 * 2**30) == 16  # the cache bound
    assert se.gen_chunk_size(100, 1, 64, 8, per_token, 4608, 1000 * 2**30) == 64  # --gen_batch_size
    assert se.gen_chunk_size(100, 1, 64, 8, per_token, 4608, 1) == 1  # never zero
    assert se.gen_chunk_size(100, 1, 64, 8, per_token, 4608, float("inf")) == 64  # --kv_cache_gib inf: no bound


def test_rloo_weights():
    assert se.rloo_weights([1.0, 0.0, 0.0, 1.0]) == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert se.rloo_weights([1.0, 1.0]) == [0.0, 0.0]
    with pytest.raises(ValueError):
        se.rloo_weights([1.0])


def test_count_sketch_is_fixed_and_unbiased():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(300, 7, generator=gen), torch.randn(50, generator=gen)]
    b = [x + 0.5 * torch.randn(x.shape, generator=gen) for x in a]
    exact = se.grad_dot(a, b)
    sk = se.CountSketch([x.numel() for x in a], 64, seed=3, device=torch.device("cpu"), chunk=100)
    assert torch.equal(sk(a), sk(a))  # regenerated from the seed every call, never stored
    est = [float(se.CountSketch([x.numel() for x in a], 64, seed=s, device=torch.device("cpu"))(a)
                 @ se.CountSketch([x.numel() for x in b], 64, seed=s, device=torch.device("cpu"))(b))
           for s in range(200)]
    mean = sum(est) / len(est)
    std = math.sqrt(sum((e - mean) ** 2 for e in est) / len(est))
    assert abs(mean - exact) < 4 * std / math.sqrt(len(est))
    assert std < 0.3 * exact  # about ‖a‖‖b‖/√64 ≈ 0.16 ‖a‖‖b‖ here


# ---------------------------------------------------------------------------------------------------------
# the script on the tiny checkpoint; a reward a random model earns about a tenth of the time (0.05-0.13 over
# rollout seeds, library versions and CPU instruction sets: 4-11 of the 16 evaluation prompts get mixed
# rewards, so ∇J is not zero)

DIGIT_TASK = '''
from toy_task import DIFFICULTY, load_split, make_records, render_prompt, teacher_response
def score(response, record, finished):
    return 1.0 if any(ch.isdigit() for ch in response[:4]) else 0.0
'''


@contextlib.contextmanager
def digit_task_dir(tmp_path_factory, name):
    """A fresh directory holding the digit task's module (se_digit_task), on sys.path while in use."""
    d = tmp_path_factory.mktemp(name)
    (d / "se_digit_task.py").write_text(DIGIT_TASK)
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path.remove(str(d))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoint):
    with digit_task_dir(tmp_path_factory, "se") as d:
        yield setup_run(d, tiny_checkpoint)


def setup_run(d, tiny_checkpoint):
    import toy_task
    from tasks import load_tokenizer
    tok = load_tokenizer(tiny_checkpoint)
    common.write_jsonl(str(d / "eval.jsonl"), toy_task.make_records(16, seed=1, split="test"))
    sft = [{"id": r["id"], "task": "se_digit_task", "prompt": toy_task.render_prompt(r, tok),
            "response": toy_task.teacher_response(r), "extra": i}
           for i, r in enumerate(toy_task.make_records(30, seed=2, split="sft"))]
    common.write_jsonl(str(d / "teacher.jsonl"), sft[:15])
    common.write_jsonl(str(d / "other.jsonl"), [dict(s, response=s["response"][::-1]) for s in sft[15:]])
    args = ["--task", "se_digit_task", "--checkpoint", tiny_checkpoint, "--eval_data", str(d / "eval.jsonl"),
            "--samples_per_prompt", "8", "--max_response_tokens", "8", "--gen_batch_size", "8", "--progress", "false"]
    single = args + ["--sft_data", str(d / "teacher.jsonl"), str(d / "other.jsonl"), "--exact", "true",
                     "--proj_dim", "32768", "--out", str(d / "single" / "effects.jsonl"), "--select", "5",
                     "--select_out", str(d / "top.jsonl"), "--select_bottom", str(d / "bottom.jsonl")]
    se.main(single)
    return {"dir": d, "args": args, "single": single, "ckpt": tiny_checkpoint, "sft": sft}


def test_projection_approximates_exact_and_outputs(setup, capsys):
    d = setup["dir"]
    effects = common.read_jsonl(str(d / "single" / "effects.jsonl"))
    assert [(e["file"], e["line"]) for e in effects] == [(str(d / f), i) for f in ("teacher.jsonl", "other.jsonl")
                                                         for i in range(1, 16)]
    assert [e["id"] for e in effects] == [s["id"] for s in setup["sft"]]
    exact = torch.tensor([e["sample_effect"] for e in effects])
    proj = torch.tensor([e["sample_effect_proj"] for e in effects])
    corr = float(torch.corrcoef(torch.stack([exact, proj]))[0, 1])
    assert corr >= 0.9, corr  # 32768 buckets: 0.994-0.998 over sketch seeds (8192 gave 0.965-0.995)
    assert exact.abs().max() > 0
    for e in effects:
        assert -1 <= e["normalised"] <= 1 and e["response_length"] > 1
    summary = json.loads((d / "single" / "effects.summary.json").read_text(encoding="utf-8"))
    assert summary["grad_j"]["informative_prompts"] > 0
    files = summary["files"]
    assert [v["count"] for v in files.values()] == [15, 15]
    teacher = [e["sample_effect"] for e in effects[:15]]
    assert files[str(d / "teacher.jsonl")]["sample_effect"]["mean"] == pytest.approx(sum(teacher) / 15)
    # top-K and bottom-K: verbatim records (extra fields kept) + their sample effect, in order
    ranked = sorted(effects, key=lambda e: e["sample_effect"], reverse=True)
    top, bottom = common.read_jsonl(str(d / "top.jsonl")), common.read_jsonl(str(d / "bottom.jsonl"))
    assert [r["id"] for r in top] == [e["id"] for e in ranked[:5]]
    assert [r["id"] for r in bottom] == [e["id"] for e in ranked[::-1][:5]]
    by_id = {s["id"]: s for s in setup["sft"]}
    for r in top:
        assert by_id[r["id"]]["extra"] == r["extra"] and "prompt" in r and "response" in r and "sample_effect" in r
    for r in top + bottom:  # the file each came from
        assert r["source_file"] in {e["file"] for e in effects if e["id"] == r["id"]}


def test_selection_from_one_file_and_at_random(setup, tmp_path, capsys):
    """--select_from ranks one file's samples only (top, bottom and random all come from it); --select_random draws
    K distinct samples of that pool by --seed, in the files' order, and the same K again on a re-run."""
    d = setup["dir"]
    args = list(setup["single"])
    args[args.index("--select") + 1] = "4"
    for flag in ("--select_out", "--select_bottom"):
        args[args.index(flag) + 1] = str(tmp_path / f"{flag[2:]}.jsonl")
    other = str(d / "other.jsonl")
    args += ["--out", str(tmp_path / "effects.jsonl"), "--select_from", other,
             "--select_random", str(tmp_path / "random.jsonl")]
    se.main(args)
    effects = common.read_jsonl(str(tmp_path / "effects.jsonl"))
    pool = [e for e in effects if e["file"] == other]
    ranked = sorted(pool, key=lambda e: e["sample_effect"], reverse=True)
    top = common.read_jsonl(str(tmp_path / "select_out.jsonl"))
    bottom = common.read_jsonl(str(tmp_path / "select_bottom.jsonl"))
    assert [r["id"] for r in top] == [e["id"] for e in ranked[:4]]
    assert [r["id"] for r in bottom] == [e["id"] for e in ranked[::-1][:4]]
    # pooled over both files, the top 4 would differ: else this test could not tell the pool from all files
    assert [e["id"] for e in sorted(effects, key=lambda e: e["sample_effect"], reverse=True)[:4]] != [
        r["id"] for r in top]
    drawn = common.read_jsonl(str(tmp_path / "random.jsonl"))
    lines = [next(e["line"] for e in pool if e["id"] == r["id"]) for r in drawn]
    assert len(set(lines)) == 4 and lines == sorted(lines) and {r["source_file"] for r in drawn} == {other}
    assert lines != [1, 2, 3, 4]  # drawn, not the first K
    out = capsys.readouterr().out
    assert f"{tmp_path / 'random.jsonl'}: 4 samples, mean sample_effect" in out
    args[args.index("--out") + 1] = str(tmp_path / "again.jsonl")
    args[args.index("--select_random") + 1] = str(tmp_path / "random_again.jsonl")
    se.main(args)
    assert common.read_jsonl(str(tmp_path / "random_again.jsonl")) == drawn


def test_sft_files_rewritten_during_the_run_are_refused(setup, tmp_path, monkeypatch):
    """The effects name samples by (file, line) and --select copies records from the files at the end: files
    rewritten meanwhile (a stage re-run into the same path, the rows in another order) would give the top-K other
    samples, labelled with the scored ones' effects. Refused, and nothing written."""
    sft = str(tmp_path / "teacher.jsonl")
    common.write_jsonl(sft, setup["sft"][:15])
    args = setup["args"] + ["--sft_data", sft, "--out", str(tmp_path / "effects.jsonl"), "--select", "2",
                            "--select_out", str(tmp_path / "top.jsonl")]
    real = se.sample_effects

    def rewritten_meanwhile(*a, **kw):
        out = real(*a, **kw)
        common.write_jsonl(sft, setup["sft"][:15][::-1])
        return out
    monkeypatch.setattr(se, "sample_effects", rewritten_meanwhile)
    with pytest.raises(common.UserError, match=r"teacher\.jsonl: changed while this run read them"):
        se.main(args)
    assert not (tmp_path / "top.jsonl").exists() and not (tmp_path / "effects.jsonl").exists()


def test_a_run_moved_away_appends_no_sample_into_what_stands_at_its_path(setup, tmp_path, monkeypatch):
    """Moved away after its first sample (and a re-run there), it went on appending its per-sample rows into the
    re-run's .partial directory, which that run's resume would then read; it stops at the next sample."""
    run, moved = tmp_path / "run", tmp_path / "moved"
    args = setup["args"] + ["--sft_data", str(setup["dir"] / "teacher.jsonl"), "--exact", "true",
                            "--out", str(run / "effects.jsonl")]
    real = se.sample_effects

    def moved_after_the_first(*a, on_sample, **k):
        def hook(i, result):
            on_sample(i, result)
            if i == 0:
                os.rename(run, moved)
                run.mkdir()
                (run / "effects.lock").write_text("pid 1 on elsewhere\n")
        return real(*a, on_sample=hook, **k)
    monkeypatch.setattr(se, "sample_effects", moved_after_the_first)
    with pytest.raises(common.UserError, match="removed or moved away while this run used it"):
        se.main(args)
    assert os.listdir(run) == ["effects.lock"]
    assert len(common.read_jsonl(str(moved / "effects.partial" / "effects.rank0.jsonl"))) == 1


def test_a_stopped_run_resumes_to_an_uninterrupted_runs_outputs(setup, tmp_path, monkeypatch, capsys):
    """∇J and each finished sample are kept beside --out as they are done; a re-run does only the rest, and its
    outputs equal the fixture's uninterrupted run's (same settings) exactly."""
    d = setup["dir"]
    args = list(setup["single"])
    for flag in ("--out", "--select_out", "--select_bottom"):
        args[args.index(flag) + 1] = str(tmp_path / os.path.basename(args[args.index(flag) + 1]))
    real, calls = se.sample_effects, []

    def stopping_after(n):  # sample_effects, stopped (as by a kill) once n samples are done and logged
        def run(*a, on_sample, **kw):
            calls.append(len(a[2]))

            def stop(k, result):
                on_sample(k, result)
                if k + 1 == n:
                    raise KeyboardInterrupt
            return real(*a, on_sample=stop, **kw)
        return run
    partial = tmp_path / "effects.partial"
    monkeypatch.setattr(se, "sample_effects", stopping_after(1))
    with pytest.raises(KeyboardInterrupt):
        se.main(args)
    assert len(common.read_jsonl(str(partial / "effects.rank0.jsonl"))) == 1
    # --resume false starts over: ∇J again, every sample again
    monkeypatch.setattr(se, "sample_effects", stopping_after(7))
    with pytest.raises(KeyboardInterrupt):
        se.main(args + ["--resume", "false"])
    assert "removed the stopped run's" in capsys.readouterr().out
    assert not (tmp_path / "effects.jsonl").exists() and (partial / "grad_j.json").exists()
    assert common.read_json(str(partial / "identity.json"))["code"] == ckpt.code_stamp()  # (recorded, not compared)
    with open(partial / "effects.rank0.jsonl", "a") as f:  # a kill mid-write: a torn last line
        f.write('{"index": 7, "sample_eff')
    # another setting that changes the effects: refused, named, before any work
    with pytest.raises(UserError, match="token_reduction: was 'mean', now 'sum'.*pass --resume false"):
        se.main(args + ["--token_reduction", "sum"])
    threads = torch.get_num_threads()  # ... and so is another CPU thread count: it rounds the effects otherwise
    torch.set_num_threads(threads + 1)
    try:
        with pytest.raises(UserError, match=f"compute_device: was 'cpu, threads {threads}', now 'cpu, threads "
                                            f"{threads + 1}'"):
            se.main(args)
    finally:
        torch.set_num_threads(threads)
    # ... and so are other prompts (a chat template fixed in place, an edited system prompt): another ∇J
    system_prompt = se.tasks.SYSTEM_PROMPT
    monkeypatch.setattr(se.tasks, "SYSTEM_PROMPT", system_prompt + " Be brief.")
    with pytest.raises(UserError, match="prompt_digest: was '[0-9a-f]+', now '[0-9a-f]+'"):
        se.main(args)
    monkeypatch.setattr(se.tasks, "SYSTEM_PROMPT", system_prompt)
    # the stopped run as an earlier version recorded it (no prompt digest; the weights' and config's stamps only):
    # resumed, not refused
    identity = common.read_json(str(partial / "identity.json"))
    del identity["prompt_digest"]
    identity["checkpoint_files"] = {f: v for f, v in identity["checkpoint_files"].items()
                                    if os.path.basename(f) in ("model.safetensors", "config.json")}
    common.write_json(str(partial / "identity.json"), identity)
    monkeypatch.setattr(se, "sample_effects", stopping_after(10**9))
    (tmp_path / ".tmp_effects.jsonl.k1ll3d_x").write_text("a kill inside the last write")  # removed, holding the lock
    se.main(args)
    assert calls == [30, 30, 23]  # the torn sample is done again
    assert not (tmp_path / ".tmp_effects.jsonl.k1ll3d_x").exists()
    out = capsys.readouterr().out
    assert "dropped a torn last line" in out and "7 of 30 samples done before" in out
    assert "∇J of the stopped run" in out and "rollouts:" not in out
    for name in ("effects.jsonl", "top.jsonl", "bottom.jsonl"):
        ref = d / "single" / name if name == "effects.jsonl" else d / name
        assert common.read_jsonl(str(tmp_path / name)) == common.read_jsonl(str(ref)), name
    ref = json.loads((d / "single" / "effects.summary.json").read_text(encoding="utf-8"))
    got = json.loads((tmp_path / "effects.summary.json").read_text(encoding="utf-8"))
    assert got["grad_j"] == ref["grad_j"] and got["files"] == ref["files"]
    assert not partial.exists()  # outputs written: the partial run is gone


def test_a_non_finite_effect_stops_the_run_naming_its_sample_and_is_not_saved(setup, tmp_path, monkeypatch):
    """A NaN log-prob for one sample (an overflow in a low-precision forward) was appended to the partial log as a
    bare NaN: the summary then failed with a traceback, and so did every resume. It stops the run now, naming the
    sample's file and line; the samples before it stay saved, so a resume after a fix goes on from them."""
    args = list(setup["single"])
    for flag in ("--out", "--select_out", "--select_bottom"):
        args[args.index(flag) + 1] = str(tmp_path / os.path.basename(args[args.index(flag) + 1]))
    real, calls = se.example_logprobs, [0]

    def nan_third(model, examples, *a, **kw):  # (the third sample's own forward; ∇J's forwards are batches)
        lps = real(model, examples, *a, **kw)
        calls[0] += len(examples) == 1
        return [lp * float("nan") for lp in lps] if len(examples) == 1 and calls[0] == 3 else lps
    monkeypatch.setattr(se, "example_logprobs", nan_third)
    with pytest.raises(common.UserError, match=r"teacher\.jsonl:3 \(sample .*\): its logprob is nan \(an inf or "
                                               r"NaN in its log-probs or gradient, --dtype auto\); no effect of it is "
                                               r"saved"):
        se.main(args)
    logged = common.read_jsonl(str(tmp_path / "effects.partial" / "effects.rank0.jsonl"))
    assert [r["index"] for r in logged] == [0, 1] and not os.path.exists(tmp_path / "effects.jsonl")
    monkeypatch.undo()
    se.main(args)
    assert common.read_jsonl(str(tmp_path / "effects.jsonl")) == common.read_jsonl(
        str(setup["dir"] / "single" / "effects.jsonl"))


def test_a_stopped_run_with_an_inf_setting_resumes(tmp_path):
    """identity.json is strict JSON (--kv_cache_gib inf written as "inf"): read back, it still matches the run's
    identity, and so does one an earlier version wrote bare (Infinity); another value is refused."""
    partial = tmp_path / "effects.partial"
    identity = {"kv_cache_gib": float("inf"), "seed": 1}
    for write in (common.write_json, lambda p, o: open(p, "w").write(json.dumps(o))):  # now; an earlier version
        partial.mkdir()
        write(str(partial / "identity.json"), identity)
        common.write_json(str(partial / "grad_j.json"), {})
        assert se.open_partial(str(partial), identity, resume=True, n_samples=8) == []
        with pytest.raises(UserError, match="kv_cache_gib: was 'inf', now 4.0"):
            se.open_partial(str(partial), {**identity, "kv_cache_gib": 4.0}, resume=True, n_samples=8)
        se.remove_partial(str(partial))


def test_a_resume_under_edited_code_names_the_files_that_changed(tmp_path, capsys):
    """identity.json records the code that computed ∇J, not to compare: a resume under edited code goes on and names
    the files that changed; the same code, or a stopped run of a version that did not record it, says nothing."""
    partial, identity = tmp_path / "effects.partial", {"seed": 1}
    edited = dict(ckpt.code_stamp(), **{"sample_effect.py": "0" * 16})
    for code, note in ((None, False), (ckpt.code_stamp(), False), (edited, True)):
        partial.mkdir()
        common.write_json(str(partial / "identity.json"), identity | ({} if code is None else {"code": code}))
        common.write_json(str(partial / "grad_j.json"), {})
        capsys.readouterr()
        assert se.open_partial(str(partial), identity, resume=True, n_samples=8) == []
        out = capsys.readouterr().out
        assert ("the code changed since the stopped run computed its ∇J: sample_effect.py (edited)" in out) == note
        se.remove_partial(str(partial))


def test_the_ranks_check_together_that_they_read_the_same_data(setup, tmp_path, monkeypatch):
    """Each rank reads --sft_data and --eval_data itself: their digests go to parallel.same_on_every_rank, which
    refuses on every rank files written again between two ranks' reads, before any gradient or write."""
    import tasks
    from tasks import load_tokenizer
    seen = refuse_different_data(monkeypatch)
    d, tok = setup["dir"], load_tokenizer(setup["ckpt"])
    sft, out = str(d / "teacher.jsonl"), tmp_path / "effects.jsonl"
    with pytest.raises(UserError, match="the ranks read different data"):
        se.main(setup["args"] + ["--sft_data", sft, "--exact", "true", "--proj_dim", "0", "--out", str(out)])
    examples = tasks.load_sft_examples([sft], tok, 2048)
    records = tasks.load_records(tasks.get_task("se_digit_task"), "se_digit_task", str(d / "eval.jsonl"), tok, "auto")
    digests = [common.data_digest([[e["input_ids"], e["start"]] for e in examples]), common.data_digest(records)]
    assert seen == [(digests, f"{sft} {d / 'eval.jsonl'}")] and not os.listdir(tmp_path)


def test_a_stopped_runs_files_that_cannot_go_stop_a_fresh_run_not_a_finished_one(tmp_path, monkeypatch, capsys):
    """remove_partial ignored every error: a stopped run's effects.rank0.jsonl that stayed was appended to by the
    fresh run, its samples mixed with the new ones. Before a fresh run it is an error naming the directory; after a
    finished run (outputs written), a note."""
    import shutil
    partial = tmp_path / "effects.partial"
    partial.mkdir()
    (partial / "effects.rank0.jsonl").write_text('{"index": 0}\n')

    def refused(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(partial / "effects.rank0.jsonl"))
    monkeypatch.setattr(shutil, "rmtree", refused)
    with pytest.raises(UserError, match=rf"^{re.escape(str(partial))}: a stopped run's files, which this run must "
                                        r"remove first, cannot be removed \(Permission denied: "
                                        r".*effects\.rank0\.jsonl\)"):
        se.open_partial(str(partial), {"seed": 0}, resume=False, n_samples=8)
    se.remove_partial(str(partial), done=True)
    assert "the outputs are written, but " + str(partial) + " could not be removed" in capsys.readouterr().out


def test_open_partial_keeps_one_row_per_sample_and_names_what_it_cannot_read(tmp_path, capsys):
    path, identity = str(tmp_path / "effects.partial"), {"seed": 0, "sft_digest": "ab"}
    assert se.open_partial(path, identity, resume=True, n_samples=8) is None  # nothing there: a fresh start
    common.write_json(f"{path}/identity.json", identity)
    assert se.open_partial(path, identity, resume=True, n_samples=8) is None  # stopped before its ∇J: nothing kept
    assert not os.path.exists(path)
    common.write_json(f"{path}/identity.json", identity)
    common.write_json(f"{path}/grad_j.json", {"mean_reward": 0.5})
    # a kill between writing done.jsonl and removing the logs: rows 0 and 1 in both; then a torn last line
    common.write_jsonl(f"{path}/done.jsonl", [{"index": 0, "se": 1.0}, {"index": 1, "se": 2.0}])
    common.write_jsonl(f"{path}/effects.rank0.jsonl", [{"index": 0, "se": 1.0}, {"index": 4, "se": 5.0}])
    common.write_jsonl(f"{path}/effects.rank1.jsonl", [{"index": 1, "se": 2.0}, {"index": 3, "se": 4.0}])
    with open(f"{path}/effects.rank1.jsonl", "a") as f:
        f.write('{"index": 5, "se"')
    rows = se.open_partial(path, identity, resume=True, n_samples=8)
    assert rows == [{"index": i, "se": i + 1.0} for i in (0, 1, 3, 4)]
    assert sorted(os.listdir(path)) == ["done.jsonl", "grad_j.json", "identity.json"]
    assert common.read_jsonl(f"{path}/done.jsonl") == rows
    assert "dropped a torn last line" in capsys.readouterr().out
    # a damaged row (a hand edit, a disk error): its file, line and field, before any sample is done again
    for row, message in (('{"index": "1", "se": 2.0}', r"field 'index' must be a sample's number, 0 to 7, got \"1\""),
                         ('{"index": 8, "se": 2.0}', r"field 'index' .* got 8"),
                         ('{"index": true, "se": 2.0}', r"field 'index' .* got true"),
                         ('{"index": 2, "se": NaN}', r"field 'se' must be a finite number, got NaN"),
                         ('{"index": 2, "se": "x"}', r"field 'se' must be a finite number, got \"x\""),
                         ('{"index": 2}', r"fields \['index'\], where the run's first row has \['index', 'se'\]"),
                         ('{"index": 2, "se"', r"not valid JSON \(.*\)"),  # (ends in a newline: not torn)
                         ('{"index": 1, "se": 9.0}', r"a second row of sample 1, with other values than at "
                                                     r".*done\.jsonl:2")):
        (tmp_path / "effects.partial" / "effects.rank0.jsonl").write_text(row + "\n")
        with pytest.raises(UserError, match=r"effects\.rank0\.jsonl:1: " + message + "; pass --resume false"):
            se.open_partial(path, identity, resume=True, n_samples=8)
    os.remove(f"{path}/effects.rank0.jsonl")
    with pytest.raises(UserError, match=r"seed: was 0, now 1; pass --resume false"):
        se.open_partial(path, {**identity, "seed": 1}, resume=True, n_samples=8)
    (tmp_path / "effects.partial" / "identity.json").write_text("{not json")
    with pytest.raises(UserError, match=r"identity\.json: cannot read the stopped run's identity"):
        se.open_partial(path, identity, resume=True, n_samples=8)
    assert se.open_partial(path, identity, resume=False, n_samples=8) is None and not os.path.exists(path)
    assert "removed the stopped run's" in capsys.readouterr().out


def test_a_kill_while_the_finished_run_removes_its_partial_directory_leaves_no_marker(tmp_path, monkeypatch):
    """The outputs are written, then <stem>.partial/ goes. A kill in the middle of that (here: after rmtree removed
    identity.json, the first in directory order) must leave a directory a re-run starts over, not grad_j.json
    vouching for files that are gone (an error or a traceback on every re-run)."""
    path, identity = str(tmp_path / "effects.partial"), {"seed": 0}
    common.write_json(f"{path}/identity.json", identity)
    common.write_json(f"{path}/grad_j.json", {"mean_reward": 0.5})

    def killed_midway(target, ignore_errors=False):
        os.remove(os.path.join(target, "identity.json"))
        raise KeyboardInterrupt
    monkeypatch.setattr(se.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        se.remove_partial(path)
    monkeypatch.undo()
    assert se.open_partial(path, identity, resume=True, n_samples=8) is None and not os.path.exists(path)


@pytest.mark.torchrun
def test_a_stopped_run_resumes_on_another_number_of_ranks(setup, tmp_path, monkeypatch):
    """Stopped on one rank after 7 samples, resumed on two: ∇J is the stopped run's, the 7 rows are kept as they
    were, the other 23 are shared out over the two ranks."""
    d = setup["dir"]
    args = list(setup["single"])
    for flag in ("--out", "--select_out", "--select_bottom"):
        args[args.index(flag) + 1] = str(tmp_path / os.path.basename(args[args.index(flag) + 1]))
    real = se.sample_effects

    def stopping(*a, on_sample, **kw):
        def stop(k, result):
            on_sample(k, result)
            if k + 1 == 7:
                raise KeyboardInterrupt
        return real(*a, on_sample=stop, **kw)
    monkeypatch.setattr(se, "sample_effects", stopping)
    with pytest.raises(KeyboardInterrupt):
        se.main(args)
    end_of_process_locks()  # the stopped run's process has ended
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(free_port()), os.path.join(ROOT, "sample_effect.py"), *args],
                          env=subprocess_env(d), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "7 of 30 samples done before" in proc.stdout and "∇J of the stopped run" in proc.stdout
    one = common.read_jsonl(str(d / "single" / "effects.jsonl"))
    got = common.read_jsonl(str(tmp_path / "effects.jsonl"))
    assert got[:7] == one[:7] and [e["id"] for e in got] == [e["id"] for e in one]
    for a, b in zip(one[7:], got[7:]):  # the same ∇J; other threads per process, so up to float64 round-off
        assert b["sample_effect"] == pytest.approx(a["sample_effect"], rel=1e-9, abs=1e-12)
        assert b["sample_effect_proj"] == pytest.approx(a["sample_effect_proj"], rel=1e-9, abs=1e-12)
    assert not (tmp_path / "effects.partial").exists()


def test_the_generation_calls_do_not_change_the_rollouts(setup, capsys):
    """Each prompt's rollouts are keyed by its index among the evaluation prompts, not by its chunk: one generation
    call of 16 prompts draws what the fixture's two calls of 8 drew, so ∇J and every effect are the same (they changed
    with --gen_batch_size, --kv_cache_gib and the number of ranks)."""
    d = setup["dir"]
    args = list(setup["single"])
    args[args.index("--gen_batch_size") + 1] = "16"
    args[args.index("--out") + 1] = str(d / "one_call" / "effects.jsonl")
    for flag in ("--select_out", "--select_bottom"):
        args[args.index(flag) + 1] = str(d / f"one_call{flag}.jsonl")
    se.main(args)
    assert "rollouts: 1 generation call(s) of <= 16 prompts" in capsys.readouterr().out
    one = common.read_jsonl(str(d / "single" / "effects.jsonl"))
    got = common.read_jsonl(str(d / "one_call" / "effects.jsonl"))
    assert [e["id"] for e in got] == [e["id"] for e in one]
    for a, b in zip(one, got):
        assert b["sample_effect"] == pytest.approx(a["sample_effect"], rel=1e-9, abs=1e-12)


@pytest.mark.torchrun
def test_torchrun_two_ranks_match_one(setup):
    d = setup["dir"]
    port = free_port()
    args = [a for a in setup["single"]]
    args[args.index("--out") + 1] = str(d / "two" / "effects.jsonl")
    args[args.index("--select_out") + 1] = str(d / "top2.jsonl")
    args[args.index("--select_bottom") + 1] = str(d / "bottom2.jsonl")
    env = subprocess_env(d)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                           str(port), os.path.join(ROOT, "sample_effect.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher.jsonl" in proc.stdout and "other.jsonl" in proc.stdout  # one summary row per file
    one = common.read_jsonl(str(d / "single" / "effects.jsonl"))
    two = common.read_jsonl(str(d / "two" / "effects.jsonl"))
    assert [e["id"] for e in two] == [e["id"] for e in one]
    for a, b in zip(one, two):  # same rollouts (keyed by prompt), same SFT samples, other ranks; FSDP sums
        # the ranks' ∇J in another order, so up to fp32 round-off
        assert b["sample_effect"] == pytest.approx(a["sample_effect"], rel=1e-5, abs=1e-9)
        assert b["sample_effect_proj"] == pytest.approx(a["sample_effect_proj"], rel=1e-5, abs=1e-9)


def test_params_match_a_tied_lm_head_under_either_name(setup):
    import re
    from model import load_model
    model = load_model(setup["ckpt"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny checkpoint ties them
    assert se.chosen_parameters(model, re.compile("lm_head")) == {"model.embed_tokens.weight"}
    both = {"model.embed_tokens.weight", "model.norm.weight"}
    assert se.chosen_parameters(model, re.compile(r"lm_head|model\.norm")) == both
    assert se.chosen_parameters(model, re.compile("no_such")) == set()


def test_bad_input(setup, tmp_path, monkeypatch):
    d, args = setup["dir"], setup["args"]
    sft = str(d / "teacher.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    common.write_jsonl(str(tmp_path / "kk.jsonl"), [dict(setup["sft"][0], task="kk")])
    common.write_jsonl(str(tmp_path / "notask.jsonl"),
                       [{k: v for k, v in s.items() if k != "task"} for s in setup["sft"][:3]])

    def fails(extra, match, base=args):
        with pytest.raises(UserError, match=match):
            se.main(base + extra + ["--out", str(tmp_path / "effects.jsonl")])

    no_ckpt = list(args)
    no_ckpt[no_ckpt.index("--checkpoint") + 1] = str(tmp_path / "nope")
    fails(["--sft_data", sft], r"checkpoint .*nope: no such directory", no_ckpt)
    fails(["--sft_data", str(tmp_path / "empty.jsonl")], r"empty\.jsonl: no examples")
    os.symlink(sft, tmp_path / "link.jsonl")  # (another name, the same file: its samples twice)
    fails(["--sft_data", sft, str(tmp_path / "link.jsonl")], r"link\.jsonl: the same file as --sft_data .*teacher")
    fails(["--sft_data", str(tmp_path / "missing.jsonl")], r"missing\.jsonl: file not found")
    fails(["--sft_data", str(tmp_path / "kk.jsonl")], r"kk\.jsonl:1: .*task 'kk', but --task is 'se_digit_task'")
    fails(["--sft_data", sft, "--samples_per_prompt", "1"], r"--samples_per_prompt must be >= 2")
    fails(["--sft_data", sft, "--proj_dim", "0"], r"--proj_dim > 0, --exact true")
    # a second run on one --out would remove or interleave the first one's partial files; other outputs beside it run
    with lock_held_elsewhere(str(tmp_path), "effects.lock") as pid:
        fails(["--sft_data", sft], rf"effects\.lock: another run is using this output \(pid {pid} ")
    with lock_held_elsewhere(str(tmp_path), "other.lock"):
        fails(["--sft_data", sft, "--params", "no_such_param"], r"matches no parameter")  # past the lock
    fails(["--sft_data", sft, "--params", "no_such_param"], r"matches no parameter")
    fails(["--sft_data", sft, "--select", "99", "--select_out", str(tmp_path / "t.jsonl")], r"--select 99 > the 15")
    fails(["--sft_data", sft, "--select", "2"], r"needs --select_out")
    fails(["--sft_data", sft, sft], r"teacher\.jsonl: the same file as --sft_data .*teacher\.jsonl; give each file once")
    fails(["--sft_data", sft, "--dtype", "float16"], r"float16 cannot train here")  # ∇J's gradients would underflow
    # outputs: none on an input, none on another output (checked before any work)
    with pytest.raises(UserError, match=r"--out .*teacher\.jsonl: that is an input \(--sft_data\)"):
        se.main(args + ["--sft_data", sft, "--out", sft])
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "t.jsonl"), "--select_bottom",
           str(tmp_path / "t.jsonl")], r"--select_bottom .*t\.jsonl: the same file as --select_out")
    fails(["--sft_data", sft, "--select", "8", "--select_out", str(tmp_path / "t.jsonl"), "--select_bottom",
           str(tmp_path / "b.jsonl")], r"top and bottom would share 1 of the 15 SFT samples given; use --select <= 7")
    other = str(setup["dir"] / "other.jsonl")
    fails(["--sft_data", sft, "--select_from", sft], r"--select_from need --select K")
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "t.jsonl"), "--select_from", other],
          r"--select_from .*other\.jsonl: not one of the --sft_data files")
    fails(["--sft_data", sft, other, "--select", "16", "--select_out", str(tmp_path / "t.jsonl"), "--select_from",
           other], r"--select 16 > the 15 SFT samples of --select_from .*other\.jsonl")
    fails(["--sft_data", sft, other, "--select", "8", "--select_out", str(tmp_path / "t.jsonl"), "--select_bottom",
           str(tmp_path / "b.jsonl"), "--select_from", other], r"share 1 of the 15 SFT samples of --select_from")
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "t.jsonl"), "--select_random",
           str(tmp_path / "t.jsonl")], r"--select_random .*t\.jsonl: the same file as --select_out")
    # a selection among the run's own files: written, then removed with the partial folder, or a lock's text over it
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "effects.partial" / "t.jsonl")],
          r"--select_out .*effects\.partial/t\.jsonl: one of this run's own files")
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "effects.partial")],
          r"--select_out .*effects\.partial: one of this run's own files")
    fails(["--sft_data", sft, "--select", "2", "--select_out", str(tmp_path / "t.jsonl"), "--select_random",
           str(tmp_path / "effects.lock")], r"--select_random .*effects\.lock: one of this run's own files")
    # the model's context (2048 tokens) bounds both the SFT samples and the rollouts
    common.write_jsonl(str(tmp_path / "long.jsonl"), [dict(setup["sft"][0], response=" 7" * 2100)])
    # (--max_length 5000 > the tiny model's context: the context is the limit, which raising --max_length would not
    # move, so the error names it)
    fails(["--sft_data", str(tmp_path / "long.jsonl")], r"long\.jsonl:1: .* > the model's 2048-token context \(drop "
                                                         r"or shorten the example\)")
    fails(["--sft_data", sft, "--max_response_tokens", "2048"],
          r"eval\.jsonl: record id 'toy-test-00000': .* > the model's 2048-token")
    # the toy task's reward is never earned by the random model: ∇J would be 0
    toy = list(args)
    toy[toy.index("--task") + 1] = "toy_task"
    fails(["--sft_data", str(tmp_path / "notask.jsonl"), "--num_eval_prompts", "2"], r"same reward", toy)
    assert not (tmp_path / "effects.jsonl").exists()
    # a ∇J that overflowed: every effect would be NaN (and a resume would read its norm back as the string "nan")
    monkeypatch.setattr(se, "grad_dot", lambda a, b: float("nan"))
    fails(["--sft_data", sft, "--exact", "true"], r"the ∇J estimate is not finite \(‖∇J‖ nan\)")
    assert not (tmp_path / "effects.partial" / "grad_j.json").exists()


def test_summary_statistics_by_hand():
    """share_positive counts effects > 0 only: an effect of exactly 0 is not a positive one."""
    s = se.summarize([0.0, 0.0, 1.0, -1.0])
    assert s == {"count": 4, "mean": 0.0, "median": 0.0, "share_positive": 0.25, "std": pytest.approx(0.5 ** 0.5)}
    assert se.summarize([]) == {"count": 0}


# ---------------------------------------------------------------------------------------------------------
# every setting reaches what it sets: the script at other values than the defaults, against an independent computation

SETTINGS = {"temperature": 1.3, "samples_per_prompt": 4, "seed": 3, "template": "plain", "num_eval_prompts": 10,
            "token_reduction": "sum", "params": r"layers\.1\.|norm"}
MAX_NEW = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint):
    """Evaluation prompts and SFT samples for runs at other settings than the defaults (the digit task again)."""
    with digit_task_dir(tmp_path_factory, "se_settings") as d:
        write_settings_data(d, tiny_checkpoint)
        yield d


def write_settings_data(d, tiny_checkpoint):
    import toy_task
    from tasks import load_tokenizer
    tok = load_tokenizer(tiny_checkpoint)
    records = (toy_task.make_records(12, seed=1, split="test")
               + toy_task.make_records(4, seed=5, split="hard", max_value=99))
    common.write_jsonl(str(d / "eval.jsonl"), records)
    sft = [{"id": r["id"], "task": "se_digit_task", "prompt": toy_task.render_prompt(r, tok),
            "response": toy_task.teacher_response(r)} for r in toy_task.make_records(6, seed=2, split="sft")]
    common.write_jsonl(str(d / "sft.jsonl"), sft)
    # with reversed responses (larger gradients): effect and cosine rank these differently
    common.write_jsonl(str(d / "sft_mixed.jsonl"), sft + [dict(x, id=x["id"] + "r", response=x["response"][::-1])
                                                          for x in sft])


def run_script(ckpt, d, s):
    out = d / f"run_{len(list(d.iterdir()))}" / "effects.jsonl"
    se.main(["--task", "se_digit_task", "--checkpoint", ckpt, "--eval_data", str(d / "eval.jsonl"),
             "--sft_data", str(d / "sft.jsonl"), "--max_response_tokens", str(MAX_NEW), "--gen_batch_size", "64",
             "--exact", "true", "--proj_dim", "0", "--progress", "false", "--out", str(out)]
            + [x for k, v in s.items() for x in (f"--{k}", str(v))])
    return common.read_jsonl(str(out))


def logprob(model, prompt, response, temperature):
    """The response's log-probs at temperature T by the padded reference forward."""
    ids = torch.tensor([prompt + response])
    lp = torch.log_softmax(padded.logits(model, ids)[0, :-1] / temperature, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:]


def independent(ckpt, d, s):
    """Each SFT sample's effect, its gradient and ∇J, computed apart from sample_effect.py: the rollouts redrawn by
    engine.sample_responses, the leave-one-out policy gradient of log softmax(logits / T) summed by hand through the
    padded reference forward, over the --params subset."""
    import engine
    import se_digit_task as task
    import tasks
    import toy_task
    from model import load_model
    from tasks import load_tokenizer
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    names = [n for n, _ in model.named_parameters() if re.search(s["params"], n)]
    params = [dict(model.named_parameters())[n] for n in names]
    records, _ = tasks.stratified_subset(toy_task.load_split(str(d / "eval.jsonl")), s["num_eval_prompts"], "level",
                                         s["seed"])
    k, temp = s["samples_per_prompt"], s["temperature"]
    out = engine.sample_responses(model, tok, task, records, n=k, temperature=temp, top_p=1.0,
                                  max_new_tokens=MAX_NEW, seed=common.derive_seed(s["seed"], 0),
                                  prompt_numbers=list(range(len(records))), template=s["template"], progress=False)
    objective = 0.0
    for j, r in enumerate(records):
        prompt = tok.encode(task.render_prompt(r, tok, s["template"]), add_special_tokens=False)
        group = out[j * k:(j + 1) * k]
        rewards = [float(x["reward"]) for x in group]
        for i, x in enumerate(group):
            baseline = (sum(rewards) - rewards[i]) / (k - 1)
            objective = objective + (rewards[i] - baseline) * logprob(model, prompt, x["tokens"], temp).sum()
    grad_j = torch.autograd.grad(objective / (len(records) * k), params)
    assert sum(float(g.abs().sum()) for g in grad_j) > 0
    effects, grads = [], []
    for ex in tasks.load_sft_examples([str(d / "sft.jsonl")], tok, 2048):
        lp = logprob(model, ex["input_ids"][:ex["start"]], ex["input_ids"][ex["start"]:], 1.0)
        g = torch.autograd.grad(lp.sum() if s["token_reduction"] == "sum" else lp.mean(), params, allow_unused=True)
        g = [torch.zeros_like(b) if a is None else a for a, b in zip(g, grad_j)]
        grads.append(g)
        effects.append(sum(float((a.double() * b.double()).sum()) for a, b in zip(g, grad_j)))
    return effects, grads, grad_j


def test_effects_equal_an_independent_computation_at_non_default_settings(tiny_checkpoint, data):
    """At other values than the defaults of --temperature, --samples_per_prompt, --seed, --template,
    --num_eval_prompts, --token_reduction and --params, the effects are the independent computation's: a setting
    dropped on its way through main, a flipped sign or a lost 1/K fails here."""
    got = [e["sample_effect"] for e in run_script(tiny_checkpoint, data, SETTINGS)]
    want = independent(tiny_checkpoint, data, SETTINGS)[0]
    scale = max(abs(w) for w in want)
    assert scale > 0
    assert got == pytest.approx(want, rel=1e-3, abs=1e-4 * scale)


@pytest.mark.parametrize("select_by", ["sample_effect", "normalised"])
def test_select_by_ranks_by_its_column(tiny_checkpoint, data, select_by):
    """--select_by picks the top samples by its own column (the two rank these samples differently)."""
    out = data / f"sel_{select_by}"
    args = ["--task", "se_digit_task", "--checkpoint", tiny_checkpoint, "--eval_data", str(data / "eval.jsonl"),
            "--sft_data", str(data / "sft_mixed.jsonl"), "--max_response_tokens", str(MAX_NEW),
            "--samples_per_prompt", "4",
            "--exact", "true", "--proj_dim", "0", "--progress", "false", "--out", str(out / "e.jsonl"),
            "--select", "6", "--select_out", str(out / "top.jsonl"), "--select_by", select_by,
            "--token_reduction", "sum"]
    se.main(args)
    effects = common.read_jsonl(str(out / "e.jsonl"))
    want = [e["id"] for e in sorted(effects, key=lambda e: e[select_by], reverse=True)][:6]
    assert [r["id"] for r in common.read_jsonl(str(out / "top.jsonl"))] == want
    # the two rankings differ on these samples (else this test could not tell them apart)
    assert ([e["id"] for e in sorted(effects, key=lambda e: e["sample_effect"], reverse=True)]
            != [e["id"] for e in sorted(effects, key=lambda e: e["normalised"], reverse=True)])


def test_the_sketch_has_the_runs_dimension_and_seed(tiny_checkpoint, data):
    """--proj_dim 64 --proj_seed 5 (not the defaults 4096, 0): the projected effect is <S g, S ∇J> of that sketch."""
    s = {**SETTINGS, "proj_dim": 64, "proj_seed": 5}
    got = [e["sample_effect_proj"] for e in run_script(tiny_checkpoint, data, s)]
    _, grads, grad_j = independent(tiny_checkpoint, data, SETTINGS)
    sketch = se.CountSketch([g.numel() for g in grad_j], 64, 5, torch.device("cpu"))
    ref = sketch(grad_j).double()
    want = [float(sketch(g).double() @ ref) for g in grads]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-4 * max(map(abs, want)))
