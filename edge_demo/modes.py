"""One demo mode (Dive or Shop): a bundle, its on-device models, its examples and its words.

:class:`DemoMode` holds everything a tab of the app needs and does the work without any UI:
photo bytes in, an :class:`Outcome` out (on-device answer, and the server's when the device
was unsure or the user asked). ``fieldid.edge_demo.app`` only renders outcomes. Torch-free.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fieldid.appmeta import DEMO_PRESETS, pretty_label
from fieldid.export.manifest import Manifest, ManifestError, check_pair, load_manifest
from fieldid.export.phone import (DEFAULT_MAX_PIXELS, MAX_FILE_BYTES, ImageInputError, PhoneAnswer, PhoneError,
                                  PhoneModel, onnx_precisions, select_artifact)
from fieldid.intake import ACCEPTED_NAMES

from .device import DemoError, bundle_dir_of
from .examples import DataOrigin, Example, data_origin, example_images, unknown_examples
from .fallback import DEFAULT_TIMEOUT_S, ServerConfig, ServerReply, ask_server

__all__ = ["MODES", "DemoMode", "Outcome", "friendly_image_error", "file_too_large"]

# The demo's two modes are the demo models' presets (reef fish -> Dive, salmon -> Shop).
MODES = DEMO_PRESETS


def friendly_image_error(e: ImageInputError) -> str:
    """A sentence for the user about a photo the app cannot use (the app keeps working)."""
    if e.status == 400:
        return "No photo received. Take a photo or upload one."
    if e.status == 413:
        return f"That photo is too large ({e}). Use your camera's normal resolution or a smaller copy."
    return f"That file is not a photo this app can read. Use a photo ({ACCEPTED_NAMES})."


def file_too_large(num_bytes: int, limit: int = MAX_FILE_BYTES) -> ImageInputError:
    """The 413 error for a file over ``limit`` bytes (checked before reading or decoding it)."""
    return ImageInputError(f"{num_bytes / 1e6:.0f} MB; the limit is {limit / 1e6:.0f} MB", 413)


@dataclass
class Outcome:
    """Everything one tap produced; ``error`` is set (and answers empty) for unusable input."""

    device: PhoneAnswer | None = None
    server: ServerReply | None = None
    asked_because: str = ""  # "low confidence" | "you asked" | "" (server not asked)
    error: str = ""
    true_label: str = ""  # set when the photo is one of the held-out examples

    def to_dict(self) -> dict:
        """JSON-ready view (the app's raw-answer panel and the API tests read this)."""
        return {
            "device": self.device.response if self.device else None,
            "device_timings_ms": self.device.timings_ms if self.device else None,
            "server": self.server.response if self.server and self.server.ok else None,
            "server_message": self.server.message if self.server else "",
            "server_round_trip_ms": self.server.round_trip_ms if self.server else None,
            "asked_server_because": self.asked_because,
            "error": self.error,
            "true_label": self.true_label or None,
        }


class DemoMode:
    """One tab: a bundle run on the device, with the server as fallback.

    Args:
        key: ``"dive"`` or ``"shop"`` (selects the words in :data:`MODES`).
        source: a run folder (its ``export/`` bundle is used) or a bundle folder.
        precision: default on-device precision, ``auto`` | ``int8`` | ``fp32``.
        server: the TorchServe to ask (URL and key file), or None to never ask a server.
        timeout: seconds to wait for the server.
        threads: ONNX Runtime intra-op threads.
        top_k: classes shown per answer.

    Example:
        >>> mode = DemoMode("dive", "runs/reef", server=ServerConfig("http://127.0.0.1:8080"))  # doctest: +SKIP
        >>> mode.identify(open("fish.jpg", "rb").read()).device.response["top_k"][0]["label"]  # doctest: +SKIP
        'blue_tang'
    """

    def __init__(self, key: str, source: str | Path, *, precision: str = "auto", server: ServerConfig | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, threads: int = 1, top_k: int = 3,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        if key not in MODES:
            raise DemoError(f"unknown mode {key!r}; valid: {', '.join(MODES)}")
        self.info = MODES[key]
        self.source = Path(source)
        self.bundle_dir = bundle_dir_of(source)
        self.server, self.timeout = server, timeout
        # The model the server is asked for: this bundle's own name unless a stronger server model
        # was paired with it (use_server_model, after the label check).
        self.server_model = ""
        self.threads, self.top_k, self.max_pixels = threads, top_k, max_pixels
        self._models: dict[str, PhoneModel] = {}
        # Load the default model now: a broken bundle must fail at start, not at the first photo.
        first = self._load(precision)
        self.manifest: Manifest = first.manifest
        self.default_precision = first.precision
        self.notice = first.notice
        self.precisions = onnx_precisions(self.manifest)
        self.examples: list[Example] = example_images(self.source, self.manifest)
        # Generated non-photos (bundles with an unknown detector): the right answer is "unknown".
        self.unknown_examples: list[Example] = unknown_examples(self.source, self.manifest)
        self.origin: DataOrigin = data_origin(self.source, self.manifest)
        # Recognise a clicked example by its bytes, to show its true class beside the answer.
        self._truth = {hashlib.sha256(e.path.read_bytes()).hexdigest(): e.label
                       for e in self.examples + self.unknown_examples}

    @property
    def key(self) -> str:
        return self.info.key

    def _load(self, precision: str) -> PhoneModel:
        try:
            m = PhoneModel(self.bundle_dir, precision, threads=self.threads, max_pixels=self.max_pixels)
        except PhoneError:
            raise  # no such precision, a damaged file: the phone contract's own message
        except ManifestError as e:  # an unreadable bundle: the demo cannot start with it
            raise DemoError(str(e)) from None
        self._models[m.precision] = m
        return m

    def model(self, precision: str | None = None) -> PhoneModel:
        """The on-device model of ``precision`` (default: the mode's), loaded once."""
        precision = precision or self.default_precision
        if precision not in self._models:
            select_artifact(self.manifest, precision)  # clear error before any loading
            self._load(precision)
        return self._models[precision]

    def identify(self, image_bytes: bytes | None, precision: str | None = None, *,
                 force_server: bool = False) -> Outcome:
        """Run the photo on the device; ask the server when unsure or when ``force_server``.

        Never raises for bad photos or server trouble: the outcome says what happened.
        """
        out = self.on_device(image_bytes, precision, force_server=force_server)
        if out.asked_because:
            out.server = self.ask_server(image_bytes)  # type: ignore[arg-type]
        return out

    def on_device(self, image_bytes: bytes | None, precision: str | None = None, *,
                  force_server: bool = False) -> Outcome:
        """The device's half of :meth:`identify`: its answer, and whether the server is to be asked.

        ``asked_because`` is set when the server should be asked (the caller then calls
        :meth:`ask_server`); ``server`` stays None. The app uses this to show the on-device
        answer before the server's arrives.
        """
        if not image_bytes:
            return Outcome(error=friendly_image_error(ImageInputError("empty", 400)))
        if len(image_bytes) > MAX_FILE_BYTES:
            return Outcome(error=friendly_image_error(file_too_large(len(image_bytes))))
        try:
            answer = self.model(precision).predict(image_bytes, k=self.top_k)
        except ImageInputError as e:
            return Outcome(error=friendly_image_error(e))
        except PhoneError as e:  # e.g. a precision this bundle does not have
            return Outcome(error=str(e))
        out = Outcome(device=answer, true_label=self._truth.get(hashlib.sha256(image_bytes).hexdigest(), ""))
        if force_server:
            out.asked_because = "you asked"
        elif answer.response["needs_fallback"] and self.server:
            out.asked_because = "it is none of the classes it knows" if answer.response["unknown"] else "low confidence"
        return out

    def use_server_model(self, source: str | Path) -> Manifest:
        """Ask the server for the model of bundle (or run) ``source`` instead of this one's.

        Raises:
            DemoError: ``source`` is not a readable bundle.
            fieldid.export.manifest.CascadeError: its labels differ from this mode's (content or
                order): its answers could not stand in for the device's.
        """
        try:
            server = load_manifest(bundle_dir_of(source))
        except ManifestError as e:
            raise DemoError(str(e)) from None
        check_pair(self.manifest, server)
        self.server_model = server.name
        return server

    def unknown_words(self) -> str:
        """How an unknown answer reads: "Not one of the 9 species I know" (never a species at 100%)."""
        noun = "species" if self.key == "dive" else "classes"
        return f"Not one of the {len(self.manifest.labels)} {noun} I know"

    @property
    def server_model_name(self) -> str:
        """The model name the server is asked for."""
        return self.server_model or self.manifest.name

    def ask_server(self, image_bytes: bytes) -> ServerReply:
        """The server's answer for this mode's model (never raises; see :func:`ask_server`)."""
        if not self.server:
            return ServerReply(ok=False, message="no server is configured (start the demo with --server URL)")
        return ask_server(self.server, self.server_model_name, image_bytes, timeout=self.timeout)

    # ---- words ----------------------------------------------------------------------------

    @property
    def knows_demo_classes(self) -> bool:
        """True when the bundle's classes are the ones this mode's words describe."""
        return set(self.manifest.labels) <= set(self.info.class_notes)

    def summary_markdown(self) -> str:
        """The always-visible lines under the tab: what it does, its cue, and the data caveat."""
        what = (self.info.summary if self.knows_demo_classes else
                "This bundle's classes: " + ", ".join(pretty_label(x) for x in self.manifest.labels) + ".")
        text = f"**{self.info.description}** {what}"
        if self.origin.synthetic:
            text += "  \n<small>⚠ Trained on synthetic pictures, not photographs: see *About this mode*.</small>"
        return text

    def explanation_markdown(self) -> str:
        """What this mode does, what the classes mean and where the training data came from."""
        notes = self.info.class_notes
        lines = [f"**{self.info.description}**", "",
                 f"This model knows {len(self.manifest.labels)} classes:"]
        for label in self.manifest.labels:
            note = notes.get(label)
            lines.append(f"- **{pretty_label(label)}**" + (f": {note}" if note else ""))
        if not self.knows_demo_classes:
            lines.append("")
            lines.append("(These classes come from the bundle, not from the built-in demo set.)")
        else:
            lines += ["", self.info.cue]
        lines += ["", self._origin_sentence(), "", self._fallback_sentence()]
        return "\n".join(lines)

    def _origin_sentence(self) -> str:
        if self.origin.synthetic:
            return ("⚠ The built-in training data is **synthetic**: pictures drawn by a program "
                    "(`fieldid data demo`), not photographs. The model shows how the pipeline works; "
                    "it is not a field guide and will do poorly on real photos.")
        if self.origin.root is not None:
            return f"Trained on the photos in `{self.origin.root}`."
        return "The training data of this bundle is not on this machine."

    def _fallback_sentence(self) -> str:
        t = self.manifest.fallback_threshold
        where = (f"the server model `{self.server_model_name}` at {self.server.url}" if self.server
                 else "a server (none configured)")
        unknown = " or the photo is none of its classes (its unknown score)" if self.manifest.unknown else ""
        return (f"The model runs **on this device**. When its calibrated confidence is below "
                f"**{t:.0%}**{unknown} it asks {where}; you can also press *Ask the server*.")

    def model_card_markdown(self) -> str:
        """Sizes, verification and calibration of the on-device models, as a table."""
        m = self.manifest
        rows = ["| model | size | vs PyTorch |", "|---|---|---|"]
        for p in self.precisions:
            a = m.find("onnx", p)
            v = a.verification or {}
            agree = v.get("top1_agreement")
            detail = v.get("status", "unknown") + (f", agrees {agree:.1%}" if isinstance(agree, float) else "")
            rows.append(f"| {p} ONNX | {a.size_bytes / 1e6:.1f} MB | {detail} |")
        acc = m.metrics.get("accuracy")
        extra = [f"Bundle **{m.name}** ({m.backbone}, {m.preprocess_spec.crop_size} px input), "
                 f"temperature {m.temperature:.3g}, fallback below {m.fallback_threshold:.0%}."]
        if isinstance(acc, (int, float)):
            extra.append(f"Held-out accuracy of the run: {acc:.1%} on {m.metrics.get('num_images', '?')} images.")
        if self.notice:
            extra.append(f"Note: {self.notice}")
        return "\n".join(rows) + "\n\n" + " ".join(extra)
