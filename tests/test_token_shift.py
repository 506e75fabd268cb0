"""token_shift.py: JS along responses against a direct computation, cross-sampling's lock-step decode (its
endpoints reproduce each model's seeded samples, its switches sit where JS > eps), the random control's budget,
and bad input as one line with nothing written."""
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
import engine
import tasks
import token_shift
import toy_task
from common import stop_token_ids
from conftest import ROOT, refuse_different_data, subprocess_env
from engine import generate
from model import build_model, load_model, save_model, tiny_config
from tasks import load_tokenizer
from tiny_base import build_tokenizer
import padded


def perturbed(model, seed, std):
    """A copy of model with noise on its last block's MLP output: a 'policy' that differs from it at some
    positions much more than at others."""
    other = build_model(model.config.hf_config)
    other.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    w = other.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=g) * std)
    return other


@pytest.fixture(scope="module")
def pair(tiny_checkpoint, tmp_path_factory):
    """A base and a policy (HF directories, the tiny checkpoint's tokenizer), a toy split and a responses file
    in SFT format whose last row is a rollout that hit the length limit (no EOS)."""
    d = tmp_path_factory.mktemp("shift")
    tok = load_tokenizer(tiny_checkpoint)
    base = build_model(tiny_config(len(tok)), seed=1, std=0.5)
    save_model(base, str(d / "base"), tok)
    save_model(perturbed(base, 2, 0.15), str(d / "policy"), tok)
    records = toy_task.make_records(6, seed=3, split="test")
    common.write_jsonl(str(d / "split.jsonl"), records)
    rows = [{"id": r["id"], "prompt": toy_task.render_prompt(r, tok), "response": toy_task.teacher_response(r)}
            for r in records]
    rows[-1].update(finished=False, step=7, reward=0.0)
    common.write_jsonl(str(d / "responses.jsonl"), rows)
    return {"dir": d, "base": str(d / "base"), "policy": str(d / "policy"), "split": str(d / "split.jsonl"),
            "responses": str(d / "responses.jsonl"), "rows": rows, "records": records}


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# 1. divergence along responses


def direct_nucleus(logits, temperature, top_p):
    """softmax(logits / T) in float64, cut to the smallest set of most likely tokens whose mass reaches top_p,
    renormalised: written out, one row at a time."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep, mass = np.zeros_like(p, dtype=bool), 0.0
    for i in np.argsort(-p, kind="stable"):
        if mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def direct_js(p, q):
    m = (p + q) / 2
    return 0.5 * sum(a * math.log(a / b) for a, b in zip(p, m) if a > 0) + \
        0.5 * sum(a * math.log(a / b) for a, b in zip(q, m) if a > 0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_js_along_responses_equals_a_direct_computation(pair, tmp_path, temperature, top_p):
    out = tmp_path / "out"
    token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                      "--out_dir", str(out), "--temperature", str(temperature), "--top_p", str(top_p),
                      "--batch_size", "4", "--logit_chunk", "7", "--plots", str(top_p == 1.0), "--progress", "false"])
    assert (out / "token_shift.png").exists() == (top_p == 1.0)
    rows = read(out / "tokens.jsonl")
    tok = load_tokenizer(pair["base"])
    base, policy = load_model(pair["base"]), load_model(pair["policy"])
    assert [r["id"] for r in rows] == [r["id"] for r in pair["rows"]] and [r["line"] for r in rows] == list(range(1, 7))
    every = []
    for row, src in zip(rows, pair["rows"]):
        prompt = tok(src["prompt"], add_special_tokens=False)["input_ids"]
        response = tok(src["response"], add_special_tokens=False)["input_ids"]
        ids = prompt + response + ([tok.eos_token_id] if src.get("finished", True) else [])  # the last row: no EOS
        assert row["token_ids"] == ids[len(prompt):]
        with torch.no_grad():  # the plain causal forward of one sequence, not the packed one
            lb, lp = (padded.logits(m, torch.tensor([ids]))[0, len(prompt) - 1:-1].numpy() for m in (base, policy))
        for t in range(len(row["js"])):
            p, q = direct_nucleus(lb[t], temperature, top_p), direct_nucleus(lp[t], temperature, top_p)
            assert row["js"][t] == pytest.approx(direct_js(p, q), rel=1e-4, abs=1e-7)
            ent = [-sum(a * math.log(a) for a in d if a > 0) for d in (p, q)]
            assert [row["entropy_base"][t], row["entropy_policy"][t]] == pytest.approx(ent, rel=1e-4, abs=1e-6)
        every += row["js"]
    assert min(every) < 1e-3 and max(every) > 0.1  # the test spans near-equal and high-JS positions
    summary = json.load(open(out / "summary.json"))
    assert summary["positions"] == len(every)
    assert summary["share_js_above_0.1"] == pytest.approx(sum(x > 0.1 for x in every) / len(every))
    assert summary["share_js_below_1e-3"] == pytest.approx(sum(x < 1e-3 for x in every) / len(every))
    assert sum(d["positions"] for d in summary["by_relative_position"]) == len(every)
    assert summary["high_js"]["positions"] == sum(x > 0.1 for x in every)


def test_an_empty_unfinished_response_is_skipped_and_none_left_is_one_line(pair, tmp_path, capsys):
    tok = load_tokenizer(pair["base"])
    empty = dict(pair["rows"][0], id="empty", response="", finished=False)  # cut off before its first token
    common.write_jsonl(str(tmp_path / "with_empty.jsonl"), [empty] + pair["rows"])
    examples = token_shift.read_responses([str(tmp_path / "with_empty.jsonl")], tok, 2048)
    assert [e["id"] for e in examples] == [r["id"] for r in pair["rows"]]
    assert "skipped 1 empty unfinished response" in capsys.readouterr().out
    common.write_jsonl(str(tmp_path / "only_empty.jsonl"), [empty])
    with pytest.raises(common.UserError, match=r"only_empty\.jsonl: the responses hold no positions to compare"):
        token_shift.read_responses([str(tmp_path / "only_empty.jsonl")], tok, 2048)


def test_a_response_whose_text_is_not_the_tokens_sampled_is_noted(pair, tmp_path, capsys):
    """A rollout log holds text: sampled bytes of no character decode to U+FFFD, which tokenizes to other tokens, so
    the positions compared were not the ones the model drew (the micro preset's: 16 sampled, 20-32 compared), without
    a word. Where a row says how many it sampled ('length', the stop token counted), another count is noted."""
    tok = load_tokenizer(pair["base"])
    rows = [dict(r, length=len(tok(r["response"], add_special_tokens=False)["input_ids"]) + r.get("finished", True))
            for r in pair["rows"]]
    common.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    token_shift.read_responses([str(tmp_path / "r.jsonl")], tok, 2048)
    assert "another number of tokens" not in capsys.readouterr().out  # (the counts as sampled: no note)
    rows[2]["length"] -= 3
    common.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    assert len(token_shift.read_responses([str(tmp_path / "r.jsonl")], tok, 2048)) == len(rows)  # (still measured)
    assert (f"note: 1 of the {len(rows)} responses tokenize to another number of tokens than their 'length' sampled "
            f"(the first: {tmp_path}/r.jsonl:3, {rows[2]['length']} sampled, {rows[2]['length'] + 3} now)"
            ) in capsys.readouterr().out


def test_high_js_records_equal_a_direct_computation(pair):
    """At each position with JS > 0.1, in order: the top-k overlaps (k = 1..5) and the base's rank and probability
    of the policy's top-1 token, on the full tempered distributions."""
    tok = load_tokenizer(pair["base"])
    base, policy = load_model(pair["base"]), load_model(pair["policy"])
    examples = token_shift.read_responses([pair["responses"]], tok, 2048)
    out, high = token_shift.compare_along(base, policy, examples, 0.8, 0.9, 0.1, 5)
    want = []
    for e, o in zip(examples, out):
        with torch.no_grad():
            lb, lp = (torch.softmax(padded.logits(m, torch.tensor([e["ids"]]))[0, e["start"] - 1:-1] / 0.8, -1)
                      for m in (base, policy))
        for t in [t for t, x in enumerate(o["js"]) if x > 0.1]:
            top_b, top_p = lb[t].topk(5).indices.tolist(), lp[t].topk(5).indices.tolist()
            want.append({"token": e["ids"][e["start"] + t],
                         "overlap": [len(set(top_b[:k]) & set(top_p[:k])) / k for k in range(1, 6)],
                         "base_rank": int((lb[t] > lb[t, top_p[0]]).sum()) + 1, "base_prob": float(lb[t, top_p[0]])})
    assert len(want) > 10 and {w["base_rank"] for w in want} != {1}  # some moved the top-1, some not
    assert [h["token"] for h in high] == [w["token"] for w in want]
    assert [x for h in high for x in h["overlap"]] == pytest.approx([x for w in want for x in w["overlap"]])
    assert [h["base_rank"] for h in high] == [w["base_rank"] for w in want]
    assert [h["base_prob"] for h in high] == pytest.approx([w["base_prob"] for w in want], rel=1e-4)


@pytest.mark.torchrun
def test_the_divergence_at_two_ranks_equals_one(pair, tmp_path):
    """Each rank compares its share of the responses; the high-JS records are gathered in rank order, so the summary's
    ties among the most frequent tokens (a cut inside one listed other tokens) and its means followed the number of
    ranks: they are put back in the responses' order."""
    from conftest import free_port
    args = ["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"], "--temperature",
            "0.7", "--high_js", "0.02", "--top_tokens", "9", "--batch_size", "1", "--plots", "false",
            "--progress", "false"]
    token_shift.main(args + ["--out_dir", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           os.path.join(ROOT, "token_shift.py"), *args, "--out_dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "summary.json").read_text(encoding="utf-8"))
    assert one["high_js"]["positions"] > 10  # (the 9th token's count ties with the 10th's: the cut runs through it)
    assert (tmp_path / "two" / "summary.json").read_text(encoding="utf-8") == (tmp_path / "one" / "summary.json").read_text(encoding="utf-8")
    assert read(tmp_path / "two" / "tokens.jsonl") == read(tmp_path / "one" / "tokens.jsonl")


def test_a_second_run_into_the_same_out_dir_is_refused(pair, tmp_path):
    """Each output is written whole, but a second run of the same kind would replace the first's without a word;
    the divergence and the two cross-sampling directions may share a directory."""
    hold = ("import common, time; common.lock_run_dir(%r, '.lock_divergence'); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold % str(tmp_path)],
                              cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # (a first run, holding it)
        with pytest.raises(common.UserError, match="another run is using this output"):
            token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                              "--out_dir", str(tmp_path), "--plots", "false", "--progress", "false"])
        (tmp_path / ".tmp_cross_forward.json.k1ll3d_x").write_text("a kill inside a write")
        (tmp_path / ".tmp_summary.json.k1ll3d_x").write_text("the divergence's, while its run lives")
        token_shift.main(cross_args(pair, tmp_path, "forward", "inf"))  # another kind: not blocked
        assert not (tmp_path / ".tmp_cross_forward.json.k1ll3d_x").exists()  # its own kind's leftovers go
        assert (tmp_path / ".tmp_summary.json.k1ll3d_x").exists()
    finally:
        holder.kill()
        holder.wait()


# -----------------------------------------------------------------------------
# 2. cross-sampling


def cross_args(pair, out, direction, *eps, **over):
    s = {"base": pair["base"], "policy": pair["policy"], "cross": direction, "task": "toy_task", "split": pair["split"],
         "samples_per_prompt": 3, "max_response_tokens": 12, "top_p": 0.9, "seed": 5, "out_dir": str(out),
         "plots": False, "progress": False}
    s.update(over)
    return [x for k, v in s.items() for x in (f"--{k}", str(v))] + ["--eps", *map(str, eps)]


def test_generations_kept_buffers_are_freed_when_the_run_ends(pair, tmp_path):
    """Both models' kept copies and KV caches go when cross-sampling ends, as train_rl frees them."""
    token_shift.main(cross_args(pair, tmp_path / "out", "forward", "inf"))
    assert not engine._kept


def test_a_threshold_given_twice_is_refused(pair, tmp_path):
    """A run twice is the same decode (0 and -0 are one threshold); its rows would share one run's place."""
    for eps in (("0.05", "0.05"), ("0", "-0")):
        with pytest.raises(common.UserError, match=r"--eps: a threshold given twice"):
            token_shift.main(cross_args(pair, tmp_path / "out", "forward", *eps))
        assert not (tmp_path / "out").exists()


def test_thresholds_js_cannot_reach_are_refused(pair, tmp_path):
    """JS in nats lies in [0, ln 2]: --high_js above it marked no position (an empty summary, exit 0), below 0 every
    one; a finite --eps at or above it is the primary alone, as inf is."""
    with pytest.raises(common.UserError, match=r"--eps 0\.7 5: JS never exceeds ln 2"):
        token_shift.main(cross_args(pair, tmp_path / "out", "forward", "inf", "0.7", "5"))
    for high_js in ("5", "-0.1", "0.7"):
        with pytest.raises(common.UserError, match=rf"--high_js {high_js}: JS is measured in nats"):
            token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                              "--high_js", high_js, "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # 0 is allowed (every position JS > 0 counts): its line in the plot's log-scale histogram sits at the 1e-9 floor,
    # where log10(0) stopped the run after its outputs were written
    token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                      "--high_js", "0", "--limit", "2", "--out_dir", str(tmp_path / "zero"), "--progress", "false"])
    assert (tmp_path / "zero" / "token_shift.png").exists()


def own_samples(path, pair, seed=5):
    """What the model at path samples alone, through the same helper and seed as a one-rank cross run."""
    model, tok = load_model(path), load_tokenizer(path)
    return engine.sample_responses(model, tok, toy_task, pair["records"], n=3, temperature=1.0, top_p=0.9,
                                   max_new_tokens=12, seed=common.derive_seed(seed, 0), progress=False)


def test_sample_responses_of_no_records_is_empty(pair):
    """A rank whose share of the records is empty (fewer records than ranks) samples nothing, without failing."""
    model, tok = load_model(pair["base"]), load_tokenizer(pair["base"])
    assert engine.sample_responses(model, tok, toy_task, [], n=3, temperature=1.0, progress=False) == []


def test_the_figure_joins_the_other_direction_only_when_it_is_of_the_same_pair(pair, tmp_path, monkeypatch, capsys):
    from unittest import mock
    plt = mock.MagicMock()
    plt.subplots.side_effect = lambda rows, cols, **kw: (mock.MagicMock(), [[mock.MagicMock() for _ in range(cols)]])
    monkeypatch.setattr(common, "pyplot", lambda: plt)
    token_shift.main(cross_args(pair, tmp_path, "forward", "inf", plots=True))
    link = tmp_path / "policy_link"  # the same model by another path
    link.symlink_to(pair["policy"])
    token_shift.main(cross_args(pair, tmp_path, "backward", "inf", plots=True, policy=link))  # the same pair
    assert [c.args[:2] for c in plt.subplots.call_args_list] == [(1, 1), (1, 2)]
    other = shutil.copytree(pair["policy"], tmp_path / "another_policy")  # e.g. a later step of the RL run
    token_shift.main(cross_args(pair, tmp_path, "backward", "inf", plots=True, policy=other))
    assert plt.subplots.call_args.args[:2] == (1, 1)  # forward's curve is of the other policy: left out, and said
    assert "cross_forward.json is of another model pair or setting" in capsys.readouterr().out
    token_shift.main(cross_args(pair, tmp_path, "forward", "inf", plots=True, policy=other, seed=6))
    assert plt.subplots.call_args.args[:2] == (1, 1)  # the same pair at another seed: another setting
    # base and policy swapped, the other direction: the same decode as forward's (its base decodes, its policy
    # intervenes), once drawn twice as forward and backward
    token_shift.main(cross_args(pair, tmp_path, "forward", "inf", plots=True))
    token_shift.main(cross_args(pair, tmp_path, "backward", "inf", plots=True, base=pair["policy"],
                                policy=pair["base"]))
    assert plt.subplots.call_args.args[:2] == (1, 1)
    assert "cross_forward.json is of another model pair or setting" in capsys.readouterr().out


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_eps_inf_is_the_primary_alone_and_negative_eps_the_intervention(pair, tmp_path, direction):
    token_shift.main(cross_args(pair, tmp_path, direction, "inf", -1, plots=True))
    assert (tmp_path / "cross_sampling.png").exists()
    primary, intervention = (pair["base"], pair["policy"]) if direction == "forward" else (pair["policy"], pair["base"])
    alone = {"inf": own_samples(primary, pair), -1.0: own_samples(intervention, pair)}
    assert [s["tokens"] for s in alone["inf"]] != [s["tokens"] for s in alone[-1.0]]  # the models do sample differently
    samples = read(tmp_path / f"cross_{direction}_samples.jsonl")
    for eps, want in alone.items():
        for control in (False, True):  # the control at budget 0 and 1 is the same decode
            got = [s for s in samples if s["eps"] == eps and s["control"] == control]
            assert [s["tokens"] for s in got] == [s["tokens"] for s in want]
            assert [s["reward"] for s in got] == [s["reward"] for s in want]
            assert [s["switched"] for s in got] == ([0] * len(got) if eps == "inf" else [len(s["tokens"]) for s in got])
    curve = json.load(open(tmp_path / f"cross_{direction}.json"))
    inf_run, all_run = curve["runs"]
    assert inf_run["eps"] == "inf" and inf_run["switched"] == 0 and inf_run["switched_share"] == 0
    assert inf_run["differs"] == 0 and inf_run["control"]["switched"] == 0
    assert all_run["switched_share"] == 1.0 and all_run["control"]["switched_share"] == 1.0
    assert 0 < all_run["differs"] < all_run["switched"]
    assert inf_run["accuracy"] == pytest.approx(sum(s["reward"] for s in alone["inf"]) / 18)


def test_an_eps_gives_the_same_run_and_control_wherever_it_stands_in_the_list(pair, tmp_path):
    """A table's row is reproduced by asking for that eps alone: its control's random positions do not depend on the
    other eps of the list or on its place in it."""
    runs = {}
    for name, eps in (("alone", ["0.05"]), ("listed", ["inf", "0.2", "0.05"])):
        token_shift.main(cross_args(pair, tmp_path / name, "forward", *eps))
        samples = read(tmp_path / name / "cross_forward_samples.jsonl")
        runs[name] = [(s["control"], s["tokens"], s["switched"]) for s in samples if s["eps"] == 0.05]
    assert runs["alone"] == runs["listed"] and {c for c, _, _ in runs["alone"]} == {False, True}
    assert any(switched for control, _, switched in runs["alone"] if control)  # the control did switch somewhere


def test_switches_sit_where_js_exceeds_eps_along_the_decoded_prefix(pair):
    """The lock-step decode, checked after the fact: the positions it switched are those where the two models'
    teacher-forced nuclei on the decoded prefix diverge by more than eps. Rows of different prompt lengths stop at
    different steps, so this also checks that both KV caches drop the same rows."""
    tok = load_tokenizer(pair["base"])
    base, policy = load_model(pair["base"]), load_model(pair["policy"])
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"][: 20 + 7 * i]
               for i, r in enumerate(pair["rows"][:4])]
    stop = stop_token_ids(tok) + tok(" is", add_special_tokens=False)["input_ids"]  # a common token: rows end early
    eps, top_p = 0.02, 0.9
    gens = generate(base, prompts, n=3, max_new_tokens=16, temperature=1.0, top_p=top_p, stop_ids=stop, seed=9,
                    partner=policy, switch=token_shift.ThresholdSwitch(eps))
    lengths = {len(g.tokens) for g in gens}
    assert len(lengths) > 1 and min(lengths) < 16  # ragged: the cache compaction ran
    from engine import nucleus
    from token_shift import js_divergence
    decided, switched = 0, 0
    for g in gens:
        ids = torch.tensor([prompts[g.prompt_index] + g.tokens])
        n = len(prompts[g.prompt_index])
        with torch.no_grad():
            lb, lp = (padded.logits(m, ids)[0, n - 1:-1] for m in (base, policy))
        js = js_divergence(nucleus(lb, 1.0, top_p), nucleus(lp, 1.0, top_p))
        for t, flag in enumerate(g.switched):
            if abs(float(js[t]) - eps) > 1e-5:
                assert flag == (float(js[t]) > eps), (g.prompt_index, t, float(js[t]))
                decided += 1
        assert all(s or not d for s, d in zip(g.switched, g.differs))  # 'differs' only where switched
        switched += sum(g.switched)
    assert decided > 100 and 0 < switched < decided


def test_random_control_switches_at_its_rate(pair):
    tok = load_tokenizer(pair["base"])
    base, policy = load_model(pair["base"]), load_model(pair["policy"])
    prompts = [tok(r["prompt"], add_special_tokens=False)["input_ids"] for r in pair["rows"]]
    runs = [generate(base, prompts, n=8, max_new_tokens=20, temperature=1.0, seed=1, partner=policy,
                     switch=token_shift.random_switch(0.3, seed=5), slots=slots) for slots in (None, 3)]
    flags = [f for x in runs[0] for f in x.switched]
    assert len(flags) > 500 and abs(sum(flags) / len(flags) - 0.3) < 0.06
    # the same positions switch whatever the slots (so --batch_size), and another seed picks others
    assert [x.switched for x in runs[1]] == [x.switched for x in runs[0]]
    other = generate(base, prompts, n=8, max_new_tokens=20, temperature=1.0, seed=1, partner=policy,
                     switch=token_shift.random_switch(0.3, seed=6))
    assert [x.switched for x in other] != [x.switched for x in runs[0]]


def test_cross_sampling_refuses_greedy_and_a_partner_of_another_vocabulary(pair):
    base = load_model(pair["base"])
    other = build_model(tiny_config(base.config.vocab_size + 1), seed=0)
    switch = token_shift.ThresholdSwitch(0.1)
    with pytest.raises(ValueError, match="cross-sampling"):
        generate(base, [[1, 2]], temperature=0, partner=base, switch=switch)
    with pytest.raises(ValueError, match="same vocabulary"):
        generate(base, [[1, 2]], partner=other, switch=switch)


# -----------------------------------------------------------------------------
# bad input: one line naming what is wrong, nothing written


def test_checkpoints_with_different_tokenizers(pair, tmp_path):
    tok = build_tokenizer(["a quite different text to learn from"] * 20, vocab_size=300)
    save_model(build_model(tiny_config(len(tok)), seed=0), str(tmp_path / "other"), tok)
    with pytest.raises(common.UserError, match=r"different tokenizers \(\d+ vs \d+ tokens\)"):
        token_shift.main(["--base", pair["base"], "--policy", str(tmp_path / "other"), "--responses", pair["responses"],
                          "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_past_the_models_embedding_is_one_line_before_any_directory(pair, tmp_path):
    """Both checkpoints with an embedding one row short of their tokenizer: an IndexError traceback (on a GPU a
    device-side assert) when a response held the last token, after the output directory and its lock were made."""
    tok = load_tokenizer(pair["base"])
    for name in ("base", "policy"):
        save_model(build_model(tiny_config(len(tok) - 1), seed=1), str(tmp_path / name), tok)
    with pytest.raises(common.UserError, match=rf"--base .*base: the tokenizer has {len(tok)} tokens > the model's "
                                               rf"vocab_size {len(tok) - 1}"):
        token_shift.main(["--base", str(tmp_path / "base"), "--policy", str(tmp_path / "policy"),
                          "--responses", pair["responses"], "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_finite_logits_stop_the_run_naming_the_model_and_write_nothing(pair, tmp_path):
    """A policy with a NaN weight (what a diverged RL step leaves): its NaN JS counted in no bin, so the summary read
    "JS < 1e-3 0.0%, ..., > 0.1 0.0%" as a result, tokens.jsonl held bare NaN, and the figure died in numpy."""
    policy = load_model(pair["policy"])
    with torch.no_grad():
        policy.model.layers[-1].mlp.down_proj.weight[0, 0] = float("nan")
    save_model(policy, str(tmp_path / "nan_policy"), load_tokenizer(pair["policy"]))
    out = tmp_path / "out"
    with pytest.raises(common.UserError, match=r"responses\.jsonl:1 \(id .*\): --policy gave non-finite logits "
                                               r"\(inf or NaN\) in float32: a diverged checkpoint"):
        token_shift.main(["--base", pair["base"], "--policy", str(tmp_path / "nan_policy"), "--responses",
                          pair["responses"], "--out_dir", str(out), "--plots", "false"])
    assert not (out / "tokens.jsonl").exists() and not (out / "summary.json").exists()
    # cross-sampling: every eps, -1 too (the intervening model alone), read "switched 0.00 %" (a NaN JS > eps is
    # False), exit 0, cross_*.json written
    for direction, role in (("forward", "intervening"), ("backward", "decoding")):
        with pytest.raises(common.UserError, match=r"^--policy .*nan_policy gave non-finite logits \(inf or NaN\) in "
                                                   r"float32, cross-sampling at eps -1: a diverged checkpoint"):
            token_shift.main(["--base", pair["base"], "--policy", str(tmp_path / "nan_policy"), "--cross", direction,
                              "--task", "toy_task", "--split", pair["split"], "--limit", "2", "--samples_per_prompt",
                              "2", "--max_response_tokens", "4", "--eps", "-1", "--out_dir", str(out), "--plots",
                              "false", "--progress", "false"])
        assert not (out / f"cross_{direction}.json").exists() and not (out / f"cross_{direction}_samples.jsonl").exists()


def test_a_run_that_draws_no_figure_removes_an_earlier_runs(pair, tmp_path, capsys):
    """--plots false kept the last run's token_shift.png beside this run's numbers, which it no longer showed."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "token_shift.png").write_bytes(b"an earlier run's figure")
    (out / ".tmp_token_shift.png.k1ll3d_x").write_bytes(b"a kill inside its write")  # (it stayed for good)
    token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                      "--out_dir", str(out), "--plots", "false", "--limit", "2"])
    assert not (out / "token_shift.png").exists() and (out / "summary.json").exists()
    assert not (out / ".tmp_token_shift.png.k1ll3d_x").exists()
    assert "removed " + str(out / "token_shift.png") + ", an earlier run's figure" in capsys.readouterr().out


def test_a_checkpoint_without_weights_leaves_no_directory(pair, tmp_path):
    """A --policy with its config and tokenizer but no weights: refused naming it before the output directory (and
    its lock file) is made, in either mode."""
    import shutil
    bare = shutil.copytree(pair["policy"], str(tmp_path / "bare"), ignore=shutil.ignore_patterns("*.safetensors"))
    for extra in ([], ["--cross", "forward", "--split", pair["split"], "--task", "toy_task"]):
        with pytest.raises(common.UserError, match=r"bare: no model\.safetensors"):
            token_shift.main(["--base", pair["base"], "--policy", bare, "--responses", pair["responses"],
                              "--out_dir", str(tmp_path / "out"), *extra])
        assert not (tmp_path / "out").exists()


def test_a_response_longer_than_the_context(pair, tmp_path):
    tok = load_tokenizer(pair["base"])
    save_model(build_model(tiny_config(len(tok), max_position_embeddings=64), seed=0), str(tmp_path / "short"), tok)
    rows = [dict(pair["rows"][0], id="fine"), dict(pair["rows"][0], id="long", response="1 plus 2 is 3. " * 20)]
    common.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    with pytest.raises(common.UserError, match=r"r\.jsonl:2: field 'response' of 'long': \d+ tokens .* > the models' "
                                               r"64-token context"):
        token_shift.main(["--base", pair["base"], "--policy", str(tmp_path / "short"), "--responses",
                          str(tmp_path / "r.jsonl"), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("finished", [True, False])
def test_a_response_holding_a_stop_token_is_refused_as_sft_refuses_it(pair, tmp_path, finished):
    """The tokenizer reads a stop token's text as its id: such a response would be compared past its end (a finished
    one gets a second EOS appended). Unfinished rows get none, so their last token is checked too."""
    tok = load_tokenizer(pair["base"])
    rows = [pair["rows"][0], dict(pair["rows"][1], response=pair["rows"][1]["response"] + tok.eos_token,
                                  finished=finished)]
    common.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    with pytest.raises(common.UserError, match=rf"r\.jsonl:2: field 'response' holds the stop token "
                                               rf"'{re.escape(tok.eos_token)}'"):
        token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", str(tmp_path / "r.jsonl"),
                          "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    rows[1]["response"] = pair["rows"][1]["response"]  # the same row without it is data
    common.write_jsonl(str(tmp_path / "r.jsonl"), rows)
    assert len(token_shift.read_responses([str(tmp_path / "r.jsonl")], tok, 2048)) == 2


@pytest.mark.parametrize("bad,message", [
    ('{"id": 1, "prompt": "a", "response": "b"}\n{"id": 2, "prompt": ', r"r\.jsonl:2: not valid JSON"),
    ('{"id": 1, "prompt": "a"}\n', r"r\.jsonl:1: missing field 'response'"),
    ('{"id": 1, "prompt": "a", "response": 5}\n', r"r\.jsonl:1: field 'response' must be of type str"),
    ('{"id": 1, "prompt": "a", "response": "b", "finished": "yes"}\n',
     r"r\.jsonl:1: field 'finished' must be true or false"),
])
def test_a_broken_responses_file(pair, tmp_path, bad, message):
    (tmp_path / "r.jsonl").write_text(bad)
    with pytest.raises(common.UserError, match=message):
        token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", str(tmp_path / "r.jsonl"),
                          "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_responses_file_given_twice_is_refused(pair, tmp_path, monkeypatch):
    """Its every response would count twice (the positions, the high-JS tallies, tokens.jsonl): refused, as
    sample_effect.py refuses an --sft_data file twice; another spelling of it too."""
    common.write_jsonl(str(tmp_path / "r.jsonl"), pair["rows"][:2])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(common.UserError, match=r"--responses \./r\.jsonl: the same file as --responses .*r\.jsonl"):
        token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", str(tmp_path / "r.jsonl"),
                          os.path.join(".", "r.jsonl"), "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # its --out_dir in a training run's directory, as eval.py's (the run's files and these mixed)
    import shutil
    shutil.copytree(pair["base"], tmp_path / "run" / "step_000002")
    with pytest.raises(common.UserError, match=r"--out_dir .*: is .*run, a training run's directory .* give "
                                               r"token_shift\.py a directory of its own"):
        token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", "r.jsonl",
                          "--out_dir", str(tmp_path / "run")])
    # one checkpoint as both (another spelling of it): every divergence 0, said nowhere
    with pytest.raises(common.UserError, match=r"--base .* and --policy .* are one checkpoint: there is nothing to"):
        token_shift.main(["--base", pair["base"], "--policy", pair["base"] + "/", "--responses", "r.jsonl",
                          "--out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # a responses file that is one of the outputs (an earlier run's tokens.jsonl, in --out_dir): it was overwritten
    # by this run's result, where every other stage refuses an output on an input
    (tmp_path / "out").mkdir()
    common.write_jsonl(str(tmp_path / "out" / "tokens.jsonl"), pair["rows"][:2])
    with pytest.raises(common.UserError, match=r"--out_dir's tokens\.jsonl .*: that is an input \(--responses\); it "
                                               r"would be overwritten"):
        token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses",
                          str(tmp_path / "out" / "tokens.jsonl"), "--out_dir", str(tmp_path / "out")])
    assert common.read_jsonl(str(tmp_path / "out" / "tokens.jsonl")) == pair["rows"][:2]


@pytest.mark.slow  # a subprocess that imports torch
def test_the_command_line_prints_one_line(pair, tmp_path):
    (tmp_path / "r.jsonl").write_text('{"id": 1, "prompt": "a", "response": "b"}\n[1, 2]\n')
    r = subprocess.run([sys.executable, os.path.join(ROOT, "token_shift.py"), "--base", pair["base"], "--policy",
                        pair["policy"], "--responses", str(tmp_path / "r.jsonl"), "--out_dir", str(tmp_path / "out")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'r.jsonl'}:2: expected a JSON object, got list"]
    assert not (tmp_path / "out").exists()


def test_every_option_passes_through_torchrun():
    """torchrun parses the whole command line first: an option of ours that is a prefix of one of its own would be
    taken or rejected. Every option must reach the script intact."""
    from torch.distributed.run import get_args_parser
    ours = [a.option_strings[0] for a in token_shift.get_parser()._actions if a.option_strings and a.dest != "help"]
    argv = [x for opt in ours + ["--config"] for x in (opt, "1")]
    parsed = get_args_parser().parse_args(["--nproc_per_node=2", "token_shift.py"] + argv)
    assert parsed.training_script == "token_shift.py" and parsed.training_script_args == argv


def test_threshold_switch_and_position_deciles_by_hand():
    """eps = 0 switches only where the nuclei differ (JS exactly 0 stays); a 10-token response puts one position in
    each decile of relative position."""
    p = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    assert token_shift.ThresholdSwitch(0.0)(p, q, None, None).tolist() == [False, True]
    row = {"js": [0.0] * 9 + [1.0], "entropy_base": [0.1] * 10, "entropy_policy": [0.1] * 10, "targets": [5] * 10}
    summary = token_shift.summarize([row], [], None, 0.5, 0)
    assert [d["positions"] for d in summary["by_relative_position"]] == [1] * 10
    assert summary["by_relative_position"][-1]["share_high"] == 1.0
    # quantiles by nearest rank: 9 of the 10 positions are 0, so the 90th percentile is 0 (it read the largest, 1)
    assert summary["js_quantiles"] == {"50": 0.0, "90": 0.0, "95": 1.0, "99": 1.0}
    # one model twice (a copy under another path): JS 0 at every position, which the printed lines say
    assert "JS is 0 at every position" not in token_shift.describe(summary, 0.5)
    same = token_shift.summarize([{**row, "js": [0.0] * 10}], [], None, 0.5, 0)
    assert "note: the JS is 0 at every position" in token_shift.describe(same, 0.5)


def test_limit_high_js_and_top_tokens_shape_the_divergence_summary(pair, tmp_path):
    """--limit, --high_js and --top_tokens at other values than their defaults reach the summary they shape."""
    token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--responses", pair["responses"],
                      "--limit", "5", "--high_js", "0.02", "--top_tokens", "3", "--temperature", "0.7",
                      "--out_dir", str(tmp_path), "--plots", "false", "--progress", "false"])
    rows = [json.loads(line) for line in open(tmp_path / "tokens.jsonl")]
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in rows] == [r["id"] for r in pair["records"][:5]] and summary["responses"] == 5
    js = [x for r in rows for x in r["js"]]
    high = sum(x > 0.02 for x in js)
    assert 0 < high < sum(x > 0 for x in js) and sum(x > 0.1 for x in js) != high  # 0.02 is not the default's cut
    assert summary["high_js"]["positions"] == high
    assert summary["share_js_above_0.02"] == pytest.approx(high / len(js))
    distinct = {t for r in rows for t, x in zip(r["token_ids"], r["js"]) if x > 0.02}
    assert len(distinct) > 3 and len(summary["top_high_js_tokens"]) == 3


def test_cross_sampling_settings_reach_the_decode(pair, tmp_path, monkeypatch):
    """--temperature, --template, --limit, --seed (the random control's stream too) and --dtype at other values than
    their defaults reach cross-sampling: with --eps inf its samples are the base's alone, as the engine draws them at
    those settings (and not at the defaults')."""
    dtype, spelled = "float64", "fp64"
    import model as model_module
    real_load, loaded = model_module.load_model, []
    real_switch, control_seeds = token_shift.random_switch, []

    def load_spy(*a, **kw):
        m = real_load(*a, **kw)
        loaded.append(next(m.parameters()).dtype)
        return m

    def switch_spy(rate, seed):
        control_seeds.append(seed)
        return real_switch(rate, seed)
    monkeypatch.setattr(model_module, "load_model", load_spy)
    monkeypatch.setattr(token_shift, "random_switch", switch_spy)
    token_shift.main(["--base", pair["base"], "--policy", pair["policy"], "--cross", "forward", "--task", "toy_task",
                      "--split", pair["split"], "--limit", "4", "--samples_per_prompt", "2",
                      "--max_response_tokens", "10", "--temperature", "0.6", "--template", "plain", "--seed", "11",
                      "--dtype", spelled,
                      "--out_dir", str(tmp_path), "--plots", "false", "--progress", "false", "--eps", "inf"])
    assert loaded == [getattr(torch, dtype)] * 2
    assert control_seeds == [common.derive_seed(11, 0, 1)]
    # the dtype the run computed in, not its spelling: "auto" is float32 here and bfloat16 on a GPU, and which runs
    # plot_cross draws together compares the settings
    assert json.load(open(tmp_path / "cross_forward.json"))["settings"]["dtype"] == dtype
    samples = [json.loads(line) for line in open(tmp_path / "cross_forward_samples.jsonl")]
    got = [s["tokens"] for s in samples if not s["control"]]
    # eps inf: the base alone, as the engine samples it at these settings
    records, _ = tasks.stratified_subset(toy_task.load_split(pair["split"]), 4, toy_task.DIFFICULTY, 11)
    base, tok = real_load(pair["base"], getattr(torch, dtype)).eval(), load_tokenizer(pair["base"])

    def alone(**over):
        s = dict(n=2, temperature=0.6, top_p=1.0, max_new_tokens=10, seed=common.derive_seed(11, 0),
                 template="plain", prompt_numbers=list(range(len(records))))
        s.update(over)
        return [x["tokens"] for x in engine.sample_responses(base, tok, toy_task, records, progress=False, **s)]
    assert len(got) == 8 and got == alone()
    assert got != alone(temperature=1.0) and got != alone(template="auto")  # each setting matters here


def test_the_ranks_check_together_that_they_read_the_same_data(pair, tmp_path, monkeypatch):
    """Each rank reads --responses (the divergence) or --split (cross-sampling) itself: their digests go to
    parallel.same_on_every_rank, which refuses on every rank a file written again between two ranks' reads, before
    the models load or anything is written."""
    seen = refuse_different_data(monkeypatch)
    tok = load_tokenizer(pair["base"])
    common_args = ["--base", pair["base"], "--policy", pair["policy"], "--plots", "false", "--progress", "false"]
    with pytest.raises(common.UserError, match="the ranks read different data"):
        token_shift.main(common_args + ["--responses", pair["responses"], "--out_dir", str(tmp_path / "js")])
    examples = token_shift.read_responses([pair["responses"]], tok, 2048, 0)
    assert seen == [(common.data_digest([[e["id"], e["ids"], e["start"]] for e in examples]), pair["responses"])]
    seen.clear()
    with pytest.raises(common.UserError, match="the ranks read different data"):
        token_shift.main(common_args + ["--cross", "forward", "--task", "toy_task", "--split", pair["split"],
                                        "--out_dir", str(tmp_path / "cross")])
    records = tasks.load_records(toy_task, "toy_task", pair["split"], tok, "auto")
    assert seen == [(common.data_digest(records), pair["split"])] and not os.listdir(tmp_path)


def test_top_high_js_tokens_break_ties_by_token_id_not_by_the_responses_order():
    """--top_tokens cutting through a tie listed the token met first: another order of the same responses gave
    another list."""
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"
    rows = [{"js": [0.5, 0.5, 0.5], "entropy_base": [1.0] * 3, "entropy_policy": [1.0] * 3, "targets": [7, 3, 5]}]
    high = [{"token": t, "overlap": [1.0] * 5, "base_rank": 1, "base_prob": 0.5, "example": 0, "at": a}
            for a, t in enumerate([7, 3, 5])]
    for order in (high, high[::-1]):
        top = token_shift.summarize(rows, order, Tok(), 0.1, 2)["top_high_js_tokens"]
        assert [t["id"] for t in top] == [3, 5]
