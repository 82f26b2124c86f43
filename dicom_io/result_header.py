"""What every HER2 result object (SR, SEG, ANN) shares: the algorithm that made it, its UIDs, its source.

* :class:`AlgorithmInfo` -- the model, written as TID 4019 Algorithm
  Identification (SR), the Algorithm Identification Macro (SEG segments, ANN
  groups), General Equipment (PS3.3 C.7.5.1) and Contributing Equipment (IHE
  AI Results);
* :func:`set_device_uid` -- the model's Device UID in General Equipment;
* :func:`check_sources` / :func:`source_result_uids` -- every result is made
  from the instances of one source series, which name its UIDs
  (:func:`dicom_io.uids.result_uids`);
* :func:`series_header` -- the series, instance and equipment arguments every
  highdicom result constructor takes;
* :data:`NOT_FOR_CLINICAL_USE` -- the research-use wording of every object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes

from dicom_io.uids import ResultUIDs, result_uids
from her2_core.facts import INTENDED_USE

NOT_FOR_CLINICAL_USE = INTENDED_USE


@dataclass(frozen=True, kw_only=True)
class AlgorithmInfo:
    """Identification of the scoring algorithm (TID 4019, IHE AI Results).

    Attributes
    ----------
    name: str
        Model name (Algorithm Name, Manufacturer's Model Name).
    version: str
        Model version (Algorithm Version); with ``name`` it determines the
        result UIDs and the Device UID.
    manufacturer: str
        Who made the algorithm.
    software_version: str
        Version of this worker software (Software Versions).

    """

    name: str
    version: str
    manufacturer: str = "her2-dicom-worker"
    software_version: str

    def identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification content items."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)

    def segment_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Macro of each Segment Description (Segmentation Image Module, PS3.3 C.8.20.2)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=codes.cid7162.ArtificialIntelligence, version=self.version,
            source=self.manufacturer,
        )

    def equipment(self) -> dict[str, str]:
        """General Equipment Module arguments (PS3.3 C.7.5.1) of an object this algorithm made, for highdicom's SOP classes."""
        return {"manufacturer": self.manufacturer, "manufacturer_model_name": self.name,
                "software_versions": self.software_version, "device_serial_number": self.version}

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment item for the model (IHE AI Results): name and version.

        The model's Device UID is not in this item but in the General
        Equipment Module of the object the model made (:func:`set_device_uid`):
        PS3.3 lists Device UID (0018,1002) in both places since a later
        correction, but dicom3tools' validator (2022) knows only General
        Equipment and makes every object with it in Contributing Equipment
        "Standard Extended".
        """
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=[self.version, self.software_version],
            contribution_description=f"HER2 IHC scoring algorithm {self.name} {self.version}"[:1024],
        )


def set_device_uid(obj: Dataset, device_uid: str) -> None:
    """Device UID (0018,1002) of the model that made ``obj`` (General Equipment Module, PS3.3 C.7.5.1, Type 3).

    The result objects' General Equipment already describes the model
    (Manufacturer, Manufacturer's Model Name = model name, Device Serial
    Number = model version), so its per-version Device UID
    (:attr:`dicom_io.uids.ResultUIDs.device`) belongs there too; the SR also
    names it as Device Observer UID (TID 1004).
    """
    obj.DeviceUID = device_uid


def check_sources(source_instances: Sequence[Dataset], scored_level: Dataset) -> None:
    """Refuse sources that are empty, from several series, or do not include ``scored_level``."""
    if not source_instances:
        raise ValueError("source_instances is empty: results need the source slide's instances (evidence and UIDs)")
    series = {ds.SeriesInstanceUID for ds in source_instances}
    if len(series) != 1:
        raise ValueError(f"source_instances come from {len(series)} series ({sorted(series)}); expected one")
    if scored_level.SOPInstanceUID not in {ds.SOPInstanceUID for ds in source_instances}:
        raise ValueError(f"scored level {scored_level.SOPInstanceUID} is not one of source_instances")


def source_result_uids(source_instances: Sequence[Dataset], algorithm: AlgorithmInfo,
                       co_algorithms: Sequence[AlgorithmInfo] = ()) -> ResultUIDs:
    """Result UIDs of this model version on exactly these source instances (:func:`dicom_io.uids.result_uids`).

    ``co_algorithms``: further graders whose results the SR carries (they change the SR's UIDs only).
    """
    return result_uids(source_instances[0].SeriesInstanceUID, (ds.SOPInstanceUID for ds in source_instances),
                       algorithm.name, algorithm.version, [(a.name, a.version) for a in co_algorithms])


def series_header(series_uid: str, sop_uid: str, series_number: int, series_description: str,
                  algorithms: Sequence[AlgorithmInfo]) -> dict[str, Any]:
    """Series, instance and equipment arguments of a highdicom result object (one instance per series).

    General Series (PS3.3 C.7.3.1), SOP Common (C.12.1) and General Equipment (C.7.5.1) of the first
    algorithm (the one that names the object); every distinct algorithm in ``algorithms`` is listed as
    Contributing Equipment (IHE AI Results). The Device UID is set afterwards (:func:`set_device_uid`).
    """
    distinct = {(a.name, a.version): a for a in algorithms}
    return {"series_instance_uid": series_uid, "series_number": series_number, "sop_instance_uid": sop_uid,
            "instance_number": 1, "series_description": series_description, **algorithms[0].equipment(),
            "contributing_equipment": [a.contributing_equipment() for a in distinct.values()]}
