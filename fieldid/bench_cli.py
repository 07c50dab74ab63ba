"""`fieldid bench <what>`: every benchmark is one subcommand (the `make bench*` targets run these).

* `bundle` -- size, accuracy, latency and throughput of every exported artifact (`make bench`);
* `cascade` -- device alone vs server alone vs device-then-server (`make bench-cascade`);
* `ood` -- the unknown answer of the phone's file on other and unseen photos;
* `export` -- export time and peak memory per format (`make bench-export`);
* `train` -- the reference fine-tune vs the defaults, the augmentation sweep, the CPU speed
  choices and the decode cache (`make bench-train`); `real` -- real photos vs the baselines;
* `serve` -- in-process vs TorchServe latency and throughput (`make bench-serve`);
* `app` -- the web app's model in Chromium vs Python ONNX Runtime (`make bench-app`);
* `intake` -- full vs JPEG-draft decoding of a 24 MP photo.

The benchmarks with their own command line (`python -m fieldid.<stage>.bench` and friends, which
keep working) take their arguments after the name, all passed on: `fieldid bench train compare
--work DIR`; `fieldid bench train --help` prints that benchmark's own help. `--page FILE`
(right after the name) writes the printed table to a markdown page with the date, commit and
machine line (`make` writes `docs/measured/`).
Torch-free until a benchmark runs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Iterator, NoReturn

from fieldid.cli_common import UsageError
from fieldid.cli_vocabulary import add_renamed

__all__ = ["register", "FORWARDED", "write_measured_page"]

# name -> (module:function taking argv, what it measures, its `python -m` spelling)
FORWARDED: dict[str, tuple[str, str, str]] = {
    "export": ("fieldid.export.bench_export:main", "export time and peak memory per format",
               "python -m fieldid.export.bench_export"),
    "train": ("fieldid.training.bench:main", "training: reference vs defaults (compare), augmentation sweep "
              "(augment), CPU speed choices (choices), decode cache (--data DIR)", "python -m fieldid.training.bench"),
    "real": ("fieldid.training.bench_real:main", "real photos: fieldid's defaults vs majority, linear probe and a "
             "reference fine-tune (writes docs/measured/bench-real.md)", "python -m fieldid.training.bench real"),
    "serve": ("fieldid.serve.bench:main", "in-process engine vs TorchServe: latency, throughput, batching",
              "python -m fieldid.serve.bench"),
    "app": ("fieldid.app.bench:main", "the web app's model in Chromium vs Python ONNX Runtime",
            "python -m fieldid.app.bench"),
    "intake": ("fieldid.intake:bench_decode", "full vs JPEG-draft decoding of a 24 MP photo", "python -m fieldid.intake"),
    "data": ("fieldid.training.bench_data:main", "data check: planted label flips and near-duplicates on the real "
             "and demo sets (writes docs/measured/bench-data.md)", "python -m fieldid.training.bench_data"),
}


def write_measured_page(path: str | Path, title: str, command: str, body: str) -> Path:
    """A measurement page: title, the command, date, commit and machine line, then `body` (the table).

    Every number in the docs comes from such a page, never typed by hand.
    """
    from fieldid.machine import measured_header
    from fieldid.records import atomic_write_text

    text = measured_header(title, command) + f"```\n{body.rstrip()}\n```\n"
    return atomic_write_text(Path(path), text)


def _page(args: argparse.Namespace, title: str, body: str) -> None:
    if args.page:
        command = "fieldid " + " ".join(shlex.quote(a) for a in getattr(args, "argv", None) or ["bench", args.what])
        print(f"written: {write_measured_page(args.page, title, command, body)}")


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
    from fieldid.export.cascade import cascade_bench

    r = cascade_bench(args.run, args.server_run, device_bundle=args.bundle, server_bundle=args.server_bundle,
                      alone_run=args.alone_run, out=args.out, limit=args.limit)
    print(r["table"])
    _page(args, f"Cascade: device, server and device-then-server ({Path(args.run).name})", r["table"])
    print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["cascade.json", "cascade.md"],
                      "goals": r["goals"]}))
    return 0


def _cmd_ood(args: argparse.Namespace) -> int:
    from fieldid.export.ood_bench import ood_bench

    r = ood_bench(args.run, args.dir, bundle=args.bundle, out=args.out)
    print(r["table"])
    _page(args, f"Unknown photos ({Path(args.run).name})", r["table"])
    print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["ood.json", "ood.md"],
                      "goals_met": r["goals_met"]}))
    return 0


@contextlib.contextmanager
def _parser_errors_as_one_line(name: str) -> Iterator[None]:
    """A forwarded benchmark's own argparse error is one ``error:`` line and exit 2, as fieldid's own parsers do."""

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        self.exit(2, f"fieldid: error: bench {name}: {message} (see `fieldid bench {name} --help`)\n")

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def _forward(name: str) -> Callable[[argparse.Namespace], int]:
    target, what, _ = FORWARDED[name]

    def run(args: argparse.Namespace) -> int:
        with _parser_errors_as_one_line(name):
            return _run(list(args.args))

    def _run(argv: list[str]) -> int:
        module, _, func = target.partition(":")
        main: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
        page: Path | None = None
        given = list(argv)  # as typed, for the page's "Written by" line
        if name not in ("real", "data") and "--page" in argv:  # ours, anywhere; the rest is the benchmark's own
            at = argv.index("--page")
            if at + 1 >= len(argv) or argv[at + 1].startswith("-"):
                raise UsageError("--page needs a FILE")
            page, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
        if page is None:
            return int(main(argv) or 0)
        buf = io.StringIO()

        class _Tee(io.TextIOBase):  # the table still streams to the terminal while it is captured
            def write(self, s: str) -> int:
                sys.__stdout__.write(s)
                return buf.write(s)

        with contextlib.redirect_stdout(_Tee()):
            rc = int(main(argv) or 0)
        if rc == 0:
            _page(argparse.Namespace(page=page, argv=["bench", name, *given]),
                  what[:1].upper() + what[1:], buf.getvalue())
        return rc

    return run


def _add_page(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--page", type=Path, default=None,
                   help=f"also write the table to this markdown page with date, commit and machine line "
                        f"(default: none; `make` writes docs/measured/bench-{name}.md)")


def _cmd_missing(args: argparse.Namespace) -> int:
    raise UsageError("name what to measure: fieldid bench {" + ",".join(args.names) + "} ... "
                     "(fieldid bench --help lists them)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `fieldid bench` and its subcommands to the `fieldid` parser."""
    from fieldid.export.formats import BENCH_SETTLE_S

    b = sub.add_parser("bench", help="benchmarks: bundle, cascade, ood, export, train, real, serve, app, intake",
                       description=__doc__.split("\n\n")[1] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_renamed(b, "bench")  # `fieldid bench --run RUN` / `--ood DIR`: now subcommands
    names = ["bundle", "cascade", "ood", *FORWARDED]
    b.set_defaults(func=_cmd_missing, names=names)
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
                        description="DIR/other/ (other kinds of things, goal >= 95%% flagged) and DIR/unseen/ (same "
                                    "kind, not trained on, >= 80%%) vs the held-out split (>= 95%% answered, >= 99%% "
                                    "accurate); `fieldid data ood` makes such a folder; writes ood.json and ood.md.")
    o.add_argument("--run", type=Path, required=True, help="run directory")
    o.add_argument("--dir", type=Path, required=True, help="folder with other/ and/or unseen/ photos")
    o.add_argument("--bundle", type=Path, default=None, help="export bundle (default: RUN/export)")
    o.add_argument("--out", type=Path, default=None, help="folder for ood.json/.md (default: RUN/bench)")
    _add_page(o, "ood")
    o.set_defaults(func=_cmd_ood)

    for name, (_target, summary, spelling) in FORWARDED.items():
        # Every argument goes to the benchmark's own parser (no prefix character is ours, so argparse
        # reads none of them as a flag here); `--help` prints that parser's help.
        f = what.add_parser(name, help=summary, add_help=False, prefix_chars="\x00",
                            description=f"{summary[:1].upper() + summary[1:]}. The arguments after the name are "
                                        f"this benchmark's own (as `{spelling}`)"
                                        + ("." if name in ("real", "data") else "; `--page FILE` (anywhere) also "
                                           "writes the table to a markdown page."))
        f.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                       help=f"the benchmark's own arguments (`{spelling} --help`)")
        f.set_defaults(func=_forward(name))
