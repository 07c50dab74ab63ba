"""The installed package: one import name (``fieldid``), its data files, a working ``fieldid --version``,
and no import cycle among its modules.

The wheel is built offline from a copy of the source (``pip wheel --no-build-isolation``: the
build backend already in the venv, nothing downloaded) and installed with ``pip --target``
into a temporary folder, so the checks see exactly what ``pip install fieldid`` would put in
site-packages -- not the editable install this suite otherwise runs against.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import fieldid

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# import name -> source folder, as pyproject maps them (fieldid.training -> training/, ...)
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
_SKIP = shutil.ignore_patterns(".venv", "build", "*.egg-info", "__pycache__", ".git", "runs", "data", "logs",
                               "tests", "node_modules", "*.pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fieldid-*.whl`` built from a copy of the tree (the build must not write into the repo)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A warning from the build backend (e.g. "package would be ignored") means a mapping is wrong.
    assert "would be ignored" not in proc.stderr, proc.stderr[-3000:]
    (whl,) = out.glob("fieldid-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel installed with ``pip install --target`` (console script under ``bin/``)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                           "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def _installed_env(target: Path) -> dict[str, str]:
    # PYTHONPATH puts the installed copy ahead of the editable install's finder (a meta-path hook
    # appended after the normal path search), and a neutral cwd keeps the repo off sys.path.
    return {**os.environ, "PYTHONPATH": str(target)}


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert tops - dist_info == {"fieldid"}, sorted(tops)
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith(f"fieldid-{fieldid.__version__}.")
    top_level = zipfile.ZipFile(wheel).read(f"{next(iter(dist_info))}/top_level.txt").decode().split()
    assert top_level == ["fieldid"]


def test_wheel_holds_every_source_file_and_the_package_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every module of every mapped folder (a new sub-folder missing from `packages` would be lost).
    expected = set()
    for pkg, folder in PACKAGE_DIRS.items():
        for f in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in f.parts:
                expected.add("/".join([*pkg.split("."), *f.relative_to(ROOT / folder).parts]))
    assert expected - names == set()
    assert {"fieldid/training/__init__.py", "fieldid/export/phone.py", "fieldid/serve/client.py",
            "fieldid/edge_demo/app.py", "fieldid/cli.py", "fieldid/api.py"} <= names
    # Package data the code opens at run time: the TorchServe handler packed into every .mar and
    # the shipped per-dataset training configs.
    assert "fieldid/serve/fieldid_handler.py" in names
    configs = {f"fieldid/training/configs/{p.name}" for p in (ROOT / "training" / "configs").glob("*.yaml")}
    assert configs and configs <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fieldid = fieldid.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs(installed: Path, tmp_path: Path) -> None:
    env = _installed_env(installed)
    script = installed / "bin" / "fieldid"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fieldid {fieldid.__version__}"
    # The installed copy (not the repo) answers, with its data files next to the code.
    code = ("import fieldid, fieldid.serve, fieldid.training, fieldid.export.manifest, fieldid.edge_demo, pathlib;"
            "print(fieldid.__file__);"
            "print((pathlib.Path(fieldid.serve.__file__).parent / 'fieldid_handler.py').is_file());"
            "print(len(list((pathlib.Path(fieldid.training.__file__).parent / 'configs').glob('*.yaml'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    where, handler, n_configs = proc.stdout.split()
    assert Path(where).is_relative_to(installed)
    assert handler == "True" and int(n_configs) == len(list((ROOT / "training" / "configs").glob("*.yaml")))
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0 and "predict" in proc.stdout and "train" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- import graph
def _modules() -> dict[str, Path]:
    """Every fieldid module name -> its source file, through pyproject's package-dir mapping."""
    mods = {}
    for pkg, folder in PACKAGE_DIRS.items():
        for f in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in f.parts:
                continue
            rel = f.relative_to(ROOT / folder).with_suffix("").parts
            mods[".".join([*pkg.split("."), *(rel[:-1] if rel[-1] == "__init__" else rel)])] = f
    return mods


def _imports(name: str, mods: dict[str, Path]) -> set[str]:
    """fieldid modules that ``name`` imports anywhere in its file -- at module level *and* inside
    functions (a function-level import only hides a cycle) -- except under ``if TYPE_CHECKING``.
    An import of a module's own parent package is implied by Python itself and not counted."""
    tree = ast.parse(mods[name].read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    package = name if mods[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            src = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            found |= {f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names}
    out = set()
    for target in found:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != name and not name.startswith(target + "."):
            out.add(target)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while comp[-1:] != [v]:
                comp.append(stack.pop())
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_fieldid_modules() -> None:
    mods = _modules()
    graph = {m: _imports(m, mods) for m in mods}
    assert len(mods) > 40 and "fieldid.training.cli" in mods and "fieldid.api" in mods
    assert "fieldid.training.tune" not in graph["fieldid.training.cli"] or \
        "fieldid.training.cli" not in graph["fieldid.training.tune"]
    assert _cycles(graph) == []
    # The check sees cycles: config imports records, so a planted edge back is found.
    assert "fieldid.training.records" in graph["fieldid.training.config"]
    planted = {**graph, "fieldid.training.records": graph["fieldid.training.records"] | {"fieldid.training.config"}}
    assert ["fieldid.training.config", "fieldid.training.records"] in _cycles(planted)


def test_no_private_name_imported_from_another_package() -> None:
    """``from fieldid.X.y import _z`` across packages couples them to an implementation detail."""
    mods = _modules()
    bad = []
    for name, path in mods.items():
        own = name.split(".")[:2]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("fieldid."):
                if node.module.split(".")[:2] != own:
                    bad += [f"{name}: {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []
