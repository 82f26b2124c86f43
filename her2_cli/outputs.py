"""What ``her2 score`` and ``her2 demo`` leave in their output folder: the result objects as DICOM files, the
overlay PNGs a pathologist checks, and summary.json.

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

import json
from pathlib import Path

from her2_analysis.conclusion import NOT_FOR_CLINICAL_USE
from her2_analysis.overlay import cell_field_image, overlay_image
from her2_analysis.pipeline import ScoringResult

#: File name of each result object in an output folder, by Modality.
RESULT_FILES = {"SR": "her2_sr.dcm", "SEG": "her2_heatmap_seg.dcm", "ANN": "her2_cells_ann.dcm"}


def write_outputs(result: ScoringResult, out_dir: Path) -> list[Path]:
    """Write SR, SEG, ANN, overlay PNGs and a JSON summary into ``out_dir``; the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / RESULT_FILES[ds.Modality] for ds in result.datasets]
    for ds, path in zip(result.datasets, files):
        ds.save_as(path, enforce_file_format=True)
    files.append(out_dir / "her2_overlay.png")
    overlay_image(result.thumbnail, result.score, result.thumbnail_scale).save(files[-1])
    cells = result.cells
    if cells is not None and cells.example is not None:
        files.append(out_dir / "her2_cells.png")
        cell_field_image(*cells.example).save(files[-1])
    files.append(out_dir / "summary.json")
    files[-1].write_text(json.dumps(summary(result), indent=1))
    return files


def summary(result: ScoringResult) -> dict:
    """summary.json: the call, its grader, each grader's own result, the model, measures and intended use."""
    return {
        "series_instance_uid": result.source.series_instance_uid,
        "call": result.score.call.value,
        "reflex_ish": result.score.reflex_ish,
        "percentages": result.score.percentages,
        "tumour_area_mm2": result.score.tumour_area_mm2,
        "flags": result.score.flags,
        "decided_by": None if result.decided_by is None else result.decided_by.value,
        "graders": grader_summary(result),
        "model": result.model,
        "stats": result.stats,
        "intended_use": NOT_FOR_CLINICAL_USE,
    }


def grader_summary(result: ScoringResult) -> dict[str, dict]:
    """Each grader's own call and percentages (tumour area for the CNN, tumour cells for the membrane grader)."""
    out: dict[str, dict] = {"cnn": {"call": result.cnn_call.value, "percentages_of": "tumour area",
                                    "percentages": result.score.percentages}}
    if result.cells is not None:
        s = result.cells.summary
        out["membrane"] = {"call": result.cells.call.value, "percentages_of": "tumour cells",
                           "percentages": s.percentages, "tumour_cells": s.counts, "other_cells": s.non_tumour,
                           "connectivity": s.connectivity, "mpp": result.cells.level.mpp,
                           "fields": result.cells.fields}
    return out
