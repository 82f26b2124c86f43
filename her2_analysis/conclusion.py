"""The slide's conclusion: which grader's call stands, with every reason a pathologist must read beside it.

ASCO/CAP score HER2 IHC per invasive tumour cell; the membrane grader measures
that definition, the CNN estimates class shares of tumour area. The configured
grader (:class:`her2_analysis.options.Grader`) makes the call; quality control
can refuse the slide (not assessable) whatever the graders found, and a
disagreement of more than one category between the graders is flagged for
review (0 and ultralow count as one category).

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from her2_analysis.membrane.slide import CellGrading
from her2_analysis.options import Grader
from her2_analysis.quality import QualityReport
from her2_core.aggregate import CLASSES, SlideCall, SlideScore, TileGrid, category_distance
from her2_core.facts import INTENDED_USE

#: The first flag of every conclusion.
NOT_FOR_CLINICAL_USE = f"{INTENDED_USE} (not validated on real slides)."


def conclude(cnn: SlideScore, cells: CellGrading | None, quality: QualityReport, stain_notes: list[str],
             corrupt: int, grader: Grader, membrane_grader: bool) -> tuple[SlideScore, Grader | None]:
    """The slide's score and the grader that made its call (None: not assessable), with every flag.

    The membrane grader decides when ``grader`` is :attr:`Grader.MEMBRANE` and it graded tumour cells; otherwise
    the CNN's call stands, and the flags say why. ``membrane_grader``: whether it was asked to run.
    """
    decided_by = None
    if quality.not_assessable:
        score = not_assessable(cnn.grid, quality, cnn.probabilities, cnn.tumour_fraction, cnn.scored)
    else:
        decided_by = Grader.CNN
        score = replace(cnn, flags=[NOT_FOR_CLINICAL_USE, *cnn.flags, *quality.flags])
        if cells is None and membrane_grader:
            score.flags.append("membrane grader not run: no pyramid level at 0.5 um/px or finer (a 10x-only scan); "
                               "the CNN made the call")
        elif cells is not None and cells.call is SlideCall.NOT_ASSESSABLE:
            score.flags.append("membrane grader found no tumour cells; the CNN made the call")
        elif cells is not None:
            if category_distance(cells.call, cnn.call) > 1:
                score.flags.append(f"graders disagree by more than one category: membrane {cells.call.value}, "
                                   f"CNN {cnn.call.value}: review")
            if grader is Grader.MEMBRANE:
                score.call, decided_by = cells.call, Grader.MEMBRANE
        if score.call.reflex_ish:
            score.flags.append("HER2 2+ (equivocal): reflex in-situ hybridisation (ISH) recommended")
    if corrupt:
        score.flags.append(f"{corrupt} corrupt tile(s) skipped")
    score.flags.extend(stain_notes)
    return score, decided_by


def not_assessable(grid: TileGrid, quality: QualityReport, probabilities: np.ndarray | None = None,
                   tumour: np.ndarray | None = None, scored: np.ndarray | None = None) -> SlideScore:
    """A slide that gets no HER2 call; the reasons become its flags (tile grades kept if any)."""
    empty = np.zeros((grid.rows, grid.cols), bool)
    return SlideScore(
        call=SlideCall.NOT_ASSESSABLE,
        percentages={c: 0.0 for c in CLASSES},
        grid=grid,
        probabilities=probabilities if probabilities is not None
        else np.full((grid.rows, grid.cols, len(CLASSES)), np.nan, np.float32),
        tumour_fraction=tumour if tumour is not None else empty.astype(np.float32),
        scored=scored if scored is not None else empty,
        flags=[NOT_FOR_CLINICAL_USE] + [f"not assessable: {r}" for r in quality.not_assessable] + quality.flags,
    )
