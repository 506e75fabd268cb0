"""scoring.py: unbiased pass@k against hand values and exact binomials, per-difficulty summaries, and the markdown
tables. (generate_and_score against eval.py's own output: test_eval.py's greedy run.)"""
import math

import pytest

import common
import scoring


def test_pass_at_k_hand_values():
    assert scoring.pass_at_k(5, 2, 1) == pytest.approx(0.4)            # c/n
    assert scoring.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)     # 1 - C(3,2)/C(5,2)
    assert scoring.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)     # 1 - C(3,3)/C(5,3)
    assert scoring.pass_at_k(5, 2, 4) == 1.0                           # n - c < k: every 4-subset has a correct one
    assert scoring.pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))


def test_pass_at_k_edges_and_stability():
    for n in (1, 4, 8):
        assert scoring.pass_at_k(n, 0, n) == 0.0         # zero correct
        assert scoring.pass_at_k(n, 0, 1) == 0.0
        assert scoring.pass_at_k(n, n, 1) == 1.0         # all correct
        assert scoring.pass_at_k(n, n, n) == 1.0         # n = k, all correct
        assert scoring.pass_at_k(n, 1, n) == 1.0         # n = k, one correct suffices
    # large n: the product form agrees with exact big-integer binomials (no overflow, no cancellation)
    exact = 1 - math.comb(900, 100) / math.comb(1000, 100)
    assert scoring.pass_at_k(1000, 100, 100) == pytest.approx(exact, rel=1e-12)
    assert scoring.pass_at_k(1000, 1, 1) == pytest.approx(1e-3, rel=1e-12)
    for bad in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            scoring.pass_at_k(*bad)


def test_summarize_per_difficulty():
    records = [{"id": "a", "level": 2}, {"id": "b", "level": 1}, {"id": "c", "level": 2}, {"id": "d", "level": 10}]

    def s(i, reward, finished, length):
        return {"id": i, "reward": reward, "finished": finished, "length": length}
    samples = [s("a", 1.0, True, 10), s("a", 0.0, False, 20),
               s("b", 0.0, True, 4), s("b", 0.0, True, 6),
               s("c", 1.0, True, 8), s("c", 1.0, True, 12),
               s("d", 0.0, False, 20), s("d", 1.0, True, 10)]
    out = scoring.summarize(samples[::-1], records, "level", pass_k=[1, 2, 8])  # order of samples does not matter
    assert out["n"] == 2 and out["pass_k"] == [1, 2]                       # k > n dropped
    assert list(out["by_difficulty"]) == ["1", "2", "10"]                  # natural order, not "1", "10", "2"
    lvl2 = out["by_difficulty"]["2"]
    assert lvl2 == {"prompts": 2, "samples": 4, "accuracy": 0.75, "mean_reward": 0.75, "pass@1": 0.75, "pass@2": 1.0,
                    "mean_length": 12.5, "truncation_rate": 0.25}
    assert out["by_difficulty"]["1"]["accuracy"] == 0.0 and out["by_difficulty"]["1"]["pass@2"] == 0.0
    assert out["by_difficulty"]["10"]["pass@1"] == 0.5
    assert out["overall"] == {"prompts": 4, "samples": 8, "accuracy": 0.5, "mean_reward": 0.5, "pass@1": 0.5,
                              "pass@2": 0.75, "mean_length": 11.25, "truncation_rate": 0.25}
    with pytest.raises(common.UserError, match="same number"):
        scoring.summarize(samples[:-1], records, "level")
    with pytest.raises(common.UserError, match="unknown record"):
        scoring.summarize(samples + [s("zz", 1.0, True, 1)], records, "level")
    # a graded reward (a task module may give one): only reward >= 1 counts as correct, in accuracy as in pass@k
    graded = scoring.summarize([s("a", 0.5, True, 3), s("a", 1.5, True, 3)], records[:1], "level", pass_k=[1, 2])
    assert graded["overall"]["accuracy"] == graded["overall"]["pass@1"] == 0.5
    # levels told apart as load_records tells them: as text (a dict's key took 1, 1.0 and True for one level)
    mixed = [{"id": i, "level": v} for i, v in zip("xyz", (1, 1.0, True))]
    out = scoring.summarize([s(i, 1.0, True, 1) for i in "xyz"], mixed, "level", pass_k=[1])
    assert list(out["by_difficulty"]) == ["1", "1.0", "True"]
    assert all(v["prompts"] == 1 for v in out["by_difficulty"].values())
    assert graded["overall"]["pass@2"] == 1.0 and graded["overall"]["mean_reward"] == 1.0


def test_every_stage_reads_one_rule_of_a_right_answer(tmp_path):
    """A fork's graded rewards (partial credit, a bonus): eval's accuracy and pass@k, RL's logged acc, the
    re-distillation sets' filter and LIMR's solved share all count reward >= 1 as right, and nothing below it."""
    import lim_select
    import sample_policy
    import tasks
    rewards = [0.0, 0.5, 1.0, 1.2]
    assert [tasks.is_correct(r) for r in rewards] == [False, False, True, True]
    samples = [{"id": "a", "prompt": "p", "response": f"r{i}", "reward": r, "finished": True, "length": 3}
               for i, r in enumerate(rewards)]
    assert scoring.summarize(samples, [{"id": "a"}], None)["overall"]["accuracy"] == 0.5
    kept, counts = sample_policy.select(samples, 0, 0, 0)
    assert counts["correct"] == 2 and sorted(s["reward"] for s in kept) == [1.0, 1.2]
    run = tmp_path / "run"
    common.write_jsonl(str(run / "rollouts" / "step_000001.jsonl"),
                       [{"step": 1, "id": "a", "reward": r, "epoch": 0} for r in rewards])
    assert [ok for _, _, ok in lim_select.read_outcomes(str(run), {"a": 0}, 0)] == [False, False, True, True]


def test_markdown_table():
    rows = [{"checkpoint": "base", "people 4": 0.125, "overall": 0.5, "mean len": "812"},
            {"checkpoint": "rl|step", "overall": 1.0}]
    assert scoring.markdown_table(rows) == (
        "| checkpoint | people 4 | overall | mean len |\n"
        "|:---|---:|---:|---:|\n"
        "| base | 0.125 | 0.500 | 812 |\n"  # 3 decimals: every accuracy of a 200-item split exactly (0.125 is no tie)
        "| rl\\|step | – | 1.000 | – |\n")


def test_sampled_records_do_not_depend_on_the_number_of_ranks(tiny_checkpoint, monkeypatch):
    """eval.py's (and validation's) sharded generate-score-gather keys each record's samples by its index in the
    split, with one seed for every rank: 2 ranks' shares, merged, are the 1-rank run's samples (in fp64, where the
    shares' other batch shapes cannot move a token across a CDF boundary). The 2 ranks run one after the other here,
    each seeing only its own rows gathered."""
    import toy_task
    from model import load_model
    from tasks import load_tokenizer
    model, tok = load_model(tiny_checkpoint).double(), load_tokenizer(tiny_checkpoint)
    records = toy_task.make_records(7, seed=2)
    kw = dict(n=2, temperature=1.0, max_new_tokens=8, seed=3, batch_size=2, progress=False)
    whole, _ = scoring.generate_and_score(model, tok, toy_task, records, **kw)
    rows = []
    monkeypatch.setattr(scoring, "world_size", lambda: 2)
    monkeypatch.setattr(scoring, "gather_lists", lambda mine, key: sorted(rows + mine, key=key))
    monkeypatch.setattr(scoring, "summarize", lambda *args: None)  # (one rank's half alone is no summary)
    for r in (0, 1):
        monkeypatch.setattr(scoring, "rank", lambda r=r: r)
        merged, _ = scoring.generate_and_score(model, tok, toy_task, records, **kw)
        rows = [dict(s, index=[x["id"] for x in records].index(s["id"])) for s in merged]
    assert merged == whole and len({s["response"] for s in whole}) > 5  # (sampled: the responses differ)
