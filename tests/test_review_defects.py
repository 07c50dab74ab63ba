"""Defects found by the review of issue 17, each pinned by a test that failed on the code before its fix."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _fieldid(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m fieldid ARGS``; run from tests/ (no fieldid package there: the installed one is used)."""
    return subprocess.run([sys.executable, "-m", "fieldid", *args], cwd=cwd or TESTS, capture_output=True,
                          text=True, timeout=timeout)


def _manifest_only_bundle(folder: Path) -> Path:
    """A bundle whose manifest is valid but lists no artifact: anything that reads it works, archiving
    it fails (no ONNX file to serve). No training needed."""
    from fieldid.export.manifest import Manifest
    from fieldid.records import PreprocessSpec

    folder.mkdir(parents=True)
    Manifest(name="nothing", labels=["a", "b"], preprocess=PreprocessSpec(72, 64).to_dict(), temperature=1.0,
             fallback_threshold=0.5, fallback_rule="", backbone="mobilenet_v2", num_classes=2, source_run="",
             source_checkpoint="", artifacts=[]).to_json(folder / "manifest.json")
    return folder


# ----------------------------------------------------------------- 1. serve state folders
def _users_folder(root: Path) -> dict[Path, bytes]:
    """A folder a user made (no fieldid marker) holding what `serve start` used to clear."""
    files = {root / "tmp" / "notes.txt": b"mine", root / "model-store" / "keep.bin": b"\0\1",
             root / "key_file.json": b'{"mine": true}'}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def test_serve_start_refuses_a_users_folder_and_deletes_nothing(tmp_path: Path) -> None:
    """`--state-dir ~` used to delete ~/tmp, ~/model-store and ~/key_file.json before anything else failed."""
    bundle = _manifest_only_bundle(tmp_path / "bundle")
    home = tmp_path / "home"
    files = _users_folder(home)
    from fieldid.serve.config import ServeOptions

    o = ServeOptions.on_free_ports()  # free ports: the old code got as far as clearing the folder
    proc = _fieldid("serve", "start", "--bundle", str(bundle), "--state-dir", str(home), "--port", str(o.port),
                    "--management-port", str(o.management_port), "--metrics-port", str(o.metrics_port),
                    "--grpc-port", str(o.grpc_inference_port), "--grpc-management-port", str(o.grpc_management_port))
    for path, data in files.items():
        assert path.is_file() and path.read_bytes() == data, f"{path} was deleted or changed"
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not a fieldid server state folder" in lines[0], proc.stderr


def test_serve_start_adopts_a_new_or_empty_folder(tmp_path: Path) -> None:
    """What fieldid creates (or an empty folder it is given) carries its marker afterwards."""
    from fieldid.serve.server import STATE_MARKER, claim_state_dir

    new, empty = tmp_path / "a" / "serve", tmp_path / "empty"
    empty.mkdir()
    for d in (new, empty):
        assert claim_state_dir(d) == d.resolve() and (d / STATE_MARKER).is_file()
        claim_state_dir(d)  # a marked folder stays usable


def test_stop_server_cleans_only_the_folder_it_is_given(tmp_path: Path) -> None:
    """stop_server used to delete tmp/ and key_file.json in the folder named *inside* server.json."""
    from fieldid.serve.config import ServeOptions
    from fieldid.serve.server import claim_state_dir, stop_server
    from fieldid.serve.state import ServerState

    victim = tmp_path / "victim"
    files = _users_folder(victim)
    own = claim_state_dir(tmp_path / "own")
    (own / "tmp").mkdir()
    ServerState(pid=1, create_time=0.0, state_dir=str(victim), host="127.0.0.1", ports=ServeOptions().ports(), models={},
                auth=True, key_file=str(victim / "key_file.json"), config="", log_dir="",
                started="2025-01-01T00:00:00+00:00").to_json(own / "server.json")
    res = stop_server(own)
    assert res["state_dir"] == str(own)
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} was changed"
    assert not (victim / "server.json").exists()
    assert not (own / "tmp").exists()  # its own scratch space is cleared
    assert json.loads((own / "server.json").read_text())["status"] == "stopped"


def test_stop_server_leaves_an_unmarked_folder_alone(tmp_path: Path) -> None:
    from fieldid.serve.config import ServeOptions
    from fieldid.serve.server import stop_server
    from fieldid.serve.state import ServerState

    home = tmp_path / "home"
    files = _users_folder(home)
    ServerState(pid=1, create_time=0.0, state_dir=str(home), host="127.0.0.1", ports=ServeOptions().ports(), models={},
                auth=False, key_file="", config="", log_dir="",
                started="2025-01-01T00:00:00+00:00").to_json(home / "server.json")
    stop_server(home)
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} was changed"


# ----------------------------------------------------------------- 2. run.json paths stay in the run
def _run_dict(**changes: object) -> dict:
    from fieldid.records import PreprocessSpec, RunRecord

    rec = RunRecord(name="r", backbone="mobilenet_v2", num_classes=2, labels=["a", "b"],
                    preprocess=PreprocessSpec(72, 64).to_dict(), unknown={"file": "unknown.pth", "threshold": 0.5},
                    extra={"samples": "samples/samples.json"})
    d = rec.to_dict()
    for key, value in changes.items():
        holder, _, inner = key.partition(".")
        if inner:
            d[holder] = {**d[holder], inner: value}
        else:
            d[key] = value
    return d


@pytest.mark.parametrize("field", ["weights", "split", "metrics", "best_checkpoint", "last_checkpoint", "config",
                                   "unknown.file", "extra.samples"])
@pytest.mark.parametrize("bad", ["../other/file", "/etc/passwd", "a/../../b", "C:\\x"])
def test_run_json_paths_must_stay_in_the_run(field: str, bad: str) -> None:
    from fieldid.records import RecordError, RunRecord

    RunRecord.from_dict(_run_dict(), source="run.json")  # the defaults are fine
    with pytest.raises(RecordError, match=f"run.json: {field}: .* must stay inside the run folder"):
        RunRecord.from_dict(_run_dict(**{field: bad}), source="run.json")


def test_evaluate_never_writes_outside_a_copied_run(tiny_run: Path, tmp_path: Path) -> None:
    """`evaluate` wrote its metrics through run.json's `metrics`: a copied run could overwrite any file."""
    import shutil

    run = tmp_path / "copied"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export", "serve", "bench"))
    victim = tmp_path / "victim.json"
    victim.write_text('{"keep": true}\n')
    rec = json.loads((run / "run.json").read_text())
    rec["metrics"] = "../victim.json"
    (run / "run.json").write_text(json.dumps(rec))
    proc = _fieldid("evaluate", "--run", str(run))
    assert victim.read_text() == '{"keep": true}\n'
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "metrics: '../victim.json' must stay inside the run folder" in lines[0], proc.stderr


# ----------------------------------------------------------------- 3. the demo on a public address
def test_demo_never_picks_up_a_key_file_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from fieldid.commands.edge_demo import _server_for

    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "someone-elses"}}))
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(no_server=False, server=None, key_file=None, ca_file=None)
    assert _server_for("reef", args, []).key_file is None
    given = tmp_path / "mine.json"
    assert _server_for("reef", argparse.Namespace(no_server=False, server=None, key_file=given, ca_file=None),
                       []).key_file == given


def test_demo_on_a_public_address_warns_that_it_lends_the_key(tiny_bundle: Path, tmp_path: Path) -> None:
    """`serve start` and `app serve` warn about a public --host; the demo, which attaches the server's
    inference key to every visitor's fallback request, said nothing."""
    import time

    from fieldid.serve.config import free_port

    key = tmp_path / "key_file.json"
    key.write_text(json.dumps({"inference": {"key": "k", "expiration time": "never"}}))
    server = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "fieldid", "demo", "--bundle", str(tiny_bundle), "--host", "0.0.0.0",
                             "--port", str(free_port()), "--server", server, "--key-file", str(key)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the banner comes once the app listens
            if "fieldid demo running at" in line or time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    warnings = [ln for ln in err.splitlines() if "binding the demo to 0.0.0.0: it is reachable from other machines" in ln]
    assert len(warnings) == 1, err
    assert server in warnings[0] and str(key) in warnings[0]


def test_demo_shows_no_error_details_to_visitors(demo_app) -> None:
    assert demo_app.app.show_error is False


# ----------------------------------------------------------------- 4. storage passwords are never echoed
def test_redaction_hides_only_the_password() -> None:
    from fieldid.cli_common import redact_url_passwords as r

    assert r("cannot open 'postgresql+psycopg://fieldid:s3cr%40t@db.example:5432/tune': refused") == \
        "cannot open 'postgresql+psycopg://fieldid:***@db.example:5432/tune': refused"
    assert r("sqlite:////tmp/x/study.db and http://user@host/ and mysql://u:@h/d") == \
        "sqlite:////tmp/x/study.db and http://user@host/ and mysql://u:***@h/d"


def test_tune_storage_error_does_not_echo_the_password(tmp_path: Path) -> None:
    from fieldid.serve.config import free_port
    from fieldid.training.tune import TuneError, _open_storage

    url = f"postgresql+psycopg://fieldid:s3cret-pw@127.0.0.1:{free_port()}/tune"  # nobody listens there
    with pytest.raises(TuneError) as e:
        _open_storage(url, 2, 1)
    assert "s3cret-pw" not in str(e.value) and "fieldid:***@127.0.0.1" in str(e.value)
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    proc = _fieldid("tune", "--data", str(data.parent), "--storage", url, "--trials", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2, proc.stderr
    assert "s3cret-pw" not in proc.stdout + proc.stderr and "***" in proc.stderr, proc.stderr


def test_cli_redacts_passwords_in_every_log_line(capsys) -> None:
    """Anything that logs a URL (Optuna, SQLAlchemy, our own lines) goes through the CLI's handler."""
    import logging

    from fieldid.cli import _configure_logging
    from fieldid.training.tune import _route_optuna_logging

    _route_optuna_logging()  # what `fieldid tune` does before it opens the storage

    root = logging.getLogger()
    before = list(root.handlers)
    try:
        for h in before:
            root.removeHandler(h)
        _configure_logging(verbose=False)
        logging.getLogger("optuna.storages").warning("lost %s", "postgresql://u:hunter2@db/x")
        logging.getLogger("sqlalchemy.pool").warning("lost postgresql://u:hunter3@db/y")
        for h in root.handlers:
            h.flush()
    finally:
        for h in [h for h in root.handlers if h not in before]:
            root.removeHandler(h)
        for h in before:
            root.addHandler(h)
    err = capsys.readouterr().err
    assert "hunter2" not in err and "postgresql://u:***@db/x" in err, err
    assert "hunter3" not in err and "postgresql://u:***@db/y" in err, err


# ----------------------------------------------------------------- 6. run.json says which fieldid wrote it
def test_run_json_records_the_installed_fieldid_version(tiny_run: Path) -> None:
    import fieldid

    assert fieldid.__version__ != "0.1.0"  # what run.json said, hard-coded, while the package was 0.2.0
    assert json.loads((tiny_run / "run.json").read_text())["fieldid_version"] == fieldid.__version__


# ----------------------------------------------------------------- 5. a bug is not the user's fault
def _main(monkeypatch, capsys, raise_in_command=None, argv: list[str] | None = None) -> tuple[int, list[str]]:
    """``fieldid predict ...`` through the real entry point; ``raise_in_command`` stands in for a
    bug inside the command (the one thing replaced: what the command does)."""
    import fieldid.cli

    if raise_in_command is not None:
        monkeypatch.setattr(fieldid.cli, "_cmd_predict", lambda args: raise_in_command())
    monkeypatch.delenv("FIELDID_DEBUG", raising=False)
    code = fieldid.cli.main(argv or ["predict", "photo.jpg", "--bundle", "b", "--out", "o.csv"])
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


@pytest.mark.parametrize("bug", [lambda: {}["missing"], lambda: [][0],
                                 lambda: __import__("numpy").zeros(3).reshape(2)],
                         ids=["KeyError", "IndexError", "ValueError from a library"])
def test_cli_reports_a_bug_as_a_bug_with_its_traceback_in_a_log(monkeypatch, capsys, bug) -> None:
    code, lines = _main(monkeypatch, capsys, bug)
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("error: internal error ") and "traceback in " in lines[0], lines
    log = Path(lines[0].split("traceback in ", 1)[1].split(";")[0].split(")")[0])
    assert "Traceback (most recent call last)" in log.read_text()
    log.unlink()


def test_cli_bad_input_is_still_one_line_and_exit_2(monkeypatch, capsys, tmp_path: Path) -> None:
    code, lines = _main(monkeypatch, capsys, argv=["predict", "p.jpg", "--bundle", "b", "--run", "r", "--out", "o.csv"])
    assert code == 2 and lines == ["error: give exactly one of --run RUN or --bundle DIR"], lines
    code, lines = _main(monkeypatch, capsys, argv=["predict", str(tmp_path / "none.jpg"), "--bundle", str(tmp_path),
                                                  "--out", "o.csv"])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "internal" not in lines[0], lines


@pytest.mark.parametrize("argv", [["-v", "predict", "p.jpg", "--bundle", "b", "--run", "r", "--out", "o.csv"],
                                  ["predict", "p.jpg", "--bundle", "b", "--run", "r", "--out", "o.csv", "-v"],
                                  ["predict", "--verbose", "p.jpg", "--bundle", "b", "--run", "r", "--out", "o.csv"]],
                         ids=["before the command", "at the end", "long, among the flags"])
def test_verbose_before_or_after_the_command_prints_the_traceback(monkeypatch, capsys, argv) -> None:
    code, lines = _main(monkeypatch, capsys, argv=argv)
    assert code == 2 and lines[0] == "Traceback (most recent call last):", lines
    assert lines[-1] == "error: give exactly one of --run RUN or --bundle DIR", lines


def test_verbose_is_taken_by_every_command_and_kept_from_before_it() -> None:
    from fieldid.cli import build_parser

    parser = build_parser()
    for argv in (["bench", "real", "-v"], ["serve", "stop", "-v"], ["data", "check", "d", "-v"]):
        args = parser.parse_args(argv)
        assert args.verbose_here and not args.verbose, argv
    args = parser.parse_args(["-v", "bench", "real"])
    assert args.verbose and not args.verbose_here  # the command's own default does not undo it


def test_every_fieldid_error_type_counts_as_bad_input() -> None:
    from fieldid.cli_common import UsageError, is_bad_input
    from fieldid.records import RecordError
    from fieldid.serve.archive import ServeError

    for e in (UsageError("x"), RecordError("x"), ServeError("x"), FileNotFoundError("x")):
        assert is_bad_input(e), e
    for e in (ValueError("x"), KeyError("x"), IndexError("x"), TypeError("x"), RuntimeError("x")):
        assert not is_bad_input(e), e


def test_server_bug_is_a_500_not_the_clients_415(tiny_bundle: Path, shapes_dir: Path, caplog) -> None:
    """The engine answered 415 "cannot process this image" for *any* exception while preparing an
    image; a fault of the server's own preprocessing (here a spec it cannot run) blamed the client."""
    import dataclasses
    import logging

    import onnxruntime as ort

    from fieldid.export.manifest import load_manifest
    from fieldid.serve.engine import ClassifierEngine

    good = sorted((shapes_dir / "circle").iterdir())[0].read_bytes()
    manifest = load_manifest(tiny_bundle)
    art = manifest.find("onnx", "fp32")  # the engine as from_bundle builds it, whatever the export's bars said
    session = ort.InferenceSession(str(tiny_bundle / art.file), providers=["CPUExecutionProvider"])
    engine = ClassifierEngine(session, manifest, art, version="test")
    assert [r.status for r in engine.handle([good, b"not an image"])] == [200, 415]
    engine.spec = dataclasses.replace(engine.spec, interpolation="lanczos")  # no such resampler: a server bug
    with caplog.at_level(logging.ERROR, logger="fieldid.serve"):
        replies = engine.handle([good, b"not an image"])
    assert [r.status for r in replies] == [500, 415]
    assert replies[0].body == {"error": "internal server error (KeyError); the server log has the details",
                               "status": 500}
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


# ----------------------------------------------------------------- 7. optional packages are declared
def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_bench_and_ood_packages_are_a_declared_extra() -> None:
    """training/bench.py imports scikit-learn, `fieldid data ood` scikit-image: neither was declared
    for the paths that use them (scikit-image only as a test dependency)."""
    extras = _extras()
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["bench"]}
    assert {"scikit-learn", "scikit-image"} <= names
    assert "bench" in extras["all"][0]  # make install installs it (with the torch constraints file)


def _one_line_without(module: str, code: str, tmp_path: Path) -> str:
    """The one error line of ``code`` (exit 2) run in a Python where ``module`` cannot be imported,
    as if its extra were not installed."""
    pre = f"import sys; sys.modules[{module!r}] = None; "
    proc = subprocess.run([sys.executable, "-c", pre + code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    return lines[0]


def test_data_ood_without_scikit_image_names_the_extra(tmp_path: Path) -> None:
    line = _one_line_without("skimage", f"from fieldid.cli import main; sys.exit(main(['data', 'ood', "
                                        f"{str(tmp_path / 'ood')!r}]))", tmp_path)
    assert "needs scikit-image" in line and "pip install 'fieldid[bench]'" in line, line


def test_bench_without_scikit_learn_names_the_extra(tmp_path: Path) -> None:
    line = _one_line_without("sklearn", f"from fieldid.cli import main; sys.exit(main(['bench', 'train', 'compare', "
                                        f"'--sets', 'digits', '--work', {str(tmp_path / 'w')!r}]))", tmp_path)
    assert "needs scikit-learn" in line and "pip install 'fieldid[bench]'" in line, line


# ----------------------------------------------------------------- 8. ports and concurrent starts
def test_free_ports_come_from_outside_the_kernels_ephemeral_range() -> None:
    """A port found with bind(0) and released is in the range the kernel hands to the next bind(0)
    and to every outgoing connection, so anything may take it before Java binds it."""
    from fieldid.serve.config import free_port

    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())  # Linux, as TorchServe here
    ports = [free_port() for _ in range(20)]
    assert not [p for p in ports if lo <= p <= hi], (lo, hi, ports)
    assert len(set(ports)) == len(ports)


def test_concurrent_processes_are_never_handed_the_same_port(tmp_path: Path) -> None:
    code = "from fieldid.serve.config import free_port; print(*[free_port() for _ in range(40)])"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    got = [set(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(len(g) == 40 for g in got)
    assert not (got[0] & got[1] or got[0] & got[2] or got[1] & got[2])


def test_a_second_start_of_the_same_folder_waits_for_no_one(tmp_path: Path) -> None:
    """start_server checked "is one running?" and then started one, unlocked: two starts at once both
    passed the check (server.json is written seconds later) and cleared each other's files."""
    from fieldid.serve.archive import ServeError
    from fieldid.serve.config import ServeOptions
    from fieldid.serve.server import _start_lock, start_server

    bundle = _manifest_only_bundle(tmp_path / "bundle")
    state = tmp_path / "state"
    with _start_lock(state.resolve()):  # another start, between its check and its server.json
        with pytest.raises(ServeError, match="another `fieldid serve start` is starting a server from"):
            start_server([bundle], state, ServeOptions.on_free_ports())
        assert not state.exists()
    with pytest.raises(ServeError, match="neither a pytorch nor an ONNX"):  # the lock went with the first start
        start_server([bundle], state, ServeOptions.on_free_ports())
    with pytest.raises(ServeError, match="neither a pytorch nor an ONNX"):  # and a failed start releases it
        start_server([bundle], state, ServeOptions.on_free_ports())
