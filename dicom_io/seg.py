"""The per-tile class-probability heatmap as a FRACTIONAL Segmentation (PS3.3 A.51, C.8.20), and its reader.

One segment per tile class (:data:`her2_core.aggregate.CLASSES`), fractional type
PROBABILITY, in the source's study and Frame of Reference, in a series of its
own; the SR (:mod:`dicom_io.sr`) infers its tile-grader percentages from these
segments.

Research use only: the Series Description says "not for clinical use".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom import Dataset

from dicom_io.codes import (
    ABNORMAL_STRUCTURE,
    TILE_CLASS_CODES,
    display_colour,
    local_scheme_item,
)
from dicom_io.geometry import check_score_fits, level_spacing, tile_centre_position
from dicom_io.result_header import (
    NOT_FOR_CLINICAL_USE,
    AlgorithmInfo,
    check_sources,
    series_header,
    set_device_uid,
    source_result_uids,
)
from dicom_io.uids import derived_uid
from her2_core.aggregate import CLASSES, SlideScore

SEG_SERIES_NUMBER = 9002
SEG_SERIES_DESCRIPTION = f"HER2 IHC AI heatmap - {NOT_FOR_CLINICAL_USE}"  # LO: at most 64 characters
HEATMAP_CONTENT_LABEL = "HER2_HEATMAP"


#: Heatmap pixels per tile edge: at least this many, so a viewer shows tile edges as edges, not blur;
#: at most the maximum, so the heatmap stays a small fraction of the slide.
MIN_PIXELS_PER_TILE = 8
MAX_PIXELS_PER_TILE = 128
#: Largest heatmap (pixels per segment) drawn on a slide level's grid; beyond it the coarse fallback.
MAX_HEATMAP_PIXELS = 1 << 22


@dataclass(frozen=True)
class HeatmapGrid:
    """Pixel grid of the heatmap on the scored level.

    Attributes
    ----------
    step: int
        Scored-level pixels per heatmap pixel; divides the tile size.
    rows, cols: int
        Heatmap Total Pixel Matrix size.
    level: str | None
        SOP Instance UID of the source level whose pixel grid the heatmap
        shares (same Pixel Spacing, same top-left corner), None when no level fits.

    """

    step: int
    rows: int
    cols: int
    level: str | None

    def pixels_per_tile(self, tile_size: int) -> int:
        return tile_size // self.step


def heatmap_grid(source_instances: Sequence[Dataset], scored_level: Dataset, tile_size: int) -> HeatmapGrid:
    """Choose the heatmap's pixel grid: the coarsest source level fine enough to draw tile edges.

    Candidates are the VOLUME levels of the source (same Frame of Reference)
    whose Pixel Spacing is an exact multiple ``step`` of the scored level's,
    with ``step`` dividing ``tile_size`` (so heatmap pixels never straddle two
    tiles) and ``tile_size / step`` in [:data:`MIN_PIXELS_PER_TILE`,
    :data:`MAX_PIXELS_PER_TILE`], whose top-left
    pixel lies on the scored level's top-left corner (within one of its
    pixels), and whose matrix is at most :data:`MAX_HEATMAP_PIXELS`. The
    heatmap then has that level's Total Pixel Matrix size and spacing, which
    is what lets dicom-microscopy-viewer draw it on that pyramid level (it
    matches a SEG to the slide by equal Pixel Spacing and otherwise warns and
    falls back to a fixed-spacing mode). When no level fits, the heatmap has
    ``MIN_PIXELS_PER_TILE`` pixels per tile (the coarsest such ``step`` that
    divides the tile size) on the scored level's grid.
    """
    rows, cols = int(scored_level.TotalPixelMatrixRows), int(scored_level.TotalPixelMatrixColumns)
    spacing = np.array(level_spacing(scored_level))
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    best: HeatmapGrid | None = None
    for level in source_instances:
        if level.get("FrameOfReferenceUID") != scored_level.FrameOfReferenceUID or \
                len(level.get("ImageType", [])) < 3 or level.ImageType[2] != "VOLUME":
            continue
        try:
            ratio = np.array(level_spacing(level)) / spacing
        except ValueError:
            continue
        step = round(float(ratio[0]))
        if step < 1 or not np.allclose(ratio, step, rtol=1e-6) or tile_size % step or \
                not MIN_PIXELS_PER_TILE <= tile_size // step <= MAX_PIXELS_PER_TILE:
            continue
        level_rows, level_cols = int(level.TotalPixelMatrixRows), int(level.TotalPixelMatrixColumns)
        if level_rows * level_cols > MAX_HEATMAP_PIXELS or \
                abs(level_rows - rows / step) > 1 or abs(level_cols - cols / step) > 1:
            continue
        corner = hd.spatial.ImageToReferenceTransformer.for_image(level, for_total_pixel_matrix=True)(
            np.array([[0.5, 0.5]]))[0]
        if np.linalg.norm(corner - to_slide(np.array([[step / 2, step / 2]]))[0]) > spacing[0] * step:
            continue
        if best is None or step > best.step:
            best = HeatmapGrid(step, level_rows, level_cols, str(level.SOPInstanceUID))
    if best is not None:
        return best
    step = max((d for d in range(1, tile_size + 1) if tile_size % d == 0 and tile_size // d >= MIN_PIXELS_PER_TILE),
               default=1)
    return HeatmapGrid(step, -(-rows // step), -(-cols // step), None)


def heatmap_array(score: SlideScore, grid: HeatmapGrid) -> np.ndarray:
    """(1, rows, cols, 4) float32 probabilities in [0, 1] on ``grid``; unscored tiles, NaN and beyond the tiles 0.

    Heatmap pixel (r, c) covers scored-level pixels [r*step, (r+1)*step) x
    [c*step, (c+1)*step), all in tile (r // k, c // k) with k pixels per tile.
    """
    probabilities = np.nan_to_num(score.probabilities.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    probabilities = probabilities.clip(0.0, 1.0)
    probabilities[~score.scored.astype(bool)] = 0.0
    k = grid.pixels_per_tile(score.grid.tile_size)
    tiles_r, tiles_c = np.arange(grid.rows) // k, np.arange(grid.cols) // k
    out = np.zeros((grid.rows, grid.cols, len(CLASSES)), np.float32)
    inside_r, inside_c = tiles_r < score.grid.rows, tiles_c < score.grid.cols
    out[np.ix_(inside_r, inside_c)] = probabilities[np.ix_(tiles_r[inside_r], tiles_c[inside_c])]
    return out[np.newaxis]


def build_heatmap(
    source_instances: Sequence[Dataset], scored_level: Dataset, score: SlideScore, algorithm: AlgorithmInfo
) -> hd.seg.Segmentation:
    """Build the per-tile class-probability heatmap as a FRACTIONAL Segmentation.

    One segment per tile class (segment k+1 = ``CLASSES[k]``, labelled
    "HER2 IHC <class>", Segmented Property Category (49755003, SCT), Type
    the class's own code (:data:`dicom_io.codes.TILE_CLASS_CODES`) and
    Recommended Display CIELab Value the class colour
    (:data:`dicom_io.codes.CLASS_COLOURS`, as the PNG legend and the cell
    ANN), fractional type PROBABILITY, 8-bit (1/255 steps), Explicit VR
    Little Endian (PS3.3 C.8.20 Segmentation Image Module, C.8.20.2 Segment
    Description); the local ``99HER2`` scheme is declared in the Coding
    Scheme Identification Sequence. The heatmap is one Total Pixel Matrix,
    tiled by highdicom (TILED_FULL, PS3.3 C.7.6.17.3) in square frames of at
    most 512 pixels, on the grid :func:`heatmap_grid` chooses: normally that
    of a source pyramid level, ``step`` scored-level pixels per heatmap
    pixel, each tile ``tile_size / step`` heatmap pixels wide, every heatmap
    pixel inside one tile and holding that tile's probabilities:

    * Pixel Spacing = ``step`` x the scored level's Pixel Spacing;
    * orientation = the source's Image Orientation (Slide);
    * the Plane Position (Slide) of heatmap pixel (0, 0) is the slide
      position of the centre of the scored-level square [0, step)^2 it
      covers (for ``step == tile_size``: the centre of tile (0, 0), see
      :func:`tile_centre_position`).

    highdicom reads and writes slide positions as the centre of the top-left
    pixel, for the source's Total Pixel Matrix Origin as for the heatmap's
    plane positions; under that one convention heatmap pixel (r, c) covers
    exactly scored-level pixels [r*step, (r+1)*step) x [c*step, (c+1)*step).

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (their UIDs name the results;
        their levels are the candidate heatmap grids).
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
    pixels = heatmap_grid(source_instances, scored_level, grid.tile_size)
    row_spacing, col_spacing = level_spacing(scored_level)
    measures = scored_level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = measures.get("SliceThickness")
    # Square frames no larger than the heatmap (a 3x4 heatmap is one 4x4 frame, not a padded 512x512 one).
    frame_side = min(512, max(pixels.rows, pixels.cols))
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=f"HER2 IHC {c}",
            segmented_property_category=ABNORMAL_STRUCTURE,
            segmented_property_type=TILE_CLASS_CODES[c],
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.segment_identification(),
            tracking_uid=derived_uid("tracking", uids.seg, f"segment-{c}"),
            tracking_id=f"HER2 IHC {c} tile probability",
            display_color=display_colour(c),
        )
        for k, c in enumerate(CLASSES)
    ]
    seg = hd.seg.Segmentation(
        source_images=[scored_level],
        pixel_array=heatmap_array(score, pixels),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=segments,
        **series_header(uids.seg_series, uids.seg, SEG_SERIES_NUMBER, SEG_SERIES_DESCRIPTION, [algorithm]),
        content_label=HEATMAP_CONTENT_LABEL,
        content_description=f"HER2 heatmap - {NOT_FOR_CLINICAL_USE}",  # LO: at most 64 characters
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(pixels.step * row_spacing, pixels.step * col_spacing),
            slice_thickness=float(thickness) if thickness is not None else None,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_orientation=[float(v) for v in scored_level.ImageOrientationSlide],
        ),
        plane_positions=[hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_position=tile_centre_position(scored_level, pixels.step),
            pixel_matrix_position=(1, 1),
        )],
        tile_pixel_array=True,
        tile_size=(frame_side, frame_side),
        omit_empty_frames=False,
    )
    set_device_uid(seg, uids.device)
    # Multi-frame Dimension Module (PS3.3 C.7.6.17): highdicom draws a new Dimension Organization UID per
    # object; a retried job must re-send the same object, so it is derived from the SEG's own UID.
    organization = derived_uid("dimension-organization", uids.seg)
    for item in (*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence):
        item.DimensionOrganizationUID = organization
    seg.CodingSchemeIdentificationSequence = [local_scheme_item()]  # SOP Common Module (PS3.3 C.12.1)
    if "PatientOrientation" not in seg:
        # General Image Module (PS3.3 C.7.6.1): Type 2C, required (may be empty) when there is no
        # Image Orientation (Patient), as in the slide coordinate system; highdicom leaves it out.
        seg.PatientOrientation = ""
    return seg
