"""tiny_base.py: the probe asks exactly what the answer-format pre-training documents taught."""
import pytest

import common
import kk_data
import tiny_base


def test_probe_prompt_is_the_answer_documents_prefix():
    for record in kk_data.generate(7, 3, 5, fixed_names=True, log=lambda *a: None):
        doc = tiny_base.document(record, "answer")
        prompt = tiny_base.answer_prompt(record)
        assert doc.startswith(prompt) and prompt.endswith("\nAnswer:\n")
        assert tiny_base.ANSWER_FORMAT.render_prompt(record, None, "auto") == prompt
        # what follows is the answer sentence the probe scores: right only when finished and every role is right
        answer = doc[len(prompt):]
        assert tiny_base.ANSWER_FORMAT.score(answer, record, True) == 1.0
        assert tiny_base.ANSWER_FORMAT.score(answer, record, False) == 0.0
        first = record["names"][0]
        flipped = answer.replace(f"{first} is a knight", "X").replace(f"{first} is a knave", f"{first} is a knight")
        flipped = flipped.replace("X", f"{first} is a knave")
        assert flipped != answer and tiny_base.ANSWER_FORMAT.score(flipped, record, True) == 0.0


def test_trace_documents_hold_the_question_then_the_teachers_trace():
    for record in kk_data.generate(7, 3, 3, fixed_names=True, log=lambda *a: None):
        doc = tiny_base.document(record, "trace")
        question, trace = doc.split("\nAnswer:\nLet's think step by step.\n")
        assert question == "Question:\n" + record["question"]
        assert trace == kk_data.teacher_response(record) and trace.endswith(kk_data.answer_text(record) + "}.")


def test_table_documents_are_probed_on_their_boxed_answer():
    for record in kk_data.generate(7, 3, 5, fixed_names=True, log=lambda *a: None):
        doc = tiny_base.document(record, "table")
        prompt = tiny_base.answer_prompt(record)
        assert doc == prompt + kk_data.teacher_response(record, "table")
        table = doc[len(prompt):]
        assert tiny_base.ANSWER_FORMAT.score(table, record, True) == 1.0
        wrong = table.replace("knight}", "knave}") if table.endswith("knight}.") else table.replace("knave}", "knight}")
        assert tiny_base.ANSWER_FORMAT.score(wrong, record, True) == 0.0


def test_claim_drill_gives_the_claims_value_on_every_row():
    import numpy as np
    names = kk_data.COMMON_NAMES[:3]
    for seed in range(20):
        drill = tiny_base.claim_drill(np.random.default_rng(seed), names)
        claim, *rows = drill.split("\n")
        assert claim.startswith("Claim: ") and claim.endswith(".") and len(rows) == 8
        for row, (roles, _) in zip(rows, kk_data.table_order(3)):
            head, value = row.split(": ")
            assert head == kk_data.roles_text(roles) and value in ("true", "false")
        # each row's word is the claim's truth value under that row (the same draws give the same claim)
        statement_rng = np.random.default_rng(seed)
        statement = kk_data.sample_statement(statement_rng, 3, int(statement_rng.integers(0, 3)), kk_data.DEPTH)
        truth = kk_data.truth_value(statement, kk_data.knight_masks(3))
        assert [r.endswith("true") for r in rows] == [bool(truth[c]) for _, c in kk_data.table_order(3)]


def test_table_corpus_with_drills(tmp_path, capsys):
    (tmp_path / ".tmp_pretrain.jsonl.k1ll3d_x").write_text("a killed run's write: the whole corpus, kept for good")
    tiny_base.main(["--out_dir", str(tmp_path), "--people", "2-3", "--per_people", "4,6", "--text_format", "table",
                    "--drill_people", "2-3", "--drill_per_people", "3,5", "--fixed_names", "true",
                    "--vocab_size", "2000"])
    assert not (tmp_path / ".tmp_pretrain.jsonl.k1ll3d_x").exists()
    # 18 documents hold far fewer merges than asked: said, not only shown in the last line's count
    assert "note: the text holds merges for" in capsys.readouterr().out
    docs = [d["text"] for d in common.read_jsonl(str(tmp_path / "pretrain.jsonl"))]
    drills = [d for d in docs if d.startswith("Claim: ")]
    puzzles = [d for d in docs if d.startswith("Question:\n")]
    assert len(drills) == 8 and len(puzzles) == 10
    assert sorted(len(d.split("\n")) - 1 for d in drills) == [4] * 3 + [8] * 5  # 2^people rows each
    assert all(p.split("\nAnswer:\n")[1].startswith("knight") for p in puzzles)  # the table's first row


def test_exclude_logic_keeps_the_splits_logical_twins_out_of_the_text(tmp_path, capsys):
    """--exclude keeps a split's puzzles out up to renaming, --exclude_logic up to logic too: the same text with the
    test split under --exclude holds twins of its puzzles (the note says so), under --exclude_logic none."""
    split = tmp_path / "test.jsonl"
    common.write_jsonl(str(split), kk_data.generate(kk_data.OFFICIAL_SEED, 2, 10, log=None, fixed_names=True))
    text = ["--people", "2", "--per_people", "60", "--text_format", "answer", "--drill_per_people", "0",
            "--fixed_names", "true", "--vocab_size", "300"]
    stream = kk_data.generate(300000, 2, 300, log=None, fixed_names=True)  # the text's own stream (--seed)
    test_keys = kk_data.logic_keys(kk_data.load_split(str(split)))

    def text_puzzles(out):
        docs = [d["text"] for d in common.read_jsonl(str(tmp_path / out / "pretrain.jsonl"))]
        puzzles = [r for r in stream if any(r["question"] in d for d in docs)]
        assert len(docs) == len(puzzles) == 60
        return puzzles

    def twins_in_text(out):
        return kk_data.logic_twins(text_puzzles(out), test_keys)
    tiny_base.main(["--out_dir", str(tmp_path / "a"), "--exclude", str(split)] + text)
    assert f"puzzles of {split} have a logically equivalent puzzle in this text" in capsys.readouterr().out
    assert twins_in_text("a") > 0
    tiny_base.main(["--out_dir", str(tmp_path / "b"), "--exclude_logic", str(split)] + text)
    out = capsys.readouterr().out
    assert "logically equivalent" not in out
    assert twins_in_text("b") == 0
    # its swap twins (knights and knaves exchanged): let through and counted, or with --exclude_swap_twins skipped
    swap_twins = kk_data.logic_twins(kk_data.load_split(str(split)),
                                     kk_data.logic_keys(text_puzzles("b")), swapped=True)
    assert swap_twins > 0 and f"note: {swap_twins} of the 10 puzzles of {split} have a swap twin in this text" in out
    tiny_base.main(["--out_dir", str(tmp_path / "c"), "--exclude_logic", str(split), "--exclude_swap_twins", "true"]
                   + text)
    assert "swap twin" not in capsys.readouterr().out
    assert twins_in_text("c") == 0
    assert kk_data.logic_twins(kk_data.load_split(str(split)), kk_data.logic_keys(text_puzzles("c")),
                               swapped=True) == 0
    # (without --exclude_logic it has no split to take twins of: said)
    tiny_base.main(["--out_dir", str(tmp_path / "d"), "--exclude", str(split), "--exclude_swap_twins", "true"] + text)
    assert "note: --exclude_swap_twins not used: only --exclude_logic uses it" in capsys.readouterr().out


@pytest.mark.parametrize("setting, error", [("--trace_fraction=-0.5", r"--trace_fraction must be in \[0, 1\]"),
                                            ("--trace_fraction=1.5", r"--trace_fraction must be in \[0, 1\]"),
                                            ("--vocab_size=-1", r"--vocab_size -1: at least 259"),
                                            ("--vocab_size=258", r"--vocab_size 258: at least 259"),
                                            ("--per_people=0", "no documents"),
                                            ("--probe_out=x.json", "--probe_out without --probe"),
                                            ("--probe_tokens=50", "--probe_tokens without --probe")])
def test_a_setting_out_of_range_is_refused_before_anything_is_written(tmp_path, setting, error):
    """--trace_fraction 1.5 made every mixed document a trace, silently (as --teacher_cot_fraction is refused);
    --vocab_size -1 ended in the tokenizer trainer's OverflowError after the pre-training text was written, and 50
    made a 259-token one, saying so only in its last line; no puzzles and no drills wrote an empty text, then
    failed; a probe's setting with --probe forgotten wrote a corpus (over the default --out_dir's)."""
    with pytest.raises(common.UserError, match=error):
        tiny_base.main(["--out_dir", str(tmp_path / "out"), "--text_format", "mixed", "--drill_per_people", "0",
                        setting])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_defaults_write_the_tiny_presets_corpus(tmp_path):
    """The defaults asked for 1,000 two-people puzzles, of the ~400 there are: the docstring's own command failed.
    Now they are config/tiny.sh's corpus (its names and seed aside)."""
    tiny_base.main(["--out_dir", str(tmp_path)])
    docs = [d["text"] for d in common.read_jsonl(str(tmp_path / "pretrain.jsonl"))]
    assert sum(d.startswith("Claim: ") for d in docs) == 3000 + 9000
    assert sum(d.startswith("Question:\n") for d in docs) == 150 + 6000


def test_the_probes_result_cannot_overwrite_its_split(tiny_checkpoint, tmp_path):
    split = tmp_path / "test.jsonl"
    split.write_text("{}\n")
    with pytest.raises(common.UserError, match="--probe_out"):
        tiny_base.main(["--probe", str(tiny_checkpoint), "--probe_split", str(split), "--probe_out", str(split)])
    assert split.read_text() == "{}\n"


def test_probe_needs_a_split(tiny_checkpoint, capsys):
    with pytest.raises(common.UserError, match="--probe_split"):
        tiny_base.main(["--probe", str(tiny_checkpoint), "--people", "3", "--vocab_size", "500"])
    # (the corpus's settings were dropped without a word, where a probe's without --probe are refused)
    assert ("note: --people and --vocab_size not used: only writing the corpus (no --probe) uses them"
            in capsys.readouterr().out)


@pytest.mark.parametrize("setting", ["--probe_tokens", "--probe_batch"])
def test_probe_sizes_must_be_positive(tiny_checkpoint, tmp_path, setting):
    with pytest.raises(common.UserError, match=f"{setting} must be"):
        tiny_base.main(["--probe", str(tiny_checkpoint), "--probe_split", str(tmp_path / "split.jsonl"), setting, "0"])


def test_answer_line_of_either_document_format():
    assert tiny_base.answer_line("Emma is a knave, Liam is a knight.\nmore") == "Emma is a knave, Liam is a knight"
    assert tiny_base.answer_line("table...\nThe final answer is: \\boxed{Emma is a knave}.") == "Emma is a knave"
