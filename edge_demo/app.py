"""The Gradio field app: one tab per :class:`~edge_demo.modes.DemoMode`, phone-sized layout.

Rendering only; the work is in :mod:`fieldid.edge_demo.modes`. Offline by construction: analytics
off, system fonts (no font downloads), no share link, server-side rendering off.
API endpoints (for ``gradio_client``): ``/<mode>_identify`` and ``/<mode>_ask_server``, each
taking ``(photo, precision)`` and returning ``(device label, device text, server label,
server text, raw answers)``. Both are generators: when the server is asked, the on-device
answer is shown first and the server's follows (``Client.predict`` returns the final one).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

# Gradio reads this on import; the app must not phone home (analytics, version check).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from fieldid.cli_common import UsageError  # noqa: E402
from fieldid.export.phone import ImageInputError  # noqa: E402

from .examples import UNKNOWN_LABEL  # noqa: E402
from .modes import MAX_FILE_BYTES, DemoMode, Outcome, file_too_large, friendly_image_error, pretty_label  # noqa: E402

__all__ = ["photo_bytes", "build_app", "launch_app", "DEFAULT_PORT", "DELETE_CACHE", "THEME", "CSS"]

DEFAULT_PORT = 7860
# Gradio stores every upload in its cache folder. Users' photos are deleted there once they are
# 30 minutes old (checked every 5 minutes), and all of them when the app stops; the bundle's
# example photos are kept. (frequency, age) in seconds, Gradio's ``delete_cache``.
DELETE_CACHE = (300, 1800)

# System fonts: a phone-like look that needs no font download.
_SYSTEM_FONTS = ["system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica Neue", "Arial", "sans-serif"]
THEME = gr.themes.Soft(primary_hue="teal", secondary_hue="orange", neutral_hue="slate",
                       font=_SYSTEM_FONTS, font_mono=["ui-monospace", "Menlo", "Consolas", "monospace"])
CSS = """
.gradio-container { max-width: 760px !important; margin: 0 auto !important; }
#fieldid-header h1 { margin-bottom: 0.1em; }
#fieldid-header p { margin-top: 0; opacity: 0.85; }
.fieldid-answer { min-height: 3em; }
.fieldid-error { color: #b45309; font-weight: 600; }
@media (max-width: 480px) {
  .gradio-container { padding: 6px !important; }
  #fieldid-header h1 { font-size: 1.4em; }
}
"""
_HEADER = ("# fieldid field ID\n"
           "The model runs **on this device** (ONNX Runtime, no PyTorch, like a phone); "
           "it asks the server only when it is unsure.")


def photo_bytes(payload: Any, *, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """The photo's bytes from an un-preprocessed ``gr.Image`` payload; None when there is none.

    The app's events run with ``preprocess=False``: Gradio's own image preprocessing decodes
    with Pillow and fails with a generic error on a non-image (and knows no HEIC). The bytes go
    instead to :func:`fieldid.export.phone.decode_image`, the intake policy a phone or the server
    applies (:mod:`fieldid.intake`), so bad input gets a friendly message. Gradio has already
    checked that the file is one of its uploads, and refused one over ``MAX_FILE_BYTES``
    (``max_file_size``) before storing it; the check here covers inline camera captures.

    Raises:
        ImageInputError: 413, the file is over ``max_bytes`` (its size is checked before reading).
    """
    if not payload:
        return None
    url = payload.get("url") or ""
    if url.startswith("data:"):  # a camera capture may arrive inline
        import base64
        import binascii

        if len(url) * 3 // 4 > max_bytes:  # base64: 4 characters per 3 bytes
            raise file_too_large(len(url) * 3 // 4, max_bytes)
        try:
            return base64.b64decode(url.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            return url.encode()  # not base64: decode_image will call it "not a photo"
    if not payload.get("path"):
        return b""
    path = Path(payload["path"])
    size = path.stat().st_size
    if size > max_bytes:
        raise file_too_large(size, max_bytes)
    return path.read_bytes()


def _label_value(mode: DemoMode, response: dict | None) -> dict[str, float] | str | None:
    """What the Label shows: the top classes with probabilities, or for an unknown answer only
    words (a calibrated softmax still puts ~100% on some class for a photo of sand)."""
    if not response:
        return None
    if response.get("unknown"):
        return mode.unknown_words()
    return {pretty_label(t["label"]): float(t["probability"]) for t in response["top_k"]}


def _device_text(mode: DemoMode, out: Outcome) -> str:
    if out.error:
        return f"<span class='fieldid-error'>⚠ {out.error}</span>"
    assert out.device is not None
    d = out.device
    r, t = d.response, d.timings_ms
    line = (f"**{r['latency_ms']:.1f} ms** on this device · {d.precision} ONNX · "
            f"{d.size_bytes / 1e6:.1f} MB  \n"
            f"<small>decode {t['decode']:.1f} + preprocess {t['preprocess']:.1f} + model {t['model']:.1f} ms</small>")
    conf, thr = r["confidence"], r["fallback_threshold"]
    if r.get("unknown"):  # the artifact's unknown_score is above the recorded threshold
        verdict = mode.unknown_words() + (" — asking the server." if mode.server else " (no server configured to ask).")
    elif r["needs_fallback"]:
        verdict = f"Unsure: confidence {conf:.0%} is below this model's threshold {thr:.0%}."
        if not mode.server:
            verdict += " No server configured to ask."
    else:
        verdict = f"Confident: {conf:.0%} ≥ threshold {thr:.0%}, no need to ask the server."
    text = line + "  \n" + verdict
    if out.true_label == UNKNOWN_LABEL:  # a generated non-photo: the right answer is "unknown"
        mark = ("✓ the device knows it does not know it" if r.get("unknown") else
                f"✗ the device took it for {pretty_label(r['top_k'][0]['label'])}")
        text += f"  \nGenerated example that is **not a fish**: {mark}."
    elif out.true_label:
        top = r["top_k"][0]["label"]
        mark = "✓ the device is right" if top == out.true_label else "✗ the device is wrong"
        text += f"  \nHeld-out example of **{pretty_label(out.true_label)}**: {mark}."
    return text


def _server_text(mode: DemoMode, out: Outcome) -> str:
    if out.error:
        return ""
    s = out.server
    if s is None and not out.asked_because:
        return ("Not asked: the device was sure enough. Press **Ask the server** to compare."
                if mode.server else "No server configured: on-device answers only.")
    why = f"Asked because {out.asked_because}. " if out.asked_because else ""
    if s is None:  # asked, answer still on its way
        return (f"Asking the server model `{mode.server_model_name}` at {mode.server.url}… {why}" if mode.server
                else why)
    if not s.ok:
        return (f"<span class='fieldid-error'>⚠ Server unavailable: {s.message}.</span>  \n"
                f"{why}The on-device answer stands.")
    r = s.response or {}
    dev = out.device.response if out.device else {}
    srv_top = r["top_k"][0]["label"]
    if r.get("unknown") and dev.get("unknown"):
        agree = "✓ the server does not know it either"
    elif r.get("unknown"):
        agree = "⚠ the server does not know it: " + mode.unknown_words().lower().replace("i know", "it knows")
    elif dev.get("unknown"):
        agree = f"the server knows it: **{pretty_label(srv_top)}** {r['confidence']:.0%}"
    else:
        dev_top = dev["top_k"][0]["label"] if dev else None
        agree = "✓ agrees with the device" if srv_top == dev_top else "⚠ differs from the device"
    server_ms = r.get("latency_ms")
    inner = f" (model {server_ms:.1f} ms on the server)" if isinstance(server_ms, (int, float)) else ""
    return (f"**{s.round_trip_ms:.1f} ms** round trip{inner} · model `{r.get('model', '?')}` "
            f"v{r.get('version', '?')}  \n{why}{agree}.")


def _render(mode: DemoMode, out: Outcome) -> tuple[Any, str, Any, str, dict]:
    server_response = out.server.response if out.server and out.server.ok else None
    return (_label_value(mode, out.device.response if out.device else None), _device_text(mode, out),
            _label_value(mode, server_response), _server_text(mode, out), out.to_dict())


def _blank(mode: DemoMode) -> tuple[Any, str, Any, str, dict]:
    hint = "Take a photo or upload one, or tap an example below."
    return None, hint, None, "", Outcome().to_dict()


def _answers(mode: DemoMode, payload: dict | None, prec: str | None, *,
             force_server: bool) -> Iterator[tuple[Any, str, Any, str, dict]]:
    """The on-device answer at once; then, when the server is asked, the same with its answer."""
    try:
        image = photo_bytes(payload)
    except ImageInputError as e:
        yield _render(mode, Outcome(error=friendly_image_error(e)))
        return
    if image is None:
        yield (_render(mode, Outcome(error="Take or upload a photo first, then ask the server."))
               if force_server else _blank(mode))
        return
    out = mode.on_device(image, prec, force_server=force_server)
    yield _render(mode, out)
    if out.asked_because:
        out.server = mode.ask_server(image)
        yield _render(mode, out)


def _mode_tab(mode: DemoMode) -> None:
    key = mode.key
    gr.Markdown(mode.summary_markdown(), elem_id=f"{key}-summary")
    with gr.Accordion("About this mode", open=False, elem_id=f"{key}-about"):
        gr.Markdown(mode.explanation_markdown())
    photo = gr.Image(sources=["upload", "webcam"], type="filepath", image_mode=None, label="Photo",
                       height=300, elem_id=f"{key}-photo", webcam_options=gr.WebcamOptions(mirror=False))
    choices = [(f"{p} · {mode.manifest.find('onnx', p).size_bytes / 1e6:.1f} MB", p) for p in mode.precisions]
    precision = gr.Radio(choices=choices, value=mode.default_precision, label="On-device model",
                         elem_id=f"{key}-precision", interactive=len(choices) > 1)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=280):
            device_label = gr.Label(num_top_classes=mode.top_k, label="On this device",
                                    elem_id=f"{key}-device-label")
            device_md = gr.Markdown(_blank(mode)[1], elem_id=f"{key}-device-info",
                                    elem_classes=["fieldid-answer"])
        with gr.Column(min_width=280):
            server_label = gr.Label(num_top_classes=mode.top_k, label="Server (TorchServe)",
                                    elem_id=f"{key}-server-label")
            server_md = gr.Markdown("", elem_id=f"{key}-server-info", elem_classes=["fieldid-answer"])
            ask = gr.Button("Ask the server", variant="secondary", size="md", elem_id=f"{key}-ask")
    if mode.examples:
        gr.Examples(examples=[[str(e.path)] for e in mode.examples], inputs=[photo],
                    label="Held-out examples: tap one (its true class is shown with the answer)",
                    examples_per_page=12)
    if mode.unknown_examples:
        gr.Examples(examples=[[str(e.path)] for e in mode.unknown_examples], inputs=[photo],
                    label="Not a fish (generated): the model should say it does not know these",
                    examples_per_page=6)
    with gr.Accordion("Model details and raw answers", open=False):
        gr.Markdown(mode.model_card_markdown())
        raw = gr.JSON(label="Raw answers (shared response schema)", elem_id=f"{key}-raw")
    outputs = [device_label, device_md, server_label, server_md, raw]

    def identify(payload: dict | None, prec: str | None) -> Iterator[tuple[Any, str, Any, str, dict]]:
        yield from _answers(mode, payload, prec, force_server=False)

    def ask_server(payload: dict | None, prec: str | None) -> Iterator[tuple[Any, str, Any, str, dict]]:
        yield from _answers(mode, payload, prec, force_server=True)

    # preprocess=False: the handlers get the upload's payload, see photo_bytes.
    common = dict(inputs=[photo, precision], outputs=outputs, preprocess=False)
    photo.change(identify, api_name=f"{key}_identify", show_progress="minimal", **common)
    precision.change(identify, api_visibility="private", show_progress="minimal", **common)
    ask.click(ask_server, api_name=f"{key}_ask_server", **common)


def build_app(modes: Sequence[DemoMode], *, delete_cache: tuple[int, int] = DELETE_CACHE) -> gr.Blocks:
    """The Blocks app with one tab per mode (in the given order).

    Args:
        modes: the tabs.
        delete_cache: ``(every_s, age_s)``: uploads older than ``age_s`` are deleted from
            Gradio's cache every ``every_s`` seconds (and all of them when the app stops).

    Example:
        >>> app = build_app([DemoMode("dive", "runs/reef")])  # doctest: +SKIP
        >>> launch_app(app, port=7860, block=False)  # doctest: +SKIP
    """
    if not modes:
        raise UsageError("the demo needs at least one mode")
    with gr.Blocks(title="fieldid field ID", analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown(_HEADER, elem_id="fieldid-header")
        with gr.Tabs():
            for mode in modes:
                with gr.Tab(mode.info.title, id=mode.key, elem_id=f"tab-{mode.key}"):
                    _mode_tab(mode)
    return app


def launch_app(app: gr.Blocks, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, block: bool = True,
               quiet: bool = False) -> str:
    """Serve ``app`` on ``host:port``; returns the local URL.

    Args:
        block: wait until Ctrl-C (the CLI) or return at once (tests; call ``app.close()``).
    """
    app.queue(default_concurrency_limit=2)
    _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=not block,
                           share=False, inbrowser=False, quiet=quiet, ssr_mode=False,
                           # Gradio's own limit: a larger upload is refused (413) before it is stored.
                           footer_links=["api", "settings"], max_file_size=MAX_FILE_BYTES, theme=THEME, css=CSS,
                           # An exception's text can hold paths and server details: the user sees a
                           # generic error, the traceback goes to the log (the demo's stderr).
                           show_error=False)
    return url
