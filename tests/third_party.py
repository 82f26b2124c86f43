"""Slides written by tools other than ours, for tests: wsidicomizer, OrthancWSIDicomizer, highdicom.

Our reader must not depend on our writer's habits (white edge padding, one
TILED_FULL JPEG instance per level, ImageType and Dimension Organization Type
always present). Each function here takes the same RGB array and pixel
spacing and returns a folder holding one VL Whole Slide Microscopy Image
series (PS3.3 A.32.8) written by another tool:

- :func:`wsidicomize`: a pyramidal tiled TIFF (tifffile) converted by
  wsidicomizer with tiffslide as source; it pads edge tiles with black.
  wsidicomizer pins an older wsidicom than the worker, so it runs in its own
  virtual environment, :data:`CONVERT_PYTHON` (``deploy/install.sh --dev``).
- :func:`orthanc_dicomize`: OrthancWSIDicomizer (Debian ``orthanc-wsi``) from a
  PNG; it writes neither Image Type nor Dimension Organization Type.
- :func:`highdicom_write`: frames encoded by highdicom with any transfer
  syntax it encodes, TILED_FULL or TILED_SPARSE (Plane Position (Slide) per
  frame, PS3.3 C.8.12.6.1), a chosen padding colour and focal planes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[1]
#: Python of the virtual environment that holds wsidicomizer and tiffslide.
CONVERT_PYTHON = Path(os.environ.get("HER2_CONVERT_PYTHON", REPO / ".venv-convert" / "bin" / "python"))
ORTHANC_DICOMIZER = shutil.which("OrthancWSIDicomizer")

needs_wsidicomizer = pytest.mark.skipif(not CONVERT_PYTHON.exists(),
                                        reason=f"no wsidicomizer environment at {CONVERT_PYTHON} "
                                               "(bash deploy/install.sh --dev)")
needs_orthanc_dicomizer = pytest.mark.skipif(ORTHANC_DICOMIZER is None,
                                             reason="OrthancWSIDicomizer not installed (apt-get install orthanc-wsi)")


def wsidicomizer_version() -> str:
    """Version of the wsidicomizer that :func:`wsidicomize` runs (part of cache keys)."""
    out = subprocess.run([str(CONVERT_PYTHON), "-c", "import wsidicomizer; print(wsidicomizer.__version__)"],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def pyramid(rgb: np.ndarray, downsamples: tuple[int, ...]) -> list[np.ndarray]:
    """``rgb`` box-reduced by each of ``downsamples`` (1 = as it is)."""
    image = Image.fromarray(rgb)
    return [rgb if d == 1 else np.asarray(image.reduce(d)) for d in downsamples]


def write_tiff(rgb: np.ndarray, mpp: float, path: Path, tile_size: int = 256,
               downsamples: tuple[int, ...] = (1, 2, 4, 8)) -> Path:
    """A pyramidal tiled TIFF of ``rgb`` (zlib, lossless) with its pixel size in pixels per centimetre."""
    per_cm = 1e4 / mpp
    levels = pyramid(rgb, downsamples)
    with tifffile.TiffWriter(path, bigtiff=rgb.size > 2**31) as tif:
        for i, (level, d) in enumerate(zip(levels, downsamples)):
            tif.write(level, photometric="rgb", tile=(tile_size, tile_size), compression="zlib",
                      compressionargs={"level": 1}, resolution=(per_cm / d, per_cm / d), resolutionunit="CENTIMETER",
                      subfiletype=0 if i == 0 else 1, metadata=None)
    return path


def wsidicomize(rgb: np.ndarray, mpp: float, out_dir: Path, tile_size: int = 256,
                downsamples: tuple[int, ...] = (1, 2, 4, 8), patient_id: str = "TP-WSIDICOMIZER",
                patient_name: str = "THIRD^PARTY", study_uid: str | None = None, series_uid: str | None = None,
                transfer_syntax: str = JPEGBaseline8Bit, quality: int = 90, subsampling: str = "444") -> Path:
    """``rgb`` at ``mpp`` um/px written by wsidicomizer (via a tiled TIFF read by tiffslide) into ``out_dir``.

    JPEG baseline frames are encoded at ``quality`` with chroma ``subsampling`` ("444", "422" as our writer, "420").
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tiff = write_tiff(rgb, mpp, out_dir.parent / f"{out_dir.name}.tiff", tile_size, downsamples)
    args = {"tiff": str(tiff), "out": str(out_dir), "tile_size": tile_size, "patient_id": patient_id,
            "patient_name": patient_name, "study_uid": study_uid or generate_uid(),
            "series_uid": series_uid or generate_uid(), "transfer_syntax": str(transfer_syntax), "quality": quality,
            "subsampling": subsampling}
    try:
        subprocess.run([str(CONVERT_PYTHON), str(Path(__file__).with_name("wsidicomizer_convert.py")),
                        json.dumps(args)], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"wsidicomizer failed: {exc.stderr[-2000:]}") from exc
    finally:
        tiff.unlink(missing_ok=True)
    return out_dir


def orthanc_dicomize(rgb: np.ndarray, mpp: float, out_dir: Path, tile_size: int = 256, levels: int = 4,
                     compression: str = "jpeg", patient_id: str = "TP-ORTHANC") -> Path:
    """``rgb`` at ``mpp`` um/px written by OrthancWSIDicomizer (2x pyramid of ``levels``) into ``out_dir``.

    The physical size goes in as ``--imaged-width/--imaged-height`` (mm), the extent along the slide's X and Y
    axes: with its Image Orientation (Slide) 0\\-1\\0\\-1\\0\\0, slide X runs along the image's rows (its
    height) and Y along its columns, so width and height are swapped to get the Pixel Spacing right. Version
    1.1 writes no Image Type, Dimension Organization Type or Frame of Reference UID, and a Plane Position
    (Slide) per frame.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir.parent / f"{out_dir.name}.png"  # it reads PNG, JPEG or hierarchical JPEG TIFF (not zlib tiles)
    Image.fromarray(rgb).save(png, compress_level=1)
    dataset = out_dir.parent / f"{out_dir.name}.json"
    dataset.write_text(json.dumps({"PatientID": patient_id, "PatientName": "THIRD^PARTY",
                                   "StudyDescription": "HER2 IHC"}))
    height, width = rgb.shape[:2]
    try:
        subprocess.run([ORTHANC_DICOMIZER or "OrthancWSIDicomizer", "--pyramid=1", f"--levels={levels}",
                        f"--tile-width={tile_size}", f"--tile-height={tile_size}", f"--compression={compression}",
                        f"--imaged-width={height * mpp / 1000}", f"--imaged-height={width * mpp / 1000}",
                        f"--dataset={dataset}", f"--folder={out_dir}", str(png)],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"OrthancWSIDicomizer failed: {exc.stderr[-2000:]}") from exc
    finally:
        png.unlink(missing_ok=True)
        dataset.unlink(missing_ok=True)
    return out_dir


def _frames(level: np.ndarray, tile_size: int, pad: int) -> list[np.ndarray]:
    """Tiles of ``level`` row by row, edge tiles padded with ``pad`` (PS3.3 C.8.12.4.1.1: padding is unspecified)."""
    h, w = level.shape[:2]
    frames = []
    for y in range(0, h, tile_size):
        for x in range(0, w, tile_size):
            tile = np.full((tile_size, tile_size, 3), pad, np.uint8)
            part = level[y : y + tile_size, x : x + tile_size]
            tile[: part.shape[0], : part.shape[1]] = part
            frames.append(tile)
    return frames


def _photometric(transfer_syntax: str) -> str:
    """The Photometric Interpretation highdicom encodes colour frames of ``transfer_syntax`` in (PS3.5 8.2)."""
    return {JPEGBaseline8Bit: "YBR_FULL_422", JPEG2000Lossless: "YBR_RCT", JPEG2000: "YBR_ICT"}.get(transfer_syntax,
                                                                                                   "RGB")


def highdicom_write(rgb: np.ndarray, mpp: float, out_dir: Path, tile_size: int = 256,
                    downsamples: tuple[int, ...] = (1, 2, 4), transfer_syntax: str = JPEGBaseline8Bit,
                    pad: int = 0, sparse: bool = False, focal_planes: int = 1, patient_id: str = "TP-HIGHDICOM",
                    with_origin: bool = True, icc_profile: bytes | None = None,
                    fluorescence_path: bool = False) -> Path:
    """``rgb`` at ``mpp`` um/px as one instance per level, frames encoded by :func:`highdicom.frame.encode_frame`.

    ``sparse`` writes TILED_SPARSE with a Plane Position (Slide) per frame
    (computed by :func:`highdicom.utils.compute_plane_position_slide_per_frame`);
    ``focal_planes`` > 1 repeats the image in that many focal planes, the
    central one as it is and the others blurred (a defocused plane),
    ``pad`` fills the unused part of edge tiles; ``fluorescence_path`` adds a
    first optical path "DAPI" (fluorescence, dark frames) before the
    brightfield one, with an Optical Path Identification per frame.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    photometric = _photometric(transfer_syntax)
    central = focal_planes // 2
    for index, (level, d) in enumerate(zip(pyramid(rgb, downsamples), downsamples)):
        h, w = level.shape[:2]
        planes = [level if z == central else np.asarray(Image.fromarray(level).reduce(4).resize((w, h)))
                  for z in range(focal_planes)]
        frames = [f for plane in planes for f in _frames(plane, tile_size, pad)]
        paths = ["DAPI", "1"] if fluorescence_path else ["1"]
        frames = [np.zeros_like(f) for f in frames] * fluorescence_path + frames
        ds = _wsm_dataset(index, w, h, tile_size, mpp * d, len(frames), transfer_syntax, photometric,
                          (study, series, frame_of_reference), patient_id, with_origin, icc_profile)
        ds.TotalPixelMatrixFocalPlanes = focal_planes
        if fluorescence_path:
            dapi = Dataset()
            dapi.OpticalPathIdentifier = "DAPI"
            dapi.IlluminationTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("111743", "DCM",
                                                                                  "Epifluorescence illumination")])
            dapi.IlluminationWaveLength = 365.0
            ds.OpticalPathSequence = DicomSequence([dapi, *ds.OpticalPathSequence])
            ds.NumberOfOpticalPaths = 2
        if sparse or focal_planes > 1 or fluorescence_path:
            ds.DimensionOrganizationType = "TILED_SPARSE"
            ds.TotalPixelMatrixFocalPlanes = focal_planes
            positions = hd.utils.compute_plane_position_slide_per_frame(_single_plane(ds))
            per_frame = []
            for path, z, position in ((path, z, p) for path in paths for z in range(focal_planes) for p in positions):
                plane = copy.deepcopy(position[0])
                plane.ZOffsetInSlideCoordinateSystem = float(z - central)  # um (PS3.3 C.8.12.6.1.1)
                item = Dataset()
                item.PlanePositionSlideSequence = DicomSequence([plane])
                if fluorescence_path:
                    identification = Dataset()
                    identification.OpticalPathIdentifier = path
                    item.OpticalPathIdentificationSequence = DicomSequence([identification])
                per_frame.append(item)
            ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
        encoded = [hd.frame.encode_frame(f, transfer_syntax, 8, 8, photometric, 0, 0) for f in frames]
        if transfer_syntax == ExplicitVRLittleEndian:
            ds.PixelData = b"".join(encoded)
        else:
            ds.PixelData = encapsulate(encoded)
            ds["PixelData"].VR = "OB"
        ds.save_as(out_dir / f"level-{index}.dcm", enforce_file_format=True)
    return out_dir


def _single_plane(ds: Dataset) -> Dataset:
    """A copy of ``ds`` as TILED_FULL, one focal plane and path: what the per-frame position helper expects."""
    plane = copy.deepcopy(ds)
    plane.TotalPixelMatrixFocalPlanes = plane.NumberOfOpticalPaths = 1
    plane.OpticalPathSequence = plane.OpticalPathSequence[-1:]
    plane.DimensionOrganizationType = "TILED_FULL"
    plane.NumberOfFrames = math.ceil(ds.TotalPixelMatrixColumns / ds.Columns) * \
        math.ceil(ds.TotalPixelMatrixRows / ds.Rows)
    if "TotalPixelMatrixOriginSequence" not in plane:
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem = 0.0
        origin.YOffsetInSlideCoordinateSystem = 0.0
        plane.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    return plane


def _wsm_dataset(index: int, width: int, height: int, tile_size: int, mpp: float, frames: int, transfer_syntax: str,
                 photometric: str, uids: tuple[str, str, str], patient_id: str, with_origin: bool,
                 icc_profile: bytes | None) -> Dataset:
    """The VL WSM attributes of one level (PS3.3 A.32.8), tiled full unless the caller changes it."""
    study, series, frame_of_reference = uids
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID, ds.SOPInstanceUID = VLWholeSlideMicroscopyImageStorage, sop
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "THIRD^PARTY", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
    ds.StudyID, ds.AccessionNumber, ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "1", "", "", "", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SM", 1, index + 1
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.Manufacturer, ds.ManufacturerModelName, ds.DeviceSerialNumber, ds.SoftwareVersions = \
        "highdicom test writer", "tests.third_party", "0", hd.__version__
    ds.ImageType = ["ORIGINAL" if index == 0 else "DERIVED", "PRIMARY", "VOLUME", "NONE" if index == 0 else "RESAMPLED"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20260101", "120000", "20260101120000"
    ds.BurnedInAnnotation, ds.SpecimenLabelInImage, ds.VolumetricProperties = "NO", "NO", "VOLUME"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.ImagedVolumeWidth, ds.ImagedVolumeHeight, ds.ImagedVolumeDepth = width * mpp / 1000, height * mpp / 1000, 0.004
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
    if with_origin:
        origin = Dataset()
        origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = 20.0, 40.0
        ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, tile_size, tile_size
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "00" if transfer_syntax == ExplicitVRLittleEndian else "01"
    ds.DimensionOrganizationSequence = DicomSequence([Dataset()])
    ds.DimensionOrganizationSequence[0].DimensionOrganizationUID = generate_uid()
    measures = hd.PixelMeasuresSequence(pixel_spacing=(mpp / 1000, mpp / 1000), slice_thickness=0.004)
    shared = Dataset()
    shared.PixelMeasuresSequence = measures
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.IlluminationTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = DicomSequence([hd.sr.CodedConcept("414298005", "SCT", "Full Spectrum")])
    if icc_profile is not None:
        path.ICCProfile = icc_profile
    ds.OpticalPathSequence = DicomSequence([path])
    ds.NumberOfOpticalPaths = 1
    ds.ContainerIdentifier = "TP-1"
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier, specimen.SpecimenUID = "TP-1", generate_uid()
    specimen.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    specimen.SpecimenPreparationSequence = DicomSequence([])
    ds.SpecimenDescriptionSequence = DicomSequence([specimen])
    return ds

