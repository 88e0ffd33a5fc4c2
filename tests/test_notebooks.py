"""The Colab notebooks cannot run here (no TPU, no hub), so check what can drift: every code cell compiles once
Colab's shell/magic lines are removed, and every job attribute and `Options` field the demo notebook uses exists."""

import ast
import dataclasses
import json
import sys

import pytest
from scripts import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _python(line: str) -> str:
    """A Colab shell (!) or magic (%) line becomes `pass` at the same indentation."""
    stripped = line.lstrip()
    return line[: len(line) - len(stripped)] + "pass\n" if stripped.startswith(("!", "%")) else line


def code_cells(path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(map(_python, cell["source"])) for cell in cells if cell["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_code_cells_compile(path):
    cells = code_cells(path)
    assert cells
    for i, source in enumerate(cells):
        compile(source, f"{path.name}[{i}]", "exec")


def test_demo_notebook_uses_existing_job_api(monkeypatch):
    monkeypatch.chdir(ROOT)  # the notebook runs from the repository root
    for name in ("pretrain_job", "pretrain_configs", "zero_shot_job", "mmr_job", "mmr_configs"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))  # the loader registers these; restored after
    cells = code_cells(ROOT / "notebooks" / "colab_tpu_demo.ipynb")
    namespace = {}
    exec(compile(cells[1], "loader", "exec"), namespace)  # loads the jobs and configs as modules
    modules = {name: namespace[name] for name in ("pretrain", "pretrain_configs", "zero_shot", "mmr", "mmr_configs")}
    used = 0
    for source in cells[2:]:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert hasattr(modules[node.value.id], node.attr), f"{node.value.id}.{node.attr}"
                used += 1
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "zero_shot.Options":
                fields = {field.name for field in dataclasses.fields(modules["zero_shot"].Options)}
                assert {keyword.arg for keyword in node.keywords} <= fields
    assert used >= 8
