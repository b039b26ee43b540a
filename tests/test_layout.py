"""The code's shape: packages by stage, small modules and functions, no import cycle, one home per table."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import derta

SRC = Path(derta.__file__).parent
MODULES = sorted(SRC.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = ("derta",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_modules_are_small():
    big = {module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > 500}
    assert not big, f"modules over 500 lines: {big}"


def test_functions_are_short():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 60:
                    long.append(f"{module_name(path)}.{node.name} ({node.end_lineno - start + 1} lines)")
    assert not long, f"functions over 60 lines: {long}"


def derta_imports(path: Path) -> set[str]:
    """The derta modules a module imports, at any depth (function-level imports too)."""
    known = {module_name(p) for p in MODULES}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("derta"):
            out |= {f"{node.module}.{a.name}" for a in node.names} & known or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & known
    return out & known


def test_no_import_cycle():
    graph = {module_name(p): derta_imports(p) - {module_name(p)} for p in MODULES}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_command_line_starts_without_torch():
    """`derta --help`, a typo's error, and reading finished runs need no torch or transformers."""
    code = "import sys, derta.cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def top_level_names() -> dict[str, list[str]]:
    where = defaultdict(list)
    for path in MODULES:
        for node in ast.parse(path.read_text()).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            for name in names:
                where[name].append(module_name(path))
    return where


def test_each_table_and_decision_has_one_home():
    where = top_level_names()
    homes = {
        "PROMPT_FIELDS": "derta.data.sources",
        "prompt_of": "derta.data.sources",
        "REFUSAL_PHRASE": "derta.models.refusal_tokens",
        "RECIPES": "derta.data.recipes",
        "verb_phrase": "derta.data.rephrase",  # the attacks and the training rephrasings read a request one way
        "REPHRASINGS": "derta.data.rephrase",
        "NEAR_DUPLICATE_JACCARD": "derta.data.exclude",
        "__version__": "derta",
        "NUMERIC_RULES": "derta.io",
        "is_refusal": "derta.eval.refusal",
        "refuses": "derta.eval.refusal",
        "refusal_loop": "derta.eval.refusal",
        "OVERREFUSAL_CLASSES": "derta.eval.refusal",
        "RUBRICS": "derta.eval.rubrics",
        "ATTACKS": "derta.eval.attacks",
        "JUDGES": "derta.eval.judges",
        "BACKENDS": "derta.inference.backends",
        "RunDir": "derta.eval.runner",
        "run_task": "derta.eval.runner",
    }
    assert {name: where[name] for name in homes} == {name: [home] for name, home in homes.items()}
    # The decisions the demo and over-refusal once made apart are gone.
    assert not {"clean_refusal", "counts_as_refusal", "load_prompts_file"} & set(where)


def test_version_comes_from_the_package():
    out = subprocess.run(
        [sys.executable, "-m", "derta", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"derta {derta.__version__}"


def test_ruff_is_clean():
    """Lint and format (pyproject's [tool.ruff]) hold on the whole tree: CI runs them through this test."""
    root = Path(__file__).resolve().parent.parent
    for args in (["check", "--no-cache"], ["format", "--check", "--no-cache"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *args, "src", "tests"], cwd=root, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
