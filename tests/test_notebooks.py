"""Every notebook runs top to bottom on CPU (`notebooks/execute.py`, the command that writes the committed outputs),
here with short jobs to fit CI; the committed copies carry the outputs of a full run of the demo configuration."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, subprocess_env

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# What each notebook's run must show: the jobs' own report lines and the pictures they wrote. CI runs the cells with
# SYNERGY_NOTEBOOK_STEPS (short jobs; one fold, no scratch baseline); the committed copies ran the full demo.
STEPS = 40
EXPECTED = {
    "colab_tpu_demo.ipynb": ["=== pre-training done: step", "=== zero-shot demo", "=== MMR missing=image"],
    "colab_tpu_encoders.ipynb": ["samples/s/device", "pooled output finite: True"],
    "colab_tpu_finetune.ipynb": ["| run/clean", "| zero_shot"],
}
EXPECTED_IN_FULL = {"colab_tpu_demo.ipynb": ["=== pre-training done: step 750", "=== MMR missing=image: 500 steps"],
                    "colab_tpu_finetune.ipynb": ["| scratch/clean"]}  # fmt: skip
IMAGES = {"colab_tpu_demo.ipynb": 3, "colab_tpu_encoders.ipynb": 0, "colab_tpu_finetune.ipynb": 2}


def _outputs(notebook: dict) -> tuple[str, int, list[str]]:
    """(all text output, the number of images shown, the error outputs) of a notebook's code cells."""
    text, images, errors = [], 0, []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            if output["output_type"] == "error":
                errors.append(f"{output['ename']}: {output['evalue']}")
            text.append("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", "")))
            images += "image/png" in output.get("data", {})
    return "\n".join(text), images, errors


def test_every_notebook_is_checked():
    assert sorted(EXPECTED) == [path.name for path in NOTEBOOKS]


def test_the_notebooks_run_top_to_bottom(tmp_path):
    env = {**subprocess_env(1), "SYNERGY_NOTEBOOK_STEPS": str(STEPS)}
    result = subprocess.run([sys.executable, str(ROOT / "notebooks" / "execute.py"), f"--out={tmp_path}"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=3000)  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    for path in NOTEBOOKS:
        text, images, errors = _outputs(json.loads((tmp_path / path.name).read_text()))
        assert errors == []
        assert all(line in text for line in EXPECTED[path.name]), text[-3000:]
        if path.name == "colab_tpu_demo.ipynb":
            assert f"=== pre-training done: step {STEPS}," in text  # the short run CI asked for
        assert images == IMAGES[path.name]
        assert "\r" not in text  # progress off a terminal comes as lines


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_carry_the_outputs_of_a_run(path):
    notebook = json.loads(path.read_text())
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    text, images, errors = _outputs(notebook)
    expected = EXPECTED[path.name] + EXPECTED_IN_FULL.get(path.name, [])
    assert errors == [] and all(line in text for line in expected) and images == IMAGES[path.name]
