"""ExecuTorch (PyTorch's on-device runtime): ``model.pte`` fp32 and ``model.int8.pte``, XNNPACK.

* fp32: ``torch.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner.
* int8: PT2E (``prepare_pt2e`` / ``convert_pt2e`` from torchao) with ExecuTorch's XNNPACK
  quantizer: symmetric int8, per-channel weights, histogram-calibrated activations. As for
  ONNX, candidate recipes are compared on the selection images with the *converted* PT2E
  model (fast, and numerically what XNNPACK runs); only the chosen one is lowered.

A ``.pte`` has no metadata map, so labels, preprocessing and temperature are stored as
constant methods (``fieldid_labels`` etc. return JSON strings / floats): an app reads them
with ``module.execute("fieldid_labels")`` and they cannot drift from the weights.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from .recipes import RecipeSearch
from .registry import (PTE_BATCH, Runner, converting, quiet_third_party, register_exporter, register_label_reader,
                       register_runtime, run_batched)
from .verify import INT8_MIN_AGREEMENT, ExportContext, input_spec, make_artifact, verify_artifact
from .manifest import Artifact
from .unknown import first_output, has_unknown, upstream_names
from .onnx_export import FLOAT_PARAM_BUDGET, SELECTION_TARGET
from .pte_runtime import load_pte_method, native_stderr_silenced, set_threads

__all__ = ["export_executorch", "load_executorch", "read_pte_constants", "set_threads", "PteInt8Recipe", "MAX_BATCH",
           "delegation_counts", "score_only_nodes"]

log = logging.getLogger("fieldid.export")
# Batch 1, fixed: what an app runs. A dynamic batch dimension makes lowering the int8 graph
# ~1.7x slower (symbolic shapes through every pass) and plans memory for the largest batch.
MAX_BATCH = PTE_BATCH  # registry.PTE_BATCH: unknown.py reads it without importing this module
_EVAL_BATCH = 32  # calibration / selection batches of the (dynamic) PT2E graph in PyTorch
_CONSTANTS = ("fieldid_labels", "fieldid_preprocess", "fieldid_temperature", "fieldid_fallback_threshold")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Known, non-actionable noise from the ExecuTorch / torchao stack (deprecations, pytree enums)."""
    with warnings.catch_warnings(), quiet_third_party():
        stack = r"(executorch|torchao|torch|importlib)(\..*)?"  # raised from their own code, not ours
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=stack)
        warnings.filterwarnings("ignore", category=FutureWarning, module=stack)
        warnings.filterwarnings("ignore", message=r".*(Enum subclass|_check_ir_validity|is not supported yet).*")
        pytree = logging.getLogger("torch.utils._pytree")  # "Enum subclass ... register_constant" at import
        level = pytree.level
        pytree.setLevel(logging.ERROR)
        try:
            yield
        finally:
            pytree.setLevel(level)


def _constant_methods(ctx: ExportContext) -> dict[str, Any]:
    r = ctx.record
    return {"fieldid_labels": json.dumps(r.labels), "fieldid_preprocess": json.dumps(r.preprocess),
            "fieldid_temperature": float(r.temperature), "fieldid_fallback_threshold": float(r.fallback_threshold)}


def _program(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(Path(path))


def read_pte_constants(path: str | Path) -> dict[str, Any]:
    """The fieldid constant methods of a ``.pte`` (labels and preprocess decoded from JSON)."""
    out: dict[str, Any] = {}
    with _quiet(), native_stderr_silenced():
        prog = _program(Path(path))
        for name in _CONSTANTS:
            if name in prog.method_names:
                value = prog.load_method(name).execute([])[0]
                out[name] = json.loads(value) if name in ("fieldid_labels", "fieldid_preprocess") else value
    return out


@register_label_reader("executorch")
def _pte_labels(path: Path) -> list[str]:
    return read_pte_constants(path).get("fieldid_labels", [])


@register_runtime("executorch")
def load_executorch(path: Path, threads: int = 0) -> Runner:
    """``executorch.runtime`` on a ``.pte``; ``threads`` resizes the (process-wide) XNNPACK pool."""
    with _quiet():
        set_threads(threads)  # before loading: a pool reset invalidates methods loaded earlier
        execute = load_pte_method(path)

    def run(x: np.ndarray) -> np.ndarray:
        return execute([torch.from_numpy(x)])[0].numpy()

    return lambda x: run_batched(run, x, MAX_BATCH)


def _export(model: torch.nn.Module, ctx: ExportContext) -> torch.export.ExportedProgram:
    """The program that is lowered: static batch ``MAX_BATCH``."""
    return torch.export.export(model, (ctx.example_batch(MAX_BATCH),))


def _export_for_quantization(model: torch.nn.Module, ctx: ExportContext) -> torch.fx.GraphModule:
    """A dynamic-batch graph, so calibration and recipe selection run in batches of 32.

    The converted model is re-exported with a static batch for lowering (:func:`_export`);
    shapes are symbolic in the graph, so it specialises cleanly.
    """
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(model, (ctx.example_batch(2),), dynamic_shapes=({0: batch},)).module()


def delegation_counts(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """How much of a lowered graph runs in XNNPACK: delegated vs non-delegated call nodes.

    Delegated nodes are the ``call_function`` nodes inside each lowered (XNNPACK) submodule;
    non-delegated ones are the ``call_function`` nodes left in the top graph (portable
    kernels), not counting the delegate calls themselves and ``getitem`` of their outputs.

    Returns:
        ``{"delegated_subgraphs", "delegated_nodes", "non_delegated_nodes", "non_delegated_ops": {op: n}}``.
    """
    import operator

    subgraphs = delegated = 0
    left: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.name.startswith("lowered_module_"):
            subgraphs += 1
            lowered = getattr(gm, node.target)
            delegated += sum(n.op == "call_function" for n in lowered.original_module.graph.nodes)
        elif node.op == "call_function" and node.target is not operator.getitem \
                and "executorch_call_delegate" not in str(node.target):
            op = str(getattr(node.target, "__name__", node.target))
            left[op] = left.get(op, 0) + 1
    return {"delegate": "XnnpackPartitioner", "delegated_subgraphs": subgraphs, "delegated_nodes": delegated,
            "non_delegated_nodes": sum(left.values()), "non_delegated_ops": dict(sorted(left.items()))}


def _lower(ep: torch.export.ExportedProgram, ctx: ExportContext, path: Path) -> dict[str, Any]:
    """Lower to XNNPACK, write ``path``; returns :func:`delegation_counts` of the lowered graph."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    t0 = time.time()
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       constant_methods=_constant_methods(ctx))
    delegation = delegation_counts(edge.exported_program().graph_module)
    prog = edge.to_executorch()
    with open(path, "wb") as fh:  # the whole staging folder is swapped in atomically later
        prog.write_to_file(fh)
    log.info("lowered %s to XNNPACK in %.0f s: %d nodes delegated in %d subgraph(s), %d left to portable kernels",
             path.name, time.time() - t0, delegation["delegated_nodes"], delegation["delegated_subgraphs"],
             delegation["non_delegated_nodes"])
    return delegation


def _pte_artifact(ctx: ExportContext, file: str, precision: str, method: str, delegation: dict[str, Any],
                  **kw: Any) -> Artifact:
    ver = verify_artifact(ctx, file, "executorch", precision)
    ver["delegation"] = delegation
    if delegation["delegated_nodes"] == 0:
        # Runs, but on ExecuTorch's portable kernels: many times slower than XNNPACK on a phone.
        ver["status"] = "failed"
        ctx.failures.append(f"{file}: nothing was delegated to XNNPACK ({delegation['non_delegated_nodes']} ops "
                            f"left to portable kernels)")
    return make_artifact(ctx, file, "executorch", precision, method=method, input=input_spec(ctx, batch=MAX_BATCH),
                         labels_in_file="constant method fieldid_labels (JSON string)", verification=ver, **kw)


# --------------------------------------------------------------------------- int8
@dataclass
class PteInt8Recipe:
    """A PT2E + XNNPACKQuantizer recipe (what the manifest records)."""

    float_layers: list[str] = field(default_factory=list)  # module paths of conv/linear left in fp32
    float_nodes: list[str] = field(default_factory=list)  # their graph node names (the quantizer filter)
    # True: the feature conv is among them, over the size budget, because unknown_score needed it
    for_unknown: bool = False
    weights: str = "int8 symmetric, per output channel (PerChannelMinMaxObserver)"
    activations: str = "int8 per tensor (HistogramObserver), a conv's ReLU6 quantized with it"

    def describe(self) -> str:
        why = " (for unknown_score, over the size budget)" if self.for_unknown else ""
        excl = f", {', '.join(self.float_layers)} kept in fp32{why}" if self.float_layers else ""
        return f"PT2E static int8, XNNPACKQuantizer per-channel symmetric{excl}"


def _weighted_nodes(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    """(graph node name, module path) of every conv / linear, in graph order."""
    targets = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in targets:
            stack = n.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else n.name
            out.append((n.name, str(path)))
    return out


def _weight_count(model: torch.nn.Module, path: str) -> int:
    try:
        return int(model.get_submodule(path).weight.numel())
    except (AttributeError, KeyError):
        return 0


def score_only_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the graph's nodes that only the ``unknown_score`` output depends on (not the logits).

    They stay fp32, as in the int8 ONNX file (``unknown.score_only_nodes``): int8 activation ranges
    come from in-distribution calibration images, and an unknown photo's distances lie beyond them,
    so int8 clips exactly the scores that flag it. Measured on the salmon demo run: with them int8,
    the .pte flagged 0% of the generated probes that fp32 flags 58% of (decisions agree 86.0%);
    in fp32, 46% (96.5%, the same as the int8 ONNX file).
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0]
    if not isinstance(results, (tuple, list)) or len(results) < 2:
        return set()  # no unknown_score output
    logits = [results[0]] if isinstance(results[0], torch.fx.Node) else []
    needed = upstream_names(logits, lambda n: n.all_input_nodes)
    return {n.name for n in gm.graph.nodes if n.op == "call_function" and n.name not in needed}


_CLAMPS = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)


def annotate_conv_clamps(gm: torch.fx.GraphModule, config: Any, keep: Callable[[torch.fx.Node], bool]) -> int:
    """Annotate every conv -> hardtanh (ReLU6) pair as one quantized op, as XNNPACKQuantizer does conv -> ReLU.

    Why: ExecuTorch 1.5's XNNPACKQuantizer fuses only ReLU into a conv. After a ReLU6 -- every block of
    MobileNetV2 -- the conv's own output is quantized (before the clamp, over the pre-activation range)
    and the clamp then shares that range, where XNNPACK runs a conv with a fused clamp and needs only the
    clamped output's range. Annotated as a pair, the output is observed after the clamp, and
    XNNPACK's FuseActivationPass still folds the clamp into the conv when lowering. Measured on the
    inspection benchmark's model (fully int8, 500 bar images): top-1 agreement with fp32 0.828 -> 0.876,
    mean |logit diff| 0.318 -> 0.237 of the logits' spread.

    ``keep``: the quantizer's filter (False: a node that stays fp32); a pair any of whose nodes it
    rejects is left to the stock annotators. Returns how many pairs were annotated.
    """
    from executorch.backends.xnnpack.quantizer import xnnpack_quantizer_utils as xq

    pairs = 0
    for clamp in gm.graph.nodes:
        if clamp.op != "call_function" or clamp.target not in _CLAMPS:
            continue
        conv = clamp.args[0]
        if not isinstance(conv, torch.fx.Node) or not xq._is_conv_node(conv) or len(conv.users) > 1:
            continue
        part = [clamp, conv, conv.args[1]]
        qspecs = {conv.args[0]: xq.get_input_act_qspec(config), conv.args[1]: xq.get_weight_qspec(config)}
        bias = conv.args[2] if len(conv.args) > 2 else None
        if isinstance(bias, torch.fx.Node):
            qspecs[bias] = xq.get_bias_qspec(config)
            part.append(bias)
        if xq._is_annotated(part) or not all(keep(n) for n in part):
            continue
        conv.meta[xq.Q_ANNOTATION_KEY] = xq.QuantizationAnnotation(input_qspec_map=qspecs, _annotated=True)
        clamp.meta[xq.Q_ANNOTATION_KEY] = xq.QuantizationAnnotation(output_qspec=xq.get_output_act_qspec(config),
                                                                    _annotated=True)
        xq._mark_nodes_as_annotated(part)
        pairs += 1
    return pairs


def _quantizer(skip: set[str]) -> Any:
    """XNNPACKQuantizer (symmetric, per-channel weights) that leaves ``skip`` in fp32 and quantizes conv ->
    ReLU6 as one op (:func:`annotate_conv_clamps`)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                        get_symmetric_quantization_config)

    def keep(node: torch.fx.Node) -> bool:
        return node.name not in skip

    class _Quantizer(XNNPACKQuantizer):
        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            annotate_conv_clamps(model, self.global_config, keep)
            return super().annotate(model)

    quantizer = _Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    if skip:
        quantizer.set_filter_function(keep)
    return quantizer


ObserverStats = dict[tuple[str, str, str, str], dict[str, torch.Tensor]]


def _observers(prepared: torch.fx.GraphModule) -> dict[tuple[str, str, str, str], list[torch.nn.Module]]:
    """The prepared graph's observers by what they watch: (observed node, observer class, dtype, qscheme).

    Observers pass their input through unchanged during calibration (this is PTQ, not QAT), so the
    same tensor watched by the same kind of observer ends with the same statistics in every
    candidate's graph, whichever layers that candidate keeps in fp32. Their module names do not
    match across graphs (they are numbered in order), their observed nodes do.
    """
    out: dict[tuple[str, str, str, str], list[torch.nn.Module]] = {}
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        module = getattr(prepared, str(node.target))
        if not hasattr(module, "calculate_qparams"):
            continue  # not an observer (export's guard module)
        key = (node.args[0].name, type(module).__name__, str(getattr(module, "dtype", "")),
               str(getattr(module, "qscheme", "")))
        out.setdefault(key, []).append(module)
    return out


def _quantize(gm: torch.fx.GraphModule, ctx: ExportContext, recipe: PteInt8Recipe,
              stats: ObserverStats | None = None) -> torch.fx.GraphModule:
    """Prepare a copy of the exported graph, calibrate on the training images, convert.

    ``stats``: observer statistics of an earlier candidate's calibration (filled by the first call,
    one whose graph watches every tensor: fully int8). A later candidate whose every observer is among
    them takes them instead of another pass over the calibration images; the converted graph is the
    same (tests/test_int8_search.py). Measured with the single pass of :func:`_choose_int8`'s ``judge``
    (elpv, 200 calibration photos at 224 px, same recipes and results): candidates after the first
    29-37 s -> 11-15 s each.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    gm = copy.deepcopy(gm)  # prepare_pt2e rewrites the graph in place
    prepared = prepare_pt2e(gm, _quantizer(set(recipe.float_nodes) | score_only_nodes(gm)))
    observers = _observers(prepared)
    if stats and all(key in stats for key in observers):
        for key, modules in observers.items():
            for module in modules:
                module.load_state_dict(stats[key])
    else:
        with torch.no_grad():
            for batch in ctx.calibration.batches(_EVAL_BATCH):  # read lazily: observers keep only running min/max
                prepared(torch.from_numpy(batch))
        if stats is not None and not stats:
            stats.update({key: copy.deepcopy(modules[0].state_dict()) for key, modules in observers.items()})
    return convert_pt2e(prepared)


def _logits(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return run_batched(lambda b: first_output(fn(torch.from_numpy(b))).numpy(), x, _EVAL_BATCH)


def _feature_conv(layers: list[tuple[str, str]]) -> int | None:
    """Index in ``layers`` of the last conv before the classifier: it makes the pooled features."""
    return len(layers) - 2 if len(layers) >= 2 else None


def pte_recipe(layers: list[tuple[str, str]], sizes: list[int], idx: Sequence[int], *,
               for_unknown: bool = False) -> PteInt8Recipe | None:
    """The recipe that keeps ``layers[i]`` (``i`` in ``idx``, negative from the end) in fp32; ``None`` when
    they hold more than :data:`FLOAT_PARAM_BUDGET` of the weights (``for_unknown`` may exceed it).

    A classifier over the budget on its own is left out rather than the whole recipe: with many
    classes it is (MobileNetV2's 1280 x 21 head is 1.2 % of the weights, the scenes set), and it
    used to take every candidate with it, so such a run tried fully int8 alone. The stem, where the
    int8 error sits, holds 0.05 %; the classifier in fp32 left selection agreement where it was on
    every benchmark set that tried both (bench-export-real at a8d0998: digits, faces, elpv, elpv_few),
    and the stem in fp32 raised it (faces 0.98 -> 1.0, elpv 0.835 -> 0.92, elpv_few 0.73 -> 1.0).
    """
    if not layers:
        return PteInt8Recipe()
    budget = FLOAT_PARAM_BUDGET * sum(sizes)
    chosen = sorted({i % len(layers) for i in idx})
    if not for_unknown and sum(sizes[i] for i in chosen) > budget:
        chosen = [i for i in chosen if i != len(layers) - 1]
        if sum(sizes[i] for i in chosen) > budget:
            return None  # too much fp32: the int8 file would not be small any more
    return PteInt8Recipe(float_layers=[layers[i][1] for i in chosen], float_nodes=[layers[i][0] for i in chosen],
                         for_unknown=for_unknown)


def pte_queue(layers: list[tuple[str, str]], sizes: list[int], *, with_score: bool) -> list[PteInt8Recipe]:
    """The candidates :func:`_choose_int8` tries in order (each once), before its last resort."""
    # The stem conv sees raw normalised pixels and the classifier decides the label: the usual
    # places where int8 error concentrates in MobileNet-style networks. The stem's first 2-3 layers
    # also carry most of the int8 noise in the pooled features that unknown_score reads (textures,
    # converted model on the check's images: median |score diff| 24% of the threshold fully int8,
    # 22% with the stem conv in fp32, 16% with the stem conv and the first depthwise conv), so
    # the queue goes on through them while the score misses (a third stem layer only for the score).
    # digits (8x8 scans scaled up), converted model on the check's images: the first 3 in fp32 left
    # decisions at 89% (14% of known photos called unknown, fp32 2.4%); the first 5 (through the
    # second block's depthwise conv, still 0.2% of the weights) 98.7% and 3.8%.
    stems = ((0, 1, 2, -1), (0, 1, 2, 3, 4, -1)) if with_score else ()
    queue: dict[tuple[str, ...], PteInt8Recipe] = {}
    for idx in ((), (-1,), (0, -1), (0, 1, -1), *stems):
        recipe = pte_recipe(layers, sizes, idx)
        if recipe is not None:  # a classifier left out can make two recipes one
            queue.setdefault(tuple(recipe.float_nodes), recipe)
    return list(queue.values())


def _choose_int8(ctx: ExportContext) -> tuple[torch.fx.GraphModule, PteInt8Recipe, RecipeSearch]:
    """Fully int8 first (fastest); if it is not faithful enough, keep the stem / classifier in fp32.

    With a detector, a candidate must also keep ``unknown_score`` within the int8 bar on the
    selection images plus generated non-photos (:func:`unknown.selection_scores`). When every
    candidate's score misses (the last with faithful logits), one more keeps the feature conv in fp32
    (reef demo at 224 px, converted model on the check's images: the int8 noise of its 1280
    outputs moved scores by a median 29% of the threshold, with it in fp32 13%, decisions agree
    98.0% instead of 94.0%; the written .pte then passed its check at 97.6%). That layer holds
    ~18% of MobileNetV2's weights, so such a file is larger than the 30% size goal, and says so in
    its recipe; a smaller file whose unknown check fails would not be used at all.
    """
    from .unknown import int8_unknown_bar, selection_scores

    sel = ctx.selection if ctx.selection is not None and len(ctx.selection) else ctx.calibration
    ref = _logits(ctx.model, sel)
    with converting("executorch int8"):
        gm = _export_for_quantization(ctx.model, ctx)
    layers = _weighted_nodes(gm)
    scored = selection_scores(ctx, sel)

    sizes = [_weight_count(ctx.model, path) for _, path in layers]

    def judge(q: torch.fx.GraphModule) -> tuple[np.ndarray, dict[str, Any] | None]:
        """A candidate's logits on ``sel`` and its ``unknown_score`` bar: one pass, as the score's inputs
        begin with ``sel`` (:func:`unknown.selection_scores`)."""
        if scored is None:
            return _logits(q, sel), None
        x, ref_scores = scored

        def both(b: np.ndarray) -> np.ndarray:
            logits, score = q(torch.from_numpy(b))[:2]
            return torch.cat([logits, score.reshape(-1, 1)], dim=1).numpy()

        with torch.no_grad():
            got = run_batched(both, x, _EVAL_BATCH)
        return got[:len(sel), :-1], int8_unknown_bar(got[:, -1], ref_scores, float(ctx.record.unknown["threshold"]))

    queue = pte_queue(layers, sizes, with_score=scored is not None)
    stats: ObserverStats = {}  # the first candidate's calibration, for the others (:func:`_quantize`)
    feature = _feature_conv(layers)
    search = RecipeSearch("pte int8", SELECTION_TARGET, INT8_MIN_AGREEMENT)
    last_faithful: PteInt8Recipe | None = None  # the last candidate whose logits cleared the target

    def stem(recipe: PteInt8Recipe) -> int:
        """How many of the first weighted layers ``recipe`` keeps in fp32, counted from the input."""
        return next((i for i, (name, _) in enumerate(layers) if name not in recipe.float_nodes), len(layers))
    while queue:
        recipe = queue.pop(0)
        t0 = time.time()
        with converting("executorch int8"):
            q = _quantize(gm, ctx, recipe, stats)
            logits, unknown = judge(q)
        passed = unknown is None or unknown["passed"]
        agreement = search.add(recipe, logits, ref, t0, q, unknown=unknown)
        if agreement >= SELECTION_TARGET and passed:
            break
        if agreement >= SELECTION_TARGET:
            # The logits hold, the score does not: only candidates with more of the stem in fp32 can
            # change the features (the classifier in fp32 does not).
            last_faithful = recipe
            queue = [r for r in queue if stem(r) > stem(recipe)]
        if not queue and last_faithful is not None and feature is not None:
            idx = sorted({feature, len(layers) - 1, *(layers.index(l) for l in zip(last_faithful.float_nodes,
                                                                                      last_faithful.float_layers))})
            # the score is what failed: fp32 features last (over the budget, which for_unknown allows)
            queue = [pte_recipe(layers, sizes, idx, for_unknown=True)]
            feature = None
    recipe, q = search.best
    return q, recipe, search


@register_exporter("executorch")
def export_executorch(ctx: ExportContext) -> list[Artifact]:
    """``model.pte`` (fp32, XNNPACK) and ``model.int8.pte`` (PT2E int8, XNNPACK)."""
    with _quiet():
        with converting("executorch"):
            delegation = _lower(_export(ctx.model, ctx), ctx, ctx.stage / "model.pte")
        fp32 = _pte_artifact(ctx, "model.pte", "fp32", "torch.export + to_edge_transform_and_lower, XNNPACK delegate",
                             delegation)
        if not ctx.int8:
            return [fp32]
        q, recipe, search = _choose_int8(ctx)
        with converting("executorch int8"):
            delegation = _lower(_export(q, ctx), ctx, ctx.stage / "model.int8.pte")
        method = recipe.describe() + ("; unknown_score-only ops in fp32" if has_unknown(ctx) else "")
        int8 = _pte_artifact(ctx, "model.int8.pte", "int8", method + ", XNNPACK delegate", delegation,
                             quantization=search.manifest_record(ctx, recipe, SELECTION_TARGET))
    return [fp32, int8]
