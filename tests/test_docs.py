"""The README is a landing page and the docs are a site: the generated pages are current, the site builds
strictly (a broken link fails), and measured numbers live only on the pages benchmark commands write."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"


def test_readme_is_a_landing_page() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    # The two commands and a quickstart on your own photos, then links into the docs.
    assert "make train export" in text and "make test" in text and "## Quickstart on your own photos" in text
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (ROOT / link).is_file(), link


# A measured number: digits with a unit of time, speed or size (a bar or a limit says "goal", "limit", "at most").
_MEASURED = re.compile(r"\b\d+(\.\d+)?\s?(ms|s/step|req/s|img/s|images/s|MB|GB|min)\b")


def test_no_measured_number_is_typed_by_hand_in_the_readme() -> None:
    found = [m.group(0) for m in _MEASURED.finditer(README.read_text())]
    assert found == [], f"README numbers belong on a generated docs/measured page: {found}"


# Words that make a number on a docs page a setting, a limit or a goal rather than a measurement.
_NOT_MEASURED = re.compile(r"goal|limit|at most|over |refuses|≤|<=|window|batch-1|sized to", re.I)


def _typed_measurements(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if _MEASURED.search(line) and not _NOT_MEASURED.search(line)]


def test_no_measured_number_is_typed_by_hand_in_the_docs() -> None:
    """Beyond the README: the hand-written docs pages state settings, limits and goals, never measurements
    (those are on docs/measured/, written by the benchmark commands)."""
    pages = [p for p in DOCS.glob("*.md") if p.name != "cli.md"]  # cli.md is generated from the parsers
    found = {p.name: _typed_measurements(p.read_text()) for p in pages}
    assert {k: v for k, v in found.items() if v} == {}
    # The scan bites: a typed latency is found, a limit is not.
    assert _typed_measurements("The int8 model answers in 3.2 ms on this CPU.") != []
    assert _typed_measurements("Uploads over 30 MB are refused.") == []


def test_generated_pages_are_current() -> None:
    r = subprocess.run([sys.executable, "-m", "fieldid.docs_gen", "--check", "--root", str(ROOT)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def test_a_stale_page_is_caught(tmp_path: Path) -> None:
    from fieldid.docs_gen import generate

    root = tmp_path / "repo"
    (root / "docs" / "measured").mkdir(parents=True)
    (root / "docs" / "measured" / "bench-real.md").write_text("# Real photos\n\nWritten by `make bench-real` ...\n")
    pages = generate(root)
    assert "Real photos: measured/bench-real.md" in pages[root / "mkdocs.yml"]  # the nav entry once the page exists
    assert "[Real photos](bench-real.md)" in pages[root / "docs" / "measured" / "index.md"]
    for path, text in pages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "docs" / "cli.md").write_text("# CLI reference\n\nhand-edited\n")
    r = subprocess.run([sys.executable, "-m", "fieldid.docs_gen", "--check", "--root", str(root)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "cli.md" in r.stderr and "mkdocs.yml" not in r.stderr, r.stderr


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "export_bundle" in api and "select_artifact" in api  # API pages from the docstrings
    assert (tmp_path / "site" / "cli" / "index.html").is_file()


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    for f in ("mkdocs.yml", "pyproject.toml"):
        shutil.copy(ROOT / f, copy / f)
    shutil.copytree(ROOT / "fieldid", copy / "fieldid")
    for folder in ("training", "export", "serve", "edge_demo", "app"):
        (copy / folder).symlink_to(ROOT / folder, target_is_directory=True)
    page = copy / "docs" / "predict.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=copy, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode != 0 and "no-such-page.md" in r.stdout + r.stderr


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md") if p.name != "cli.md"))
def test_no_docs_page_names_a_removed_spelling(page: str) -> None:
    """The renamed flags and API names appear only on the generated CLI page (its 'Renamed' table)."""
    text = (DOCS / page).read_text()
    for old in ("fieldid bench --run", "bench --ood", "--serve-state", "--certificate", "--private-key",
                "fieldid.export(", "fieldid.serve(", "--allow-drop]", "OnDeviceModel"):
        assert old not in text, (page, old)


def test_measurement_pages_share_one_header(tmp_path: Path) -> None:
    """bench real, bench data and every `fieldid bench ... --page` start with the same head (fieldid.machine)."""
    from fieldid.bench_cli import write_measured_page

    text = write_measured_page(tmp_path / "x.md", "Title", "fieldid bench bundle", "a   b\n1   2\n").read_text()
    assert text.startswith("# Title\n\nWritten by `fieldid bench bundle` on ") and ", commit " in text
    assert "CPU:" in text and text.endswith("```\na   b\n1   2\n```\n")  # a table of aligned text stays fenced
