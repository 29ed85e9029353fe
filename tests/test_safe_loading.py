"""No unrestricted unpickling anywhere in the project's code.

Ground-truth pickles go through the restricted unpickler in lib/groundtruth/revisited.py;
torch checkpoints load with ``weights_only=True``; ``.npy`` files without pickles.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_DIRS = ("lib", "datasets", "bow_pipeline", "benchmarks")


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f.attr if isinstance(f, ast.Attribute) else
                    f.id if isinstance(f, ast.Name) else "")
            base = (f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    else "")
            yield node, base, name


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value
    return None


def test_no_unrestricted_unpickling():
    problems = []
    files = [p for d in CODE_DIRS for p in (REPO / d).rglob("*.py")]
    assert files
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(REPO)
        for node, base, name in _calls(tree):
            where = f"{rel}:{node.lineno}"
            if base in ("pickle", "cPickle", "joblib", "dill") and name in ("load", "loads"):
                problems.append(f"{where}: {base}.{name} (use the restricted unpickler)")
            if base == "torch" and name == "load":
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name == "load" and base in ("np", "numpy"):
                ap = _kw(node, "allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{where}: np.load(allow_pickle=True)")
    assert not problems, "\n".join(problems)
