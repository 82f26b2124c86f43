"""The CNN on real tissue: its results on real HER2 cores for the model card (scoring only, never training).

Each core is a DICOM WSI series (e.g. the four cores of ``tests/data/real_her2``
converted by wsidicomizer, as the ``real_cores`` test fixture does) scored by
the worker's own :func:`her2_analysis.pipeline.score_slide` with the CNN alone (the
membrane grader off): the CNN's slide call, its tumour-area percentages and
the continuous score 0*p0 + 1*p1 + 2*p2 + 3*p3. The figures go into the card's
``real_tissue`` block (:class:`her2_core.model_card.RealCoreFigure`) beside the
synthetic metrics. Nothing here fits, tunes or selects anything on the cores.
"""

from __future__ import annotations

from pathlib import Path

from her2_analysis.options import Grader, ScoringOptions
from her2_analysis.pipeline import score_slide
from her2_core.aggregate import CLASSES
from her2_core.model_card import RealCoreFigure


def expected_score(percentages: dict[str, float]) -> float:
    """0 x p0 + 1 x p1 + 2 x p2 + 3 x p3 of class percentages (as fractions): a continuous HER2 score."""
    return sum(k * percentages[c] / 100.0 for k, c in enumerate(CLASSES))


def score_real_cores(model_path: Path, cores: dict[str, Path]) -> list[RealCoreFigure]:
    """The model at ``model_path`` on each core (label -> DICOM series folder), in the given order."""
    options = ScoringOptions(model_path=Path(model_path), grader=Grader.CNN, membrane_grader=False)
    figures = []
    for label, series in cores.items():
        result = score_slide(Path(series), options)
        pct = {c: round(float(result.score.percentages[c]), 1) for c in CLASSES}
        figures.append(RealCoreFigure(label=label, call=result.cnn_call.value, percentages=pct,
                                      expected_score=round(expected_score(result.score.percentages), 3)))
    return figures
