"""The examples are tests: each script runs as a subprocess and each notebook in a real kernel (nbclient), on the
real pipeline, and must print its decisions with the repeated question offloaded to the small model with examples.

Models: the examples use the bundled defaults; here ``ECHO_LARGE__MODEL`` / ``ECHO_SMALL__MODEL`` point both at
``$ECHO_EXAMPLE_MODEL`` (default SmolLM2-135M) on ``$ECHO_EXAMPLE_BACKEND`` (default transformers) for speed, and
``ECHO_STORE_PATH`` at a fresh folder, so every run starts from an empty store.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("langchain_chain.py", "llama_index_query.py")
ASKED_AGAIN = {
    "langchain_chain.py": "How do I reverse a list in Python?",
    "llama_index_query.py": "How often is the production database backed up?",
}
RUN_TIMEOUT_S = 1500


@pytest.fixture
def example_env(tmp_path: Path, tiny_model_dir: Path, embedder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ECHO_* variables for a fast, isolated run (also set in this process: kernels inherit them)."""
    model = os.environ.get("ECHO_EXAMPLE_MODEL", "smollm2-135m-instruct")
    backend = os.environ.get("ECHO_EXAMPLE_BACKEND", "transformers")
    for role in ("LARGE", "SMALL"):
        monkeypatch.setenv(f"ECHO_{role}__MODEL", model)
        monkeypatch.setenv(f"ECHO_{role}__BACKEND", backend)
    monkeypatch.setenv("ECHO_STORE_PATH", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    return tmp_path


def _blocks(output: str) -> dict[str, list[str]]:
    """Question -> the decision blocks printed for it (a question asked twice has two)."""
    found: dict[str, list[str]] = {}
    for block in re.split(r"^Q: ", output, flags=re.MULTILINE)[1:]:
        question, _, rest = block.partition("\n")
        found.setdefault(question.strip(), []).append(rest)
    return found


def _check_output(script: str, output: str) -> None:
    blocks = _blocks(output)
    assert len(blocks) >= 3, f"expected one printed decision per question, got:\n{output}"
    for question, runs in blocks.items():
        for run in runs:
            assert "-> " in run, f"no route printed for {question!r}:\n{output}"
            assert "why: " in run, f"no reason printed for {question!r}:\n{output}"
            assert re.search(r"A: \S", run), f"empty answer for {question!r}:\n{output}"
    first, again = blocks[ASKED_AGAIN[script]]
    assert "large model" in first, f"a new question should go to the large model:\n{output}"
    assert "OFFLOADED to the small model with examples" in again, f"the repeated question was not offloaded:\n{output}"
    assert re.search(r"distance \d\.\d\d", again), f"no example with its distance in:\n{again}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_and_offloads_the_repeat(script: str, example_env: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    logger.info("%s printed:\n%s", script, done.stdout)  # the decisions, shown with --log-level=INFO -rA
    _check_output(script, done.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_notebook_is_current(script: str) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        from make_notebooks import render
    finally:
        sys.path.remove(str(EXAMPLES))
    notebook = EXAMPLES / script.replace(".py", ".ipynb")
    assert notebook.read_text(encoding="utf-8") == render(EXAMPLES / script), (
        f"{notebook.name} is out of date: run `python examples/make_notebooks.py`"
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_notebook_runs_and_offloads_the_repeat(script: str, example_env: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLES / script.replace(".py", ".ipynb"), as_version=4)
    client = NotebookClient(
        notebook, timeout=RUN_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()
    output = "".join(
        out.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    )
    logger.info("%s as a notebook printed:\n%s", script, output)
    _check_output(script, output)
