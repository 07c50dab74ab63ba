"""`fieldid bench <what>`: every benchmark is one subcommand (the `make bench*` targets run these).

* `bundle` -- size, accuracy, latency and throughput of every exported artifact (`make bench`);
* `cascade` -- device alone vs server alone vs device-then-server (`make bench-cascade`);
* `ood` -- the unknown answer of the phone's file on other and unseen photos; `ood-real` -- the
  same on the real sets, with classes held out of training (`make bench-ood-real`);
* `export` -- export time and peak memory per format (`make bench-export`);
* `train compare|augment|choices|cache` -- the reference fine-tune vs the defaults, the augmentation
  sweep, the CPU speed choices and the decode cache (`make bench-train`);
* `real` -- real photos vs the baselines (`make bench-real`); `data` -- the data check against
  planted problems (`make bench-data`);
* `serve` -- in-process vs TorchServe latency and throughput (`make bench-serve`);
* `app` -- the web app's model in Chromium vs Python ONNX Runtime (`make bench-app`);
* `intake` -- full vs JPEG-draft decoding of a 24 MP photo.

Every benchmark's flags are defined here, in the one CLI vocabulary; `--page FILE` writes the
printed table to a markdown page with the date, commit and machine line and the command as typed
(`make` writes `docs/measured/`).
Torch-free until a benchmark runs: each command imports its benchmark module when it runs.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Callable

from fieldid.cli_common import UsageError
from fieldid.cli_vocabulary import add_renamed

__all__ = ["register", "BENCHMARKS", "write_measured_page"]

# The subcommands of `fieldid bench`, in the order `fieldid bench --help` lists them.
BENCHMARKS = ("bundle", "cascade", "ood", "ood-real", "export", "train", "real", "serve", "app", "intake", "data")
# The modes of `fieldid bench train`.
TRAIN_MODES = ("compare", "augment", "choices", "cache")
# Defaults the benchmark modules hold too (kept here so `fieldid --help` imports none of them).
_TRAIN_SETS = "digits,faces,textures,reef,salmon"  # fieldid.training.bench.BENCH_SETS
_AUGMENT_VARIANTS = "defaults,strong,none"  # fieldid.training.bench.AUGMENT_VARIANTS
_REAL_SETS = "elpv,elpv_few,digits,faces,textures,scenes,reef,salmon"  # fieldid.training.bench_real.REAL_BENCH_SETS
_DATA_SETS = _REAL_SETS  # fieldid.training.bench_data.BENCH_SETS
_OOD_REAL_SETS = "digits,scenes"  # fieldid.export.bench_ood_real.OOD_REAL_SETS
_REAL_TITLE = "Real photos: fieldid's defaults against the baselines"  # fieldid.training.bench_real.TITLE


def write_measured_page(path: str | Path, title: str, command: str, body: str) -> Path:
    """A measurement page: title, the command, date, commit and machine line, then `body` (the table).

    Every number in the docs comes from such a page, never typed by hand.
    """
    from fieldid.machine import measured_header
    from fieldid.records import atomic_write_text

    text = measured_header(title, command) + f"```\n{body.rstrip()}\n```\n"
    return atomic_write_text(Path(path), text)


def _command(args: argparse.Namespace) -> str:
    """The command as typed (`fieldid.cli.main` records it), for a page's "Written by" line."""
    argv = getattr(args, "argv", None) or ["bench", args.what, *([args.mode] if getattr(args, "mode", None) else [])]
    return "fieldid " + shlex.join(argv)


def _page(args: argparse.Namespace, title: str, body: str) -> None:
    if args.page:
        print(f"written: {write_measured_page(args.page, title, _command(args), body)}")


def _teed(args: argparse.Namespace, title: str, run: Callable[[], int]) -> int:
    """Run a benchmark that prints its table; with ``--page``, what it prints on stdout also goes to the page
    (written when it exits 0). The lines still stream to the terminal while they are captured."""
    if not args.page:
        return int(run() or 0)
    buf, terminal = io.StringIO(), sys.stdout

    class _Tee(io.TextIOBase):
        def write(self, s: str) -> int:
            terminal.write(s)
            return buf.write(s)

        def flush(self) -> None:
            terminal.flush()

    with contextlib.redirect_stdout(_Tee()):
        rc = int(run() or 0)
    if rc == 0:
        _page(args, title, buf.getvalue())
    return rc


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def _cmd_bundle(args: argparse.Namespace) -> int:
    from fieldid.export import bench_run

    r = bench_run(args.run, data=args.data, bundle=args.bundle, out=args.out, iters=args.iters,
                  batch=args.batch, batches=args.batches, limit=args.limit, settle_s=args.settle)
    print(r["table"])
    _page(args, "Every exported artifact: size, accuracy, latency, throughput", r["table"])
    out = args.out or Path(args.run) / "bench"
    print(json.dumps({"bench": str(out), "files": ["bench.json", "bench.md", "bench.png"],
                      "images": r["meta"]["images"]}))
    return 0


def _cmd_cascade(args: argparse.Namespace) -> int:
    from fieldid.export.bench_cascade import cascade_bench

    r = cascade_bench(args.run, args.server_run, device_bundle=args.bundle, server_bundle=args.server_bundle,
                      alone_run=args.alone_run, out=args.out, limit=args.limit)
    print(r["table"])
    _page(args, f"Cascade: device, server and device-then-server ({Path(args.run).name})", r["table"])
    print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["cascade.json", "cascade.md"],
                      "goals": r["goals"]}))
    return 0


def _cmd_ood(args: argparse.Namespace) -> int:
    from fieldid.export.bench_ood import ood_bench

    r = ood_bench(args.run, args.dir, bundle=args.bundle, out=args.out)
    print(r["table"])
    _page(args, f"Unknown photos ({Path(args.run).name})", r["table"])
    print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["ood.json", "ood.md"],
                      "goals_met": r["goals_met"]}))
    return 0


def _cmd_ood_real(args: argparse.Namespace) -> int:
    from fieldid.export.bench_ood_real import run_bench_ood_real

    return run_bench_ood_real(args.work, _csv(args.sets), reuse=args.reuse, page=args.page, command=_command(args))


def _cmd_export(args: argparse.Namespace) -> int:
    from fieldid.export.bench_export import run_bench_export

    return _teed(args, "Export time and peak memory per format",
                 lambda: run_bench_export(args.run, formats=args.formats, out=args.out, reuse=args.reuse))


def _cmd_train_compare(args: argparse.Namespace) -> int:
    from fieldid.training.bench import run_bench_compare

    return _teed(args, "Training: the reference fine-tune vs fieldid train's defaults",
                 lambda: run_bench_compare(args.work, _csv(args.sets), demo_scale=args.demo_scale,
                                           train_args=args.train_args.split()))


def _cmd_train_augment(args: argparse.Namespace) -> int:
    from fieldid.training.bench import run_bench_augment

    return _teed(args, "Training: test accuracy per augmentation variant",
                 lambda: run_bench_augment(args.work, _csv(args.sets), _csv(args.variants),
                                           demo_scale=args.demo_scale))


def _cmd_train_choices(args: argparse.Namespace) -> int:
    from fieldid.training.bench import run_bench_choices

    return _teed(args, "Training: the CPU speed choices (seconds per step and per inference pass)", run_bench_choices)


def _cmd_train_cache(args: argparse.Namespace) -> int:
    from fieldid.training.bench import run_bench_cache

    return _teed(args, "Training: the decode cache, off and on",
                 lambda: run_bench_cache(args.data, model=args.model, image_size=args.image_size,
                                         batch_size=args.batch_size, steps=args.steps, json_out=args.json))


def _cmd_real(args: argparse.Namespace) -> int:
    from fieldid.training.bench_real import run_bench_real

    return run_bench_real(args.work, _csv(args.sets), skip=_csv(args.skip), train_args=args.train_args.split(),
                          demo_scale=args.demo_scale, collect=args.collect, page=args.page, title=args.page_title,
                          command=_command(args), seeds=args.seeds)


def _cmd_data(args: argparse.Namespace) -> int:
    from fieldid.training.bench_data import run_bench_data

    return run_bench_data(args.work, _csv(args.sets), seed=args.seed, page=args.page, command=_command(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from fieldid.serve.bench import run_bench_serve

    return _teed(args, "In-process engine vs TorchServe: latency, throughput, batching",
                 lambda: run_bench_serve(args.run, args.bundle, requests=args.requests, threads=args.threads,
                                         concurrency=args.concurrency, batch_on=args.batch_on,
                                         max_batch_delay_ms=args.max_batch_delay_ms, device=args.device,
                                         precision=args.precision, netty_threads=args.netty_threads,
                                         images=args.images, state_dir=args.state_dir, out=args.out,
                                         handler_only=args.handler_only))


def _cmd_app(args: argparse.Namespace) -> int:
    from fieldid.app.bench import run_bench_app

    return _teed(args, "The web app's model in Chromium vs Python ONNX Runtime",
                 lambda: run_bench_app(args.run, photos=args.photos, thread_counts=args.thread_counts, out=args.out))


def _cmd_intake(args: argparse.Namespace) -> int:
    from fieldid.intake import bench_decode

    return _teed(args, "Full vs JPEG-draft decoding of a 24 MP photo",
                 lambda: bench_decode(target=args.target, repeat=args.repeat))


def _add_page(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--page", type=Path, default=None,
                   help=f"also write the table to this markdown page with date, commit and machine line "
                        f"(default: none; `make` writes docs/measured/bench-{name}.md)")


def _add_set_benchmark_flags(p: argparse.ArgumentParser, name: str, work_help: str, sets: str, only: str) -> None:
    """``--work``, ``--sets`` and ``--page`` of a benchmark over the real sets (`make bench-NAME`)."""
    p.add_argument("--work", type=Path, default=Path(f"runs/bench-{name}"), help=work_help)
    p.add_argument("--sets", default=sets, help="comma-separated sets")
    p.add_argument("--page", type=Path, default=None,
                   help=f"write the table to this markdown page with date, commit and machine line, for the {only} "
                        f"only (default: none; `make bench-{name}` writes docs/measured/bench-{name}.md)")


def _cmd_missing(args: argparse.Namespace) -> int:
    raise UsageError(f"name what to measure: {args.command_path} {{{','.join(args.names)}}} ... "
                     f"({args.command_path} --help lists them)")


def _register_train(what: argparse._SubParsersAction) -> None:
    t = what.add_parser("train", help="training: reference vs defaults, augmentation sweep, CPU speed choices, "
                                      "decode cache",
                        description="The training benchmarks, one per mode: `compare` (the reference fine-tune vs "
                                    "`fieldid train` with its defaults), `augment` (the augmentation sweep the "
                                    "defaults are chosen by), `choices` (the CPU speed settings training could "
                                    "pick) and `cache` (the decode cache off and on).")
    t.set_defaults(func=_cmd_missing, names=list(TRAIN_MODES), command_path="fieldid bench train")
    modes = t.add_subparsers(dest="mode", metavar="MODE")

    c = modes.add_parser("compare", help="the reference fine-tune vs `fieldid train` defaults on five small sets",
                         description="Builds small real datasets from images installed packages ship (scikit-learn's "
                                     "digits, scikit-image's faces and textures) plus the two demo sets, then runs, "
                                     "on the same split and one after the other, the reference fine-tune (3 epochs, "
                                     "AdamW 3e-4, 160 px, no augmentation) and `fieldid train` with its defaults: "
                                     "test accuracy, wall time and their ratio. Goal: fieldid >= reference "
                                     "accuracy in <= 2x its wall time.")
    c.add_argument("--work", type=Path, default=Path("runs/bench-train"), help="datasets, runs and logs go here")
    c.add_argument("--sets", default=_TRAIN_SETS, help="comma-separated datasets")
    c.add_argument("--demo-scale", type=float, default=0.12, help="size of the demo sets (1.0 = full)")
    c.add_argument("--train-args", default="",
                   help="extra `fieldid train` flags, e.g. '--config old.yaml' (default: none)")
    _add_page(c, "train-compare")
    c.set_defaults(func=_cmd_train_compare)

    a = modes.add_parser("augment", help="test accuracy per augmentation variant (the defaults are chosen by it)",
                         description="`fieldid train` on the compare datasets once per augmentation variant (the "
                                     "shipped defaults, the strong kind they replaced, none): test accuracy per "
                                     "dataset and variant, the mean per variant and the best one.")
    a.add_argument("--work", type=Path, default=Path("runs/bench-train"), help="datasets, runs and logs go here")
    a.add_argument("--sets", default=_TRAIN_SETS, help="comma-separated datasets")
    a.add_argument("--variants", default=_AUGMENT_VARIANTS, help="comma-separated augmentation variants")
    a.add_argument("--demo-scale", type=float, default=0.12, help="size of the demo sets (1.0 = full)")
    _add_page(a, "train-augment")
    a.set_defaults(func=_cmd_train_augment)

    h = modes.add_parser("choices", help="seconds per training step and inference pass: fp32, bf16 autocast, "
                                         "channels-last, the allocator",
                         description="Seconds per MobileNetV2 training step and per inference pass (160 px, batch "
                                     "32) under each CPU setting training could pick, and whether the CPU supports "
                                     "bf16; then glibc's malloc defaults against fieldid's (freed memory kept): "
                                     "seconds and page faults per step and peak RSS at 224 px, each in a fresh "
                                     "process.")
    _add_page(h, "train-choices")
    h.set_defaults(func=_cmd_train_choices)

    k = modes.add_parser("cache", help="training images/s with the decode cache off and on",
                         description="Real optimisation steps (forward, backward, AdamW) through the DataLoader "
                                     "settings training uses, decoding every epoch vs the uint8 cache; a second "
                                     "column times the DataLoader alone, which is what the cache changes.")
    k.add_argument("--data", type=Path, required=True, help="ImageFolder dataset")
    k.add_argument("--model", default="mobilenet_v2", help="backbone")
    k.add_argument("--image-size", type=int, default=None,
                   help="crop size in pixels (default: the size `fieldid train` picks for these photos)")
    k.add_argument("--batch-size", type=int, default=32, help="training batch size")
    k.add_argument("--steps", type=int, default=12, help="timed training steps per mode")
    k.add_argument("--json", type=Path, default=None, help="also write the rows here")
    _add_page(k, "train-cache")
    add_renamed(k, "bench train cache")
    k.set_defaults(func=_cmd_train_cache)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fieldid bench` and its subcommands to the `fieldid` parser."""
    from fieldid.export.formats import BENCH_SETTLE_S

    b = sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS),
                       description=__doc__.split("\n\n")[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_renamed(b, "bench")  # `fieldid bench --run RUN` / `--ood DIR`: now subcommands
    b.set_defaults(func=_cmd_missing, names=list(BENCHMARKS), command_path="fieldid bench")
    what = b.add_subparsers(dest="what", metavar="WHAT")

    p = what.add_parser("bundle", help="size, accuracy, latency and throughput of every exported artifact",
                        description="One row per artifact, eager PyTorch fp32 first: size, accuracy, agreement with "
                                    "eager, batch-1 latency p50/p95 with 1 thread and all threads, batch-32 "
                                    "throughput, load time; the goals under it; writes bench.json, .md and .png.")
    p.add_argument("--run", type=Path, required=True, help="run directory whose bundle is benchmarked")
    p.add_argument("--bundle", type=Path, default=None, help="export bundle (default: RUN/export)")
    p.add_argument("--data", type=Path, default=None,
                   help="ImageFolder to measure accuracy on (default: the run's held-out split)")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json/.md/.png (default: RUN/bench)")
    p.add_argument("--iters", type=int, default=50, help="timed batch-1 runs per thread setting")
    p.add_argument("--batch", type=int, default=32, help="batch size of the throughput column")
    p.add_argument("--batches", type=int, default=3, help="timed batches of the throughput column")
    p.add_argument("--limit", type=int, default=None, help="use at most this many held-out images (default: all)")
    p.add_argument("--settle", type=float, default=BENCH_SETTLE_S,
                   help="seconds to pause before each timed block so one runtime's spinning threads do not slow "
                        "the next (0 for a quick smoke run)")
    _add_page(p, "bundle")
    p.set_defaults(func=_cmd_bundle)

    c = what.add_parser("cascade", help="device alone vs server alone vs device-then-server on the held-out split",
                        description="The phone's file answers unless the fallback decision sends the photo to the "
                                    "server model; accuracy, share sent and latency of each, on the device run's "
                                    "held-out split; writes cascade.json and cascade.md.")
    c.add_argument("--run", type=Path, required=True, help="the device model's run directory")
    c.add_argument("--server-run", type=Path, required=True, help="the server model's run directory")
    c.add_argument("--bundle", type=Path, default=None, help="the device bundle (default: RUN/export)")
    c.add_argument("--server-bundle", type=Path, default=None, help="the server bundle (default: SERVER_RUN/export)")
    c.add_argument("--alone-run", type=Path, default=None,
                   help="the same device model trained without --teacher: adds its rows, so the table shows what "
                        "distillation buys (default: none)")
    c.add_argument("--out", type=Path, default=None, help="folder for cascade.json/.md (default: RUN/bench)")
    c.add_argument("--limit", type=int, default=None, help="use at most this many held-out images (default: all)")
    _add_page(c, "cascade")
    c.set_defaults(func=_cmd_cascade)

    o = what.add_parser("ood", help="the unknown answer of the phone's file on other and unseen photos",
                        description="DIR/other/ (other kinds of things, goal >= 95% flagged) and DIR/unseen/ (same "
                                    "kind, not trained on, >= 80%) vs the held-out split (>= 95% answered, >= 99% "
                                    "accurate); `fieldid data ood` makes such a folder; writes ood.json and ood.md. "
                                    "Each score (the detector, energy, max-logit, softmax) is also shown at the "
                                    "goal's acceptance: the share flagged with the cut moved to answer 95% of the "
                                    "held-out photos, whatever threshold training recorded.")
    o.add_argument("--run", type=Path, required=True, help="run directory")
    o.add_argument("--dir", type=Path, required=True, help="folder with other/ and/or unseen/ photos")
    o.add_argument("--bundle", type=Path, default=None, help="export bundle (default: RUN/export)")
    o.add_argument("--out", type=Path, default=None, help="folder for ood.json/.md (default: RUN/bench)")
    _add_page(o, "ood")
    o.set_defaults(func=_cmd_ood)

    q = what.add_parser("ood-real", help="the unknown answer on the real sets, classes held out of training",
                        description="Per real set with classes to spare (digits, scenes): `fieldid train` on its "
                                    "first classes with every default, the default ONNX export, then `fieldid bench "
                                    "ood` on the phone's file with the set's other classes as unseen photos and the "
                                    "other real sets' test photos, scikit-image's photos and generated images as "
                                    "other kinds of things. The rows go to WORK/bench-ood-real.json.")
    _add_set_benchmark_flags(q, "ood-real", "datasets, runs, ood folders and logs go here", _OOD_REAL_SETS,
                             "default sets")
    q.add_argument("--reuse", action="store_true",
                   help="keep a set's run and export from an earlier call (default: train and export again)")
    q.set_defaults(func=_cmd_ood_real)

    e = what.add_parser("export", help="export time and peak memory per format",
                        description="Each run is exported in its own process (`fieldid export`), so one export's "
                                    "peak cannot hide in another's; the numbers are the ones the export measured "
                                    "itself (its manifest's export_stats), next to the run's own training time. "
                                    "Goals: an export no longer than the training, peak RSS <= 3 GB.")
    e.add_argument("--run", type=Path, action="append", required=True, help="run directory (repeat for more)")
    e.add_argument("--formats", default=None, help="comma-separated formats (default: all)")
    e.add_argument("--out", type=Path, default=None, help="folder for the bundles (default: RUN/export)")
    e.add_argument("--reuse", action="store_true", help="read existing bundles' export_stats instead of exporting")
    _add_page(e, "export")
    e.set_defaults(func=_cmd_export)

    _register_train(what)

    r = what.add_parser("real", help="real photos: fieldid's defaults vs majority, linear probe and a reference "
                                     "fine-tune",
                        description="Per set (real photos and the two synthetic demo sets), on the split `fieldid "
                                    "train` makes: the majority answer, a linear probe on frozen ImageNet features, "
                                    "the plain reference fine-tune and `fieldid train` with nothing else; test "
                                    "accuracy, macro-F1, balanced accuracy, wall time, the share of photos sent to "
                                    "the server and whether the goals hold. The rows go to WORK/bench-real.json.")
    r.add_argument("--work", type=Path, default=Path("runs/bench-real"), help="datasets, runs and logs go here")
    r.add_argument("--sets", default=_REAL_SETS, help="comma-separated sets (with --collect: the sets kept)")
    r.add_argument("--skip", default="",
                   help="comma-separated methods to leave out: majority,probe,reference,fieldid (default: none)")
    r.add_argument("--train-args", default="",
                   help="extra `fieldid train` flags, e.g. '--config x.yaml' (default: none)")
    r.add_argument("--demo-scale", type=float, default=0.12, help="size of the synthetic demo sets (1.0 = full)")
    r.add_argument("--seeds", type=int, default=1,
                   help="run every method with seeds 0..N-1 (split, training and the reference's seed); the goals "
                        "are judged on the means")
    r.add_argument("--collect", type=Path, nargs="+", default=None,
                   help="no training: the table from the rows of earlier runs' WORK/bench-real.json files (sets "
                        "measured separately, e.g. the long inspection set on a quiet machine)")
    r.add_argument("--page", type=Path, default=None,
                   help="write the table to this markdown page with date, commit and machine line, for the "
                        "defaults' full comparison (no --skip, no --train-args) or --collect (default: none; "
                        "`make bench-real` writes docs/measured/bench-real.md)")
    r.add_argument("--page-title", default=None, help=f"the page's title (default: {_REAL_TITLE!r})")
    add_renamed(r, "bench real")
    r.set_defaults(func=_cmd_real)

    s = what.add_parser("serve", help="in-process engine vs TorchServe: latency, throughput, batching",
                        description="Every row does the same work per image (decode, preprocess, ONNX Runtime, "
                                    "answer JSON) through the serving engine; the server rows add HTTP, the Java "
                                    "frontend and the worker hop: handler vs bare ONNX, the draft decode of a 24 MP "
                                    "JPEG, TorchServe's overhead with a C client (ab) and the Python-client rows.")
    s.add_argument("--run", type=Path, default=None, help="run directory (its export/ bundle is served)")
    s.add_argument("--bundle", type=Path, default=None, help="export bundle directory (instead of --run)")
    s.add_argument("--requests", type=int, default=200, help="measured requests per row")
    s.add_argument("--threads", type=int, default=1, help="CPU threads in-process and per server worker")
    s.add_argument("--concurrency", type=int, default=8, help="concurrent clients measured besides 1")
    s.add_argument("--batch-on", type=int, default=8, help="server batch size of the batching-on rows")
    s.add_argument("--max-batch-delay-ms", type=int, default=5, help="server batch delay of the batching-on rows")
    s.add_argument("--device", default="auto", choices=("auto", "cpu"),
                   help="auto: first GPU when present (server and in-process alike), else CPU")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16"),
                   help="GPU precision on both sides (auto = fp16 where the bundle verified it; CPU always fp32)")
    s.add_argument("--netty-threads", type=int, default=0, help="servers' frontend threads (0 = TorchServe's default)")
    s.add_argument("--images", type=Path, default=None, help="folder of request images (default: real sample photos)")
    s.add_argument("--state-dir", type=Path, default=None, help="benchmark server state (default: RUN/serve-bench)")
    s.add_argument("--out", type=Path, default=None, help="results JSON (default: STATE_DIR/bench.json)")
    s.add_argument("--handler-only", action="store_true",
                   help="only the in-process handler rows (no TorchServe), e.g. for a second bundle")
    _add_page(s, "serve")
    add_renamed(s, "bench serve")
    s.set_defaults(func=_cmd_serve)

    a = what.add_parser("app", help="the web app's model in Chromium vs Python ONNX Runtime",
                        description="Builds the app for one bundle, serves it on loopback and lets Chromium classify "
                                    "the same photos through the page's own code path, with WebAssembly threads off "
                                    "and on, for every ONNX precision the bundle ships, next to Python ONNX Runtime "
                                    "at the same thread count; goal: in-browser p50 <= 3x Python's.")
    a.add_argument("--run", required=True, help="run folder (its export/ bundle) or bundle folder")
    a.add_argument("--photos", type=int, default=50, help="photos per row")
    a.add_argument("--thread-counts", type=int, nargs="*", default=None,
                   help="thread counts to measure (default: 1 and all cores)")
    a.add_argument("--out", type=Path, default=None, help="results JSON (default: RUN/bench/app.json)")
    _add_page(a, "app")
    add_renamed(a, "bench app")
    a.set_defaults(func=_cmd_app)

    i = what.add_parser("intake", help="full vs JPEG-draft decoding of a 24 MP photo",
                        description="Time full vs draft decoding of a 24 MP JPEG made from a scikit-image photo "
                                    "(6000x4000, quality 92), and how far the model's input moves.")
    i.add_argument("--target", type=int, default=256, help="resize target (shorter side, px)")
    i.add_argument("--repeat", type=int, default=7, help="timed decodes per row (median shown)")
    _add_page(i, "intake")
    i.set_defaults(func=_cmd_intake)

    d = what.add_parser("data", help="data check: planted label flips and near-duplicates on the real and demo sets",
                        description="Per set: one feature pass next to the full data check on its cache, then "
                                    "precision and recall of the flagged photos with 5% of the labels flipped and "
                                    "of the cross-split pairs with planted near-duplicates. The rows go to "
                                    "WORK/bench-data.json.")
    _add_set_benchmark_flags(d, "data", "datasets, planted copies and caches go here", _DATA_SETS,
                             "default sets and seed")
    d.add_argument("--seed", type=int, default=0, help="seed of the planted flips and copies")
    d.set_defaults(func=_cmd_data)
