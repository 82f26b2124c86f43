"""DICOM result objects: TID 1500 Comprehensive 3D SR and the heatmap Segmentation.

The source slide is built here with pydicom (metadata only, TILED_FULL VL WSM,
structure copied from highdicom's real ``sm_image.dcm`` test file), so these
tests need neither the synthetic slide generator nor pixel data.
"""

from __future__ import annotations

import copy
import io
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage

from dicom_io.cell_annotations import build_cell_annotations
from dicom_io.codes import (
    CELL_COUNT,
    CLASS_COLOURS,
    CLASS_PERCENTAGE,
    HER2_SCORE,
    MEMBRANE_CONNECTIVITY,
    REFLEX_ISH,
    SLIDE_CALL_GRADER,
    TILE_CLASS_CODES,
    TUMOUR_AREA,
)
from dicom_io.result_header import AlgorithmInfo
from dicom_io.seg import build_heatmap, heatmap_grid
from dicom_io.sr import (
    GraderResult,
    build_sr,
    read_sr_call,
    read_sr_evidence,
    read_sr_graders,
    read_sr_ultralow,
)
from dicom_io.uids import derived_uid, is_valid_uid, result_uids
from her2_core.aggregate import CLASSES, SlideCall, SlideScore, TileGrid

TILE = 512
SPACING_MM = 0.001  # 1 um/px
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.1003"
SPECIMEN_UID = "1.2.826.0.1.3680043.8.498.1004"
ICC_PROFILE = (Path(hd.__file__).parent / "_icc_profiles" / "sRGB_v4_ICC_preference.icc").read_bytes()
ALGORITHM = AlgorithmInfo(name="her2-resnet34", version="1.2.0", software_version="0.1.0")


# --- a realistic VL Whole Slide Microscopy source -------------------------------------------------

def wsm_level(width: int, height: int, spacing_mm: float, instance: int, tile: int = TILE,
              image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "VOLUME", "NONE")) -> Dataset:
    """Metadata of one TILED_FULL VL Whole Slide Microscopy Image level (PS3.3 A.32.8), no pixel data."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES_UID}.{instance}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = f"{SERIES_UID}.{instance}"
    ds.ImageType = list(image_type)
    ds.Modality = "SM"
    # Patient / study: values chosen to catch sloppy copying (caret names, leading zeros).
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "0042-HER2"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = STUDY_UID
    ds.StudyID = "S-7"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Ref^Doc"
    ds.SeriesInstanceUID = SERIES_UID
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Manufacturer = "Test Scanner Inc"
    ds.ManufacturerModelName = "Scanner 9000"
    ds.DeviceSerialNumber = "SN1"
    ds.SoftwareVersions = "1.0"
    ds.ContentDate = "20240102"
    ds.ContentTime = "101500"
    ds.AcquisitionDateTime = "20240102101500"
    ds.FrameOfReferenceUID = FRAME_OF_REFERENCE_UID
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.VolumetricProperties = "VOLUME"
    ds.DimensionOrganizationType = "TILED_FULL"
    organization = Dataset()
    organization.DimensionOrganizationUID = f"{SERIES_UID}.0"
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = -(-width // tile) * -(-height // tile)
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.LossyImageCompression = "00"
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    ds.ImagedVolumeWidth = width * spacing_mm
    ds.ImagedVolumeHeight = height * spacing_mm
    ds.ImagedVolumeDepth = 0.004
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 21.5
    origin.YOffsetInSlideCoordinateSystem = 17.25
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    measures = Dataset()
    measures.PixelSpacing = [spacing_mm, spacing_mm]
    measures.SliceThickness = 0.004
    frame_type = Dataset()
    frame_type.FrameType = list(image_type)
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.ICCProfile = ICC_PROFILE
    path.IlluminationTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = DicomSequence([hd.sr.CodedConcept("414298005", "SCT", "Full Spectrum")])
    ds.OpticalPathSequence = DicomSequence([path])
    ds.ContainerIdentifier = "SLIDE-0042-A1"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = "S24-0042-A1"
    specimen.SpecimenUID = SPECIMEN_UID
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    specimen.SpecimenTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("430856003", "SCT", "Tissue section")])
    specimen.PrimaryAnatomicStructureSequence = DicomSequence([hd.sr.CodedConcept("76752008", "SCT", "Breast")])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    ds.AcquisitionContextSequence = DicomSequence([])
    return ds


@pytest.fixture(scope="module")
def source() -> list[Dataset]:
    """Three pyramid levels (2048x1536 at 1 um/px, then /2, /4), as read from a PACS, no pixel data."""
    return [wsm_level(2048 // f, 1536 // f, SPACING_MM * f, instance=i + 1) for i, f in enumerate((1, 2, 4))]


@pytest.fixture(scope="module")
def level(source) -> Dataset:
    return source[0]


GRID = TileGrid(rows=3, cols=4, tile_size=TILE, pixel_spacing_mm=(SPACING_MM, SPACING_MM))


def make_score(call: SlideCall, seed: int = 0) -> SlideScore:
    """A score on the 3x4 grid with random probabilities; tile (0, 0) and (2, 3) not scored."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(np.ones(len(CLASSES)), size=(GRID.rows, GRID.cols)).astype(np.float32)
    scored = np.ones((GRID.rows, GRID.cols), bool)
    scored[0, 0] = scored[2, 3] = False
    probabilities[~scored] = np.nan
    tumour = np.where(scored, rng.uniform(0.2, 1.0, (GRID.rows, GRID.cols)), 0.0).astype(np.float32)
    percentages = {"0": 61.234567, "1+": 20.5, "2+": 12.25, "3+": 6.015433}
    return SlideScore(call=call, percentages=percentages, grid=GRID, probabilities=probabilities,
                      tumour_fraction=tumour, scored=scored,
                      flags=["Research use only - not for clinical use", "2 blurred tiles"])


def to_file(ds: Dataset) -> io.BytesIO:
    """``ds`` written as a DICOM file (PS3.10) in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(to_file(ds))


def srread(ds: Dataset) -> hd.sr.Comprehensive3DSR:
    return hd.sr.srread(to_file(ds))


# --- UIDs -----------------------------------------------------------------------------------------

def test_derived_uids_are_valid_deterministic_and_unambiguous():
    uid = derived_uid("a", "b")
    assert is_valid_uid(uid) and uid.startswith("2.25.") and len(uid) <= 64
    assert derived_uid("a", "b") == uid
    assert derived_uid("ab", "") != uid and derived_uid("b", "a") != uid
    assert not is_valid_uid("1.2.03") and not is_valid_uid("../1.2") and not is_valid_uid("")
    assert not is_valid_uid("1." * 40 + "1") and not is_valid_uid(None)  # type: ignore[arg-type]


INSTANCES = ["1.2.3.1", "1.2.3.2"]


def test_result_uids_depend_on_series_content_and_model_version():
    a = result_uids(SERIES_UID, INSTANCES, "m", "1")
    assert a == result_uids(SERIES_UID, INSTANCES[::-1] + INSTANCES[:1], "m", "1")  # order and repeats ignored
    values = [a.sr_series, a.sr, a.seg_series, a.seg, a.device]
    assert all(is_valid_uid(v) for v in values) and len(set(values)) == 5
    b = result_uids(SERIES_UID, INSTANCES, "m", "2")
    assert not {a.sr_series, a.sr, a.seg_series, a.seg, a.device} & {b.sr_series, b.sr, b.seg_series, b.seg, b.device}
    c = result_uids(SERIES_UID + ".9", INSTANCES, "m", "1")
    assert c.sr != a.sr and c.seg != a.seg and c.device == a.device
    # A series that gained an instance after it was scored is new content: new objects, same device.
    grown = result_uids(SERIES_UID, [*INSTANCES, "1.2.3.3"], "m", "1")
    assert {grown.sr_series, grown.sr, grown.seg_series, grown.seg}.isdisjoint(values) and grown.device == a.device
    with pytest.raises(ValueError, match="not a valid DICOM UID"):
        result_uids("1.2.3/../x", INSTANCES, "m", "1")
    with pytest.raises(ValueError, match=r"'1\.2\.03' is not a valid DICOM UID"):
        result_uids(SERIES_UID, ["1.2.03"], "m", "1")
    with pytest.raises(ValueError, match="source_instance_uids is empty"):
        result_uids(SERIES_UID, [], "m", "1")


# --- SR -------------------------------------------------------------------------------------------

EXPECTED_MEANING = {
    SlideCall.ZERO: "0", SlideCall.ULTRALOW: "0", SlideCall.ONE: "1+", SlideCall.TWO: "2+",
    SlideCall.THREE: "3+", SlideCall.NOT_ASSESSABLE: "Indeterminate",
}


@pytest.mark.parametrize("call", list(SlideCall))
def test_sr_codes_the_call(source, level, call):
    score = make_score(call)
    sr = roundtrip(build_sr(source, level, score, ALGORITHM))
    assert read_sr_call(sr) == EXPECTED_MEANING[call]
    assert read_sr_ultralow(sr) is (call is SlideCall.ULTRALOW)
    report = srread(sr)
    assert isinstance(report, hd.sr.Comprehensive3DSR)
    roi_groups = report.content.get_planar_roi_measurement_groups()
    assert len(roi_groups) == 1
    (group,) = roi_groups
    (her2,) = group.get_qualitative_evaluations(HER2_SCORE)
    assert her2.value.meaning == EXPECTED_MEANING[call] and her2.value.scheme_designator == "LN"
    reflex = group.get_qualitative_evaluations(REFLEX_ISH)
    if call is SlideCall.NOT_ASSESSABLE:
        assert reflex == []
    else:
        assert reflex[0].value.value == ("373066001" if call is SlideCall.TWO else "373067005")
    if call is SlideCall.ULTRALOW:
        assert any(e.value.value == "1381318009" and e.value.scheme_designator == "SCT"
                   for e in group.get_qualitative_evaluations())
    # The slide-level TID 1501 group carries the same call.
    (slide_group,) = report.content.get_image_measurement_groups()
    (slide_her2,) = slide_group.get_qualitative_evaluations(HER2_SCORE)
    assert slide_her2.value == her2.value


def test_sr_measurements_read_back(source, level):
    score = make_score(SlideCall.ONE)
    sr = srread(roundtrip(build_sr(source, level, score, ALGORITHM)))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    for c in CLASSES:
        (m,) = group.get_measurements(CLASS_PERCENTAGE[c])
        assert m.value == pytest.approx(score.percentages[c], abs=1e-6)
        assert m.unit.value == "%" and m.unit.scheme_designator == "UCUM"
    (area,) = group.get_measurements(TUMOUR_AREA)
    assert area.value == pytest.approx(score.tumour_area_mm2, rel=1e-9)
    assert area.unit.value == "mm2"
    # Algorithm identification (TID 4019) on the group.
    texts = {i.name.meaning: i.value for i in group[0].ContentSequence if i.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == ALGORITHM.name and texts["Algorithm Version"] == ALGORITHM.version


def test_sr_region_is_scoord3d_in_source_frame_of_reference(source, level):
    score = make_score(SlideCall.THREE)
    sr = srread(roundtrip(build_sr(source, level, score, ALGORITHM)))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    roi = group.roi
    assert isinstance(roi, hd.sr.ImageRegion3D)
    assert roi.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
    assert roi.frame_of_reference_uid == FRAME_OF_REFERENCE_UID
    polygon = roi.value
    assert np.allclose(polygon[0], polygon[-1])
    # All scored tiles (every tile but (0,0) and (2,3)) lie inside the outline's bounding box,
    # and the outline stays within the level.
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(level, for_total_pixel_matrix=True)
    level_corners = to_slide(np.array([[0, 0], [2048, 1536]], float))
    lo, hi = polygon.min(axis=0), polygon.max(axis=0)
    assert np.all(lo[:2] >= level_corners[:, :2].min(axis=0) - 1e-4)
    assert np.all(hi[:2] <= level_corners[:, :2].max(axis=0) + 1e-4)
    centre_13 = to_slide(np.array([[1.5 * TILE, 0.5 * TILE]]))[0]  # tile (0, 1) centre
    assert np.all(centre_13[:2] >= lo[:2]) and np.all(centre_13[:2] <= hi[:2])


def test_sr_copies_identity_and_references_source(source, level):
    sr = roundtrip(build_sr(source, level, make_score(SlideCall.TWO), ALGORITHM))
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                    "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        assert sr[keyword].value == level[keyword].value, keyword
    assert sr.SeriesInstanceUID != SERIES_UID and sr.Modality == "SR"
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert "not for clinical use" in sr.SeriesDescription.lower()
    referenced = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in source}
    report = srread(sr)
    # Subject context: Specimen with the source's specimen and container identifiers.
    items = {
        (i.ConceptNameCodeSequence[0].CodeMeaning): i for i in sr.ContentSequence
        if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert items["Subject Class"].ConceptCodeSequence[0].CodeValue == "121027"
    assert items["Specimen UID"].UID == SPECIMEN_UID
    assert items["Specimen Identifier"].TextValue == "S24-0042-A1"
    assert items["Specimen Container Identifier"].TextValue == "SLIDE-0042-A1"
    procedure = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "112703"
    # Image library lists every level.
    library = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"]
    listed = {
        img.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for grp in library[0].ContentSequence for img in grp.ContentSequence if img.ValueType == "IMAGE"
    }
    assert listed == {ds.SOPInstanceUID for ds in source}
    assert report.content.get_observer_contexts()  # device observer present
    # The model as contributing equipment, its per-version Device UID in General Equipment (IHE AI Results).
    equipment = [e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == ALGORITHM.name]
    assert equipment and ALGORITHM.version in equipment[0].SoftwareVersions
    device = result_uids(SERIES_UID, [ds.SOPInstanceUID for ds in source], ALGORITHM.name, ALGORITHM.version).device
    assert sr.DeviceUID == device and sr.ManufacturerModelName == ALGORITHM.name
    assert not any("DeviceUID" in e for e in sr.ContributingEquipmentSequence)


def test_sr_carries_flags_and_intended_use(source, level):
    score = make_score(SlideCall.ZERO)
    sr = roundtrip(build_sr(source, level, score, ALGORITHM))

    def texts(node):
        for item in node.get("ContentSequence", []):
            if item.ValueType == "TEXT":
                yield item.ConceptNameCodeSequence[0].CodeMeaning, item.TextValue
            yield from texts(item)

    found = list(texts(sr))
    assert [v for n, v in found if n == "Scoring flag"] == score.flags
    assert any(n == "Comment" and "not for clinical use" in v.lower() for n, v in found)
    assert any(s.CodingSchemeDesignator == "99HER2" for s in sr.CodingSchemeIdentificationSequence)


def test_sr_uids_are_idempotent(source, level):
    a = build_sr(source, level, make_score(SlideCall.ONE), ALGORITHM)
    b = build_sr(source, level, make_score(SlideCall.ONE, seed=5), ALGORITHM)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    other = AlgorithmInfo(name=ALGORITHM.name, version="1.3.0", software_version="0.1.0")
    c = build_sr(source, level, make_score(SlideCall.ONE), other)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID
    # Scored before its last level arrived: that result is another object than the complete series' one.
    partial = build_sr(source[:2], level, make_score(SlideCall.ONE), ALGORITHM)
    assert partial.SOPInstanceUID != a.SOPInstanceUID and partial.SeriesInstanceUID != a.SeriesInstanceUID
    partial_seg = build_heatmap(source[:2], level, make_score(SlideCall.ONE), ALGORITHM)
    assert partial_seg.SOPInstanceUID != build_heatmap(source, level, make_score(SlideCall.ONE), ALGORITHM).SOPInstanceUID


def test_sr_refuses_bad_input(source, level):
    score = make_score(SlideCall.ONE)
    with pytest.raises(ValueError, match="not one of source_instances"):
        build_sr(source[1:], level, score, ALGORITHM)
    bad_grid = SlideScore(call=score.call, percentages=score.percentages,
                          grid=TileGrid(3, 4, TILE, (0.0005, 0.0005)), probabilities=score.probabilities,
                          tumour_fraction=score.tumour_fraction, scored=score.scored)
    with pytest.raises(ValueError, match="does not match the scored level"):
        build_sr(source, level, bad_grid, ALGORITHM)
    no_specimen = copy.deepcopy(level)
    del no_specimen.SpecimenDescriptionSequence
    with pytest.raises(ValueError, match="SpecimenDescriptionSequence"):
        build_sr([no_specimen], no_specimen, score, ALGORITHM)


# --- heatmap SEG ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def heatmap(source, level):
    score = make_score(SlideCall.TWO, seed=3)
    seg = build_heatmap(source, level, score, ALGORITHM)
    return score, seg, roundtrip(seg)


def test_heatmap_geometry(source, level, heatmap):
    _, _, ds = heatmap
    assert ds.SOPClassUID == pydicom.uid.SegmentationStorage
    assert ds.FrameOfReferenceUID == level.FrameOfReferenceUID
    assert ds.SegmentationType == "FRACTIONAL" and ds.SegmentationFractionalType == "PROBABILITY"
    assert ds.ContentLabel == "HER2_HEATMAP"
    assert len(ds.SegmentSequence) == 4
    assert [s.SegmentLabel for s in ds.SegmentSequence] == [f"HER2 IHC {c}" for c in CLASSES]
    assert all(s.SegmentAlgorithmName == ALGORITHM.name for s in ds.SegmentSequence)
    # On the grid of the coarsest level with >= 8 pixels per tile (4 um/px: 128 per 512 px tile), whose
    # Pixel Spacing dicom-microscopy-viewer must find equal (within 1e-5 mm) among the slide's levels.
    coarse = source[2]
    assert (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns) == \
        (coarse.TotalPixelMatrixRows, coarse.TotalPixelMatrixColumns) == (384, 512)
    spacing = [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    assert spacing == pytest.approx([4 * SPACING_MM] * 2, abs=1e-9)
    assert spacing == pytest.approx([float(v) for v in
                                     coarse.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing])
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID"):
        assert ds[keyword].value == level[keyword].value
    uids = result_uids(SERIES_UID, [ds.SOPInstanceUID for ds in source], ALGORITHM.name, ALGORITHM.version)
    assert ds.SeriesInstanceUID == uids.seg_series and ds.SOPInstanceUID == uids.seg
    assert ds.SeriesInstanceUID not in (SERIES_UID, uids.sr_series)
    assert "not for clinical use" in ds.SeriesDescription.lower()
    assert ds.ContentDescription.endswith("not for clinical use")  # whole, not cut at 64 characters


def test_heatmap_segments_are_coded_and_coloured_per_class(heatmap):
    """Each segment has its own property type and the class colour of the PNG legend and the ANN."""
    *_, ds = heatmap
    for k, (segment, name) in enumerate(zip(ds.SegmentSequence, CLASSES)):
        assert segment.SegmentNumber == k + 1
        assert CodedConcept.from_dataset(segment.SegmentedPropertyTypeCodeSequence[0]) == TILE_CLASS_CODES[name]
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        rgb = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, CLASS_COLOURS[name])).max() <= 1, (name, rgb)
    assert len({s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in ds.SegmentSequence}) == 4
    assert len({tuple(s.RecommendedDisplayCIELabValue) for s in ds.SegmentSequence}) == 4
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == ["99HER2"]


def test_heatmap_probabilities_read_back(heatmap):
    """Every heatmap pixel holds its tile's probabilities: 128 x 128 pixels per tile here."""
    score, _, ds = heatmap
    seg = hd.seg.Segmentation.from_dataset(ds)
    k = TILE // 4
    expected = np.repeat(np.repeat(np.nan_to_num(score.probabilities), k, axis=0), k, axis=1)
    for c in range(len(CLASSES)):
        tpm = seg.get_total_pixel_matrix(segment_numbers=[c + 1], combine_segments=False)
        assert tpm.shape[:2] == (GRID.rows * k, GRID.cols * k)
        assert np.abs(tpm[..., 0] - expected[..., c]).max() <= 1 / 255 + 1e-6
    # Unscored tiles are 0 in every segment.
    tpm = seg.get_total_pixel_matrix(combine_segments=False)
    assert np.all(tpm[:k, :k] == 0) and np.all(tpm[2 * k:, 3 * k:] == 0)
    assert tpm[k:2 * k, k:2 * k].sum(axis=-1).min() > 0.9


def test_heatmap_pixels_cover_their_tiles(level, heatmap):
    """Heatmap pixel (r, c) sits at the centre of scored-level pixels [4r, 4r+4) x [4c, 4c+4), inside tile (r//128, c//128)."""
    _, _, ds = heatmap
    heat = hd.spatial.PixelToReferenceTransformer.for_image(ds, for_total_pixel_matrix=True)
    src = hd.spatial.ImageToReferenceTransformer.for_image(level, for_total_pixel_matrix=True)
    rows, cols = np.mgrid[0:384:37, 0:512:41]
    heat_pos = heat(np.stack([cols.ravel(), rows.ravel()], axis=1))
    centres = src(np.stack([(cols.ravel() + 0.5) * 4, (rows.ravel() + 0.5) * 4], axis=1).astype(float))
    assert np.allclose(heat_pos, centres, atol=1e-6)
    # Tile edges are heatmap pixel edges: heatmap image point (128, 256) is scored-level point (512, 1024).
    heat_image = hd.spatial.ImageToReferenceTransformer.for_image(ds, for_total_pixel_matrix=True)
    assert np.allclose(heat_image(np.array([[128.0, 256.0]])), src(np.array([[512.0, 1024.0]])), atol=1e-6)
    # And the per-frame plane positions written by highdicom agree with the same mapping.
    frame1 = hd.spatial.PixelToReferenceTransformer.for_image(ds, frame_number=1)
    assert np.allclose(frame1(np.array([[0, 0]])), src(np.array([[2.0, 2.0]])), atol=1e-6)


def test_heatmap_grid_follows_a_slide_level_or_falls_back(source, level):
    """The heatmap takes the grid of the coarsest fitting level; without one, 8 pixels per tile."""
    chosen = heatmap_grid(source, level, TILE)
    assert (chosen.step, chosen.rows, chosen.cols, chosen.level) == (4, 384, 512, source[2].SOPInstanceUID)
    # 64 px tiles: the 4 um level would give 16 px per tile, the 2 um one 32: the coarsest wins.
    assert heatmap_grid(source, level, 64).level == source[2].SOPInstanceUID
    # 16 px tiles: only the 2 um level keeps 8 px per tile.
    assert heatmap_grid(source, level, 16).level == source[1].SOPInstanceUID
    alone = heatmap_grid([level], level, TILE)
    assert (alone.step, alone.rows, alone.cols, alone.level) == (64, 24, 32, None)
    shifted = copy.deepcopy(source[2])
    shifted.TotalPixelMatrixOriginSequence[0].XOffsetInSlideCoordinateSystem += 0.1  # 25 of its pixels off
    assert heatmap_grid([level, source[1], shifted], level, TILE).level is None
    odd = wsm_level(2048 // 3, 1536 // 3, SPACING_MM * 3, instance=9)  # 3 does not divide 512
    assert heatmap_grid([level, odd], level, TILE).level is None
    thumbnail = wsm_level(512, 384, SPACING_MM * 4, instance=8, image_type=("DERIVED", "PRIMARY", "THUMBNAIL", "NONE"))
    assert heatmap_grid([level, thumbnail], level, TILE).level is None


def test_heatmap_is_readable_from_file_and_idempotent(source, level, heatmap, tmp_path):
    score, seg, _ = heatmap
    path = tmp_path / "heatmap.dcm"
    seg.save_as(path, enforce_file_format=True)
    again = hd.seg.segread(path)
    assert again.number_of_segments == 4
    other = build_heatmap(source, level, score, ALGORITHM)
    assert (other.SOPInstanceUID, other.SeriesInstanceUID) == (seg.SOPInstanceUID, seg.SeriesInstanceUID)
    changed = build_heatmap(source, level, score, AlgorithmInfo(name=ALGORITHM.name, version="9", software_version="x"))
    assert changed.SOPInstanceUID != seg.SOPInstanceUID


def every_uid(ds: Dataset) -> list[tuple[str, str]]:
    """(path, value) of every UI element in ``ds``, nested sequences included."""
    found = []

    def walk(item: Dataset, prefix: str) -> None:
        for elem in item:
            if elem.VR == "SQ":
                for i, child in enumerate(elem.value):
                    walk(child, f"{prefix}{elem.keyword}[{i}].")
            elif elem.VR == "UI":
                found.append((prefix + elem.keyword, str(elem.value)))

    walk(ds, "")
    return found


def test_every_uid_of_the_results_is_the_same_when_built_again(source, level):
    """A retried job re-sends the same objects: not one UID may be random (highdicom draws a new Dimension
    Organization UID per SEG unless it is set)."""
    for build in (lambda: build_heatmap(source, level, make_score(SlideCall.ONE), ALGORITHM),
                  lambda: build_cell_annotations(source, level, np.array([[10.0, 20.0], [1000.5, 700.25]]),
                                                 np.array([0, 2], np.int8), MEMBRANE),
                  lambda: build_sr(source, level, make_score(SlideCall.ONE), ALGORITHM)):
        first, second = every_uid(build()), every_uid(build())
        assert first == second, [(a, b) for a, b in zip(first, second) if a != b]


def test_heatmap_refuses_mismatched_arrays(source, level):
    score = make_score(SlideCall.ONE)
    score.probabilities = score.probabilities[:, :3]
    with pytest.raises(ValueError, match="probabilities has shape"):
        build_heatmap(source, level, score, ALGORITHM)


# --- third-party validation (dciodvfy) -------------------------------------------------------------

#: The only dciodvfy warnings the SR and SEG may have: the local 99HER2 codes (documented, PS3.3 8.2).
KNOWN_WARNINGS = ("Unrecognized defined term <99HER2>",)


def dciodvfy_report(ds: Dataset, path: Path) -> str:
    """What dicom3tools' IOD validator says of ``ds``, saved as a file at ``path``."""
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], check=False, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


@pytest.mark.parametrize("kind", ["sr", "seg"])
def test_dciodvfy_finds_no_errors(source, level, tmp_path, kind):
    """dicom3tools' IOD validator reports no errors, and no warnings but the local 99HER2 scheme's."""
    score = make_score(SlideCall.TWO)
    ds = build_sr(source, level, score, ALGORITHM) if kind == "sr" else build_heatmap(source, level, score, ALGORITHM)
    report = dciodvfy_report(ds, tmp_path / f"{kind}.dcm")
    assert ("Comprehensive3DSR" if kind == "sr" else "Segmentation") in report
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert not [line for line in report.splitlines() if line.startswith("Warning")
                and not any(known in line for known in KNOWN_WARNINGS)], report


def test_multi_frame_heatmap_frames_sit_on_their_tiles(source, level):
    """A heatmap wider than one frame: every frame's Plane Position is the centre of its first pixel.

    2 px tiles: no level keeps 8 pixels per tile, so the heatmap falls back to the scored level's own grid
    (the finest step that divides the tile), 2 x 2 heatmap pixels per tile.
    """
    grid = TileGrid(rows=600, cols=700, tile_size=2, pixel_spacing_mm=(SPACING_MM, SPACING_MM))
    probabilities = np.full((grid.rows, grid.cols, len(CLASSES)), 0.25, np.float32)
    score = SlideScore(call=SlideCall.ONE, percentages={c: 25.0 for c in CLASSES}, grid=grid,
                       probabilities=probabilities, tumour_fraction=np.ones((grid.rows, grid.cols), np.float32),
                       scored=np.ones((grid.rows, grid.cols), bool))
    ds = roundtrip(build_heatmap(source, level, score, ALGORITHM))
    assert (ds.Rows, ds.Columns) == (512, 512) and (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns) == (1536, 2048)
    src = hd.spatial.ImageToReferenceTransformer.for_image(level, for_total_pixel_matrix=True)
    seen = set()
    for frame in range(1, int(ds.NumberOfFrames) + 1):
        position = hd.spatial.PixelToReferenceTransformer.for_image(ds, frame_number=frame)(np.array([[0, 0]]))[0]
        item = ds.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSlideSequence[0]
        r0, c0 = item.RowPositionInTotalImagePixelMatrix - 1, item.ColumnPositionInTotalImagePixelMatrix - 1
        centre = src(np.array([[c0 + 0.5, r0 + 0.5]]))[0]
        assert np.allclose(position, centre, atol=1e-6)
        seen.add((r0, c0))
    assert seen == {(r, c) for r in (0, 512, 1024) for c in (0, 512, 1024, 1536)}
    tpm = hd.seg.Segmentation.from_dataset(ds).get_total_pixel_matrix(combine_segments=False)
    assert np.all(np.abs(tpm[:1200, :1400] - 0.25) <= 1 / 255) and not tpm[1200:].any() and not tpm[:, 1400:].any()


# --- two graders, references to SEG and ANN (issues 12 and 14) ---------------------------------------

MEMBRANE = AlgorithmInfo(name="her2-membrane", version="0.3.1", software_version="0.1.0")
CELL_PERCENTAGES = {"0": 50.0, "1+": 38.5, "2+": 11.5, "3+": 0.0}
CELL_COUNTS = {"0": 500, "1+": 385, "2+": 115, "3+": 0}


def two_graders(score: SlideScore, cnn_call: SlideCall = SlideCall.TWO,
                cell_call: SlideCall = SlideCall.ONE) -> list[GraderResult]:
    return [
        GraderResult(algorithm=ALGORITHM, call=cnn_call, percentages=score.percentages, basis="tumour area"),
        GraderResult(algorithm=MEMBRANE, call=cell_call, percentages=CELL_PERCENTAGES, basis="tumour cells",
                     cell_counts=CELL_COUNTS, connectivity=0.3125),
    ]


@pytest.fixture(scope="module")
def evidence(source, level):
    """The heatmap SEG and the cell ANN of the slide, built before the SR as the pipeline does."""
    seg = build_heatmap(source, level, make_score(SlideCall.ONE), ALGORITHM)
    ann = build_cell_annotations(source, level, np.array([[10.0, 20.0], [1000.5, 700.25], [5.0, 1500.0]]),
                                 np.array([0, 1, 2], np.int8), MEMBRANE)
    return roundtrip(seg), roundtrip(ann)


@pytest.fixture(scope="module")
def graded_sr(source, level, evidence):
    score = make_score(SlideCall.ONE)
    sr = build_sr(source, level, score, ALGORITHM, graders=two_graders(score), deciding=1, references=evidence)
    return score, sr, roundtrip(sr)


def test_result_uids_for_annotations_and_co_models():
    a = result_uids(SERIES_UID, INSTANCES, "m", "1")
    assert is_valid_uid(a.ann) and is_valid_uid(a.ann_series)
    assert len({a.sr_series, a.sr, a.seg_series, a.seg, a.ann_series, a.ann, a.device}) == 7
    both = result_uids(SERIES_UID, INSTANCES, "m", "1", co_models=[("cells", "2"), ("m", "1"), ("cells", "2")])
    assert both == result_uids(SERIES_UID, INSTANCES, "m", "1", co_models=[("cells", "2")])
    assert result_uids(SERIES_UID, INSTANCES, "m", "1", co_models=[("m", "1")]) == a  # itself: no co-model
    assert {both.sr, both.sr_series}.isdisjoint({a.sr, a.sr_series})
    assert (both.seg, both.seg_series, both.ann, both.ann_series, both.device) == \
        (a.seg, a.seg_series, a.ann, a.ann_series, a.device)
    newer = result_uids(SERIES_UID, INSTANCES, "m", "1", co_models=[("cells", "3")])
    assert newer.sr != both.sr and newer.seg == both.seg
    with pytest.raises(ValueError, match="co_models names and versions must be non-empty"):
        result_uids(SERIES_UID, INSTANCES, "m", "1", co_models=[("cells", "")])


def test_sr_carries_both_graders(graded_sr):
    score, _, ds = graded_sr
    assert read_sr_call(ds) == "1+"  # the slide call, although the tile grader says 2+
    cnn, cells = read_sr_graders(ds)
    assert (cnn["name"], cnn["version"], cnn["basis"]) == (ALGORITHM.name, ALGORITHM.version, "tumour area")
    assert (cells["name"], cells["version"], cells["basis"]) == (MEMBRANE.name, MEMBRANE.version, "tumour cells")
    assert (cnn["call"], cells["call"]) == ("2+", "1+")
    assert (cnn["deciding"], cells["deciding"]) == (False, True)
    assert cnn["percentages"] == pytest.approx(score.percentages, abs=1e-6)
    assert cells["percentages"] == pytest.approx(CELL_PERCENTAGES, abs=1e-6)
    assert cnn["cell_counts"] is None and cells["cell_counts"] == CELL_COUNTS
    assert cnn["connectivity"] is None and cells["connectivity"] == pytest.approx(0.3125)
    # highdicom reads three TID 1410 groups (slide call, each grader), each with its algorithm and region.
    report = srread(ds)
    groups = report.content.get_planar_roi_measurement_groups()
    assert len(groups) == 3 and len(report.content.get_image_measurement_groups()) == 1
    names = [{i.name.meaning: i.value for i in g[0].ContentSequence if i.ValueType == "TEXT"}["Algorithm Name"]
             for g in groups]
    assert names == [ALGORITHM.name, ALGORITHM.name, MEMBRANE.name]
    assert all(isinstance(g.roi, hd.sr.ImageRegion3D) for g in groups)
    (count_1,) = groups[2].get_measurements(CELL_COUNT["1+"])
    assert count_1.value == 385 and count_1.unit.value == "{cells}"
    (connectivity,) = groups[2].get_measurements(MEMBRANE_CONNECTIVITY)
    assert connectivity.unit.value == "1"
    (decides,) = groups[2].get_qualitative_evaluations(SLIDE_CALL_GRADER)
    assert decides.value.value == "373066001"  # Yes


def test_sr_references_its_heatmap_and_cell_annotations(graded_sr, evidence):
    _, _, ds = graded_sr
    seg, ann = evidence
    listed = read_sr_evidence(ds)
    assert (pydicom.uid.SegmentationStorage, seg.SOPInstanceUID) in listed
    assert (pydicom.uid.MicroscopyBulkSimpleAnnotationsStorage, ann.SOPInstanceUID) in listed
    cnn, cells = read_sr_graders(ds)
    assert cnn["references"] == [seg.SOPInstanceUID] and cells["references"] == []
    # Each tumour-area percentage is inferred from its class's segment (segment k+1 = CLASSES[k]).
    (roi_group, cnn_group, _) = srread(ds).content.get_planar_roi_measurement_groups()
    for group in (roi_group, cnn_group):
        for k, c in enumerate(CLASSES):
            (m,) = group.get_measurements(CLASS_PERCENTAGE[c])
            (ref,) = m.referenced_images
            assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
            assert ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == k + 1
            assert seg.SegmentSequence[k].SegmentLabel == f"HER2 IHC {c}"


def test_sr_uids_follow_every_grader_version(source, level, evidence, graded_sr):
    score, sr, _ = graded_sr
    again = build_sr(source, level, score, ALGORITHM, graders=two_graders(score), deciding=1, references=evidence)
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (sr.SOPInstanceUID, sr.SeriesInstanceUID)
    newer = [two_graders(score)[0], GraderResult(algorithm=AlgorithmInfo(name=MEMBRANE.name, version="0.4.0",
                                                                         software_version="0.1.0"),
                                                 call=SlideCall.ONE, percentages=CELL_PERCENTAGES,
                                                 basis="tumour cells")]
    other = build_sr(source, level, score, ALGORITHM, graders=newer, deciding=1)
    assert other.SOPInstanceUID != sr.SOPInstanceUID and other.SeriesInstanceUID != sr.SeriesInstanceUID
    # Both graders as contributing equipment (IHE AI Results); the SR's own Device UID is the primary model's.
    contributors = {(e.get("ManufacturerModelName"), e.SoftwareVersions[0]) for e in sr.ContributingEquipmentSequence}
    assert {(ALGORITHM.name, ALGORITHM.version), (MEMBRANE.name, MEMBRANE.version)} <= contributors
    uids = [ds.SOPInstanceUID for ds in source]
    assert sr.DeviceUID == result_uids(SERIES_UID, uids, ALGORITHM.name, ALGORITHM.version).device


def test_sr_refuses_inconsistent_graders(source, level, evidence):
    score = make_score(SlideCall.ONE)
    graders = two_graders(score)
    with pytest.raises(ValueError, match="deciding grader index 2"):
        build_sr(source, level, score, ALGORITHM, graders=graders, deciding=2)
    with pytest.raises(ValueError, match="not the deciding grader's call '2\\+'"):
        build_sr(source, level, score, ALGORITHM, graders=graders, deciding=0)
    # Quality control may overrule every grader: not assessable with a deciding grader is allowed.
    na = make_score(SlideCall.NOT_ASSESSABLE)
    assert read_sr_graders(roundtrip(build_sr(source, level, na, ALGORITHM, graders=graders, deciding=1)))
    with pytest.raises(ValueError, match="repeat an algorithm version"):
        build_sr(source, level, score, ALGORITHM, graders=[graders[0], graders[0]])
    elsewhere = copy.deepcopy(evidence[0])
    elsewhere.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="not the slide's study"):
        build_sr(source, level, score, ALGORITHM, references=[elsewhere])
    with pytest.raises(ValueError, match="grader basis 'tiles'"):
        GraderResult(algorithm=ALGORITHM, call=SlideCall.ONE, percentages=CELL_PERCENTAGES, basis="tiles")
    with pytest.raises(ValueError, match="cell counts given for a 'tumour area' grader"):
        GraderResult(algorithm=ALGORITHM, call=SlideCall.ONE, percentages=CELL_PERCENTAGES, basis="tumour area",
                     cell_counts=CELL_COUNTS)
    with pytest.raises(ValueError, match=r"connectivity 1\.5 is outside"):
        GraderResult(algorithm=MEMBRANE, call=SlideCall.ONE, percentages=CELL_PERCENTAGES, basis="tumour cells",
                     connectivity=1.5)
    with pytest.raises(ValueError, match="percentages has classes"):
        GraderResult(algorithm=MEMBRANE, call=SlideCall.ONE, percentages={"0": 100.0}, basis="tumour cells")




def test_dciodvfy_graded_sr_has_no_errors_and_no_new_warnings(graded_sr, tmp_path):
    _, sr, _ = graded_sr
    report = dciodvfy_report(sr, tmp_path / "sr.dcm")
    assert "Comprehensive3DSR" in report
    lines = report.splitlines()
    assert not [line for line in lines if line.startswith("Error")], report
    assert not [line for line in lines if line.startswith("Warning")
                and not any(known in line for known in KNOWN_WARNINGS)], report
