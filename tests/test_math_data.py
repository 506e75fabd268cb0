"""math_data.py: loading, splits, prompts, \\boxed{} extraction and the grader."""
import json
import os
import re
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, shared_path
import common
import tasks
import math_data
from math_data import extract_boxed, score


def grade(pred, gold):
    """Score a finished response whose last box holds `pred`."""
    return score(f"Some reasoning.\nThe final answer is $\\boxed{{{pred}}}$.", {"answer": gold}, True)


# (gold, boxed prediction): each pair must score 1.0
EQUAL = [
    ("\\frac{1}{2}", "\\frac12"),
    ("8\\sqrt{3} \\text { square inches}", "\\sqrt{192}"),  # "\\text {": a pool gold writes the space
    ("5", "5 \\text {cm}"),
    ("5", "5\\text { cm}"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("6", "2(3)"),  # a number times a bracketed number (math-verify read 2 + 3)
    ("15", "(3)(5)"),
    ("-6", "-2(3)"),
    ("2x+2", "2(x+1)"),
    ("10_3", "10"),  # a number without its base, as before
    ("1011_2", "1011_{2}"),
    ("15", "3\\ (5)"),
    ("\\log_2 3", "\\log_2(3)"),  # a subscript or power before the bracket: not a product
    ("\\cos^2 1", "\\cos^2(1)"),
    ("5", "5\\,\\mathrm{cm^2}"),  # digits in text that say no second value: a unit's power, a base
    ("5", "5\\text{ cm$^2$}"),
    ("52_8", "\\text{52}_8"),
    ("52_8", "52_8 \\text{ (base 8)}"),
    ("\\mathbf{2340}", "\\mathbf{2\\ 340}"),
    ("\\dfrac{1}{2}", "\\tfrac12"),
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("\\frac{\\sqrt2}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("\\frac{14}{3}", "4\\frac{2}{3}"),
    ("(-\\infty, 3]", "(-\\infty,3]"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty,5)\\cup (5,\\infty)", "(-\\infty, 5) \\cup (5, \\infty)"),
    ("\\left[-3,-\\frac{4}{3}\\right)", "[-3, -4/3)"),
    ("\\{1,2,3\\}", "\\{3,1,2\\}"),
    ("1, 2", "2, 1"),
    ("1,-2", "-2, 1"),
    ("0, 1, 2, 4", "4,2,1,0"),
    ("(1,2)", "(1, 2)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"),
    ("(4,-2,3)", "\\left(4, -2, 3\\right)"),
    ("3", "x=3"),
    ("x=3", "3"),
    ("y = 2x + 3", "y=2x+3"),
    ("30^\\circ", "30"),
    ("30", "30^{\\circ}"),
    ("30^\\circ", "30^\\circ"),
    ("45", "45^\\circ"),
    ("50\\%", "50"),
    ("5", "5\\text{ cm}"),
    ("5\\text{ cm}", "5"),
    ("12", "12 \\text{ inches}"),
    ("\\$5", "5"),
    ("1,000", "1000"),
    ("1000", "1{,}000"),
    ("1000000", "1,000,000"),
    ("10,\\!000", "10000"),
    ("10,\\! 080", "10080"),
    ("45^\\circ, 135^\\circ", "45, 135"),
    ("1,\\!080^\\circ", "1080^\\circ"),  # a separator before a degree, percent or unit sign
    ("2160", "2,160^{\\circ}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{pmatrix} 1/2 \\\\ 0 \\end{pmatrix}", "\\begin{pmatrix} 0.5 \\\\ 0 \\end{pmatrix}"),
    ("\\text{(C)}", "C"),
    ("C", "(C)"),
    ("\\text{(C)}", "\\text{(C)}"),
    ("\\textbf{(B)}", "B"),
    ("\\text{Evelyn}", "Evelyn"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("10", "10.0"),
    ("27.0", "27"),
    ("3", "03"),
    ("p - q", "p-q"),
    ("x^2+2x", "x(x+2)"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\pi", "\\pi"),
    ("-\\frac{1}{3}", "\\frac{-1}{3}"),
    ("\\infty", "\\infty"),
    ("5", "\\text{5}"),
    ("5", "$5$"),
    ("5", "5."),
    ("e^{x^2}", "e^{x^{2}}"),
    ("9\\text{ a.m.}", "9 \\text{AM}"),
    ("9\\text{ a.m.}", "9"),  # (no marker: read as math-verify reads it)
    ("\\pm 3", "\\pm3"),  # (\pm is not p.m.)
    # a time gold written whole in \text, or its marker bare: the marker's place is form (both compared first)
    ("\\text{4:30 p.m.}", "4:30 \\text{ p.m.}"),
    ("\\text{4:30 p.m.}", "4:30 \\text{ PM}"),
    ("4\\!:\\!51\\!:\\!06 \\text{ p.m.}", "4:51:06 p.m."),
    ("4:30 p.m.", "4:30 pm"),
    # a gold's trailing period or comma: math-verify read only part of it
    ("\\frac{7}{5} + \\frac{1}{5} i.", "\\frac{7+i}{5}"),
    ("\\text{(E)},", "E"),
    ("\\dfrac{1}{29,\\!322,\\!216}", "\\frac{1}{29322216}"),  # thin-space thousands inside an expression
    ("\\frac \\pi4 + 2 - \\sqrt2", "\\frac{\\pi}{4} + 2 - \\sqrt{2}"),  # an unbraced command argument
    ("2007 + \\frac\\pi 2", "2007 + \\frac{\\pi}{2}"),
    # a red-team's finds, 0.0 before: math-verify's unit rule dropped a variable at the end after a digit (c, t, ab)
    ("9c+6", "6+9c"),
    ("6t - 5", "-5+6t"),
    ("\\frac{8t}{3}", "\\frac{8}{3}t"),
    ("a^2+2ab", "2ab+a^2"),
    ("a + b + c", "c+b+a"),
    ("\\sin^2 t", "\\sin^{2} t"),
    # ... with that rule off, units are still dropped, by as_graded's own rules
    ("5", "5\\text{ km/h}"),
    ("5", "5 \\text{ m/s}"),
    ("5", "5\\quad\\text{cm}"),
    ("5", "5\\text{ cm}^2\\text{.}"),
    ("5", "5\\mathrm{~cm}"),
    ("5", "5^\\circ\\text{F}"),
    ("5", "5 \\text{ o'clock}"),
    ("12", "12 square units"),
    ("12\\sqrt{3} m", "12\\sqrt{3}"),  # (a pool gold)
    ("1+2i", "1+2\\mathrm{i}"),  # an upright i (or e) is no unit
    ("6i", "6\\,\\mathrm{i}"),
    ("\\text{east}", "\\text{East}"),  # words: math-verify read them as products of letters (E: Euler's number)
    ("\\text{Evelyn}", "evelyn"),
    ("\\text{odd}", "\\displaystyle \\text{ODD}"),
    ("60", "60°"),  # a Unicode degree sign
    ("60^\\circ", "60°"),
    # (a reviewer's: a unit after \pi or a letter, a count, spacing in words, a variable m)
    ("99\\pi \\text{ square inches}", "99\\pi"),  # (a pool gold)
    ("16\\pi", "16\\pi \\text{ cm}^2"),
    ("16\\pi", "16\\pi square units"),
    ("x", "x \\text{ cm}"),
    ("12", "12 students"),
    ("210", "210 ways"),
    ("\\text{two lines}", "\\text{two\\ lines}"),
    ("2m", "2 m"),
    ("5", "5\\text{ cm^ 2}"),
    ("40\\text{ min}", "40"),  # (a pool gold)
]

# (gold, boxed prediction): near misses that must score 0.0
UNEQUAL = [
    ("x=5", "y=5"),  # a line's answer: the variable's name counts
    ("y = -\\frac{47}{8}", "x = -\\frac{47}{8}"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("\\frac{1}{2}", "2"),
    ("\\frac{1}{2}", "-\\frac{1}{2}"),
    ("2", "-2"),
    ("10", "100"),
    ("1,000", "100"),
    ("12", "1,2"),
    ("45^\\circ, 135^\\circ", "45135"),  # a list of angles, not a number with a thousands separator
    ("2, 100", "2100"),
    ("\\sqrt{2}", "2"),
    ("\\sqrt{2}", "1.414"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{2}", "\\sqrt{2}"),
    ("\\pi", "3.14"),
    ("\\frac{1}{3}", "0.333"),
    ("(1,2)", "(2,1)"),
    ("(1,2)", "[1,2]"),
    ("[1,2)", "(1,2]"),
    ("(-\\infty, 3]", "(-\\infty, 3)"),
    ("\\{1,2\\}", "\\{1,2,3\\}"),
    ("1, 2", "1, 3"),
    ("(4,-2,3)", "(4,2,3)"),
    ("3", "x=4"),
    ("y=2x+3", "y=2x-3"),
    ("p - q", "q - p"),
    ("x^2", "x^3"),
    ("30^\\circ", "60^\\circ"),
    ("50\\%", "5"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
    ("\\text{(C)}", "D"),
    ("C", "(B)"),
    ("\\text{Evelyn}", "\\text{Briana}"),
    ("\\infty", "-\\infty"),
    ("\\rightarrow", "\\leftarrow"),  # \left / \right are dropped as delimiters' sizes, not inside these
    ("5", "50"),
    ("0", "\\emptyset"),
    ("6", "6!"),
    ("123", "1 2 3"),  # digits apart are not one number (the fast path joined them: 1.0, where math-verify says 0)
    ("12", "1\\,2"),
    ("-12", "-1 2"),
    ("9\\text{ p.m.}", "9\\text{ a.m.}"),  # both paths drop the text: a.m. and p.m. scored alike (MATH golds)
    ("4\\!:\\!51\\!:\\!06 \\text{ p.m.}", "4:51:06 \\text{ a.m.}"),
    ("9\\text{ a.m.}", "9 \\text{pm}"),
    ("9\\text{ a.m.}", "9 \\text{ pm or am}"),  # a hedge: both markers are neither
    ("8\\!:\\!34 \\text{ p.m.}", "8:34 \\text{ am or pm}"),
    ("9\\text{ a.m.}", "9 \\textbf{ pm}"),  # markers the old pattern missed, dropped with their text
    ("9\\text{ a.m.}", "9 \\textrm{pm}"),
    ("9\\text{ a.m.}", "9\\text{ p.~m.}"),
    ("4:30 p.m.", "4:30 am"),  # a bare marker after the digits, which the string match drops: compared first
    ("9\\text{ a.m.}", "9 pm"),
    ("\\frac{7}{5} + \\frac{1}{5} i.", "\\frac{1}{5}"),  # the gold's period: math-verify took its last fraction
    ("111, \\! 111, \\! 111", "111"),  # one number, which math-verify read as the set {111}
    ("4", "(2( $3$ \\text{ or } $4$"),  # an unreadable box: math-verify fell back to its last $..$
    ("\\frac{1}{8}", "\\frac{1}{3} ( \\frac{1}{8}"),
    ("\\frac 34", "\\frac 341"),  # (digits alone are not braced: "\frac341" is not 3/4)
    ("5", "2(3)"),  # math-verify added a number and a bracketed one
    ("8", "(3)(5)"),
    ("10_3", "10_5"),  # both paths dropped the base
    ("1011_2", "1011_{10}"),
    ("\\text{A5}_{11}", "\\text{A5}_{12}"),
    ("8", "3\\ (5)"),
    ("8", "3 \\; [5]"),
    # a red-team's finds, 1.0 before: a trailing variable, a one-letter text, was dropped as a unit
    ("6+9c", "15"),
    ("a^2+2ab", "a^2+2"),
    ("2t", "2"),
    ("a + b + c", "a + b + d"),
    ("1+2", "1+2\\mathrm{i}"),
    ("3", "3\\mathrm{e}"),
    ("2", "2\\text{x}"),
    ("\\text{May}", "\\text{Amy}"),  # an anagram was the same product of letters
    ("\\text{ACF}", "FCA"),  # (a pool question asks for the letters in alphabetic order)
    ("32 \\%", "0.32"),  # a percent gold took the fraction too
    ("32 \\%", "\\frac{8}{25}"),
    ("7.2\\%", "0.072"),
    ("50\\%", "0.5"),  # (an EQUAL case before: the gold asks for the percent)
    ("4:30 \\text{ p.m.}", "4:30 \\text{ AM}"),  # (the markers are compared before units go)
    ("5", "5 or more"),  # (a count's words, but a hedge's)
    ("1", "1 million"),  # a scale, an operation, a hedge: no unit or count
    ("4", "4 squared"),
    ("5", "5 plus"),
    ("1", "1 \\text{ million}"),
]


@pytest.mark.parametrize("gold,pred", EQUAL)
def test_equal_forms_score_one(gold, pred):
    assert grade(pred, gold) == 1.0


# hedges that scored 1.0 (a red-team's finds): both paths dropped a trailing \text{...} and read one side of a
# relation, and took "3\%" for 3 and for 0.03 alike
HEDGES = [
    ("331", "331\\text{ (or }338\\text{)}"),
    ("331", "331 \\text{ (not } 338\\text{)}"),
    ("5", "5\\text{ or more}"),
    ("5", "5\\text{ cm or }6\\text{ cm}"),
    ("6", "x = 13 \\lor x = 6"),
    ("6", "x = 13 \\vee x = 6"),
    ("6", "x = 13 \\quad x = 6"),
    ("6", "x = 13, \\; x = 6"),
    ("6", "6 \\approx 13"),
    ("3", "3\\%"),
    ("0.03", "3\\%"),
    ("\\frac{11}{2}", "\\frac{11}{2}\\%"),
    ("8", "3 \\quad 5"),  # numbers side by side: math-verify added them (a mixed number's reading)
    ("6", "1 2 3"),
    ("8", "3~5"),
    ("12", "12\\text{ (5)}"),  # a number in the dropped text
    ("12", "12 \\text{ 5}"),
    ("5", "5 \\text{ vs. } 6"),
    ("5", "5 \\text{ if } n \\text{ odd}, 6 \\text{ otherwise}"),
    ("6", "6 \\text{ (approximately)}"),  # (read before the unit rule drops the text)
]


@pytest.mark.parametrize("gold,pred", HEDGES)
def test_a_hedged_answer_scores_zero(gold, pred):
    assert grade(pred, gold) == 0.0
    assert grade(gold, gold) == 1.0


def test_a_percent_sign_counts_where_the_gold_or_the_question_has_one():
    """MATH golds drop the percent sign of a percent question ("50" for "50\\%"): there "50\\%" is right; where
    neither the gold nor the question has one, it is a hedge on the scale (3% is not 3)."""
    percent = "What percent of the students passed?"
    for gold, pred in (("50", "50\\%"), ("50000", "50,000\\%")):
        assert score(f"$\\boxed{{{pred}}}$", {"answer": gold, "question": percent}, True) == 1.0
        assert score(f"$\\boxed{{{pred}}}$", {"answer": gold, "question": "What is 25% of 200?"}, True) == 1.0
        assert grade(pred, gold) == 0.0
    assert grade("50", "50\\%") == 1.0 and grade("5\\text{ cm}", "5") == 1.0  # (the gold's sign, a unit: as before)


@pytest.mark.parametrize("gold,pred", UNEQUAL)
def test_near_misses_score_zero(gold, pred):
    assert grade(pred, gold) == 0.0


@pytest.mark.parametrize("answer,normal", [
    ("10,\\! 080", "10080"), ("\\$1,000", "1000"), ("-1,000", "-1000"), ("1,000.5", "1000.5"), ("2{,}016", "2016"),
    ("1,234,5", "1,234,5"), ("1234,567", "1234,567"),  # not groups of thousands: left as written
    ("1,305^\\circ", "1305"), ("12,500\\%", "12500"),  # a sign after the number: its separators go too
    ("1\\,000", "1000"), ("1 000 000", "1000000"), ("\\dfrac 3 8", "\\frac{3}{8}"),  # spaces in threes; \dfrac 3 8
])
def test_thousands_separators_are_dropped_from_numbers_only(answer, normal):
    """The fast path's own rule (score falls back to math-verify, which hides a fast path that merges too little)."""
    assert math_data.normalize_answer(answer) == normal


def test_a_list_question_reads_commas_between_numbers_as_a_list():
    """A gold of the 8.5K pool, "70,110", answers "Enter all the solutions, separated by commas": the two answers 70
    and 110, never the number 70110. Without such a question a comma groups thousands, as before."""
    question = "Find all x between 0 and 360 such that ... Enter all the solutions, separated by commas."
    listed = {"question": question, "answer": "70,110"}
    for pred in ("70, 110", "70,110", "110, 70", "70^\\circ, 110^\\circ"):
        assert score(f"So $\\boxed{{{pred}}}$.", listed, True) == 1.0, pred
    for pred in ("70110", "70,110,0", "70"):
        assert score(f"So $\\boxed{{{pred}}}$.", listed, True) == 0.0, pred
    negative = {"question": question, "answer": "100,-2"}  # (",-2" was not read as a list)
    assert score("So $\\boxed{-2,100}$.", negative, True) == 1.0
    one = {"question": "Enter all the possible values of $b,$ separated by commas.", "answer": "10879"}
    assert score("So $\\boxed{10,879}$.", one, True) == 1.0  # a list question whose gold is one number
    number = {"question": "How many dollars did she earn?", "answer": "58,500"}
    assert score("So $\\boxed{58500}$.", number, True) == 1.0
    assert score("So $\\boxed{58, 500}$.", number, True) == 0.0


def test_a_clock_time_is_read_as_a_time_not_a_ratio():
    """math-verify read "3:10" as the ratio 3/10, so that "9:30" scored 1 (and "4:17" against "8:34 p.m."); a time is
    read as one where the gold has a.m. / p.m. or the question speaks of time and of no ratio."""
    def time(pred, gold, question="What time will the clock show?"):
        return score(f"So $\\boxed{{{pred}}}$.", {"question": question, "answer": gold}, True)
    assert time("9:30", "3:10") == 0.0 and time("3:10", "3:10") == 1.0
    assert time("4:17", "8\\!:\\!34 \\text{ p.m.}", "How long?") == 0.0
    assert time("8:34 \\text{ PM}", "8\\!:\\!34 \\text{ p.m.}", "How long?") == 1.0
    assert time("20:34", "8\\!:\\!34 \\text{ p.m.}") == 1.0  # the 24-hour form of a p.m. time
    assert time("5:00", "05\\!:\\!00") == 1.0  # (math-verify read 05:00 as 5/0: 0 before)
    assert time("4:51:06 p.m.", "4\\!:\\!51\\!:\\!06 \\text{ p.m.}") == 1.0
    assert time("38:120", "19:60", "What is the ratio of boys to girls?") == 1.0  # a ratio stays one


def test_assignments_answer_the_tuple_the_question_asks_for():
    """math-verify reads "y=3, x=2" in the order written, so that for the pair (x, y) = (2, 3) it scored 0 and
    "y=2, x=3" scored 1. Where the question names the tuple, its order counts; elsewhere, as before."""
    pair = {"question": "Find the ordered pair $(x,y)$ that solves the system.", "answer": "(2,3)"}
    for pred, expected in (("x=2, y=3", 1.0), ("y=3, x=2", 1.0), ("y = 3,\\ x = 2", 1.0), ("(2, 3)", 1.0),
                           ("y=2, x=3", 0.0), ("x=3, y=2", 0.0), ("x=2, y=3, z=4", 0.0)):
        assert score(f"So $\\boxed{{{pred}}}$.", pair, True) == expected, pred
    triple = {"question": "Enter the ordered triple $(a,b,c).$", "answer": "(1,-2,\\frac{1}{2})"}
    assert score("So $\\boxed{c = \\frac{1}{2}, a = 1, b = -2}$.", triple, True) == 1.0
    # one name twice is the values of one variable (a list question's roots): no pair, no interval; a list
    for gold in ("(2,3)", "\\left( 2, 3 \\right)", "[2, 3]"):
        assert score("So $\\boxed{x=2, x=3}$.", {**pair, "answer": gold}, True) == 0.0, gold
    roots = {"question": "Find all solutions $x$, separated by commas.", "answer": "2, 3"}
    assert score("So $\\boxed{x=2, x=3}$.", roots, True) == 1.0
    assert math_data.as_tuple("y=3, x=2", "Find $x$ and $y$.") == "y=3, x=2"  # no tuple asked for: as written
    assert math_data.as_tuple("x=1,000", "the pair $(x,y)$") == "x=1,000"


def test_pool_golds_as_assignments_score_in_either_order():
    """Every pool problem that asks for a tuple of variables, with its gold written as assignments in the tuple's
    order and in reverse: both score 1, and the values swapped score 0."""
    checked = 0
    for name in ("math500.jsonl", "math_train_8k.jsonl"):
        for r in math_data.load_split(shared_path("data", "math", name)):
            tuples, gold = math_data.VARIABLE_TUPLE.findall(r["question"]), str(r["answer"]).strip()
            names = re.findall(r"[A-Za-z]", tuples[-1]) if tuples else []
            values = [v.strip() for v in gold[1:-1].split(",")] if gold.startswith("(") else []
            if not names or len(values) != len(names):
                continue
            checked += 1
            written = [f"{a} = {v}" for a, v in zip(names, values)]
            for pred in (", ".join(written), ", ".join(reversed(written))):
                assert score(f"So $\\boxed{{{pred}}}$.", r, True) == 1.0, (r["id"], pred)
            if len(set(values)) == len(values):
                swapped = ", ".join(f"{a} = {v}" for a, v in zip(names, reversed(values)))
                assert score(f"So $\\boxed{{{swapped}}}$.", r, True) == 0.0, (r["id"], swapped)
    assert checked >= 50  # (86 in MATH-500 and the 8.5K pool)


def test_task_interface():
    task = tasks.get_task("math")
    assert task is math_data and task.DIFFICULTY == "level"
    assert math_data.normalize_answer("f \\circ g") != math_data.normalize_answer("fg")
    # a variable named on one side only is left out; named on both, the names must agree (math-verify agrees)
    assert math_data.same_normalized("x=3", "3") and math_data.same_normalized("3", "x = 3")
    assert math_data.same_normalized("y = 2x + 3", "y=2x+3")
    assert not math_data.same_normalized("y=5", "x=5")
    assert not math_data.same_normalized("x = -\\frac{47}{8}", "y = -\\frac{47}{8}")


def test_enough_hand_written_cases():
    assert len(EQUAL) + len(UNEQUAL) >= 60


def test_requires_eos_and_a_box():
    rec = {"answer": "5"}
    assert score("so $\\boxed{5}$", rec, True) == 1.0
    assert score("so $\\boxed{5}$", rec, False) == 0.0  # truncated: no reward even when right
    assert score("the answer is 5", rec, True) == 0.0
    assert score("\\boxed{5} and then \\boxed{6}", rec, True) == 0.0  # the last box counts
    assert score("\\boxed{6} no wait \\boxed{5}", rec, True) == 1.0
    assert score("\\boxed{}", rec, True) == 0.0
    assert score("", rec, True) == 0.0
    assert score(None, rec, True) == 0.0  # never raises, even on garbage
    assert score("\\boxed{5}", {}, True) == 0.0


def test_extract_boxed():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not close the box
    assert extract_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert extract_boxed("so $\\boxed 5$.") == "5"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{$12$}") == "12"
    assert extract_boxed("\\boxed{\\text{(C)}}") == "(C)"
    assert extract_boxed("\\boxed{5.}") == "5"
    assert extract_boxed("\\boxed{ 3.5 }") == "3.5"
    assert extract_boxed("\\boxed{1} then \\boxed{2") is None  # the last box is unclosed (truncated)
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{}") is None


# -----------------------------------------------------------------------------
# the grader's safety


PATHOLOGICAL = [
    "1" * 100_000,
    "\\boxed{" + "{" * 50_000 + "5" + "}" * 50_000 + "}",
    "{" * 30 + "5" + "}" * 30,
    "\\input{/etc/passwd}",
    "__import__('os').system('echo pwned')",
    "import os; os.system('echo pwned')",
    "9^{9^{9^9}}",
    "9^9^9^9",
    "2^{123456789}",
    "99999999!",
    "1\\text{ cm" + " cm$^2$" * 55 + "}+1",  # (a unit pattern that could split its text many ways: exponential)
    "1\\text{ab$^2$" * 40 + "x",
]


@pytest.mark.parametrize("pred", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_score_zero(pred):
    assert grade(pred, "9") == 0.0


def test_pathological_whole_response():
    big = "x" * 100_000 + "\\boxed{5}"
    assert score(big, {"answer": "5"}, True) == 1.0  # long is fine when the answer is right
    assert score("{" * 100_000, {"answer": "5"}, True) == 0.0
    assert score("\\boxed{" * 20_000, {"answer": "5"}, True) == 0.0


@pytest.mark.slow
def test_hung_verifier_is_killed_and_the_worker_recovers():
    # Past the input checks, straight to the worker: sympy would spend forever on this power.
    grader = math_data.Grader()
    try:
        assert grader.equivalent("9", "9^{9^{9^9}}", timeout_s=0.5) is False
        assert grader.equivalent("\\frac{1}{2}", "0.5", timeout_s=30) is True  # a fresh worker answers
    finally:
        grader.close()


def test_only_consecutive_start_failures_turn_math_verify_off(monkeypatch):
    """Three failed worker starts at any point of a run (a slow start on a busy machine, now and then) switched
    math-verify off for the rest of it: every answer that needs it scored 0. Now only three in a row do."""
    starts = iter([False, False, True, False, False, True, False, False, False])
    monkeypatch.setattr(math_data._Worker, "__init__", lambda self: setattr(self, "proc", None))
    monkeypatch.setattr(math_data._Worker, "start", lambda self, timeout_s: next(starts))
    monkeypatch.setattr(math_data._Worker, "kill", lambda self: None)
    monkeypatch.setattr(math_data._Worker, "ask", lambda self, gold, pred, timeout_s: True)
    grader = math_data.Grader()
    grader._idle = []
    verdicts = []
    for i in range(9):
        grader._idle.clear()  # (a fresh worker each time: each call starts one)
        verdicts.append(grader.equivalent(str(i), str(i)))
    assert verdicts == [False, False, True, False, False, True, False, False, False]
    assert grader.equivalent("9", "9") is False and next(starts, None) is None  # off: no start tried


def test_worker_that_died_is_replaced():
    grader = math_data.Grader()
    try:
        assert grader.equivalent("\\frac{1}{2}", "0.5") is True
        (worker,) = grader._idle
        worker.proc.kill()
        worker.proc.wait()
        assert grader.equivalent("\\frac{1}{3}", "2/6") is True
    finally:
        grader.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_grader_works_in_a_forked_child():
    assert math_data.GRADER.equivalent("\\frac{1}{2}", "0.5") is True  # the parent has a worker now
    pid = os.fork()
    if pid == 0:  # child: must start its own worker, not talk to the parent's
        ok = math_data.GRADER.equivalent("\\frac{1}{4}", "0.25") is True
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert math_data.GRADER.equivalent("\\frac{1}{5}", "0.2") is True  # the parent's worker is untouched


@pytest.mark.slow
def test_grader_works_from_threads():
    results = {}

    def work(i):
        results[i] = (grade("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), grade(f"{i + 1}", f"{i}"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {i: (1.0, 0.0) for i in range(4)}


def test_no_eval_of_model_text(tmp_path):
    marker = tmp_path / "pwned"
    for pred in (f"__import__('pathlib').Path('{marker}').touch()", f"open('{marker}', 'w')"):
        assert grade(pred, "5") == 0.0
        assert math_data.GRADER.equivalent("5", pred) is False
    assert not marker.exists()


def test_math500_answers_score_one_against_themselves():
    records = math_data.load_split(shared_path("data", "math", "math500.jsonl"))
    assert len(records) == 500
    wrong = [r["answer"] for r in records if score(f"Thus $\\boxed{{{r['answer']}}}$", r, True) != 1.0]
    assert wrong == []
    # and through math-verify itself, not only the string match (a sample, to keep the test quick)
    sample = records[::10]
    assert all(math_data.GRADER.equivalent(r["answer"], r["answer"] + " ") for r in sample)


# -----------------------------------------------------------------------------
# loading


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_a_number_answer_is_gold_as_written(tmp_path):
    """A JSON number as the answer is gold in positional notation: str(0.00001) is "1e-05", which no
    \\boxed{0.00001} matched (a silent 0 for every right answer). Integers stay exact, however long."""
    p = write_lines(tmp_path / "n.jsonl", [json.dumps({"question": f"Q{i}", "answer": a})
                                           for i, a in enumerate((0.00001, 1e16, 2.5, 12345678901234567890))])
    recs = math_data.load_split(p)
    assert [r["answer"] for r in recs] == ["0.00001", "10000000000000000", "2.5", "12345678901234567890"]
    assert score("So the answer is $\\boxed{0.00001}$.", recs[0], True) == 1.0


def test_load_formats(tmp_path):
    # plain jsonl with question + answer (MATH-500 here): stable content ids, level 0
    p = write_lines(tmp_path / "m500.jsonl", [json.dumps({"question": "1+1?", "answer": "2"}),
                                              json.dumps({"question": "2+2?", "answer": "4"})])
    recs = math_data.load_split(p)
    assert [r["answer"] for r in recs] == ["2", "4"]
    assert recs[0]["id"].startswith("m500-") and recs[0]["id"] != recs[1]["id"]
    assert recs[0]["id"] == math_data.load_split(p)[0]["id"]
    assert set(recs[0]) == {"id", "level", "subject", "question", "answer", "solution"}
    assert recs[0]["level"] == 0 and recs[0]["subject"] == "" and recs[0]["solution"] == ""
    # PRM800K math_splits / MATH-500 with all fields
    row = {"problem": "What is $1+2$?", "solution": "It is $\\boxed{3}$.", "answer": "3", "subject": "Algebra",
           "level": 2, "unique_id": "test/algebra/1.json"}
    (r,) = math_data.load_split(write_lines(tmp_path / "prm.jsonl", [json.dumps(row)]))
    assert r == {"id": "test/algebra/1.json", "level": 2, "subject": "Algebra", "question": "What is $1+2$?",
                 "answer": "3", "solution": "It is $\\boxed{3}$."}
    (r,) = math_data.load_split(write_lines(tmp_path / "null.jsonl", [json.dumps({**row, "unique_id": None,
                                                                                  "id": "keep-me"})]))
    assert r["id"] == "keep-me"  # a null unique_id leaves the id given (it was replaced by a hash)
    # Hendrycks jsonl: answer = the solution's last box, "Level 5", "type" as subject
    hend = {"problem": "Q?", "level": "Level 5", "type": "Geometry", "solution": "So $\\boxed{\\frac{1}{2}}$."}
    (r,) = math_data.load_split(write_lines(tmp_path / "hend.jsonl", [json.dumps(hend)]))
    assert (r["answer"], r["level"], r["subject"]) == ("\\frac{1}{2}", 5, "Geometry")
    # Hendrycks directory layout
    d = tmp_path / "MATH" / "train" / "algebra"
    d.mkdir(parents=True)
    (d / "1.json").write_text(json.dumps(hend))
    (d / "2.json").write_text(json.dumps({**hend, "level": "Level ?"}))
    recs = math_data.load_split(str(tmp_path / "MATH" / "train"))
    assert [(r["id"], r["level"]) for r in recs] == [("train/algebra/1.json", 5), ("train/algebra/2.json", 0)]
    # our own normalised output reads back identically
    common.write_jsonl(str(tmp_path / "ours.jsonl"), recs)
    assert math_data.load_split(str(tmp_path / "ours.jsonl")) == recs


def test_malformed_json_files_are_one_line_errors(tmp_path):
    d = tmp_path / "MATH" / "train" / "algebra"
    d.mkdir(parents=True)
    (d / "1.json").write_text(json.dumps({"problem": "Q?", "solution": "$\\boxed{1}$"}))
    (d / "all.json").write_text(json.dumps([{"problem": "Q?", "solution": "$\\boxed{1}$"}] * 2))  # a list, not one
    with pytest.raises(common.UserError, match=r"all\.json: a Hendrycks directory holds one problem"):
        math_data.load_split(str(tmp_path / "MATH" / "train"))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"problem": "x", "answer": "\xff"}')
    with pytest.raises(common.UserError, match=r"latin\.json: not valid UTF-8"):
        math_data.load_split(str(latin))
    # valid JSON, no text: a lone surrogate would crash the digest or the tokenizer later, after a split was written
    lone = tmp_path / "lone.json"
    lone.write_text('[{"problem": "ok", "answer": "1"}, {"problem": "What is $1+1$? \\ud835", "answer": "2"}]')
    with pytest.raises(common.UserError, match=r"lone\.json: field '\[1\]\.problem' is not valid Unicode"):
        math_data.load_split(str(lone))
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"problem": "ok", "answer": "1"}\n{"problem": "What is $1+1$? \\ud835", "answer": "2"}\n')
    with pytest.raises(common.UserError, match=r"lone\.jsonl:2: field 'problem' is not valid Unicode"):
        math_data.load_split(str(lone))
    twice = tmp_path / "twice.json"
    twice.write_text('[{"problem": "Q?", "answer": "1", "answer": "2"}]')
    with pytest.raises(common.UserError, match=r"twice\.json: not valid JSON \(field 'answer' appears twice"):
        math_data.load_split(str(twice))
    # a JSON list's records are counted from 1, as record_place counts them; an integer answer may be huge
    listed = tmp_path / "listed.json"
    listed.write_text('[{"problem": "A", "answer": 1}, {"problem": "B", "answer": %s}, {"problem": "C"}]' % ("9" * 400))
    with pytest.raises(common.UserError, match=r"listed\.json: record 3: field 'answer'"):
        math_data.load_split(str(listed))


def test_duplicate_problems_get_distinct_ids(tmp_path):
    p = write_lines(tmp_path / "d.jsonl", [json.dumps({"question": "Q", "answer": "1"})] * 2)
    a, b = math_data.load_split(p)
    assert a["id"] != b["id"]


@pytest.mark.parametrize("line,expect", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('["a list"]', "d.jsonl:2: expected a JSON object"),
    ('{"answer": "1"}', "d.jsonl:2: field 'problem'"),
    ('{"question": "", "answer": "1"}', "d.jsonl:2: field 'question'"),
    ('{"question": "Q"}', "d.jsonl:2: field 'answer'"),
    ('{"question": "Q", "solution": "no box"}', "d.jsonl:2: field 'answer'"),
    ('{"question": "Q", "answer": ["1"]}', "d.jsonl:2: field 'answer'"),
    ('{"question": "Q", "answer": NaN}', "d.jsonl:2: field 'answer': nan is not a number"),
    ('{"question": "Q", "answer": "1", "level": "hard"}', "d.jsonl:2: field 'level'"),
    ('{"question": "Q", "answer": "1", "level": 9}', "d.jsonl:2: field 'level'"),
    ('{"question": "Q", "answer": "1", "subject": 3}', "d.jsonl:2: field 'subject'"),
    # (a false-looking value of another type was read as empty, and a bool id as the text "True")
    ('{"question": "Q", "answer": "1", "subject": []}', "d.jsonl:2: field 'subject'"),
    ('{"question": "Q", "answer": "1", "solution": false}', "d.jsonl:2: field 'solution'"),
    ('{"question": "Q", "answer": "1", "id": true}', "d.jsonl:2: field 'id'"),
    ('{"question": "Q", "answer": "1", "unique_id": false}', "d.jsonl:2: field 'id'"),
    ('{"question": "Q", "answer": "1", "id": "a"}', "d.jsonl:2: field 'id': duplicate"),
    ('{"question": "Q", "answer": "1", "id": " "}', "d.jsonl:2: field 'id': expected a non-blank string"),
    ('{"question": "Q", "answer": "1", "unique_id": "", "id": "\\t"}', "d.jsonl:2: field 'id': expected a non-blank"),
])
def test_malformed_files_name_file_line_field(tmp_path, line, expect):
    p = write_lines(tmp_path / "d.jsonl", ['{"question": "Q0", "answer": "0", "id": "a"}', line])
    with pytest.raises(common.UserError, match=expect.replace("(", "\\(")):
        math_data.load_split(p)


def test_missing_file_and_empty_answers(tmp_path, capsys):
    with pytest.raises(common.UserError, match="file not found"):
        math_data.load_split(str(tmp_path / "nope.jsonl"))
    p = write_lines(tmp_path / "e.jsonl", ['{"question": "Q", "answer": ""}', '{"question": "R", "answer": "1"}'])
    assert len(math_data.load_split(p)) == 1  # skipped, and said so with a count
    assert "skipped 1 record(s) with an empty 'answer'" in capsys.readouterr().err


def test_the_grading_benchmark_needs_the_test_set_only(tmp_path, capsys):
    """--bench grades the test set against itself: a training pool it never reads is not asked for."""
    test_path = tmp_path / "test.jsonl"
    common.write_jsonl(str(test_path), [{"problem": f"P{i}", "answer": str(i), "level": "Level 1", "unique_id": str(i)}
                                        for i in range(3)])
    math_data.main(["--bench", "true", "--test", str(test_path), "--train_pool", str(tmp_path / "none.jsonl")])
    assert "score(): 3 self-gradings" in capsys.readouterr().out
    with pytest.raises(common.UserError, match="test set .*none.jsonl not found"):
        math_data.main(["--bench", "true", "--test", str(tmp_path / "none.jsonl")])


def test_hub_without_datasets_is_a_clear_error():
    try:
        import datasets  # noqa: F401
        pytest.skip("datasets is installed")
    except ImportError:
        pass
    with pytest.raises(common.UserError, match="pip install datasets"):
        math_data.load_split("hf:HuggingFaceH4/MATH-500:test")


# -----------------------------------------------------------------------------
# splits, prompts, SFT targets, the CLI


def test_make_splits_dedupes_against_test():
    pool = [{"id": f"p{i}", "question": f"Problem {i}", "answer": str(i)} for i in range(30)]
    pool.append({"id": "dup", "question": "problem  3", "answer": "3"})  # same text, other spacing/case
    test = [{"id": "t0", "question": "PROBLEM 7", "answer": "7"}]
    splits, counts = math_data.make_splits(pool, test, n_sft_train=9, n_sft_val=1, seed=1234)
    assert counts == {"pool": 31, "dropped_empty": 0, "dropped_in_test": 1, "dropped_duplicate": 1, "sft_train": 9,
                      "sft_val": 1, "rl_train": 19, "test": 1}
    ids = [r["id"] for name in ("sft_train", "sft_val", "rl_train") for r in splits[name]]
    assert len(set(ids)) == 29 and "p7" not in ids and "dup" not in ids
    again, _ = math_data.make_splits(pool, test, n_sft_train=9, n_sft_val=1, seed=1234)
    assert again == splits  # seeded
    with pytest.raises(common.UserError, match="fewer than"):
        math_data.make_splits(pool, test, n_sft_train=900, n_sft_val=100)
    with pytest.raises(common.UserError, match="--n_sft_train must be 0 or more, got -5"):  # would overlap sft, rl
        math_data.main(["--n_sft_train", "-5", "--train_pool", "none.jsonl", "--test", "none.jsonl"])


def test_a_test_problem_written_with_other_latex_spacing_or_delimiters_stays_out_of_training():
    """The test filter compared text up to whitespace and case only: MATH-500's problems rewritten with \\dfrac,
    \\left( or the full stop inside the $ (as the 8.5K pool writes two of its own problems twice) all went into
    the training splits."""
    test = [{"id": "t0", "question": r"Let $f(x) = \frac{3x-2}{x-2}$. Find $f(3)$.", "answer": "7"},
            {"id": "t1", "question": r"If $a_2 = 2008$, what is $a_5$?", "answer": "1"}]
    variants = [r"Let $f(x) = \dfrac{3x-2}{x-2}$. Find $f(3)$.", r"Let $f(x)=\tfrac{3x-2}{x-2}.$ Find $f(3).$",
                r"Let \(f\left(x\right) = \frac{3x-2}{x-2}\). Find \(f(3)\)", r"If $a_2=2008$, what is $a_5$",
                r"If $a_2 = 2008,$ what is $a_5?$", "If $a_2\\,=\\,2008$, what is $a_5$?"]
    pool = [{"id": f"v{i}", "question": q, "answer": "7"} for i, q in enumerate(variants)]
    pool += [{"id": "other", "question": r"Let $f(x) = \frac{3x-2}{x-3}$. Find $f(3)$.", "answer": "5"}]
    splits, counts = math_data.make_splits(pool, test, n_sft_train=1, n_sft_val=0, seed=1234)
    assert counts["dropped_in_test"] == len(variants)
    assert [r["id"] for name in ("sft_train", "sft_val", "rl_train") for r in splits[name]] == ["other"]


def test_make_splits_cut_the_pool_in_the_papers_order():
    """The paper shuffled the pool as loaded (random.seed(1234); random.shuffle) and cut 900 / 100 / the rest. A
    duplicate or a test problem elsewhere in the pool must not move the others: each split is the paper's order with
    those passed over (dropping them before the shuffle gave another permutation altogether)."""
    import random
    pool = [{"id": f"p{i}", "question": f"Problem {i}", "answer": str(i)} for i in range(40)]
    pool += [{"id": "dup", "question": "problem 3", "answer": "3"}, {"id": "p40", "question": "In test", "answer": "0"},
             {"id": "proof", "question": "Prove it", "answer": ""}]  # as load_split(keep_empty=True) gives it
    test = [{"id": "t0", "question": "in TEST", "answer": "0"}]
    papers = list(pool)
    random.seed(1234)
    random.shuffle(papers)
    seen = set()
    expected = []  # the paper's order, less the test problem and the later copy of a duplicate
    for r in papers:
        key = math_data.problem_key(r["question"])
        if r["answer"] and key != math_data.problem_key("In test") and key not in seen:
            expected.append(r["id"])
        seen.add(key)
    splits, counts = math_data.make_splits(pool, test, n_sft_train=9, n_sft_val=3, seed=1234)
    assert [r["id"] for r in splits["sft_train"]] == expected[:9]
    assert [r["id"] for r in splits["sft_val"]] == expected[9:12]
    assert [r["id"] for r in splits["rl_train"]] == expected[12:]
    assert counts["dropped_duplicate"] == 1 and counts["dropped_in_test"] == 1 and counts["dropped_empty"] == 1


def test_the_pool_keeps_its_empty_answers_until_the_shuffle(tmp_path):
    """math_data's CLI loads the pool with its empty-answer problems, so the seed-1234 shuffle permutes the pool as
    the paper's did; a split then holds none of them (nothing to grade). A split read for training still skips them."""
    import random
    rows = [{"problem": f"Problem {i}", "answer": str(i), "level": "Level 3", "unique_id": f"p{i}"} for i in range(30)]
    rows.insert(4, {"problem": "Prove that it holds.", "answer": "", "level": "Level 3", "unique_id": "proof"})
    pool_path, test_path = tmp_path / "pool.jsonl", tmp_path / "test.jsonl"
    common.write_jsonl(str(pool_path), rows)
    common.write_jsonl(str(test_path), [{"problem": "Other", "answer": "1", "level": "Level 1", "unique_id": "t"}])
    assert [r["id"] for r in math_data.load_split(str(pool_path))] == [f"p{i}" for i in range(30)]
    math_data.main(["--train_pool", str(pool_path), "--test", str(test_path), "--n_sft_train", "9",
                    "--n_sft_val", "3", "--out_dir", str(tmp_path / "out")])
    papers = [r["unique_id"] for r in rows]
    random.seed(1234)
    random.shuffle(papers)
    papers.remove("proof")
    got = [r["id"] for name in ("sft_train", "sft_val", "rl_train")
           for r in math_data.load_split(str(tmp_path / "out" / f"{name}.jsonl"))]
    assert got == papers


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["What is 1+1? The answer is 2."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_end|>"]))
    chat = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=chat)


def test_prompts_and_teacher_response():
    rec = {"question": "What is 1+1?", "answer": "2", "solution": "One and one: $\\boxed{2}$."}
    assert math_data.render_prompt(rec, None, "plain") == tasks.PLAIN_TEMPLATE.format(question="What is 1+1?")
    chat = math_data.render_prompt(rec, tiny_tokenizer())
    assert tasks.SYSTEM_PROMPT in chat and "What is 1+1?" in chat and chat.endswith("<|im_start|>assistant\n")
    assert math_data.teacher_response(rec) == "One and one: $\\boxed{2}$."
    assert math_data.teacher_response({**rec, "solution": "One and one make two."}) == \
        "One and one make two.\n\nThe final answer is $\\boxed{2}$."
    bare = math_data.teacher_response({**rec, "solution": ""})
    assert bare == "The final answer is $\\boxed{2}$." and score(bare, rec, True) == 1.0


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "math_data.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_splits_and_teacher_sft(tmp_path):
    pool = [{"problem": f"Problem {i}?", "answer": str(i), "solution": f"So $\\boxed{{{i}}}$."} for i in range(40)]
    test = [{"problem": "Problem 3?", "answer": "3"}, {"problem": "New?", "answer": "1"}]
    write_lines(tmp_path / "pool.jsonl", [json.dumps(r) for r in pool])
    write_lines(tmp_path / "test.jsonl", [json.dumps(r) for r in test])
    out = run_cli("--train_pool", "pool.jsonl", "--test", "test.jsonl", "--n_sft_train", "9", "--n_sft_val", "1",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sft_train 9, sft_val 1, rl_train 29, test 2" in out.stdout
    assert "dropped 0 with an empty answer, 1 also in the test set, 0 duplicates" in out.stdout
    counts = {n: len(math_data.load_split(str(tmp_path / "data" / "math" / f"{n}.jsonl")))
              for n in ("sft_train", "sft_val", "rl_train", "test")}
    assert counts == {"sft_train": 9, "sft_val": 1, "rl_train": 29, "test": 2}

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(str(tok_dir))
    out = run_cli("--teacher_sft", "sft.jsonl", "--tokenizer", "tok", "--split", "data/math/sft_train.jsonl",
                  cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = common.read_jsonl(str(tmp_path / "sft.jsonl"))
    assert len(rows) == 9 and set(rows[0]) == {"id", "task", "prompt", "response"}
    assert rows[0]["task"] == "math" and tasks.SYSTEM_PROMPT in rows[0]["prompt"]
    assert rows[0]["response"].endswith("}$.") and not rows[0]["response"].startswith("\n")  # chat: ends in "\n"
    out = run_cli("--teacher_sft", "plain.jsonl", "--tokenizer", "tok", "--split", "data/math/sft_train.jsonl",
                  "--template", "plain", cwd=tmp_path)
    plain = common.read_jsonl(str(tmp_path / "plain.jsonl"))[0]  # the plain prompt ends "step by step."
    assert plain["prompt"].endswith(".") and plain["response"] == "\n" + rows[0]["response"]
    out = run_cli("--teacher_sft", "plain2.jsonl", "--split", "data/math/sft_train.jsonl", "--template", "plain",
                  cwd=tmp_path)  # the plain template needs no tokenizer
    assert out.returncode == 0, out.stderr
    assert common.read_jsonl(str(tmp_path / "plain2.jsonl")) == common.read_jsonl(str(tmp_path / "plain.jsonl"))

    out = run_cli("--train_pool", "missing.jsonl", "--test", "test.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "--train_pool PATH" in out.stderr and "--hub" in out.stderr
    # no output on an input: the split would be replaced by SFT rows, the pool or the test set by a subset
    split = "data/math/sft_train.jsonl"
    out = run_cli("--teacher_sft", split, "--split", split, "--template", "plain", cwd=tmp_path)
    assert out.returncode == 2 and f"--teacher_sft {split}: that is an input (--split)" in out.stderr
    out = run_cli("--train_pool", "data/math/rl_train.jsonl", "--test", "test.jsonl", "--n_sft_train", "9",
                  "--n_sft_val", "1", cwd=tmp_path)
    assert out.returncode == 2 and "--out_dir (rl_train.jsonl) data/math/rl_train.jsonl: that is an input " \
                                   "(--train_pool)" in out.stderr
    assert len(math_data.load_split(str(tmp_path / split))) == 9
    assert len(math_data.load_split(str(tmp_path / "data" / "math" / "rl_train.jsonl"))) == 29
    out = run_cli("--teacher_sft", "x.jsonl", cwd=tmp_path)
    assert out.returncode == 2 and "--tokenizer DIR" in out.stderr and "--template plain" in out.stderr
    out = run_cli("--teacher_sft", "x.jsonl", "--tokenizer", "no_such_dir", cwd=tmp_path)
    assert out.returncode == 2 and "no_such_dir: no such directory" in out.stderr


@pytest.mark.parametrize("solution,answer", [
    ("so \\boxed{$2$ and $3$}", "$2$ and $3$"),  # (its outer $ stripped read "2$ and $3")
    ("so \\boxed{\\left\\{1\\right.}", "\\left\\{1\\right."),  # (a \right. delimiter kept whole)
    ("so \\boxed{$5$.}", "5"),
])
def test_a_gold_answer_taken_from_the_solution_keeps_what_is_content(solution, answer):
    assert math_data.extract_boxed(solution) == answer
