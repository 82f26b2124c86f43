"""Classified tumour cells as a Microscopy Bulk Simple Annotations object (dicom_io.cell_annotations).

The round trip runs on a synthetic slide written as DICOM (the session's ``slides`` fixture), at
its finest level (the level a cell grader works on); checks of refusals and UIDs use the
metadata-only source of tests/dicom_io/test_results.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_results import dciodvfy_report, roundtrip, to_file, wsm_level

from dicom_io.cell_annotations import (
    ANN_SERIES_NUMBER,
    CELL_CATEGORY,
    CELL_MEASUREMENTS,
    build_cell_annotations,
    read_cell_annotations,
)
from dicom_io.codes import CELL_CLASS_CODES, CLASS_COLOURS
from dicom_io.result_header import AlgorithmInfo
from dicom_io.uids import result_uids
from her2_core.aggregate import CLASSES

GRADER = AlgorithmInfo(name="her2-membrane", version="0.3.1", software_version="0.1.0")
IDENTITY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
            "AccessionNumber", "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Time-of-creation attributes: the only ones allowed to differ between two builds.
CREATION_TIME = {"ContentDate", "ContentTime", "SeriesDate", "SeriesTime", "InstanceCreationDate",
                 "InstanceCreationTime", "ContributionDateTime"}
#: dciodvfy warnings that are expected: the local 99HER2 codes, and attributes of the Specimen Module
#: (which then make the object "Standard Extended"): highdicom copies it from the slide and the current
#: standard lists it in the ANN IOD (usage U), but dicom3tools 2022 does not yet.
EXPECTED_WARNINGS = (
    "Unrecognized defined term <99HER2>",
    "Standard Extended SOP Class",
)


def specimen_module_tags() -> set[str]:
    """Tags, as dciodvfy prints them, of every attribute (nested ones too) of the Specimen Module (PS3.3 C.7.6.22).

    From the module table highdicom ships with (private data of highdicom, read only here).
    """
    table = json.loads((Path(hd.__file__).parent / "_standard" / "module_attribute_map.json").read_text())
    tags = (pydicom.datadict.tag_for_keyword(item["keyword"]) for item in table["specimen"])
    return {f"(0x{tag >> 16:04x},0x{tag & 0xFFFF:04x})" for tag in tags if tag is not None}


@pytest.fixture(scope="module")
def slide(slides) -> list[pydicom.Dataset]:
    """Headers of the mixed synthetic slide's levels, finest first."""
    levels = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(slides["mixed"].glob("level-*.dcm"))]
    return sorted(levels, key=lambda ds: -int(ds.TotalPixelMatrixColumns))


def cells(level: pydicom.Dataset, n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random centroids over the whole Total Pixel Matrix (corners included) and classes 0..3 (no 2+)."""
    rng = np.random.default_rng(seed)
    width, height = int(level.TotalPixelMatrixColumns), int(level.TotalPixelMatrixRows)
    centroids = rng.uniform([0, 0], [width, height], (n, 2))
    centroids[:4] = [[0, 0], [width, 0], [width, height], [0.5, height - 0.5]]
    classes = rng.choice(np.array([0, 1, 3], np.int8), n)
    return centroids, classes


def by_cell(centroids: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cells in a canonical order (class, x, y), since the object stores them grouped by class."""
    order = np.lexsort((centroids[:, 1], centroids[:, 0], classes))
    return centroids[order], classes[order]


@pytest.fixture(scope="module")
def ann(slide):
    centroids, classes = cells(slide[0])
    measurements = {"completeness": np.linspace(0, 1, len(classes)),
                    "intensity": np.where(np.arange(len(classes)) % 7 == 0, np.nan, 0.4)}
    obj = build_cell_annotations(slide, slide[0], centroids, classes, GRADER, measurements=measurements)
    return centroids, classes, measurements, obj, roundtrip(obj)


def test_points_round_trip_within_a_pixel_and_lie_on_the_slide(slide, ann):
    centroids, classes, _, _, ds = ann
    level = slide[0]
    back, back_classes = read_cell_annotations(ds, level)
    assert back_classes.dtype == np.int8 and back.shape == centroids.shape
    want, want_classes = by_cell(centroids, classes)
    got, got_classes = by_cell(back, back_classes)
    np.testing.assert_array_equal(got_classes, want_classes)
    assert np.abs(got - want).max() < 1.0
    assert np.abs(got - want).max() < 1e-6  # double precision: exact in practice
    # Every stored point, read with highdicom alone, falls inside the level's Total Pixel Matrix.
    to_pixels = hd.spatial.ReferenceToImageTransformer.for_image(level, for_total_pixel_matrix=True)
    width, height = int(level.TotalPixelMatrixColumns), int(level.TotalPixelMatrixRows)
    obj = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(ds)
    for group in obj.get_annotation_groups():
        xy = to_pixels(np.concatenate(group.get_graphic_data("3D")))[:, :2]
        assert np.all((xy >= -1e-6) & (xy <= [width + 1e-6, height + 1e-6]))
    # A coarser level of the same slide reads the same cells, scaled (levels share the slide position
    # of their first pixel's centre, so a 2x coarser level is offset by a quarter of its pixel).
    coarse_back, _ = read_cell_annotations(ds, slide[1])
    scale = int(slide[1].TotalPixelMatrixColumns) / width
    assert np.abs(coarse_back - back * scale).max() < 0.5


def test_groups_are_coded_per_class_with_algorithm_and_measurements(ann):
    _, classes, measurements, _, ds = ann
    obj = hd.ann.MicroscopyBulkSimpleAnnotations.from_dataset(ds)
    assert obj.annotation_coordinate_type == hd.ann.AnnotationCoordinateTypeValues.SCOORD3D
    groups = obj.get_annotation_groups()
    present = [c for k, c in enumerate(CLASSES) if (classes == k).any()]
    assert present == ["0", "1+", "3+"]
    assert [g.number for g in groups] == [1, 2, 3]
    assert [g.label for g in groups] == [f"HER2 {c} tumour cells" for c in present]
    for group, name in zip(groups, present):
        k = CLASSES.index(name)
        assert group.graphic_type == hd.ann.GraphicTypeValues.POINT
        assert group.number_of_annotations == int((classes == k).sum())
        assert group.annotated_property_category == CELL_CATEGORY
        assert group.annotated_property_type == CELL_CLASS_CODES[name]
        assert group.algorithm_type == hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC
        (algorithm,) = group.algorithm_identification
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (GRADER.name, GRADER.version)
        names, values, units = group.get_measurements()
        assert [n.meaning for n in names] == [CELL_MEASUREMENTS[k].concept.meaning for k in measurements]
        assert all(u.value == "1" and u.scheme_designator == "UCUM" for u in units)
        members = classes == k
        np.testing.assert_allclose(values[:, 0], measurements["completeness"][members], atol=1e-6)
        np.testing.assert_array_equal(np.isnan(values[:, 1]), np.isnan(measurements["intensity"][members]))
    # Each group in its class colour: the PNG legend's and the heatmap segment's (dicom_io.codes.CLASS_COLOURS).
    for group, name in zip(groups, present):
        rgb = hd.color.CIELabColor.from_dicom_value(group.RecommendedDisplayCIELabValue).to_rgb()
        assert np.abs(np.subtract(rgb, CLASS_COLOURS[name])).max() <= 1, (name, rgb)
    assert any(s.CodingSchemeDesignator == "99HER2" for s in ds.CodingSchemeIdentificationSequence)


def test_identity_references_and_uids(slide, ann):
    *_, ds = ann
    level = slide[0]
    for keyword in IDENTITY:
        if keyword in level:
            assert ds[keyword].value == level[keyword].value, keyword
    assert ds.SOPClassUID == pydicom.uid.MicroscopyBulkSimpleAnnotationsStorage and ds.Modality == "ANN"
    assert ds.FrameOfReferenceUID == level.FrameOfReferenceUID
    assert ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID == level.SOPInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == level.SeriesInstanceUID
    assert ds.SeriesNumber == ANN_SERIES_NUMBER
    assert "not for clinical use" in ds.SeriesDescription.lower()
    assert ds.ContentDescription.endswith("not for clinical use")
    uids = result_uids(level.SeriesInstanceUID, [d.SOPInstanceUID for d in slide], GRADER.name, GRADER.version)
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.ann_series, uids.ann)
    assert ds.SeriesInstanceUID not in (level.SeriesInstanceUID, uids.sr_series, uids.seg_series)
    (equipment,) = [e for e in ds.ContributingEquipmentSequence if e.get("ManufacturerModelName") == GRADER.name]
    assert GRADER.version in equipment.SoftwareVersions and "DeviceUID" not in equipment
    assert ds.DeviceUID == uids.device and ds.ManufacturerModelName == GRADER.name


def test_output_is_deterministic(slide, ann):
    centroids, classes, measurements, obj, _ = ann
    again = build_cell_annotations(slide, slide[0], centroids, classes, GRADER, measurements=measurements)
    obj = copy.deepcopy(obj)

    def drop_creation_times(ds: pydicom.Dataset) -> None:
        for keyword in CREATION_TIME & set(ds.dir()):
            delattr(ds, keyword)
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    drop_creation_times(item)

    drop_creation_times(obj)
    drop_creation_times(again)
    assert to_file(again).getvalue() == to_file(obj).getvalue()
    other = build_cell_annotations(slide, slide[0], centroids, classes,
                                   AlgorithmInfo(name=GRADER.name, version="0.4.0", software_version="0.1.0"))
    assert other.SOPInstanceUID != obj.SOPInstanceUID and other.SeriesInstanceUID != obj.SeriesInstanceUID


def test_dciodvfy_finds_no_errors(ann, tmp_path):
    *_, obj, _ = ann
    report = dciodvfy_report(obj, tmp_path / "cells.dcm")
    assert "MicroscopyBulkSimpleAnnotations" in report
    lines = report.splitlines()
    assert not [line for line in lines if line.startswith("Error")], report
    specimen = specimen_module_tags()
    unexpected = [line for line in lines if line.startswith("Warning")
                  and not any(known in line for known in EXPECTED_WARNINGS)
                  and not ("not present in standard DICOM IOD" in line
                           and line.split(" - ")[-1].split(" ")[0] in specimen)]
    assert not unexpected, report


# --- refusals (metadata-only source) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def source() -> list[pydicom.Dataset]:
    return [wsm_level(2048 // f, 1536 // f, 0.001 * f, instance=i + 1) for i, f in enumerate((1, 2, 4))]


def test_refuses_bad_cells(source):
    level = source[0]
    ok = np.array([[10.0, 10.0], [20.0, 30.0]])
    with pytest.raises(ValueError, match="outside the scored level's Total Pixel Matrix"):
        build_cell_annotations(source, level, np.array([[10.0, 10.0], [2049.0, 5.0]]), np.array([0, 1]), GRADER)
    with pytest.raises(ValueError, match=r"classes must lie in 0\.\.3"):
        build_cell_annotations(source, level, ok, np.array([0, 4]), GRADER)
    with pytest.raises(ValueError, match="expected \\(N, 2\\)"):
        build_cell_annotations(source, level, ok[:, :1], np.array([0, 1]), GRADER)
    with pytest.raises(ValueError, match="no cells"):
        build_cell_annotations(source, level, np.empty((0, 2)), np.empty((0,), np.int8), GRADER)
    with pytest.raises(ValueError, match="unknown cell measurement 'area'"):
        build_cell_annotations(source, level, ok, np.array([0, 1]), GRADER, measurements={"area": np.ones(2)})
    with pytest.raises(ValueError, match="'completeness' ranges"):
        build_cell_annotations(source, level, ok, np.array([0, 1]), GRADER,
                               measurements={"completeness": np.array([0.5, 1.5])})
    with pytest.raises(ValueError, match="not one of source_instances"):
        build_cell_annotations(source[1:], level, ok, np.array([0, 1]), GRADER)


def test_reader_refuses_other_objects(source):
    level = source[0]
    with pytest.raises(ValueError, match="not a Microscopy Bulk Simple Annotations object"):
        read_cell_annotations(level, level)
    ds = roundtrip(build_cell_annotations(source, level, np.array([[5.0, 5.0]]), np.array([2]), GRADER))
    elsewhere = wsm_level(2048, 1536, 0.001, instance=1)
    elsewhere.FrameOfReferenceUID = "1.2.3.4.5"
    with pytest.raises(ValueError, match="Frame of Reference"):
        read_cell_annotations(ds, elsewhere)
    points, classes = read_cell_annotations(ds, level)
    assert classes.tolist() == [2] and np.allclose(points, [[5.0, 5.0]])
