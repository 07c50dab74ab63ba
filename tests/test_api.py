"""The Python API: ``import fieldid`` is torch-free, ``fieldid.export`` / ``fieldid.serve`` are both the
API calls and the subpackages, and the README's example runs as written (real training, export,
TorchServe and prediction on a tiny dataset)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_import_is_torch_free_and_names_resolve_in_any_order() -> None:
    code = """
import sys
import fieldid
assert "torch" not in sys.modules
assert callable(fieldid.export) and callable(fieldid.serve) and callable(fieldid.train)
import fieldid.export.phone, fieldid.serve.client      # sets the attributes to the subpackages
assert callable(fieldid.export) and callable(fieldid.serve)
assert fieldid.export.phone.RESPONSE_SCHEMA_VERSION >= 1 and fieldid.serve.client.read_token
from fieldid import Bundle, Run, evaluate, predict, train
assert {"train", "export", "serve", "predict", "Run", "Bundle"} <= set(dir(fieldid))
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
        fieldid.serve(tmp_path, no_such_option=1)
    with pytest.raises(ValueError, match="need data and out"):
        fieldid.train(None, tmp_path / "run")


@pytest.mark.slow
def test_readme_example_runs(shapes_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    import fieldid
    import fieldid.export.phone  # the subpackage first: fieldid.export(run) must still be the call

    shutil.copytree(shapes_dir, tmp_path / "photos")
    new = tmp_path / "new_photos"
    (new / "dive-2").mkdir(parents=True)
    shutil.copy(next((shapes_dir / "circle").glob("*.png")), new / "circle.png")
    shutil.copy(next((shapes_dir / "square").glob("*.png")), new / "dive-2" / "square.png")
    Image.new("RGB", (90, 60), (200, 30, 30)).save(new / "dive-2" / "red.jpg")
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    monkeypatch.chdir(tmp_path)

    exec(compile(_readme_block("Python API"), "README.md", "exec"), {})

    # Lightning's progress bar shares stdout: keep the example's own lines.
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", capsys.readouterr().out) if ln.strip()]
    accuracy = [float(ln) for ln in lines if re.fullmatch(r"[01](\.\d+)?", ln)]
    assert len(accuracy) == 1 and 0.0 <= accuracy[0] <= 1.0  # run.evaluate()["accuracy"]
    rows = {Path(ln.split()[0]).name: ln.split() for ln in lines if ln.startswith("new_photos/")}
    assert set(rows) == {"circle.png", "square.png", "red.jpg", "broken.jpg"}
    labels = json.loads((tmp_path / "runs/fish/labels.json").read_text())
    for name in ("circle.png", "square.png", "red.jpg"):
        assert rows[name][1] in labels and 0 < float(rows[name][2]) <= 1 and rows[name][3] in ("True", "False")
        # A photo the device was unsure about was answered by the server (a label), others not ("-").
        assert (rows[name][4] in labels) if rows[name][3] == "True" else rows[name][4] == "-"
    assert rows["broken.jpg"][1] == "None" and "415" in " ".join(rows["broken.jpg"])
    assert callable(fieldid.export) and fieldid.export.phone.RESPONSE_SCHEMA_VERSION >= 1
    run = fieldid.Run(tmp_path / "runs/fish")
    assert run.bundle.path == (tmp_path / "runs/fish/export") and run.bundle.labels == labels
    # The server was stopped by the example's `finally`.
    from fieldid.serve.server import server_status

    assert server_status(tmp_path / "runs/fish/serve")["running"] is False
