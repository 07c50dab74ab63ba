"""The one CLI vocabulary: every flag of the ``fieldid`` command, what it means and its one default.

A flag name means the same thing, with the same default, in every command that has it.
``tests/test_cli_vocabulary.py`` walks every parser of ``fieldid`` and checks each flag against
this table (and that its help shows the default); ``python -m fieldid.docs_gen`` writes the
table into the docs. Renamed flags are kept for one release as hidden flags that refuse with a
one-line hint naming the new name (:func:`add_renamed`). Stdlib only.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, NoReturn

__all__ = ["Flag", "VOCABULARY", "PER_COMMAND", "CONFIG_DEFAULT", "RENAMED", "add_renamed", "vocabulary_markdown"]

# A default that differs by command on purpose (a port per service, a page per benchmark).
PER_COMMAND = "per command"
# train/tune flags that override a TrainConfig key: unset (None) means the config's value, which is
# the table's default (`fieldid train --help` says "default from config: ...").
CONFIG_DEFAULT = "from the config"


@dataclass(frozen=True)
class Flag:
    """One flag of the vocabulary: its meaning and its one default."""

    meaning: str
    default: Any = None
    # A `TrainConfig` override (train, tune): unset means the config's value, which is ``default``.
    config_override: bool = False
    # Its TrainConfig key when it is not the flag's own name.
    config_key: str = ""


def _cfg(meaning: str, default: Any, key: str = "") -> Flag:
    return Flag(meaning, default, config_override=True, config_key=key)


VOCABULARY: dict[str, Flag] = {
    # ---- what a command reads and writes
    "--run": Flag("a run folder written by `fieldid train` (where a bundle is read: its `export/` bundle)"),
    "--bundle": Flag("an export bundle folder (with `manifest.json`), instead of a run's own"),
    "--data": Flag("an ImageFolder dataset (one folder per class, or train/val/test)"),
    "--out": Flag("where this command writes its result (a folder or a file, as its help says)"),
    "--config": Flag("a YAML file of `TrainConfig` keys (`training/configs/*.yaml`)"),
    "--state-dir": Flag("the state folder of a `fieldid serve start` server (config, logs, `key_file.json`)"),
    "--server-run": Flag("the *server* model (run or bundle) a device model falls back to: its answers are used "
                         "for the device run's unsure photos (labels checked to match)"),
    "--device-run": Flag("the *device* model (run or bundle) whose fallback the served model answers (labels "
                         "checked to match); the opposite direction of --server-run"),
    "--server-bundle": Flag("the server model's bundle (default: SERVER_RUN/export)"),
    "--alone-run": Flag("the device model trained without the teacher (the cascade bench's comparison row)"),
    "--page": Flag("the markdown page under docs/measured/ a benchmark writes its table to (date, commit, machine)"),
    "--page-title": Flag("the title of the page a benchmark writes (bench real: its own default title)"),
    "--json": Flag("also write the result as JSON to this file"),
    "--artifact": Flag("one artifact file of the bundle to run, e.g. model.int8.pte"),
    "--formats": Flag("comma-separated export formats (default: all)"),
    "--meta": Flag("YAML file of the words an app tab shows ([KEY=]FILE)"),
    "--title": Flag("the app's title for its one model"),
    "--description": Flag("the line under the app's title for its one model"),
    "--ort-dir": Flag("onnxruntime-web's dist/ folder for the app build"),
    "--exclude": Flag("a file listing photos to leave out of training (as `fieldid data check --write-exclude` writes)"),
    "--teacher": _cfg("a finished run to distil from (the server model; same labels)", None),
    "--weights": _cfg("a local state-dict file for the backbone", None),
    "--resume": Flag("an interrupted run folder to continue"),
    "--dir": Flag("the folder of photos the unknown-answer bench reads (other/ and unseen/)"),
    # ---- model and training
    "--model": _cfg("the backbone (mobilenet_v2, efficientnet_lite0, efficientnet_lite2 or timm/<name>)", "mobilenet_v2"),
    "--image-size": _cfg("crop size in pixels (unset: matched to the photos, as `fieldid train` picks it)", None),
    "--epochs": _cfg("most training epochs, head-only ones included", 8),
    "--batch-size": _cfg("training batch size", 32),
    "--lr": _cfg("fine-tuning learning rate", 3e-4),
    "--seed": _cfg("random seed", 0),
    "--objective": _cfg("what model selection and early stopping optimise", "accuracy"),
    "--imbalance": _cfg("class-imbalance handling", "auto"),
    "--batchnorm": _cfg("BatchNorm statistics while fine-tuning (auto, adapt, train, frozen)", "auto"),
    "--no-pretrained": Flag("random initialisation instead of ImageNet weights", False),
    "--no-hue": Flag("turn hue jitter off (colour is the signal)", False),
    "--no-cache": Flag("decode images from disk every epoch instead of the uint8 cache", False),
    "--accelerator": _cfg("Lightning accelerator (cpu, gpu, auto)", "auto"),
    "--devices": _cfg("Lightning devices per node", "1"),
    "--strategy": _cfg("Lightning strategy (auto, ddp, ...)", "auto"),
    "--num-nodes": _cfg("nodes for multi-node DDP", 1),
    "--train-precision": _cfg("Lightning numeric precision of training (32-true, 16-mixed, bf16-mixed; unset: mixed "
                              "on a GPU, 32-true on a CPU)", None, "precision"),
    "--num-workers": _cfg("decode/augmentation worker processes", None),
    "--distill-weight": _cfg("share of the teacher's soft-label loss", 0.5),
    "--distill-temperature": _cfg("distillation temperature", 2.0),
    # ---- which model runs, and how
    "--precision": Flag("the precision of the bundle's ONNX model that runs: auto = the phone contract's choice "
                        "on a device (verified int8, else fp32) and fp16 on a GPU server when verified, else "
                        "fp32; or a precision by name", "auto"),
    "--threads": Flag("CPU threads of one model runtime (a phone gives a model one or two cores)", 1),
    "--top-k": Flag("classes listed per answer", 3),
    "--timeout": Flag("seconds to wait for the server's answer to one photo", 5.0),
    "--max-pixels": Flag("larger decoded images are refused (413)", 100_000_000),
    "--calibration-size": Flag("training images used to calibrate the int8 models", 200),
    "--no-int8": Flag("write the fp32 artifacts only (a server model)", False),
    "--strict": Flag("any artifact that misses its bar fails the export", False),
    "--allow-drop": Flag("deprecated: the default now; accepted for one release", False),
    # ---- talking to a server
    "--server": Flag("the fallback server's inference URL (http(s)://HOST:PORT), asked when the device is unsure"),
    "--key-file": Flag("the server's key_file.json (its inference key goes only to the server it belongs to)"),
    "--ca-file": Flag("PEM certificate (or CA) to verify an https server with"),
    "--no-server": Flag("never ask a server (on-device answers only)", False),
    # ---- serving (TorchServe and the app's static server)
    "--host": Flag("the address this command's server listens on", "127.0.0.1"),
    "--port": Flag("the port this command's server listens on", PER_COMMAND),
    "--certfile": Flag("PEM certificate: serve HTTPS (with --keyfile)"),
    "--keyfile": Flag("PEM private key of --certfile"),
    "--start-timeout": Flag("seconds to wait for a started server's workers to be READY", 180.0),
    "--stop-timeout": Flag("seconds of graceful shutdown before SIGKILL", 30.0),
    "--response-timeout": Flag("seconds before TorchServe restarts a stuck worker", 60),
    "--management-port": Flag("TorchServe management API port (loopback)", 8081),
    "--metrics-port": Flag("TorchServe metrics API port (loopback)", 8082),
    "--grpc-port": Flag("TorchServe gRPC inference port (loopback)", 7070),
    "--grpc-management-port": Flag("TorchServe gRPC management port (loopback; unset: --grpc-port + 1)"),
    "--no-auth": Flag("turn TorchServe's token authorization off (local development only)", False),
    "--token-expiry-min": Flag("minutes until the keys in key_file.json expire", 1440.0),
    "--workers": Flag("TorchServe Python workers per model", 1),
    "--max-batch": Flag("TorchServe server-side batch size (1 = batching off)", 1),
    "--max-batch-delay-ms": Flag("how long a server-side batch waits to fill up", 5),
    "--max-request-mb": Flag("larger request bodies are refused (413)", 20.0),
    "--device": Flag("where the server runs its model (auto = a GPU when present)", "auto"),
    "--job-queue-size": Flag("requests queued per model before the server answers 503", 100),
    "--netty-threads": Flag("TorchServe frontend threads (0 = its default, one per core)", 0),
    "--netty-client-threads": Flag("TorchServe frontend threads talking to the workers (0 = its default)", 0),
    "--cors-origin": Flag("browser origin allowed to call the inference API"),
    "--kind": Flag("which TorchServe key", "inference"),
    "--proxy": Flag("forward POST /predictions/... to this TorchServe inference root"),
    "--log": Flag("log every request", False),
    # ---- tune
    "--trials": Flag("finished trials the study should reach (default: 20)"),
    "--storage": Flag("Optuna storage URL (sqlite:///FILE or postgresql://...)"),
    "--study": Flag("Optuna study name"),
    "--space": Flag("YAML search space"),
    "--pruner": Flag("how bad trials are stopped early", "median"),
    "--heartbeat": Flag("seconds between a trial's heartbeats", 60),
    "--sampler-seed": Flag("TPE sampler seed"),
    # ---- data tools
    "--report": Flag("write a self-contained HTML report to this file"),
    "--write-exclude": Flag("write the photos to leave out of training to this file"),
    "--exclude-kinds": Flag("what --write-exclude lists", "label,duplicate,conflict,outlier"),
    "--write-relabel": Flag("write the label issues as CSV to this file"),
    "--fast": Flag("hashes, files and photo quality only (no backbone features)", False),
    "--folds": Flag("cross-validation folds of the linear probe", 5),
    "--dup-similarity": Flag("aligned-thumbnail similarity at or above which two photos are near-duplicates", 0.95),
    "--cache-dir": Flag("feature cache folder"),
    "--near-threshold": Flag("max perceptual-hash Hamming distance for near duplicates", 4),
    "--min-side": Flag("flag images whose shorter side is below N pixels", 32),
    "--scale": Flag("multiply the demo set's per-class image counts", 1.0),
    "--unseen": Flag("class folders of the same kind the model was not trained on", []),
    "--other": Flag("folders of other datasets", []),
    "--generated": Flag("generated gradient / noise / stripe images", 120),
    # ---- benchmarks
    "--iters": Flag("timed batch-1 runs per thread setting", 50),
    "--batch": Flag("batch size of the throughput column", 32),
    "--batches": Flag("timed batches of the throughput column", 3),
    "--limit": Flag("use at most this many held-out images"),
    "--settle": Flag("seconds to pause before each timed block", 0.3),
    "--work": Flag("the folder a benchmark builds its datasets, runs and logs in", PER_COMMAND),
    "--sets": Flag("comma-separated datasets a benchmark runs on", PER_COMMAND),
    "--demo-scale": Flag("size of a benchmark's synthetic demo sets (1.0 = full)", 0.12),
    "--seeds": Flag("seeds per set and method of the real-photo benchmark; its goals are judged on the means", 1),
    "--train-args": Flag("extra `fieldid train` flags for a benchmark's fieldid runs, e.g. '--config x.yaml'", ""),
    "--skip": Flag("comma-separated methods a benchmark leaves out", ""),
    "--collect": Flag("JSON row files of earlier benchmark runs to make the table from, without training"),
    "--variants": Flag("comma-separated augmentation variants of the augmentation sweep", "defaults,strong,none"),
    "--steps": Flag("timed training steps per mode", 12),
    "--reuse": Flag("read existing bundles' export_stats instead of exporting", False),
    "--requests": Flag("measured requests per row", 200),
    "--concurrency": Flag("concurrent clients measured besides 1", 8),
    "--batch-on": Flag("server-side batch size of the benchmark's batching-on rows", 8),
    "--images": Flag("a folder of request images (unset: real sample photos)"),
    "--handler-only": Flag("only the in-process handler rows (no TorchServe)", False),
    "--photos": Flag("photos per row of a benchmark", 50),
    "--thread-counts": Flag("the thread counts a benchmark measures (unset: 1 and all cores)"),
    "--target": Flag("the resize target (shorter side, px) of the decode benchmark", 256),
    "--repeat": Flag("timed repetitions per row (the median is shown)", 7),
    # ---- everywhere
    "--quiet": Flag("no progress lines", False),
    "--verbose": Flag("debug logging and full tracebacks", False),
    "--version": Flag("print the version and exit"),
    "--help": Flag("show the help and exit"),
}

# (command, old flag) -> new flag: refused with a one-line hint for one release.
RENAMED: dict[tuple[str, str], str] = {
    ("train", "--precision"): "--train-precision",
    ("tune", "--precision"): "--train-precision",
    ("serve start", "--timeout"): "--start-timeout",
    ("serve stop", "--timeout"): "--stop-timeout",
    ("serve start", "--certificate"): "--certfile",
    ("serve start", "--private-key"): "--keyfile",
    ("serve start", "--batch-size"): "--max-batch",
    ("demo", "--serve-state"): "--state-dir",
    ("bench", "--ood"): "`fieldid bench ood --dir DIR`",
    ("bench", "--run"): "`fieldid bench bundle --run RUN` (benchmarks are subcommands: fieldid bench --help)",
    ("bench serve", "--batch-size"): "--batch-on",
    ("bench train cache", "--batches"): "--steps",
    ("bench app", "--threads"): "--thread-counts",
    ("bench real", "--title"): "--page-title",
}


class _Renamed(argparse.Action):
    """A flag that was renamed: using it is a usage error naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> NoReturn:
        if self.new.startswith("`"):  # not a flag any more: a subcommand
            parser.error(f"{option_string} moved: use {self.new}")
        parser.error(f"{option_string} was renamed: use {self.new}")


def add_renamed(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the hidden, refusing old spellings that :data:`RENAMED` lists for ``command``.

    Example:
        >>> p = argparse.ArgumentParser(prog="fieldid demo", exit_on_error=False)
        >>> add_renamed(p, "demo")
        >>> [a.option_strings for a in p._actions if isinstance(a, _Renamed)]
        [['--serve-state']]
    """
    for (cmd, old), new in RENAMED.items():
        if cmd == command:
            parser.add_argument(old, action=_Renamed, new=new, dest=f"_renamed_{old.strip('-').replace('-', '_')}")


def vocabulary_markdown() -> str:
    """The vocabulary as a markdown table (the docs' CLI page), then the renamed flags."""
    def shown(f: Flag) -> str:
        if f.default is None:
            return "none"
        if f.default is False:
            return "off"
        return f"{f.default} (from the training config)" if f.config_override else str(f.default)

    lines = ["| flag | meaning | default |", "|---|---|---|"]
    for name in sorted(VOCABULARY):
        f = VOCABULARY[name]
        lines.append(f"| `{name}` | {f.meaning.replace('|', '/')} | {shown(f)} |")
    lines += ["", "Renamed (the old spelling is refused with a hint naming the new one, for one release):", "",
              "| command | old | new |", "|---|---|---|"]
    for (cmd, old), new in RENAMED.items():
        lines.append(f"| `fieldid {cmd}` | `{old}` | {new if new.startswith('`') else f'`{new}`'} |")
    return "\n".join(lines) + "\n"
