"""The "unknown" answer: a feature-space distance that flags photos unlike anything trained on.

Softmax confidence is high on things outside the classes (a colour gradient got "Yellowtail
snapper, 100%"), so the fallback threshold never fires for what the model has never seen. The
detector here measures how far an image's *penultimate features* (the input of the fine-tuned
classifier head) lie from the nearest class mean, in the Mahalanobis metric of one covariance
shared by all classes:

    unknown_score(x) = min_c || W (f(x) - mu_c) ||^2 / D

* ``f`` is the fine-tuned network's pooled feature vector (dimension ``D``), L2-normalised
  (measured: normalising keeps bright / high-contrast inputs from looking "far" only because
  their activations are large — see ``fieldid bench --ood``).
* ``mu_c`` are the class means of the *training* features (eval preprocessing, no augmentation).
* ``W = Sigma^-1/2`` whitens with the shared covariance, shrunk towards a scaled identity by the
  Ledoit-Wolf rule (a few hundred images cannot estimate a 1280 x 1280 covariance alone), kept
  as its top principal directions plus an isotropic rest (see :class:`UnknownDetector`).
  Folding the covariance into projections turns the score into matmuls, subtractions and a min, which
  every format (ONNX, ExecuTorch, TorchScript, Core ML) expresses natively, so the score runs
  *inside* each artifact and a phone needs only one comparison.
* The threshold is fitted on the held-out *validation* split (never on training features, which
  sit closer to their means than new photos do): a high percentile of the in-distribution
  scores, so a known percentage of known-class photos is still answered on device.

The run records the detector as ``RUN/unknown.pth`` (buffers) and ``run.json``'s ``unknown``
dict (threshold, method, how it was fitted). :class:`ScoredModel` wraps a run's model into one
module with the outputs ``(logits, unknown_score)``; exporters trace that.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fieldid.cli_common import first_line

from .models import ModelError, classifier_modules
from .records import RunRecord, atomic_write_bytes

__all__ = [
    "UNKNOWN_FILE",
    "ACCEPT_QUANTILE",
    "UnknownDetector",
    "ScoredModel",
    "split_head",
    "extract_features",
    "fit_detector",
    "fit_threshold",
    "fit_run_detector",
    "load_detector",
    "scored_model",
    "baseline_scores",
    "model_version",
    "refit_run_detector",
]

log = logging.getLogger("fieldid.ood")

UNKNOWN_FILE = "unknown.pth"
# Share of held-out in-distribution photos that must stay below the threshold. The goal is >= 95%
# answered on device; the last 1.5 points are the margin for val-vs-test and int8 drift.
ACCEPT_QUANTILE = 0.985
METHOD = "mahalanobis"
DEFAULT_RANK = 256


class UnknownDetector(nn.Module):
    """Nearest-class-mean Mahalanobis distance: ``features (N, D) -> score (N,)``.

    The shared covariance is kept as its top ``k`` principal directions ``V`` (D, k) with
    their variances, plus one isotropic variance for everything else (the shrunk covariance's
    tail is nearly flat, so this loses little and keeps the buffers at ``D*k`` numbers instead
    of ``D*D`` — 0.3 M instead of 1.6 M for MobileNetV2's 1280 features). Then

        d^T Sigma^-1 d = rest * |d|^2 + sum_k weights_k * (V_k . d)^2,
        rest = 1 / isotropic variance,  weights_k = 1 / variance_k - rest,

    for ``d = f - mu_c``; all matmuls, subtractions, sums and a min.

    Args:
        basis: ``(D, k)`` orthonormal principal directions.
        weights: ``(k,)`` as above.
        rest: scalar as above.
        means: ``(C, D)`` class means.
        normalize: L2-normalise the features first (the means were fitted on normalised ones).

    Example:
        >>> det = UnknownDetector(torch.eye(2)[:, :1], torch.zeros(1), torch.tensor(1.0),
        ...                       torch.tensor([[1.0, 0.0]]), normalize=False)
        >>> det(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
        [0.0, 1.0]
    """

    def __init__(self, basis: torch.Tensor, weights: torch.Tensor, rest: torch.Tensor, means: torch.Tensor, *,
                 normalize: bool = True) -> None:
        super().__init__()
        self.register_buffer("basis", basis.float().contiguous())
        self.register_buffer("weights", weights.float().reshape(-1).contiguous())
        self.register_buffer("rest", rest.float().reshape(()))
        self.register_buffer("means", means.float().contiguous())
        self.register_buffer("mean_proj", (means.double() @ basis.double()).float().contiguous())
        self.normalize = bool(normalize)
        self.feature_dim = int(basis.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.flatten(1)
        if self.normalize:
            # x / sqrt(sum x^2 + eps) instead of F.normalize: plain ops every converter knows.
            f = f / torch.sqrt((f * f).sum(dim=1, keepdim=True) + 1e-12)
        # Direct differences, not |f|^2 - 2 f.mu + |mu|^2: that form cancels badly in fp16 / int8.
        d = f.unsqueeze(1) - self.means.unsqueeze(0)  # (N, C, D)
        p = torch.matmul(f, self.basis).unsqueeze(1) - self.mean_proj.unsqueeze(0)  # (N, C, k)
        d2 = self.rest * (d * d).sum(dim=2) + (p * p * self.weights).sum(dim=2)  # (N, C)
        return torch.amin(d2, dim=1) / float(self.feature_dim)


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Split a classifier into ``(body, head)`` with ``head(body(x)) == model(x)``.

    The head (the final ``nn.Linear``) is replaced by ``nn.Identity`` *inside* ``model``, so
    ``body`` is ``model`` itself and returns the penultimate features. Mutates ``model``.

    Raises:
        ValueError: the model has several heads or one that is not a single ``nn.Linear``
            (a distilled LeViT averages two heads): there is no one feature vector to measure.
    """
    heads = classifier_modules(model)
    if len(heads) != 1 or not isinstance(heads[0][1], nn.Linear):
        raise ValueError(f"unknown detector needs one linear head; this model has {[n for n, _ in heads]}")
    name, head = heads[0]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return model, head


class ScoredModel(nn.Module):
    """One forward pass, two outputs: ``(logits, unknown_score)`` — what every artifact exports.

    Example:
        >>> from fieldid.training.models import create_model, example_input
        >>> m = create_model("mobilenet_v2", 3, pretrained=False)
        >>> det = UnknownDetector(torch.eye(1280)[:, :4], torch.ones(4), torch.tensor(1.0), torch.zeros(3, 1280))
        >>> logits, score = ScoredModel(m, det)(example_input("mobilenet_v2", 64))
        >>> tuple(logits.shape), tuple(score.shape)
        ((1, 3), (1,))
    """

    def __init__(self, model: nn.Module, detector: UnknownDetector) -> None:
        super().__init__()
        self.body, self.head = split_head(model)
        self.detector = detector

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: A002 - ONNX input name
        features = self.body(input)
        return self.head(features), self.detector(features)


@torch.no_grad()
def extract_features(body: nn.Module, head: nn.Linear, dataset: Any, *, batch_size: int = 64,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penultimate features, logits and targets of every item of ``dataset`` (a counted progress line).

    Returns:
        ``(features (N, D), logits (N, C), targets (N,))``.
    """
    from torch.utils.data import DataLoader

    body.eval()
    feats, logits, ys = [], [], []
    total = len(dataset)
    done = 0
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        f = body(x).flatten(1).float()
        feats.append(f)
        logits.append(head(f))
        ys.append(torch.as_tensor(y))
        done += len(x)
        log.info("unknown detector: %s %d/%d images", desc, done, total)
    if not feats:
        return torch.empty(0, head.in_features), torch.empty(0, head.out_features), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(logits), torch.cat(ys).long()


def _ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (N, D) and the shrinkage used.

    ``Sigma = (1 - a) S + a (tr(S) / D) I`` with ``a`` estimated from the data (Ledoit & Wolf
    2004), the same estimate as scikit-learn's ``ledoit_wolf`` (not a dependency here).
    """
    x = x.double()
    n, d = x.shape
    s = x.T @ x / n
    mu = torch.trace(s) / d
    delta = ((s - mu * torch.eye(d, dtype=x.dtype)) ** 2).sum() / d
    x2 = x * x
    beta_ = ((x2.T @ x2).sum() / n - (s * s).sum()) / (d * n)
    beta = torch.minimum(beta_, delta)
    shrink = float(beta / delta) if delta > 0 else 1.0
    return (1 - shrink) * s + shrink * mu * torch.eye(d, dtype=x.dtype), shrink


def fit_detector(features: torch.Tensor, targets: torch.Tensor, num_classes: int, *,
                 normalize: bool = True, rank: int = DEFAULT_RANK) -> tuple[UnknownDetector, dict[str, Any]]:
    """Class means and shared shrunk covariance of training features -> :class:`UnknownDetector`.

    Args:
        features: ``(N, D)`` penultimate training features (eval preprocessing).
        targets: ``(N,)`` class indices.
        num_classes: number of classes (a class without training images gets no mean).
        normalize: L2-normalise features first.
        rank: principal directions kept exactly; the rest share their mean variance.

    Returns:
        The detector and a record of how it was fitted (images, dimension, shrinkage).
    """
    f = features.double()
    if normalize:
        f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)
    present = [c for c in range(num_classes) if bool((targets == c).any())]
    means = torch.stack([f[targets == c].mean(0) for c in present])
    centred = f - means[torch.searchsorted(torch.tensor(present), targets)]
    cov, shrink = _ledoit_wolf(centred)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals = evals.clamp_min(float(evals.max()) * 1e-9)
    k = max(1, min(rank, len(evals) - 1))
    top, basis = evals[-k:], evecs[:, -k:]
    rest = 1.0 / evals[:-k].mean()
    det = UnknownDetector(basis, 1.0 / top - rest, rest, means, normalize=normalize)
    kept = float(top.sum() / evals.sum())
    info = {"train_images": int(len(f)), "feature_dim": int(f.shape[1]), "classes_with_mean": len(present),
            "principal_directions": k, "variance_in_principal_directions": round(kept, 4),
            "shrinkage": round(shrink, 6), "covariance": "shared, Ledoit-Wolf shrunk towards a scaled identity; "
                                                        "top principal directions exact, the rest isotropic",
            "features": "penultimate (classifier-head input), L2-normalised" if normalize else "penultimate"}
    return det, info


def fit_threshold(scores: torch.Tensor, *, quantile: float = ACCEPT_QUANTILE) -> tuple[float, str]:
    """The score below which ``quantile`` of held-out in-distribution photos fall, and the rule text.

    The order statistic is taken with "higher" interpolation (an actual observed score), then
    nudged up by one part in 10^6 so that very photo stays accepted after a float round trip.
    """
    s = scores.double().flatten()
    if s.numel() == 0:
        raise ValueError("no held-out scores to fit the unknown threshold on")
    k = min(len(s) - 1, max(0, math.ceil(quantile * len(s)) - 1))
    value = float(s.sort().values[k]) * (1 + 1e-6)
    rule = (f"{quantile:.1%} of the {len(s)} held-out in-distribution photos score at or below it "
            f"(order statistic {k + 1} of {len(s)})")
    return value, rule


def baseline_scores(logits: torch.Tensor, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Logit-only unknown scores (higher = more unknown) the detector is compared with in the bench.

    ``energy`` = -T logsumexp(z / T); ``max_logit`` = -max z; ``softmax`` = -max softmax(z / T).
    """
    z = logits.double()
    return {"energy": -temperature * torch.logsumexp(z / temperature, dim=1),
            "max_logit": -z.max(dim=1).values,
            "softmax": -(z / temperature).softmax(1).max(dim=1).values}


def _write_detector(det: UnknownDetector, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in det.state_dict().items() if k != "mean_proj"}
               | {"normalize": torch.tensor(det.normalize)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def fit_run_detector(model: nn.Module, train_ds: Any, heldout_ds: Any, out: Path, *, heldout_name: str,
                     num_classes: int, quantile: float = ACCEPT_QUANTILE,
                     features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Fit the detector on training features, its threshold on held-out ones; write ``unknown.pth``.

    Args:
        model: the fine-tuned model (not modified: a copy is split).
        train_ds: training images with *eval* preprocessing.
        heldout_ds: the validation images (the threshold is fitted on them).
        out: the run directory.
        heldout_name: which split ``heldout_ds`` is (recorded).
        num_classes: number of classes.
        quantile: share of held-out in-distribution photos to accept.
        features: ``(training features, their targets, held-out features)`` of ``model``'s body on
            these photos when already computed (a run that ships its probe has them from its head
            phase); the two feature passes are then skipped.

    Returns:
        The ``unknown`` dict for ``run.json`` (``{}`` when the model has no single linear head).
    """
    import copy

    try:
        body, head = split_head(copy.deepcopy(model).eval())
    except ValueError as e:
        log.warning("no unknown detector: %s", e)
        return {}
    if features is None:
        f_train, _, y_train = extract_features(body, head, train_ds, desc="training features")
        f_val, _, _ = extract_features(body, head, heldout_ds, desc=f"{heldout_name} features")
    else:
        f_train, y_train, f_val = features
        log.info("unknown detector: the head phase's features of %d training and %d %s photos (the shipped "
                 "probe's own backbone)", len(f_train), len(f_val), heldout_name)
    det, info = fit_detector(f_train, y_train, num_classes)
    with torch.no_grad():
        val_scores = det(f_val)
    threshold, rule = fit_threshold(val_scores, quantile=quantile)
    _write_detector(det, out / UNKNOWN_FILE)
    record = {"method": METHOD, "threshold": threshold, "file": UNKNOWN_FILE, "output": "unknown_score",
              "fitted_on": f"{heldout_name} split ({len(val_scores)} images); means and covariance on the "
                           f"training split ({info['train_images']} images)",
              "threshold_rule": rule, "accept_quantile": quantile,
              "score": "min over classes of the squared Mahalanobis distance of the features to the class "
                       "mean, divided by the feature dimension; higher = more unknown; score > threshold = unknown",
              "heldout_score_median": float(val_scores.median()), **info}
    log.info("unknown detector: %s, threshold %.4f (%s)", METHOD, threshold, rule)
    return record


def load_detector(run_dir: str | Path, record: RunRecord) -> UnknownDetector | None:
    """The run's detector from ``unknown.pth``, or ``None`` for a run without one (older runs)."""
    if not record.unknown:
        return None
    path = Path(run_dir) / record.unknown.get("file", UNKNOWN_FILE)
    if not path.is_file():
        raise ModelError(f"{path}: missing (run.json names an unknown detector); retrain, or restore the file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        normalize = bool(sd.pop("normalize", torch.tensor(True)))
        return UnknownDetector(sd["basis"], sd["weights"], sd["rest"], sd["means"], normalize=normalize).eval()
    except Exception as e:  # noqa: BLE001 - torch.load's errors on a damaged file, a dict without the keys
        raise ModelError(f"{path}: not a fieldid unknown detector (corrupt or truncated?): {type(e).__name__}: "
                         f"{first_line(e)[:160]}") from None


def scored_model(run_dir: str | Path, record: RunRecord, model: nn.Module) -> nn.Module:
    """``ScoredModel(model, detector)`` when the run has a detector, else ``model`` unchanged."""
    det = load_detector(run_dir, record)
    if det is None:
        return model
    scored = ScoredModel(model, det)  # split_head detaches the head from model: split once
    if scored.head.in_features != det.feature_dim:
        # A detector fitted on another network's features (model.pth replaced, a copied run): its
        # matmuls would fail deep inside an exporter; say which files disagree instead.
        raise ModelError(f"{Path(run_dir) / record.unknown.get('file', UNKNOWN_FILE)} was fitted on "
                         f"{det.feature_dim}-dim features but model.pth gives {scored.head.in_features}: the detector "
                         f"belongs to another model (retrain, or refit it with "
                         f"fieldid.training.ood.refit_run_detector)")
    return scored.eval()


def model_version(run_dir: str | Path, record: RunRecord) -> str:
    """The run's model identity: sha256 prefix over ``model.pth`` and (when present) ``unknown.pth``.

    Device artifacts, the server and ``predict`` all report it, so two answers can be compared.
    """
    import hashlib

    from .records import file_sha256

    parts = [file_sha256(Path(run_dir) / record.weights)]
    if record.unknown:
        parts.append(file_sha256(Path(run_dir) / record.unknown.get("file", UNKNOWN_FILE)))
    return hashlib.sha256("+".join(parts).encode()).hexdigest()[:16]


def refit_run_detector(run_dir: str | Path, *, quantile: float = ACCEPT_QUANTILE) -> RunRecord:
    """Fit (or refit) the detector of a finished run from its own split; updates ``run.json``.

    For runs trained before the detector existed, or to refit with another ``quantile``;
    export the run again afterwards so its artifacts get the ``unknown_score`` output.
    """
    from .data import CachedImageDataset, ImageCache, eval_transform, load_split
    from .records import load_record
    from .models import fast_layout, load_run_model

    run_dir = Path(run_dir)
    record = load_record(run_dir)
    spec = record.preprocess_spec
    split = load_split(run_dir / record.split)
    name = "val" if split.paths("val") else "train"

    def dataset(part: str) -> CachedImageDataset:
        cache = ImageCache(split.paths(part), split.targets(part), resize_size=spec.resize_size,
                           interpolation=spec.interpolation, desc=part)
        return CachedImageDataset(cache, eval_transform(spec, from_cache=True))

    model = fast_layout(load_run_model(run_dir, record))
    record.unknown = fit_run_detector(model, dataset("train"), dataset(name), run_dir, heldout_name=name,
                                      num_classes=record.num_classes, quantile=quantile)
    record.model_version = model_version(run_dir, record)
    record.to_json(run_dir / "run.json")
    return record
