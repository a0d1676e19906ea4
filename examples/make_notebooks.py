"""Build the example notebooks from the example scripts, so the two never drift apart.

Each script's docstring becomes the notebook's first (markdown) cell and every ``# %%`` section a code cell; the
``if __name__ == "__main__":`` guard runs as-is in a kernel, whose ``__name__`` is ``"__main__"``.

Run: ``python examples/make_notebooks.py`` (tests/integration/test_examples.py checks the notebooks are current).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
SCRIPTS = ("langchain_chain.py", "llama_index_query.py")


def notebook_for(script: Path) -> nbformat.NotebookNode:
    """The notebook of ``script``: its docstring as markdown, then one code cell per ``# %%`` section."""
    source = script.read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(source)) or script.stem
    sections = source.split("# %%")[1:]
    cells = [nbformat.v4.new_markdown_cell(docstring.replace("``", "`"))]
    cells += [nbformat.v4.new_code_cell(section.strip("\n")) for section in sections if section.strip()]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"{script.stem.replace('_', '-')}-{i}"
    return notebook


def render(script: Path) -> str:
    """The notebook of ``script`` as the text written to disk."""
    return nbformat.writes(notebook_for(script)) + "\n"


def main() -> int:
    for name in SCRIPTS:
        script = HERE / name
        target = script.with_suffix(".ipynb")
        target.write_text(render(script), encoding="utf-8")
        print(f"wrote {target.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
