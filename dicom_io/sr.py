"""The HER2 result as a Comprehensive 3D SR (PS3.3 A.35.13) with a TID 1500 Measurement Report, and its readers.

:func:`build_sr` writes the HER2 IHC score as a TID 1410 Planar ROI group
whose region is an SCOORD3D polygon around the scored tiles (what Slim needs
to show it), the same call as a slide-level TID 1501 group (what
region-unaware readers look for), the per-class tumour-area percentages and
the tumour area; optionally one TID 1410 group per grader
(:class:`GraderResult`: the tile CNN, the membrane cell grader) with its own
call and measurements, and references to the heatmap SEG
(:mod:`dicom_io.seg`) and the cell ANN (:mod:`dicom_io.cell_annotations`) it
summarises. The ``read_sr_*`` functions read those back from a plain dataset.
Coded concepts: :mod:`dicom_io.codes`.

Research use only: the Series Description says "not for clinical use" and the
SR repeats it as a comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicom_io.codes import (
    ABNORMAL_STRUCTURE,
    CELL_COUNT,
    CELL_PERCENTAGE,
    CELLS,
    CLASS_PERCENTAGE,
    COMMENT,
    HER2_CATEGORY,
    HER2_SCORE,
    HER2_SCORE_VALUES,
    HER2_ULTRALOW,
    MEMBRANE_CONNECTIVITY,
    NO,
    NO_UNITS,
    PERCENT,
    REFLEX_ISH,
    SCORING_FLAG,
    SLIDE_CALL_GRADER,
    SQUARE_MM,
    TUMOR,
    TUMOUR_AREA,
    WHOLE_SLIDE_IMAGING,
    YES,
    local_scheme_item,
)
from dicom_io.geometry import check_score_fits, scored_region_outline
from dicom_io.result_header import (
    AlgorithmInfo,
    check_sources,
    series_header,
    set_device_uid,
    source_result_uids,
)
from dicom_io.uids import derived_uid
from her2_core.aggregate import CLASSES, SlideCall, SlideScore
from her2_core.facts import INTENDED_USE

SR_SERIES_NUMBER = 9001
SR_SERIES_DESCRIPTION = f"HER2 IHC AI score - {INTENDED_USE}"  # LO: at most 64 characters
INTENDED_USE_COMMENT = f"Automated HER2 IHC scoring (ASCO/CAP categories). {INTENDED_USE}; not verified by a pathologist."

#: Grader basis -> (group title, per-class percentage concepts).
GRADER_BASES: dict[str, tuple[str, dict[str, CodedConcept]]] = {
    "tumour area": ("HER2 tile grader", CLASS_PERCENTAGE),
    "tumour cells": ("HER2 membrane cell grader", CELL_PERCENTAGE),
}


@dataclass(frozen=True, kw_only=True)
class GraderResult:
    """One grader's own result on the slide, for its measurement group in the SR.

    Attributes
    ----------
    algorithm: AlgorithmInfo
        The grader (TID 4019 Algorithm Identification of its group).
    call: SlideCall
        The grader's own slide call (ASCO/CAP on its percentages).
    percentages: dict[str, float]
        Per class of ``CLASSES``, in 0..100.
    basis: str
        What the percentages are of: ``"tumour area"`` (tile grader) or
        ``"tumour cells"`` (cell grader); see :data:`GRADER_BASES`.
    cell_counts: dict[str, int] | None
        Tumour cells per class (``"tumour cells"`` basis only).
    connectivity: float | None
        Slide membrane connectivity in [0, 1]: 0 when no tumour cell has any
        membrane staining, 1 when every one is ringed completely by intense
        staining (the cell grader's mean of completeness x relative intensity).

    Raises
    ------
    ValueError
        On an unknown basis, missing or out-of-range values, or cell counts
        on a tumour-area basis.

    """

    algorithm: AlgorithmInfo
    call: SlideCall
    percentages: dict[str, float]
    basis: str
    cell_counts: dict[str, int] | None = None
    connectivity: float | None = None

    def __post_init__(self) -> None:
        if self.basis not in GRADER_BASES:
            raise ValueError(f"grader basis {self.basis!r} is not one of {sorted(GRADER_BASES)}")
        for name, values in (("percentages", self.percentages), ("cell_counts", self.cell_counts)):
            if values is not None and sorted(values) != sorted(CLASSES):
                raise ValueError(f"{self.algorithm.name}: {name} has classes {sorted(values)}, expected {CLASSES}")
        if not all(np.isfinite(v) and 0.0 <= v <= 100.0 for v in self.percentages.values()):
            raise ValueError(f"{self.algorithm.name}: percentages {self.percentages} not all in 0..100")
        if self.cell_counts is not None:
            if self.basis != "tumour cells":
                raise ValueError(f"{self.algorithm.name}: cell counts given for a {self.basis!r} grader")
            if not all(int(v) == v and v >= 0 for v in self.cell_counts.values()):
                raise ValueError(f"{self.algorithm.name}: cell counts {self.cell_counts} are not all counts")
        if self.connectivity is not None and not 0.0 <= self.connectivity <= 1.0:
            raise ValueError(f"{self.algorithm.name}: connectivity {self.connectivity} is outside [0, 1]")


def _her2_evaluations(call: SlideCall) -> list[hd.sr.QualitativeEvaluation]:
    """HER2 score, HER2-ultralow category and reflex-ISH evaluations for ``call``."""
    evaluations = [hd.sr.QualitativeEvaluation(HER2_SCORE, HER2_SCORE_VALUES[call])]
    if call is SlideCall.ULTRALOW:
        evaluations.append(hd.sr.QualitativeEvaluation(HER2_CATEGORY, HER2_ULTRALOW))
    if call is not SlideCall.NOT_ASSESSABLE:
        evaluations.append(hd.sr.QualitativeEvaluation(REFLEX_ISH, YES if call.reflex_ish else NO))
    return evaluations


def _percentages(percentages: dict[str, float], concepts: dict[str, CodedConcept],
                 algorithm_id: hd.sr.AlgorithmIdentification, seg: Dataset | None) -> list[hd.sr.Measurement]:
    """Per-class percentages (%) as TID 300 items; each INFERRED FROM its segment of ``seg`` when given.

    The heatmap's segment k+1 holds the probabilities of ``CLASSES[k]``
    (:func:`build_heatmap`), which the tile grader's percentages weigh by
    tumour fraction: TID 320 "Source of Measurement" (121112, DCM) IMAGE with
    Referenced Segment Number (PS3.3 C.18.3.1, Image Reference Macro).
    """
    items = []
    for k, c in enumerate(CLASSES):
        sources = None
        if seg is not None:
            source = hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID)
            source.ReferencedSOPSequence[0].ReferencedSegmentNumber = k + 1
            sources = [source]
        items.append(hd.sr.Measurement(name=concepts[c], value=float(percentages[c]), unit=PERCENT,
                                       algorithm_id=algorithm_id, referenced_images=sources))
    return items


def _measurements(score: SlideScore, algorithm_id: hd.sr.AlgorithmIdentification,
                  seg: Dataset | None = None) -> list[hd.sr.Measurement]:
    """Per-class tumour-area percentages (%) and the scored tumour area (mm2) as TID 300 items."""
    items = _percentages(score.percentages, CLASS_PERCENTAGE, algorithm_id, seg)
    items.append(hd.sr.Measurement(name=TUMOUR_AREA, value=float(score.tumour_area_mm2), unit=SQUARE_MM,
                                   algorithm_id=algorithm_id))
    return items


def _heatmap_of(algorithm: AlgorithmInfo, references: Sequence[Dataset]) -> Dataset | None:
    """The Segmentation among ``references`` made by ``algorithm`` (its segments' algorithm name), if any."""
    for ds in references:
        segments = ds.get("SegmentSequence", []) if ds.get("SOPClassUID") == SegmentationStorage else []
        if len(segments) == len(CLASSES) and all(s.get("SegmentAlgorithmName") == algorithm.name for s in segments):
            return ds
    return None


def _grader_group(grader: GraderResult, deciding: bool, region: hd.sr.ImageRegion3D, scored_level: Dataset,
                  sr_uid: str, references: Sequence[Dataset]) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one grader: its own call, percentages, cell counts, connectivity, decider flag."""
    title, concepts = GRADER_BASES[grader.basis]
    algorithm_id = grader.algorithm.identification()
    measurements = _percentages(grader.percentages, concepts, algorithm_id,
                                _heatmap_of(grader.algorithm, references))
    if grader.cell_counts is not None:
        measurements += [hd.sr.Measurement(name=CELL_COUNT[c], value=int(grader.cell_counts[c]), unit=CELLS,
                                           algorithm_id=algorithm_id) for c in CLASSES]
    if grader.connectivity is not None:
        measurements.append(hd.sr.Measurement(name=MEMBRANE_CONNECTIVITY, value=float(grader.connectivity),
                                              unit=NO_UNITS, algorithm_id=algorithm_id))
    evaluations = _her2_evaluations(grader.call)
    evaluations.append(hd.sr.QualitativeEvaluation(SLIDE_CALL_GRADER, YES if deciding else NO))
    name = f"{grader.algorithm.name} {grader.algorithm.version}"
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", sr_uid, "grader", grader.algorithm.name, grader.algorithm.version),
            identifier=f"{title} ({grader.basis}): {name}"),
        referenced_region=region,
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _subject_context(scored_level: Dataset) -> hd.sr.SubjectContext:
    """TID 1006 Subject Context with Subject Class Specimen (121027, DCM) and TID 1009 Specimen context."""
    try:
        specimen = scored_level.SpecimenDescriptionSequence[0]
        specimen_uid = specimen.SpecimenUID
    except (AttributeError, IndexError) as exc:
        raise ValueError(
            f"scored level {scored_level.get('SOPInstanceUID', '?')} has no "
            "SpecimenDescriptionSequence[0].SpecimenUID (PS3.3 C.7.6.22 Specimen Module)"
        ) from exc
    specimen_type = None
    if specimen.get("SpecimenTypeCodeSequence"):
        specimen_type = CodedConcept.from_dataset(specimen.SpecimenTypeCodeSequence[0])
    return hd.sr.SubjectContext(
        subject_class=codes.DCM.Specimen,
        subject_class_specific_context=hd.sr.SubjectContextSpecimen(
            uid=specimen_uid,
            identifier=specimen.get("SpecimenIdentifier") or None,
            container_identifier=scored_level.get("ContainerIdentifier") or None,
            specimen_type=specimen_type,
        ),
    )


def _finding_sites(scored_level: Dataset) -> list[hd.sr.FindingSite] | None:
    """Finding site from the specimen's Primary Anatomic Structure (e.g. breast), when the source has one."""
    try:
        structure = scored_level.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence[0]
    except (AttributeError, IndexError):
        return None
    return [hd.sr.FindingSite(anatomic_location=CodedConcept.from_dataset(structure))]

def _check_graders(score: SlideScore, graders: Sequence[GraderResult], deciding: int | None) -> None:
    if deciding is not None and not 0 <= deciding < len(graders):
        raise ValueError(f"deciding grader index {deciding} is not one of the {len(graders)} graders")
    names = [(g.algorithm.name, g.algorithm.version) for g in graders]
    if len(set(names)) != len(names):
        raise ValueError(f"graders {names} repeat an algorithm version: each grader needs its own")
    if deciding is not None and score.call is not SlideCall.NOT_ASSESSABLE \
            and graders[deciding].call is not score.call:
        raise ValueError(f"slide call {score.call.value!r} is not the deciding grader's call "
                         f"{graders[deciding].call.value!r} ({graders[deciding].algorithm.name})")


def _check_references(source_instances: Sequence[Dataset], references: Sequence[Dataset]) -> None:
    study = source_instances[0].StudyInstanceUID
    for ds in references:
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise ValueError("a reference has no SOPClassUID / SOPInstanceUID")
        if ds.get("StudyInstanceUID") != study:
            raise ValueError(f"reference {ds.SOPInstanceUID} is in study {ds.get('StudyInstanceUID')}, "
                             f"not the slide's study {study}")


def build_sr(
    source_instances: Sequence[Dataset],
    scored_level: Dataset,
    score: SlideScore,
    algorithm: AlgorithmInfo,
    graders: Sequence[GraderResult] = (),
    deciding: int | None = None,
    references: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the HER2 result as a Comprehensive 3D SR with a TID 1500 Measurement Report.

    Content tree (PS3.16 TID 1500):

    * TID 1001 observation context: device observer (``algorithm``, its Device
      UID) and TID 1006/1009 subject context Specimen (121027, DCM) with the
      source's Specimen UID, Specimen Identifier and Container Identifier;
    * procedure reported (112703, DCM, "Whole Slide Imaging");
    * TID 1600 image library listing every source instance;
    * Imaging Measurements with

      - a TID 1410 Planar ROI group whose Image Region is an SCOORD3D POLYGON
        (slide coordinates, the source's Frame of Reference) around the scored
        tiles: the **slide call** (HER2 score, HER2-ultralow category, reflex
        ISH), the tile grader's tumour-area percentages, tumour area,
        algorithm identification (TID 4019), finding type Tumor and the
        specimen's anatomic site;
      - a TID 1501 slide-level group with the same evaluations, the scoring
        flags and the intended-use comment as TEXT items, referencing the
        scored level as source image;
      - one TID 1410 group per grader in ``graders`` (same region: the
        graders grade the same tissue; Slim shows only TID 1410 groups with an
        SCOORD3D region), tracking identifier "HER2 tile grader (tumour
        area): <name> <version>" or "HER2 membrane cell grader (tumour cells):
        ...": the grader's TID 4019 algorithm identification, its own call
        (same HER2 score codes), (DECIDES, 99HER2) "Grader made the slide
        call" Yes/No, its per-class percentages named by their basis
        ("Tumor area with ..." or "Tumor cells with HER2 IHC <c> staining"),
        per-class cell counts (UCUM "{cells}") and the membrane connectivity
        (UCUM "1", range 0..1) when given.

    References (issue 14: a viewer can link score and evidence): every
    dataset in ``references`` (the heatmap SEG, the cell ANN) is listed in the
    Current Requested Procedure Evidence Sequence (SR Document General
    Module, PS3.3 C.17.2: the instances created for this procedure), and the
    percentages of the grader that made a heatmap (the SEG whose segments
    name its algorithm) are each INFERRED FROM their class's segment
    (TID 300 / TID 320 "Source of Measurement", Referenced Segment Number).
    PS3.16 has no TID 1500 content item for a Microscopy Bulk Simple
    Annotations reference, so the ANN is linked through the evidence only.

    Patient, study and specimen identity are copied from the source
    (highdicom copies them from ``source_instances[0]``); Series and SOP
    Instance UIDs come from :func:`dicom_io.uids.result_uids` (source series,
    its scored instances, ``algorithm`` and every grader's version as
    co-models) so that a retried job produces the same instance and a new
    version of any grader a new one.

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (pixel data not needed).
    scored_level: pydicom.Dataset
        The instance whose tiles were graded (one of ``source_instances``).
    score: SlideScore
        The slide's score (its call is the slide call); ``score.grid`` lies on ``scored_level``.
    algorithm: AlgorithmInfo
        The model that produced ``score`` (device observer; names the SR).
    graders: Sequence[GraderResult]
        Each grader's own result (e.g. the tile CNN and the membrane cell
        grader); none: the SR as before, with no grader groups.
    deciding: int | None
        Index into ``graders`` of the grader that made the slide call, whose
        call must then be ``score.call`` (unless quality control made the slide
        not assessable); None: no grader made it.
    references: Sequence[pydicom.Dataset]
        Result objects of the same study this SR summarises (metadata
        suffices): the heatmap SEG and the cell ANN, built before the SR.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR document (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        When the sources are empty or from several series, the scored level is
        not among them, lacks specimen or spatial attributes, the score does
        not fit its grid, ``deciding`` is out of range or disagrees with the
        slide call, two graders share an algorithm version, or a reference is
        of another study.

    """
    check_sources(source_instances, scored_level)
    check_score_fits(scored_level, score)
    _check_graders(score, graders, deciding)
    _check_references(source_instances, references)
    uids = source_result_uids(source_instances, algorithm, [g.algorithm for g in graders])
    algorithm_id = algorithm.identification()

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.device, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
                model_name=f"{algorithm.name} {algorithm.version}"[:64],
            ),
        ),
        subject_context=_subject_context(scored_level),
    )
    outline = scored_region_outline(scored_level, score)

    def region() -> hd.sr.ImageRegion3D:
        return hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=outline,
                                   frame_of_reference_uid=scored_level.FrameOfReferenceUID)

    roi_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", uids.sr, "scored-region"), identifier="HER2 scored tissue region"),
        referenced_region=region(),
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        measurements=_measurements(score, algorithm_id, _heatmap_of(algorithm, references)),
        qualitative_evaluations=_her2_evaluations(score.call),
    )
    slide_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", uids.sr, "slide"), identifier="HER2 slide-level call"),
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        qualitative_evaluations=_her2_evaluations(score.call),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(scored_level)],
    )
    # TID 1501 allows TEXT qualitative evaluations; highdicom's constructor has no slot for them.
    slide_group[0].ContentSequence.extend(
        [_text(SCORING_FLAG, flag) for flag in score.flags] + [_text(COMMENT, INTENDED_USE_COMMENT)]
    )
    grader_groups = [_grader_group(g, i == deciding, region(), scored_level, uids.sr, references)
                     for i, g in enumerate(graders)]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=WHOLE_SLIDE_IMAGING,
        imaging_measurements=[roi_group, slide_group, *grader_groups],
        referenced_images=list(source_instances),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_instances, *references],
        content=report[0],
        **series_header(uids.sr_series, uids.sr, SR_SERIES_NUMBER, SR_SERIES_DESCRIPTION,
                        [algorithm, *(g.algorithm for g in graders)]),
        is_complete=True,
        is_final=False,
        coding_schemes=[local_scheme_item()],
    )
    set_device_uid(sr, uids.device)
    return sr


def read_sr_call(sr: Dataset) -> str:
    """The slide's HER2 score (Code Meaning of the (85319-2, LN) value) found in an SR.

    Walks the content tree outside the graders' own groups (those holding a
    "Grader made the slide call" item, whose calls may differ: see
    :func:`read_sr_graders`); every slide HER2 score item must agree.

    Parameters
    ----------
    sr: pydicom.Dataset
        An SR written by :func:`build_sr` (a plain dataset read with
        :func:`pydicom.dcmread` is enough).

    Returns
    -------
    str
        ``"0"``, ``"1+"``, ``"2+"``, ``"3+"`` or ``"Indeterminate"`` (an
        ultralow slide reads ``"0"``; see :func:`read_sr_ultralow`).

    Raises
    ------
    ValueError
        When the SR holds no HER2 score, or HER2 scores that disagree.

    """
    found = {item.ConceptCodeSequence[0].CodeMeaning for item in _code_items(sr, HER2_SCORE)}
    if not found:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')} holds no HER2 score (85319-2, LN)")
    if len(found) > 1:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')} holds conflicting HER2 scores: {sorted(found)}")
    return found.pop()


def read_sr_ultralow(sr: Dataset) -> bool:
    """Whether the SR flags the slide HER2-ultralow ((1381318009, SCT) as HER2 expression category)."""
    return any(_is(item.ConceptCodeSequence[0], HER2_ULTRALOW) for item in _code_items(sr, HER2_CATEGORY))


def read_sr_graders(sr: Dataset) -> list[dict]:
    """Each grader's own result from its measurement group, in document order.

    Parameters
    ----------
    sr: pydicom.Dataset
        An SR written by :func:`build_sr` (a plain dataset is enough).

    Returns
    -------
    list[dict]
        Per grader: ``name``, ``version`` (TID 4019), ``basis`` (``"tumour
        area"`` / ``"tumour cells"``, from the percentages' concepts),
        ``call`` (Code Meaning, as :func:`read_sr_call`), ``ultralow``
        (bool), ``deciding`` (bool), ``percentages`` (class -> %),
        ``cell_counts`` (class -> int, or None), ``connectivity`` (float or
        None) and ``references`` (SOP Instance UIDs its measurements are
        inferred from, e.g. the heatmap SEG). Empty for an SR without graders.

    """
    out = []
    for group in _grader_groups(sr):
        items = group.ContentSequence
        texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in items if i.ValueType == "TEXT"}
        coded = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0] for i in items
                 if i.ValueType == "CODE"}
        basis = next(b for b, (_, concepts) in GRADER_BASES.items() if _num(items, concepts[CLASSES[0]]) is not None)
        counts = {c: v for c in CLASSES if (v := _num(items, CELL_COUNT[c])) is not None}
        out.append({
            "name": texts.get("111001"), "version": texts.get("111003"), "basis": basis,
            "call": coded[HER2_SCORE.value].CodeMeaning,
            "ultralow": HER2_CATEGORY.value in coded and _is(coded[HER2_CATEGORY.value], HER2_ULTRALOW),
            "deciding": _is(coded[SLIDE_CALL_GRADER.value], YES),
            "percentages": {c: _num(items, GRADER_BASES[basis][1][c]) for c in CLASSES},
            "cell_counts": {c: int(v) for c, v in counts.items()} if len(counts) == len(CLASSES) else None,
            "connectivity": _num(items, MEMBRANE_CONNECTIVITY),
            "references": sorted({ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                  for i in items if i.ValueType == "NUM" for ref in i.get("ContentSequence", [])
                                  if ref.ValueType == "IMAGE"}),
        })
    return out


def _num(items: Sequence[Dataset], concept: CodedConcept) -> float | None:
    """Value of the NUM item named ``concept`` among ``items`` (not below them), None if there is none."""
    for item in items:
        if item.ValueType == "NUM" and _is(item.ConceptNameCodeSequence[0], concept):
            return float(item.MeasuredValueSequence[0].NumericValue)
    return None


def read_sr_evidence(sr: Dataset) -> set[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of every instance in the SR's Current Requested Procedure Evidence."""
    return {
        (str(inst.ReferencedSOPClassUID), str(inst.ReferencedSOPInstanceUID))
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }


def _is(code: Dataset, concept: CodedConcept) -> bool:
    return code.CodeValue == concept.value and code.CodingSchemeDesignator == concept.scheme_designator


def _is_grader_group(item: Dataset) -> bool:
    """A measurement group holding "Grader made the slide call": one grader's own result."""
    return item.get("ValueType") == "CONTAINER" and any(
        child.get("ValueType") == "CODE" and _is(child.ConceptNameCodeSequence[0], SLIDE_CALL_GRADER)
        for child in item.get("ContentSequence", []))


def _grader_groups(node: Dataset) -> list[Dataset]:
    found: list[Dataset] = []
    for item in node.get("ContentSequence", []):
        found.extend([item] if _is_grader_group(item) else _grader_groups(item))
    return found


def _code_items(node: Dataset, name: CodedConcept) -> list[Dataset]:
    """All CODE content items named ``name`` below ``node`` (depth first), outside graders' groups."""
    found = []
    for item in node.get("ContentSequence", []):
        if _is_grader_group(item):
            continue
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and concept and _is(concept[0], name):
            found.append(item)
        found.extend(_code_items(item, name))
    return found
