"""Convert one tiled TIFF to DICOM VL WSM with wsidicomizer (tiffslide as source); run in the converter venv.

wsidicomizer pins an older wsidicom than the worker needs, so it lives in a
virtual environment of its own (``.venv-convert``, made by
``deploy/install.sh --dev``) and :func:`tests.third_party.wsidicomize` runs
this file there::

    .venv-convert/bin/python tests/wsidicomizer_convert.py '{"tiff": ..., "out": ..., ...}'
"""

from __future__ import annotations

import json
import sys

from pydicom import Dataset
from pydicom.uid import UID
from wsidicom.codec import Channels, JpegSettings, Settings, Subsampling
from wsidicomizer import WsiDicomizer
from wsidicomizer.sources import TiffSlideSource


def encoding(transfer_syntax: str, quality: int, subsampling: str) -> Settings:
    """JPEG baseline at ``quality`` with ``subsampling`` ("444", "422", "420"), else the syntax's default settings."""
    if transfer_syntax == "1.2.840.10008.1.2.4.50":
        return JpegSettings(quality=quality, channels=Channels.YBR, subsampling=Subsampling[f"R{subsampling}"])
    return Settings.create(UID(transfer_syntax), 8, "RGB")


def main(args: dict) -> None:
    identity = Dataset()
    identity.PatientID, identity.PatientName = args["patient_id"], args["patient_name"]
    identity.StudyInstanceUID, identity.SeriesInstanceUID = args["study_uid"], args["series_uid"]
    WsiDicomizer.convert(
        args["tiff"], args["out"], metadata_post_processor=identity, tile_size=args["tile_size"],
        include_label=False, include_overview=False, include_thumbnail=False,
        encoding=encoding(args["transfer_syntax"], args["quality"], args["subsampling"]), preferred_source=TiffSlideSource,
        workers=1,
    )


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
