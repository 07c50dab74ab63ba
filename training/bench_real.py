"""``make bench-real`` / ``fieldid bench real``: fieldid's defaults on real photos, beside the baselines.

    fieldid bench real [--work runs/bench-real] [--sets elpv,digits,...] [--train-args "..."] [--page FILE]

Per set of :mod:`fieldid.training.bench_sets` (and the two synthetic demo sets, which decide nothing
alone), on the split ``fieldid train`` makes with its default seed, one after the other (with
``--seeds N``, N times: seed k is the split and the training seed of ``fieldid train --seed k``, the
reference's seed too, and the goals are judged on the means over the seeds):

- **majority**: always the commonest training class (scikit-learn's DummyClassifier), averaged over
  the classes tied for commonest (a balanced training set: :func:`fieldid.training.probe.majority_scores`);
- **linear probe**: L2 logistic regression on frozen ImageNet MobileNetV2 features at 224 px, its L2
  strength chosen on the val photos (:mod:`fieldid.training.probe`);
- **reference**: the plain 30-line fine-tune (:mod:`fieldid.training.bench_reference`);
- **fieldid**: ``fieldid train --data SET --out RUN`` with nothing else.

It prints test accuracy, macro-F1, balanced accuracy and wall time per row, fieldid's time ratio
to the reference, the share of test photos below the run's fallback threshold (the phone asks the
server about those) and whether the goals hold (fieldid >= reference and >= probe accuracy, never
below majority, <= 3x the reference's time, <= 25 % of photos to the server while the device's answers
meet the run's accuracy target, where the model makes that possible: :func:`server_goal`; each row records
the 1-minute load average, and a time measured beside other work judges no time goal); the table goes to
``WORK/bench-real.json`` and, with ``--page`` (``make bench-real``: ``docs/measured/bench-real.md``), to a
page with date, commit and machine line.
"""
from __future__ import annotations

import json
import sys
import time
from statistics import fmean, stdev
from pathlib import Path
from typing import Any

import torch

from fieldid.machine import busy_load, git_commit, measured_header

from .benchrun import fieldid_train, timed_run
from .clock import format_steps
from .probe import fit_probe, majority_scores, score_predictions
from .labelissues import binomial_sf
from .bench_sets import REAL_SETS, RealSetError, build_real_set, check_set_names
from .records import atomic_write_json, atomic_write_text

__all__ = ["bench_real", "format_real", "server_goal", "run_bench_real", "REAL_BENCH_SETS"]

REAL_BENCH_SETS = (*REAL_SETS, "reef", "salmon")
TIME_GOAL = 3.0  # fieldid's wall time at most this many times the reference's
SERVER_GOAL = 0.25  # test photos below the fallback threshold (asked of the server) at most this share
# The device's test answers "meet" the run's accuracy target unless a one-sided binomial test rejects it
# at this level (the threshold was fitted on val; the test split is another sample).
SERVER_ALPHA = 0.05


def _dataset(name: str, root: Path, demo_scale: float) -> Path:
    if name in ("reef", "salmon"):
        from .demo_data import make_demo_dataset

        make_demo_dataset(name, root / name, scale=demo_scale, progress=False)
        return root / name
    return build_real_set(name, root)


def _features(paths: list[Path]) -> torch.Tensor:
    """Pooled frozen ImageNet MobileNetV2 features at 224 px (the data check's extractor, no cache:
    the baseline must not reuse rows a run's own head phase could have written)."""
    from .features import load_or_compute_features

    return torch.from_numpy(load_or_compute_features(paths, "mobilenet_v2", 224, use_cache=False, batch_size=64))


def _probe_row(split: Any, num_classes: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    feats = {part: _features(split.paths(part)) for part in ("train", "val", "test")}
    ys = {part: torch.tensor(split.targets(part)) for part in ("train", "val", "test")}
    probe = fit_probe(feats["train"], ys["train"], feats["val"], ys["val"], num_classes)
    scores = score_predictions(probe.logits(feats["test"]).argmax(1), ys["test"], num_classes)
    return {**scores, "seconds": round(time.perf_counter() - t0, 1)}


def _reference_row(split: Any, work: Path, name: str, num_classes: int, seed: int = 0) -> dict[str, Any]:
    split_file = atomic_write_json(work / f"{name}-split.json", {
        "labels": split.labels, "seed": seed,
        "train": [[str(p), y] for p, y in zip(split.paths("train"), split.targets("train"))],
        "test": [[str(p), y] for p, y in zip(split.paths("test"), split.targets("test"))]})
    secs, out = timed_run([sys.executable, "-m", "fieldid.training.bench_reference", str(split_file)],
                       work / f"{name}-reference.log")
    ref = json.loads(out.strip().splitlines()[-1])
    scores = score_predictions(torch.tensor(ref["test_predictions"]), torch.tensor(split.targets("test")), num_classes)
    return {**scores, "seconds": round(secs, 1)}


def _fieldid_row(folder: Path, work: Path, name: str, flags: list[str]) -> dict[str, Any]:
    secs, metrics, record = fieldid_train(folder, work / "runs" / name, flags, work / f"{name}-fieldid.log")
    recalls = [c["recall"] for c in metrics["per_class"].values() if c["support"]]
    training = metrics.get("training", {})
    fallback = metrics.get("fallback") or {}  # test photos below the fallback threshold go to the server
    return {"accuracy": round(metrics["accuracy"], 4), "macro_f1": round(metrics["macro_f1"], 4),
            "balanced_accuracy": round(sum(recalls) / max(1, len(recalls)), 4), "seconds": round(secs, 1),
            "epochs": training.get("epochs"), "image_size": record.get("extra", {}).get("image_size"),
            "shipped": training.get("shipped", "fine-tuned"), "baselines_val": training.get("baselines"),
            "flips": (record.get("extra", {}).get("hflip") or {}).get("used"),
            "to_server": fallback.get("sent_to_server"), "kept_accuracy": fallback.get("kept_accuracy"),
            "kept_target": fallback.get("target_accuracy"), "coverage_curve": fallback.get("coverage_curve"),
            "test_images": metrics.get("num_images"),  # the photos the shares are of (unreadable ones skipped)
            "noise_unchanged": (metrics.get("noise_stability") or {}).get("unchanged"),
            "seconds_by_step": record.get("extra", {}).get("seconds_by_step")}


def time_steps(row: dict[str, Any]) -> str:
    """Where a fieldid row's wall time went: the process's start-up and exit (its wall time less the run's
    steps: Python, torch and Lightning imports, the command's checks before training, writing run.json,
    the interpreter's exit), then each step of the run, in whole seconds.

    Example:
        >>> time_steps({"seconds": 20.0, "seconds_by_step": {"read photos": 4.0, "fine-tune": 10.2}})
        'start-up + exit 6 s, read photos 4 s, fine-tune 10 s'
    """
    steps = row.get("seconds_by_step") or {}
    if not steps:
        return ""
    return format_steps({"start-up + exit": max(0.0, row["seconds"] - sum(steps.values())), **steps})


# A row whose 1-minute load average ended above this many times the cores ran beside other work: its own
# training keeps about every core busy (load ~= cores), so more means something else competed for them.
BUSY_LOAD = 1.5


def _busy(rows: list[dict[str, Any]]) -> bool:
    return any(r.get("load") is not None and r["load"] > BUSY_LOAD * r.get("cores", 1) for r in rows)


def _set_rows(folder: Path, work: Path, name: str, seed: int, train_args: list[str], skip: tuple[str, ...],
              commit: str | None, rows: list[dict[str, Any]]) -> None:
    """Append the rows of one set on the split (and with the training seed) ``fieldid train --seed SEED``
    uses to ``rows``, writing them to WORK/bench-real.json after each method (a long run keeps what it did)."""
    from .data import make_split

    split = make_split(folder, seed=seed)
    k = len(split.labels)
    counts = torch.bincount(torch.tensor(split.targets("train")), minlength=k)
    info = {"dataset": name, "real": name in REAL_SETS, "classes": k, "seed": seed,
            "train": len(split.files["train"]), "val": len(split.files["val"]), "test": len(split.files["test"]),
            "imbalance": round(float(counts.max() / counts.clamp_min(1).min()), 1)}
    test_y = torch.tensor(split.targets("test"))
    tag = name if seed == 0 else f"{name}-seed{seed}"  # seed 0 keeps the paths of single-seed runs
    flags = train_args + (["--seed", str(seed)] if seed else [])
    methods = {"majority": lambda: {**majority_scores(torch.tensor(split.targets("train")), test_y, k), "seconds": 0.0},
               "probe": lambda: _probe_row(split, k),
               "reference": lambda: _reference_row(split, work, tag, k, seed),
               "fieldid": lambda: _fieldid_row(folder, work, tag, flags)}
    for method, run in methods.items():
        if method in skip:
            continue
        print(f"[{tag}] {method} ...", flush=True)
        # A run with extra flags is another method: the goals judge only the defaults' row.
        label = f"{method} {' '.join(train_args)}" if method == "fieldid" and train_args else method
        result = run()
        load, cores = busy_load()  # the last minute: mostly this row's own work, plus whatever ran beside it
        rows.append({**info, "method": label, **result, "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "load": load, "cores": cores})
        r = rows[-1]
        print(f"[{tag}] {method}: accuracy {r['accuracy']:.3f}, macro-F1 {r['macro_f1']:.3f}, "
              f"balanced {r['balanced_accuracy']:.3f} in {r['seconds']:.0f} s", flush=True)
        atomic_write_json(work / "bench-real.json", rows)


def bench_real(work: str | Path, names: tuple[str, ...] = REAL_BENCH_SETS, *, train_args: list[str] | None = None,
               demo_scale: float = 0.12, skip: tuple[str, ...] = (), seeds: int = 1) -> list[dict[str, Any]]:
    """One row per set, seed and method (majority, probe, reference, fieldid); written as it goes."""
    work = Path(work)
    commit = git_commit()
    check_set_names(names, REAL_BENCH_SETS)
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    if seeds > 1 and any(a.split("=")[0] == "--seed" for a in train_args or []):
        raise ValueError("--seeds sets fieldid's --seed itself; leave --seed out of --train-args")
    rows: list[dict[str, Any]] = []
    for name in names:
        folder = _dataset(name, work / "data", demo_scale)
        for seed in range(seeds):
            _set_rows(folder, work, name, seed, train_args or [], skip, commit, rows)
    return rows


def latest_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per set, method and seed: the last one given (collected files may repeat a row re-measured
    later), in the place of the first."""
    return list({(r["dataset"], r["method"], r.get("seed", 0)): r for r in rows}.values())


def _consistent(wrong: int, answers: int, target: float) -> bool:
    """``wrong`` of ``answers`` is no more than an accuracy of ``target`` lets chance make (one-sided
    binomial test at :data:`SERVER_ALPHA`): a test split is a sample, the target was met on val."""
    return binomial_sf(wrong, answers, 1.0 - target) >= SERVER_ALPHA


def _photos(row: dict[str, Any]) -> int:
    """The test photos a fieldid row's shares are of (the split's count for rows from before it was recorded)."""
    return int(row.get("test_images") or row.get("test") or 0)


def server_goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fallback goal as the issue words it: at most :data:`SERVER_GOAL` of the test photos go to the
    server *while the answers kept on the device meet the run's accuracy target* (:func:`_consistent`, the
    seeds' rows pooled), on every set where the model is good enough for that to be possible. A run that
    misses it is judged possible when some threshold keeping at least ``1 - SERVER_GOAL`` of the test photos
    would have met the target (its ``coverage_curve``); where none would, ``server_judged`` says so with the
    numbers and no met / NOT met is given. Rows measured before the curve was recorded judge the share alone.

    Example:
        >>> row = {"to_server": 0.1, "kept_accuracy": 1.0, "test": 100, "kept_target": 0.99,
        ...        "coverage_curve": [[0.75, 1.0], [1.0, 0.95]]}
        >>> server_goal([row])
        {'<= 25% to server': True}
        >>> server_goal([{**row, "kept_accuracy": 0.9, "coverage_curve": [[0.75, 0.9], [1.0, 0.85]]}])["server_judged"]
        'not possible for this model: its most confident 75% of test answers are 0.900 right (target 0.99)'
    """
    key = f"<= {SERVER_GOAL:.0%} to server"
    share_met = fmean([r["to_server"] for r in rows]) <= SERVER_GOAL
    if not all(r.get("coverage_curve") and r.get("kept_target") and _photos(r) for r in rows):
        return {key: share_met}
    target = max(float(r["kept_target"]) for r in rows)  # the seeds share one config; the strictest if not
    kept = [round((1.0 - r["to_server"]) * _photos(r)) for r in rows]
    wrong = sum(round(k * (1.0 - (r["kept_accuracy"] or 0.0))) for k, r in zip(kept, rows))
    if share_met and _consistent(wrong, sum(kept), target):
        return {key: True}
    # Missed: could any threshold keeping 1 - SERVER_GOAL or more of the photos have met the target?
    best = [max((p for p in r["coverage_curve"] if p[0] >= 1.0 - SERVER_GOAL - 1e-9), key=lambda p: p[1])
            for r in rows]
    top = [max(1, round(p[0] * _photos(r))) for p, r in zip(best, rows)]
    if _consistent(sum(round(k * (1.0 - p[1])) for k, p in zip(top, best)), sum(top), target):
        return {key: False}
    right = fmean([p[1] for p in best])
    return {"server_judged": f"not possible for this model: its most confident {1.0 - SERVER_GOAL:.0%} of "
                             f"test answers are {right:.3f} right (target {target:g})"}


def goals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per set: fieldid vs reference, probe and majority accuracy, and its time ratio to the reference.

    With several seeds the goals are judged on the means over the seeds fieldid ran with (one seed's
    105 test photos move a set's accuracy by about a point per photo); ``seeds``, ``accuracy`` and
    ``accuracy_sd`` (fieldid's) and ``reference_accuracy`` say what was compared.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in latest_rows(rows) if r["dataset"] == name]
        f_rows = [r for r in mine if r["method"] == "fieldid"]
        if not f_rows:
            continue
        seeds = {r.get("seed", 0) for r in f_rows}
        by = {m: [r for r in mine if r["method"] == m and r.get("seed", 0) in seeds]
              for m in ("majority", "probe", "reference")}
        acc = [r["accuracy"] for r in f_rows]
        g: dict[str, Any] = {"seeds": len(seeds), "accuracy": round(fmean(acc), 4),
                             "accuracy_sd": round(stdev(acc) if len(acc) > 1 else 0.0, 4)}
        if by["reference"]:
            ref = by["reference"]
            g["reference_accuracy"] = round(fmean([r["accuracy"] for r in ref]), 4)
            g["time_ratio"] = round(fmean([r["seconds"] for r in f_rows]) /
                                    max(fmean([r["seconds"] for r in ref]), 1e-9), 2)
            g[">= reference"] = g["accuracy"] >= g["reference_accuracy"]
            if _busy(f_rows + ref):  # a wall time measured beside other work judges nothing
                g["time_judged"] = f"not judged: the machine was busy (load above {BUSY_LOAD:g}x the cores)"
            elif any(r.get("load") is None for r in f_rows + ref):  # rows from before the load was recorded
                g["time_judged"] = "not judged: the load was not recorded"
            else:
                g[f"<= {TIME_GOAL:g}x time"] = g["time_ratio"] <= TIME_GOAL
        if by["probe"]:
            g[">= probe"] = g["accuracy"] >= round(fmean([r["accuracy"] for r in by["probe"]]), 4)
        if by["majority"]:
            g["> majority"] = g["accuracy"] > round(fmean([r["accuracy"] for r in by["majority"]]), 4)
        if all(r.get("to_server") is not None for r in f_rows):
            g.update(server_goal(f_rows))
        out[name] = g
    return out


def format_real(rows: list[dict[str, Any]]) -> str:
    """The markdown table: one line per set and method, then the goals per set."""
    lines = ["| set | real | classes | train/val/test | imbalance | method | accuracy | macro-F1 | balanced acc | s | "
             "notes |", "|---|---|---:|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        note = ""
        if r["method"].startswith("fieldid"):
            note = f"{r.get('image_size')} px, {r.get('epochs')} epochs, shipped {r.get('shipped')}"
            if r.get("flips") is not None:  # rows from before augment.hflip: auto carry no decision
                note += ", flips " + ("on" if r["flips"] else "off")
            if r.get("to_server") is not None:
                kept = r.get("kept_accuracy")
                note += (f", {r['to_server']:.0%} of test photos to the server"
                         + (f" (device answers {kept:.3f} right)" if kept is not None else ""))
            if r.get("noise_unchanged") is not None:
                note += f", {r['noise_unchanged']:.1%} of test answers kept under half a grey level of pixel noise"
        if _busy([r]):
            note += ("; " if note else "") + f"busy machine: load {r['load']:g} on {r['cores']} cores"
        lines.append(f"| {r['dataset']} | {'yes' if r['real'] else 'synthetic'} | {r['classes']} | "
                     f"{r['train']}/{r['val']}/{r['test']} | {r['imbalance']:g}x | {r['method']}"
                     f"{f' (seed {seed})' if (seed := r.get('seed', 0)) else ''} | {r['accuracy']:.3f} | "
                     f"{r['macro_f1']:.3f} | {r['balanced_accuracy']:.3f} | {r['seconds']:.0f} | {note} |")
    lines += ["", "| set | seeds | fieldid accuracy | reference accuracy | fieldid / reference time | goals |",
              "|---|---:|---:|---:|---:|---|"]
    for name, g in goals(rows).items():
        checks = ", ".join([f"{k}: {'met' if v else 'NOT met'}" for k, v in g.items() if isinstance(v, bool)]
                           + ([f"time {g['time_judged']}"] if "time_judged" in g else [])
                           + ([f"to server: {g['server_judged']}"] if "server_judged" in g else []))
        acc = f"{g['accuracy']:.3f}" + (f" ± {g['accuracy_sd']:.3f}" if g["seeds"] > 1 else "")
        ref = f"{g['reference_accuracy']:.3f}" if "reference_accuracy" in g else "-"
        lines.append(f"| {name} | {g['seeds']} | {acc} | {ref} | {g.get('time_ratio', '-')} | {checks} |")
    timed = [r for r in rows if r["method"] == "fieldid" and r.get("seconds_by_step")]
    if timed:  # rows from before the run recorded its steps have none
        lines += ["", "Where fieldid's wall time goes (its defaults' rows; the reference's time is one process too: "
                  "start-up, decoding, three epochs, the test answers):", "",
                  "| set | fieldid s | reference s | steps |", "|---|---:|---:|---|"]
        refs = {(r["dataset"], r.get("seed", 0)): r["seconds"] for r in rows if r["method"] == "reference"}
        for r in timed:
            seed = r.get("seed", 0)
            ref = refs.get((r["dataset"], seed))
            lines.append(f"| {r['dataset']}{f' (seed {seed})' if seed else ''} | {r['seconds']:.0f} | "
                         f"{'-' if ref is None else f'{ref:.0f}'} | {time_steps(r)} |")
    return "\n".join(lines)


TITLE = "Real photos: fieldid's defaults against the baselines"


def write_page(rows: list[dict[str, Any]], path: str | Path, *, command: str, title: str = TITLE) -> Path:
    """``docs/measured/bench-real.md``: the table with the date, commit and machine it was measured on."""
    dates = sorted(r["date"] for r in rows if r.get("date"))
    commits = sorted({r.get("commit") or "not recorded" for r in rows})
    measured = [f"{dates[0]} to {dates[-1]}" if dates else "at an unrecorded time",
                f"at commit(s) {', '.join(commits)}"]
    text = (measured_header(title, command,
                            measured="rows measured " + " ".join(measured))
            + f"Wall times are only comparable between rows measured in one run on an otherwise idle machine; "
            f"rows collected from separate runs (`--collect`) may have run under different load.\n\n"
            f"{format_real(rows)}\n")
    return atomic_write_text(path, text)


def run_bench_real(work: str | Path, sets: tuple[str, ...] = REAL_BENCH_SETS, *, skip: tuple[str, ...] = (),
                   train_args: list[str] | None = None, demo_scale: float = 0.12, collect: list[Path] | None = None,
                   page: Path | None = None, title: str | None = None, command: str = "fieldid bench real",
                   seeds: int = 1) -> int:
    """``fieldid bench real``: :func:`bench_real` (or, with ``collect``, the rows of earlier runs' JSON files),
    its table, and the page at ``page`` (for the defaults' full comparison, or collected rows) named after
    ``command``; 2 for bad input (one line)."""
    title = title or TITLE
    if collect:
        try:
            rows = [r for f in collect for r in json.loads(Path(f).read_text())]
        except (OSError, ValueError) as e:
            print(f"fieldid bench real: error: cannot read rows: {e}", file=sys.stderr)
            return 2
        order = {name: i for i, name in enumerate(REAL_BENCH_SETS)}
        rows = latest_rows([r for r in rows if r.get("dataset") in sets])  # --sets picks among them too
        rows.sort(key=lambda r: order.get(r["dataset"], len(order)))
        print(format_real(rows))
        if page:
            print(f"written: {write_page(rows, page, command=command, title=title)}")
        return 0
    try:
        rows = bench_real(work, sets, train_args=train_args or [], demo_scale=demo_scale, skip=skip, seeds=seeds)
    except (ValueError, RealSetError) as e:
        print(f"fieldid bench real: error: {e}", file=sys.stderr)
        return 2
    print("\n" + format_real(rows))
    if page and not train_args and not skip:  # only the defaults' full comparison is the published page
        print(f"written: {write_page(rows, page, command=command, title=title)}")
    return 0
