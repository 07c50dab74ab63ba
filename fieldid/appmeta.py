"""What an app shows about a model: its title, description, summary, cue and per-class notes.

A user's model gets its own words, in this order (later wins):

1. a default made from the bundle: the model's name as title, its classes as description;
   or, for the two demo models (``fieldid data demo reef|salmon``), the demo's preset
   (:data:`DEMO_PRESETS`: Dive for the reef fish, Shop for wild/farmed salmon) -- chosen when
   the model's classes are a preset's, or when the mode is named after a preset (``dive=RUN``);
2. ``app.yaml`` in the bundle folder or in its run folder, if present;
3. a YAML file given with ``fieldid app build --meta [KEY=]FILE``;
4. ``--title`` / ``--description`` flags.

The YAML file holds any of ``title``, ``description``, ``summary``, ``cue`` and
``class_notes`` (a mapping label -> note); anything else is refused with one line::

    title: Garden surfaces
    description: Brick, grass or gravel? Photograph the ground.
    class_notes:
      brick: red-brown blocks with mortar lines

The Gradio demo and the web app's build both read this module; torch-free, imports only
PyYAML besides the standard library.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from fieldid.cli_common import read_yaml

__all__ = ["AppMeta", "DEMO_PRESETS", "META_KEYS", "MetaError", "preset_for_labels", "default_meta", "load_meta",
           "apply_meta", "pretty_label", "KEY_PATTERN"]

# The keys a meta YAML (and AppMeta) may hold.
META_KEYS = ("title", "description", "summary", "cue", "class_notes")
# A mode key: what `--run KEY=RUN` names, the app's tab id and its URL parameter.
KEY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")


class MetaError(ValueError):
    """A meta file or flag that cannot be used (unreadable, unknown key, a note for a class the model lacks)."""


@dataclass(frozen=True)
class AppMeta:
    """The words of one model in an app; class lists and data provenance come from the bundle."""

    key: str
    title: str
    description: str  # one line under the title: what the model is for
    summary: str  # one visible line: what the model looks at
    cue: str  # the longer, honest version (the demo's "About this mode")
    class_notes: dict[str, str] = field(default_factory=dict)  # label -> field marks


DEMO_PRESETS: dict[str, AppMeta] = {
    "dive": AppMeta(
        key="dive",
        title="Dive",
        description="Reef fish ID for divers and snorkellers: photograph a fish, get the species.",
        summary="Looks at body shape, colour pattern and fins; murky water or a head-on fish makes it unsure.",
        cue=("The model looks at body shape, colour pattern and fins. Murky water, blur and a fish "
             "seen head-on make it unsure; then it asks the server."),
        class_notes={
            "sergeant_major": "yellow back, five dark vertical bars",
            "blue_tang": "all blue, oval body, yellow tail spine",
            "yellowtail_snapper": "yellow stripe along the side, bright yellow forked tail",
            "stoplight_parrotfish": "green body with a yellow spot, beak-like mouth",
            "foureye_butterflyfish": "pale disc-shaped body, dark eye-spot near the tail",
            "french_angelfish": "black with yellow-rimmed scales",
            "queen_angelfish": "blue-yellow with a blue 'crown' spot on the forehead",
            "lionfish": "red-white stripes and long spines (invasive in the Caribbean)",
            "spotted_drum": "black-white stripes, tall first dorsal fin, white spots",
        },
    ),
    "shop": AppMeta(
        key="shop",
        title="Shop",
        description="Wild or farmed salmon? Photograph the fillet at the counter.",
        summary=("Colour is the cue: wild is deep red-orange with thin fat lines, farmed is paler with thick "
                 "white fat bands. A photo cannot prove origin; check the label."),
        cue=("Colour is the cue, together with the fat lines: wild flesh is deep red-orange with thin, "
             "widely spaced fat lines; farmed flesh is paler with thick, dense white fat bands. Shop "
             "lighting and white balance shift colours, and farmed salmon is often fed pigment, so a "
             "photo can never prove origin: treat a low-confidence answer as \"don't know\" and check "
             "the label."),
        class_notes={
            "wild": "deep red-orange, thin widely spaced fat lines",
            "farmed": "paler orange, thick dense white fat bands",
        },
    ),
}


def pretty_label(label: str) -> str:
    """``"sergeant_major"`` -> ``"Sergeant major"`` (what the user reads).

    Example:
        >>> pretty_label("yellowtail_snapper")
        'Yellowtail snapper'
    """
    s = label.replace("_", " ").strip()
    return s[:1].upper() + s[1:]


def preset_for_labels(labels: Iterable[str]) -> str | None:
    """The demo preset whose classes include all of ``labels``, or None when none (or several) do.

    Example:
        >>> preset_for_labels(["wild", "farmed"]), preset_for_labels(["lionfish"]), preset_for_labels(["brick"])
        ('shop', 'dive', None)
    """
    labels = set(labels)
    fits = [key for key, info in DEMO_PRESETS.items() if labels and labels <= set(info.class_notes)]
    return fits[0] if len(fits) == 1 else None


def default_meta(key: str, name: str, labels: list[str]) -> AppMeta:
    """The words of a model nobody described: the demo preset for a demo model, else generic ones.

    Args:
        key: the mode's key; a preset's key (``dive``, ``shop``) selects that preset.
        name: the bundle's model name (the title).
        labels: the model's classes, in order.

    Example:
        >>> default_meta("textures", "textures", ["brick", "grass", "gravel"]).description
        'Photograph it and get one of 3 classes: Brick, Grass, Gravel.'
    """
    preset = key if key in DEMO_PRESETS else preset_for_labels(labels)
    if preset is not None:
        p = DEMO_PRESETS[preset]
        return replace(p, key=key, class_notes={k: v for k, v in p.class_notes.items() if k in labels})
    listed = ", ".join(pretty_label(x) for x in labels[:12]) + (", ..." if len(labels) > 12 else "")
    return AppMeta(key=key, title=pretty_label(name) or key,
                   description=f"Photograph it and get one of {len(labels)} classes: {listed}.",
                   summary="The model runs on this device; an unsure answer is sent to the server when one is set.",
                   cue="")


def load_meta(path: str | Path) -> dict[str, Any]:
    """Read a meta YAML file (see the module docstring) into a dict of :data:`META_KEYS`.

    Raises:
        MetaError: unreadable, not a mapping, an unknown key, or a value of the wrong type.
    """
    path = Path(path)
    data = read_yaml(path, MetaError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetaError(f"{path}: must be a mapping of {', '.join(META_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(META_KEYS))
    if unknown:
        raise MetaError(f"{path}: unknown key {unknown[0]!r} (valid: {', '.join(META_KEYS)})")
    for k, v in data.items():
        if k == "class_notes":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise MetaError(f"{path}: class_notes must map each label to a text")
        elif not isinstance(v, str):
            raise MetaError(f"{path}: {k} must be a text")
    return {k: ({str(a): b for a, b in v.items()} if k == "class_notes" else v) for k, v in data.items()}


def apply_meta(meta: AppMeta, changes: Mapping[str, Any], labels: list[str], source: str) -> AppMeta:
    """``meta`` with ``changes`` (a :func:`load_meta` dict or flags) applied; class notes are merged.

    Raises:
        MetaError: a class note for a label the model does not have.
    """
    notes = dict(changes.get("class_notes") or {})
    extra = sorted(set(notes) - set(labels))
    if extra:
        raise MetaError(f"{source}: class_notes names {extra[0]!r}, which is not one of the model's classes "
                        f"({', '.join(labels)})")
    plain = {k: v for k, v in changes.items() if k != "class_notes" and v is not None}
    return replace(meta, **plain, class_notes={**meta.class_notes, **notes})
