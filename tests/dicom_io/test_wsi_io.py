"""Synthetic slides written as DICOM VL WSM open with wsidicom and read back what was rendered."""

import json
import subprocess

import numpy as np
import pydicom
import pytest
from wsidicom import WsiDicom

from dicom_io.wsi import open_slide
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec, render_region


def test_levels_tiles_spacing_and_pixels(slides):
    folder = slides["mixed"]
    with WsiDicom.open(folder) as wsi:
        sizes = [(lvl.size.width, lvl.size.height) for lvl in wsi.levels]
        mpps = [lvl.mpp.width for lvl in wsi.levels]
        assert sizes[:3] == [(4096, 3072), (2048, 1536), (1024, 768)]
        assert len(sizes) >= 3
        assert mpps[:3] == pytest.approx([1.0, 2.0, 4.0])
        assert wsi.levels[0].tile_size.width == 512
        region = np.asarray(wsi.read_region((1024, 1024), 0, (512, 512)).convert("RGB")).astype(float)
    truth = json.loads((folder / "ground_truth.json").read_text())
    spec = SlideSpec.from_dict(truth["spec"])
    rendered = render_region(spec, 1024.0, 1024.0, 512, 512, 1.0).rgb.astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((region - rendered) ** 2))
    assert psnr > 30  # JPEG quality 90 of the same pixels

    base = pydicom.dcmread(folder / "level-0.dcm", stop_before_pixels=True)
    assert base.NumberOfFrames == 8 * 6
    assert base.DimensionOrganizationType == "TILED_FULL"
    assert [float(v) for v in base.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == [0.001, 0.001]
    assert base.OpticalPathSequence[0].ObjectiveLensPower == 10
    assert base.PatientID == "PM" and base.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"


def test_40x_slide_has_objective_power_40_and_a_10x_level(tmp_path):
    spec = SlideSpec(seed=21, width_um=512, height_um=512, class_mix={"1+": 1.0})
    write_synthetic_slide(spec, tmp_path, mpp=0.25)
    with open_slide(tmp_path) as slide:
        assert slide.levels[0].mpp == pytest.approx(0.25)
        assert slide.level_for_mpp(1.0).width == 512  # 40x base 2048 px -> 10x level 512 px
        assert slide.level_dataset(0).OpticalPathSequence[0].ObjectiveLensPower == 40


def test_same_seed_same_uids(tmp_path):
    spec = SlideSpec(seed=5, width_um=512, height_um=512)
    a = write_synthetic_slide(spec, tmp_path / "a")[0][0]
    b = write_synthetic_slide(spec, tmp_path / "b")[0][0]
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    assert da.SOPInstanceUID == db.SOPInstanceUID and da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.PixelData == db.PixelData


def test_written_levels_pass_dciodvfy(slides):
    """dicom3tools' IOD validator finds no error in any level of a synthetic slide."""
    for path in sorted(slides["3+"].glob("level-*.dcm")):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        report = proc.stdout + proc.stderr
        assert "VLWholeSlideMicroscopyImage" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_tile_reader_pixels_equal_pillow_decode_of_every_frame(slides):
    """The fast tile path (imagecodecs) gives Pillow's pixels, frames with the fragment pad byte included."""
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    folder = slides["mixed"]
    ds = pydicom.dcmread(folder / "level-0.dcm")
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert any(f.endswith(b"\xff\xd9\x00") for f in frames) and any(f.endswith(b"\xff\xd9") for f in frames)
    with open_slide(folder) as slide:
        level = slide.level_for_mpp(1.0)
        read = slide.tile_reader(level, 512)
        cols = int(ds.TotalPixelMatrixColumns) // 512
        for i, frame in enumerate(frames):
            expected = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
            assert np.array_equal(read(i // cols, i % cols), expected), f"frame {i}"
