"""Fuzzing: mutated DICOM files through the slide reader and the listener's C-STORE handling.

Seeds are small real files: a tiny synthetic JPEG slide (three levels), the
highdicom uncompressed and JPEG-LS slides, the real Camelyon H&E level and a CT
slice. Each case mutates one file of a seed series, with a seeded generator
(case ``n`` is always the same file), at the byte level (flips, overwritten,
deleted or repeated spans, truncation, extreme length fields) or the element
level (extreme or missing pyramid attributes, other SOP class or transfer
syntax, damaged frames, identity changed in one instance), then:

* **reader**: :func:`dicom_io.wsi.open_slide` on the series folder, and what
  the pipeline then asks of it (levels, thumbnail, a tile at each end of the
  finest level, the level dataset): only :class:`SlideError` may come out;
* **listener**: :meth:`StorageHandlers.handle_store` (what pynetdicom calls
  for a C-STORE) on the mutated file: it must return a PS3.4 B.2.3 status and
  never raise.

A watchdog bounds each case (SIGALRM raises :class:`Hung` in Python code;
faulthandler ends the process with all stacks if native code hangs). The
default run does :data:`QUICK_CASES`; the slow-marked run does the 10 000 of
issue 5 (``HER2_FUZZ_CASES`` overrides both, e.g. for a longer campaign).
"""

from __future__ import annotations

import copy
import faulthandler
import os
import random
import signal
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from dicom_io.errors import SlideError
from dicom_io.listener import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
    StorageHandlers,
)
from dicom_io.wsi import open_slide
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec
from tests.her2_analysis.test_bad_input import c_store_event, ct_slice

DATA = Path(__file__).parents[1] / "data"
QUICK_CASES = 1500
FULL_CASES = 10_000
#: Seconds one case may take before the watchdog calls it hung (cases take milliseconds).
CASE_SECONDS = 20
STATUSES = {SUCCESS, OUT_OF_RESOURCES, DATASET_DOES_NOT_MATCH_SOP_CLASS, CANNOT_UNDERSTAND}


class Hung(BaseException):
    """Raised by the watchdog; a BaseException so that no ``except Exception`` in the code under test hides it."""


@dataclass
class Seed:
    name: str
    files: list[Path]
    datasets: list[pydicom.Dataset]
    raw: list[bytes]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> list[Seed]:
    root = tmp_path_factory.mktemp("fuzz-seeds")
    slide, _ = write_synthetic_slide(SlideSpec(seed=7, width_um=600, height_um=520, class_mix={"2+": 1.0}),
                                     root / "synthetic")
    series = {
        "synthetic": slide,
        "highdicom": [DATA / "highdicom_sm_image.dcm"],
        "highdicom-jpegls": [DATA / "highdicom_sm_image_jpegls.dcm"],
        "camelyon": [DATA / "camelyon_he.dcm"],
        "ct": [ct_slice(root / "ct" / "ct.dcm")],
    }
    return [Seed(name, files, [pydicom.dcmread(f) for f in files], [f.read_bytes() for f in files])
            for name, files in series.items()]


# --- mutations ----------------------------------------------------------------------------------------------------

EXTREMES = [0, 1, 2, 255, 256, 65535, 10**7, 2**31 - 1, 2**32 - 1]
ENCAPSULATED = {JPEGBaseline8Bit, JPEG2000, JPEGLSLossless, RLELossless}


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(6)
    pos = rng.randrange(len(buf))
    if kind == 0:  # flip a few bits anywhere
        for _ in range(rng.randint(1, 16)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # overwrite a span with noise
        span = rng.randint(1, 64)
        buf[pos:pos + span] = rng.randbytes(min(span, len(buf) - pos))
    elif kind == 2:  # truncate
        del buf[pos:]
    elif kind == 3:  # delete a span
        del buf[pos:pos + rng.randint(1, 256)]
    elif kind == 4:  # repeat a span
        span = bytes(buf[pos:pos + rng.randint(1, 256)])
        buf[pos:pos] = span * rng.randint(1, 4)
    else:  # an extreme 16- or 32-bit value, e.g. over a length field (first 4 KiB hold the header)
        pos = rng.randrange(min(len(buf), 4096))
        width = rng.choice((2, 4))
        buf[pos:pos + width] = rng.choice(EXTREMES).to_bytes(8, "little")[:width]
    return bytes(buf)


def _pixel_measures(ds: pydicom.Dataset) -> pydicom.Dataset | None:
    try:
        return ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    except (AttributeError, IndexError):
        return None


def mutate_elements(ds: pydicom.Dataset, rng: random.Random) -> None:
    """One semantic mutation of a data set's header or frames, in place."""
    kind = rng.randrange(12)
    if kind == 0:
        setattr(ds, rng.choice(["TotalPixelMatrixColumns", "TotalPixelMatrixRows"]), rng.choice(EXTREMES[1:]))
    elif kind == 1:
        setattr(ds, rng.choice(["Rows", "Columns"]), rng.choice(EXTREMES[:6]))
    elif kind == 2:
        ds.NumberOfFrames = rng.choice([1, 2, 1000, 10**6, 2**31 - 1])
    elif kind == 3:
        for key in rng.sample(["ImageType", "DimensionOrganizationType", "TotalPixelMatrixColumns", "Rows",
                               "SharedFunctionalGroupsSequence", "OpticalPathSequence", "PixelData",
                               "StudyInstanceUID", "SOPInstanceUID", "NumberOfFrames", "BitsAllocated"],
                              rng.randint(1, 3)):
            if key in ds:
                delattr(ds, key)
    elif kind == 4:
        ds.ImageType = rng.choice([["DERIVED", "PRIMARY", "LABEL", "NONE"], ["ORIGINAL"], ["X", "Y", "OVERVIEW"]])
        ds.DimensionOrganizationType = rng.choice(["TILED_SPARSE", "3D", "TILED_FULL"])
    elif kind == 5:
        ds.file_meta.TransferSyntaxUID = rng.choice([JPEGBaseline8Bit, JPEG2000, JPEGLSLossless, RLELossless,
                                                     ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                     ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
                                                     "1.2.3.4.5.6.7"])
    elif kind == 6:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = rng.choice([CTImageStorage, "1.2.3", ""])
    elif kind == 7:
        measures = _pixel_measures(ds)
        if measures is not None:
            measures.PixelSpacing = rng.choice([[0, 0], [-0.001, 0.001], [1e6, 1e6], [1e-12, 1e-12]])
    elif kind == 8:
        ds.PatientID = rng.choice(["OTHER", ""])
        ds.SeriesInstanceUID = rng.choice([ds.SeriesInstanceUID, "1.2.3/../../x", "9" * 80])
    elif kind == 9 and "PixelData" in ds and ds.file_meta.TransferSyntaxUID in ENCAPSULATED:
        try:
            frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))
        except Exception:  # a seed already mutated out of shape: leave its frames alone
            return
        i = rng.randrange(len(frames))
        choice = rng.randrange(3)
        if choice == 0:
            frames[i] = rng.randbytes(rng.randint(2, 2000))
        elif choice == 1:
            frames[i] = frames[i][: max(2, rng.randrange(max(1, len(frames[i]))))]
        else:
            frames.pop(i)
        if frames:
            ds.PixelData = encapsulate(frames)
    elif kind == 10:
        ds.SamplesPerPixel = rng.choice([1, 4])
        ds.PhotometricInterpretation = rng.choice(["MONOCHROME2", "PALETTE COLOR", "YBR_ICT", "RGB"])
        ds.BitsAllocated = rng.choice([1, 8, 16, 32])
    else:
        ds.TotalPixelMatrixFocalPlanes = rng.choice([0, 1, 5])
        ds.NumberOfOpticalPaths = rng.choice([0, 1, 3])


def mutated_file(seed: Seed, index: int, rng: random.Random) -> bytes:
    """The mutated content of ``seed.files[index]``: element mutations, byte mutations or both."""
    mode = rng.randrange(3)
    data = seed.raw[index]
    if mode != 1:
        ds = copy.deepcopy(seed.datasets[index])
        try:
            for _ in range(rng.randint(1, 3)):
                mutate_elements(ds, rng)
            out = BytesIO()
            ds.save_as(out, enforce_file_format=False)
            data = out.getvalue()
        except Exception:  # pydicom refuses this combination (to encapsulate or write): mutate the bytes instead
            mode = 1
    if mode != 0:
        data = mutate_bytes(data, rng)
    return data


# --- targets ------------------------------------------------------------------------------------------------------

def read_like_the_pipeline(folder: Path) -> str:
    """Everything the pipeline asks of an opened slide; returns "opened" or raises."""
    with open_slide(folder) as slide:
        slide.thumbnail(8.0)
        finest = slide.levels[0]
        read = slide.tile_reader(finest, 512)
        read(0, 0)
        read((finest.height - 1) // 512, (finest.width - 1) // 512)
        slide.level_dataset(finest.index)
        try:
            slide.level_for_mpp(1.0)
        except SlideError:
            pass
    return "opened"


def store_like_the_listener(handlers: StorageHandlers, path: Path, original: pydicom.Dataset) -> int:
    return handlers.handle_store(c_store_event(path, original.get("SOPClassUID", ""),
                                               original.get("SOPInstanceUID", "")))


def _watchdog(signum, frame):
    raise Hung(f"case took more than {CASE_SECONDS} s")


def run_campaign(seeds: list[Seed], cases: int, work: Path) -> tuple[Counter, list[str]]:
    outcomes: Counter = Counter()
    failures: list[str] = []
    spooled: list[tuple] = []
    handlers = StorageHandlers(work / "spool", lambda *args: spooled.append(args), lambda *args: None)
    previous = signal.signal(signal.SIGALRM, _watchdog)
    try:
        for case in range(cases):
            rng = random.Random(case)
            seed = seeds[case % len(seeds)]
            index = rng.randrange(len(seed.files))
            folder = work / f"case-{case % 4}"  # reused: cases leave nothing behind that the next one sees
            folder.mkdir(exist_ok=True)
            for old in folder.iterdir():
                old.unlink()
            for i, src in enumerate(seed.files):
                if i != index:
                    os.link(src, folder / src.name)
            target = folder / seed.files[index].name
            target.write_bytes(mutated_file(seed, index, rng))
            faulthandler.dump_traceback_later(3 * CASE_SECONDS, exit=True, file=sys.__stderr__)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                for name, call, args in (("reader", read_like_the_pipeline, (folder,)),
                                         ("listener", store_like_the_listener, (handlers, target,
                                                                                seed.datasets[index]))):
                    try:
                        result = call(*args)
                    except SlideError:
                        result = "refused"
                    except Hung:
                        raise
                    except Exception as exc:
                        failures.append(f"case {case} ({seed.name}, {target.name}) {name}: "
                                        f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=-4)}")
                        continue
                    if name == "listener" and result not in STATUSES:
                        failures.append(f"case {case} ({seed.name}) listener returned {result!r}")
                    outcomes[f"{name} {result:#06x}" if isinstance(result, int) else f"{name} {result}"] += 1
            except Hung as exc:
                failures.append(f"case {case} ({seed.name}, {target.name}) hung: {exc}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                faulthandler.cancel_dump_traceback_later()
    finally:
        signal.signal(signal.SIGALRM, previous)
    return outcomes, failures


def campaign(seeds, cases: int, tmp_path: Path, capsys) -> None:
    cases = int(os.environ.get("HER2_FUZZ_CASES", cases))
    outcomes, failures = run_campaign(seeds, cases, tmp_path)
    with capsys.disabled():
        print(f"\nfuzz: {cases} mutated DICOM files through the reader and the listener; outcomes: "
              + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    assert not failures, f"{len(failures)} case(s) failed:\n" + "\n".join(failures[:10])
    assert sum(v for k, v in outcomes.items() if k.startswith("reader")) == cases
    assert sum(v for k, v in outcomes.items() if k.startswith("listener")) == cases
    assert outcomes["reader opened"] > 0 and outcomes["reader refused"] > 0  # the mutations reach both outcomes


def test_fuzz_reader_and_listener_quick(seeds, tmp_path, capsys):
    campaign(seeds, QUICK_CASES, tmp_path, capsys)


@pytest.mark.slow
def test_fuzz_reader_and_listener_10000(seeds, tmp_path, capsys):
    campaign(seeds, FULL_CASES, tmp_path, capsys)
