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
        # what follows is the answer sentence the probe parses, and it reads back as the solution
        answer = kk_data.parse_answer(doc[len(prompt):].rstrip("."), record["names"], kk_data.KNIGHT_KNAVE)
        assert answer == {n: bool(s) for n, s in zip(record["names"], record["solution"])}


def test_probe_needs_a_split(tiny_checkpoint):
    with pytest.raises(common.UserError, match="--probe_split"):
        tiny_base.main(["--probe", str(tiny_checkpoint)])
