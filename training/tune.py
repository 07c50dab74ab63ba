"""``fieldid tune``: Optuna hyperparameter search where every trial is a real fieldid run.

Each trial trains with :func:`fieldid.training.train.train` into ``OUT/trial-NNNN`` (a complete run
directory you can evaluate or export), reports its validation macro-F1 after every epoch so
that bad trials are pruned early, and scores itself by the best checkpoint's validation
macro-F1 (the test split stays held out).

Scale-out is Optuna's: every process that points at the same ``--storage`` and ``--study``
shares one study. SQLite (the default, ``OUT/study.db``) serves the processes of one machine;
an RDB URL (``postgresql://...``, ``mysql+pymysql://...``) serves many machines. Trials send
a heartbeat; a trial whose process died (``kill -9``, a lost node) is failed once its heartbeat
is stale and retried, continuing from that trial's last checkpoint when its run directory is
reachable. Rerunning the same command therefore resumes an interrupted search.

Outputs in ``OUT/``: ``best.yaml`` (a config ``fieldid train --config`` accepts),
``search.png`` (search history, per-epoch curves, parameter importances), ``trials.csv``.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from fieldid.cli_common import first_line, read_yaml, redact_url_passwords

from .config import AugmentConfig, ConfigError, TrainConfig, load_config
from .records import atomic_write_bytes, atomic_write_text

__all__ = ["tune", "TuneResult", "TuneError", "DEFAULT_SPACE", "default_space", "load_space", "validate_space",
           "plot_search", "format_table", "default_out"]

log = logging.getLogger("fieldid.tune")

#: The default search space. ``model`` is filled from the backbone registry by :func:`default_space`.
DEFAULT_SPACE: dict[str, Any] = {
    "lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
    "weight_decay": {"type": "float", "low": 1e-5, "high": 0.1, "log": True},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "head_epochs": {"type": "int", "low": 0, "high": 2},
    "image_size": {"type": "categorical", "choices": [160, 192, 224]},
}

_KINDS = ("float", "int", "categorical")
_FINISHED = ("COMPLETE", "PRUNED")


class TuneError(ValueError):
    """A search that cannot run as asked (bad space, storage, options)."""


@dataclass
class TuneResult:
    """What a search produced (also printed as a table and written to ``OUT``)."""

    study: str
    storage: str  # the storage URL, its password (if any) replaced by ***
    out: Path
    best_value: float
    best_params: dict[str, Any]
    best_trial: int
    best_run: str
    best_config: Path
    plot: Path
    table: Path
    counts: dict[str, int]
    rows: list[dict[str, Any]]


# --------------------------------------------------------------------------- search space
def default_space() -> dict[str, Any]:
    """:data:`DEFAULT_SPACE` plus every registered backbone as a ``model`` choice.

    Example:
        >>> sorted(default_space())[:3]
        ['dropout', 'head_epochs', 'image_size']
    """
    from .models import list_backbones

    return {**DEFAULT_SPACE, "model": {"type": "categorical", "choices": list_backbones()}}


def _config_keys() -> set[str]:
    import dataclasses

    top = {f.name for f in dataclasses.fields(TrainConfig) if f.name != "augment"}
    return top | {f"augment.{f.name}" for f in dataclasses.fields(AugmentConfig)}


def _check_param(name: str, spec: Any, source: str) -> None:
    if not isinstance(spec, dict):
        return  # a plain value pins the parameter
    kind = spec.get("type")
    if kind not in _KINDS:
        raise TuneError(f"{source}: {name}: type must be one of {', '.join(_KINDS)}")
    allowed = {"type", "choices"} if kind == "categorical" else {"type", "low", "high", "log", "step"}
    extra = sorted(set(spec) - allowed)
    if extra:
        raise TuneError(f"{source}: {name}: unknown key(s) {', '.join(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TuneError(f"{source}: {name}: choices must be a non-empty list")
        if any(isinstance(c, (dict, list)) for c in choices):
            raise TuneError(f"{source}: {name}: choices must be plain values")
        return
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise TuneError(f"{source}: {name}: need numbers low < high")
    if spec.get("log") and low <= 0:
        raise TuneError(f"{source}: {name}: a log scale needs low > 0")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise TuneError(f"{source}: {name}: int bounds must be whole numbers")


def _extremes(spec: Any) -> list[Any]:
    if not isinstance(spec, dict):
        return [spec]
    return list(spec["choices"]) if spec["type"] == "categorical" else [spec["low"], spec["high"]]


def validate_space(space: dict[str, Any], base: TrainConfig, *, source: str = "search space") -> None:
    """Every key is a config key, every spec well formed, every bound a valid config value."""
    if not isinstance(space, dict) or not space:
        raise TuneError(f"{source}: expected a non-empty mapping of config keys to ranges")
    valid = _config_keys()
    unknown = sorted(set(space) - valid)
    if unknown:
        raise TuneError(f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    for name, spec in space.items():
        _check_param(name, spec, source)
        for value in _extremes(spec):
            try:
                base.replace(**{name: value})
            except (ConfigError, ValueError) as e:
                raise TuneError(f"{source}: {name}={value!r} is not a valid config value ({e})") from None
        if name == "model":
            from .models import get_backbone

            for value in _extremes(spec):
                get_backbone(str(value))  # unknown backbone: fail now, listing the valid ones


def load_space(path: str | Path | None, *, pinned: Iterable[str] = ()) -> dict[str, Any]:
    """The search space from a YAML file (default: :func:`default_space`), minus ``pinned`` keys.

    File format: one entry per config key, either a range or a fixed value::

        lr: {type: float, low: 1.0e-4, high: 3.0e-3, log: true}
        head_epochs: {type: int, low: 0, high: 2}
        model: {type: categorical, choices: [mobilenet_v2, efficientnet_lite0]}
        augment.hue: 0.0          # fixed for every trial

    Args:
        path: YAML file, or ``None`` for the default space.
        pinned: keys fixed elsewhere (flags given on the command line); they are not searched.

    Returns:
        ``{config_key: spec}``.

    Example:
        >>> "model" in load_space(None, pinned=["model"])
        False
    """
    if path is None:
        space = default_space()
    else:
        path = Path(path)
        if not path.is_file():
            raise TuneError(f"{path}: search-space file not found")
        space = read_yaml(path, TuneError) or {}
        if not isinstance(space, dict):
            raise TuneError(f"{path}: expected a mapping of config keys to ranges")
    pinned = set(pinned)
    return {k: v for k, v in space.items() if k not in pinned}


def _suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if not isinstance(spec, dict):
            params[name] = spec
        elif spec["type"] == "float":
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]),
                                               log=bool(spec.get("log", False)), step=spec.get("step"))
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]),
                                             log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
        else:
            params[name] = trial.suggest_categorical(name, spec["choices"])
    return params


# --------------------------------------------------------------------------- optuna plumbing
@contextlib.contextmanager
def _no_experimental_notices() -> Iterator[None]:
    """Heartbeat and retry are marked experimental in Optuna; that notice is not for our users."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


_SCHEMA_ATTEMPTS = 5


def _is_schema_race(e: BaseException) -> bool:
    """A concurrent ``CREATE TABLE`` lost to another process (sqlalchemy IntegrityError / ProgrammingError)."""
    text = str(e).lower()
    return type(e).__module__.startswith("sqlalchemy") and (
        "already exists" in text or "duplicate key" in text or "uniqueviolation" in text)


def _route_optuna_logging() -> None:
    """Optuna's warnings only (our own per-trial line replaces its INFO lines), through the
    application's handlers instead of Optuna's own: the CLI's redacts storage passwords."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def _open_storage(url: str, heartbeat: int, retries: int) -> Any:
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        db = url.split(":///", 1)[-1]
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # Several local processes share the file: wait for the lock instead of failing at once.
        engine_kwargs["connect_args"] = {"timeout": 60}
    try:
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                with _no_experimental_notices():
                    return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                                      grace_period=2 * heartbeat,
                                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=retries))
            except Exception as e:
                # Processes starting together on a new PostgreSQL database race to create Optuna's
                # tables; the loser sees a unique violation / "already exists". The tables are there
                # a moment later, so open again (measured with two `fieldid tune` on one study).
                if attempt + 1 < _SCHEMA_ATTEMPTS and _is_schema_race(e):
                    time.sleep(0.5 + random.random())
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover
    except (ImportError, optuna.exceptions.StorageInternalError, ValueError) as e:
        raise TuneError(redact_url_passwords(f"cannot open storage {url!r}: {first_line(e)}")) from None
    except Exception as e:  # sqlalchemy errors (bad URL, server down) are not ours to type
        if type(e).__module__.startswith("sqlalchemy"):
            raise TuneError(redact_url_passwords(f"cannot open storage {url!r}: {first_line(e)}")) from None
        raise


def _make_pruner(name: Any, epochs: int) -> Any:
    import optuna

    if isinstance(name, optuna.pruners.BasePruner):
        return name

    if name == "median":
        # Compare epoch k with other trials' epoch k; the first completed trials set the bar.
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, epochs))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise TuneError(f"unknown pruner {name!r}; valid: median, hyperband, none")


def _pruning_callback(trial: Any) -> Any:
    """Lightning callback: report val macro-F1 per epoch to ``trial``; raise TrialPruned when told."""
    import lightning as L
    import optuna

    class OptunaPruning(L.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if trainer.sanity_checking:
                return
            value = trainer.callback_metrics.get("val_macro_f1")
            if value is None:
                return
            epoch = trainer.current_epoch
            trial.report(float(value), step=epoch)
            if trial.should_prune():
                # Propagates out of trainer.fit (Lightning tears down first) and out of train().
                raise optuna.TrialPruned(f"epoch {epoch}: val macro-F1 {float(value):.4f}")

    return OptunaPruning()


def _run_trial(trial: Any, data_dir: Path, out: Path, base: TrainConfig, space: dict[str, Any]) -> float:
    """One trial: a fresh run, or the continuation of a retried trial's interrupted run."""
    import optuna

    from .records import RunRecord
    from .train import train

    params = _suggest(trial, space)
    previous = trial.user_attrs.get("run")  # set when this trial retries one whose process died
    run_dir = out / f"trial-{trial.number:04d}"
    callbacks = [_pruning_callback(trial)]
    try:
        if previous and (Path(previous) / "run.json").is_file():
            run_dir = Path(previous)
            trial.set_user_attr("run", str(run_dir))
            if RunRecord.from_json(run_dir / "run.json").status != "trained":
                log.info("trial %d continues %s from its last checkpoint", trial.number, run_dir)
                train(None, None, resume=run_dir, callbacks=callbacks)
        else:
            cfg = base.replace(**params)
            trial.set_user_attr("run", str(run_dir))
            trial.set_user_attr("config", cfg.to_dict())
            train(data_dir, run_dir, cfg, callbacks=callbacks)
    except optuna.TrialPruned:
        # A pruned run is never resumed or exported: drop its checkpoints, keep its logs.
        for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
            ckpt.unlink()
        raise
    except Exception as e:  # the study records the failed trial; keep its reason for the report
        trial.set_user_attr("error", f"{type(e).__name__}: {first_line(e, '')}")
        raise
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return float(metrics["val"]["macro_f1"])


# --------------------------------------------------------------------------- reporting
def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, "value": t.value,
                     "epochs": len(t.intermediate_values), "seconds": seconds,
                     **{k: t.params[k] for k in sorted(t.params)}, "run": t.user_attrs.get("run", "")})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of trials (best first among completed ones)."""
    if not rows:
        return "(no trials)"
    order = sorted(rows, key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["trial"]))
    keys = list(dict.fromkeys(k for r in order for k in r if k != "run")) + ["run"]
    cells = [[("-" if r.get(k) is None else (f"{r[k]:.4f}" if k == "value" else
                                              f"{r[k]:.0f}" if k == "seconds" else _short(r[k]))) for k in keys]
             for r in order]
    header = ["val_f1" if k == "value" else k for k in keys]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _write_table(rows: list[dict[str, Any]], path: Path) -> Path:
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=keys, restval="")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def plot_search(study: Any, path: str | Path) -> Path:
    """Search history, per-epoch val macro-F1 of every trial, and parameter importances (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from matplotlib.ticker import MaxNLocator

    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.intermediate_values]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))

    ax = axes[0]
    ax.scatter([t.number for t in done], [t.value for t in done], label="completed", color="tab:blue", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               marker="x", color="tab:gray", label="pruned (last epoch)", zorder=3)
    if done:
        xs = sorted(done, key=lambda t: t.number)
        best, ys = -math.inf, []
        for t in xs:
            best = max(best, t.value)
            ys.append(best)
        ax.step([t.number for t in xs], ys, where="post", color="tab:red", label="best so far")
    ax.set(title="search history", xlabel="trial", ylabel="val macro-F1")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)

    ax = axes[1]
    for t in trials:
        if not t.intermediate_values:
            continue
        steps = sorted(t.intermediate_values)
        ax.plot(steps, [t.intermediate_values[s] for s in steps], marker=".",
                color="tab:blue" if t.state.name == "COMPLETE" else "tab:gray",
                alpha=0.9 if t.state.name == "COMPLETE" else 0.5)
    ax.set(title="val macro-F1 per epoch (grey: pruned/failed)", xlabel="epoch", ylabel="val macro-F1")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    ax = axes[2]
    importances: dict[str, float] = {}
    # With every score equal there is nothing to attribute (and Optuna says so in a warning).
    if len(done) >= 3 and len({t.value for t in done}) > 1:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message=".*quantiles select the same set", category=UserWarning)
                importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError):
            importances = {}  # e.g. every completed trial used the same values
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
        ax.set(title="parameter importance (Optuna default evaluator)", xlabel="importance (sums to 1)")
    else:
        ax.text(0.5, 0.5, "importances need >= 3 completed trials\nwith different scores",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.suptitle(f"study {study.study_name}: {len(done)} completed, {len(pruned)} pruned")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _write_best_config(study: Any, base: TrainConfig, space: dict[str, Any], path: Path) -> tuple[TrainConfig, Any]:
    best = study.best_trial
    run_config = Path(best.user_attrs.get("run", "")) / "config.yaml"
    if best.user_attrs.get("run") and run_config.is_file():
        # What the run trained with: it resolves its `auto` settings (augment.hflip) into config.yaml.
        cfg = load_config(run_config)
    elif "config" in best.user_attrs:
        cfg = TrainConfig.from_dict(best.user_attrs["config"], source=f"trial {best.number}")
    else:  # a trial recorded by an older process: rebuild from the base and its parameters
        cfg = base.replace(**{k: v for k, v in best.params.items() if k in space})
    header = (f"# fieldid tune: best of study {study.study_name!r} - trial {best.number}, "
              f"val macro-F1 {best.value:.4f}\n# use: fieldid train --data DIR --out RUN --config {path.name}\n")
    atomic_write_text(path, header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return cfg, best


# --------------------------------------------------------------------------- entry point
def _study_name(data_dir: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(data_dir).resolve().name).strip("-")
    return name or "fieldid"


def default_out(study: str) -> Path:
    """Where a study's trial runs and reports go unless ``--out`` says otherwise."""
    return Path("runs") / f"tune-{study}"


def tune(data_dir: str | Path, trials: int, *, base: TrainConfig | None = None,
         space: dict[str, Any] | None = None, out_dir: str | Path | None = None,
         storage: str | None = None, study_name: str | None = None, pruner: Any = "median",
         heartbeat: int = 60, retries: int = 2, sampler_seed: int | None = None) -> TuneResult:
    """Search hyperparameters with Optuna until the study has ``trials`` finished trials.

    Several processes (or machines, with an RDB ``storage``) can run this at once on the
    same study; rerunning it after an interruption resumes the study.

    Args:
        data_dir: ImageFolder dataset (every trial uses the same split: the base config's seed).
        trials: finished (completed or pruned) trials the study should have; a rerun or a
            cooperating process adds only what is missing.
        base: config every trial starts from (its values are used for keys not searched).
        space: ``{config_key: spec}`` (see :func:`load_space`); default :func:`default_space`.
        out_dir: trial runs, ``best.yaml``, ``search.png``, ``trials.csv`` (default
            ``runs/tune-<study>``).
        storage: Optuna storage URL (default ``sqlite:///<out_dir>/study.db``).
        study_name: default: the dataset folder's name.
        pruner: ``median``, ``hyperband``, ``none`` or an ``optuna.pruners.BasePruner``.
        heartbeat: seconds between a running trial's heartbeats; a trial silent for twice
            this long is failed and retried.
        retries: how often a trial whose process died is retried.
        sampler_seed: TPE seed (leave unset when several processes share a study, or they
            would propose the same parameters).

    Returns:
        :class:`TuneResult`.

    Example:
        >>> r = tune("data/salmon", 20, base=TrainConfig(epochs=6))  # doctest: +SKIP
        >>> r.best_config  # doctest: +SKIP
        PosixPath('runs/tune-salmon/best.yaml')
    """
    import optuna

    from .images import DataError

    base = base or TrainConfig()
    base.validate()
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset folder not found")
    if trials < 1:
        raise TuneError("--trials must be >= 1")
    if heartbeat < 1:
        raise TuneError("--heartbeat must be >= 1 second")
    if str(base.devices) != "1" or base.num_nodes != 1 or "ddp" in base.strategy:
        raise TuneError("tune trains one single-device process per trial; to use more devices run several "
                        "`fieldid tune` processes on the same --storage/--study (e.g. one per GPU with "
                        "CUDA_VISIBLE_DEVICES)")
    space = default_space() if space is None else space
    validate_space(space, base)
    study_name = study_name or _study_name(data_dir)
    out = Path(out_dir) if out_dir is not None else default_out(study_name)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{out.resolve() / 'study.db'}"

    _route_optuna_logging()
    rdb = _open_storage(storage, heartbeat, retries)
    sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    study = optuna.create_study(storage=rdb, study_name=study_name, direction="maximize", sampler=sampler,
                                pruner=_make_pruner(pruner, base.epochs), load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuneError(f"study {study_name!r} in {redact_url_passwords(storage)} is not a fieldid study (it minimises)")
    _note_space(study, space, base)

    finished = sum(t.state.name in _FINISHED for t in study.get_trials(deepcopy=False))
    if finished:
        log.info("study %s: resuming with %d finished trial(s), target %d", study_name, finished, trials)
    t0 = time.time()

    def progress(st: Any, frozen: Any) -> None:
        done = sum(t.state.name in _FINISHED for t in st.get_trials(deepcopy=False))
        try:
            best = f"{st.best_value:.4f}"
        except ValueError:
            best = "-"
        value = "-" if frozen.value is None else f"{frozen.value:.4f}"
        log.info("trial %d %s: val macro-F1 %s (best %s) | %d/%d finished | %.0f s | %s", frozen.number,
                 frozen.state.name.lower(), value, best, done, trials, time.time() - t0,
                 ", ".join(f"{k}={_short(v)}" for k, v in sorted(frozen.params.items())))

    if finished < trials:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        states = tuple(getattr(optuna.trial.TrialState, s) for s in _FINISHED)
        # What one trial's parameters can break (CUDA OOM, weights that do not fit the sampled
        # backbone, a corrupt checkpoint of a retried trial) fails that trial, not the study.
        # ModelError/CheckpointError/DataError/ConfigError are ValueErrors.
        trial_errors = (RuntimeError, ValueError, OSError, MisconfigurationException)
        with _no_experimental_notices():  # the heartbeat machinery warns on every trial
            study.optimize(lambda tr: _run_trial(tr, data_dir, out, base, space), n_trials=trials,
                           catch=trial_errors, gc_after_trial=True,
                           callbacks=[optuna.study.MaxTrialsCallback(trials, states=states), progress])
    return _report(study, base, space, out, storage)


def _note_space(study: Any, space: dict[str, Any], base: TrainConfig) -> None:
    """Remember the space on the study; say so when a rerun searches a different one."""
    recorded = study.user_attrs.get("space")
    current = json.loads(json.dumps(space))
    if recorded is None:
        study.set_user_attr("space", current)
        study.set_user_attr("base_config", base.to_dict())
    elif recorded != current:
        log.warning("study %s: the search space differs from the one it started with; "
                    "earlier trials still count", study.study_name)


def _report(study: Any, base: TrainConfig, space: dict[str, Any], out: Path, storage: str) -> TuneResult:
    rows = _trial_rows(study)
    table = _write_table(rows, out / "trials.csv")
    plot = plot_search(study, out / "search.png")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"].lower()] = counts.get(r["state"].lower(), 0) + 1
    try:
        study.best_trial
    except ValueError:
        errors = [t for t in study.get_trials(deepcopy=False) if "error" in t.user_attrs]
        last = f"; trial {errors[-1].number} failed with {errors[-1].user_attrs['error']}" if errors else ""
        raise TuneError(f"study {study.study_name!r}: no trial completed ({counts}){last}; see {out}") from None
    _, best = _write_best_config(study, base, space, out / "best.yaml")
    return TuneResult(study=study.study_name, storage=redact_url_passwords(storage), out=out, best_value=float(best.value),
                      best_params=dict(best.params), best_trial=best.number, best_run=best.user_attrs.get("run", ""),
                      best_config=out / "best.yaml", plot=plot, table=table, counts=counts, rows=rows)
