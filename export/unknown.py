"""The ``unknown_score`` output of every artifact: reading it back and verifying it against PyTorch.

Exporters trace ``ctx.model``, which for a run with a detector is ``LogitsModel(ScoredModel)``
with the outputs ``(logits, unknown_score)`` (see ``fieldid.training.ood``); the registered
runtimes keep returning the logits (output 0). This module reads output 1 back out of the
written file with the same runtime an app uses and compares it with PyTorch's:

* fp32 artifacts: max |score diff| <= ``FP32_MAX_REL_DIFF`` x threshold, and every unknown
  decision (score > threshold) identical, except for a score within that tolerance of the
  threshold (a float tie);
* int8 artifacts (:func:`int8_unknown_bar`): the score moves with the quantized features, so
  decisions of images whose fp32 score lies near the threshold can flip either way. Measured on
  the reef demo's MobileNetV2 (int8 .pte, 136 images): median |score diff| 12% of the threshold,
  and the 3 flipped images all scored within 22% of it; a detector with fewer principal
  directions (64, 16) moved as much. The bar therefore has three parts: decisions agree on
  >= ``INT8_MIN_DECISION_AGREEMENT`` of the images scored more than ``INT8_THRESHOLD_BAND`` x
  threshold away from it (clear cases must not flip), on >= ``INT8_MIN_OVERALL_AGREEMENT`` of all
  images, and the median |score diff| is <= ``INT8_MAX_MEDIAN_REL_DIFF`` x threshold (an artifact
  whose score is mostly noise fails even if few images sit near the threshold).

The images are the photos among the bar images (held-out split and val photos, not the augmented
views: :func:`check_photos`) *plus* generated non-photos (gradients, noise, ...), so both sides of
the threshold are exercised; with few photos, more non-photos bring the check to the export's
minimum image count.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from fieldid.training.negatives import generated_unknowns

from .registry import PTE_BATCH, converting, run_batched

if TYPE_CHECKING:  # verify.py imports this module; the context is only an annotation here
    from .verify import ExportContext
from .phone import onnx_session, preprocess

__all__ = ["UNKNOWN_OUTPUT", "output_names", "first_output", "load_unknown_runtime", "reference_scores",
           "selection_scores", "fp32_noise_decisions", "score_only_nodes", "upstream_names", "verify_unknown",
           "manifest_unknown", "int8_unknown_bar", "int8_unknown_parts_met", "FP32_MAX_REL_DIFF",
           "INT8_MIN_DECISION_AGREEMENT", "INT8_THRESHOLD_BAND", "INT8_MIN_OVERALL_AGREEMENT",
           "INT8_MAX_MEDIAN_REL_DIFF", "image_scorer"]

log = logging.getLogger("fieldid.export")

UNKNOWN_OUTPUT = "unknown_score"
FP32_MAX_REL_DIFF = 1e-3
INT8_MIN_DECISION_AGREEMENT = 0.99  # on images clear of the threshold band
INT8_THRESHOLD_BAND = 0.25  # |fp32 score - threshold| <= this x threshold: "near the threshold"
INT8_MIN_OVERALL_AGREEMENT = 0.97  # on all images, near ones included
INT8_MAX_MEDIAN_REL_DIFF = 0.20
_PROBES = 24  # generated non-photos added to the held-out split for the check
_SELECTION_SEED = 11  # non-photos for choosing an int8 recipe: others than the check's (seed 7)
_BATCH = 32

ScoreRunner = Callable[[np.ndarray], np.ndarray]


def has_unknown(ctx: ExportContext) -> bool:
    return bool(ctx.record.unknown) and ctx.reference_unknown is not None


def output_names(ctx: ExportContext) -> list[str]:
    """Output names of an artifact: ``["logits", "unknown_score"]`` when the run has a detector."""
    return ["logits", UNKNOWN_OUTPUT] if has_unknown(ctx) else ["logits"]


def first_output(out: Any) -> Any:
    """The logits of a model call that returns ``logits`` or ``(logits, unknown_score)``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _torch_runner(module: Any) -> ScoreRunner:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x))[1].numpy()
    return run


def load_unknown_runtime(path: str | Path, format: str) -> ScoreRunner:
    """``runner(x (N, 3, H, W) float32) -> unknown_score (N,)`` read from the file's second output.

    Raises:
        ValueError: a format without a runtime here, or a file without that output.
    """
    path = Path(path)
    batch = _BATCH
    if format == "onnx":
        sess = onnx_session(path, threads=None)
        names = [o.name for o in sess.get_outputs()]
        if UNKNOWN_OUTPUT not in names:
            raise ValueError(f"{path.name}: no {UNKNOWN_OUTPUT} output (has {names})")
        inp = sess.get_inputs()[0].name
        run: ScoreRunner = lambda b: sess.run([UNKNOWN_OUTPUT], {inp: b})[0]  # noqa: E731
    elif format == "executorch":
        from .pte_runtime import load_pte_method

        batch = PTE_BATCH  # .pte files have a fixed batch size
        execute = load_pte_method(path)
        run = lambda b: execute([torch.from_numpy(b)])[1].numpy()  # noqa: E731
    elif format == "torchscript":
        run = _torch_runner(torch.jit.load(str(path), map_location="cpu"))
    elif format == "torchscript_lite":
        from torch.jit.mobile import _load_for_lite_interpreter

        run = _torch_runner(_load_for_lite_interpreter(str(path)))
    else:
        raise ValueError(f"no runtime for the {UNKNOWN_OUTPUT} of {format} artifacts here")
    return lambda x: run_batched(lambda b: np.asarray(run(b)).reshape(-1, 1), x, batch).reshape(-1)


def _generated(spec: Any, seed: int, count: int = _PROBES) -> np.ndarray:
    """``count`` generated non-photos (gradients, noise, ...) through the phone preprocessing."""
    return np.concatenate([preprocess(img, spec) for _, img in generated_unknowns(count, size=spec.resize_size,
                                                                                    seed=seed)])


def _fp32_scores(ctx: ExportContext, x: np.ndarray) -> np.ndarray:
    """PyTorch fp32 ``unknown_score`` of ``ctx.model`` on ``x``, shape ``(N,)``."""
    with torch.no_grad():
        return run_batched(lambda b: ctx.model(torch.from_numpy(b))[1].numpy().reshape(-1, 1), x, _BATCH).reshape(-1)


def image_scorer(ctx: ExportContext) -> Callable[[Any], float] | None:
    """The fp32 model's ``unknown_score`` of one PIL image through the phone's preprocessing (None: no
    detector): how the export picks the demo's "not a fish" examples (``examples.add_unknown_examples``)."""
    if not has_unknown(ctx):
        return None
    spec = ctx.record.preprocess_spec
    return lambda img: float(_fp32_scores(ctx, preprocess(img.convert("RGB"), spec))[0])


def check_photos(ctx: ExportContext) -> int:
    """How many of the bar images (``ctx.heldout``, photos first) are photos: held-out and val, no views.

    The score check leaves the augmented views out: a view's changed light moves the detector's score
    toward the threshold (measured on a 64-px run: 93% of int8 decisions kept on held-out + views,
    against the bar passed on 300 new photos + 100 non-photos), so views would fail int8 files that hold.
    """
    decided = getattr(ctx, "decided_on", None) or {}
    if not decided:
        return len(ctx.heldout)
    return int(decided.get("heldout", 0)) + int(decided.get("val", 0))


def _probes(ctx: ExportContext) -> np.ndarray:
    """The check's generated non-photos: at least ``_PROBES``, more when there are few photos, so the
    check is decided on at least ``ctx.min_bar_images`` images (generated ones are independent)."""
    if "probes" not in ctx.unknown_probe:
        count = max(_PROBES, int(getattr(ctx, "min_bar_images", 0)) - check_photos(ctx))
        ctx.unknown_probe["probes"] = _generated(ctx.record.preprocess_spec, seed=7, count=count)
    return ctx.unknown_probe["probes"]


def selection_scores(ctx: ExportContext, sel: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Inputs for choosing an int8 recipe by its ``unknown_score`` -- the selection images ``sel``
    plus generated non-photos of another seed than the check's, so the choice is not fitted to the
    verification -- and the PyTorch fp32 scores on them. ``None`` for a run without a detector.

    As many non-photos as the check adds (:func:`_probes`; the photos are the selection's, at least 100):
    with few photos the check is mostly non-photos, whose scores int8 moves less than photos' (textures,
    int8 .pte: check median |score diff| 15% of the threshold, 26% on 100 photos + 24 non-photos), and
    a selection of mostly photos turned down the recipes that pass the check.
    """
    if not has_unknown(ctx):
        return None
    if "selection" not in ctx.unknown_probe:
        count = max(_PROBES, int(getattr(ctx, "min_bar_images", 0)) - check_photos(ctx))
        x = np.concatenate([np.asarray(sel[0:len(sel)], np.float32),
                            _generated(ctx.record.preprocess_spec, seed=_SELECTION_SEED, count=count)])
        ctx.unknown_probe["selection"] = (x, _fp32_scores(ctx, x))
    return ctx.unknown_probe["selection"]


def reference_scores(ctx: ExportContext) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of the check (held-out and val photos + generated non-photos) and the PyTorch fp32
    unknown scores on them."""
    n = check_photos(ctx)
    if "reference" not in ctx.unknown_probe:
        ctx.unknown_probe["reference"] = np.concatenate([ctx.reference_unknown[:n], _fp32_scores(ctx, _probes(ctx))])
    return np.concatenate([ctx.heldout[:n], _probes(ctx)]), ctx.unknown_probe["reference"]


def fp32_noise_decisions(ctx: ExportContext, x: np.ndarray, ref: np.ndarray, threshold: float) -> tuple[float, float]:
    """``(kept, median)``: the share of the fp32 model's unknown decisions on the check's images ``x`` (fp32
    scores ``ref``) that survive pixel noise of up to half a grey level, and its median |score diff| over the
    threshold -- what rounding the input alone does (``training.evaluate.noisy_answers``, the noise of the
    logits' check: :func:`export.verify.fp32_noise_agreement`). Said by an int8 file that misses its score bar:
    below the bar's overall part, no recipe can be expected to meet it; above it, how many times more than the
    input's rounding the int8 file moves the score. Computed once per export (ONNX and ``.pte`` share it),
    only on a miss.

    Measured on bench-export-real's runs (ONNX int8, their 300 check images): scenes keeps 95.7 % (median
    1.5 % of the threshold, below the bar), where its int8 file moved the score by 3.7 %; reef 99.3 % (0.5 %)
    against 4.7 % (9x) and salmon 98.7 % (0.3 %) against 3.0 % (10x): there the int8 file, not the model, is short.
    """
    if "noise" not in ctx.unknown_probe:
        from torch.utils.data import TensorDataset

        from fieldid.training.evaluate import noisy_answers

        spec = ctx.record.preprocess_spec
        images = TensorDataset(torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.zeros(len(x)))
        _, scores = noisy_answers(ctx.model, images, (spec.mean, spec.std), lambda out: out[1].float().reshape(-1),
                                  max_images=None, batch_size=_BATCH)
        ctx.unknown_probe["noise"] = scores.numpy()
    noisy = ctx.unknown_probe["noise"]
    kept = float(((noisy > threshold) == (ref > threshold)).mean())
    return kept, float(np.median(np.abs(noisy - ref)) / threshold)


def int8_unknown_parts_met(clear_agreement: float, decision_agreement: float, median_over_threshold: float) -> int:
    """How many of the int8 ``unknown_score`` bar's three parts (module doc) these numbers meet (3 = passed)."""
    return (int(clear_agreement >= INT8_MIN_DECISION_AGREEMENT) + int(decision_agreement >= INT8_MIN_OVERALL_AGREEMENT)
            + int(median_over_threshold <= INT8_MAX_MEDIAN_REL_DIFF))


def int8_unknown_bar(got: np.ndarray, ref: np.ndarray, threshold: float) -> dict[str, Any]:
    """The int8 ``unknown_score`` bar (module doc) on scores ``got`` vs fp32 ``ref``.

    Returns:
        ``{"passed", "clear_images", "clear_agreement", "decision_agreement", "median_diff_over_threshold"}``.

    Example:
        >>> int8_unknown_bar(np.array([1.0, 2.1, 5.0]), np.array([1.0, 1.9, 5.0]), 2.0)["passed"]
        False
    """
    same = (got > threshold) == (ref > threshold)
    clear = np.abs(ref - threshold) > INT8_THRESHOLD_BAND * threshold
    clear_agree = float(same[clear].mean()) if clear.any() else 1.0
    overall = float(same.mean())
    median = float(np.median(np.abs(got - ref)) / threshold)
    return {"passed": int8_unknown_parts_met(clear_agree, overall, median) == 3,
            "clear_images": int(clear.sum()), "clear_agreement": clear_agree, "decision_agreement": overall,
            "median_diff_over_threshold": median}


def verify_unknown(ctx: ExportContext, file: str, format: str, precision: str) -> dict[str, Any]:
    """Run the written file's ``unknown_score`` output and compare it with PyTorch's (see module doc)."""
    threshold = float(ctx.record.unknown["threshold"])
    x, ref = reference_scores(ctx)
    with converting(format, doing=f"reading {UNKNOWN_OUTPUT} out of {file}"):
        got = load_unknown_runtime(ctx.stage / file, format)(x)
    n_in = check_photos(ctx)
    diff = np.abs(got - ref)
    agree = float(((got > threshold) == (ref > threshold)).mean())
    rel = float(diff.max() / threshold)
    # A score within the fp32 tolerance of the threshold is a float tie: either decision is the model's.
    # The threshold is a quantile of the val photos' scores, so one of them can sit exactly on it.
    tie = np.abs(ref - threshold) <= FP32_MAX_REL_DIFF * threshold
    if precision == "fp32":
        passed = rel <= FP32_MAX_REL_DIFF and bool(((got > threshold) == (ref > threshold))[~tie].all())
        bar = (f"max |score diff| <= {FP32_MAX_REL_DIFF:g} x threshold and 100% identical unknown decisions "
               f"(a score within that of the threshold may go either way)")
    else:
        int8 = int8_unknown_bar(got, ref, threshold)
        passed = int8["passed"]
        bar = (f"unknown decisions agree with fp32 on >= {INT8_MIN_DECISION_AGREEMENT:.0%} of the images scored more "
               f"than {INT8_THRESHOLD_BAND:.0%} of the threshold away from it and on >= "
               f"{INT8_MIN_OVERALL_AGREEMENT:.0%} of all; median |score diff| <= {INT8_MAX_MEDIAN_REL_DIFF:.0%} "
               f"of the threshold")
    result = {
        "status": "passed" if passed else "failed", "bar": bar, "output": UNKNOWN_OUTPUT,
        "threshold": threshold, "num_images": int(len(x)), "heldout_images": n_in,
        "generated_unknown_images": int(len(x) - n_in), "max_abs_score_diff": float(diff.max()),
        "max_diff_over_threshold": rel, "median_abs_score_diff": float(np.median(diff)),
        "decision_agreement": agree, "threshold_ties": int(tie.sum()),
        **({"clear_images": int8["clear_images"], "clear_agreement": int8["clear_agreement"]}
           if precision != "fp32" else {}),
        "heldout_flagged": float((got[:n_in] > threshold).mean()),
        "generated_flagged": float((got[n_in:] > threshold).mean()),
    }
    if not passed:
        clear = (f", {result['clear_agreement']:.2%} on the {result['clear_images']} images clear of the threshold"
                 if "clear_agreement" in result else "")
        median = result["median_abs_score_diff"] / threshold
        why = ""
        if precision != "fp32":
            from fieldid.training.evaluate import NOISE_GREY_LEVELS

            kept, noise_median = fp32_noise_decisions(ctx, x, ref, threshold)
            result.update(fp32_noise_decision_agreement=kept, fp32_noise_median_diff_over_threshold=noise_median)
            why = (f"; the fp32 model itself keeps {kept:.1%} of these decisions when each pixel moves by up to "
                   f"{NOISE_GREY_LEVELS:g} grey level (median |diff| {noise_median:.1%} of the threshold)")
            if kept < INT8_MIN_OVERALL_AGREEMENT:
                why += (f", below the bar's {INT8_MIN_OVERALL_AGREEMENT:.0%}: no int8 recipe can be expected to meet "
                        f"it on this model")
            elif median >= 1.5 * noise_median:  # the file, not the model, is short (a ratio near 1 tells nothing)
                why += f": the int8 file moves the score {median / max(noise_median, 1e-12):.0f}x as much"
        ctx.failures.append(f"{file} {UNKNOWN_OUTPUT} missed its bar: decision agreement {agree:.2%}{clear}, "
                            f"median |diff| {median:.1%} and max {rel:.2%} of the threshold{why}")
    log.info("verified %-22s unknown_score: max|diff| %.2e (%.3f%% of threshold), decisions agree %.4f  %s",
             file, diff.max(), rel * 100, agree, result["status"])
    return result


def manifest_unknown(record: Any) -> dict[str, Any]:
    """The manifest's ``unknown`` dict: the run's detector record minus its file name ({} = none)."""
    return {k: v for k, v in (record.unknown or {}).items() if k != "file"}


def score_only_nodes(path: str | Path) -> list[str]:
    """Names of the ONNX nodes that only the ``unknown_score`` output depends on (not the logits).

    int8 quantization leaves them in float: they are a handful of matmuls and reductions on the
    pooled features (no measurable speed cost), and quantizing their activations moved the score
    by ~10% of the threshold where the logits barely moved.
    """
    import onnx

    g = onnx.load(str(path)).graph
    if UNKNOWN_OUTPUT not in [o.name for o in g.output]:
        return []
    producer = {out: n for n in g.node for out in n.output}
    needed = upstream_names([producer["logits"]] if "logits" in producer else [],
                            lambda n: [producer[i] for i in n.input if i in producer])
    return [n.name for n in g.node if n.name not in needed]


def upstream_names(roots: list[Any], parents: Callable[[Any], list[Any]]) -> set[str]:
    """``.name`` of ``roots`` and of every graph node they depend on (ONNX or torch.fx nodes alike)."""
    needed: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.name in needed:
            continue
        needed.add(node.name)
        stack.extend(parents(node))
    return needed
