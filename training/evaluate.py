"""Metrics, plots and ``fieldid evaluate`` (a finished run scored on its held-out split or any folder)."""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from fieldid.cli_common import check_output_file, first_line

from .calibrate import expected_calibration_error
from .data import CachedImageDataset, ImageCache, eval_transform, load_split
from .images import DataError
from .models import fast_layout, load_run_model
from .records import atomic_write_bytes, atomic_write_json, load_record
from .rundir import RunError

__all__ = ["predict_logits", "top1", "noisy_answers", "noise_stability", "batchnorm_hint", "NOISE_GREY_LEVELS",
           "NOISE_MAX_IMAGES", "coverage_curve", "compute_metrics", "plot_confusion", "plot_curves", "evaluate"]

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, *, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for every item of ``dataset`` (model in eval mode)."""
    model = model.eval().to(device)
    outs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        outs.append(model(x.to(device)).float().cpu())
        ys.append(torch.as_tensor(y))
    if not outs:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(ys).long()


# Pixel noise of the check below: every pixel moved by up to half a grey level of 255 at the model's
# input size -- about what rounding the input to int8 does alone (uint8 steps over the normalised
# range, -2.1 to 2.6, are 1.07 grey levels). A model that changes answers under it hinges on detail
# nobody can see, and rarely keeps 99 % of its answers in an int8 file (docs/training.md).
NOISE_GREY_LEVELS = 0.5
# At most this many photos, spread evenly over the split (two answers may move under a 99 % bar): a
# 224-px pass over 300 photos cost elpv_few's run 9 s of its 56 (its 656 test photos sit beside 56
# training ones), against the 3x-the-reference time goal on a reference of 18-20 s.
NOISE_MAX_IMAGES = 200


def batchnorm_hint(batchnorm: dict[str, Any] | None) -> str:
    """What to change when a model's answers give way under pixel noise and the run re-estimated its
    BatchNorm statistics (``metrics.json`` ``training.baselines.batchnorm``); ``""`` otherwise. Said by
    the run's noise check and by an export whose int8 file then misses its bar.

    Re-estimated statistics are the ones the benchmark's less steady models had: over three seeds the
    default elpv_few, scenes, faces and textures models kept 65-100 % of their answers, every ``frozen``
    one 96.7 % or more (docs/measured/bench-real-batchnorm-seeds.md). It is the statistics, not the
    fine-tuning: on that page's scenes rows the default runs that shipped the linear probe (seeds 1 and
    2, the pretrained backbone on re-estimated statistics) kept 88.6 % and 89.5 %, the seed-0 fine-tune
    87.6 %, the ``frozen`` runs that shipped the probe 100 % and 97.1 %.

    Example:
        >>> "--batchnorm frozen" in batchnorm_hint({"used": "re-estimated"}), batchnorm_hint({"used": "pretrained"})
        (True, '')
    """
    if (batchnorm or {}).get("used") != "re-estimated":
        return ""
    return ("the run re-estimated its BatchNorm statistics on the training photos, which made the benchmark's "
            "models less steady: retraining with --batchnorm frozen keeps the pretrained ones, at some accuracy "
            "on three of its sets")


def top1(out: Any) -> torch.Tensor:
    """The answer of a model output: top-1 of the logits (``(logits, unknown_score)`` is judged by its logits)."""
    return (out[0] if isinstance(out, tuple) else out).float().argmax(1)


@torch.no_grad()
def noisy_answers(model: nn.Module, dataset: Dataset, mean_std: tuple[Sequence[float], Sequence[float]],
                  answer: Callable[[Any], torch.Tensor] = top1, *, grey_levels: float = NOISE_GREY_LEVELS,
                  max_images: int | None = NOISE_MAX_IMAGES, seed: int = 0,
                  batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, answers)``: ``answer(model(x + noise))`` on at most ``max_images`` of ``dataset``'s items,
    evenly spaced (``None``: all), every pixel moved by uniform noise of up to ``grey_levels`` of 255
    (seeded, so a run is reproducible). ``mean_std``: the normalisation the dataset applied (the noise
    is added to normalised tensors, in pixel units). The one noise pass of :func:`noise_stability` and
    of the export's check of its ``unknown_score`` decisions.
    """
    model = model.eval()
    total = len(dataset)  # type: ignore[arg-type]
    idx = torch.linspace(0, total - 1, min(total, max_images or total)).round().long().unique()
    std = torch.tensor(mean_std[1], dtype=torch.float32).view(1, -1, 1, 1)
    gen = torch.Generator().manual_seed(seed)
    answers = []
    for x, _ in DataLoader(Subset(dataset, idx.tolist()), batch_size=batch_size, shuffle=False):
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1) * (grey_levels / 255.0) / std
        answers.append(answer(model(x + noise)))
    return idx, (torch.cat(answers) if answers else torch.empty(0))


def noise_stability(model: nn.Module, dataset: Dataset, logits: torch.Tensor,
                    mean_std: tuple[Sequence[float], Sequence[float]], *, grey_levels: float = NOISE_GREY_LEVELS,
                    max_images: int | None = NOISE_MAX_IMAGES, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Share of ``dataset``'s answers (``logits``: the model's clean ones) unchanged under pixel noise
    (:func:`noisy_answers`). A model with the outputs ``(logits, unknown_score)`` (``ood.ScoredModel``)
    is judged by its logits. Returns ``{"grey_levels", "unchanged", "images"}``.
    """
    idx, answers = noisy_answers(model, dataset, mean_std, grey_levels=grey_levels, max_images=max_images,
                                 seed=seed, batch_size=batch_size)
    n = int(idx.numel())
    same = float((answers == logits[idx].argmax(1)).float().mean()) if n else 1.0
    return {"grey_levels": grey_levels, "unchanged": same, "images": n}


def coverage_curve(confidence: torch.Tensor, correct: torch.Tensor, steps: int = 20) -> list[list[float]]:
    """``[[share, accuracy], ...]``: for ``k`` = 1/``steps`` .. all of the answers, the share a threshold at the
    ``k``-th highest confidence keeps and the accuracy of what it keeps -- what a fallback threshold can
    achieve on these photos (the risk-coverage curve of selective prediction). No threshold splits answers
    of equal confidence, so a tie at the cut is kept whole and the share can be larger than ``k``'s.

    Example:
        >>> coverage_curve(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([True, True, False, True]), steps=4)
        [[0.25, 1.0], [0.5, 1.0], [0.75, 0.6667], [1.0, 0.75]]
        >>> coverage_curve(torch.tensor([0.9, 0.8, 0.8, 0.6]), torch.tensor([True, True, False, True]), steps=4)
        [[0.25, 1.0], [0.75, 0.6667], [1.0, 0.75]]
    """
    n = int(confidence.numel())
    out: list[list[float]] = []
    if not n:
        return out
    for i in range(1, steps + 1):
        k = max(1, math.ceil(n * i / steps - 1e-9))
        kept = confidence >= torch.topk(confidence, k).values[-1]
        point = [round(int(kept.sum()) / n, 4), round(float(correct[kept].float().mean()), 4)]
        if not out or out[-1] != point:
            out.append(point)
    return out


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, labels: Sequence[str], *,
                    temperature: float = 1.0, fallback_threshold: float | None = None,
                    fallback_target: float | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class P/R/F1, top-k, confusion matrix and ECE (raw and calibrated).

    With ``fallback_threshold``, also ``fallback``: the share of photos whose calibrated top-1
    probability is below it (the phone asks the server about those; photos flagged unknown add to
    them), the accuracy of the answers kept on the device, the :func:`coverage_curve` of these photos
    (how right the phone could be at each share it keeps) and ``fallback_target``, the accuracy the
    threshold was chosen to keep (``target_accuracy``, when given).

    Example:
        >>> m = compute_metrics(torch.eye(2) * 5, torch.tensor([0, 1]), ["a", "b"])
        >>> m["accuracy"], m["macro_f1"]
        (1.0, 1.0)
    """
    k = len(labels)
    n = int(targets.numel())
    pred = logits.argmax(1)
    cm = torch.zeros(k, k, dtype=torch.long)
    for t, p in zip(targets.tolist(), pred.tolist()):
        cm[t, p] += 1
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for i, name in enumerate(labels):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1s.append(f1)  # macro over classes present in this split
    top_k = {}
    for kk in sorted({1, min(3, k), min(5, k)}):
        topk = logits.topk(kk, dim=1).indices
        top_k[f"top{kk}"] = float((topk == targets[:, None]).any(1).float().mean()) if n else 0.0
    probs_raw = logits.softmax(1)
    probs_cal = (logits / temperature).softmax(1)
    extra: dict[str, Any] = {}
    if fallback_threshold is not None:
        confidence = probs_cal.max(1).values
        kept = confidence >= fallback_threshold
        extra["fallback"] = {
            "threshold": fallback_threshold,
            "sent_to_server": float(1.0 - kept.float().mean()) if n else 0.0,
            "kept_accuracy": float((pred[kept] == targets[kept]).float().mean()) if int(kept.sum()) else None,
            "coverage_curve": coverage_curve(confidence, pred == targets),
            **({"target_accuracy": fallback_target} if fallback_target is not None else {}),
        }
    return {
        "num_images": n,
        "accuracy": float((pred == targets).float().mean()) if n else 0.0,
        "macro_f1": float(sum(f1s) / len(f1s)) if f1s else 0.0,
        "top_k": top_k,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "labels": list(labels),
        "temperature": temperature,
        "ece_raw": expected_calibration_error(probs_raw, targets) if n else 0.0,
        "ece_calibrated": expected_calibration_error(probs_cal, targets) if n else 0.0,
        "nll_raw": float(nn.functional.cross_entropy(logits, targets)) if n else 0.0,
        "nll_calibrated": float(nn.functional.cross_entropy(logits / temperature, targets)) if n else 0.0,
        **extra,
    }


def _save_fig(fig: Any, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def plot_confusion(metrics: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.tensor(metrics["confusion_matrix"], dtype=torch.float)
    labels = metrics["labels"]
    norm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j] > 0:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    out = _save_fig(fig, Path(path))
    plt.close(fig)
    return out


def plot_curves(metrics_csv: str | Path, path: str | Path) -> Path | None:
    """Training curves (loss, val accuracy / macro-F1) from Lightning's CSV log."""
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv) as fh:
        for row in csv.DictReader(fh):
            epoch = row.get("epoch")
            if epoch in (None, ""):
                continue
            for key in ("train_loss", "val_loss", "val_acc", "val_macro_f1"):
                if row.get(key) not in (None, ""):
                    series.setdefault(key, []).append((float(epoch), float(row[key])))
    if not series:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if key in series:
            xs, ys = zip(*series[key])
            a1.plot(xs, ys, marker="o", label=key)
    for key in ("val_acc", "val_macro_f1"):
        if key in series:
            xs, ys = zip(*series[key])
            a2.plot(xs, ys, marker="o", label=key)
    for ax, title in ((a1, "loss"), (a2, "validation")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    out = _save_fig(fig, Path(path))
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- fieldid evaluate
def _other_metrics_name(data: Path) -> str:
    """``metrics-<folder>.json`` for a folder that is not the run's dataset (safe file-name characters only)."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", data.name).strip("._") or "data"
    return f"metrics-{stem}.json"


def _check_out(target: Path, run_dir: Path, record: Any, own: bool) -> None:
    """Bad ``--out`` before any work: a folder (or a file on its way), or an existing file that is not a metrics file
    (``--out RUN/model.pth`` replaced the model it evaluates; ``--out BUNDLE/manifest.json`` a bundle)."""
    check_output_file(target, "--out")
    if os.path.realpath(target) == os.path.realpath(run_dir / record.metrics) and not own:
        raise RunError(f"{target}: is the run's held-out metrics file; choose another --out")
    if target.is_file() and not _is_metrics_file(target):
        raise RunError(f"{target}: exists and is not a metrics file `fieldid evaluate` wrote; choose another --out "
                       "(it would be replaced)")


def _is_metrics_file(path: Path) -> bool:
    """A file :func:`evaluate` (or training) wrote: a JSON object with the held-out scores."""
    import json

    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and {"accuracy", "macro_f1", "per_class"} <= set(d)


def _training_block(previous: Path) -> Any:
    """The ``training`` block of the run's held-out metrics (what training recorded), None without one."""
    import json

    if not previous.is_file():
        return None
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{previous}: is not valid JSON ({first_line(e)}); restore it or remove it") from None
    return old.get("training") if isinstance(old, dict) else None


def _fallback_target(run_dir: Path, record: Any) -> float | None:
    """The accuracy the run's fallback threshold was chosen to keep (its ``config.yaml``), None when unreadable:
    the metrics then leave ``target_accuracy`` out, as older runs' do."""
    from .config import ConfigError, load_config

    try:
        return load_config(run_dir / record.config).fallback_target_accuracy
    except (OSError, ConfigError):
        return None


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, batch_size: int = 64,
             out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a finished run.

    ``data_dir`` resolution: a tree with ``test/`` -> that split; the run's own dataset ->
    its held-out test split (the split file is the truth, so no leakage); any other folder
    -> every image in it (class folders must be among the run's labels).

    Where it writes: the run's own held-out split -> ``RUN/metrics.json`` and the plots (the
    numbers export copies into the bundle); any other folder -> ``RUN/metrics-<folder>.json``
    and ``RUN/plots/confusion_matrix-<folder>.png``, never the run's held-out metrics.
    ``out`` names the metrics file instead. The returned dict carries ``metrics_file``.
    """
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    spec = record.preprocess_spec
    split = load_split(run_dir / record.split)
    index = {name: i for i, name in enumerate(record.labels)}
    data = Path(data_dir).resolve() if data_dir else Path(split.root)
    own = data == Path(split.root).resolve()
    if own:
        paths, targets, which = split.paths("test"), split.targets("test"), "test"
        if not paths:
            paths, targets, which = split.paths("val"), split.targets("val"), "val"
    else:
        from .images import scan_image_folder

        listing = scan_image_folder(data, min_classes=1)
        part = "test" if "test" in listing.splits else ("all" if "all" in listing.splits else "val")
        if part not in listing.splits:
            raise DataError(f"{data}: no test/ or val/ split to evaluate")
        unknown = sorted(set(listing.splits[part]) - set(index))
        if unknown:
            raise DataError(f"{data}: class folder(s) {', '.join(unknown)} not among the run's labels")
        paths, targets = [], []
        for name, files in listing.splits[part].items():
            paths += files
            targets += [index[name]] * len(files)
        which = part
    target = Path(out) if out is not None else run_dir / (record.metrics if own else _other_metrics_name(data))
    if out is not None:
        _check_out(target, run_dir, record, own)
    previous = run_dir / record.metrics
    training = _training_block(previous) if own else None  # read before the work: a damaged file fails first
    model = fast_layout(load_run_model(run_dir, record))  # a damaged model.pth says so before the photos are decoded
    cache = ImageCache(paths, targets, resize_size=spec.resize_size, interpolation=spec.interpolation)
    if len(cache) == 0:
        raise DataError(f"{data}: no readable images to evaluate")
    logits, y = predict_logits(model, CachedImageDataset(cache, eval_transform(spec)), batch_size=batch_size)
    metrics = compute_metrics(logits, y, record.labels, temperature=record.temperature,
                              fallback_threshold=record.fallback_threshold,
                              fallback_target=_fallback_target(run_dir, record))
    metrics.update({"split": which, "data": str(data), "skipped_unreadable": len(cache.skipped)})
    if training is not None:
        metrics["training"] = training
    atomic_write_json(target, metrics)
    suffix = "" if own and out is None else "-" + target.stem.removeprefix("metrics-")
    plot_confusion(metrics, run_dir / "plots" / f"confusion_matrix{suffix}.png", title=f"{run_dir.name} ({which})")
    if own and out is None:
        plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "curves.png")
    metrics["metrics_file"] = str(target)
    return metrics
