"""tiny_base.py: the probe asks exactly what the answer-format pre-training documents taught."""
import pytest

import common
import kk_data
import tiny_base


def test_probe_prompt_is_the_answer_documents_prefix():
    for record in kk_data.generate(7, 3, 5, fixed_names=True, log=lambda *a: None):
        doc = tiny_base.document(record, with_trace=False)
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
        doc = tiny_base.document(record, with_trace=True)
        question, trace = doc.split("\nAnswer:\nLet's think step by step.\n")
        assert question == "Question:\n" + record["question"]
        assert trace == kk_data.teacher_response(record) and trace.endswith(kk_data.answer_text(record) + "}.")


def test_probe_needs_a_split(tiny_checkpoint):
    with pytest.raises(common.UserError, match="--probe_split"):
        tiny_base.main(["--probe", str(tiny_checkpoint)])
