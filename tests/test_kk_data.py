"""Tests of kk_data.py: official parity, solver, scorer, loader, splits, teacher data, prompts."""
import itertools
import json
import os
import random
import re

import pytest
from conftest import shared_path

import common
import tasks
import kk_data as K

OFFICIAL_PEOPLE = (3, 4, 5, 6, 7)


def official_records(n):
    return K.load_split(shared_path("data", "kk_official", f"people{n}_sample200.jsonl"))


def boxed(text):
    return "\\boxed{" + text + "}"


# -----------------------------------------------------------------------------
# an independent oracle: itertools + a plain recursive evaluator (no numpy, no kk_data code)


def truth(statement, assignment):
    op = statement[0]
    if op == 'telling-truth':
        return assignment[statement[1]]
    if op == 'lying':
        return not assignment[statement[1]]
    if op == 'not':
        return not truth(statement[1], assignment)
    if op == 'and':
        return all(truth(s, assignment) for s in statement[1:])
    if op == 'or':
        return any(truth(s, assignment) for s in statement[1:])
    if op == '->':
        return (not truth(statement[1], assignment)) or truth(statement[2], assignment)
    if op == '<=>':
        return truth(statement[1], assignment) == truth(statement[2], assignment)
    raise AssertionError(op)


def brute_force(statements):
    return sorted(a for a in itertools.product([True, False], repeat=len(statements))
                  if all(a[i] == truth(s, a) for i, s in enumerate(statements)))


# -----------------------------------------------------------------------------
# the official records in ../shared (indices 100-299 of 3-7 people)


@pytest.mark.parametrize("n", OFFICIAL_PEOPLE)
def test_official_records_solver_and_scorer(n):
    for rec in official_records(n):
        statements = K.parse_statements(rec['statements'], n)
        assert K.solve(statements) == [tuple(rec['solution'])]
        assert K.score("So the answer is " + boxed(rec['solution_text']), rec, True) == 1.0
        assert K.score(boxed(rec['solution_text']), rec, False) == 0.0
        parts = K.answer_text(rec).split(', ')
        for i in range(n):
            flipped = dict(rec, solution=[s != (j == i) for j, s in enumerate(rec['solution'])])
            assert K.score(boxed(K.answer_text(flipped)), rec, True) == 0.0
            assert K.score(boxed(', '.join(parts[:i] + parts[i + 1:])), rec, True) == 0.0


@pytest.mark.parametrize("n", OFFICIAL_PEOPLE)
def test_official_mode_reproduces_official_records(n):
    records = official_records(n)
    ours = K.generate(K.OFFICIAL_SEED, n, max(r['index'] for r in records) + 1, log=None)
    for rec in records:
        mine = ours[rec['index']]
        for field in K.OFFICIAL_FIELDS:
            assert mine[field] == rec[field], (rec['index'], field)
        assert mine['id'] == rec['id'] == f"kk-official-p{n}-{rec['index']:05d}"
        assert mine['question'] == rec['question']


def test_official_file_is_normalised():
    rec = official_records(3)[0]
    assert rec['people'] == 3 and rec['index'] == 100
    assert rec['question'] == (rec['quiz'] + " Your final answer should be in this format: "
                               "\\boxed{XX is a knave, YY is a knight, ...}")
    assert set(K.OFFICIAL_FIELDS) <= set(rec)


def test_teacher_response_of_official_record():
    rec = official_records(5)[3]
    response = K.teacher_response(rec)
    assert response.startswith(rec['cot_head'] + " " + rec['cot_repeat_steps'][0])
    assert response.endswith("\\boxed{" + K.answer_text(rec) + "}.")
    assert K.score(response, rec, True) == 1.0
    assert " ".join(rec['cot_repeat_steps']) in response


# -----------------------------------------------------------------------------
# generation: uniqueness re-checked independently, the official grammar, any number of people


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10])
def test_generated_puzzles_unique_by_independent_brute_force(n):
    count = 8 if n == 10 else 25
    seen = set()
    for index, statements, solution in K.sample_puzzles(77, n, count):
        assert brute_force(statements) == [solution]
        assert statements not in seen
        seen.add(statements)
        for speaker, s in enumerate(statements):
            assert s[0] in ('telling-truth', 'lying', 'not', 'and', 'or', '->', '<=>')
            leaves = [s] if s[0] in K.LEAF_KINDS else list(s[1:])
            assert all(leaf[0] in K.LEAF_KINDS for leaf in leaves)  # depth <= 2
            assert ('lying', speaker) not in leaves
            if s[0] in ('and', 'or', '->', '<=>'):
                assert len(s) == 3 and s[1] != s[2]
    assert len(seen) == count


def test_solver_matches_brute_force_on_raw_statements():
    """Including puzzles with 0 or several solutions, which generation rejects."""
    import numpy as np
    rng = np.random.default_rng(5)
    counts = set()
    for _ in range(300):
        n = int(rng.integers(2, 7))
        statements = tuple(K.sample_statement(rng, n, p, 2) for p in range(n))
        solutions = K.solve(statements)
        assert sorted(solutions) == brute_force(statements)
        counts.add(min(len(solutions), 2))
    assert counts == {0, 1, 2}


def test_record_text_and_fields():
    rec = K.generate(99, 4, 1, log=None)[0]
    assert rec['id'] == "kk-s99-p4-00000" and rec['people'] == 4
    assert rec['quiz'].startswith("A very special island is inhabited only by knights and knaves. ")
    assert rec['quiz'].endswith(" So who is a knight and who is a knave?")
    assert (f"You meet 4 inhabitants: {rec['names'][0]}, {rec['names'][1]}, {rec['names'][2]}, "
            f"and {rec['names'][3]}.") in rec['quiz']
    assert all(name in K.COMMON_NAMES for name in rec['names']) and len(set(rec['names'])) == 4
    assert rec['question'] == (rec['quiz'] + " Your final answer should be in this format: \\boxed{XX is a knave, "
                               "YY is a knight, ...}")  # (the paper's words)
    assert rec['solution_text_format'].count("\n") == 3 and rec['solution_text_format'].startswith("(1) ")
    assert K.parse_statements(rec['statements'], 4) is not None
    assert list(K.solve(K.parse_statements(rec['statements'], 4))[0]) == rec['solution']
    json.dumps(rec)  # plain JSON types only (no numpy scalars)
    assert "np." not in rec['statements']


def test_generate_skips_excluded_puzzles_and_keeps_stream_indices():
    first = K.generate(7, 3, 5, log=None)
    excluded = {K.parse_statements(first[1]['statements'], 3), K.parse_statements(first[3]['statements'], 3)}
    kept = K.generate(7, 3, 5, exclude=excluded, log=None)
    assert [r['index'] for r in kept] == [0, 2, 4, 5, 6]
    assert kept[0] == first[0] and kept[2] == first[4]


# -----------------------------------------------------------------------------
# the scorer: hand-written cases

PEOPLE = {'names': ["Emma", "Liam", "Sophia"], 'solution': [True, False, True], 'knight_knave': dict(K.KNIGHT_KNAVE)}
RIGHT = "Emma is a knight, Liam is a knave, Sophia is a knight"

SCORER_CASES = [
    # harmless form -> 1.0
    (boxed(RIGHT), 1.0),
    (boxed("Emma is a knight, Liam is a knave, and Sophia is a knight."), 1.0),
    (boxed("Sophia is a knight, Emma is a knight, Liam is a knave"), 1.0),
    (boxed("\\text{Emma is a knight, Liam is a knave, Sophia is a knight}"), 1.0),
    (boxed("\\text{Emma is a knight}, \\text{Liam is a knave}, \\text{Sophia is a knight}"), 1.0),
    (boxed("\\textbf{Emma} is a knight, \\textbf{Liam} is a knave, \\textbf{Sophia} is a knight"), 1.0),
    (boxed("\\mathrm{Emma\\ is\\ a\\ knight},\\quad \\mathrm{Liam\\ is\\ a\\ knave},\\; Sophia~is~a~knight"), 1.0),
    (boxed("{\\tt Emma} is a knight, {\\sf Liam} is a knave, {\\sc Sophia} is a {\\sl knight}"), 1.0),  # (\tt: no \t)
    (boxed("Emma is a knight,\\\\Liam is a knave,\\\\Sophia is a knight"), 1.0),  # LaTeX line breaks, no space
    (boxed("(1) Emma is a knight\n(2) Liam is a knave\n(3) Sophia is a knight"), 1.0),
    (boxed("1. Emma is a knight 2. Liam is a knave 3. Sophia is a knight."), 1.0),
    (boxed("- Emma is a knight\n- Liam is a knave\n- Sophia is a knight"), 1.0),
    (boxed("Emma is a knight\nLiam is a knave\nSophia is a knight"), 1.0),
    (boxed("Emma is a knight,\r\n\tLiam is a knave,\r\n\tSophia is a knight"), 1.0),
    (boxed("EMMA IS A KNIGHT, LIAM IS A KNAVE, SOPHIA IS A KNIGHT"), 1.0),
    (boxed("emma is a Knight, liam is a Knave, sophia is a Knight"), 1.0),
    (boxed("  Emma   is  a knight ,Liam is a   knave,  Sophia is a knight  "), 1.0),
    (boxed("Emma and Sophia are knights, Liam is a knave"), 1.0),
    (boxed("Emma and Sophia are both knights, and Liam is a knave."), 1.0),
    (boxed("Liam is a knave; Emma, Sophia are all knights"), 1.0),
    (boxed("Emma: knight, Liam: knave, Sophia: knight"), 1.0),
    (boxed("Emma is knight, Liam is knave, Sophia is knight"), 1.0),
    (boxed("Emma is a knight; Liam is a knave; Sophia is a knight"), 1.0),
    (boxed("(1) Emma is a knight (2) Liam is a knave (3) Sophia is a knight (4)"), 1.0),
    (boxed(boxed(RIGHT)), 1.0),
    ("Let me guess " + boxed("Emma is a knave, Liam is a knave, Sophia is a knave") + ". No, wait: " + boxed(RIGHT),
     1.0),
    ("Reasoning...\nThe final answer is: " + boxed(RIGHT) + ". Done!", 1.0),
    ("{{{ unbalanced reasoning }} " + boxed(RIGHT), 1.0),
    # substance wrong or outside the last box -> 0.0
    (RIGHT, 0.0),                                                     # no box
    ("(1) Emma is a knight\n(2) Liam is a knave\n(3) Sophia is a knight", 0.0),
    (boxed(""), 0.0),
    ("The answer: " + RIGHT + ". " + boxed(""), 0.0),                 # answer outside the (last) box
    (boxed(RIGHT) + " or maybe " + boxed("Emma is a knave, Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("?") + " " + RIGHT, 0.0),
    (boxed(RIGHT) + " " + "\\boxed{Emma is a knight", 0.0),           # the last box is unclosed
    (boxed("Emma is a knight, Liam is a knave"), 0.0),                # missing name
    (boxed("Emma is a knight, Liam is a knave, Sophia"), 0.0),        # a name with no role
    (boxed("Emma is a knight, Liam is a knight, Sophia is a knight"), 0.0),  # one role flipped
    (boxed("Emma is a knave, Liam is a knight, Sophia is a knave"), 0.0),
    (boxed("Emma is a knight, Emma is a knave, Liam is a knave, Sophia is a knight"), 0.0),  # both roles
    (boxed("Emma is a knight, Emma is a knight, Liam is a knave, Sophia is a knight"), 0.0),  # named twice
    (boxed("Emma and Emma are knights, Liam is a knave, Sophia is a knight"), 0.0),
    (boxed(RIGHT + ", Noah is a knave"), 0.0),                        # unknown name
    (boxed("Emma is a knight, Noah is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave, Sofia is a knight"), 0.0),  # Sofia is not Sophia
    (boxed("Emma is a knight knave, Liam is a knave, Sophia is a knight"), 0.0),  # extra role claim
    (boxed(RIGHT + ", knight"), 0.0),
    (boxed(RIGHT + ". All three are knights"), 0.0),
    (boxed("knight: Emma, knave: Liam, knight: Sophia"), 0.0),        # role before any name
    (boxed("Emma is a knight or a knave, Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is not a knave, Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma, Liam and Sophia are knights"), 0.0),
    (boxed("everyone is a knight"), 0.0),
    (boxed("knight, knave, knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave, Sophia is a knight, Liam is a knight"), 0.0),
    # a negation, "or" or "if and only if" in symbols is a claim, as the words are; formatting commands, a single
    # arrow (a name mapped to its role) and typed escapes (\n, \t) are not
    (boxed("Emma = knight, Liam != knave, Sophia = knight"), 0.0),
    (boxed("Emma = knight, Liam <> knave, Sophia = knight"), 0.0),    # not-equal, as written in SQL, Pascal, ...
    (boxed("Emma = knight, Liam /= knave, Sophia = knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave, Sophia is !knave"), 0.0),  # C's "not"
    (boxed("Emma is a knight! Liam is a knave! Sophia is a knight!"), 1.0),  # (an exclamation)
    (boxed("Emma: knight ✓, Liam: knave ✓, Sophia: knave ✗"), 0.0),  # a role struck out
    # a right claim negated, which the parser read as the claim (a red-team's finds, each 1.0 before): "!" or "~"
    # before it, markdown's strike, "|" and "||" for "or", crosses and prohibition signs, HTML entities, strokes
    (boxed("Emma is a knight, !(Liam is a knave), Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, ! Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, ~(Liam is a knave), Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, ～(Liam is a knave), Sophia is a knight"), 0.0),  # full-width: NFKC folds it to ~
    (boxed("Emma is a knight, ~~Liam is a knave~~, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight || Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight | Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma: knight ✓, Liam: knave ✖, Sophia: knight ✓"), 0.0),
    (boxed("Emma: knight, Liam: knave 🚫, Sophia: knight"), 0.0),
    (boxed("Emma is a knight, Liam is ⌐knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is &#172; knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is &not; knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave\u0336, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave\u20e0, Sophia is a knight"), 0.0),
    (boxed("Emma~is~a~knight,~Liam~is~a~knave,~Sophia~is~a~knight"), 1.0),  # LaTeX's space, run into words
    (boxed("Emma is a knight,~ Liam is a knave,~ Sophia is a knight!"), 1.0),
    (boxed("Emma is a knight &amp; Liam is a knave &amp; Sophia is a knight"), 1.0),  # "&" is form
    (boxed("Emma: knight ✓, Liam: knave ✔, Sophia: knight ✓"), 1.0),
    (boxed("Emma = knight, Liam =\\= knave, Sophia = knight"), 0.0),
    (boxed("Emma ∈ knights, Liam ∉ knaves, Sophia ∈ knights"), 0.0),  # a struck-through symbol: "not in"
    (boxed("Emma ∈ knights, Liam ∈ knaves, Sophia ∈ knights"), 1.0),
    (boxed("Emma = knight, Liam \\neq knave, Sophia = knight"), 0.0),
    (boxed("Emma = knight, Liam ≠ knave, Sophia = knight"), 0.0),
    (boxed("Emma is a knight, Liam is \\lnot a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is ¬ a knight, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight \\lor Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight ∨ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight \\implies Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight -> Liam is a knave, Sophia is a knight"), 0.0),  # an arrow between claims: "if"
    (boxed("Emma is a knight → Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma -> Liam -> knight, Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight ⟷ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight <==> Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight ≡ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam ∼ knight, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam ￢knight, Sophia is a knight"), 0.0),  # full-width: NFKC folds it to ¬
    (boxed("Emma is a knight \\iff Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight <=> Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam \\ne knight, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is \\not a knight, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is \\theta, Sophia is a knight"), 0.0),  # an unknown command
    (boxed("Emma = knight, Liam = knave, Sophia = knight"), 1.0),
    (boxed("Emma -> knight, Liam -> knave, Sophia -> knight"), 1.0),
    (boxed("Emma \\to knight, Liam \\Rightarrow knave, Sophia → knight"), 1.0),
    (boxed("Emma => a knight, Liam --> a knave, Sophia ⟹ a knight"), 1.0),
    (boxed("\\boldsymbol{Emma}\\colon knight, \\bm{Liam}\\colon knave, Sophia\\colon knight"), 1.0),
    (boxed("Emma is a knight \\land Liam is a knave \\wedge Sophia is a knight"), 1.0),
    (boxed("\\textup{Emma is a knight \\newline Liam is a knave \\newline Sophia is a knight}"), 1.0),
    (boxed("Emma is a knight,\\nLiam is a knave,\\nSophia is a knight"), 1.0),  # typed "\\n" escapes
    (boxed("Emma is a knight,\\nand Liam is\\ta knave,\\r\\nSophia is a knight"), 1.0),
    # a fuzzer's finds (2026-12-07), each 1.0 before: a strike after punctuation, a hedge in an outer box around the
    # last one, crosses, "or" / NAND / "entails" / negation signs and "|" look-alikes off the list, an overline, a
    # doubt's "?" or percentage, a LaTeX comment hiding a claim
    (boxed("Emma is a knight,~~Liam is a knave~~, Sophia is a knight"), 0.0),
    (boxed("Emma is a knave, Liam is a knight, Sophia is a knave \\text{ or } " + boxed(RIGHT)), 0.0),
    (boxed("Emma: knight ✓, Liam: knave ☓, Sophia: knight ✓"), 0.0),
    (boxed("Emma is a knight ⋎ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight ∣ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight ⊧ Liam is a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is ⫬ a knave, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave\u0305, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave (?), Sophia is a knight"), 0.0),
    (boxed("Emma is a knight (100%), Liam is a knave (50%), Sophia is a knight (50%)"), 0.0),
    (boxed("Emma is a knight, Liam is a knave, Sophia % is a knight\n"), 0.0),
    # (2026-12-07) "all but" read as a plain claim, and a doubt's odds as a fraction, each 1.0 before
    (boxed("Emma and Sophia are knights, all but Liam are knaves"), 0.0),
    (boxed("Emma is a knight, Liam is a knave (1/2), Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave: 50 / 50, Sophia is a knight"), 0.0),
    (boxed("Emma is a knight, Liam is a knave (\u00bd), Sophia is a knight"), 0.0),
    (boxed("1. Emma is a knight 2. Liam is a knave 3. Sophia is a knight"), 1.0),
    # ... and right answers in harmless forms, each 0.0 before: linking words, "the", a contraction, a LaTeX array
    # (its "l|l" no "or"), list bullets, spacing, a box inside a box
    (boxed("Emma is a knight, but Liam is a knave, and Sophia is also a knight"), 1.0),
    (boxed("Emma is the knight, while Liam is the knave; Sophia is a knight as well"), 1.0),
    (boxed("Emma's a knight, Liam's a knave, Sophia's a knight"), 1.0),
    (boxed("\\begin{array}{l|l}Emma & knight\\\\ Liam & knave\\\\ Sophia & knight\\end{array}"), 1.0),
    (boxed("\\begin{itemize}\\item Emma is a knight \\item Liam is a knave \\item Sophia is a knight"
           "\\end{itemize}"), 1.0),
    (boxed("Emma is a knight \\bullet Liam is a knave \\cdot\\hspace{1em}Sophia is a knight"), 1.0),
    (boxed("\\fbox{" + RIGHT + "}"), 1.0),
]


@pytest.mark.parametrize("response,expected", SCORER_CASES)
def test_scorer_hand_written_cases(response, expected):
    assert K.score(response, PEOPLE, True) == expected
    assert K.score(response, PEOPLE, False) == 0.0  # truncated: never rewarded


def test_scorer_reads_a_name_in_either_unicode_form():
    zoe = {'names': ["Zo\u00eb", "Liam"], 'solution': [True, False], 'knight_knave': dict(K.KNIGHT_KNAVE)}
    assert K.score(boxed("Zoe\u0308 is a knight, Liam is a knave"), zoe, True) == 1.0  # e + combining diaeresis
    zoe['names'][0] = "Zoe\u0308"
    assert K.score(boxed("Zo\u00eb is a knight, Liam is a knave"), zoe, True) == 1.0


def test_scorer_names_are_whole_words_and_role_words_come_from_the_record():
    ella = {'names': ["Ella", "Isabella"], 'solution': [False, True], 'knight_knave': dict(K.KNIGHT_KNAVE)}
    assert K.score(boxed("Ella is a knave, Isabella is a knight"), ella, True) == 1.0
    assert K.score(boxed("Isabella is a knight"), ella, True) == 0.0
    saints = {'names': ["Emma", "Liam"], 'solution': [True, False],
              'knight_knave': {'knight': 'saint', 'knave': 'sinner', 'a_knight': 'a saint', 'a_knave': 'a sinner'}}
    assert K.score(boxed("Emma is a saint, Liam is a sinner"), saints, True) == 1.0
    assert K.score(boxed("Emma is a knight, Liam is a knave"), saints, True) == 0.0
    heroes = {'names': ["Emma", "Liam", "Mia"], 'solution': [True, True, False],
              'knight_knave': {'knight': 'hero', 'knave': 'villain', 'a_knight': 'a hero', 'a_knave': 'a villain'}}
    assert K.score(boxed("Emma and Liam are heroes, Mia is a villain"), heroes, True) == 1.0  # (hero + es)
    assert K.score(boxed("Emma and Liam are heros, Mia is a villain"), heroes, True) == 1.0
    assert K.score(boxed("Emma and Liam are heroes, Mia is a heroine"), heroes, True) == 0.0  # (not a role's form)
    assert K.score(boxed("Emma and Liam are villains, Mia is a hero"), heroes, True) == 0.0


@pytest.mark.parametrize("arrow", ["-->", "==>", "↦", "---->", "➡", "⇨", "↠"])
def test_every_arrow_between_claims_is_an_if_and_between_a_name_and_its_role_a_claim(arrow):
    assert K.score(boxed(f"Emma is a knight {arrow} Liam is a knave, Sophia is a knight"), PEOPLE, True) == 0.0
    assert K.score(boxed(f"Emma {arrow} knight, Liam {arrow} knave, Sophia {arrow} knight"), PEOPLE, True) == 1.0


@pytest.mark.parametrize("arrow", ["<-", "<--", "<=", "<==", "←", "⟵", "⇐", "⟸", "⊃", "⊢", "⊨", "↤", "⟽", "↞", "⇜",
                                   "⬸", "🡐", "↩", "⊣", "⊇", "⇀", "⤳"])
def test_an_arrow_pointing_back_between_claims_is_an_if(arrow):
    """"B <- A" says "B if A", as "A -> B" does: a conditional answer scores 0 whichever way its arrow points; any
    arrow of Unicode's arrow blocks but the mapping ones ("Emma -> knight") is content, found by name, not listed."""
    assert K.score(boxed(f"Emma is a knight {arrow} Liam is a knave, Sophia is a knight"), PEOPLE, True) == 0.0


@pytest.mark.parametrize("response", [
    None, 42, b"\\boxed{Emma is a knight}", "",
    "\\boxed{" + "{" * 100_000,
    ("\\boxed{x} " * 10_000)[:100_000],
    "}" * 50_000 + "\\boxed{" + "}" * 50_000,
    "\\boxed{" * 14_000,
    "\\boxed{" + "a" * 99_990 + "}",
    "\\boxed{" + "Emma " * 20_000 + "}",
    "\\boxed{" + "\\text" * 20_000 + "}",
    "\\" * 100_000,
    "\\boxed{" + "(" * 50_000 + ")" * 50_000 + "}",
    "\\boxed{" + "-" * 9_990 + "}",  # arrow-like runs with no ">" (each tried from its start only)
    "\\boxed{" + "=" * 9_990 + "}",
    ("\\boxed{\\text{" + "Emma is a knight, " * 3) * 1500,
    "\\boxed{" + RIGHT + "}" + "\\boxed{" + "x{" * 40_000,
])
def test_scorer_adversarial_inputs_score_zero_without_raising(response):
    assert K.score(response, PEOPLE, True) == 0.0


# -----------------------------------------------------------------------------
# the scorer: property tests on random puzzles


def harmless_form(names, solution, rng, kk=K.KNIGHT_KNAVE):
    """The given assignment written in a random harmless form."""
    items = list(zip(names, solution))
    rng.shuffle(items)
    sentence = rng.choice(["{name} is {a_role}", "{name} is {role}", "{name}: {role}", "\\text{{{name} is {a_role}}}",
                           "{name} is \\textbf{{{role}}}"])
    parts = []
    for name, s in items:
        part = sentence.format(name=name, role=kk['knight'] if s else kk['knave'],
                               a_role=kk['a_knight'] if s else kk['a_knave'])
        parts.append(part.upper() if rng.random() < 0.2 else part)
    if rng.random() < 0.3:
        parts = [f"({i + 1}) {p}" for i, p in enumerate(parts)]
    separator = rng.choice([", ", "; ", "\n", " and ", ",\n", " ,  "])
    text = separator.join(parts)
    if rng.random() < 0.5:
        text += "."
    if rng.random() < 0.3:  # grouped plural form instead
        knights = [n for n, s in items if s]
        knaves = [n for n, s in items if not s]
        groups = [" and ".join(g) + (" are knights" if len(g) > 1 else " is a knight") for g in [knights] if g]
        groups += [" and ".join(g) + (" are knaves" if len(g) > 1 else " is a knave") for g in [knaves] if g]
        rng.shuffle(groups)
        text = ", ".join(groups)
    return "Thinking... " + rng.choice(["", "The final answer is: "]) + boxed(text) + rng.choice(["", ".", "\n"])


def test_scorer_properties_on_random_puzzles():
    rng = random.Random(0)
    for n in (2, 3, 4, 5, 6, 7, 8, 9, 10):
        for rec in K.generate(31, n, 6, log=None):
            truth_ = tuple(rec['solution'])
            for _ in range(5):
                assert K.score(harmless_form(rec['names'], truth_, rng), rec, True) == 1.0
            others = [a for a in itertools.product([True, False], repeat=n) if a != truth_]
            for other in (others if n <= 4 else rng.sample(others, 15)):
                assert K.score(harmless_form(rec['names'], other, rng), rec, True) == 0.0
            i = rng.randrange(n)
            dropped = [x for j, x in enumerate(rec['names']) if j != i]
            assert K.score(harmless_form(dropped, truth_[:i] + truth_[i + 1:], rng), rec, True) == 0.0
            assert K.score(K.teacher_response(rec), rec, True) == 1.0
            assert K.score(K.teacher_response(rec), rec, False) == 0.0


# -----------------------------------------------------------------------------
# loading: malformed records give one clear error naming file, line and field


def write_lines(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def a_record():
    return {k: v for k, v in K.generate(3, 3, 1, log=None)[0].items() if k in K.OFFICIAL_FIELDS}


def renamed(record, names):
    """The record with these names, its quiz naming them in the old ones' places (so the name checks are reached)."""
    quiz = record['quiz']
    for i, old in enumerate(record['names']):
        quiz = re.sub(rf"\b{re.escape(old)}\b", f"\x00{i}\x00", quiz)
    for i, name in enumerate(names):
        quiz = quiz.replace(f"\x00{i}\x00", name)
    record.update(names=names, quiz=quiz)


@pytest.mark.parametrize("breakage,field", [
    (lambda r: r.pop('statements'), 'statements'),
    (lambda r: r.pop('index'), 'index'),
    (lambda r: r.update(statements="__import__('os').system('echo hacked')"), 'statements'),
    (lambda r: r.update(statements="((('telling-truth', 0),"), 'statements'),
    (lambda r: r.update(statements="(('telling-truth', 0), ('lying', 7), ('telling-truth', 1))"), 'statements'),
    (lambda r: r.update(statements="(('telling-truth', 0), ('xor', ('lying', 0), ('lying', 1)), ('telling-truth', 1))"),
     'statements'),
    (lambda r: r.update(statements="(('telling-truth', 0), ('telling-truth', 1))"), 'statements'),
    (lambda r: r.update(solution=r['solution'][:-1]), 'solution'),
    (lambda r: r.update(names=r['names'] + ["Noah"]), 'solution'),
    (lambda r: r.update(solution=[not x for x in r['solution']]), 'solution'),
    (lambda r: r.update(solution=[1, 0, 1]), 'solution'),
    (lambda r: r.update(names="Emma, Liam"), 'names'),
    (lambda r: r.update(names=[r['names'][0]] * 3), 'names'),
    (lambda r: r.update(names=["Zo\u00eb", "Zoe\u0308", "Liam"]), 'names'),  # one name in two Unicode forms
    (lambda r: r.update(knight_knave=None), 'knight_knave'),
    (lambda r: r['knight_knave'].update(knave="Knight"), 'knight_knave'),  # the scorer could not tell them apart
    (lambda r: r['knight_knave'].update(knight="brave knight"), 'knight_knave'),
    (lambda r: r['knight_knave'].update(knave="all"), 'knight_knave'),
    (lambda r: r['knight_knave'].update(knight="hero", knave="heroe"), 'knight_knave'),  # "heroes" would be both
    (lambda r: renamed(r, r['names'][:2] + ["Knaves"]), 'names'),  # "Liam and Knaves are knaves": three names
    (lambda r: r.update(names=[f"P{chr(97 + i)}" for i in range(21)]), 'names'),  # over MAX_PEOPLE: 2^21 rows
    (lambda r: r.update(people=3.0), 'people'),
    (lambda r: r.update(index=-5), 'index'),
    (lambda r: r.update(quiz=r['quiz'].replace(r['names'][1], "Xavier")), 'quiz'),  # another puzzle's text
    (lambda r: r.update(question="Who is a knight?"), 'question'),
    (lambda r: r.update(question=" and ".join(r['names']) + " each say nothing."), 'question'),  # the same names
    (lambda r: r.update(cot_repeat_steps="one step"), 'cot_repeat_steps'),
    (lambda r: r.update(index="12"), 'index'),
    (lambda r: r.update(people=5), 'people'),
    (lambda r: r.update(id=True), 'id'),  # (an integer id is an id: below)
    (lambda r: r.update(id=""), 'id'),
    # names the scorer cannot read back: every answer, the right one too, would score 0
    (lambda r: renamed(r, ["A", "B", "C"]), 'names'),                     # "a" is also a filler word
    (lambda r: renamed(r, ["Anne-Marie", "Liam", "Sophia"]), 'names'),
    (lambda r: renamed(r, ["Mary Ann", "Liam", "Sophia"]), 'names'),
    (lambda r: renamed(r, ["R2", "Liam", "Sophia"]), 'names'),
    (lambda r: renamed(r, ["Knight", "Liam", "Sophia"]), 'names'),
])
def test_malformed_record_error_names_file_line_and_field(tmp_path, breakage, field):
    good, bad = a_record(), a_record()
    bad['index'] = good['index'] + 1
    breakage(bad)
    path = str(tmp_path / "split.jsonl")
    write_lines(path, [good, bad])
    with pytest.raises(common.UserError) as err:
        K.load_split(path)
    assert f"{path}:2" in str(err.value) and f"'{field}'" in str(err.value)
    if "Zo\u00eb" in str(bad['names']):
        assert "repeated name" in str(err.value)


def test_an_integer_id_is_taken_as_its_text(tmp_path):
    """docs/data.md: an id is a string or an integer (K&K refused the integer); ids are matched as text."""
    path = str(tmp_path / "split.jsonl")
    second = dict(a_record(), id=0)
    second["index"] += 1
    write_lines(path, [dict(a_record(), id=7), second])
    assert [r["id"] for r in K.load_split(path)] == ["7", "0"]  # (0 too: not taken for a missing id)
    for bad in ("  ", True, 1.0, ""):  # (one rule with every split's: tasks.is_id; a blank id names nothing)
        write_lines(path, [dict(a_record(), id=bad)])
        with pytest.raises(common.UserError, match=r"split\.jsonl:1: field 'id' .*must be a non-blank string or an "
                                                   r"integer"):
            K.load_split(path)


def test_a_record_of_other_role_words_is_asked_for_an_answer_in_them(tmp_path):
    # (the official generator's random_knight_knave_pairs: its question asked for "XX is a knave", which scored 0)
    record = a_record()
    record['knight_knave'] = {'knight': 'hero', 'knave': 'villain', 'a_knight': 'a hero', 'a_knave': 'a villain'}
    path = str(tmp_path / "split.jsonl")
    write_lines(path, [record])
    loaded = K.load_split(path)[0]
    assert loaded['question'].endswith(" Your final answer should be in this format: \\boxed{XX is a villain, YY is "
                                       "a hero, ...}")
    roles = ['a hero' if knight else 'a villain' for knight in loaded['solution']]
    asked = ", ".join(f"{name} is {role}" for name, role in zip(loaded['names'], roles))
    assert K.score(boxed(asked), loaded, True) == 1.0


def test_load_split_rejects_bad_json_and_repeated_ids(tmp_path):
    path = str(tmp_path / "split.jsonl")
    write_lines(path, [a_record(), "{not json"])
    with pytest.raises(common.UserError, match=r"split\.jsonl:2"):
        K.load_split(path)
    write_lines(path, [a_record(), a_record()])  # same index -> same id
    with pytest.raises(common.UserError, match=r"split\.jsonl:2: field 'id'"):
        K.load_split(path)
    bad = a_record()
    bad.update(index=bad["index"] + 1, names="Emma")
    write_lines(path, [a_record(), "", "", bad])  # blank lines count: errors name the file's line, not the record's
    with pytest.raises(common.UserError, match=r"split\.jsonl:4: field 'names'"):
        K.load_split(path)
    with pytest.raises(common.UserError, match="not found"):
        K.load_split(str(tmp_path / "missing.jsonl"))


def test_load_split_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # optional: without pyarrow a parquet split is a clear error naming the fix
        path = tmp_path / "people3_num4.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(common.UserError, match="needs pyarrow"):
            K.load_split(str(path))
        return
    rows = [{k: v for k, v in r.items() if k in K.OFFICIAL_FIELDS} for r in K.generate(K.OFFICIAL_SEED, 3, 4, log=None)]
    path = str(tmp_path / "people3_num4.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert K.load_split(path) == K.generate(K.OFFICIAL_SEED, 3, 4, log=None)


# -----------------------------------------------------------------------------
# the CLI: the paper's splits, --official, --teacher_sft


def counts(records):
    out = {}
    for r in records:
        out[r['people']] = out.get(r['people'], 0) + 1
    return out


def official_test_statements(people):
    return {s for n in people for _, s, _ in K.sample_puzzles(K.OFFICIAL_SEED, n, K.OFFICIAL_TEST_SIZE)}


def test_cli_writes_the_splits_without_test_leakage(tmp_path, capsys):
    out = str(tmp_path / "kk")
    K.main(["--out_dir", out, "--train_people", "2-4", "--train_per_people", "60,150,150", "--test_people", "4,5",
            "--test_per_people", "20", "--sft_people", "2-3", "--sft_per_people", "30,40", "--train_seed", "5"])
    printed = capsys.readouterr().out
    assert "s per 1,000" in printed and "per people: 2: 60, 3: 150, 4: 150" in printed
    test, train, sft = (K.load_split(os.path.join(out, f"{s}.jsonl")) for s in ("test", "train", "sft"))
    assert counts(test) == {4: 20, 5: 20} and counts(train) == {2: 60, 3: 150, 4: 150}
    assert counts(sft) == {2: 30, 3: 40}
    assert [r['id'] for r in test[:3]] == ["kk-official-p4-00000", "kk-official-p4-00001", "kk-official-p4-00002"]
    assert test == [r for n in (4, 5) for r in K.generate(K.OFFICIAL_SEED, n, 20, log=None)]
    test_set = official_test_statements([2, 3, 4, 5])
    test_set |= K.statements_of(test)
    train_set, sft_set = K.statements_of(train), K.statements_of(sft)
    assert not train_set & test_set and not sft_set & test_set and not sft_set & train_set
    assert not {K.parse_statements(r['statements'], r['people']) for r in train + sft} & test_set
    assert len(train_set) <= len(train) and len({r['id'] for r in train + sft + test}) == len(train + sft + test)
    for rec in train + sft:
        assert brute_force(K.parse_statements(rec['statements'], rec['people'])) == [tuple(rec['solution'])]


def test_no_train_or_sft_puzzle_is_a_test_puzzle_renamed_or_reordered(tmp_path):
    """Two people, where few puzzles exist: no train / SFT puzzle is a test puzzle with the people permuted
    (names swapped, statements reordered) or the operands of and / or / <=> swapped."""
    import itertools
    out = str(tmp_path / "kk")
    K.main(["--out_dir", out, "--fixed_names", "true", "--test_people", "2", "--test_per_people", "50",
            "--train_people", "2", "--train_per_people", "40", "--sft_people", "2", "--sft_per_people", "20",
            "--test_dedup", "renaming"])  # (up to logic, 50 two-people test puzzles leave too few to train on)
    test, train, sft = (K.load_split(os.path.join(out, f"{s}.jsonl")) for s in ("test", "train", "sft"))

    def forms(rec):  # every renaming, symmetric operands sorted
        st = K.parse_statements(rec['statements'], rec['people'])
        return {tuple(K._relabel(st[p.index(i)], p) for i in range(len(st)))
                for p in itertools.permutations(range(len(st)))}
    test_forms = set().union(*(forms(r) for r in test))
    assert not any(forms(r) & test_forms for r in train + sft)


def test_cli_train_on_the_official_seed_skips_every_official_test_puzzle(tmp_path, capsys):
    """The dedup really runs: the official stream's first 100 puzzles are its test split. A size of 0 is allowed: that
    split is not written (an empty file, which every stage refuses, was), and an earlier run's file of it goes."""
    out = str(tmp_path / "kk")
    common.write_jsonl(os.path.join(out, "sft.jsonl"), [{"id": "an earlier run's"}])
    K.main(["--out_dir", out, "--train_people", "3", "--train_per_people", "20", "--train_seed", "1234",
            "--test_people", "4", "--test_per_people", "5", "--sft_people", "2", "--sft_per_people", "0"])
    train = K.load_split(os.path.join(out, "train.jsonl"))
    assert [r['index'] for r in train] == list(range(100, 120))
    assert not os.path.exists(os.path.join(out, "sft.jsonl"))
    assert f"note: no records for {os.path.join(out, 'sft.jsonl')}: not written (an earlier one removed)" in (
        capsys.readouterr().out)


def test_cli_official_mode(tmp_path):
    out = str(tmp_path / "kk")
    K.main(["--official", "true", "--official_people", "2", "--out_dir", out])
    test = common.read_jsonl(os.path.join(out, "official", "test", "people2_num100.jsonl"))
    train = common.read_jsonl(os.path.join(out, "official", "train", "people2_num200.jsonl"))
    assert [r['index'] for r in test + train] == list(range(300))
    assert all(list(r) == list(K.OFFICIAL_FIELDS) for r in test + train)
    loaded = K.load_split(os.path.join(out, "official", "test", "people2_num100.jsonl"))
    assert loaded[7]['id'] == "kk-official-p2-00007"
    assert loaded == K.generate(K.OFFICIAL_SEED, 2, 100, log=None)


def test_cli_rejects_bad_settings(tmp_path):
    with pytest.raises(common.UserError, match="train_people"):
        K.main(["--out_dir", str(tmp_path), "--train_people", "three"])
    with pytest.raises(common.UserError, match="sft_per_people"):
        K.main(["--out_dir", str(tmp_path), "--sft_people", "2-3", "--sft_per_people", "1,2,3"])
    with pytest.raises(common.UserError, match="between 2"):
        K.main(["--out_dir", str(tmp_path), "--test_people", "1-3"])
    with pytest.raises(common.UserError, match="repeated"):  # would write its puzzles twice, under the same ids
        K.main(["--out_dir", str(tmp_path), "--train_people", "3,3"])
    with pytest.raises(common.UserError, match="between 2"):  # (a range was expanded first: 8 billion counts)
        K.main(["--out_dir", str(tmp_path), "--test_people", "4-8000000000"])
    with pytest.raises(common.UserError, match=r"'9-3': the range runs from low to high \(3-9\)"):
        K.main(["--out_dir", str(tmp_path), "--train_people", "9-3"])  # (it said: between 2 and 20)
    with pytest.raises(common.UserError, match="'-5': a size is a count of puzzles, 0 or more"):
        K.main(["--out_dir", str(tmp_path), "--train_per_people", "-5"])


def tiny_chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|endoftext|>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def test_render_prompt_chat_and_plain():
    rec = K.generate(11, 3, 1, log=None)[0]
    plain = K.render_prompt(rec, None, "plain")
    assert plain == "Question:\n" + rec['question'] + "\nAnswer:\nLet's think step by step."
    chat = K.render_prompt(rec, tiny_chat_tokenizer())
    assert chat == ("<|im_start|>system\n" + tasks.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n" + rec['question']
                    + "<|im_end|>\n<|im_start|>assistant\n")
    assert K.render_prompt(rec, object()) == plain  # auto: no chat template -> plain


def test_cli_teacher_sft(tmp_path):
    split = str(tmp_path / "sft.jsonl")
    common.write_jsonl(split, K.generate(K.OFFICIAL_SEED, 3, 5, log=None))
    tok_dir = str(tmp_path / "tok")
    tiny_chat_tokenizer().save_pretrained(tok_dir)
    out = str(tmp_path / "teacher.jsonl")
    K.main(["--teacher_sft", out, "--split", split, "--tokenizer", tok_dir])
    rows = common.read_jsonl(out)
    records = K.load_split(split)
    assert [r['id'] for r in rows] == [r['id'] for r in records]
    for row, rec in zip(rows, records):
        assert set(row) == {"id", "task", "prompt", "response"} and row['task'] == "kk"
        assert row['prompt'].endswith("<|im_start|>assistant\n") and rec['question'] in row['prompt']
        assert row['response'] == K.teacher_response(rec)
        assert K.score(row['response'], rec, True) == 1.0
    K.main(["--teacher_sft", out, "--split", split, "--template", "plain"])
    row = common.read_jsonl(out)[0]
    assert row['prompt'].endswith("step by step.") and row['response'] == "\n" + K.teacher_response(records[0])
    with pytest.raises(common.UserError, match="--tokenizer"):
        K.main(["--teacher_sft", out, "--split", split])
    with pytest.raises(common.UserError, match=r"--teacher_sft .*sft\.jsonl: that is an input \(--split\)"):
        K.main(["--teacher_sft", split, "--split", split, "--template", "plain"])
    assert K.load_split(split) == records  # not replaced by SFT rows


def test_fixed_names_keep_the_stream_and_templates_and_only_rename(tmp_path):
    random_named = K.generate(K.OFFICIAL_SEED, 3, 20, log=None)
    fixed = K.generate(K.OFFICIAL_SEED, 3, 20, log=None, fixed_names=True)
    for r, f in zip(random_named, fixed):
        assert f['names'] == K.COMMON_NAMES[:3] and f['id'] == r['id'] and f['solution'] == r['solution']
        assert f['statements'] == r['statements']
        rename = dict(zip(r['names'], f['names']))  # whole words: "Ava" is in "Avery"
        renamed = re.sub(r"\b(" + "|".join(r['names']) + r")\b", lambda m: rename[m.group(1)], r['question'])
        assert renamed == f['question']  # same templates, only the names differ
        assert K.score(K.teacher_response(f), f, True) == 1.0
        assert K.score(K.teacher_response(r), f, True) == 0.0 or r['names'] == f['names']
    out = tmp_path / "kk"
    K.main(["--out_dir", str(out), "--fixed_names", "true", "--test_people", "2-3", "--test_per_people", "3",
            "--train_people", "3", "--train_per_people", "4", "--sft_people", "2", "--sft_per_people", "2"])
    for name in ("test", "train", "sft"):
        for rec in K.load_split(str(out / f"{name}.jsonl")):
            assert rec['names'] == K.COMMON_NAMES[:rec['people']]


def test_teacher_style_answer(tmp_path):
    rec = K.generate(K.OFFICIAL_SEED, 2, 1, log=None)[0]
    answer = K.teacher_response(rec, "answer")
    assert answer == "The final answer is: \\boxed{" + K.answer_text(rec) + "}."
    assert K.teacher_response(rec).endswith("\n" + answer)  # the trace ends with the same line
    assert K.score(answer, rec, True) == 1.0
    with pytest.raises(common.UserError, match="teacher style"):
        K.teacher_response(rec, "essay")
    split, out = str(tmp_path / "sft.jsonl"), str(tmp_path / "teacher.jsonl")
    common.write_jsonl(split, [rec])
    K.main(["--teacher_sft", out, "--split", split, "--template", "plain", "--teacher_style", "answer"])
    assert common.read_jsonl(out)[0]['response'] == "\n" + answer


def test_table_rows_stop_at_the_solution():
    for n in (2, 3, 4):
        for rec in K.generate(11, n, 20, log=None):
            statements = K.parse_statements(rec['statements'], n)
            rows = K.table_rows(statements)
            order = list(K.table_order(n))
            masks = K.knight_masks(n)
            for row, (roles, column) in zip(rows, order):
                head, rest = row.split(": ")
                words = rest.rstrip(".").split(" ")
                assert head == K.roles_text(roles)
                values = [bool(K.truth_value(s, masks)[column]) for s in statements]
                # the values up to the first that contradicts its speaker, then the verdict
                k = next((i for i, v in enumerate(values) if v != roles[i]), n)
                assert words[:-1] == ["true" if v else "false" for v in values[:min(k + 1, n)]]
                assert words[-1] == ("yes" if k == n else "no")
            assert rows[-1].endswith("yes.") and sum(r.endswith("yes.") for r in rows) == 1
            assert order[len(rows) - 1][0] == tuple(rec['solution'])  # the consistent row is the solution
    response = K.teacher_response(rec, "table")
    assert response == "\n".join(rows) + "\nThe final answer is: \\boxed{" + K.answer_text(rec) + "}."
    assert K.score(response, rec, True) == 1.0


def test_teacher_cot_fraction_mixes_chain_of_thought_and_answer_alone(tmp_path):
    split, out = str(tmp_path / "sft.jsonl"), str(tmp_path / "teacher.jsonl")
    records = K.generate(5, 3, 200, log=None)
    common.write_jsonl(split, records)
    args = ["--teacher_sft", out, "--split", split, "--template", "plain", "--teacher_style", "table"]
    K.main(args + ["--teacher_cot_fraction", "0.25"])
    rows = common.read_jsonl(out)
    with_table = [r["response"] == "\n" + K.teacher_response(rec, "table") for r, rec in zip(rows, records)]
    alone = [r["response"] == "\n" + K.teacher_response(rec, "answer") for r, rec in zip(rows, records)]
    assert all(a != b for a, b in zip(with_table, alone)) and 30 <= sum(with_table) <= 70
    K.main(args + ["--teacher_cot_fraction", "0.25"])
    assert common.read_jsonl(out) == rows  # the same puzzles every time (seeded)
    K.main(args)  # default 1: every response carries the table
    assert all(r["response"].startswith("\nknight") for r in common.read_jsonl(out))
    with pytest.raises(common.UserError, match="teacher_cot_fraction"):
        K.main(args + ["--teacher_cot_fraction", "1.5"])


def test_load_split_from_the_hub_uses_the_official_dataset(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    local = str(tmp_path / "people3_num100.jsonl")
    common.write_jsonl(local, [{k: r[k] for k in K.OFFICIAL_FIELDS}
                               for r in K.generate(K.OFFICIAL_SEED, 3, 3, log=None)])
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **kw: asked.append((a, kw)) or local)
    records = K.load_split("hf://test/people3_num100.jsonl")
    assert asked == [(("K-and-K/knights-and-knaves", "test/people3_num100.jsonl"), {"repo_type": "dataset"})]
    assert [r['id'] for r in records] == ["kk-official-p3-00000", "kk-official-p3-00001", "kk-official-p3-00002"]


def test_cli_sft_val_fraction_holds_out_the_paper_share_of_the_sft_pool(tmp_path):
    """--sft_val_fraction 0.1 is the paper's cut: the pool shuffled with seed 1234, the first int(0.9 n) for SFT, the
    rest held out but for the logical twins of SFT puzzles; 0 (the default) writes the whole pool in the generator's
    order and no sft_val.jsonl."""
    base = ["--train_people", "3", "--train_per_people", "4", "--test_people", "4", "--test_per_people", "2",
            "--sft_people", "2", "--sft_per_people", "60"]  # (2 people: 41 logic classes, so twins)
    K.main(base + ["--out_dir", str(tmp_path / "whole")])
    pool = K.load_split(str(tmp_path / "whole" / "sft.jsonl"))
    assert len(pool) == 60 and not (tmp_path / "whole" / "sft_val.jsonl").exists()
    K.main(base + ["--out_dir", str(tmp_path / "cut"), "--sft_val_fraction", "0.1"])
    train = K.load_split(str(tmp_path / "cut" / "sft.jsonl"))
    val = K.load_split(str(tmp_path / "cut" / "sft_val.jsonl"))
    shuffled = list(pool)
    random.seed(1234)  # the paper's K_and_K_preprocess, as written there
    random.shuffle(shuffled)
    assert [r["id"] for r in train] == [r["id"] for r in shuffled[:int(60 * 0.9)]]
    # held out: the rest, less those with a logical twin in sft.jsonl (the same truth table, answer and chain of
    # thought: no held-out data; the paper's cut kept them)
    in_train = {K.logic_key(K.parse_statements(r["statements"], r["people"])) for r in train}
    rest = shuffled[int(60 * 0.9):]
    twins = [r for r in rest if K.logic_key(K.parse_statements(r["statements"], r["people"])) in in_train]
    assert twins and [r["id"] for r in val] == [r["id"] for r in rest if r not in twins]
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(common.UserError, match="sft_val_fraction"):
            K.main(base + ["--out_dir", str(tmp_path / "bad"), "--sft_val_fraction", bad])


def test_cli_config_file_with_bare_numbers(tmp_path):
    config = tmp_path / "kk.json"
    config.write_text(json.dumps({"train_people": 3, "train_per_people": 4, "test_people": 4, "test_per_people": 2,
                                  "sft_people": 2, "sft_per_people": 3, "out_dir": str(tmp_path / "kk")}))
    K.main(["--config", str(config)])
    assert counts(K.load_split(str(tmp_path / "kk" / "train.jsonl"))) == {3: 4}
    assert counts(K.load_split(str(tmp_path / "kk" / "sft.jsonl"))) == {2: 3}


def test_asking_for_more_puzzles_than_a_size_has_says_so():
    """Two people allow a few hundred distinct unique-solution puzzles, each drawn once: asking for more is an error
    that says how many were found and why, not a bare 'after 1000 tries'."""
    with pytest.raises(common.UserError, match=r"with 2 people after 1000 tries \(\d+ found\): few puzzles of that "
                                               r"size exist.*ask for fewer"):
        for _ in K.sample_puzzles(0, 2, 100000):
            pass


def test_logic_key_equates_a_claim_worded_otherwise_and_nothing_else():
    """logic_key: a puzzle whose claim is worded otherwise ("not a knave" for "a knight", "if A then B" for "B or not
    A"), renamed or not, is the same logic problem (one key, where puzzle_key tells them apart); a puzzle of other
    logic keys apart; and over the generator's 399 two-people puzzles it gives the same classes as comparing every
    renaming's truth table outright (41)."""
    import numpy as np
    a = (("->", ("telling-truth", 1), ("telling-truth", 0)), ("not", ("lying", 0)))
    b = (("telling-truth", 1), ("->", ("telling-truth", 0), ("telling-truth", 1)))  # a renamed and reworded
    c = (("or", ("telling-truth", 0), ("not", ("telling-truth", 1))), ("telling-truth", 0))  # a's claims reworded
    assert K.puzzle_key(a) != K.puzzle_key(b) and K.puzzle_key(a) != K.puzzle_key(c)
    assert K.logic_key(a) == K.logic_key(b) == K.logic_key(c)

    def brute(statements):  # every renaming's truth table, the smallest
        n = len(statements)
        masks = K.knight_masks(n)
        truth = [K.truth_value(s, masks) for s in statements]
        forms = []
        for order in itertools.permutations(range(n)):
            old = sum(((np.arange(2 ** n) >> k) & 1) << p for k, p in enumerate(order))
            forms.append(tuple(tuple(truth[p][old].tolist()) for p in order))
        return min(forms)
    puzzles = [s for _, s, _ in itertools.islice(K.sample_puzzles(5, 2, 10 ** 6), 399)]
    other = next(s for s in puzzles if K.solve(s) != K.solve(a))
    assert K.logic_key(other) != K.logic_key(a)
    by_key, by_brute = {}, {}
    for i, s in enumerate(puzzles):
        by_key.setdefault(K.logic_key(s), set()).add(i)
        by_brute.setdefault(brute(s), set()).add(i)
    assert len(by_key) == 41 and sorted(map(sorted, by_key.values())) == sorted(map(sorted, by_brute.values()))


def test_swapped_logic_key_is_the_key_of_the_puzzle_with_knights_and_knaves_exchanged():
    """logic_key(swapped=True): the key of the puzzle written with the roles exchanged (each atom's role flipped, each
    claim negated: g(a) = not f(not a)), whose solution is every role flipped; swapping twice gives the puzzle back,
    and a puzzle is not its own swap twin where its solution is not."""
    def swap(s):  # "X is a knight" <-> "X is a knave", inside every connective
        return (("lying" if s[0] == "telling-truth" else "telling-truth", s[1]) if s[0] in ("telling-truth", "lying")
                else (s[0], *map(swap, s[1:])))
    for _, statements, solution in itertools.islice(K.sample_puzzles(7, 3, 10 ** 6), 60):
        written = tuple(("not", swap(s)) for s in statements)
        assert K.solve(written) == [tuple(not x for x in solution)]
        assert K.logic_key(statements, swapped=True) == K.logic_key(written) != K.logic_key(statements)
        assert K.logic_key(written, swapped=True) == K.logic_key(statements)


def test_the_split_writer_counts_the_test_puzzles_with_a_logical_twin_in_training(tmp_path, capsys):
    """kk_data.py says how many test puzzles have a logically equivalent puzzle in the RL split and the SFT pool
    (what puzzle_key lets through), counted by logic_key from the files it wrote."""
    K.main(["--out_dir", str(tmp_path), "--fixed_names", "true", "--test_people", "2", "--test_per_people", "10",
            "--train_people", "2", "--train_per_people", "30", "--sft_people", "2", "--sft_per_people", "10",
            "--train_seed", "100000", "--sft_seed", "200000", "--test_dedup", "renaming"])
    out = capsys.readouterr().out
    test, train, sft = (K.load_split(str(tmp_path / f"{name}.jsonl")) for name in ("test", "train", "sft"))
    for name, split in (("RL train split", train), ("SFT pool", sft)):
        twins = K.logic_twins(test, K.logic_keys(split))
        assert twins > 0
        assert f"note: {twins} of the 10 test puzzles have a logically equivalent puzzle in the {name}" in out
        swap_twins = K.logic_twins(test, K.logic_keys(split), swapped=True)  # (what logic lets through: also said)
        assert f"note: {swap_twins} of the 10 test puzzles have a swap twin in the {name}" in out
    assert K.logic_twins(test, K.logic_keys(test)) == 10


def test_by_default_no_train_or_sft_puzzle_is_a_logical_twin_of_a_test_puzzle(tmp_path, capsys):
    """--test_dedup logic (the default): the splits where 'renaming' lets twins through (the test above) hold none,
    the stream skips them and keeps its ids, and no note is printed."""
    args = ["--out_dir", str(tmp_path), "--fixed_names", "true", "--test_people", "2", "--test_per_people", "10",
            "--train_people", "2-3", "--train_per_people", "30,20", "--sft_people", "2", "--sft_per_people", "10",
            "--train_seed", "100000", "--sft_seed", "200000"]
    K.main(args)
    assert "logically equivalent" not in capsys.readouterr().out
    test, train, sft = (K.load_split(str(tmp_path / f"{name}.jsonl")) for name in ("test", "train", "sft"))
    assert counts(train) == {2: 30, 3: 20} and counts(sft) == {2: 10}
    test_keys = K.logic_keys(test)
    assert K.logic_twins(train + sft, test_keys) == 0
    assert not K.statements_of(train) & K.statements_of(sft)  # (train and the SFT pool: apart by puzzle_key)
    # the stream's own indices: a skipped twin leaves a gap, and every skipped index is a twin or a used puzzle
    kept = {r['index'] for r in train if r['people'] == 2}
    stream = {i: s for i, s, _ in K.sample_puzzles(100000, 2, max(kept) + 1)}
    skipped = [i for i in stream if i not in kept]
    used = K.statements_of(test) | official_test_statements([2])  # (generate's `exclude`)
    assert skipped and any(K.logic_key(stream[i]) in test_keys for i in skipped)
    assert all(K.logic_key(stream[i]) in test_keys or {stream[i], K.puzzle_key(stream[i])} & used for i in skipped)


def test_swap_dedup_keeps_the_test_puzzles_swap_twins_out_which_logic_counts_in_a_note(tmp_path, capsys):
    """--test_dedup logic lets a test puzzle's swap twin (knights and knaves exchanged) into RL and the SFT pool and
    says how many test puzzles have one there; --test_dedup swap skips them as it skips logical twins, the pools keep
    their sizes, and no note is printed."""
    args = ["--fixed_names", "true", "--test_people", "2", "--test_per_people", "10", "--train_people", "2",
            "--train_per_people", "30", "--sft_people", "2", "--sft_per_people", "10",
            "--train_seed", "100000", "--sft_seed", "200000"]
    K.main(["--out_dir", str(tmp_path / "logic")] + args)
    out = capsys.readouterr().out
    test, train, sft = (K.load_split(str(tmp_path / "logic" / f"{name}.jsonl")) for name in ("test", "train", "sft"))
    for name, split in (("RL train split", train), ("SFT pool", sft)):
        twins = K.logic_twins(test, K.logic_keys(split), swapped=True)
        assert twins > 0
        assert f"note: {twins} of the 10 test puzzles have a swap twin in the {name}" in out
    K.main(["--out_dir", str(tmp_path / "swap"), "--test_dedup", "swap"] + args)
    assert "swap twin" not in capsys.readouterr().out
    test2, train, sft = (K.load_split(str(tmp_path / "swap" / f"{n}.jsonl")) for n in ("test", "train", "sft"))
    assert test2 == test and len(train) == 30 and len(sft) == 10
    for split in (train, sft):
        assert K.logic_twins(test, K.logic_keys(split), swapped=True) == 0
        assert K.logic_twins(test, K.logic_keys(split)) == 0  # (and still no logical twin)


def test_generate_skips_the_logical_twins_it_is_given_and_only_those():
    """generate(twins=...): a stream minus every puzzle whose logic_key is given, in its order; keys of another
    people count change nothing."""
    stream = K.generate(7, 2, 40, log=None)
    twins = K.logic_keys(stream[:3])
    kept = K.generate(7, 2, 20, log=None, twins=twins | K.logic_keys(K.generate(7, 3, 5, log=None)))
    assert kept[:5] == [r for r in stream if K.logic_key(K.parse_statements(r['statements'], 2)) not in twins][:5]
    assert K.logic_twins(kept, twins) == 0
    assert K.generate(7, 3, 5, log=None, twins=twins) == K.generate(7, 3, 5, log=None)


def test_logic_keys_beyond_their_people_limit_are_refused_before_any_work(monkeypatch):
    """logic_key's renamings grow factorially with the people: 20 puzzles of 12 people took 42 s, of 14 more than
    5 min, and kk_data.py accepts 20 people under its default --test_dedup logic."""
    big = K.generate(1234, K.LOGIC_KEY_MAX_PEOPLE + 4, 2)
    keys = K.logic_keys(K.generate(1234, 3, 5))
    real, computed = K.logic_key, []
    monkeypatch.setattr(K, "logic_key", lambda statements, swapped=False: computed.append(len(statements))
                        or real(statements, swapped))
    with pytest.raises(common.UserError, match=rf"puzzles of {K.LOGIC_KEY_MAX_PEOPLE + 4} people: .*--test_dedup "
                                               r"renaming"):
        K.logic_keys(big + K.generate(1234, 3, 2))
    assert K.logic_twins(big, keys) == 0 and computed == []  # (no key of their people count: none computed)


def test_the_refused_people_counts_advice_runs(tmp_path, monkeypatch):
    """The refusal beyond LOGIC_KEY_MAX_PEOPLE advises --test_dedup renaming (and tiny_base.py --exclude), but their
    note on the twins left computed every puzzle's key and refused them too; the note compares only the people
    counts both splits have, up to the limit."""
    import tiny_base
    real, computed = K.logic_key, []
    monkeypatch.setattr(K, "logic_key", lambda statements, swapped=False: computed.append(len(statements))
                        or real(statements, swapped))
    big = K.LOGIC_KEY_MAX_PEOPLE + 1
    K.main(["--out_dir", str(tmp_path / "kk"), "--test_people", "3", "--test_per_people", "2", "--train_people",
            f"3,{big}", "--train_per_people", "2", "--sft_people", "3", "--sft_per_people", "2", "--test_dedup",
            "renaming"])
    assert {r["people"] for r in K.load_split(str(tmp_path / "kk" / "train.jsonl"))} == {3, big}
    assert computed and set(computed) == {3}  # (the 3-people ones are compared)
    tiny_base.main(["--out_dir", str(tmp_path / "tb"), "--people", str(big), "--per_people", "2", "--drill_per_people",
                    "0", "--exclude", str(tmp_path / "kk" / "test.jsonl")])
    assert os.path.getsize(tmp_path / "tb" / "pretrain.jsonl") > 0 and set(computed) == {3}


def test_an_empty_or_unreadable_split_is_refused(tmp_path):
    """An empty split (a size of 0 writes one) was taken where records are needed: tiny_base.py --probe divided by
    its zero records, and kk_data.py --teacher_sft wrote an empty file over a good one. A damaged .parquet gave
    pyarrow's traceback (pyarrow where installed)."""
    import tiny_base
    empty, teacher = tmp_path / "empty.jsonl", tmp_path / "teacher.jsonl"
    empty.write_text("\n")
    teacher.write_text("earlier\n")
    with pytest.raises(common.UserError, match=r"empty\.jsonl: no records \(an empty split\): no teacher samples"):
        K.main(["--teacher_sft", str(teacher), "--split", str(empty), "--template", "plain"])
    assert teacher.read_text() == "earlier\n"
    with pytest.raises(common.UserError, match=r"empty\.jsonl: no records \(an empty split\): nothing to probe"):
        tiny_base.main(["--probe", str(tmp_path / "no_model"), "--probe_split", str(empty)])
    pytest.importorskip("pyarrow")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(common.UserError, match=r"bad\.parquet: cannot read it as parquet \("):
        K.load_split(str(tmp_path / "bad.parquet"))
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(common.UserError, match=r"dir\.parquet: a directory, not a file"):
        K.load_split(str(tmp_path / "dir.parquet"))


def test_a_teacher_setting_without_teacher_sft_is_refused_before_any_split_is_written(tmp_path):
    """`kk_data.py --split S --tokenizer T` (--teacher_sft forgotten) wrote every split, 11,500 records, over --out_dir's
    (math_data.py did too): refused now, nothing written."""
    import math_data
    with pytest.raises(common.UserError, match=r"^--split and --tokenizer without --teacher_sft: give --teacher_sft to "
                                               r"use them, or leave them out to write the splits$"):
        K.main(["--out_dir", str(tmp_path / "kk"), "--split", "s.jsonl", "--tokenizer", "tok"])
    with pytest.raises(common.UserError, match=r"^--tokenizer without --teacher_sft"):
        math_data.main(["--out_dir", str(tmp_path / "math"), "--tokenizer", "tok"])
    assert not list(tmp_path.iterdir())
