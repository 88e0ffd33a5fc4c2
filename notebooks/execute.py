"""Runs notebooks top to bottom in a fresh kernel and saves them with their outputs.

    python notebooks/execute.py                       # every notebook, outputs written back (what is committed)
    python notebooks/execute.py --out=/tmp/nb demo    # notebooks whose name contains 'demo', saved elsewhere

The notebooks run in name order in one new working folder (their runs/ go there), as a user working through them
would: the fine-tuning notebook starts from the run the demo notebook trained. The repository is importable (it is
installed), and jax uses whatever devices it finds (`JAX_PLATFORMS=cpu` for the committed CPU run). A cell that
raises stops with exit 1, naming the notebook and the cell. The test suite runs this on every notebook
(tests/test_notebooks.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent
CELL_TIMEOUT_S = 1800  # a hang guard for one cell (the demo pre-training takes minutes on a CPU), not a speed limit


def execute(path: Path, out: Path, workdir: Path) -> float:
    """Executes `path` with `workdir` as its working folder, writes the executed notebook to `out`; seconds taken."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    started = time.perf_counter()
    NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()  # fmt: skip
    nbformat.write(notebook, out)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="run only notebooks whose file name contains one of these")
    parser.add_argument("--out", default="", help="folder for the executed copies (default: overwrite in place)")
    args = parser.parse_args()
    from nbclient.exceptions import CellExecutionError

    paths = [p for p in sorted(NOTEBOOKS.glob("*.ipynb")) if not args.names or any(n in p.name for n in args.names)]
    if not paths:
        print(f"error: no notebook in {NOTEBOOKS} matches {args.names}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="notebooks-") as workdir:
        for path in paths:
            out = Path(args.out) / path.name if args.out else path
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                seconds = execute(path, out, Path(workdir))
            except CellExecutionError as error:
                print(f"error: {path.name}: a cell failed:\n{error}", file=sys.stderr)
                return 1
            print(f"{path.name}: executed in {seconds:.0f} s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
