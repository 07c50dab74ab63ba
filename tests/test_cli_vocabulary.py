"""One CLI vocabulary: every flag of every ``fieldid`` parser is in fieldid/cli_vocabulary.py with one meaning and
one default, shows that default in its help, is read by its command (none silently ignored); renamed flags
refuse with a hint; every ``make bench*`` target is a ``fieldid bench`` subcommand; ``make install`` needs no
npm and ``make clean`` removes only what make made."""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from fieldid.cli import build_parser
from fieldid.cli_common import HelpFormatter
from fieldid.cli_vocabulary import CONFIG_DEFAULT, PER_COMMAND, RENAMED, VOCABULARY, _Renamed

ROOT = Path(__file__).resolve().parents[1]
_NOT_FLAGS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction, _Renamed)


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield " ".join(path), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _flags() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    return [(cmd, p, a) for cmd, p in _parsers(build_parser()) for a in p._actions
            if a.option_strings and not isinstance(a, _NOT_FLAGS)]


def test_the_walk_sees_every_command() -> None:
    commands = {cmd for cmd, _ in _parsers(build_parser())}
    assert {"train", "tune", "evaluate", "data check", "export", "serve start", "serve stop", "demo", "app build",
            "app serve", "predict", "bench bundle", "bench cascade", "bench ood", "bench train", "bench real"} <= commands
    assert len(_flags()) > 150


def test_every_flag_has_one_meaning_and_one_default() -> None:
    from fieldid.training.config import TrainConfig

    config = TrainConfig()
    bad = []
    for cmd, _, a in _flags():
        for name in (s for s in a.option_strings if s.startswith("--")):
            flag = VOCABULARY.get(name)
            if flag is None:
                bad.append(f"fieldid {cmd} {name}: not in fieldid/cli_vocabulary.py VOCABULARY")
                continue
            if flag.config_override:  # the table's default is the training config's
                key = flag.config_key or name[2:].replace("-", "_")
                assert getattr(config, key) == flag.default, (name, getattr(config, key), flag.default)
            if flag.default == PER_COMMAND or (flag.config_override and a.default is None):
                continue
            if a.default != flag.default:
                bad.append(f"fieldid {cmd} {name}: default {a.default!r}, the vocabulary's is {flag.default!r}")
    assert bad == [], "\n".join(bad)
    assert CONFIG_DEFAULT and all(isinstance(f.meaning, str) and f.meaning for f in VOCABULARY.values())


def test_every_flag_help_shows_its_default() -> None:
    bad = []
    for cmd, p, a in _flags():
        if a.required or a.help == argparse.SUPPRESS:
            continue
        text = p.formatter_class(prog=p.prog)._get_help_string(a) if issubclass(p.formatter_class, HelpFormatter) \
            else HelpFormatter(prog=p.prog)._get_help_string(a)
        if not issubclass(p.formatter_class, HelpFormatter) and "default" not in (a.help or "").lower():
            bad.append(f"fieldid {cmd} {a.option_strings[-1]}: its parser's help formatter shows no defaults")
        elif "default" not in text.lower():
            bad.append(f"fieldid {cmd} {a.option_strings[-1]}: help shows no default")
    assert bad == [], "\n".join(bad)


@pytest.mark.parametrize("command, old", sorted(RENAMED))
def test_a_renamed_flag_refuses_with_a_one_line_hint(command: str, old: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command.split(), old, "x"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert old in err and RENAMED[(command, old)].split()[0].strip("`") in err, err


# --------------------------------------------------------------------------- no flag silently ignored
def _reads(func: Callable[..., Any], seen: set[Any] | None = None, names: set[str] | None = None) -> set[str]:
    """Attributes a command function reads from its namespace argument, following the functions it hands
    the namespace to (in its own module or imported), so a flag parsed but never looked at is found."""
    seen = set() if seen is None else seen
    func = inspect.unwrap(func)
    if func in seen or not inspect.isfunction(func):
        return set()
    seen.add(func)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError):
        return set()
    fn = next(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    params = names or {a.arg for a in fn.args.args}  # names: the namespace is a local there (main's args)
    local_imports: dict[str, Any] = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom):
            base = importlib.import_module(node.module if not node.level else
                                           importlib.util.resolve_name("." * node.level + (node.module or ""),
                                                                       func.__module__.rpartition(".")[0]))
            for alias in node.names:
                local_imports[alias.asname or alias.name] = getattr(base, alias.name, None)
    found: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in params:
            found.add(node.attr)
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[1], ast.Constant):
                found.add(str(node.args[1].value))
            if any(isinstance(x, ast.Name) and x.id in params for x in [*node.args, *(k.value for k in node.keywords)]):
                name = node.func.id if isinstance(node.func, ast.Name) else None
                callee = local_imports.get(name) or func.__globals__.get(name) if name else None
                if callee is not None:
                    found |= _reads(callee, seen)
    return found


def test_no_flag_is_silently_ignored() -> None:
    from fieldid.cli import main

    # What main reads before it calls the command (-v, which every command also takes after its name).
    by_main = _reads(main, names={"args"}) - {"func"}
    assert "verbose_here" in by_main
    bad = []
    for cmd, p in _parsers(build_parser()):
        func = p._defaults.get("func")
        if func is None:
            continue
        reads = _reads(func) | by_main
        for a in p._actions:
            if isinstance(a, _NOT_FLAGS) or a.dest in ("func", argparse.SUPPRESS) or a.default is argparse.SUPPRESS:
                continue
            if a.dest not in reads:
                bad.append(f"fieldid {cmd}: {'/'.join(a.option_strings) or a.dest} is parsed but never read")
    assert bad == [], "\n".join(bad)


def test_the_ignored_flag_check_bites() -> None:
    def cmd(args: argparse.Namespace) -> int:
        return int(args.used)

    assert _reads(cmd) == {"used"}


# --------------------------------------------------------------------------- benchmarks and make
def _recipe(target: str) -> str:
    text = (ROOT / "Makefile").read_text()
    body = text.split(f"\n{target}:", 1)[1]
    return "\n".join(ln for ln in body.splitlines()[1:] if ln.startswith(("\t", " ")) or not ln.strip()
                     ).split("\n\n")[0]


@pytest.mark.parametrize("target", ["bench", "bench-export", "bench-train", "bench-serve", "bench-cascade",
                                    "bench-app", "bench-real", "bench-data", "bench-real-image-size",
                                    "bench-real-batchnorm", "bench-export-real", "bench-ood-real"])
def test_every_make_bench_target_runs_fieldid_bench(target: str) -> None:
    recipe = _recipe(target)
    assert "$(FIELDID) bench " in recipe and "-m fieldid." not in recipe, recipe
    assert "--page $(MEASURED)/bench-" in recipe  # each writes its table to the docs' measured pages


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    return {cmd: p for cmd, p in _parsers(build_parser()) if cmd.startswith("bench ")}


def test_every_benchmark_is_a_subcommand_whose_help_lists_its_flags(capsys: pytest.CaptureFixture) -> None:
    from fieldid.bench_cli import BENCHMARKS, TRAIN_MODES

    parsers = _bench_parsers()
    assert {f"bench {name}" for name in BENCHMARKS} | {f"bench train {m}" for m in TRAIN_MODES} == set(parsers)
    for cmd, p in parsers.items():
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([*cmd.split(), "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: fieldid {cmd}"), (cmd, out[:200])
        flags = {s for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS for s in a.option_strings}
        assert flags and all(f in out for f in flags), (cmd, flags)
    assert "compare" in parsers["bench train"].format_help() and "cache" in parsers["bench train"].format_help()


def test_the_benchmark_defaults_bench_cli_holds_are_the_modules() -> None:
    """bench_cli keeps its parsers torch-free, so it repeats a few defaults of the benchmark modules: the same."""
    from fieldid import bench_cli
    from fieldid.export import bench_ood_real
    from fieldid.training import bench, bench_data, bench_real

    assert bench_cli._TRAIN_SETS == ",".join(bench.BENCH_SETS)
    assert bench_cli._AUGMENT_VARIANTS == ",".join(bench.AUGMENT_VARIANTS)
    assert bench_cli._REAL_SETS == ",".join(bench_real.REAL_BENCH_SETS)
    assert bench_cli._DATA_SETS == ",".join(bench_data.BENCH_SETS)
    assert bench_cli._OOD_REAL_SETS == ",".join(bench_ood_real.OOD_REAL_SETS)
    assert bench_cli._REAL_TITLE == bench_real.TITLE


@pytest.mark.parametrize("argv, hint", [(["bench", "train"], "fieldid bench train {compare,augment,choices,cache}"),
                                        (["bench"], "fieldid bench {bundle,"),
                                        (["bench", "train", "real"], "invalid choice: 'real'")])
def test_a_benchmark_without_its_mode_is_one_line(argv: list[str], hint: str) -> None:
    r = subprocess.run([sys.executable, "-m", "fieldid", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and hint in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_benchmark_page_has_the_table_and_the_command_as_typed(tmp_path: Path) -> None:
    page = tmp_path / "intake.md"
    r = subprocess.run([sys.executable, "-m", "fieldid", "bench", "intake", "--repeat", "1", "--page", str(page)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "full decode" in r.stdout  # the table still goes to the terminal
    text = page.read_text()
    assert text.startswith("# Full vs JPEG-draft decoding") and "fieldid bench intake --repeat 1 --page" in text
    assert "full decode" in text and "CPU:" in text
    r = subprocess.run([sys.executable, "-m", "fieldid", "bench", "intake", "--repeat", "1", "--page"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--page: expected one argument" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_make_install_needs_no_npm() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    out = subprocess.run([make, "-n", "-B", "install"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "npm" not in out.stdout and "pip install" in out.stdout
    for target in ("app", "test", "bench-app"):  # where the app's packages are needed, they are installed
        assert "$(APP_DEPS)" in (ROOT / "Makefile").read_text().split(f"\n{target}:", 1)[1].splitlines()[0], target


def test_make_clean_removes_only_what_make_made(tmp_path: Path) -> None:
    runs, data, app = tmp_path / "runs", tmp_path / "data", tmp_path / "build" / "app"
    made = [runs / "reef" / "run.json", runs / "salmon-server" / "run.json", runs / "bench-export" / "x",
            runs / "tune.db", runs / "bench-data" / "x", runs / "bench-real-image-size" / "96" / "x",
            data / "reef" / "a" / "1.jpg", app / "index.html"]
    mine = [runs / "my-model" / "run.json", data / "my-photos" / "cat" / "1.jpg"]
    for f in made + mine:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    r = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "clean", f"RUNS={runs}", f"DATA={data}",
                        f"APP_OUT={app}"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not any(f.exists() for f in made)
    assert all(f.read_text() == "x" for f in mine)


def test_every_help_page_reads_as_typed() -> None:
    """argparse %-formats flag help but prints descriptions and epilogs as written: a "%%" there reaches the
    user doubled (``fieldid bench ood --help`` said "goal >= 95%% flagged")."""
    bad = [f"fieldid {cmd} --help: {line.strip()}" for cmd, p in _parsers(build_parser())
           for line in p.format_help().splitlines() if "%%" in line or "%(" in line]
    assert not bad, "\n".join(bad)
