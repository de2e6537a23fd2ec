"""``detect``: run a registered backdoor detector (``DETECTORS``) on the run's model.

An input detector (``strip``) is calibrated on the clean training split and scored on the clean
test images and, when a trigger is known, their triggered copies (TPR / FPR). A model scanner
(``neural_cleanse``) reports the labels it flags and the detected target.
"""

from __future__ import annotations

from typing import Any

from ...backdoor.metrics import triggered_test_set
from ...data.arrays import to_tensors
from ...errors import ConfigError
from ...filtering.detectors import DETECTORS, InputDetector, ModelScanner, detection_rates
from ...registry import BACKDOORS, STEPS
from ...repair.guard import split_clean
from ..context import Context


@STEPS.register("detect")
def detect(ctx: Context, /, detector: Any = "strip", clean_ratio: float = 0.1, attack: Any = None,
           seed: int = 0) -> None:
    """Detect backdoor-triggered inputs (``strip``) or a backdoored model (``neural_cleanse``).

    ``clean_ratio``: the class-balanced share of the clean training split given to an input detector
    to calibrate on (a model scanner uses its own ``clean_ratio``). With a known trigger (a
    ``poison`` step, or ``attack``; used only to measure) the report holds the TPR on the triggered
    non-target test images and the FPR on the clean test images, and the scanner's hit
    (``detect_target_correct``). The run's model is not changed.
    """
    model, data = ctx.require_model("detect"), ctx.require_data("detect")
    clean = ctx.clean_train if ctx.clean_train is not None else data.train
    if clean is data.train and hasattr(data.train, "poisoned_indices"):
        raise ConfigError("the training split is poisoned and no clean copy is known; run 'poison' in this config", "detect")
    atk = BACKDOORS.build(attack, "detect.attack") if attack is not None else ctx.backdoor
    name = DETECTORS.split_spec(detector)[0]
    det = DETECTORS.build(detector, "detect.detector")
    ctx.log(f"  detecting with {det!r}")
    if isinstance(det, InputDetector):
        det.fit(model, split_clean(clean, clean_ratio, seed=seed).train)
        x, _ = to_tensors(data.test)
        flags_clean, h_clean = det.detect(x)
        row: dict[str, Any] = {"detector": name, "threshold": getattr(det, "threshold", None),
                               "fpr": float(flags_clean.float().mean()), "n_clean": int(flags_clean.numel())}
        h_trig = None
        if atk is not None:
            xt, _, _ = triggered_test_set(atk, data.test, data.num_classes)
            flags_trig, h_trig = det.detect(xt)
            row = {**row, **detection_rates(flags_clean, flags_trig)}
            ctx.report.metrics.update(detect_tpr=row["tpr"])
        ctx.report.metrics.update(detect_fpr=row["fpr"])
        ctx.report.add_table("Input detection", [row], note="TPR: share of the triggered non-target test images "
                             "flagged; FPR: share of the clean test images flagged.")
        msg = f"  {name}: FPR {row['fpr']:.3f}" + (f", TPR {row['tpr']:.3f}" if "tpr" in row else " (no trigger known: no TPR)")
        ctx.log(msg)
        if ctx.is_main and name == "strip":
            from ...filtering.strip import entropy_histogram

            ctx.report.figures.append(entropy_histogram(h_clean, h_trig, det.threshold, ctx.out_path("strip_entropy.png")).name)
    elif isinstance(det, ModelScanner):
        details = det.scan(model, clean, data.num_classes, progress=ctx.show_progress)
        row = {"detector": name, "target": details.target, "flagged": list(details.flagged)}
        if atk is not None and not getattr(atk, "all_to_all", False):
            row["true_target"] = atk.target
            row["target_correct"] = details.target == atk.target
            ctx.report.metrics["detect_target_correct"] = row["target_correct"]
        ctx.report.metrics["detect_target"] = details.target
        ctx.report.add_table("Model scan", [row])
        for title, rows in details.tables():
            ctx.report.add_table(title, rows)
        if ctx.is_main:
            ctx.report.figures.extend(details.figures(ctx.out_dir))
        ctx.log(f"  {name}: target {details.target}, flagged {details.flagged}")
    else:  # a registered factory that is neither kind
        raise ConfigError(f"detector {name!r} is neither an InputDetector nor a ModelScanner", "detect.detector")


def _validate(params: dict[str, Any], path: str) -> None:
    DETECTORS.build(params.get("detector", "strip"), f"{path}.detector")
    if params.get("attack") is not None:
        BACKDOORS.build(params["attack"], f"{path}.attack")
    ratio = params.get("clean_ratio", 0.1)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"clean_ratio must be a number in (0, 1], got {ratio!r}", f"{path}.clean_ratio")


detect.validate = _validate  # type: ignore[attr-defined]
