"""Clinical figures of a cardiac cine evaluation (ACDC and the cardiac phantom): metrics at end
diastole (ED) and end systole (ES) separately, and the left and right ventricles' end-diastolic
and end-systolic volumes and ejection fractions, predicted against the ground truth.

Cases are named as the SSL4MIS conversion names ACDC's frames, `patientNNN_frameMM`; each patient
has two, and the earlier frame is ED (ACDC's cine acquisitions start at end diastole; its
Info.cfg gives ED = 1 for every patient), the later ES. Volumes are the class's voxels times the
voxel volume, in millilitres when the cases carry a spacing, otherwise in voxels (then the
ejection fraction, a ratio, is still exact). EF = (EDV - ESV) / EDV x 100 %.
"""
from __future__ import annotations

import re

import numpy as np

CASE = re.compile(r"^(?P<patient>.+)_frame(?P<frame>\d+)$")
VENTRICLES = {"LV": "LV", "RV": "RV"}  # class name -> label in the report
REQUIRED_CLASSES = ("RV", "Myo", "LV")


def applies(class_names, cases) -> bool:
    """True for a cardiac evaluation: ACDC's classes, and cases named patient_frameNN."""
    return tuple(class_names) == REQUIRED_CLASSES and bool(cases) and all(CASE.match(c) for c in cases)


def phases(cases) -> dict[str, str]:
    """{case: 'ED' or 'ES'} for the patients with exactly two frames (the earlier is ED)."""
    frames: dict[str, list[tuple[int, str]]] = {}
    for case in cases:
        match = CASE.match(case)
        frames.setdefault(match["patient"], []).append((int(match["frame"]), case))
    out = {}
    for found in frames.values():
        if len(found) == 2:
            (_, ed), (_, es) = sorted(found)
            out[ed], out[es] = "ED", "ES"
    return out


def _number(value) -> float:
    return float("nan") if value is None else float(value)


def _volume(counts: list, voxel_mm3, cls: int) -> float:
    return counts[cls] * voxel_mm3 / 1000.0 if voxel_mm3 is not None else float(counts[cls])


def report(per_case: dict, class_voxels: dict, class_names, metric_names) -> dict:
    """The per-phase metric means and the ventricles' volumes and ejection fractions."""
    class_names = list(class_names)
    phase_of = phases(per_case)
    by_phase = {}
    for phase in ("ED", "ES"):
        rows = np.asarray([per_case[c] for c, p in phase_of.items() if p == phase], np.float64)
        if len(rows):
            means = np.nanmean(rows, axis=0)  # (classes, metrics)
            by_phase[phase] = {"cases": int(len(rows)),
                               "per_class": {name: dict(zip(metric_names, map(float, means[k])))
                                             for k, name in enumerate(class_names)},
                               "mean": dict(zip(metric_names, map(float, np.nanmean(means, axis=0))))}
    with_mm = all(class_voxels.get(c, {}).get("voxel_mm3") is not None for c in phase_of)
    unit = "mL" if with_mm else "voxels"
    patients = {}
    for case, phase in phase_of.items():
        if phase != "ED" or case not in class_voxels:
            continue
        patient = CASE.match(case)["patient"]
        es = next(c for c, p in phase_of.items() if p == "ES" and CASE.match(c)["patient"] == patient)
        if es not in class_voxels:
            continue
        entry = {"ED": case, "ES": es}
        for name in VENTRICLES:
            cls = class_names.index(name) + 1
            for source in ("pred", "true"):
                ed_v = _volume(class_voxels[case][source], class_voxels[case]["voxel_mm3"] if with_mm else None, cls)
                es_v = _volume(class_voxels[es][source], class_voxels[es]["voxel_mm3"] if with_mm else None, cls)
                ef = 100.0 * (ed_v - es_v) / ed_v if ed_v > 0 else None  # None: no ventricle at ED
                entry[f"{name}_EDV_{source}"], entry[f"{name}_ESV_{source}"] = ed_v, es_v
                entry[f"{name}_EF_{source}"] = ef
        patients[patient] = entry
    summary = {}
    for name in VENTRICLES:
        for quantity in ("EDV", "ESV", "EF"):
            pred = np.asarray([_number(e[f"{name}_{quantity}_pred"]) for e in patients.values()], np.float64)
            true = np.asarray([_number(e[f"{name}_{quantity}_true"]) for e in patients.values()], np.float64)
            keep = np.isfinite(pred) & np.isfinite(true)
            if not keep.any():
                continue
            error = pred[keep] - true[keep]
            corr = (float(np.corrcoef(pred[keep], true[keep])[0, 1])
                    if keep.sum() > 1 and pred[keep].std() > 0 and true[keep].std() > 0 else None)
            summary[f"{name}_{quantity}"] = {"mean_true": float(true[keep].mean()), "mean_pred": float(pred[keep].mean()),
                                             "bias": float(error.mean()), "mean_abs_error": float(np.abs(error).mean()),
                                             "correlation": corr, "patients": int(keep.sum())}
    return {"phases": by_phase, "volume_unit": unit, "patients": patients, "clinical": summary}


def markdown(cardiac: dict, metric_names) -> str:
    """The report as tables: metrics per phase and class, then the clinical indices."""
    lines = ["## End diastole and end systole", "",
             "| Phase | Class | " + " | ".join(metric_names) + " |", "|---|---|" + "---|" * len(metric_names)]
    for phase, entry in cardiac["phases"].items():
        for name, values in entry["per_class"].items():
            cells = " | ".join(f"{values[m] * 100:.2f}" if m in ("dice", "jaccard") else f"{values[m]:.2f}"
                               for m in metric_names)
            lines.append(f"| {phase} ({entry['cases']}) | {name} | {cells} |")
    unit = cardiac["volume_unit"]
    lines += ["", f"## Ventricular volumes ({unit}) and ejection fractions (%)", "",
              "| Index | Ground truth (mean) | Predicted (mean) | Bias | Mean abs. error | Correlation | Patients |",
              "|---|---|---|---|---|---|---|"]
    for key, entry in cardiac["clinical"].items():
        correlation = "-" if entry["correlation"] is None else f"{entry['correlation']:.3f}"
        lines.append(f"| {key} | {entry['mean_true']:.2f} | {entry['mean_pred']:.2f} | {entry['bias']:+.2f} | "
                     f"{entry['mean_abs_error']:.2f} | {correlation} | {entry['patients']} |")
    return "\n".join(lines) + "\n"
