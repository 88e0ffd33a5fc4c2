"""The Colab notebooks cannot run here (no TPU, no hub), so check what can drift: every code cell compiles once
Colab's shell/magic lines are removed, and every job attribute and config field the demo notebook uses exists."""

import ast
import json

import pytest
from helpers import ROOT

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
    """The notebook imports the jobs as modules; every `<module>.<name>` it uses exists, and every `config.<field>`
    it sets exists in the config its cell made."""
    monkeypatch.chdir(ROOT)  # the notebook runs from the repository root
    cells = code_cells(ROOT / "notebooks" / "colab_tpu_demo.ipynb")
    namespace = {}
    exec(compile(cells[1], "imports", "exec"), namespace)  # the jobs and their configs, as modules
    modules = {name: namespace[name] for name in ("pretrain", "pretrain_configs", "zero_shot", "zero_shot_configs",
                                                  "mmr", "mmr_configs")}  # fmt: skip
    used = fields = 0
    for source in cells[2:]:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                assert hasattr(modules[node.value.id], node.attr), f"{node.value.id}.{node.attr}"
                used += 1
        made = [n for n in tree.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "config"]
        if not made:
            continue
        config = eval(compile(ast.Expression(made[0].value), "config", "eval"), namespace)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "config" and isinstance(node.ctx, ast.Store):
                assert node.attr in config, f"config.{node.attr}"
                fields += 1
    assert used >= 8 and fields >= 6
