"""The import rule of docs/architecture.md, read from the code: every module imports only from the floors below its
own, so there is no import circle, and no stage script imports another stage or a test."""
import ast
import glob
import os

import pytest

from conftest import ROOT

# each shared module and what it may import (the floors below it); docs/architecture.md draws the same
SHARED = {
    "common": set(),
    "model": {"common"},
    "tasks": {"common"},
    "parallel": {"common", "model"},
    "engine": {"common", "model", "parallel", "tasks"},
    "ckpt": {"common", "model", "parallel"},
    "scoring": {"common", "engine", "parallel", "tasks"},
    "grpo": {"common", "parallel"},
    "gpu_memory": {"common", "model"},
}
TASKS = {"kk_data", "math_data", "toy_task"}  # task modules (--task): they import the task floor only
BENCHMARKS = {"bench", "speed"}  # they time the stages by running them, so they may import stage scripts


def project_imports(path, modules):
    """The project modules a file imports, anywhere in it (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & modules


def import_graph(root):
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "*.py"))}
    return {m: project_imports(os.path.join(root, m + ".py"), modules - {m}) for m in sorted(modules)}


def rule_breaks(graph):
    """Every import that breaks the rule, and every import circle, as readable lines."""
    stages = set(graph) - set(SHARED) - TASKS - BENCHMARKS
    problems = []
    for module, imports in graph.items():
        if module in SHARED:
            allowed = SHARED[module]
        elif module in TASKS:
            allowed = {"common", "tasks"}
        elif module in BENCHMARKS:
            allowed = set(graph)
        else:  # a stage script: the shared floors and the task modules, never another stage
            allowed = set(SHARED) | TASKS
        problems += [f"{module}.py imports {name}" + (" (a stage script)" if name in stages else "")
                     for name in sorted(imports - allowed)]

    def visit(module, path):
        if module in path:
            cycle = path[path.index(module):] + [module]
            problems.append("import circle: " + " -> ".join(cycle))
            return
        for name in sorted(graph[module]):
            if name not in done:
                visit(name, path + [module])
        done.add(module)

    done = set()
    for module in graph:
        visit(module, [])
    return sorted(set(problems))


def test_every_module_imports_only_the_floors_below_it():
    graph = import_graph(ROOT)
    assert set(SHARED) <= set(graph) and TASKS <= set(graph), "a module named in the rule is gone"
    assert rule_breaks(graph) == []


def test_no_script_reaches_into_tests():
    """No module outside tests/ puts tests/ on sys.path: no script depends on a test fixture."""
    offenders = [f"{os.path.basename(p)}:{i}" for p in glob.glob(os.path.join(ROOT, "*.py"))
                 for i, line in enumerate(open(p, encoding="utf-8"), 1) if "sys.path" in line and "tests" in line]
    assert offenders == []


@pytest.mark.parametrize("files,expected", [
    ({"common": "import model\n", "model": "import common\n"}, "import circle: common -> model -> common"),
    ({"common": "", "model": "import common\n", "eval": "", "report": "from eval import x\n"},
     "report.py imports eval (a stage script)"),
    ({"common": "", "model": "def f():\n    import engine\n", "engine": ""}, "model.py imports engine"),
])
def test_the_check_catches_a_circle_a_stage_import_and_a_lazy_one(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    assert expected in rule_breaks(import_graph(str(tmp_path)))
