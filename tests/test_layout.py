"""The layout's promises: one import name, imports that only run downwards with no circle, one family registry."""
import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package folder -> installed name, lowest layer first
LAYERS = {"ascend": "moevl.ascend", "kernels": "moevl.kernels", "model": "moevl.model", "export": "moevl.export",
          "benchmarks": "moevl.benchmarks", "train": "moevl.train", "serve": "moevl.serve",
          "moevl": "moevl"}
# what each layer must never import (upward imports)
FORBIDDEN = {
    "moevl.ascend": ("moevl.kernels", "moevl.model", "moevl.export", "moevl.benchmarks", "moevl.train", "moevl.serve",
                     "moevl.cli"),
    "moevl.kernels": ("moevl.model", "moevl.export", "moevl.benchmarks", "moevl.train", "moevl.serve", "moevl.cli"),
    "moevl.model": ("moevl.export", "moevl.benchmarks", "moevl.train", "moevl.serve", "moevl.cli"),
    "moevl.export": ("moevl.benchmarks", "moevl.train", "moevl.serve", "moevl.cli"),
    "moevl.train": ("moevl.benchmarks", "moevl.serve", "moevl.cli"),
    "moevl.serve": ("moevl.benchmarks", "moevl.train", "moevl.cli"),
}
GENERIC = ("ascend", "model", "kernels", "export", "benchmarks", "train", "serve")


def modules():
    """(dotted module name, path) of every module of the kit."""
    for folder, pkg in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield ".".join([pkg] + parts), path


def imports(path: Path, module_level_only: bool = False, known=()):
    """The modules a file imports. ``from a import b`` counts as a.b when that is a module in ``known``, else as a
    (a package importing its own submodule by name is no circle)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            yield from (s for s in subs if s in known)
            if not known or any(s not in known for s in subs):
                yield node.module


def test_the_installed_distribution_has_one_top_level_name():
    dist = importlib.metadata.distribution("moevl-ascend")
    assert dist.read_text("top_level.txt").split() == ["moevl"]
    assert dist.entry_points.select(group="console_scripts")["moevl"].value == "moevl.cli:main"


def test_generic_names_are_not_importable_outside_the_checkout(tmp_path):
    """Outside the checkout no generic name resolves to the kit's folders (another distribution may own the name:
    PyPI's ``kernels``, a transformers dependency, is no part of the kit)."""
    code = ("import importlib.util as u, moevl.model.awaker.network, moevl.export.session\n"
            "from pathlib import Path\n"
            "ours = {n: Path(u.find_spec('moevl.' + n).origin).resolve() for n in " + repr(GENERIC) + "}\n"
            "print([n for n in ours if u.find_spec(n) is not None and u.find_spec(n).origin is not None\n"
            "       and Path(u.find_spec(n).origin).resolve() == ours[n]])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name,path", list(modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_imports_use_the_one_name_and_only_run_downwards(name, path):
    found = set(imports(path))
    generic = sorted(m for m in found if m.split(".")[0] in GENERIC)
    assert not generic, f"{name} imports {generic}: use moevl.<package>"
    for layer, banned in FORBIDDEN.items():
        if name == layer or name.startswith(layer + "."):
            upward = sorted(m for m in found if m.startswith(banned))
            assert not upward, f"{name} imports {upward} from a higher layer"


def test_no_import_circle_at_module_level():
    graph = {}
    names = dict(modules())
    for name, path in names.items():
        graph[name] = {m for m in imports(path, module_level_only=True, known=names) if m in names and m != name}
    state = {}

    def visit(n, stack):
        state[n] = "open"
        for m in graph[n]:
            if state.get(m) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = "done"

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_family_names_are_only_compared_in_their_own_packages():
    from moevl.model.family import families

    names = set(families())
    own = [ROOT / "model" / "awaker", ROOT / "model" / "moe_llava", ROOT / "export" / "builders"]
    offenders = []
    for name, path in modules():
        if any(path.is_relative_to(p) for p in own):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for c in ast.walk(node):
                if isinstance(c, ast.Constant) and (c.value in names or (isinstance(c.value, tuple) and
                                                                         names & set(c.value))):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {c.value!r}")
    assert not offenders, "a family name looked up outside the registry: " + ", ".join(offenders)
