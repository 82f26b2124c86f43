"""The per-tile class-probability heatmap as a FRACTIONAL Segmentation (PS3.3 A.51, C.8.20), and its reader.

One segment per tile class (:data:`worker.aggregate.CLASSES`), fractional type
PROBABILITY, in the source's study and Frame of Reference, in a series of its
own; the SR (:mod:`dicom_io.sr`) infers its tile-grader percentages from these
segments.

Research use only: the Series Description says "not for clinical use".
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicom_io.codes import ABNORMAL_STRUCTURE, TUMOR
from dicom_io.geometry import check_score_fits, level_spacing, tile_centre_position
from dicom_io.result_header import (
    NOT_FOR_CLINICAL_USE,
    AlgorithmInfo,
    check_sources,
    set_device_uid,
    source_result_uids,
)
from dicom_io.uids import derived_uid
from worker.aggregate import CLASSES, SlideScore

SEG_SERIES_NUMBER = 9002
SEG_SERIES_DESCRIPTION = "HER2 IHC AI heatmap - research use, not for clinical use"
HEATMAP_CONTENT_LABEL = "HER2_HEATMAP"


def heatmap_array(score: SlideScore) -> np.ndarray:
    """(1, rows, cols, 4) float32 probabilities in [0, 1]; unscored tiles and NaN are 0."""
    probabilities = np.nan_to_num(score.probabilities.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    probabilities = probabilities.clip(0.0, 1.0)
    probabilities[~score.scored.astype(bool)] = 0.0
    return probabilities[np.newaxis]


def build_heatmap(
    source_instances: Sequence[Dataset], scored_level: Dataset, score: SlideScore, algorithm: AlgorithmInfo
) -> hd.seg.Segmentation:
    """Build the per-tile class-probability heatmap as a FRACTIONAL Segmentation.

    One segment per tile class (segment k+1 = ``CLASSES[k]``, labelled
    "HER2 IHC <class>"), fractional type PROBABILITY, 8-bit (1/255 steps),
    Explicit VR Little Endian (PS3.3 C.8.20 Segmentation Image Module,
    C.8.20.2 Segment Description). The heatmap is one Total Pixel Matrix of
    ``grid.rows x grid.cols`` pixels, tiled by highdicom (TILED_FULL, PS3.3
    C.7.6.17.3) in square frames of at most 512 pixels, in which **one
    heatmap pixel is one tile**:

    * Pixel Spacing = ``tile_size`` x the scored level's Pixel Spacing;
    * orientation = the source's Image Orientation (Slide);
    * the Plane Position (Slide) of heatmap pixel (0, 0) is the slide position
      of the *centre* of tile (0, 0) (see :func:`tile_centre_position`).

    highdicom reads and writes slide positions as the centre of the top-left
    pixel, for the source's Total Pixel Matrix Origin as for the heatmap's
    plane positions. Under that one convention, a heatmap pixel centred on
    its tile's centre with a tile-sized spacing covers exactly that tile, and
    heatmap pixel (r, c) lands at the centre of tile (r, c) for every r, c.

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (their UIDs name the results).
    scored_level: pydicom.Dataset
        The graded VL Whole Slide Microscopy Image instance (metadata only), one of ``source_instances``.
    score: SlideScore
        Its score; ``score.probabilities`` is (rows, cols, 4), NaN for unscored tiles.
    algorithm: AlgorithmInfo
        The model that produced the probabilities.

    Returns
    -------
    highdicom.seg.Segmentation
        The heatmap, in the source's study and Frame of Reference, in a series of its own.

    Raises
    ------
    ValueError
        When the sources are empty or from several series, the scored level is
        not among them or lacks spatial attributes, or the score does not fit its grid.

    """
    check_sources(source_instances, scored_level)
    grid = check_score_fits(scored_level, score)
    uids = source_result_uids(source_instances, algorithm)
    row_spacing, col_spacing = level_spacing(scored_level)
    measures = scored_level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = measures.get("SliceThickness")
    # Square frames no larger than the heatmap (a 3x4 heatmap is one 4x4 frame, not a padded 512x512 one).
    frame_side = min(512, max(grid.rows, grid.cols))
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=f"HER2 IHC {c}",
            segmented_property_category=ABNORMAL_STRUCTURE,
            segmented_property_type=TUMOR,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.segment_identification(),
            tracking_uid=derived_uid("tracking", uids.seg, f"segment-{c}"),
            tracking_id=f"HER2 IHC {c} tile probability",
        )
        for k, c in enumerate(CLASSES)
    ]
    seg = hd.seg.Segmentation(
        source_images=[scored_level],
        pixel_array=heatmap_array(score),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=segments,
        series_instance_uid=uids.seg_series,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.seg,
        instance_number=1,
        **algorithm.equipment(),
        content_label=HEATMAP_CONTENT_LABEL,
        content_description=f"HER2 heatmap - {NOT_FOR_CLINICAL_USE}",  # LO: at most 64 characters
        series_description=SEG_SERIES_DESCRIPTION,
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(grid.tile_size * row_spacing, grid.tile_size * col_spacing),
            slice_thickness=float(thickness) if thickness is not None else None,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_orientation=[float(v) for v in scored_level.ImageOrientationSlide],
        ),
        plane_positions=[hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_position=tile_centre_position(scored_level, grid.tile_size),
            pixel_matrix_position=(1, 1),
        )],
        tile_pixel_array=True,
        tile_size=(frame_side, frame_side),
        omit_empty_frames=False,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    set_device_uid(seg, uids.device)
    if "PatientOrientation" not in seg:
        # General Image Module (PS3.3 C.7.6.1): Type 2C, required (may be empty) when there is no
        # Image Orientation (Patient), as in the slide coordinate system; highdicom leaves it out.
        seg.PatientOrientation = ""
    return seg
