"""Finishing a run: the shipped model (fine-tuned, or the probe when it scored as high on val),
temperature, fallback threshold, held-out metrics, plots, the unknown detector and ``run.json``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .baselines import choose_shipped, load_probe_head, set_head, val_scores
from .calibrate import choose_fallback_threshold, fit_temperature
from .checkpoints import load_checkpoint, write_state_dict
from .clock import StepClock
from .config import TrainConfig
from .data import CachedImageDataset, Split, eval_transform
from .evaluate import batchnorm_hint, compute_metrics, noise_stability, plot_confusion, plot_curves, predict_logits
from .models import classifier_modules, create_model, fast_layout
from .probe import majority_scores, objective_key
from .records import RunRecord, atomic_write_json
from .samples import write_samples

__all__ = ["finalize"]

log = logging.getLogger("fieldid.train")


def noise_note(unchanged: float, batchnorm: dict[str, Any] | None) -> str:
    """What the noise check's log line adds when fewer than 99 % of the answers held: that int8 will not
    hold either, and what to change when the run re-estimated its BatchNorm statistics
    (:func:`~fieldid.training.evaluate.batchnorm_hint`).

    Example:
        >>> noise_note(0.995, {"used": "re-estimated"})
        ''
        >>> "--batchnorm frozen" in noise_note(0.9, {"used": "re-estimated"})
        True
        >>> "--batchnorm" in noise_note(0.9, {"used": "pretrained"})
        False
    """
    if unchanged >= 0.99:
        return ""
    hint = batchnorm_hint(batchnorm)
    return (" (below 99 %: an int8 file of this model rarely keeps 99 % of its answers"
            + (f"; {hint}" if hint else "") + "; docs/training.md)")


def _ship_better(model: torch.nn.Module, val_logits: torch.Tensor, val_y: torch.Tensor, cfg: TrainConfig, out: Path,
                 split: Split, val_dataset: Any) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The fine-tuned model, or the run's linear probe when that scored as high on val; logged beside the baselines."""
    n = len(split.labels)
    # Without pretrained weights the probe sat on a random backbone that cannot be made again.
    shipped, baselines = choose_shipped(val_scores(val_logits, val_y, n), out, cfg.objective,
                                        probe_shippable=cfg.pretrained)
    baselines.setdefault("majority", majority_scores(torch.tensor(split.targets("train")), val_y, n))
    if shipped == "probe":
        probe_model = fast_layout(create_model(cfg.model, n, pretrained=cfg.pretrained, weights_file=cfg.weights,
                                               dropout=cfg.dropout)).eval()
        _, head = classifier_modules(probe_model)[0]
        head_state = load_probe_head(out)
        set_head(head, head_state["weight"], head_state["bias"])
        # The BatchNorm statistics the probe was fitted under (re-estimated on the training photos).
        bn = {k[len("bn."):]: v for k, v in head_state.items() if k.startswith("bn.")}
        if bn:
            probe_model.load_state_dict(bn, strict=False)
        model = probe_model
        val_logits, _ = predict_logits(model, val_dataset)
    key = objective_key(cfg.objective)  # the score choose_shipped compared
    parts = [f"fine-tuned {baselines['fine_tuned'][key]:.4f}"]
    if "probe" in baselines:
        parts.append(f"linear probe {baselines['probe'][key]:.4f}")
    if "majority" in baselines:
        parts.append(f"always the commonest class {baselines['majority'][key]:.4f}")
    log.info("val %s: %s -> shipping the %s model", key.replace("_", " "), ", ".join(parts), shipped)
    if shipped == "probe" and baselines["fine_tuned"][key] == baselines["probe"][key]:
        log.info("the fine-tuned model tied the linear probe on val: the run ships the probe (pretrained backbone "
                 "+ fitted linear head), which moved fewer weights for the same score")
    elif shipped == "probe":
        log.warning("the fine-tuned model scored lower on val than the linear probe on its frozen backbone; "
                    "the run ships the probe (backbone + fitted linear head)")
    shipped_scores = val_scores(val_logits, val_y, n)
    if "majority" in baselines and shipped_scores["accuracy"] < baselines["majority"]["accuracy"]:
        log.error("the shipped model answers fewer val photos right (%.4f) than always answering the commonest "
                  "class (%.4f): check the labels and the data before using it", shipped_scores["accuracy"],
                  baselines["majority"]["accuracy"])
    return model, val_logits, baselines


def finalize(out: Path, record: RunRecord, cfg: TrainConfig, split: Split, datasets: dict, best_path: str, *,
              skipped: int, imbalance: dict, seconds: float, epochs_run: int, head_phase: dict,
              logit_offset: torch.Tensor | None = None,
              probe_features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              clock: StepClock) -> RunRecord:
    """Best weights (or the probe, when it scored as high on val) -> model.pth, temperature + fallback
    threshold + unknown detector on val, metrics on test.

    ``probe_features``: the head phase's training features, targets and val features (head.HeadPhase):
    when the probe ships, its unknown detector is fitted on them instead of a pass of its own.
    ``clock``: the run's step clock (train's steps so far); finalize adds its own and records them all.
    """
    spec = record.preprocess_spec
    ckpt = load_checkpoint(best_path)
    model = fast_layout(create_model(cfg.model, len(split.labels), pretrained=False, dropout=cfg.dropout))
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    model.eval()
    if logit_offset is not None:  # post-hoc logit adjustment ships inside the head's bias
        _, head = classifier_modules(model)[0]
        with torch.no_grad():
            head.bias.add_(logit_offset.to(head.bias))

    cal_name = "val" if len(datasets["val"]) else "train"
    val_logits, val_y = predict_logits(model, datasets[cal_name])
    model, val_logits, baselines = _ship_better(model, val_logits, val_y, cfg, out, split, datasets[cal_name])
    write_state_dict(model, out / record.weights)
    temperature = fit_temperature(val_logits, val_y)
    fallback = choose_fallback_threshold((val_logits / temperature).softmax(1), val_y,
                                         target_accuracy=cfg.fallback_target_accuracy,
                                         min_threshold=cfg.min_fallback_threshold)
    val_metrics = compute_metrics(val_logits, val_y, split.labels, temperature=temperature)
    atomic_write_json(out / "calibration.json", {
        "schema_version": 1, "fitted_on": cal_name, "temperature": temperature,
        "ece_raw": val_metrics["ece_raw"], "ece_calibrated": val_metrics["ece_calibrated"],
        "nll_raw": val_metrics["nll_raw"], "nll_calibrated": val_metrics["nll_calibrated"],
        "fallback_threshold": fallback.threshold, "fallback_rule": fallback.rule,
        "fallback_accepted_fraction": fallback.accepted_fraction,
        "fallback_accepted_accuracy": fallback.accepted_accuracy,
    })
    clock.lap(f"{cal_name} answers + calibration")
    eval_name = "test" if len(datasets["test"]) else cal_name
    logits, y = (val_logits, val_y) if eval_name == cal_name else predict_logits(model, datasets[eval_name])
    metrics = compute_metrics(logits, y, split.labels, temperature=temperature, fallback_threshold=fallback.threshold,
                              fallback_target=cfg.fallback_target_accuracy)
    clock.lap(f"{eval_name} answers" if eval_name != cal_name else "metrics")  # no second pass then
    metrics["noise_stability"] = noise_stability(model, datasets[eval_name], logits, (spec.mean, spec.std))
    clock.lap("noise check")
    metrics.update({"split": eval_name, "val": {k: val_metrics[k] for k in ("accuracy", "macro_f1")},
                    "training": {"seconds": round(seconds, 1), "epochs": epochs_run, "speed": head_phase,
                                 "skipped_unreadable": skipped, "imbalance": imbalance,
                                 "objective": cfg.objective, "baselines": baselines,
                                 "shipped": baselines["shipped"],
                                 "best_checkpoint": Path(best_path).name}})
    atomic_write_json(out / record.metrics, metrics)
    plot_confusion(metrics, out / "plots" / "confusion_matrix.png", title=f"{out.name} ({eval_name})")
    plot_curves(out / "logs" / "metrics.csv", out / "plots" / "curves.png")
    clock.lap("plots")

    from .ood import fit_run_detector, model_version

    train_eval = CachedImageDataset(datasets["train"].cache, eval_transform(spec, from_cache=True))
    # The shipped probe is the head phase's backbone and BatchNorm statistics: its features are those.
    reuse = probe_features if baselines["shipped"] == "probe" and cal_name == "val" else None
    record.unknown = fit_run_detector(model, train_eval, datasets[cal_name], out, heldout_name=cal_name,
                                      num_classes=len(split.labels), features=reuse)
    clock.lap("unknown detector")
    record.model_version = model_version(out, record)
    record.temperature = temperature
    record.fallback_threshold = fallback.threshold
    record.fallback_rule = fallback.rule
    record.best_checkpoint = f"checkpoints/{Path(best_path).name}"
    record.status = "trained"
    record.extra = {**record.extra, "data_root": split.root, "test_accuracy": metrics["accuracy"],
                    "objective": cfg.objective, "imbalance_mode": imbalance["mode"], "shipped": baselines["shipped"],
                    "baselines_val": {k: baselines[k] for k in ("majority", "probe", "fine_tuned") if k in baselines},
                    "test_macro_f1": metrics["macro_f1"], "image_size": record.preprocess["crop_size"]}
    record.extra["samples"] = write_samples(out, split, record.preprocess_spec, datasets)  # export needs no dataset
    clock.lap("samples")
    record.extra["seconds_by_step"] = clock.rounded()
    record.to_json(out / "run.json")
    stable = metrics["noise_stability"]
    log.info("%s answers unchanged when each pixel moves by up to %g grey level: %.1f %% of %d%s", eval_name,
             stable["grey_levels"], 100 * stable["unchanged"], stable["images"],
             noise_note(stable["unchanged"], baselines.get("batchnorm")))
    log.info("run %s: %s accuracy %.4f macro-F1 %.4f (T=%.3f; below %.2f confidence, %.1f %% of the %s photos go "
             "to the server) in %.0f s (%.0f s to the best checkpoint: metrics.json training.seconds)", out, eval_name,
             metrics["accuracy"], metrics["macro_f1"], temperature, fallback.threshold,
             100 * metrics["fallback"]["sent_to_server"], eval_name, clock.total, seconds)
    log.info("time by step: %s", clock.summary())
    return record
