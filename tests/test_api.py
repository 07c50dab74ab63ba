"""The Python API: ``import fieldid`` is torch-free, the API's plain functions do not collide with the
subpackages (``fieldid.export``, ``fieldid.serve`` stay plain modules), mypy accepts the public API, and the
documented example runs as written (real training, export, TorchServe and prediction on a tiny dataset)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_shapes_dataset

ROOT = Path(__file__).resolve().parents[1]


def _docs_example() -> str:
    """The example on the docs' Python API page (docs/api.md), as a reader copies it."""
    return re.search(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S).group(1)


def test_import_is_torch_free_and_names_resolve_in_any_order() -> None:
    code = """
import sys
import fieldid
assert "torch" not in sys.modules
import inspect, types
import fieldid.export.phone, fieldid.serve.client      # the subpackages: plain modules, never callable
assert type(fieldid.export) is types.ModuleType and type(fieldid.serve) is types.ModuleType
assert not callable(fieldid.export) and not callable(fieldid.serve)
assert fieldid.export.phone.RESPONSE_SCHEMA_VERSION >= 1 and fieldid.serve.client.read_token
from fieldid import Bundle, Run, evaluate, export_bundle, predict, serve_bundles, train
assert list(inspect.signature(export_bundle).parameters)[:2] == ["run", "formats"]
assert list(inspect.signature(serve_bundles).parameters)[:2] == ["models", "state_dir"]
assert {"train", "evaluate", "export_bundle", "predict", "serve_bundles", "Run", "Bundle"} <= set(dir(fieldid))
assert not hasattr(Run, "export") and not hasattr(Bundle, "predict")  # one spelling each: the functions
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith("torch")]
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_bad_input_through_the_api_is_a_value_error(tmp_path: Path) -> None:
    import fieldid

    with pytest.raises(ValueError, match="no manifest.json"):
        fieldid.Bundle(tmp_path)
    with pytest.raises(ValueError, match="unexpected keyword"):
        fieldid.serve_bundles(tmp_path, no_such_option=1)
    with pytest.raises(ValueError, match="need data and out"):
        fieldid.train(None, tmp_path / "run")


@pytest.mark.slow
def test_readme_example_runs(shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    import fieldid
    import fieldid.export.phone  # the subpackage first: it must not shadow any API name

    shutil.copytree(shapes_dir, tmp_path / "photos")
    new = tmp_path / "new_photos"
    (new / "dive-2").mkdir(parents=True)
    shutil.copy(next((shapes_dir / "circle").glob("*.png")), new / "circle.png")
    shutil.copy(next((shapes_dir / "square").glob("*.png")), new / "dive-2" / "square.png")
    Image.new("RGB", (90, 60), (200, 30, 30)).save(new / "dive-2" / "red.jpg")
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    monkeypatch.chdir(tmp_path)

    exec(compile(_docs_example(), "docs/api.md", "exec"), {})

    # Lightning's progress bar shares stdout: keep the example's own lines.
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", capsys.readouterr().out) if ln.strip()]
    accuracy = [float(ln) for ln in lines if re.fullmatch(r"[01](\.\d+)?", ln)]
    # fieldid.evaluate(run)["accuracy"] is the run's held-out number ...
    held = json.loads((tmp_path / "runs/fish/metrics.json").read_text())
    assert len(accuracy) == 1 and accuracy[0] == pytest.approx(held["accuracy"], abs=1e-9)
    # ... and the example really trained a model: judged on 150 new photos, not the 12 of its test split
    # (3 shape classes, chance 1/3; a broken fine-tune or label order lands near chance).
    fresh = make_shapes_dataset(tmp_path / "fresh", {"circle": 50, "square": 50, "triangle": 50}, seed=5)
    scored = fieldid.evaluate(tmp_path / "runs/fish", fresh)
    assert scored["num_images"] == 150 and scored["accuracy"] >= 0.6, scored["accuracy"]
    rows = {Path(ln.split()[0]).name: ln.split() for ln in lines if ln.startswith("new_photos/")}
    assert set(rows) == {"circle.png", "square.png", "red.jpg", "broken.jpg"}
    labels = json.loads((tmp_path / "runs/fish/labels.json").read_text())
    for name in ("circle.png", "square.png", "red.jpg"):
        assert rows[name][1] in labels and 0 < float(rows[name][2]) <= 1 and rows[name][3] in ("True", "False")
        # A photo the device was unsure about was answered by the server (a label), others not ("-").
        assert (rows[name][4] in labels) if rows[name][3] == "True" else rows[name][4] == "-"
    assert rows["broken.jpg"][1] == "None" and "415" in " ".join(rows["broken.jpg"])
    assert callable(fieldid.export_bundle) and fieldid.export.phone.RESPONSE_SCHEMA_VERSION >= 1
    run = fieldid.Run(tmp_path / "runs/fish")
    assert run.bundle.path == (tmp_path / "runs/fish/export") and run.bundle.labels == labels
    # The server was stopped by the example's `finally`.
    from fieldid.serve.server import server_status

    assert server_status(tmp_path / "runs/fish/serve")["running"] is False


def _mypy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--no-incremental", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_accepts_the_public_api() -> None:
    """pyproject's [tool.mypy] checks fieldid/__init__.py and fieldid/api.py."""
    r = _mypy()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 source files" in r.stdout


def test_mypy_sees_the_real_signatures(tmp_path: Path) -> None:
    """A type checker sees each API function's real signature (a callable module was opaque to it)."""
    snippet = tmp_path / "use_api.py"
    snippet.write_text('import fieldid\n'
                       'fieldid.export_bundle("runs/x", formatz="onnx")\n'
                       'bundle: fieldid.Bundle = fieldid.export_bundle("runs/x")\n'
                       'fieldid.predict(bundle, ["a.jpg"], k="5")\n')
    r = _mypy(str(snippet))
    assert r.returncode == 1, r.stdout
    assert 'Unexpected keyword argument "formatz" for "export_bundle"' in r.stdout
    assert 'Argument "k" to "predict" has incompatible type "str"; expected "int"' in r.stdout
    assert "Found 2 errors" in r.stdout  # line 3 type-checks: export_bundle returns a Bundle
