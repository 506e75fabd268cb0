"""A toy task with the task-module interface (`--task toy_task`): add two small numbers, answer in \\boxed{}.

Learnable by a tiny model in seconds, so the tests of SFT, RL, sampling and evaluation and `bench.py --rl true`
exercise real code.
"""
import random
import re

import common
import tasks

DIFFICULTY = "level"  # number of digits of the larger operand


def make_records(n, seed=0, split="train", max_value=9):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        records.append({"id": f"toy-{split}-{i:05d}", "level": len(str(max(a, b))),
                        "question": f"What is {a} + {b}?", "answer": str(a + b)})
    return records


def teacher_response(record):
    a, b = re.findall(r"\d+", record["question"])
    return f"{a} plus {b} is {record['answer']}. \\boxed{{{record['answer']}}}"


def load_split(path):
    # (an answer 7 where "7" is meant would score every right response 0: score compares text)
    return common.read_jsonl(path, required=("id", "level", "question", "answer"),
                             types={"question": str, "answer": str})


def render_prompt(record, tokenizer, template="auto"):
    return tasks.render_question(record["question"], tokenizer, template)


def score(response, record, finished):
    if not finished:
        return 0.0
    answer = tasks.last_box(response)
    return 1.0 if answer is not None and answer.strip() == record["answer"] else 0.0
