"""retrieval imports indexer, never the reverse."""

import ast
import subprocess
import sys
from pathlib import Path

INDEXER = Path(__file__).resolve().parent.parent / "indexer"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_indexer_module_imports_retrieval():
    offenders = {p.name: sorted(m for m in imported_modules(p) if m.split(".")[0] == "retrieval")
                 for p in INDEXER.rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_indexer_loads_no_retrieval_module():
    code = "import sys, indexer, indexer.pipeline; print([m for m in sys.modules if m.split('.')[0] == 'retrieval'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
