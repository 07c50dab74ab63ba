"""The int8 recipe searches go on to the stem in fp32 while ``unknown_score`` misses its bar.

The tiny run's int8 score may well hold, so a score that misses is made by the bar itself saying so
(its numbers are the real ones; only ``passed`` is forced to False): what is tested here is the
search's order, with real quantization, real runtimes and the real candidates' files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest

from fieldid.export import _import_exporters
from fieldid.export import bundle as B
from fieldid.export import unknown as U

_import_exporters()


@pytest.fixture
def missing_score(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every candidate's ``unknown_score`` bar reported as missed; the real results are collected."""
    seen: list[dict[str, Any]] = []
    real = U.int8_unknown_bar

    def missed(got, ref, threshold):  # noqa: ANN001, ANN202 - same signature as the real bar
        result = real(got, ref, threshold)
        seen.append(result)
        return {**result, "passed": False}

    monkeypatch.setattr(U, "int8_unknown_bar", missed)
    return seen


def _ctx(tiny_run: Path, tmp_path: Path) -> Any:
    from fieldid.training.records import load_record

    return B._context(tiny_run, load_record(tiny_run), tmp_path, calibration_size=16)


def _float_convs(path: Path) -> list[str]:
    """Conv nodes of a QDQ file whose weight is a plain float initializer (no DequantizeLinear in front)."""
    g = onnx.load(str(path)).graph
    weights = {t.name for t in g.initializer}
    return [n.name for n in g.node if n.op_type == "Conv" and n.input[1] in weights]


def test_onnx_search_keeps_the_stem_in_fp32_when_the_score_misses(tiny_run: Path, tiny_bundle: Path,
                                                                   tmp_path: Path, missing_score) -> None:
    from fieldid.export.onnx_export import _choose_int8, _weighted_nodes

    ctx = _ctx(tiny_run, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    path, recipe, search = _choose_int8(ctx, tiny_bundle / "model.onnx", work)
    tried = [t["recipe"] for t in search.tried]
    assert len(missing_score) == len(tried) and all("unknown_selection" in t for t in search.tried)
    stem = [t for t in tried if "stem layer(s) kept in fp32 (for unknown_score)" in t]
    # After the calibration candidates (and sensitive layers, when the logits needed them): the stem's
    # first 2, then 3 weighted layers, each on top of the best recipe so far.
    assert len(stem) == 2 and tried[-2:] == stem, tried
    first = [name for name, _ in _weighted_nodes(work / "pre.onnx")[:3]]
    assert path.is_file() and not search.best_unknown_passed
    if recipe.stem_in_fp32:  # the chosen file really computes those layers in float
        assert set(first[:2]) <= set(_float_convs(path)), (_float_convs(path), first)


def test_onnx_search_without_a_miss_stops_at_the_first_faithful_recipe(tiny_run: Path, tiny_bundle: Path,
                                                                       tmp_path: Path) -> None:
    from fieldid.export.onnx_export import SELECTION_TARGET, _choose_int8

    ctx = _ctx(tiny_run, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    _, recipe, search = _choose_int8(ctx, tiny_bundle / "model.onnx", work)
    rows = search.tried
    assert all("unknown_selection" in r for r in rows)  # the run has a detector: every candidate is scored
    done = [i for i, r in enumerate(rows)
            if r["selection_agreement"] >= SELECTION_TARGET and r["unknown_selection"]["passed"]]
    # The search ends at the first candidate that holds both; stem candidates appear only after a miss.
    assert not done or done[0] == len(rows) - 1, rows
    if recipe.stem_in_fp32:
        assert any(not r["unknown_selection"]["passed"] for r in rows[:-1]), rows


def test_pte_search_goes_through_the_stem_before_the_feature_conv(tiny_run: Path, tmp_path: Path,
                                                                  missing_score) -> None:
    from fieldid.export.executorch_export import _choose_int8

    ctx = _ctx(tiny_run, tmp_path)
    _, _, search = _choose_int8(ctx)
    tried = [t["recipe"] for t in search.tried]
    assert len(missing_score) == len(tried)
    # The last resort (the feature conv in fp32, over the size budget) comes only after the stem ones.
    assert "(for unknown_score, over the size budget)" in tried[-1], tried
    stem = [t for t in tried if "features.0.0" in t and "features.1.conv.0.0" in t]  # the stem conv + first dw conv
    assert stem and tried.index(stem[0]) < len(tried) - 1, tried
    # Once the logits held, no candidate that leaves the stem as it was is tried (the classifier
    # in fp32 cannot change the features the score reads).
    held = [i for i, t in enumerate(search.tried) if t["selection_agreement"] >= 0.995]
    if held:
        later = tried[held[0] + 1:-1]
        assert all("features.0.0" in t for t in later), tried
