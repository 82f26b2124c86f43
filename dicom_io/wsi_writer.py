"""Write a DICOM VL Whole Slide Microscopy Image series (PS3.3 A.32.8) from any tile source.

Each pyramid level is one TILED_FULL multi-frame instance (PS3.3 C.8.12.4,
Dimension Organization Type TILED_FULL) with JPEG baseline frames (transfer
syntax 1.2.840.10008.1.2.4.50, YBR_FULL_422). The pyramid is built as a
cascade of row strips: the base level is pulled from ``tile_source`` one tile
row at a time and every lower level is made by 2x area averaging of the level
above, so memory is bounded by a few tile rows whatever the slide's size.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageCms
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

#: Reads RGB uint8 pixels (h, w, 3) of the base level at pixel offset (x, y).
TileSource = Callable[[int, int, int, int], np.ndarray]

IMPLEMENTATION_UID = UID("1.2.826.0.1.3680043.10.1424.1")
#: The frames are sRGB (PS3.3 C.11.15 ICC Profile in the Optical Path Sequence).
SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
#: Slide coordinates (mm) of the top-left corner of the scanned area.
ORIGIN_MM = (20.0, 40.0)


@dataclass(frozen=True)
class SlideIdentity:
    """Patient, study, series and specimen identity written into every instance of a slide."""

    patient_id: str
    patient_name: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    specimen_id: str
    specimen_uid: str
    container_id: str
    study_id: str = "1"
    accession_number: str = ""
    patient_birth_date: str = ""
    patient_sex: str = "O"
    study_date: str = "20260101"
    series_description: str = "HER2 IHC"
    stain: str = "HER2 (4B5) rabbit monoclonal, DAB, haematoxylin counterstain"

    @classmethod
    def synthetic(cls, seed: int, patient_id: str, patient_name: str = "SYNTHETIC^SLIDE") -> SlideIdentity:
        """Deterministic identity for a synthetic slide (same seed and patient, same UIDs)."""
        uid = lambda part: generate_uid(entropy_srcs=["her2-synth", str(seed), patient_id, part])
        return cls(
            patient_id=patient_id,
            patient_name=patient_name,
            study_instance_uid=uid("study"),
            series_instance_uid=uid("series"),
            frame_of_reference_uid=uid("frame-of-reference"),
            specimen_id=f"S{seed:08d}-A1",
            specimen_uid=uid("specimen"),
            container_id=f"SLIDE-{seed:08d}",
            accession_number=f"ACC{seed:08d}",
        )


def objective_power(mpp: float) -> int:
    """Nominal objective power for a pixel spacing (0.25 um -> 40x, 1.0 um -> 10x)."""
    return max(1, round(10.0 / mpp))


def _encode_jpeg(tile: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(tile).save(buf, format="JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def _downsample(strip: np.ndarray) -> np.ndarray:
    """2x area average of an RGB strip, padding odd edges by replication."""
    h, w = strip.shape[:2]
    if h % 2 or w % 2:
        strip = np.pad(strip, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    s = strip.astype(np.uint16)
    avg = (s[0::2, 0::2] + s[1::2, 0::2] + s[0::2, 1::2] + s[1::2, 1::2] + 2) // 4
    return avg.astype(np.uint8)


class _LevelEncoder:
    """Collects row strips of one level, emits JPEG frames per tile row, feeds the next level."""

    def __init__(self, width: int, height: int, tile: int, quality: int, child: _LevelEncoder | None) -> None:
        self.width, self.height, self.tile, self.quality, self.child = width, height, tile, quality, child
        self.cols = math.ceil(width / tile)
        self.frames: list[bytes] = []
        self.pending: list[np.ndarray] = []
        self.rows_done = 0

    def push(self, strip: np.ndarray) -> None:
        self.pending.append(strip)
        while sum(s.shape[0] for s in self.pending) >= self.tile:
            buf = np.concatenate(self.pending, axis=0)
            self._emit(buf[: self.tile])
            self.pending = [buf[self.tile :]] if buf.shape[0] > self.tile else []

    def finish(self) -> None:
        if self.rows_done < self.height:
            rest = np.concatenate(self.pending, axis=0) if self.pending else np.zeros((0, self.width, 3), np.uint8)
            rest = rest[: self.height - self.rows_done]
            if rest.shape[0]:
                self._emit(rest)
        if self.child:
            self.child.finish()

    def _emit(self, rows: np.ndarray) -> None:
        rows = rows[:, : self.width]
        self.rows_done += rows.shape[0]
        padded = np.full((self.tile, self.cols * self.tile, 3), 255, np.uint8)
        padded[: rows.shape[0], : rows.shape[1]] = rows
        for c in range(self.cols):
            self.frames.append(_encode_jpeg(padded[:, c * self.tile : (c + 1) * self.tile], self.quality))
        if self.child:
            self.child.push(_downsample(rows))


def _level_dataset(
    identity: SlideIdentity, level: int, width: int, height: int, tile: int, mpp: float, base_mpp: float, frames: int,
    compression_ratio: float,
) -> Dataset:
    ds = Dataset()
    now = datetime(2026, 1, 1, 12, 0, 0)
    sop_uid = generate_uid(entropy_srcs=[identity.series_instance_uid, "level", str(level)])
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
    # SOP Common, Patient, General Study, General Series, Whole Slide Microscopy Series.
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.patient_birth_date
    ds.PatientSex = identity.patient_sex
    ds.StudyInstanceUID = identity.study_instance_uid
    ds.StudyID = identity.study_id
    ds.AccessionNumber = identity.accession_number
    ds.StudyDate = identity.study_date
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.Modality = "SM"
    ds.SeriesInstanceUID = identity.series_instance_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = identity.series_description
    ds.FrameOfReferenceUID = identity.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    # General / Enhanced General Equipment.
    ds.Manufacturer = "her2-dicom-worker"
    ds.ManufacturerModelName = "synthetic slide generator"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "0.1.0"
    # General Image, Multi-frame, Whole Slide Microscopy Image.
    ds.InstanceNumber = level + 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImagedVolumeWidth = width * mpp / 1000.0
    ds.ImagedVolumeHeight = height * mpp / 1000.0
    ds.ImagedVolumeDepth = 0.004
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = ORIGIN_MM[0]
    origin.YOffsetInSlideCoordinateSystem = ORIGIN_MM[1]
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.NumberOfFrames = frames
    ds.Rows = tile
    ds.Columns = tile
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = round(compression_ratio, 2)
    dimension_uid = generate_uid(entropy_srcs=[identity.series_instance_uid, "dimension-organization"])
    organization = Dataset()
    organization.DimensionOrganizationUID = dimension_uid
    ds.DimensionOrganizationSequence = DicomSequence([organization])
    ds.AcquisitionContextSequence = DicomSequence([])
    measures = Dataset()
    measures.PixelSpacing = [round(mpp / 1000.0, 9), round(mpp / 1000.0, 9)]
    measures.SliceThickness = 0.004
    frame_type = Dataset()
    frame_type.FrameType = list(ds.ImageType)
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = DicomSequence([frame_type])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    # Optical Path (PS3.3 C.8.12.5): brightfield, white light.
    path = Dataset()
    path.OpticalPathIdentifier = "1"
    path.OpticalPathDescription = "Brightfield"
    path.IlluminationTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("111744", "DCM", "Brightfield illumination")])
    path.IlluminationColorCodeSequence = DicomSequence([hd.sr.CodedConcept("414298005", "SCT", "Full Spectrum")])
    path.ObjectiveLensPower = objective_power(base_mpp)
    path.ICCProfile = SRGB_PROFILE
    ds.OpticalPathSequence = DicomSequence([path])
    ds.NumberOfOpticalPaths = 1
    # Specimen (PS3.3 C.7.6.22): one slide, one HER2 IHC-stained specimen.
    ds.ContainerIdentifier = identity.container_id
    ds.IssuerOfTheContainerIdentifierSequence = DicomSequence([])
    ds.ContainerTypeCodeSequence = DicomSequence([hd.sr.CodedConcept("433466003", "SCT", "Microscope slide")])
    staining = hd.SpecimenPreparationStep(
        specimen_id=identity.specimen_id,
        processing_procedure=hd.SpecimenStaining(substances=[identity.stain]),
    )
    description = hd.SpecimenDescription(
        specimen_id=identity.specimen_id,
        specimen_uid=identity.specimen_uid,
        specimen_preparation_steps=[staining],
        specimen_type=codes.SCT.TissueSection,
    )
    ds.SpecimenDescriptionSequence = DicomSequence([description])
    return ds


def write_wsi(
    tile_source: TileSource,
    width: int,
    height: int,
    mpp: float,
    identity: SlideIdentity,
    out_dir: Path,
    tile_size: int = 512,
    quality: int = 90,
    min_levels: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write a JPEG TILED_FULL pyramid of the slide read from ``tile_source``.

    Parameters
    ----------
    tile_source:
        Returns base-level RGB uint8 pixels for (x, y, w, h).
    width, height:
        Base level size in pixels.
    mpp:
        Base level pixel spacing in micrometres (0.25 = 40x, 1.0 = 10x).
    identity:
        Patient/study/series/specimen identity copied into every level.
    out_dir:
        Folder receiving one ``level-N.dcm`` per pyramid level.
    progress:
        Called with the number of base-level tiles done after each tile row.

    Returns
    -------
    list[pathlib.Path]
        The written files, base level first.
    """
    levels = max(min_levels, math.ceil(math.log2(max(width, height) / tile_size)) + 1)
    sizes = [(width, height)]
    for _ in range(levels - 1):
        w, h = sizes[-1]
        sizes.append((math.ceil(w / 2), math.ceil(h / 2)))
    encoder: _LevelEncoder | None = None
    encoders: list[_LevelEncoder] = []
    for w, h in reversed(sizes):
        encoder = _LevelEncoder(w, h, tile_size, quality, encoder)
        encoders.insert(0, encoder)
    base = encoders[0]
    for y in range(0, height, tile_size):
        h = min(tile_size, height - y)
        strip = np.concatenate(
            [tile_source(x, y, min(tile_size, width - x), h) for x in range(0, width, tile_size)], axis=1
        )
        base.push(strip)
        if progress:
            progress(base.cols)
    base.finish()

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for level, (enc, (w, h)) in enumerate(zip(encoders, sizes)):
        ratio = len(enc.frames) * tile_size * tile_size * 3 / max(1, sum(len(f) for f in enc.frames))
        ds = _level_dataset(identity, level, w, h, tile_size, mpp * 2**level, mpp, len(enc.frames), ratio)
        ds.PixelData = encapsulate(enc.frames)
        ds["PixelData"].VR = "OB"
        path = out_dir / f"level-{level}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
