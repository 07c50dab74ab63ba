"""The int8 recipe searches go on to the stem in fp32 while ``unknown_score`` misses its bar.

The tiny run's int8 score may well hold, so a score that misses is made by the bar itself saying so
(its numbers are the real ones; only ``passed`` is forced to False): what is tested here is the
search's order, with real quantization, real runtimes and the real candidates' files.
The ExecuTorch quantizer's conv + ReLU6 pairing is tested on a small graph of its own.
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
    from fieldid.export.onnx_export import OnnxInt8Recipe, _choose_int8, _quantize, _weighted_nodes

    ctx = _ctx(tiny_run, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    path, recipe, search = _choose_int8(ctx, tiny_bundle / "model.onnx", work)
    tried = [t["recipe"] for t in search.tried]
    assert len(missing_score) == len(tried) and all("unknown_selection" in t for t in search.tried)
    stem = [t for t in tried if "layers kept in fp32 (for unknown_score)" in t]
    # After the calibration candidates (and sensitive layers, when the logits needed them): the stem's
    # first 2, then 3 weighted layers (one of them, when the third is already a sensitive node).
    assert 1 <= len(stem) <= 2 and tried[-len(stem):] == stem, tried
    assert "the first 2 layers" in stem[0] and path.is_file() and not search.best_unknown_passed
    # Such a recipe really computes those layers in float: quantized again on the search's own ranges.
    first = [name for name, _ in _weighted_nodes(work / "pre.onnx")[:2]]
    out = tmp_path / "stem.onnx"
    _quantize(work / "pre.onnx", out, OnnxInt8Recipe(recipe.calibration, recipe.percentile, float_nodes=first,
                                                     stem_in_fp32=2), next(work.glob("ranges*.json")))
    assert set(first) <= set(_float_convs(out)) and len(_float_convs(out)) < len(_weighted_nodes(work / "pre.onnx"))


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


def test_onnx_search_without_a_detector_never_tries_the_stem(tiny_run: Path, tiny_bundle: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without a detector: no score is read, and the search is the logits-only one it was."""
    from fieldid.export.onnx_export import SELECTION_TARGET, _choose_int8

    monkeypatch.setattr(U, "selection_scores", lambda ctx, sel: None)
    ctx = _ctx(tiny_run, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    _, recipe, search = _choose_int8(ctx, tiny_bundle / "model.onnx", work)
    rows = search.tried
    assert not any("unknown_selection" in r for r in rows) and recipe.stem_in_fp32 == 0
    assert not any("for unknown_score" in r["recipe"] for r in rows), rows
    faithful = [i for i, r in enumerate(rows) if r["selection_agreement"] >= SELECTION_TARGET]
    assert not faithful or faithful[0] == len(rows) - 1, rows  # the first faithful recipe ends it


def test_pte_search_goes_through_the_stem_before_the_feature_conv(tiny_run: Path, tmp_path: Path,
                                                                  missing_score) -> None:
    from fieldid.export.executorch_export import SELECTION_TARGET, _choose_int8

    ctx = _ctx(tiny_run, tmp_path)
    _, _, search = _choose_int8(ctx)
    tried = [t["recipe"] for t in search.tried]
    assert len(missing_score) == len(tried)
    stem = [t for t in tried if "features.0.0" in t and "features.1.conv.0.0" in t]  # the stem conv + first dw conv
    assert stem, tried
    held = [i for i, t in enumerate(search.tried) if t["selection_agreement"] >= SELECTION_TARGET]
    if held:
        # Once the logits held, only candidates with more of the stem in fp32 follow (the classifier in fp32
        # cannot change the features the score reads), and the feature conv in fp32 comes last.
        assert "(for unknown_score, over the size budget)" in tried[-1], tried
        assert all("features.0.0" in t for t in tried[held[0] + 1:-1]), tried
        assert tried.index(stem[0]) < len(tried) - 1
    else:
        # The logits never held (int8 kernels differ between CPUs): the whole queue, stems included,
        # and no last resort, which is only for a score that misses beside faithful logits.
        assert len(tried) == 6 and not any("over the size budget" in t for t in tried), tried


def _conv_relu6_graph() -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6()).eval()
    with torch.no_grad():  # a wide pre-activation range, as BatchNorm folding gives MobileNetV2's stem
        model[1].weight.mul_(20)
    return model, torch.export.export(model, (torch.randn(64, 3, 8, 8),)).module()  # static batch 64


def _quantized(skip: set[str]) -> tuple[Any, Any, Any]:
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from fieldid.export.executorch_export import _quantizer

    model, gm = _conv_relu6_graph()
    prepared = prepare_pt2e(gm, _quantizer(skip))
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        prepared(x)
        return model, convert_pt2e(prepared), x


def test_pte_quantizer_quantizes_a_conv_with_its_relu6_as_one_op() -> None:
    """The clamp's output, not the conv's pre-activation, is quantized (in [0, 6]); nothing sits between them."""
    import torch

    model, q, x = _quantized(set())
    clamps = [n for n in q.graph.nodes if n.op == "call_function" and "hardtanh" in str(n.target)]
    assert len(clamps) == 2
    for clamp in clamps:
        assert "conv" in str(clamp.args[0].target)  # no quantize / dequantize pair in between
        (after,) = clamp.users
        assert "quantize_per_tensor" in str(after.target)
        scale, zero_point = float(after.args[1]), int(after.args[2])
        assert zero_point == -128 and 0 < scale * 255 <= 6 + 1e-3  # the range [0, <= 6], all of it used
    with torch.no_grad():
        ref, got = model(x), q(x)
    # Each output step is 1/255 of the clamped range: two layers of rounding stay within a few steps.
    assert float((got - ref).abs().max()) < 0.2


def test_pte_quantizer_leaves_a_skipped_conv_and_its_relu6_in_fp32() -> None:
    """A conv the recipe keeps in fp32 is not pulled into a quantized pair by its clamp."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    from fieldid.export.executorch_export import annotate_conv_clamps

    _, gm = _conv_relu6_graph()
    first = next(n.name for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))
    config = get_symmetric_quantization_config(is_per_channel=True)
    assert annotate_conv_clamps(gm, config, lambda n: n.name != first) == 1
    _, q, _ = _quantized({first})
    weights = [n for n in q.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    # The kept conv's weight is a plain tensor; the quantized one's comes through a dequantize.
    assert [("dequantize" in str(w.args[1].target)) if w.args[1].op == "call_function" else False
            for w in weights] == [False, True]


@pytest.mark.parametrize("classes", [10, 21])
def test_pte_queue_keeps_the_stem_candidates_when_the_classifier_is_over_the_budget(classes: int) -> None:
    """MobileNetV2's classifier holds 1280 x classes weights: over the 1 % fp32 budget from 18 classes on.
    With 21 (the scenes set) the stem candidates are still tried, without the classifier; with 10, with it."""
    import torch
    import torchvision

    from fieldid.export.executorch_export import PteInt8Recipe, _weight_count, _weighted_nodes, pte_queue
    from fieldid.export.onnx_export import FLOAT_PARAM_BUDGET

    model = torchvision.models.mobilenet_v2(num_classes=classes).eval()
    gm = torch.export.export(model, (torch.randn(2, 3, 64, 64),)).module()
    layers = _weighted_nodes(gm)
    sizes = [_weight_count(model, path) for _, path in layers]
    head_over = sizes[-1] > FLOAT_PARAM_BUDGET * sum(sizes)
    assert head_over == (classes == 21)
    queue = pte_queue(layers, sizes, with_score=True)
    kept = [r.float_layers for r in queue]
    assert queue[0] == PteInt8Recipe() and len(set(map(tuple, kept))) == len(kept)  # fully int8 first, no repeats
    stems = [k for k in kept if "features.0.0" in k]
    assert [len([p for p in k if p.startswith("features.")]) for k in stems] == [1, 2, 3, 5]
    assert all(("classifier.1" in k) != head_over for k in stems), kept
    assert len(queue) == (5 if head_over else 6)
    assert all(sum(sizes[[p for _, p in layers].index(p)] for p in k) <= FLOAT_PARAM_BUDGET * sum(sizes)
               for k in kept)
    assert pte_queue(layers, sizes, with_score=False)[-1].float_layers == stems[1]  # (0, 1): no score, no more


def test_pte_candidates_share_one_calibration_pass_and_convert_the_same(tiny_run: Path, tmp_path: Path) -> None:
    """A stem-in-fp32 candidate that takes the fully-int8 candidate's observer statistics converts to the
    same graph as one calibrated on its own: the same outputs, bit for bit; and it reads no image."""
    import torch

    from fieldid.export.executorch_export import (PteInt8Recipe, _export_for_quantization, _quantize,
                                                  _weighted_nodes)

    ctx = _ctx(tiny_run, tmp_path)
    gm = _export_for_quantization(ctx.model, ctx)
    layers = _weighted_nodes(gm)
    stem = PteInt8Recipe(float_layers=[p for _, p in layers[:2]], float_nodes=[n for n, _ in layers[:2]])
    alone = _quantize(gm, ctx, stem)
    stats: dict = {}
    _quantize(gm, ctx, PteInt8Recipe(), stats)
    assert stats and any("Histogram" in key[1] for key in stats)
    passes = []
    real = type(ctx.calibration).batches
    ctx.calibration.batches = lambda *a, **k: (passes.append(1), real(ctx.calibration, *a, **k))[1]
    shared = _quantize(gm, ctx, stem, stats)
    assert passes == []
    x = torch.from_numpy(ctx.heldout[:32])
    with torch.no_grad():
        a, b = alone(x), shared(x)
    for got, ref in zip(b, a):
        assert torch.equal(got, ref)
    # A candidate watching a tensor the statistics do not hold calibrates on its own.
    assert _quantize(gm, ctx, stem, {("elsewhere", "HistogramObserver", "torch.int8", "x"): {}}) is not None
    assert passes
