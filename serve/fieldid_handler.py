"""TorchServe adapter for :class:`fieldid.serve.engine.ClassifierEngine` (copied into every ``.mar``).

Kept thin on purpose: TorchServe is in "Limited Maintenance"; all logic lives in the engine.
This file only maps TorchServe's request dicts to bytes and the engine's replies to
per-request statuses (``context.set_response_status(code, msg, idx=i)``), so one bad image
answers 4xx alone instead of turning its whole batch into TorchServe's 503.

Settings come from the server's environment (``fieldid serve start`` sets them):
``FIELDID_SERVE_THREADS`` (CPU threads per worker), ``FIELDID_SERVE_MAX_PIXELS`` and
``FIELDID_SERVE_PRECISION`` (auto | fp32 | fp16).
"""
from __future__ import annotations

import logging
import os
from typing import Any

from fieldid.export.phone import DEFAULT_MAX_PIXELS, ImageInputError
from fieldid.serve.engine import ClassifierEngine, Reply, error_body

log = logging.getLogger("fieldid.serve")

# Multipart field names we look at first; any other single file field is accepted as well.
_FIELDS = ("data", "body", "image", "file")
_USAGE = ("send the image as the raw body with Content-Type image/jpeg, image/png, image/webp or "
          "application/octet-stream, or as multipart field 'data'")


def request_bytes(request: dict[str, Any]) -> bytes | ImageInputError:
    """The image bytes of one TorchServe request (raw body or multipart), or the error to answer.

    TorchServe hands a raw body over as ``{"body": bytearray}`` and multipart fields under
    their names; JSON bodies arrive already parsed and text bodies as ``str`` (both 415).
    """
    if not request:
        return ImageInputError(f"empty request body: {_USAGE}", 400)
    for key in _FIELDS:
        if key in request:
            value = request[key]
            break
    else:
        files = [v for v in request.values() if isinstance(v, (bytes, bytearray))]
        if len(files) != 1:
            return ImageInputError(f"expected one image, got fields {', '.join(map(str, request))}: {_USAGE}", 415)
        value = files[0]
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if value in ("", None):
        return ImageInputError(f"empty request body: {_USAGE}", 400)
    return ImageInputError(f"body is {type(value).__name__}, not image bytes: {_USAGE}", 415)


class FieldidHandler:
    """TorchServe custom handler: ``initialize(context)`` once, ``handle(data, context)`` per batch."""

    def __init__(self) -> None:
        self.engine: ClassifierEngine | None = None

    def initialize(self, context: Any) -> None:
        props = context.system_properties
        env = os.environ
        # The archive was versioned from the full bundle (its fp32 weights' hash); the reduced
        # manifest inside holds only the ONNX files, so the version comes from MAR-INF.
        version = ((getattr(context, "manifest", None) or {}).get("model") or {}).get("modelVersion")
        self.engine = ClassifierEngine.from_bundle(
            props["model_dir"], version=version,
            gpu_id=props.get("gpu_id"),
            threads=int(env.get("FIELDID_SERVE_THREADS", "1")),
            precision=env.get("FIELDID_SERVE_PRECISION", "auto"),
            max_pixels=int(env.get("FIELDID_SERVE_MAX_PIXELS", str(DEFAULT_MAX_PIXELS))),
        )

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[bytes]:
        if self.engine is None:  # pragma: no cover - TorchServe always initializes first
            self.initialize(context)
        requests = data or []
        try:
            replies = self.engine.handle([request_bytes(r) for r in requests])
        except Exception as e:  # a model/runtime failure, not bad input: say so, per request
            log.exception("inference failed")
            replies = [Reply(500, error_body(500, f"inference failed: {type(e).__name__}"))] * len(requests)
        # One line per batch: how batching behaves and which requests were refused, in model_log.
        log.info("batch of %d: statuses %s", len(replies), [r.status for r in replies])
        out = []
        for i, reply in enumerate(replies):
            context.set_response_content_type(i, "application/json")
            if reply.status != 200:
                context.set_response_status(reply.status, reply.body["error"], idx=i)
            out.append(reply.json_bytes())
        return out
