"""The package's layers: each module imports only from its own layer or those below it.

    errors, config -> data -> ops, runtime, distributed, ... -> model -> checkpoint
      -> (train, eval, circuits, sae, interop, generate) -> report -> reproduce -> cli

and, within the (train, eval, ...) layer, eval, circuits and sae never import train. A new import
that breaks a rule fails here with the importing file and what it imported.
"""

import ast
from pathlib import Path

import pytest

import selfablate

ROOT = Path(selfablate.__file__).parent

LAYERS = [
    {"errors", "config", "files"},
    {"data"},
    {"ops", "runtime", "distributed", "metrics_log", "perf", "runlock"},
    {"model"},
    {"checkpoint"},
    {"train", "step", "eval", "circuits", "sae", "interop", "generate", "explain"},
    {"report"},
    {"reproduce"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}
FORBIDDEN = {("eval", "train"), ("circuits", "train"), ("sae", "train"), ("explain", "train"), ("report", "train"),
             ("model", "data")}
"""(importer, imported) pairs that the ranks alone would allow."""


def top(module: str) -> str:
    """selfablate.x.y -> x."""
    return module.split(".")[1] if module.count(".") else "__init__"


def imports(path: Path) -> list[str]:
    """Every selfablate module a file imports (absolute names), at any depth in the file."""
    package = "selfablate." + ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    package = package.rstrip(".")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] if node.module or not node.level else [f"{module}.{a.name}" for a in node.names]
            found += [n for n in names if n.startswith("selfablate.") or n == "selfablate"]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("selfablate")]
    return found


def violations(path: Path) -> list[str]:
    me = top("selfablate." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
    bad = []
    for module in imports(path):
        them = top(module) if module != "selfablate" else "__init__"
        if them == me:
            continue
        if RANK[them] > RANK[me] or (me, them) in FORBIDDEN:
            bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


FILES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_package_module_has_a_layer():
    assert {top("selfablate." + ".".join(p.relative_to(ROOT).with_suffix("").parts)) for p in FILES} <= set(RANK)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_respect_the_layers(path):
    assert violations(path) == []


def test_the_check_catches_a_forbidden_import(tmp_path, monkeypatch):
    """The check itself can fail: a model module importing data, an eval module importing train."""
    for name, source in (("model/bad.py", "from ..data.tokenizer import EOT\n"),
                         ("eval/bad.py", "from ..train import train\n"),
                         ("ops/bad.py", "from ..model import SelfAblatingTransformer\n")):
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(source)
        monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
        assert violations(f) == [f"{name} imports selfablate." + ast.parse(source).body[0].module]
