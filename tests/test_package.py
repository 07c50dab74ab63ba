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
import re
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


_IMPORT_CALLS = {"importlib.import_module", "import_module", "__import__", "importlib.__import__"}
# A string that is a whole module path (``"fieldid.api"``), or an entry-point style target (``"fieldid.api:export"``).
_MODULE_STRING = re.compile(r"fieldid(\.\w+)+(:[\w.]+)?")


def _string_values(tree: ast.Module) -> dict[str, list[str]]:
    """Names bound to string constants or collections of them, anywhere in the file: a module-level
    ``_WHERE = {"Run": "api"}``, a tuple of module names, and loop variables over such collections
    (``for mod in _EXPORTER_MODULES``). Scopes are merged: a superset of targets can only add edges."""
    def strings(node: ast.AST) -> list[str] | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            elts = [strings(e) for e in node.elts]
            return None if any(e is None for e in elts) else [v for e in elts for v in e]
        if isinstance(node, ast.Dict):
            vals = [strings(v) for v in node.values]
            return None if any(v is None for v in vals) else [x for v in vals for x in v]
        return None

    env: dict[str, list[str]] = {}
    for _ in range(2):  # loop variables over names bound later in the file
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                vals = strings(node.value)
                for t in targets:
                    if isinstance(t, ast.Name) and vals is not None:
                        env[t.id] = vals
            elif isinstance(node, ast.For) and isinstance(node.target, ast.Name):
                it = node.iter
                vals = env.get(it.id) if isinstance(it, ast.Name) else strings(it)
                if vals is not None:
                    env[node.target.id] = vals
    return env


def _candidates(node: ast.AST, env: dict[str, list[str]]) -> list[str] | str | None:
    """What a string expression can be: a list of strings, a regex (an f-string with unknown parts), or None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):  # _WHERE[name]: any of its values
        return env.get(node.value.id)
    if isinstance(node, ast.JoinedStr):
        options = [""]
        for part in node.values:
            if isinstance(part, ast.Constant):
                options = [o + str(part.value) for o in options]
                continue
            vals = _candidates(part.value, env) if isinstance(part, ast.FormattedValue) else None
            if not isinstance(vals, list):
                regex = "".join(re.escape(str(p.value)) if isinstance(p, ast.Constant) else r"\w+" for p in node.values)
                return regex
            options = [o + v for o in options for v in vals]
        return options
    return None


def _string_imports(tree: ast.Module, name: str, package: str, mods: dict[str, Path]) -> set[str]:
    """fieldid modules a file imports by *string*: ``importlib.import_module(...)`` / ``__import__(...)``
    with constant, f-string or table-driven arguments (relative ones resolved against ``package`` /
    ``__name__`` as Python does), and module paths or ``"module:attr"`` entry-point targets written as
    strings (registries, ``forward_calls_to(__name__, "fieldid.api:export")``)."""
    from importlib.util import resolve_name

    env = {**_string_values(tree), "__name__": [name], "__package__": [package]}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.fullmatch(node.value):
            found.add(node.value.split(":")[0])
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) in _IMPORT_CALLS and node.args):
            continue
        cands = _candidates(node.args[0], env)
        # import_module(name, package) / __import__(name, globals, locals, fromlist, level)
        is_dunder = ast.unparse(node.func).endswith("__import__")
        anchor_arg = None if is_dunder else (node.args[1] if len(node.args) > 1 else
                                             next((k.value for k in node.keywords if k.arg == "package"), None))
        level = 0
        if is_dunder:
            lv = node.args[4] if len(node.args) > 4 else next((k.value for k in node.keywords if k.arg == "level"), None)
            level = lv.value if isinstance(lv, ast.Constant) and isinstance(lv.value, int) else 0
        anchor = {"__name__": name, "__package__": package}.get(ast.unparse(anchor_arg)) if anchor_arg is not None \
            else (package if level else None)
        if isinstance(anchor_arg, ast.Constant) and isinstance(anchor_arg.value, str):
            anchor = anchor_arg.value
        if isinstance(cands, str):  # an f-string with parts we cannot list: every module it can name
            found |= {m for m in mods if re.fullmatch(cands, m)}
            continue
        for c in cands or []:
            target = "." * level + c if is_dunder else c
            if target.startswith("."):
                if anchor is None:
                    continue
                try:
                    target = resolve_name(target, anchor)
                except ImportError:  # beyond the top-level package: Python would refuse it too
                    continue
            found.add(target)
    return found


def _imports(name: str, mods: dict[str, Path]) -> set[str]:
    """fieldid modules that ``name`` imports anywhere in its file -- at module level *and* inside
    functions (a function-level import only hides a cycle), by statement or by string
    (:func:`_string_imports`) -- except under ``if TYPE_CHECKING``.
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
    found |= _string_imports(tree, name, package, mods)
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


# No exemption: the subpackages are plain packages (the API's names do not collide with them), so no
# stage package imports the API layer by name any more.
_FACADE_EDGES: set[tuple[str, str]] = set()


def test_no_import_cycle_among_fieldid_modules() -> None:
    mods = _modules()
    graph = {m: _imports(m, mods) for m in mods}
    assert len(mods) > 40 and "fieldid.commands.training" in mods and "fieldid.api" in mods
    # String imports are seen: the CLI loads each stage's commands with import_module(f"fieldid.commands.{stage}"),
    # fieldid.training resolves its lazy names with import_module(f".{_WHERE[name]}", __name__).
    assert {"fieldid.commands.training", "fieldid.commands.export", "fieldid.commands.serve"} <= graph["fieldid.cli"]
    assert {"fieldid.training.config", "fieldid.training.ood"} <= graph["fieldid.training"]
    assert {"fieldid.export.onnx_export", "fieldid.export.manifest"} <= graph["fieldid.export"]
    assert "fieldid.api" not in graph["fieldid.export"] | graph["fieldid.serve"]
    checked = {m: targets - {b for a, b in _FACADE_EDGES if a == m} for m, targets in graph.items()}
    assert _cycles(checked) == []
    # The check sees cycles: config imports records, so a planted edge back is found.
    assert "fieldid.training.records" in graph["fieldid.training.config"]
    planted = {**graph, "fieldid.training.records": graph["fieldid.training.records"] | {"fieldid.training.config"}}
    assert ["fieldid.training.config", "fieldid.training.records"] in _cycles(planted)


PLANTED_STRING_CYCLE = {
    "fieldid/planted/__init__.py": "",
    # a -> b: a relative import_module anchored on __package__ (the lazy-name pattern of our packages)
    "fieldid/planted/a.py": "import importlib\n\ndef load():\n    return importlib.import_module('.b', __package__)\n",
    # b -> c: through a table of names and an f-string
    "fieldid/planted/b.py": ("import importlib\n_WHERE = {'thing': 'c'}\n\ndef get(name):\n"
                             "    return importlib.import_module(f'fieldid.planted.{_WHERE[name]}')\n"),
    # c -> d: __import__ with a constant
    "fieldid/planted/c.py": "def f():\n    return __import__('fieldid.planted.d')\n",
    # d -> a: an entry-point style target in a registry
    "fieldid/planted/d.py": "PLUGINS = {'x': 'fieldid.planted.a:load'}\n",
    # e: strings that are not import targets (prose, another project's module) add no edge
    "fieldid/planted/e.py": '"""See fieldid.planted.a for how."""\nOTHER = "numpy.linalg"\n',
}


# The stages, in data-flow order, and the face above them: the API, the CLI and its commands, the
# cross-stage benchmark front and the docs generator. A stage is a library: it imports only stages and
# the shared modules below them (fieldid.records, fieldid.intake, fieldid.cli_common, ...), never the face.
STAGES = ("fieldid.training", "fieldid.export", "fieldid.serve", "fieldid.edge_demo", "fieldid.app")
FACE = ("fieldid.api", "fieldid.cli", "fieldid.commands", "fieldid.bench_cli", "fieldid.docs_gen", "fieldid.__main__")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_stage_packages_import_nothing_above_them() -> None:
    mods = _modules()
    graph = {m: _imports(m, mods) for m in mods}
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if _under(m, STAGES)
                 for t in targets if _under(t, FACE))
    assert bad == []
    # Every stage's commands live in fieldid.commands and reach the stages through the API or directly.
    assert {f"fieldid.commands.{s.split('.')[1]}" for s in STAGES} <= set(mods)
    assert "fieldid.api" in graph["fieldid.commands.training"] | graph["fieldid.commands.export"]
    # The rule bites: the old `fieldid train` command inside the training package called the API.
    planted = {**graph, "fieldid.training.config": graph["fieldid.training.config"] | {"fieldid.api"}}
    assert any(_under(t, FACE) for m, ts in planted.items() if _under(m, STAGES) for t in ts)


def test_command_line_parsers_live_with_the_commands() -> None:
    """No stage module builds a command line, the benchmarks included: the commands and their flags are
    fieldid.commands' (and `fieldid bench`'s, fieldid.bench_cli)."""
    mods = _modules()
    parsers = set()
    for name, path in mods.items():
        if _under(name, STAGES):
            tree = ast.parse(path.read_text())
            if any(isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names) for n in ast.walk(tree)):
                parsers.add(name)
    assert parsers == set(), sorted(parsers)
    assert {"fieldid.commands.training", "fieldid.commands.train_args", "fieldid.commands.data_check"} <= set(mods)


def test_benchmark_code_is_named_so() -> None:
    """Code only the benchmarks use (their data sets, the reference fine-tune, the cascade and unknown-photo
    benchmarks) is in modules named ``bench*``, run by ``fieldid bench <what>``: a reader tells it from
    the product at a glance. ``fieldid.machine`` (the machine line of every measured page) is the product's
    too: every command sets the allocator with it."""
    mods = _modules()
    graph = {m: _imports(m, mods) for m in mods}
    users: dict[str, set[str]] = {m: set() for m in mods}
    for m, targets in graph.items():
        for t in targets:
            users[t].add(m)

    def bench(m: str) -> bool:
        return m.rpartition(".")[2].startswith("bench")

    only_bench = sorted(m for m in mods if users[m] and all(bench(u) for u in users[m]) and not bench(m))
    assert only_bench == [], only_bench
    assert {"fieldid.training.bench_sets", "fieldid.training.bench_reference", "fieldid.export.bench_cascade",
            "fieldid.export.bench_ood"} <= set(mods)


def test_import_cycle_through_string_imports_is_found(tmp_path: Path) -> None:
    mods = {}
    for rel, text in PLANTED_STRING_CYCLE.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        parts = Path(rel).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {m: _imports(m, mods) for m in mods}
    assert graph["fieldid.planted.a"] == {"fieldid.planted.b"}
    assert graph["fieldid.planted.b"] == {"fieldid.planted.c"}
    assert graph["fieldid.planted.c"] == {"fieldid.planted.d"}
    assert graph["fieldid.planted.d"] == {"fieldid.planted.a"}
    assert graph["fieldid.planted.e"] == set()
    assert _cycles(graph) == [["fieldid.planted.a", "fieldid.planted.b", "fieldid.planted.c", "fieldid.planted.d"]]


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


# --------------------------------------------------------------------------- one phone contract
# The consumers of a bundle: each answers photos through the phone contract (fieldid.export.phone)
# and none reaches into another. The server's client side (client, state, config, server process
# control) is its published interface for other processes, so asking a running server is allowed.
CONSUMERS = {
    "serve": ("fieldid.serve.engine", "fieldid.serve.fieldid_handler", "fieldid.serve.bench"),
    "edge_demo": ("fieldid.edge_demo",),
    "app": ("fieldid.app",),
    "classify": ("fieldid.classify",),
    "cascade": ("fieldid.export.bench_cascade",),
}
PHONE_CONTRACT = "fieldid.export.phone"


def _owner(module: str) -> str | None:
    for name, prefixes in CONSUMERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    return None


def test_no_consumer_imports_another_and_all_use_the_phone_contract() -> None:
    """String imports count too (``_imports`` follows import_module and module-path strings)."""
    mods = _modules()
    bad, uses_contract = [], set()
    for name, path in mods.items():
        own = _owner(name)
        if own is None:
            continue
        targets = _imports(name, mods)
        if PHONE_CONTRACT in targets:
            uses_contract.add(own)
        bad += [f"{name} -> {t}" for t in sorted(targets) if _owner(t) not in (None, own)]
    assert bad == [], bad
    assert uses_contract == set(CONSUMERS), set(CONSUMERS) - uses_contract
    # The contract itself imports no consumer (and stays torch-free: tests/test_phone.py).
    assert not [t for t in _imports(PHONE_CONTRACT, mods) if _owner(t)]
    # The rule bites: the app's old import of the demo's mode assignment is found.
    planted = {**{m: _imports(m, mods) for m in mods}}
    planted["fieldid.app.build"] = planted["fieldid.app.build"] | {"fieldid.edge_demo.modes"}
    assert any(_owner(t) not in (None, "app") for t in planted["fieldid.app.build"])


def test_one_decode_and_one_preprocess_implementation() -> None:
    """Only the phone contract calls the intake's decoder on photo bytes and builds model inputs; every
    consumer goes through it (``grep`` finds one decode/preprocess path)."""
    mods = _modules()
    callers: dict[str, set[str]] = {}
    for name, path in mods.items():
        if _owner(name) is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if fn in ("open_image", "decode_image", "check_resize_fits", "center_crop", "normalize", "preprocess",
                          "InferenceSession"):
                    callers.setdefault(fn, set()).add(name)
    assert callers == {}, callers
