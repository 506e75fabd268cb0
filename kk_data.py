"""
Knights & Knaves (K&K): the puzzle benchmark of Xie et al. 2024 ("On Memorization of
LLMs in Logical Reasoning"), as used by the re-distillation paper.

  generate  puzzles exactly like the official generator (lib_kk.py, same RNG call order)
  solve     all 2^n role assignments at once with numpy boolean masks
  render    the official quiz text, records with the official 11 fields, the teacher
            chain-of-thought (the official backtracking trace) and the paper's prompt
  score     1.0 iff the response finished with EOS and its last box (tasks.last_box: \\boxed{...},
            \\fbox{...}) names every person exactly once with the right role, else 0.0

Usage:
  python kk_data.py                      # data/kk/{train,test,sft}.jsonl (the paper's splits; its
                                         # SFT pool's 100 held out: --sft_val_fraction 0.1)
  python kk_data.py --official true      # data/kk/official/{test,train}/people{n}_num{N}.jsonl
  python kk_data.py --teacher_sft data/kk/sft_teacher.jsonl --split data/kk/sft.jsonl --tokenizer DIR

Records: the official fields plus `id` ("kk-official-p5-00012": stream, people, index in
that stream), `people` (the difficulty) and `question` (quiz + the paper's answer-format line).
"""
import ast
import html
import itertools
import os
import random
import re
import time
import unicodedata
from functools import lru_cache

import numpy as np

import common
import tasks

DIFFICULTY = "people"  # the record key holding the difficulty (number of people)
OFFICIAL_SEED = 1234   # the official generator's seed, the same for every number of people
SFT_VAL_SEED = 1234    # the paper's shuffle before its 90/10 cut of the SFT pool (K_and_K_preprocess)
OFFICIAL_TEST_SIZE = 100  # official stream: indices 0..99 are the test split, train follows
# the line after the quiz, in the record's role words: a record of heroes and villains asks for "XX is a villain", the
# only words its scorer reads
ANSWER_FORMAT = " Your final answer should be in this format: \\boxed{{XX is {a_knave}, YY is {a_knight}, ...}}"
OFFICIAL_FIELDS = ("quiz", "names", "knight_knave", "solution", "solution_text", "solution_text_format",
                   "cot_head", "cot_repeat_steps", "cot_foot", "statements", "index")

# -----------------------------------------------------------------------------
# the official text constants (lib_kk.py, verbatim)

COMMON_NAMES = ['Emma', 'Liam', 'Olivia', 'Noah', 'Ava', 'Ethan', 'Sophia',
                'Mason', 'Isabella', 'William', 'Mia', 'James', 'Charlotte',
                'Benjamin', 'Amelia', 'Lucas', 'Harper', 'Henry', 'Evelyn',
                'Alexander', 'Abigail', 'Michael', 'Emily', 'Daniel', 'Elizabeth',
                'Jacob', 'Sofia', 'Logan', 'Avery', 'Jackson', 'Ella', 'Sebastian',
                'Scarlett', 'Jack', 'Grace', 'Aiden', 'Chloe', 'Owen', 'Victoria',
                'Samuel', 'Riley', 'Matthew', 'Aria', 'Joseph', 'Lily', 'Luke',
                'Aurora', 'David', 'Zoey', 'Oliver', 'Penelope']
KNIGHT_KNAVE = {'knight': 'knight', 'knave': 'knave', 'a_knight': 'a knight', 'a_knave': 'a knave',
                'Knight': 'Knight', 'Knave': 'Knave'}
PREFIX = ('A very special island is inhabited only by {knight}s and {knave}s. '
          '{Knight}s always tell the truth, and {knave}s always lie. ')
POSTFIX = 'So who is {a_knight} and who is {a_knave}?'
TEMPLATES = [
    '{name} said that {content}.',
    '{name} told you that {content}.',
    '{name} said, "{content}."',
    '{name} stated, "{content}".',
    'According to {name}, "{content}".',
    '''In {name}'s words: "{content}".''',
    '{name} remarked, "{content}".',
    '"{content}," {name} declared.',
    '{name} was heard saying, "{content}".',
    '{name} expressed that {content}.',
    '"{content}" - {name}.',
    'As {name} put it, "{content}".',
    '{name} asserted: "{content}".',
    '"{content}," {name} mentioned.',
    '{name} commented, "{content}".',
    'In a statement by {name}: "{content}".',
    '{name} noted, "{content}".',
    '"{content}," {name} claimed.',
]
COT_HEAD = "Let's think step by step, by considering whether each person is lying and if that leads to contradiction."
COT_FOOT = "This leads to a feasible solution."
MAX_PEOPLE = 20  # the solver holds 2^n assignments; the name list has 51 names

# -----------------------------------------------------------------------------
# sampling statements: the official KKProblemSampler, call for call on the same numpy Generator
# (depth 2, width 2). Statements are nested tuples: ('telling-truth', i) "i is a knight",
# ('lying', i) "i is a knave", ('not', s), ('and', s1, s2), ('or', s1, s2), ('->', s1, s2), ('<=>', s1, s2).

DEPTH, WIDTH = 2, 2
LEAF_KINDS = ('telling-truth', 'lying')


def sample_statement(rng, n_people, speaker, depth):
    dice = rng.integers(0, 6)
    if depth == 1 or dice == 0:
        while True:
            # rng.integers(0, 2) draws exactly what lib_kk's rng.choice(['telling-truth', 'lying']) draws, 5x faster
            kind = LEAF_KINDS[rng.integers(0, 2)]
            person = int(rng.integers(0, n_people))
            if not (kind == 'lying' and person == speaker):  # "I am a knave" can't be said by anyone
                return (kind, person)
    if dice == 1:
        return ('not', sample_statement(rng, n_people, speaker, depth - 1))
    if dice in (2, 3):
        n_sub = rng.integers(2, WIDTH + 1)  # always 2 at width 2, but the draw moves the RNG
        return (('and', 'or')[dice - 2],) + sample_substatements(rng, n_people, speaker, depth, n_sub)
    return (('->', '<=>')[dice - 4],) + sample_substatements(rng, n_people, speaker, depth, 2)


def sample_substatements(rng, n_people, speaker, depth, count):
    subs = []
    while len(subs) < count:
        s = sample_statement(rng, n_people, speaker, depth - 1)
        if s not in subs:  # no operator repeats an operand
            subs.append(s)
    return tuple(subs)


# -----------------------------------------------------------------------------
# solver: every statement evaluated on all 2^n assignments at once. Assignment a makes
# person i a knight iff bit i of a is set.


@lru_cache(maxsize=None)
def knight_masks(n_people):
    """(n_people, 2^n) bool array: row i = "person i is a knight" over all assignments."""
    assignments = np.arange(2 ** n_people)
    return ((assignments[None, :] >> np.arange(n_people)[:, None]) & 1).astype(bool)


def truth_value(statement, masks):
    """Truth value of a statement under every assignment (a bool vector of length 2^n)."""
    op = statement[0]
    if op == 'telling-truth':
        return masks[statement[1]]
    if op == 'lying':
        return ~masks[statement[1]]
    if op == 'not':
        return ~truth_value(statement[1], masks)
    if op == 'and':
        return np.logical_and.reduce([truth_value(s, masks) for s in statement[1:]])
    if op == 'or':
        return np.logical_or.reduce([truth_value(s, masks) for s in statement[1:]])
    if op == '->':
        return ~truth_value(statement[1], masks) | truth_value(statement[2], masks)
    if op == '<=>':
        return truth_value(statement[1], masks) == truth_value(statement[2], masks)
    raise ValueError(f"unknown operator {op!r}")


def solve(statements):
    """All solutions (tuples of bools, True = knight): a person is a knight iff their statement is true."""
    n = len(statements)
    masks = knight_masks(n)
    consistent = np.ones(2 ** n, dtype=bool)
    for i, s in enumerate(statements):
        consistent &= masks[i] == truth_value(s, masks)
    return [tuple(bool(a >> i & 1) for i in range(n)) for a in np.flatnonzero(consistent).tolist()]


def sample_puzzles(seed, n_people, count, max_retry=1000):
    """Yield (index, statements, solution) of the seed's stream: lib_kk's sample_valid_problems.

    Puzzle `index` is the index-th puzzle with exactly one solution and a statement set not seen
    before in the stream; so any prefix of the stream is the same whatever `count` is.
    """
    rng = np.random.default_rng(seed)
    seen = set()
    for index in range(count):
        for _ in range(max_retry):
            statements = tuple(sample_statement(rng, n_people, p, DEPTH) for p in range(n_people))
            if statements in seen:
                continue
            solutions = solve(statements)
            if len(solutions) == 1:
                seen.add(statements)
                yield index, statements, solutions[0]
                break
        else:  # lib_kk silently returns fewer puzzles here; we say so
            raise common.UserError(f"no new unique-solution puzzle with {n_people} people after {max_retry} tries "
                                   f"({index} found): few puzzles of that size exist, and those seen are not drawn "
                                   f"twice; ask for fewer")


# -----------------------------------------------------------------------------
# rendering: the official formatter (names, speech templates) and records


def format_claim(names, kk, statement, negation=False):
    assert statement[0] in LEAF_KINDS, "the official text has no form for statements deeper than 2"
    role = kk['a_knight'] if statement[0] == 'telling-truth' else kk['a_knave']
    return names[statement[1]] + ' is ' + ('not ' if negation else '') + role


def format_statement(names, kk, statement):
    op = statement[0]
    if op == 'not':
        return format_claim(names, kk, statement[1], negation=True)
    if op in ('and', 'or'):
        return f' {op} '.join(format_claim(names, kk, s) for s in statement[1:])
    if op == '->':  # the capital "If" even mid-sentence is official
        return 'If ' + format_claim(names, kk, statement[1]) + ' then ' + format_claim(names, kk, statement[2])
    if op == '<=>':
        return format_claim(names, kk, statement[1]) + ' if and only if ' + format_claim(names, kk, statement[2])
    return format_claim(names, kk, statement)


def role_text(name, is_knight, kk=KNIGHT_KNAVE):
    return f"{name} is {kk['a_knight'] if is_knight else kk['a_knave']}"


def record_kk(record):
    """The record's role words (official records carry them; records without fall back to knight/knave)."""
    return record.get('knight_knave') or KNIGHT_KNAVE


def answer_text(record):
    """The answer in the prompt's requested shape: "A is a knight, B is a knave, C is a knight"."""
    kk = record_kk(record)
    return ', '.join(role_text(n, s, kk) for n, s in zip(record['names'], record['solution']))


def puzzle_id(seed, people, index):
    stream = 'official' if seed == OFFICIAL_SEED else f's{seed}'
    return f"kk-{stream}-p{people}-{index:05d}"


def make_record(seed, index, statements, solution, fixed_names=False):
    """The official record (formatter seeded seed + index, as data_gen_kk.py does) plus id, people, question.

    fixed_names: person i is always COMMON_NAMES[i] (Emma, Liam, Olivia, ...) instead of a random draw.
    The tiny preset uses it: a ~1M-parameter model trained for minutes does not learn to copy names
    from the question (name tokens stay at chance, ~4 nats), so with random names it never scores.
    The random draw still happens, so the templates chosen are those of the official stream.
    """
    n = len(statements)
    rng = np.random.default_rng(seed + index)
    names = [str(x) for x in rng.choice(COMMON_NAMES, size=n, replace=False)]
    if fixed_names:
        names = COMMON_NAMES[:n]
    kk = dict(KNIGHT_KNAVE)
    quiz = PREFIX.format(**kk) + f'You meet {n} inhabitants: ' + ', '.join(names[:-1]) + ', and ' + names[-1] + '.'
    for i, s in enumerate(statements):
        template = TEMPLATES[rng.integers(0, len(TEMPLATES))]  # = lib_kk's rng.choice(TEMPLATES)
        quiz += ' ' + template.format(name=names[i], content=format_statement(names, kk, s))
    quiz += ' ' + POSTFIX.format(**kk)
    roles = [role_text(name, s, kk) for name, s in zip(names, solution)]
    record = {
        'id': puzzle_id(seed, n, index),
        'people': n,
        'question': quiz + ANSWER_FORMAT.format(**kk),
        'quiz': quiz,
        'names': names,
        'knight_knave': kk,
        'solution': list(solution),
        'solution_text': ', '.join(roles[:-1]) + ', and ' + roles[-1] + '.',
        'solution_text_format': '\n'.join(f'({i + 1}) {r}' for i, r in enumerate(roles)),
        'cot_head': COT_HEAD,
        'cot_repeat_steps': format_trace(backtracking_trace(statements), statements, names, kk),
        'cot_foot': COT_FOOT,
        'statements': repr(statements),
        'index': index,
    }
    return record


# -----------------------------------------------------------------------------
# teacher chain-of-thought: lib_kk's generate_chain_of_thoughts (backtracking, knight first,
# people mentioned by the last assumed speaker considered next) and its sentence forms.


def mentioned_people(statement):
    if statement[0] in LEAF_KINDS:
        return [statement[1]]
    return [p for s in statement[1:] for p in mentioned_people(s)]


def first_contradiction(values, masks, assignments):
    """The first assigned person whose claim (or its negation, for a knave) no completion satisfies.

    lib_kk's can_be_falsified_v2 enumerates the completions one by one; here a mask holds them all.
    """
    completions = np.ones(masks.shape[1], dtype=bool)
    for p, a in enumerate(assignments):
        if a is not None:
            completions &= masks[p] == a
    for p, a in enumerate(assignments):
        if a is not None and not (completions & (values[p] == a)).any():
            return p
    return None


def backtracking_trace(statements):
    """The official tape of events:
    ('proposal', person, is_knight, None, None)                      the assumption holds so far
    ('proposal', person, is_knight, conflict_person, their_role)     it contradicts that person's claim
    ('reconsider', person, exhausted_people)                         backtrack to person
    """
    n = len(statements)
    masks = knight_masks(n)
    values = [truth_value(s, masks) for s in statements]
    tape = []
    assignments = [None] * n
    options = {p: [False, True] for p in range(n)}  # pop() takes True first: knight first
    order = tuple(range(n))
    cursor = 0
    while cursor < n:
        if not options[order[cursor]]:
            exhausted = []
            while cursor >= 0 and not options[order[cursor]]:
                options[order[cursor]] = [False, True]
                assignments[order[cursor]] = None
                exhausted.append(order[cursor])
                cursor -= 1
            if cursor < 0:
                raise ValueError("puzzle has no solution")
            tape.append(('reconsider', order[cursor], exhausted))
        person = order[cursor]
        assignments[person] = options[person].pop()
        conflict = first_contradiction(values, masks, assignments)
        if conflict is None:
            tape.append(('proposal', person, assignments[person], None, None))
            cursor += 1
            remaining = order[cursor:]
            for p in reversed(mentioned_people(statements[person])):  # bring mentioned people to the front
                if p in remaining:
                    i = remaining.index(p)
                    remaining = (p,) + remaining[:i] + remaining[i + 1:]
            order = order[:cursor] + remaining
        else:
            tape.append(('proposal', person, assignments[person], conflict, assignments[conflict]))
    return tape


def format_trace(tape, statements, names, kk):
    """The official sentences, with claims repeated (the stored `cot_repeat_steps`)."""
    steps = []
    for event in tape:
        if event[0] == 'reconsider':
            _, person, exhausted = event
            who = [names[p] for p in exhausted]
            if len(who) > 2:
                who = ', '.join(who[:-1]) + ', and ' + who[-1]
            else:
                who = ' and '.join(who)
            steps.append(f'We have exhausted all possibilities for {who}, '
                         f'so let us go back and reconsider {names[person]}.')
            continue
        _, person, role, conflict, conflict_role = event
        a_role = kk['a_knight'] if role else kk['a_knave']
        if conflict is None:
            claim = format_statement(names, kk, statements[person])
            steps.append(f"Assume {names[person]} is {a_role}. No contradiction is found in their "
                         f"{'' if role else 'false '}claim that {claim}.")
        else:
            whose = 'their own' if conflict == person else names[conflict]
            claim = format_statement(names, kk, statements[conflict])
            steps.append(f"{names[person]} cannot be {a_role}, because this would contradict the "
                         f"{'' if conflict_role else 'false '}claim of {whose} that {claim}.")
    return steps


def table_order(n_people):
    """(roles, column) of every assignment in truth-table order: all knights first, the last person's role
    changing fastest; column = the assignment's index in knight_masks and truth_value's vectors."""
    for roles in itertools.product((True, False), repeat=n_people):
        yield roles, sum(1 << i for i, knight in enumerate(roles) if knight)


def roles_text(roles, kk=KNIGHT_KNAVE):
    return ' '.join(kk['knight'] if knight else kk['knave'] for knight in roles)


def table_rows(statements, kk=KNIGHT_KNAVE):
    """A truth-table chain of thought, one line per assignment tried in table_order: the roles, then each
    person's statement's truth value under them until one contradicts its speaker ("no"); the first
    consistent assignment ends the table ("yes"). "knight knave: true false yes."

    Not the official trace: each value is a few lookups in the question, a shape the tiny preset's model
    learns from pre-training (docs/tiny_preset.md); the official trace's long sentences it cannot follow.
    """
    n = len(statements)
    masks = knight_masks(n)
    values = [truth_value(s, masks) for s in statements]
    rows = []
    for roles, column in table_order(n):
        words, consistent = [], True
        for i in range(n):
            words.append("true" if values[i][column] else "false")
            if values[i][column] != roles[i]:
                consistent = False
                break
        rows.append(f"{roles_text(roles, kk)}: {' '.join(words)} {'yes' if consistent else 'no'}.")
        if consistent:
            return rows
    raise ValueError("puzzle has no solution")


TEACHER_STYLES = ("trace", "table", "answer")


def teacher_response(record, style="trace"):
    """The teacher's SFT response, ending with the boxed answer (no EOS: the SFT loader adds it).

    trace:  the official step-by-step trace, then the answer (the paper's short-CoT SFT target)
    table:  the truth table of table_rows, then the answer (the tiny preset's chain of thought)
    answer: the answer line alone
    """
    final = f"The final answer is: \\boxed{{{answer_text(record)}}}."
    if style == "answer":
        return final
    if style == "table":
        kk = record_kk(record)
        statements = parse_statements(record['statements'], len(record['names']))  # checked by load_split
        return '\n'.join(table_rows(statements, kk)) + '\n' + final
    if style != "trace":
        raise common.UserError(f"unknown teacher style {style!r}; choose one of {', '.join(TEACHER_STYLES)}")
    steps = ' '.join(record['cot_repeat_steps'])
    return f"{record['cot_head']} {steps} {record['cot_foot']}\n{final}"


# -----------------------------------------------------------------------------
# prompts and the reward


def render_prompt(record, tokenizer, template="auto"):
    return tasks.render_question(record["question"], tokenizer, template)


LATEX_COMMAND = re.compile(r"\\(\\|[A-Za-z]+)")  # a command's name: \\ (a line break) or letters
# the commands that are form, not content; any other (\neg, \neq, \lor, \iff ...) makes the answer unreadable,
# as the word "not" does, except a typed escape (\n, \t, \r) run into the word after it ("\nLiam", "\ta knave"),
# which is that word
FORM_COMMANDS = frozenset(("\\", "text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "textup",
                           "textsc", "textsl", "textmd", "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "mathnormal",
                           "boldsymbol", "bm", "operatorname", "emph", "mbox", "underline", "boxed", "quad", "qquad",
                           "newline", "left", "right", "displaystyle", "textstyle", "small", "large", "bf", "it", "rm",
                           "tt", "sf", "sc", "sl", "colon", "checkmark", "land", "wedge", "bullet", "cdot", "item",
                           "fbox"))  # (\tt is no typed \t)
TYPED_ESCAPES = "ntr"
# an arrow maps the names before it to the role after it ("Emma -> knight"); between two claims it is "if", content
ARROW_COMMANDS = frozenset(("to", "rightarrow", "longrightarrow", "implies", "mapsto", "longmapsto"))
MAPPING_ARROWS = "→⇒⟶⟹↦⟼⇢⇨➔➜➡⟾↠"
ARROW = re.compile(rf"(?<!-)-+>|(?<!=)=+>|[{MAPPING_ARROWS}]")  # (a run tried from its start only: linear on "-----")
ARROW_WORD = "\x00"  # what an arrow becomes: a word of its own, which no name or role can be
# symbols that turn a claim around, or join claims by "or", "if" or "if and only if" (checked on the NFKC form,
# which folds full-width and other look-alikes): punctuation is form, these are content. A left arrow reads "if";
# every arrow or harpoon of Unicode's arrow blocks but the mapping ones above is content, found by name, not listed
# (a "!" before a letter is C's "not" ("!knight"), after one it ends a sentence, and one that follows no word opens a
# negated claim ("!(A is a knight)", "! A"); a tilde after a space or a bracket is "not" too, or markdown's
# strike-through, where one run into a word is LaTeX's space ("a~knight"); "|" and "||" are "or"; a cross mark or a
# prohibition sign strikes a role out)
LOGIC_SYMBOL = re.compile(r"!=|(?<!\\)![^\W\d_]|(?<![^\W\d_)\]}.\\!?])!|(?:^|(?<=[\s(\[{]))~|~~|\||/=|=\\=|<>|<-+|<=+"
                          r"|[≠≢¬∼∨⋁⊕⊻≡⊃⊂⊇⊆⊢⊣⊨⫤⌐✗✘❌❎✕✖×☒🚫⛔☓⨯🗙🗴🗶🗷⮽╳👎⋎⩔⩖⩗⩒⩢⊽⊼⊧⊩∣¦⫬⫭⌙〜⁓∽?%]|\d\s*[/⁄]\s*\d")
# (also: markdown's strike "~~" wherever it stands; more crosses, "or", NAND / NOR / "entails" and negation signs,
# "|" look-alikes; a "?" is a doubt, not an answer; a "%" a LaTeX comment hiding the rest of its line, or a doubt's
# percentage, and a fraction ("50/50", "(1/2)", "½") a doubt's odds)
# a symbol struck through (∉, ≄, ⊄, ...: "not in", "not ..."; found in the NFD form) or a word struck or crossed out by
# a combining overlay or an enclosing sign (U+0334-U+0338, U+20D2-U+20E0: "knigh̶t", "knight⃠")
NEGATING_OVERLAYS = frozenset(map(chr, [*range(0x0334, 0x0339), *range(0x20D2, 0x20E1),
                                        0x0305, 0x033F, 0x20E5, 0x20E6, 0x20EB]))  # (+ overlines: negation's bar)
# layout around the claims, dropped before anything is read: a LaTeX list, array or alignment (its column spec
# "{l|l}" is no "or") and its spacing
LAYOUT_ENVIRONMENT = r"\{(?:array|aligned|align\*?|gathered|matrix|itemize|enumerate)\}"
LAYOUT = re.compile(rf"\\begin\s*{LAYOUT_ENVIRONMENT}(?:\s*\{{[lcr| ]*\}})?|\\end\s*{LAYOUT_ENVIRONMENT}"
                    r"|\\[hv]space\*?\s*\{[^{}]*\}")
OTHER_ARROWS = frozenset(
    c for lo, hi in ((0x2190, 0x21FF), (0x2794, 0x27BF), (0x27F0, 0x27FF), (0x2900, 0x297F), (0x2B00, 0x2BFF),
                     (0x1F800, 0x1F8FF)) for c in map(chr, range(lo, hi + 1))
    if re.search(r"ARROW|HARPOON", unicodedata.name(c, ""))) - frozenset(MAPPING_ARROWS)
LETTERS = r"[^\W\d_]+"  # a run of letters: one word of an answer (digits, punctuation and braces are form)
WORD = re.compile(rf"\x00|{LETTERS}")  # a word, or an arrow
FILLER = frozenset(("is", "are", "a", "an", "the", "and", "both", "all", "but", "while", "whereas", "also", "too", "as",
                    "well", "s"))  # (s: "Emma's a knight")


def fold(text):
    """One form for one word, whatever its case or its Unicode form ("Zoë" typed as e + U+0308)."""
    return unicodedata.normalize("NFC", text).lower()


def role_forms(word):
    """The forms of a role word an answer may use, folded: the word and its plurals ("knights"; "heroes")."""
    word = fold(word)
    return {word, word + 's', word + 'es'}


def parse_answer(content, names, kk):
    """{name: is_knight} from "A is a knight, B and C are knaves", or None when anything is off.

    Names, role words and a few fillers are the only words allowed; each role word applies to the
    names since the previous one. An unknown word, a repeated name or a role with no name before it
    makes the answer unreadable; a name left without a role is simply missing from the answer.
    """
    # (an HTML entity, "&#172;" or "&not;", is its sign; layout goes before "|" in a column spec reads as "or")
    content = LAYOUT.sub(" ", unicodedata.normalize("NFC", html.unescape(content)))
    folded = unicodedata.normalize("NFKC", content)
    if (LOGIC_SYMBOL.search(folded) or not OTHER_ARROWS.isdisjoint(folded)
            or not NEGATING_OVERLAYS.isdisjoint(unicodedata.normalize("NFD", folded))):
        return None
    unreadable = []

    def form(command):  # a command -> spaces, an arrow, or the word a typed escape ran into; else unreadable
        name = command.group(1)
        if name.lower() in FORM_COMMANDS:
            return " "
        if name.lower() in ARROW_COMMANDS:
            return f" {ARROW_WORD} "
        if name[0] in TYPED_ESCAPES:
            return " " + name[1:]
        unreadable.append(name)
        return " "
    content = ARROW.sub(f" {ARROW_WORD} ", LATEX_COMMAND.sub(form, content))
    if unreadable:
        return None
    by_lower = {fold(name): name for name in names}
    role_words = {**dict.fromkeys(role_forms(kk['knave']), False), **dict.fromkeys(role_forms(kk['knight']), True)}
    answer, pending, arrow, last = {}, [], False, None
    for word in WORD.findall(fold(content)):
        if (last, word) == ("all", "but"):  # "all but Emma are knaves": the others are, Emma is not (read: "she is")
            return None
        last = word
        if word == ARROW_WORD:  # only from names to their role ("Emma -> knight"), not between claims ("if")
            if not pending or arrow:
                return None
            arrow = True
        elif word in by_lower:
            name = by_lower[word]
            if name in answer or name in pending or arrow:
                return None
            pending.append(name)
        elif word in role_words:
            if not pending:
                return None
            for name in pending:
                answer[name] = role_words[word]
            pending, arrow = [], False
        elif word not in FILLER:
            return None
    return answer


def score(response, record, finished):
    """1.0 iff the response finished with EOS and its last box (tasks.last_box) names everyone once with the right
    role."""
    if not finished or not isinstance(response, str):
        return 0.0
    content = tasks.last_box(response)
    if content is None:
        return 0.0
    return 1.0 if answer_is_right(content, record) else 0.0


def answer_is_right(content, record):
    """Whether an answer text ("A is a knight, B is a knave") names everyone once with the right role."""
    answer = parse_answer(content, record['names'], record_kk(record))
    return answer == {name: bool(s) for name, s in zip(record['names'], record['solution'])}


# -----------------------------------------------------------------------------
# loading splits: our jsonl, or official files ({train,test}/people{n}_num{N}.jsonl, jsonl or parquet)


def check_statement(s, n):
    """A well-formed statement tuple over people 0..n-1 (any depth)."""
    if not isinstance(s, tuple) or not s:
        return False
    op, args = s[0], s[1:]
    if op in LEAF_KINDS:
        return len(args) == 1 and type(args[0]) is int and 0 <= args[0] < n
    if op == 'not':
        return len(args) == 1 and check_statement(args[0], n)
    if op in ('and', 'or'):
        return len(args) >= 2 and all(check_statement(a, n) for a in args)
    if op in ('->', '<=>'):
        return len(args) == 2 and all(check_statement(a, n) for a in args)
    return False


def parse_statements(text, n):
    """Statements from their Python repr, by ast.literal_eval (never eval): data is not code."""
    try:
        statements = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if not isinstance(statements, tuple) or len(statements) != n or not all(check_statement(s, n) for s in statements):
        return None
    return statements


def normalise_record(rec, where):
    """Check one record and fill in id / people / question; `where` is "file:line" for errors."""
    def bad(field, why):
        raise common.UserError(f"{where}: field '{field}' {why}")

    for field in OFFICIAL_FIELDS:
        if field not in rec:
            bad(field, "is missing")
    names = rec['names']
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(x, str) and x for x in names):
        bad('names', "must be a list of at least 2 non-empty strings")
    if len({fold(x) for x in names}) != len(names):  # (as the scorer folds them)
        bad('names', "has a repeated name")
    n = len(names)
    if n > MAX_PEOPLE:  # (the solver would hold 2^n assignments)
        bad('names', f"has {n} names; at most {MAX_PEOPLE} people are solved")
    solution = rec['solution']
    if not isinstance(solution, list) or not all(isinstance(x, bool) for x in solution):
        bad('solution', "must be a list of booleans")
    if len(solution) != n:
        bad('solution', f"has {len(solution)} entries for {n} names")
    kk = rec['knight_knave']
    if not isinstance(kk, dict) or not all(isinstance(kk.get(k), str)
                                           for k in ('knight', 'knave', 'a_knight', 'a_knave')):
        bad('knight_knave', "must map knight, knave, a_knight, a_knave to strings")
    knight, knave = (role_forms(kk[k]) for k in ('knight', 'knave'))
    if not all(re.fullmatch(LETTERS, fold(kk[k])) for k in ('knight', 'knave')) or FILLER & (knight | knave) \
            or knight & knave:
        # (the scorer reads an answer word by word: else every answer would score 0, and the message blamed the names)
        bad('knight_knave', f"knight {kk['knight']!r} and knave {kk['knave']!r} must be two words of letters, apart "
                            f"in every form an answer may use (the word, + s, + es), none of them one of "
                            f"{sorted(FILLER)}")
    for field in ('quiz', 'solution_text', 'solution_text_format', 'cot_head', 'cot_foot', 'statements'):
        if not isinstance(rec[field], str):
            bad(field, "must be a string")
    if not isinstance(rec['cot_repeat_steps'], list) or not all(isinstance(x, str) for x in rec['cot_repeat_steps']):
        bad('cot_repeat_steps', "must be a list of strings")
    if type(rec['index']) is not int or rec['index'] < 0:
        bad('index', "must be an integer >= 0")
    # the scorer reads the names before the role words: a name in a role's form would take its place
    clash = [x for x in names if fold(x) in knight | knave | FILLER]
    if clash:
        bad('names', f"{clash[0]!r} is a role word's form or one of {sorted(FILLER)}: answers could not be read")
    statements = parse_statements(rec['statements'], n)
    if statements is None:
        bad('statements', f"is not a tuple of {n} well-formed statements (Python literal)")
    if solve(statements) != [tuple(solution)]:
        bad('solution', "is not the unique solution of the statements")
    if 'people' in rec and (type(rec['people']) is not int or rec['people'] != n):
        bad('people', f"is {rec['people']!r}; it must be the count of names, the integer {n}")
    if 'id' in rec and not tasks.is_id(rec['id']):  # (an integer is kept as its text, as ids are matched)
        bad('id', "must be a non-blank string or an integer")
    if 'question' in rec and not (isinstance(rec['question'], str) and rec['question']):
        bad('question', "must be a non-empty string")
    for field in ('quiz', 'question'):  # a question of another puzzle, whose answers would all score 0
        if field in rec:
            text = fold(rec[field])
            missing = [x for x in names if not re.search(rf"(?<![^\W\d_]){re.escape(fold(x))}(?![^\W\d_])", text)]
            if missing:
                bad(field, f"does not name {missing[0]!r} of the record's names {names!r}")
    if isinstance(rec.get('question'), str) and isinstance(rec.get('quiz'), str):  # the same names, another puzzle
        if " ".join(fold(rec['quiz']).split()) not in " ".join(fold(rec['question']).split()):
            bad('question', "does not hold the record's quiz (the question of another puzzle?), whose solution "
                            "the answer is scored against; give both of one puzzle, or the quiz alone")
    out = {'id': str(rec['id']) if 'id' in rec else puzzle_id(OFFICIAL_SEED, n, rec['index']),  # official: its stream
           'people': n,
           'question': rec.get('question') or rec['quiz'] + ANSWER_FORMAT.format(**kk)}
    out.update({k: v for k, v in rec.items() if k not in out})
    if not answer_is_right(answer_text(out), out):  # else every answer, the right one too, would score 0
        bad('names', f"{names!r} cannot be read back from an answer by the scorer: each name must be one word of "
                     f"letters, and not a role word or one of {sorted(FILLER)}")
    return out


HUB_DATASET = "K-and-K/knights-and-knaves"


def fetch_from_hub(path):
    """"hf://test/people5_num100.jsonl" -> a local copy of that file of the official HF dataset (needs a network)."""
    try:
        from huggingface_hub import hf_hub_download
        return hf_hub_download(HUB_DATASET, path[len("hf://"):], repo_type="dataset")
    except Exception as e:  # no network, no such file, no huggingface_hub: all the user's to fix
        raise common.UserError(f"{path}: cannot fetch from the hub dataset {HUB_DATASET} ({type(e).__name__}: {e}); "
                               f"download the file and pass its local path")


def read_rows(path):
    """(where, row) pairs from a jsonl or parquet file (or an official one on the hub:
    hf://test/people5_num100.jsonl)."""
    if path.startswith("hf://"):
        path = fetch_from_hub(path)
    if path.endswith('.parquet'):
        try:
            import pyarrow
            import pyarrow.parquet as pq
        except ImportError:
            raise common.UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), "
                                   "or use the jsonl files")
        if not os.path.isfile(path):
            raise common.UserError(f"{path}: {'a directory, not a file' if os.path.isdir(path) else 'file not found'}")
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError, pyarrow.ArrowException) as e:  # (a damaged or cut-short file)
            raise common.UserError(f"{path}: cannot read it as parquet ({type(e).__name__}: {e})") from e
        return [(f"{path}:row {i + 1}", row) for i, row in enumerate(rows)]
    return [(f"{path}:{lineno}", row) for lineno, row in common.iter_jsonl(path)]


def load_split(path):
    """The records of a split file (ours or official), checked and normalised; errors name file, line, field."""
    records, seen = [], {}
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise common.UserError(f"{where}: expected a JSON object")
        rec = normalise_record(row, where)
        if rec['id'] in seen:
            raise common.UserError(f"{where}: field 'id' {rec['id']!r} repeats the record at {seen[rec['id']]}")
        seen[rec['id']] = where
        records.append(rec)
    return records


# -----------------------------------------------------------------------------
# building the splits


def generate(seed, n_people, count, exclude=frozenset(), log=print, label="", fixed_names=False,
             twins=frozenset()):
    """`count` records of the seed's stream for n_people, skipping puzzles in `exclude`: their statements,
    or their puzzle_key (statements_of: the puzzle renamed, reordered or with and / or / <=> operands swapped),
    and every puzzle whose logic_key is in `twins` (logic_keys: the same logic, however worded).

    Skipped puzzles keep their stream index (ids stay stable); the stream runs on until `count` are kept.
    fixed_names: see make_record.
    """
    t0 = time.time()
    records, skipped = [], 0
    twins = {key for key in twins if len(key) == n_people}  # (a key has one entry a person: others cannot match)
    stream = sample_puzzles(seed, n_people, count=10 ** 9)  # lazily: stops when enough are kept
    while len(records) < count:
        index, statements, solution = next(stream)
        if (statements in exclude or puzzle_key(statements) in exclude
                or (twins and logic_key(statements) in twins)):
            skipped += 1
            continue
        records.append(make_record(seed, index, statements, solution, fixed_names))
    seconds = time.time() - t0
    if log:
        log(f"  {label}people {n_people}: {len(records)} puzzles in {seconds:.2f} s "
            f"({1000 * seconds / max(len(records), 1):.2f} s per 1,000)"
            + (f", {skipped} skipped as already used" + (" or a twin of one (logic_key)" if twins else "")
               if skipped else ""))
    return records


SYMMETRIC_OPS = ('and', 'or', '<=>')


def _relabel(statement, perm):
    """The statement with person p renamed perm[p], the operands of and / or / <=> in a fixed order."""
    if statement[0] in LEAF_KINDS:
        return (statement[0], perm[statement[1]])
    subs = [_relabel(s, perm) for s in statement[1:]]
    if statement[0] in SYMMETRIC_OPS:
        subs.sort(key=repr)
    return (statement[0],) + tuple(subs)


def _shape(statement, speaker):
    """A person's statement with every other person made anonymous: unchanged by renaming the people."""
    if statement[0] in LEAF_KINDS:
        return (statement[0], statement[1] == speaker)
    subs = [_shape(s, speaker) for s in statement[1:]]
    if statement[0] in SYMMETRIC_OPS:
        subs.sort(key=repr)
    return (statement[0],) + tuple(subs)


def puzzle_key(statements):
    """One key for a puzzle and every trivially equivalent one: the same statements with the people renamed or
    reordered (names permuted, statements in another order) and the operands of and / or / <=> swapped.

    The minimum over the renamings that order the people by an invariant colour (their own statement's shape and
    the shapes of the statements that mention them), trying every order among people of one colour only."""
    n = len(statements)
    shapes = [_shape(s, i) for i, s in enumerate(statements)]
    colour = [repr((shapes[i], sorted(repr(shapes[j]) for j in range(n) if j != i
                                      and i in mentioned_people(statements[j])))) for i in range(n)]
    groups = [[i for i in range(n) if colour[i] == c] for c in sorted(set(colour))]
    best = None
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        perm = [0] * n
        for new, old in enumerate(p for order in orders for p in order):
            perm[old] = new
        form = [None] * n
        for i, s in enumerate(statements):
            form[perm[i]] = _relabel(s, perm)
        form = tuple(form)
        if best is None or form < best:
            best = form
    return best


def statements_of(records):
    """The puzzle_key of every record: generate(exclude=...) skips these puzzles and their trivial equivalents."""
    return {puzzle_key(parse_statements(r['statements'], r['people'])) for r in records}


def logic_key(statements, swapped=False):
    """One key for every puzzle that is the same logic problem: each person's claim as its truth function over all
    knight/knave assignments, up to renaming the people. Broader than puzzle_key: "Emma is not a knave" and "Emma is
    a knight", or "if A then B" and "B or not A", are one claim here, and two such puzzles have the same truth table,
    solution and chain of thought. The minimum over the renamings that order the people by an invariant colour (their
    role in the solution, how many assignments make their claim true), trying every order within a colour only.
    swapped: the key of the role-swapped puzzle (knight and knave exchanged: each claim f becomes g(a) = not f(not a)),
    the same reasoning with every role of the answer flipped; a puzzle whose swapped key is another's logic_key is
    that one's swap twin (kept apart from the test by --test_dedup swap and tiny_base.py --exclude_swap_twins)."""
    n = len(statements)
    masks = knight_masks(n)
    truth = [~truth_value(s, ~masks) if swapped else truth_value(s, masks) for s in statements]
    knights = masks[:, np.flatnonzero(np.logical_and.reduce([masks[i] == truth[i] for i in range(n)]))[0]]
    colour = [(bool(knights[i]), int(truth[i].sum())) for i in range(n)]
    groups = [[i for i in range(n) if colour[i] == c] for c in sorted(set(colour))]
    assignments = np.arange(2 ** n)
    best = None
    for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [p for o in orders for p in o]  # new person k is old person order[k]
        old = np.zeros(2 ** n, dtype=np.int64)  # each new assignment's old one
        for k, p in enumerate(order):
            old |= ((assignments >> k) & 1) << p
        form = tuple(np.packbits(truth[p][old]).tobytes() for p in order)
        if best is None or form < best:
            best = form
    return best


LOGIC_KEY_MAX_PEOPLE = 10  # logic_key tries every order within a colour: ~0.1 s a puzzle at 10 people, 2 s at 12,
# minutes at 14 (the orders grow factorially)


def twin_key(record):
    """A record's logic_key up to LOGIC_KEY_MAX_PEOPLE people, its puzzle_key beyond (renamings only)."""
    statements = parse_statements(record['statements'], record['people'])
    return logic_key(statements) if record['people'] <= LOGIC_KEY_MAX_PEOPLE else puzzle_key(statements)


def logic_keys(records, swapped=False):
    """The set of the records' logic_keys (up to LOGIC_KEY_MAX_PEOPLE people: refused beyond, before any work);
    swapped: of their swap twins (logic_key)."""
    if large := sorted({r['people'] for r in records if r['people'] > LOGIC_KEY_MAX_PEOPLE}):
        raise common.UserError(
            f"puzzles of {', '.join(map(str, large))} people: their logical twins are found up to "
            f"{LOGIC_KEY_MAX_PEOPLE} people only (each key tries every renaming within a colour, factorially many: "
            f"minutes a puzzle at 14); for these, dedup by renaming (kk_data.py --test_dedup renaming; tiny_base.py "
            f"--exclude instead of --exclude_logic)")
    return {logic_key(parse_statements(r['statements'], r['people']), swapped) for r in records}


def keys_to_compare(records, against):
    """logic_keys of the records of a people count that the split `against` has, up to LOGIC_KEY_MAX_PEOPLE: what a
    note on the twins between the two needs (a run deduplicated by renaming may hold more people: not refused for
    a note)."""
    counts = {r['people'] for r in against if r['people'] <= LOGIC_KEY_MAX_PEOPLE}
    return logic_keys([r for r in records if r['people'] in counts])


def logic_twins(records, keys, swapped=False):
    """How many of records have a logically equivalent puzzle (logic_key) among those of `keys` (logic_keys);
    swapped: a swap twin there instead. (A key holds an entry a person: a record of a people count no key has is
    no twin, and its key is not computed.)"""
    counts = {len(key) for key in keys}
    return sum(logic_key(parse_statements(r['statements'], r['people']), swapped) in keys for r in records
               if r['people'] in counts)


def parse_people(text, setting):
    """"3-7" or "2,3" -> [3, 4, 5, 6, 7] / [2, 3]."""
    text = str(text)  # a --config file may give a bare number
    try:
        if '-' in text:
            lo, hi = (int(x) for x in text.split('-'))
            if lo > hi:
                raise common.UserError(f"--{setting} {text!r}: the range runs from low to high ({hi}-{lo})")
            people = list(range(lo, min(hi, MAX_PEOPLE + 1) + 1))  # (past MAX_PEOPLE: refused below, unexpanded)
        else:
            people = [int(x) for x in text.split(',')]
    except ValueError:
        raise common.UserError(f"--{setting} {text!r}: expected a range like 3-7 or a list like 2,3")
    if not people or not all(2 <= n <= MAX_PEOPLE for n in people):
        raise common.UserError(f"--{setting} {text!r}: people counts must be between 2 and {MAX_PEOPLE}")
    if len(set(people)) != len(people):  # a repeat would write its puzzles twice, ids and all
        raise common.UserError(f"--{setting} {text!r}: a people count is repeated")
    return people


def parse_sizes(text, people, setting):
    """"2000" (each) or "200,800" (one per people count)."""
    try:
        sizes = [int(x) for x in str(text).split(',')]
    except ValueError:
        raise common.UserError(f"--{setting} {text!r}: expected a number or a comma list of numbers")
    if len(sizes) == 1:
        sizes = sizes * len(people)
    if any(s < 0 for s in sizes):
        raise common.UserError(f"--{setting} {text!r}: a size is a count of puzzles, 0 or more")
    if len(sizes) != len(people):
        raise common.UserError(f"--{setting} {text!r}: give one size, or one per people count {people}")
    return sizes


def official_split_files(people):
    """The official dataset: {test,train}/people{n}_num{N}.jsonl, test = stream indices 0..99, train after."""
    files = {}
    for n in people:
        train_size = 200 if n == 2 else 1000
        records = generate(OFFICIAL_SEED, n, OFFICIAL_TEST_SIZE + train_size, log=print, label="official ")
        official = [{k: r[k] for k in OFFICIAL_FIELDS} for r in records]
        files[f"test/people{n}_num{OFFICIAL_TEST_SIZE}.jsonl"] = official[:OFFICIAL_TEST_SIZE]
        files[f"train/people{n}_num{train_size}.jsonl"] = official[OFFICIAL_TEST_SIZE:]
    return files


def write_teacher_sft(args):
    if not args.split:
        raise common.UserError("--teacher_sft needs --split FILE (the puzzles to write teacher traces for)")
    common.check_distinct_outputs([("--teacher_sft", args.teacher_sft)], [("--split", args.split)])
    tokenizer = tasks.teacher_sft_tokenizer(args.tokenizer, args.template)
    common.check_fraction(args, "teacher_cot_fraction")
    rng = random.Random(args.teacher_seed)  # which puzzles carry the chain of thought: reproducible
    rows, with_cot, records = [], 0, load_split(args.split)
    if not records:  # (an empty teacher file would replace an earlier one)
        raise common.UserError(f"{args.split}: no records (an empty split): no teacher samples to write")
    for rec in records:
        prompt = render_prompt(rec, tokenizer, args.template)
        cot = rng.random() < args.teacher_cot_fraction
        with_cot += cot
        response = tasks.teacher_response_after(prompt, teacher_response(rec, args.teacher_style if cot else "answer"))
        rows.append({"id": rec["id"], "task": "kk", "prompt": prompt, "response": response})
    common.write_jsonl(args.teacher_sft, rows)
    print(f"wrote {len(rows)} teacher SFT examples to {args.teacher_sft} ({with_cot} with the {args.teacher_style} "
          f"chain of thought, {len(rows) - with_cot} with the answer alone)")


def get_parser():
    p = common.new_parser("Knights & Knaves: generate the paper's splits, the official dataset, or teacher SFT data.")
    p.add_argument("--out_dir", default="data/kk", help="where train.jsonl, test.jsonl, sft.jsonl "
                   "(sft_val.jsonl, official/) go")
    p.add_argument("--train_people", default="3-7", help="people counts of the RL train split (range 3-7 or list 3,5)")
    p.add_argument("--train_per_people", default="2000",
                   help="RL train puzzles per people count (one number, or one per count)")
    p.add_argument("--train_seed", type=int, default=100000,
                   help="seed of the RL train stream (not 1234: that is the official one)")
    p.add_argument("--test_people", default="4-8", help="people counts of the test split")
    p.add_argument("--test_per_people", default="100",
                   help="test puzzles per people count (the first of the test stream)")
    p.add_argument("--test_seed", type=int, default=OFFICIAL_SEED,
                   help="seed of the test stream (1234 = the official test puzzles)")
    p.add_argument("--sft_people", default="2-3", help="people counts of the SFT pool (paper: 2 and 3)")
    p.add_argument("--sft_per_people", default="200,800", help="SFT pool puzzles per people count (paper: 200 and 800)")
    p.add_argument("--sft_seed", type=int, default=200000, help="seed of the SFT pool stream")
    p.add_argument("--test_dedup", default="logic", choices=("swap", "logic", "renaming"),
                   help="which train and SFT-pool puzzles count as a test puzzle and are skipped: 'swap' = those of "
                   "'logic' and the test puzzles' swap twins (knights and knaves exchanged, with every role of the "
                   "answer flipped: the same reasoning; kk_data.logic_key(swapped=True)); 'logic' = every "
                   "puzzle with the same logic as one (kk_data.logic_key: each claim's truth function, up to renaming "
                   "the people; 'not a knave' is 'a knight', 'if A then B' is 'B or not A'); 'renaming' = the "
                   "test puzzles renamed, reordered or with and / or / <=> operands swapped (kk_data.puzzle_key; "
                   "the rule before logic: with few people it lets most of a test through as logical twins, README)")
    p.add_argument("--sft_val_fraction", type=float, default=0.0,
                   help="share of the SFT pool held out as sft_val.jsonl: the pool is shuffled with seed 1234, its "
                   "last fraction held out, less the puzzles with a twin in the rest (kk_data.twin_key: the same "
                   "logic up to 10 people, a renaming beyond), "
                   "and the rest written to sft.jsonl (paper: 0.1, K_and_K_preprocess's 900 SFT train / 100 val "
                   "of 1,000; config/kk-qwen2.5-1.5b.sh passes it); 0 = the whole pool in sft.jsonl, in the "
                   "generator's order, and no sft_val.jsonl")
    p.add_argument("--official", type=common.str2bool, default=False,
                   help="instead: regenerate the official dataset (seed 1234, test = indices 0-99, train after) into "
                        "OUT_DIR/official/{test,train}/people{n}_num{N}.jsonl")
    p.add_argument("--official_people", default="2-8", help="people counts for --official (the official set has 2-8)")
    p.add_argument("--teacher_sft", default=None, help="instead: write SFT jsonl ({id, task, prompt, response}) of the "
                   "teacher chain-of-thought for the puzzles of --split to this file")
    p.add_argument("--split", default=None, help="with --teacher_sft: the split file (ours or official)")
    p.add_argument("--tokenizer", default=None,
                   help="with --teacher_sft: a Hugging Face tokenizer directory (not needed with --template plain)")
    p.add_argument("--template", default="auto", choices=("auto", "chat", "plain"),
                   help="with --teacher_sft: prompt template (auto = chat when the tokenizer has one)")
    p.add_argument("--teacher_style", default="trace", choices=TEACHER_STYLES,
                   help="with --teacher_sft: 'trace' = official step-by-step trace + answer (paper); "
                   "'table' = a truth table, one line per assignment tried (tiny preset); "
                   "'answer' = the final answer line alone")
    p.add_argument("--teacher_cot_fraction", type=float, default=1.0,
                   help="with --teacher_sft: share of the puzzles whose response carries the --teacher_style chain "
                   "of thought; the others get the answer line alone (tiny preset: 0.25, a teacher that shows "
                   "its work on a quarter of the puzzles; paper: 1)")
    p.add_argument("--teacher_seed", type=int, default=0, help="seed of which puzzles carry the chain of thought")
    p.add_argument("--fixed_names", type=common.str2bool, default=False,
                   help="person i is always the i-th official name (Emma, Liam, Olivia, ...) instead of a random "
                   "one: the tiny preset's model cannot learn to copy names in minutes (not the paper's data)")
    return p


def main(argv=None):
    parser = get_parser()
    args = common.parse_settings(parser, argv)

    if args.teacher_sft:
        return write_teacher_sft(args)
    # (a forgotten --teacher_sft wrote every split, over --out_dir's)
    common.refuse_unused(args, parser, ("split", "tokenizer", "template", "teacher_style", "teacher_cot_fraction",
                                        "teacher_seed"), "--teacher_sft", "write the splits")

    if args.official:
        people = parse_people(args.official_people, "official_people")
        print(f"regenerating the official K&K dataset (seed {OFFICIAL_SEED}) for {people} people")
        for rel, rows in official_split_files(people).items():
            common.write_jsonl(os.path.join(args.out_dir, "official", rel), rows)
            print(f"  wrote {len(rows):5d} records to {os.path.join(args.out_dir, 'official', rel)}")
        return

    test_people = parse_people(args.test_people, "test_people")
    train_people = parse_people(args.train_people, "train_people")
    sft_people = parse_people(args.sft_people, "sft_people")
    test_sizes = parse_sizes(args.test_per_people, test_people, "test_per_people")
    train_sizes = parse_sizes(args.train_per_people, train_people, "train_per_people")
    sft_sizes = parse_sizes(args.sft_per_people, sft_people, "sft_per_people")
    if not 0 <= args.sft_val_fraction < 1:
        raise common.UserError(f"--sft_val_fraction: expected a share in [0, 1), got {args.sft_val_fraction}")

    # Never train on a test puzzle: the official test split (the first 100 of the official stream,
    # for every people count) and our own test split are both excluded from train and the SFT pool (ours with
    # its logical twins under --test_dedup logic, and their swap twins too under swap).
    print("test split")
    named = dict(fixed_names=args.fixed_names)
    test = [r for n, size in zip(test_people, test_sizes) for r in generate(args.test_seed, n, size, **named)]
    beyond = [f"{n} people: {size}" for n, size in zip(test_people, test_sizes) if size > OFFICIAL_TEST_SIZE]
    if args.test_seed == OFFICIAL_SEED and beyond:
        print(f"note: the official stream's test split holds {OFFICIAL_TEST_SIZE} puzzles per people count; past "
              f"them ({', '.join(beyond)}) the test split takes the official train split's first records")
    used = statements_of(test)
    twins = logic_keys(test) if args.test_dedup in ("logic", "swap") else frozenset()
    if args.test_dedup == "swap":
        twins |= logic_keys(test, swapped=True)
    for n in sorted(set(train_people + sft_people)):
        # (the official test puzzles of people counts not in our test: exact statements, as before; a puzzle_key
        #  here would rule out most two-people puzzles for the sake of a test split that has none)
        used |= {statements for _, statements, _ in sample_puzzles(OFFICIAL_SEED, n, OFFICIAL_TEST_SIZE)}
    print("RL train split")
    train = [r for n, size in zip(train_people, train_sizes)
             for r in generate(args.train_seed, n, size, used, twins=twins, **named)]
    used |= statements_of(train)
    print("SFT pool")
    sft = [r for n, size in zip(sft_people, sft_sizes)
           for r in generate(args.sft_seed, n, size, used, twins=twins, **named)]
    sft_val = []
    if args.sft_val_fraction > 0:  # the paper's cut: random.seed(1234), shuffle, train = the first int(0.9 n)
        random.Random(SFT_VAL_SEED).shuffle(sft)
        cut = int(len(sft) * (1 - args.sft_val_fraction))
        sft, sft_val = sft[:cut], sft[cut:]
        # a held-out puzzle with a twin in sft.jsonl (the same logic: truth table, answer, chain of thought) holds
        # nothing out: dropped (the paper's cut kept them; at the paper preset's seeds 64 of the 100)
        in_sft = {twin_key(r) for r in sft}
        held_out = [r for r in sft_val if twin_key(r) not in in_sft]
        print(f"sft_val: {len(sft_val) - len(held_out)} of the {len(sft_val)} held-out puzzles dropped, a logical twin "
              f"of an SFT puzzle; {len(held_out)} kept")
        sft_val = held_out

    # what the rule lets through: under renaming, a test puzzle's claims worded otherwise (docs/data.md); under
    # renaming or logic, its swap twins (docs/tiny_preset.md). (The keys of 10,000 puzzles of up to 7 people: seconds.)
    for name, records in (("RL train split", train), ("SFT pool", sft + sft_val)) if args.test_dedup != "swap" else ():
        keys = keys_to_compare(records, test)
        if args.test_dedup == "renaming" and (count := logic_twins(test, keys)):
            print(f"note: {count} of the {len(test)} test puzzles have a logically equivalent puzzle in the {name} "
                  f"(the same claims' truth functions after renaming, worded otherwise: kk_data.logic_key)")
        if count := logic_twins(test, keys, swapped=True):
            print(f"note: {count} of the {len(test)} test puzzles have a swap twin in the {name} (knights and "
                  f"knaves exchanged, the answer flipped: the same reasoning; --test_dedup swap skips them)")
    held_out = [("sft_val", sft_val)] if args.sft_val_fraction > 0 else []
    for name, records in [("test", test), ("train", train), ("sft", sft)] + held_out:
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        if not common.write_split(path, records):
            continue
        counts = {}
        for r in records:
            counts[r['people']] = counts.get(r['people'], 0) + 1
        print(f"wrote {len(records):6d} records to {path}  (per people: "
              + ", ".join(f"{n}: {c}" for n, c in sorted(counts.items())) + ")")


if __name__ == "__main__":
    common.run_main(main)
