"""A scored slide as a pathologist sees it: real Orthanc (DICOMweb), dicom-microscopy-viewer, headless Chromium.

A small synthetic 40x slide is scored by the real pipeline (so both graders run and the cell ANN
exists); the slide, SR, SEG and ANN go into Orthanc with its DICOMweb plugin; her2_viewer/page/index.html is
served with a proxy of /dicom-web from one origin (her2_viewer/server.py) and opened
in Debian's chromium by puppeteer-core (her2_viewer/page/snapshot.mjs). Screenshots and the page's reports
are kept in the test's tmp dir and copied to out/viewer-test/ (the path is printed).

The viewer turns this slide by 180 degrees (its Image Orientation (Slide) is (0, -1, 0, -1, 0, 0));
the test does not assume it: it maps slide pixels to the page with the viewer's own map
(``window.her2Geometry()`` in the page).
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pacs_stack import REPO, Orthanc, binary, free_port, her2
from PIL import Image

from dicom_io.codes import CLASS_COLOURS, TILE_CLASS_CODES
from her2_analysis.pipeline import score_slide
from her2_cli.outputs import write_outputs
from her2_core.aggregate import CLASSES
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec
from her2_viewer.server import ViewerServer
from tests.dicom_io.test_cell_annotations import specimen_module_tags
from worker.settings import load_settings

pytestmark = pytest.mark.integration

VIEWER = REPO / "her2_viewer" / "page"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ARTEFACTS = REPO / "out" / "viewer-test"
#: Probability above which the page draws a segment (its palette starts at stored value 128) and a
#: margin on either side, so the test does not judge pixels at the threshold.
DRAWN, NOT_DRAWN = 0.55, 0.45


def snapshot(url: str, png: Path) -> dict:
    """Open ``url`` in headless chromium, save a screenshot, return the page's report (her2_viewer/page/snapshot.mjs)."""
    node = binary("node")
    if not (VIEWER / "node_modules" / "dicom-microscopy-viewer").is_dir():
        pytest.fail("her2_viewer/page/node_modules is missing: run `bash deploy/install.sh --services` (npm ci in her2_viewer/page/)")
    done = subprocess.run([node, str(VIEWER / "snapshot.mjs"), url, str(png), binary("chromium")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def viewed(tmp_path_factory):
    """The scored slide in Orthanc, shown twice: heatmap opaque without cells (checked), and as a reader sees it."""
    root = tmp_path_factory.mktemp("viewer")
    spec = SlideSpec(seed=21, width_um=1536, height_um=1024, class_mix={c: 0.25 for c in CLASSES},
                     patient_id="VIEWER")
    write_synthetic_slide(spec, root / "slide", mpp=0.25)
    result = score_slide(root / "slide", load_settings().scoring_options())
    files = write_outputs(result, root / "results")
    by_modality = {ds.Modality: ds for ds in result.datasets}
    assert set(by_modality) == {"SR", "SEG", "ANN"}, "a 40x slide gets SR, heatmap SEG and cell ANN"
    if not DICOMWEB_PLUGIN.exists():
        pytest.fail(f"{DICOMWEB_PLUGIN} is missing: run `bash deploy/install.sh --services` (orthanc-dicomweb)")
    orthanc = Orthanc(root / "orthanc", listener_port=free_port(), Plugins=[str(DICOMWEB_PLUGIN)],
                      DicomWeb={"Enable": True, "Root": "/dicom-web/"}).start()
    try:
        orthanc.upload(sorted((root / "slide").glob("*.dcm")) + [p for p in files if p.suffix == ".dcm"])
        levels = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((root / "slide").glob("*.dcm"))]
        seg, ann = by_modality["SEG"], by_modality["ANN"]
        with ViewerServer(VIEWER, orthanc.http_port) as server:
            url = (f"{server.url}/index.html?study={seg.StudyInstanceUID}&series={levels[0].SeriesInstanceUID}"
                   f"&seg={seg.SeriesInstanceUID}&ann={ann.SeriesInstanceUID}")
            checked = snapshot(url + "&opacity=1", root / "viewer-heatmap.png")
            reader = snapshot(url + "&opacity=0.5&cells=1", root / "viewer-cells.png")
            requests = list(server.requests)
    finally:
        orthanc.stop()
    (root / "viewer-reports.json").write_text(json.dumps({"checked": checked, "reader": reader}, indent=1))
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    for name in ("viewer-heatmap.png", "viewer-cells.png", "viewer-reports.json"):
        shutil.copy(root / name, ARTEFACTS / name)
    print(f"viewer screenshots: {root} and {ARTEFACTS}")
    return {"root": root, "levels": levels, "seg": seg, "ann": ann, "checked": checked, "reader": reader,
            "requests": requests}


def test_dicomweb_requests_all_succeed(viewed):
    """No 4xx/5xx on /dicom-web; the slide's and the heatmap's frames were all fetched with 200."""
    requests = viewed["requests"]
    assert requests and not [r for r in requests if r[1] >= 400], requests
    frames = [(path, status) for path, status in requests if "/frames/" in path]
    assert frames and all(status == 200 for _, status in frames)
    assert any(viewed["levels"][0].SeriesInstanceUID in path for path, _ in frames)
    assert any(viewed["seg"].SeriesInstanceUID in path for path, _ in frames)
    for report in (viewed["checked"], viewed["reader"]):
        assert not report["failed"], report["failed"]
        assert not [r for r in report["responses"] if "/dicom-web/" in r["url"] and r["status"] >= 400]


def test_viewer_reports_coded_coloured_segments_and_cell_groups(viewed):
    for report in (viewed["checked"], viewed["reader"]):
        state = report["her2"]
        assert state["ready"] and state["error"] is None, state
        assert report["rendered"] is True, "the map never reported all its tiles drawn"
        assert [s["number"] for s in state["segments"]] == [1, 2, 3, 4]
        assert [s["type"] for s in state["segments"]] == [TILE_CLASS_CODES[c].meaning for c in CLASSES]
        for segment, name in zip(state["segments"], CLASSES):  # the page's CIELab -> sRGB of the SEG's value
            assert np.abs(np.subtract(segment["rgb"], CLASS_COLOURS[name])).max() <= 1, segment
        groups = [g.AnnotationGroupLabel for g in viewed["ann"].AnnotationGroupSequence]
        assert [g["label"] for g in state["annotationGroups"]] == groups and groups
        messages = [m["text"] for m in report["console"]]
        assert not [m for m in messages if "No matching pyramid levels" in m], "the SEG must match a slide level"
        assert not [m for m in report["console"] if m["type"] == "pageerror"]
    # With the cells shown, every group's points were loaded whole (Orthanc's truncated OD values worked around).
    loaded = [m["text"] for m in viewed["reader"]["console"] if m["text"].startswith("add n=")]
    counts = sorted(int(m.split()[1][2:]) for m in loaded)
    assert counts == sorted(int(g.NumberOfAnnotations) for g in viewed["ann"].AnnotationGroupSequence)


def page_points(geometry: dict, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Page coordinates (x, y) of continuous image coordinates of the slide's finest level."""
    top_left, top_right, bottom_left = (np.array(geometry[k], float) for k in ("topLeft", "topRight", "bottomLeft"))
    u, v = columns / geometry["columns"], rows / geometry["rows"]
    return top_left + u[:, None] * (top_right - top_left) + v[:, None] * (bottom_left - top_left)


def visible(geometry: dict, points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Points on the screenshot and not under one of the viewer's controls or legends (5 px margin)."""
    inside = (points[:, 0] >= 0) & (points[:, 0] < size[0]) & (points[:, 1] >= 0) & (points[:, 1] < size[1])
    for left, top, right, bottom in geometry["covered"]:
        inside &= ~((points[:, 0] > left - 5) & (points[:, 0] < right + 5) &
                    (points[:, 1] > top - 5) & (points[:, 1] < bottom + 5))
    return inside


def test_each_class_colour_is_where_the_seg_puts_that_class(viewed):
    """Sampled heatmap pixels: the class colour on screen where its probability >= 0.55, no class colour below 0.45."""
    seg, geometry = viewed["seg"], viewed["checked"]["geometry"]
    shot = np.asarray(Image.open(viewed["root"] / "viewer-heatmap.png").convert("RGB")).astype(int)
    probabilities = hd.seg.Segmentation.from_dataset(seg).get_total_pixel_matrix(combine_segments=False)
    base = viewed["levels"][0]
    scale = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0]) / \
        float(base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    rows, cols = np.mgrid[1:probabilities.shape[0] - 1:3, 1:probabilities.shape[1] - 1:3]
    rows, cols = rows.ravel(), cols.ravel()
    # Judge a heatmap pixel only when its 3 x 3 neighbourhood agrees (no edge of a drawn region nearby).
    padded = np.pad(probabilities, ((1, 1), (1, 1), (0, 0)), mode="edge")
    low = np.min([padded[1 + rows + dr, 1 + cols + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
    high = np.max([padded[1 + rows + dr, 1 + cols + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)], axis=0)
    points = page_points(geometry, (cols + 0.5) * scale, (rows + 0.5) * scale)
    seen = visible(geometry, points, (shot.shape[1], shot.shape[0]))
    xy = np.floor(points).astype(int)
    palette = np.array([CLASS_COLOURS[c] for c in CLASSES])
    present = []
    for k, name in enumerate(CLASSES):
        where = seen & (low[:, k] >= DRAWN)
        if where.sum() < 20:
            continue
        present.append(name)
        colours = shot[xy[where, 1], xy[where, 0]]
        match = np.abs(colours - palette[k]).max(axis=1) <= 40
        assert match.mean() >= 0.95, f"class {name}: {match.mean():.3f} of {where.sum()} pixels in its colour"
    assert present, "the heatmap draws no class anywhere: nothing to check"
    empty = seen & (high.max(axis=1) <= NOT_DRAWN)
    colours = shot[xy[empty, 1], xy[empty, 0]]
    near = (np.abs(colours[:, None, :] - palette[None]).max(axis=2) <= 25).any(axis=1)
    assert empty.sum() == 0 or near.mean() <= 0.05, f"{near.mean():.3f} of undrawn pixels show a class colour"


def test_pipeline_results_validate_with_dicom3tools(viewed):
    """The pipeline's own SR, SEG and ANN of this slide: dciodvfy and dcentvfy (dicom3tools) find only what is documented.

    dciodvfy: no error; warnings only for the local 99HER2 codes and, on the ANN, the Specimen Module
    that PS3.3 now allows there but dicom3tools 2022 does not know (tests/dicom_io/test_cell_annotations.py).
    dcentvfy over slide + results: entity-level consistency; its one remark is Accession Number, which
    dicom3tools files under Study in the SR and under Series in the WSM, SEG and ANN IODs (the same
    value in every object: the slide's).
    """
    results = sorted((viewed["root"] / "results").glob("*.dcm"))
    assert len(results) == 3
    specimen = specimen_module_tags()
    for path in results:
        done = subprocess.run([binary("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60,
                              check=False)
        report = done.stdout + done.stderr
        lines = [line for line in report.splitlines() if line.startswith(("Error", "Warning"))]
        assert not [line for line in lines if line.startswith("Error")], (path.name, report)
        unexpected = [line for line in lines if "Unrecognized defined term <99HER2>" not in line
                      and not (path.name.endswith("_ann.dcm") and ("Standard Extended" in line
                                                                   or any(tag in line for tag in specimen)))]
        assert not unexpected, (path.name, unexpected)
    slide = sorted((viewed["root"] / "slide").glob("*.dcm"))
    report = subprocess.run([binary("dcentvfy"), *map(str, slide + results)], capture_output=True, text=True, check=False,
                            timeout=120)
    lines = [line for line in (report.stdout + report.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if "Element=<AccessionNumber> IE <" not in line], lines
    assert {ds.AccessionNumber for ds in (viewed["seg"], viewed["ann"], *viewed["levels"])} == \
        {viewed["levels"][0].AccessionNumber}


def test_slide_area_is_not_blank(viewed):
    """Where the slide lies on the page the reader's screenshot shows tissue, not an empty canvas."""
    geometry = viewed["reader"]["geometry"]
    shot = np.asarray(Image.open(viewed["root"] / "viewer-cells.png").convert("RGB")).astype(float)
    corners = np.array([geometry["topLeft"], geometry["topRight"], geometry["bottomLeft"]])
    opposite = corners[1] + corners[2] - corners[0]
    (left, top), (right, bottom) = np.vstack([corners, opposite]).min(0), np.vstack([corners, opposite]).max(0)
    area = shot[max(int(top), 0):int(bottom), max(int(left), 0):int(right)]
    assert area.size and area.shape[0] > 200 and area.shape[1] > 200, (left, top, right, bottom)
    luminance = area.mean(axis=2)
    assert luminance.std() > 15 and (luminance < 235).mean() > 0.3, (luminance.std(), (luminance < 235).mean())


def test_her2_view_serves_the_slide_and_results_until_interrupted(viewed):
    """`her2 view SLIDE RESULTS`: a private Orthanc holds them, the page and DICOMweb answer, Ctrl-C ends both."""
    root = viewed["root"]
    process = subprocess.Popen(her2("view", str(root / "slide"), str(root / "results"), "--port", "0"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = process.stdout.readline()
        assert line.startswith("open http://127.0.0.1:"), (line, process.stderr.read() if process.poll() else "")
        url = line.split()[1]
        origin, query = url.split("/index.html?")
        assert f"seg={viewed['seg'].SeriesInstanceUID}" in query and f"ann={viewed['ann'].SeriesInstanceUID}" in query
        assert b"dicom-microscopy-viewer" in urllib.request.urlopen(url, timeout=30).read()
        seg = viewed["seg"]
        metadata = json.loads(urllib.request.urlopen(
            f"{origin}/dicom-web/studies/{seg.StudyInstanceUID}/series/{seg.SeriesInstanceUID}/metadata",
            timeout=30).read())
        assert len(metadata[0]["00620002"]["Value"]) == 4  # Segment Sequence
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, process.stderr.read()

