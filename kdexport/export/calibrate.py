"""Choose an INT8 model on validation accuracy: the calibration method, then the few nodes kept in fp32.

Budget, stated in every result (`budget`): one calibration run per method tried (auto: MinMax, Entropy, then
Percentile; a fixed --calib-method: that one), then at most len(EXCLUDE_STEPS) re-quantisations of the best
method that keep its 1, 2, then 4 most damaged nodes in fp32. These re-use the method's calibrated ranges
(onnxruntime's calibration cache) and run no calibration. The search stops as soon as a candidate loses
nothing against fp32 on validation. The winner has the highest validation accuracy; ties go to the candidate
tried first, so fewer fp32 nodes and the simpler method win.

Damage (the sensitivity pass, `node_sensitivity`) comes from onnxruntime.quantization.qdq_loss_debug, run
once on the best method's model over SENSITIVITY_IMAGES calibration images: the noise each quantised node adds
(its output's error against fp32, less its inputs'), as a signal-to-noise ratio in dB; lowest first. It is a
first-order proxy (it does not see how later layers amplify the noise): the validation accuracy of each
exclusion decides what is kept.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checks import Runner, accuracy
from .int8 import _reader, preprocess, quantize_int8

METHODS = ("minmax", "entropy", "percentile")  # auto's order: the cheapest and most common first
EXCLUDE_STEPS = (1, 2, 4)
SENSITIVITY_IMAGES = 16
LABELS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


@dataclass(frozen=True)
class Trial:
    """One candidate: calibration method, nodes kept in fp32, and its validation accuracy (percent)."""

    method: str
    fp32_nodes: tuple[str, ...]
    accuracy: float

    def to_dict(self) -> dict:
        return {"method": LABELS[self.method], "fp32_nodes": list(self.fp32_nodes), "accuracy": self.accuracy}


@dataclass
class Int8Choice:
    model: bytes  # the chosen QDQ model (no metadata yet)
    trial: Trial
    runtime: str  # the runtime that measured every trial
    trials: list[Trial]
    calibrations: int  # calibration runs made (the rest re-used cached ranges)
    budget: str
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # (node, SQNR dB), most damaged first
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"method": LABELS[self.trial.method], "fp32_nodes": list(self.trial.fp32_nodes),
                "runtime": self.runtime, "budget": self.budget, "calibration_runs": self.calibrations,
                "trials": [t.to_dict() for t in self.trials],
                "most_damaged": [{"node": n, "sqnr_db": db} for n, db in self.sensitivity[:8]]}


def budget(method: str) -> str:
    methods = METHODS if method == "auto" else (method,)
    return (f"{len(methods)} calibration run(s) ({', '.join(LABELS[m] for m in methods)}), then at most "
            f"{len(EXCLUDE_STEPS)} re-quantisations from cached ranges keeping the "
            f"{', '.join(map(str, EXCLUDE_STEPS))} most damaged nodes in fp32; stops once nothing is lost")


def choose_int8(fp32: bytes, calib: np.ndarray, val: tuple[np.ndarray, np.ndarray], *, fp32_accuracy: float,
                target: str, batch: int, fixed: bool, method: str,
                make_runner: Callable[[bytes], Runner]) -> Int8Choice:
    """Search within the budget (module docstring); `make_runner` builds the gating runtime for a QDQ model."""
    methods = METHODS if method == "auto" else (method,)
    trials: list[Trial] = []
    models: dict[Trial, bytes] = {}
    runtime = ""

    def attempt(m: str, exclude: tuple[str, ...]) -> Trial:
        nonlocal runtime
        q = quantize_int8(pre, calib, batch=batch, fixed=fixed, target=target, method=m, exclude=exclude,
                          cache=Path(tmp, f"{m}.json"))
        run = make_runner(q)
        runtime = getattr(run, "runtime", "?")
        trial = Trial(m, exclude, accuracy(run, *val))
        trials.append(trial)
        models[trial] = q
        return trial

    with tempfile.TemporaryDirectory(prefix="kdexport-calib-") as tmp:
        pre, notes = preprocess(fp32, Path(tmp))
        for m in methods:
            if attempt(m, ()).accuracy >= fp32_accuracy:
                break
        calibrations = len(trials)
        best = max(trials, key=lambda t: t.accuracy)
        sensitivity: list[tuple[str, float]] = []
        if best.accuracy < fp32_accuracy:
            sensitivity = node_sensitivity(pre, models[best], calib[:SENSITIVITY_IMAGES], batch=batch,
                                           fixed=fixed, tmp=Path(tmp))
            for k in EXCLUDE_STEPS:
                if k > len(sensitivity) or attempt(best.method, tuple(n for n, _ in sensitivity[:k])).accuracy \
                        >= fp32_accuracy:
                    break
    chosen = max(trials, key=lambda t: t.accuracy)
    return Int8Choice(models[chosen], chosen, runtime, trials, calibrations, budget(method), sensitivity, notes)


def node_sensitivity(pre: Path, qdq: bytes, images: np.ndarray, *, batch: int, fixed: bool,
                     tmp: Path) -> list[tuple[str, float]]:
    """(node, SQNR dB of the noise it adds) for every quantised node, most damaging (lowest) first.

    The fp32 and QDQ models run on the same images with every tensor saved (qdq_loss_debug). A node's added
    noise is the noise-to-signal power of its output (QDQ vs fp32) minus the worst of its inputs': what its
    own input and weight rounding cost, as seen after the node, so that a node whose int8 input crushes the
    small channels next to an outlier is found even though that input's own SQNR looks fine."""
    import onnx  # lazy: onnx is heavy and only ONNX artefacts need it

    # lazy: onnxruntime is heavy and only the ORT paths need it
    from onnxruntime.quantization.qdq_loss_debug import collect_activations, modify_model_output_intermediate_tensors

    qpath = tmp / "sensitivity-q.onnx"
    qpath.write_bytes(qdq)
    acts = {}
    for name, path in (("float", pre), ("qdq", qpath)):
        augmented = tmp / f"sensitivity-{name}-aug.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        acts[name] = collect_activations(str(augmented), _reader(images, batch if fixed else 32, fixed))

    def nsr(tensor: str, as_seen: str | None = None) -> float:
        """Noise-to-signal power of `tensor` in the QDQ model (or of its version `as_seen`) against fp32."""
        seen = as_seen or tensor
        if tensor not in acts["float"] or seen not in acts["qdq"]:
            return 0.0
        x = np.concatenate([a.ravel() for a in acts["float"][tensor]]).astype(np.float64)
        y = np.concatenate([a.ravel() for a in acts["qdq"][seen]]).astype(np.float64)
        return float(np.sum((x - y) ** 2) / max(np.sum(x ** 2), 1e-30)) if x.shape == y.shape else 0.0

    model = onnx.load(str(qpath))
    dequantised = {o: _source(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"
                   for o in n.output}
    after_qdq = {src: o for o, src in dequantised.items()}  # a tensor as its consumers see it
    scored = [n for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
              and any(i in dequantised for i in n.input)]
    # A scored node's quantised output (ORT's CPU recipe) counts as its own noise, rounding and clamping
    # included (ORT drops a Relu after a quantised Conv and lets the output's Q/DQ clamp instead); an input's
    # Q/DQ counts for the consumer, unless its producer already counted it.
    counted = {o for n in scored for o in n.output if o in after_qdq}
    scores = []
    for node in scored:
        out = max(nsr(o, after_qdq.get(o)) for o in node.output)
        sources = [dequantised.get(i, i) for i in node.input]
        inp = max([nsr(s, after_qdq[s] if s in counted else None) for s in sources] + [0.0])
        if out - inp > 0:
            scores.append((node.name, round(-10 * math.log10(out - inp), 2) + 0.0))  # no -0.0
    return sorted(scores, key=lambda s: s[1])


def _source(quantised: str) -> str:
    """The float tensor behind a Q/DQ tensor name (ORT's suffixes: _quantized, _QuantizeLinear_Output)."""
    for suffix in ("_QuantizeLinear_Output", "_quantized"):
        if quantised.endswith(suffix):
            return quantised[: -len(suffix)]
    return quantised


def layers_line(choice: Int8Choice, n: int = 3) -> str:
    """The nodes that cost most, for the refusal: by SQNR, with the gain measured when they were kept fp32."""
    if not choice.sensitivity:
        return "no node-level damage found (the loss is spread over the whole model)"
    worst = ", ".join(f"{name} ({db:.1f} dB)" for name, db in choice.sensitivity[:n])
    base = max((t for t in choice.trials if not t.fp32_nodes), key=lambda t: t.accuracy)
    tried = [t for t in choice.trials if t.fp32_nodes]
    gains = "; ".join(f"keeping {len(t.fp32_nodes)} in fp32: {t.accuracy - base.accuracy:+.2f} points"
                      for t in tried)
    return f"layers that cost most (lowest SQNR of the noise they add): {worst}" + (f"; {gains}" if gains else "")

