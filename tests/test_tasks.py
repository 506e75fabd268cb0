"""tasks.py: stratified subsets of a split, prompts that begin with BOS where the model family expects one, and
the SFT loader (prompt and response tokenized apart, errors naming file and line)."""
import importlib
import json
import os
import re

import pytest

import common
import math_data
import redistill_sft as sft
import tasks
import toy_task
from common import UserError
from tasks import load_tokenizer
from test_redistill_sft import write_sft


def test_stratified_subset_of_a_split_ordered_by_difficulty():
    """K&K's test split is ordered by people: the first N would all be the easiest. The subset keeps each level's
    share (largest remainders), is seeded, keeps the split's order, and says what it took."""
    records = [{"id": f"{people}-{i}", "people": people}
               for people, count in ((2, 50), (3, 30), (4, 20)) for i in range(count)]
    sub, desc = tasks.stratified_subset(records, 15, "people", seed=1)
    counts = {p: sum(r["people"] == p for r in sub) for p in (2, 3, 4)}
    assert counts == {2: 8, 3: 4, 4: 3}  # quotas 7.5 / 4.5 / 3: the one seat left goes to the first tied remainder
    assert sum(counts.values()) == 15 and desc.startswith("15 of 100, stratified by people (")
    assert all(f"{p}: {counts[p]}" in desc for p in counts)
    order = [records.index(r) for r in sub]
    assert order == sorted(order) and order != list(range(15))
    assert tasks.stratified_subset(records, 15, "people", seed=1)[0] == sub  # seeded
    assert tasks.stratified_subset(records, 15, "people", seed=2)[0] != sub
    exact, _ = tasks.stratified_subset(records, 10, "people", seed=0)  # 5 / 3 / 2 exactly
    assert [sum(r["people"] == p for r in exact) for p in (2, 3, 4)] == [5, 3, 2]
    assert tasks.stratified_subset(records, 0, "people")[0] == records
    assert tasks.stratified_subset(records, 500, "people") == (records, "all 100")


def llama3_style_tokenizer():
    """Built offline like Llama 3's: byte-level BPE, <|begin_of_text|> as BOS added by the tokenizer's own
    post-processor, a chat template that writes it too."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    tok.train_from_iterator(["Question: who is a knight? Answer: let's think step by step."] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


def test_prompts_begin_with_bos_where_the_model_family_expects_one(tmp_path):
    import common
    from tiny_base import build_tokenizer
    llama = llama3_style_tokenizer()
    bos = llama.bos_token_id
    plain = "Question:\nwho is a knight?\nAnswer:\nLet's think step by step."
    ids = tasks.encode_prompts(llama, [plain, "<|begin_of_text|>" + plain])
    assert ids[0][0] == bos and ids[0][1:] == llama(plain, add_special_tokens=False)["input_ids"]
    assert ids[1] == ids[0]  # a chat template that writes BOS itself: not doubled
    qwen = build_tokenizer([plain] * 5, vocab_size=300)  # Qwen style: no BOS
    assert tasks.encode_prompts(qwen, [plain])[0] == qwen(plain, add_special_tokens=False)["input_ids"]
    assert tasks.encode_prompts(qwen, []) == tasks.encode_prompts(llama, []) == []  # a rank with no records
    # the SFT loader puts it before the prompt (and nowhere else)
    common.write_jsonl(str(tmp_path / "d.jsonl"), [{"id": "a", "prompt": plain, "response": " a knight"}])
    ex = tasks.load_sft_examples([str(tmp_path / "d.jsonl")], llama, 100)[0]
    assert ex["input_ids"][0] == bos and ex["input_ids"].count(bos) == 1
    assert ex["input_ids"][ex["start"] - 1] != bos  # the prompt's own tokens end the context


def test_generation_stops_at_every_llama3_terminator():
    """Llama 3.1+ checkpoints name three end ids (end of text, end of turn, end of message after a tool call); the
    engine, SFT's check and a saved generation config take all three."""
    import common
    llama = llama3_style_tokenizer()
    assert common.stop_token_ids(llama) == sorted(llama.convert_tokens_to_ids(
        ["<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]))


def test_a_chat_prompt_does_not_change_with_the_date(monkeypatch):
    """Llama 3.2's chat template writes today's date into the system header unless given date_string: an SFT file
    rendered one day and RL or eval on another, a resume, or a run past midnight would read other prompts."""
    import datetime
    import transformers.utils.chat_template_utils as chat_template_utils
    llama = llama3_style_tokenizer()
    llama.chat_template = (  # the date lines of Llama 3.2's template, then its messages cut short
        '{%- if not date_string is defined %}{%- if strftime_now is defined %}'
        '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
        '{%- endif %}{%- endif %}<|begin_of_text|>Today Date: {{ date_string }}\n'
        '{%- for m in messages %}[{{ m.role }}] {{ m.content }}\n{%- endfor %}[assistant]')

    def on(day):
        class Day(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return cls(2026, 12, day, 23, 59)
        monkeypatch.setattr(chat_template_utils, "datetime", Day)
        return tasks.render_question("who is a knight?", llama, "chat")
    assert on(4) == on(5)
    assert "Today Date: 26 Jul 2024" in on(5) and "who is a knight?" in on(5)


def test_loader_tokenizes_prompt_and_response_separately(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(tiny_checkpoint)
    recs = toy_task.make_records(3, seed=5)
    path = write_sft(tmp_path / "d.jsonl", recs, tok)
    examples = tasks.load_sft_examples([path], tok, max_length=512)
    assert len(examples) == 3
    for e, r in zip(examples, recs):
        p = tok(toy_task.render_prompt(r, tok), add_special_tokens=False)["input_ids"]
        resp = tok(toy_task.teacher_response(r), add_special_tokens=False)["input_ids"]
        assert e["input_ids"] == p + resp + [tok.eos_token_id]
        assert e["start"] == len(p) and sft.num_loss_tokens(e) == len(resp) + 1
        assert (e["id"], e["file"]) == (r["id"], path)
    assert [e["line"] for e in examples] == [1, 2, 3]


def test_texts_are_tokenized_a_chunk_at_a_time_to_the_same_ids(tiny_checkpoint):
    """A whole SFT file in one tokenizer call held every row's full encoding at once; chunks give the same ids, in
    order, whatever the chunk."""
    tok = load_tokenizer(tiny_checkpoint)
    texts = [toy_task.teacher_response(r) * (i % 3) for i, r in enumerate(toy_task.make_records(7, seed=5))]
    whole = tok(texts, add_special_tokens=False)["input_ids"]
    assert [tasks.text_token_ids(tok, texts, chunk) for chunk in (1, 3, 7, 256)] == [whole] * 4
    assert tasks.text_token_ids(tok, []) == [] and [] in whole  # (empty texts, and no texts at all)


def test_loader_errors_name_file_and_line(tiny_checkpoint, tmp_path):
    tok = load_tokenizer(tiny_checkpoint)
    good = {"id": "a", "prompt": "What is 1 + 2?", "response": "3"}
    cases = [
        ([good, "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([good, {"id": "b", "prompt": "x"}], r"bad\.jsonl:2: missing field 'response'"),
        ([{"id": "b", "prompt": "x", "response": 3}], r"bad\.jsonl:1: field 'response' must be of type str"),
        ([{"id": "b", "prompt": "", "response": "3"}], r"bad\.jsonl:1: empty prompt"),
        # (one target, EOS right after the prompt, weighed as a whole answer under seq_mean: "stop at once" taught)
        ([good, {"id": "b", "prompt": "x", "response": ""}], r"bad\.jsonl:2: field 'response' is empty: trained"),
        ([good, {"id": "b", "prompt": "x", "response": " \n"}], r"bad\.jsonl:2: field 'response' is blank"),
        ([good, {"id": None, "prompt": "x", "response": "3"}], r"bad\.jsonl:2: field 'id' is None; an id is a "
                                                               r"non-blank string"),
        ([good, {"id": " ", "prompt": "x", "response": "3"}], r"bad\.jsonl:2: field 'id' is ' '"),
        ([{"id": ["a"], "prompt": "x", "response": "3"}], r"bad\.jsonl:1: field 'id' is \['a'\]"),
        ([{"id": True, "prompt": "x", "response": "3"}], r"bad\.jsonl:1: field 'id' is True"),
        ([good, {"id": "b", "task": ["kk"], "prompt": "x", "response": "3"}],  # (sample_effect's traceback)
         r"bad\.jsonl:2: field 'task' is \['kk'\]; a task is a name"),
        ([good, {"id": "b", "prompt": "x", "response": "3" + tok.eos_token}],
         r"bad\.jsonl:2: field 'response' holds the stop token .* at token 1 of 2; EOS is appended"),
        ([{"id": "b", "prompt": "x", "response": "2" + tok.eos_token + " and 3"}],  # inside it: the same
         rf"bad\.jsonl:1: field 'response' holds the stop token '{re.escape(tok.eos_token)}' \(id "
         rf"{tok.eos_token_id}\) at token 1 of"),
        ([good, {"id": "b", "prompt": "x", "response": "3" + tok.eos_token + " "}],
         r"bad\.jsonl:2: field 'response' holds the stop token"),
        ([good, good, {"id": "long", "prompt": "What is 1 + 2? " * 20, "response": "3"}],
         r"bad\.jsonl:3: example 'long' has \d+ tokens .* > max_length 40"),
        ([], r"bad\.jsonl: no examples"),
    ]
    for lines, pattern in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
        with pytest.raises(UserError, match=pattern):
            tasks.load_sft_examples([str(path)], tok, max_length=40)
    with pytest.raises(UserError, match="missing.jsonl: file not found"):
        tasks.load_sft_examples([str(tmp_path / "missing.jsonl")], tok, 40)
    # a stop token that is not the EOS (a chat terminator the tokenizer knows) is refused too; in the prompt it is data
    terminators = [t for t in common.STOP_TOKENS if t in tok.get_vocab() and t != tok.eos_token]
    for t in terminators:
        path.write_text(json.dumps({"id": "c", "prompt": "x" + t, "response": "3" + t}) + "\n")
        with pytest.raises(UserError, match=rf"bad\.jsonl:1: field 'response' holds the stop token '{re.escape(t)}'"):
            tasks.load_sft_examples([str(path)], tok, max_length=40)
        path.write_text(json.dumps({"id": "c", "prompt": "x" + t, "response": "3"}) + "\n")
        assert len(tasks.load_sft_examples([str(path)], tok, max_length=40)) == 1


def test_rescoring_runs_on_threads_only_where_the_task_says_its_score_is_safe_there():
    """A score that times itself out with signal.alarm works on the main thread only (from another it raises, and
    a grader that never raises returns 0): re-scoring, like every other call, stays on the main thread unless the
    task sets SCORE_THREADS (MATH does: a math-verify worker per thread)."""
    import threading
    import types
    seen = []

    def score(response, record, finished):
        seen.append(threading.current_thread() is threading.main_thread())
        return toy_task.score(response, record, finished)
    records = toy_task.make_records(6, seed=5)
    samples = [{"id": r["id"], "response": toy_task.teacher_response(r), "finished": True, "reward": 0.0}
               for r in records]
    plain = types.SimpleNamespace(__name__="plain_task", score=score)
    assert tasks.rescore(plain, samples, records, "x") == 6 and seen == [True] * 6
    seen.clear()
    threaded = types.SimpleNamespace(__name__="threaded_task", score=score, SCORE_THREADS=True)
    for s in samples:
        s["reward"] = 0.0
    assert tasks.rescore(threaded, samples, records, "x") == 6 and [s["reward"] for s in samples] == [1.0] * 6
    assert math_data.SCORE_THREADS and not hasattr(toy_task, "SCORE_THREADS")
    if (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) > 1:
        assert seen == [False] * 6


def test_split_ids_must_differ_as_text(tmp_path):
    """Rollout logs, LIMR's scores and the re-distillation sets match ids as text: 1 and "1" would be one prompt,
    whose rollouts all went to one of them. A split holding both is refused, as a plain duplicate is."""
    records = toy_task.make_records(3, seed=5)
    path = str(tmp_path / "split.jsonl")
    common.write_jsonl(path, [dict(records[0], id=1), dict(records[1], id="a"), dict(records[2], id=2)])
    assert [r["id"] for r in tasks.load_records(toy_task, "toy_task", path, None, "plain")] == [1, "a", 2]
    for second, message in (("1", r"split\.jsonl:3 \(id '1'\): duplicate id '1' \(the same as 1 as text"),
                            (1, r"split\.jsonl:3 \(id 1\): duplicate id 1$")):
        common.write_jsonl(path, [dict(records[0], id=1), dict(records[1], id="a"), dict(records[2], id=second)])
        with pytest.raises(UserError, match=message):
            tasks.load_records(toy_task, "toy_task", path, None, "plain")


def test_a_split_error_names_the_line_of_the_record_or_else_its_number(tmp_path, monkeypatch):
    """A record refused as the split loads is named by file and line (blank lines before it counted), where the
    task's loader read the file a record per line (as many records as lines, their ids the lines'); one that skipped
    lines gets the record's number in the split, not another record's line."""
    records = toy_task.make_records(3, seed=5)
    path = str(tmp_path / "split.jsonl")
    lines = [json.dumps(r) for r in (records[0], records[1], dict(records[2], id=records[0]["id"]))]
    with open(path, "w") as f:
        f.write("\n" + lines[0] + "\n\n\n" + lines[1] + "\n" + lines[2] + "\n")
    with pytest.raises(UserError, match=rf"^split {re.escape(path)}:6 \(id 'toy-train-00000'\): duplicate id"):
        tasks.load_records(toy_task, "toy_task", path, None, "plain")
    monkeypatch.setattr(toy_task, "load_split", lambda p: common.read_jsonl(p)[1:])  # (skips the first record)
    with open(path, "w") as f:
        f.write("\n".join(lines[:2] + [json.dumps(dict(records[2], id=records[1]["id"]))]) + "\n")
    with pytest.raises(UserError, match=rf"^split {re.escape(path)}: record 2 \(id 'toy-train-00001'\): duplicate"):
        tasks.load_records(toy_task, "toy_task", path, None, "plain")
    monkeypatch.setattr(toy_task, "load_split", lambda p: [{k: v for k, v in r.items() if k != "id"}
                                                           for r in common.read_jsonl(p)])  # (drops every id)
    with pytest.raises(UserError, match=rf"^split {re.escape(path)}:1: missing field 'id'$"):
        tasks.load_records(toy_task, "toy_task", path, None, "plain")


def test_split_ids_are_strings_or_integers(tmp_path):
    """Rollout logs carry an id as a string or an integer, and set B and LIMR refuse any other: a split whose ids
    are floats, null, booleans or lists is refused when it loads (not after the RL run that logs them)."""
    records = toy_task.make_records(2, seed=5)
    path = str(tmp_path / "split.jsonl")
    for bad in (2.0, None, True, ["toy", 1], "", " \t"):  # (a blank id: nothing a log or an error can show)
        common.write_jsonl(path, [dict(records[0], id=1), dict(records[1], id=bad)])
        with pytest.raises(UserError, match=rf"split\.jsonl:2: field 'id' is {re.escape(repr(bad))}; an id is a "
                                            r"non-blank string or an integer"):
            tasks.load_records(toy_task, "toy_task", path, None, "plain")


def test_a_prompt_that_fills_the_context_exactly_fits(tiny_checkpoint, tmp_path):
    """The boundaries are inclusive: a prompt plus max_new_tokens equal to the context fits (one more does not), and
    an SFT example of exactly max_length tokens loads (one token less of room does not)."""
    records = [{"id": "a"}]
    tasks.check_prompts_fit([[1] * 10], records, 22, 32, "s.jsonl")
    with pytest.raises(UserError, match="s.jsonl: record id 'a': prompt of 10 tokens"):
        tasks.check_prompts_fit([[1] * 10], records, 23, 32, "s.jsonl")
    tok = load_tokenizer(tiny_checkpoint)
    path = write_sft(tmp_path / "d.jsonl", toy_task.make_records(1, seed=5), tok)
    n = len(tasks.load_sft_examples([path], tok, max_length=512)[0]["input_ids"])
    assert len(tasks.load_sft_examples([path], tok, max_length=n)) == 1
    with pytest.raises(UserError, match=rf"d\.jsonl:1: .* has {n} tokens .* > max_length {n - 1}"):
        tasks.load_sft_examples([path], tok, max_length=n - 1)


# -----------------------------------------------------------------------------
# what a task module must be (a fork's own task: docs/data.md, "Adding a task")


def task_module(tmp_path, monkeypatch, name, body):
    """A task module of the test's own: toy_task's interface with `body` appended (a later def replaces one)."""
    import inspect
    import sys
    (tmp_path / f"{name}.py").write_text(inspect.getsource(toy_task) + "\n" + body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return tasks.get_task(name)


def test_a_score_is_taken_as_a_number_or_refused_naming_the_task(tmp_path, monkeypatch):
    """A bool or a numpy number from score() is its value (a rollout log holding `true` was refused later, by set B
    and LIMR, after the whole RL run); text, None or NaN is an error naming the task, when the split is loaded."""
    import numpy as np
    record = toy_task.make_records(1)[0]
    for value, expect in ((True, 1.0), (False, 0.0), (np.float32(0.5), 0.5), (np.True_, 1.0), (1, 1.0)):
        task = task_module(tmp_path, monkeypatch, "number_task", f"import numpy as np\n\n\n"
                           f"def score(response, record, finished):\n    return {value!r}\n")
        reward = tasks.reward_of(task, "", record, True)
        assert reward == expect and type(reward) is float
    path = str(tmp_path / "split.jsonl")
    common.write_jsonl(path, toy_task.make_records(2))
    for bad in ('"1"', "None", 'float("nan")', "np.array([1.0, 0.0])"):
        task = task_module(tmp_path, monkeypatch, "bad_task", f"import numpy as np\n\n\n"
                           f"def score(response, record, finished):\n    return {bad}\n")
        with pytest.raises(UserError, match="task bad_task: score\\(\\) returned .* it must return a finite number"):
            tasks.load_records(task, "bad_task", path, None, "plain")


def test_a_difficulty_named_as_a_rollout_log_field_is_refused(tmp_path, monkeypatch):
    """train_rl logs each rollout with the task's DIFFICULTY beside its own fields: DIFFICULTY = "length" overwrote
    every logged length with the difficulty ("epoch" would have changed LIMR's curves, "id" the prompts)."""
    for field in ("length", "epoch", "id"):
        with pytest.raises(UserError, match=f"DIFFICULTY = '{field}' is the name of a rollout log field"):
            task_module(tmp_path, monkeypatch, f"task_{field}", f"DIFFICULTY = {field!r}\n")
    assert task_module(tmp_path, monkeypatch, "task_count", 'DIFFICULTY = "count"\n').DIFFICULTY == "count"


def test_a_stage_that_renders_nothing_does_not_render(tmp_path, monkeypatch):
    """lim_select and sample_policy --from_rollouts load splits with no tokenizer: a task whose render_prompt needs one
    (a chat template) loads there, where it failed, after the RL run, as 'a split of another task'."""
    task = task_module(tmp_path, monkeypatch, "chat_task", "def render_prompt(record, tokenizer, template='auto'):\n"
                                                           "    return tokenizer.apply_chat_template([])\n")
    path = str(tmp_path / "split.jsonl")
    common.write_jsonl(path, toy_task.make_records(2))
    assert len(tasks.load_records(task, "chat_task", path, None, "plain")) == 2
    assert tasks.task_module_name("kk") == tasks.task_module_name("kk_data") == "kk_data"


def test_difficulties_that_read_the_same_as_text_are_refused_when_the_split_loads(tmp_path):
    """3 and "3" share one row of every per-difficulty table: refused when the split loads, naming its file and
    record, before any generation (a first version refused it in scoring.summarize: after eval's whole generation,
    or at a training run's first validation)."""
    records = toy_task.make_records(3)
    records[2]["level"] = str(records[0]["level"])
    path = str(tmp_path / "split.jsonl")
    common.write_jsonl(path, records)
    with pytest.raises(UserError, match=f"split {re.escape(path)}:3 .*difficulty 'level' is '1', but an earlier "
                                        f"record's is 1"):
        tasks.load_records(toy_task, "toy_task", path, None, "plain")


def test_task_names_that_cannot_be_a_task_module_are_refused_saying_what_to_give(tmp_path, monkeypatch):
    """--task takes an import name: a file name, a path or nothing was a TypeError or ValueError traceback; a standard
    library name loaded Python's own module ("lacks DIFFICULTY, ..."), or, as a file, hid that module from numpy and
    transformers; a missing package inside the task module was called an unknown task."""
    for name, said in (("arith.py", "give the module's import name, --task arith, not its file name"),
                       ("./arith.py", "not a module name"), ("", "not a module name"), (".arith", "not a module name"),
                       ("operator", "'operator' is a module of Python's standard library"),
                       ("json.tasks", "'json' is a module of Python's standard library")):
        with pytest.raises(UserError, match=re.escape(f"--task {name!r}: {said}")):
            tasks.get_task(name)
    with pytest.raises(UserError, match=r"^task module 'dep_task' failed to import: No module named 'no_such_pkg_x'$"):
        task_module(tmp_path, monkeypatch, "dep_task", "import no_such_pkg_x\n")
    with pytest.raises(UserError, match=r"^unknown task 'no_such_task_x' \(No module named 'no_such_task_x'\)"):
        tasks.get_task("no_such_task_x")
    with pytest.raises(UserError, match=r"task module 'common' \(.*common\.py\) lacks DIFFICULTY"):
        tasks.get_task("common")  # (a project module: the file it loaded is named)


@pytest.mark.parametrize("body,said", [
    ("def load_split(path):\n    return (r for r in common.read_jsonl(path))\n",
     r"load_split\(.*\) returned generator; it must return a list of dicts"),
    ("def render_prompt(record, tokenizer, template='auto'):\n    pass\n",
     r"jsonl:1 \(id .*\): task 'shape_task': render_prompt returned None; it must return the prompt text"),
    ("def render_prompt(record, tokenizer, template='auto'):\n    return ''\n",
     r"render_prompt returned ''; it must return the prompt text"),
    ("def load_split(path):\n    return [dict(r, level=[r['level']]) for r in common.read_jsonl(path)]\n",
     r"jsonl:1 \(id .*\): difficulty 'level' is a list \(\[1\]\); a difficulty is a string or a number"),
    ("def load_split(path):\n    return [dict(r, level=float('nan')) for r in common.read_jsonl(path)]\n",
     r"jsonl:1 \(id .*\): difficulty 'level' is nan; give a finite number"),  # (was: "an earlier record's is nan")
    ("from fractions import Fraction\n\n\ndef load_split(path):\n"
     "    return [dict(r, half=Fraction(1, 2)) for r in common.read_jsonl(path)]\n",
     r"jsonl:1 \(id .*\): task 'shape_task': load_split returned a record that is not JSON \(Object of type "
     r"Fraction"),
])
def test_a_task_module_that_returns_the_wrong_shape_is_refused_when_the_split_loads(tmp_path, monkeypatch, body,
                                                                                    said):
    """What load_split and render_prompt return is checked as the split loads, naming the task and the record: each
    of these passed and broke later (len() of a generator in every stage, a transformers traceback, an empty prompt
    naming no record, an unhashable difficulty after eval's generation, lim_select's JSON write after the probe run)."""
    task = task_module(tmp_path, monkeypatch, "shape_task", "import common\n\n\n" + body)
    path = str(tmp_path / "split.jsonl")
    common.write_jsonl(path, toy_task.make_records(2))
    with pytest.raises(UserError, match=said):
        tasks.load_records(task, "shape_task", path, object(), "plain")  # (the plain template reads no tokenizer)


def test_rescore_takes_the_score_of_now_and_names_a_sample_without_its_record():
    """Set B's re-check and eval's re-scoring share tasks.rescore: rewards replaced in place, the changes counted,
    and a sample whose id the split lacks an error naming where it came from (not a KeyError)."""
    records = toy_task.make_records(2)
    right = toy_task.teacher_response(records[0])
    samples = [{"id": records[0]["id"], "response": right, "finished": True, "reward": 0.0},
               {"id": records[1]["id"], "response": "no", "finished": True, "reward": 0.0}]
    assert tasks.rescore(toy_task, samples, records, "here") == 1 and [s["reward"] for s in samples] == [1.0, 0.0]
    with pytest.raises(UserError, match="here: no record for id 'zz' \\(1 ids missing\\)"):
        tasks.rescore(toy_task, samples + [dict(samples[1], id="zz")], records, "here")


def test_a_checkpoint_saved_without_its_tokenizer_is_named(tiny_checkpoint, tmp_path):
    """A directory with a config and weights but no tokenizer file: transformers 5 returned an empty tokenizer (one
    token; every prompt encoded to nothing), which token_shift reported as 'different tokenizers (314 vs 1 tokens)'
    or a traceback on an empty prompt. Refused, naming the directory and what it lacks."""
    import shutil
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_checkpoint, name), bare / name)
    with pytest.raises(UserError, match=rf"^{re.escape(str(bare))}: no tokenizer files \(tokenizer\.json, "):
        load_tokenizer(str(bare))
    shutil.copy(os.path.join(tiny_checkpoint, "tokenizer.json"), bare / "tokenizer.json")
    assert len(load_tokenizer(str(bare))) == len(load_tokenizer(tiny_checkpoint))


def test_a_damaged_tokenizer_or_chat_template_is_a_line_naming_the_checkpoint(tiny_checkpoint, tmp_path):
    """A tokenizer.json that is JSON but no tokenizer gave transformers' KeyError, a chat template with a syntax
    error jinja2's traceback; each is one line naming the directory."""
    import json
    import shutil
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    good = (copy / "tokenizer.json").read_text(encoding="utf-8")
    (copy / "tokenizer.json").write_text(json.dumps({"version": "1.0"}))
    with pytest.raises(UserError, match=rf"^{re.escape(str(copy))}: cannot load tokenizer \("):
        load_tokenizer(str(copy))
    (copy / "tokenizer.json").write_text(good)
    tok = load_tokenizer(str(copy))
    tok.chat_template = "{% for m in messages %}{{ m.content }"
    with pytest.raises(UserError, match=r": its chat template does not render \(TemplateSyntaxError"):
        tasks.render_question("What is 1 + 1?", tok, "chat")


def test_the_score_digest_follows_the_modules_a_task_imports_and_its_scorer_packages(tmp_path, monkeypatch):
    """eval re-scores finished pairs when this digest changes: a grader module the task imports (directly or through
    another), this project's shared modules, and the version of a package named in SCORER_PACKAGES each count; an
    import of the standard library or of an installed package reads nothing."""
    (tmp_path / "my_grader.py").write_text("import my_rules\n")
    (tmp_path / "my_rules.py").write_text("TOLERANCE = 0\n")
    (tmp_path / "my_scored_task.py").write_text(
        "import json\nimport numpy\nfrom my_grader import *\nimport tasks\nSCORER_PACKAGES = ('numpy',)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("my_scored_task")
    assert {os.path.basename(p) for p in tasks.project_imports(module.__file__)} == {
        "my_scored_task.py", "my_grader.py", "my_rules.py", "tasks.py", "common.py"}
    before = tasks.task_source_digest(module)
    (tmp_path / "my_rules.py").write_text("TOLERANCE = 1e-6\n")  # two imports away
    changed = tasks.task_source_digest(module)
    assert changed != before
    real = tasks.importlib.metadata.version
    monkeypatch.setattr(tasks.importlib.metadata, "version", lambda name: "0.0" if name == "numpy" else real(name))
    assert tasks.task_source_digest(module) not in (before, changed)
    assert tasks.task_source_digest(math_data) != tasks.task_source_digest(toy_task)


def test_the_score_digest_follows_a_task_packages_own_modules(tmp_path, monkeypatch):
    """`--task pkg.mytask` (get_task's layout for a fork): the grader it imports from its package, relatively or by
    the package's name, and from a subpackage, counts; only pkg/__init__.py did, so an edited grader left finished
    pairs' rewards as they were."""
    package = tmp_path / "scored_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mytask.py").write_text("from .grader import check\nfrom scored_pkg.rules import TOLERANCE\n"
                                       "import scored_pkg.limits\nimport scored_pkg.sub.more\n")
    (package / "grader.py").write_text("from . import helpers\n\ndef check(x):\n    return helpers.ok(x)\n")
    (package / "helpers.py").write_text("from .sub.deep import ZERO\n\ndef ok(x):\n    return ZERO\n")
    (package / "sub").mkdir()
    for name, text in (("__init__.py", ""), ("deep.py", "ZERO = 0.0\n"), ("more.py", "MORE = 1\n")):
        (package / "sub" / name).write_text(text)
    (package / "rules.py").write_text("TOLERANCE = 0\n")
    (package / "limits.py").write_text("LIMIT = 1\n")
    (package / "unused.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("scored_pkg.mytask")
    assert {os.path.relpath(p, tmp_path) for p in tasks.project_imports(module.__file__)} == {
        os.path.join("scored_pkg", name) for name in
        ("mytask.py", "__init__.py", "grader.py", "helpers.py", "rules.py", "limits.py", os.path.join("sub", "deep.py"),
         os.path.join("sub", "__init__.py"), os.path.join("sub", "more.py"))}
    before = tasks.task_source_digest(module)
    for name in ("helpers.py", "rules.py", "limits.py", os.path.join("sub", "deep.py"), os.path.join("sub", "more.py")):
        (package / name).write_text((package / name).read_text() + "# edited\n")
        assert tasks.task_source_digest(module) != before, name
        before = tasks.task_source_digest(module)


def test_sft_refuses_a_tokenizer_that_marks_the_start_of_a_lone_text():
    """A sentencepiece tokenizer (Llama-2's, Mistral's) puts "▁" before a text it encodes alone: SFT's response,
    tokenized apart from its prompt, began with a "▁" token generation never makes after the prompt, and SFT taught
    it. Refused by name; a byte-level tokenizer without a prefix space (the project's, Qwen's, Llama-3's) passes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    prompt, response = "Question: who is a knight?\nAnswer:", "\nThe final answer is Emma is a knight."

    def tokenizer(normalizer=None, pre_tokenizer=None):
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
        trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "</s>"])
        tok.train_from_iterator([prompt + response] * 20, trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    metaspace = tokenizer(pre_tokenizer=pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"))
    alone = metaspace.convert_ids_to_tokens(tasks.text_token_ids(metaspace, [response])[0])
    assert alone[0] == "▁"  # (the mark: after the prompt, generation's first token is the newline's)
    for marked, mark in ((metaspace, "▁"),
                         (tokenizer(normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])),
                          "▁"),
                         (tokenizer(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True)), "Ġ")):
        assert tasks.lone_text_marker(marked) == mark
        with pytest.raises(UserError, match=f"puts '{mark}' before every text it encodes alone"):
            tasks.sft_token_ids(marked, [prompt], [response])
    plain = tokenizer(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False))
    assert tasks.lone_text_marker(plain) is None
    (ids, start), = tasks.sft_token_ids(plain, [prompt], [response])
    assert plain.convert_ids_to_tokens(ids[start])[0] == "Ċ"  # (its first token: the newline's, unmarked)


def test_a_toy_split_with_a_number_for_its_answer_is_refused_naming_line_and_field(tmp_path):
    """The example task for forks: its score compares text, so an answer 7 (not "7") scored every right answer 0."""
    path = tmp_path / "toy.jsonl"
    rows = toy_task.make_records(2)
    rows[1]["answer"] = int(rows[1]["answer"])
    common.write_jsonl(str(path), rows)
    with pytest.raises(UserError, match=rf"toy.jsonl:2: field 'answer' must be of type str, got int "
                                        rf"\({rows[1]['answer']}\)"):
        toy_task.load_split(str(path))


def test_two_rollout_logs_of_one_step_are_refused_naming_both(tmp_path):
    """step_1.jsonl beside train_rl's step_000001.jsonl: the unpadded one, sorted last, was taken silently (by
    LIMR's curves, set B, and train_rl's removal of a stopped attempt's logs)."""
    folder = tmp_path / "rollouts"
    folder.mkdir()
    for name in ("step_000001.jsonl", "step_000002.jsonl", "step_10.jsonl", "notes.txt"):
        (folder / name).write_text("")
    assert tasks.rollout_logs(str(tmp_path)) == {1: str(folder / "step_000001.jsonl"),
                                                 2: str(folder / "step_000002.jsonl"), 10: str(folder / "step_10.jsonl")}
    (folder / "step_1.jsonl").write_text("")
    with pytest.raises(UserError, match=r"step_000001\.jsonl and .*step_1\.jsonl: two rollout logs of step 1"):
        tasks.rollout_logs(str(tmp_path))


@pytest.mark.parametrize("text,content", [
    ("a \\boxed{1} b \\boxed{\\frac{1}{2}} c", "\\frac{1}{2}"),  # the last box, nested braces counted
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),                         # escaped braces do not close it
    ("\\boxed{a \\\\} b", "a \\\\"),                               # nor does a LaTeX line break before the brace
    ("\\boxed{1} then \\boxed {2}", "2"),                          # a space before the brace: still the last box
    ("\\boxed{1} then \\fbox{2}", "2"),
    ("so $\\boxed 5$.", "5"),                                      # the bare form, to the closing $
    ("\\boxed Emma is a knight\nLiam ...", "Emma is a knight"),    # ... or to the line's end
    ("\\boxed{1} then \\boxedfoo{2}", "1"),                        # another command is no box
    ("\\boxed{1} then \\boxed{2", None),                           # the last box unclosed (truncated): no answer
    ("\\boxed{3 \\text{ or } \\boxed{4}}", "3 \\text{ or } \\boxed{4}"),  # a box in a box: the outer one's answer
    ("\\boxed{\\{ \\boxed{4}}", "\\{ \\boxed{4}"),                # (an escaped brace opens nothing)
    ("\\boxed{3 \\boxed{4}", None),                                # the outer one unclosed: no answer
    ("\\boxed{1} then \\boxed", None),                             # a bare last \boxed: no answer either
    ("\\boxed{}", ""),
    ("no box", None),
    (None, None),
])
def test_last_box_reads_the_last_box_for_every_task(text, content):
    """One reader of the answer box for K&K, MATH, the toy task and tiny_base's probe: before it, K&K read only a
    literal `\\boxed{`, so a wrong `\\boxed {...}` after a right box scored 1."""
    assert tasks.last_box(text) == content


def test_every_task_scores_the_box_that_last_box_reads():
    import kk_data
    names, right, wrong = ["Emma", "Liam"], "Emma is a knight, Liam is a knave", "Emma is a knave, Liam is a knave"
    kk = {"names": names, "solution": [True, False], "knight_knave": dict(kk_data.KNIGHT_KNAVE)}
    toy = {"answer": "7"}
    for box in ("\\boxed{%s}", "\\boxed {%s}", "\\fbox{%s}", "$\\boxed %s$"):
        assert kk_data.score(box % right, kk, True) == toy_task.score(box % "7", toy, True) == 1.0
        assert kk_data.score("\\boxed{%s} " % right + box % wrong, kk, True) == 0.0  # a later box, wrong: 0
        assert toy_task.score("\\boxed{7} " + box % "8", toy, True) == 0.0
        assert math_data.extract_boxed("\\boxed{1} " + box % "2") == "2"


def test_held_out_prompts_that_are_training_prompts_are_warned_of(capsys):
    """A test file passed as --train_data with a copy as --test_data (only the same path was refused), or SFT
    validation examples that are training ones: validation measured what was trained on, without a word."""
    tasks.warn_held_out_overlap(["a", "b", "c"], ["x", "y"], "--train_data T", "--test_data V")
    assert capsys.readouterr().out == ""
    tasks.warn_held_out_overlap(["a", "b", "c"], ["b", "c", "c", "z"], "--train_data T", "--test_data V")
    assert capsys.readouterr().out == ("warning: 2 of the 3 prompts of --test_data V are also training prompts "
                                       "(--train_data T): what it measures there was trained on\n")
