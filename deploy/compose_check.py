"""Checks of deploy/compose-test.sh against the Orthanc of a running compose stack (run with .venv/bin/python).

    compose_check.py ports N                      N free TCP ports on 127.0.0.1, one per line
    compose_check.py slide DIR                    "<StudyInstanceUID> <SeriesInstanceUID> <true call>" of a
                                                  slide written by `her2 synth`
    compose_check.py copy SRC DST N               the slide of SRC as another patient's: every UID of its
                                                  own (study, series, instances, frame of reference, ...)
                                                  replaced, derived from the old one and N; same pixels
    compose_check.py results STUDY CALL TIMEOUT   wait until Orthanc holds an SR, a SEG and an ANN in the study,
                                                  then read the slide's call from the SR (dicom_io.sr.read_sr_call)
                                                  and compare it with CALL

Orthanc is reached at $ORTHANC_URL as user admin with $ORTHANC_PASSWORD (from the environment, never from
the command line). Every wait is bounded; a failure is one line on stderr and exit status 1.
"""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

RESULT_MODALITIES = ("SR", "SEG", "ANN")


def orthanc(path: str, body: str | None = None) -> bytes:
    request = urllib.request.Request(os.environ["ORTHANC_URL"].rstrip("/") + path,
                                     data=None if body is None else body.encode(), method="GET" if body is None
                                     else "POST")
    token = base64.b64encode(f"admin:{os.environ['ORTHANC_PASSWORD']}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.read()


def ports(count: int) -> None:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    for s in sockets:
        print(s.getsockname()[1])
        s.close()


def slide(folder: str) -> None:
    import pydicom

    truth = json.loads((Path(folder) / "ground_truth.json").read_text())
    first = pydicom.dcmread(sorted(Path(folder).glob("*.dcm"))[0], stop_before_pixels=True)
    assert first.SeriesInstanceUID == truth["series_instance_uid"], "ground truth of another series"
    print(first.StudyInstanceUID, first.SeriesInstanceUID, truth["call"])


def copy(source: str, target: str, n: str) -> None:
    import pydicom
    from pydicom.uid import generate_uid

    def renamed(uid: str) -> str:  # standard UIDs (SOP classes, transfer syntaxes, codes) stay
        return uid if uid.startswith("1.2.840.10008.") else generate_uid(entropy_srcs=[uid, n])

    def walk(dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.VR == "UI" and element.keyword != "ImplementationClassUID" and element.value:
                element.value = renamed(str(element.value))

    out = Path(target)
    out.mkdir(parents=True)
    for path in sorted(Path(source).glob("*.dcm")):
        dataset = pydicom.dcmread(path)
        walk(dataset.file_meta)
        walk(dataset)
        dataset.PatientID = f"{dataset.PatientID}-COPY{n}"
        dataset.save_as(out / path.name, enforce_file_format=True)
    truth = json.loads((Path(source) / "ground_truth.json").read_text())
    truth["series_instance_uid"] = renamed(truth["series_instance_uid"])
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1))


def results(study_uid: str, call: str, timeout: float) -> int:
    import pydicom

    from dicom_io.sr import read_sr_call

    start = time.monotonic()
    found: dict[str, list[str]] = {}
    last_error = ""
    while time.monotonic() - start < timeout:
        try:
            studies = json.loads(orthanc("/tools/lookup", study_uid))
            found = {}
            for study in (s for s in studies if s.get("Type") == "Study"):
                for series in json.loads(orthanc(f"/studies/{study['ID']}/series")):
                    modality = series.get("MainDicomTags", {}).get("Modality", "")
                    found.setdefault(modality, []).extend(series.get("Instances", []))
            last_error = ""
        except (urllib.error.URLError, OSError, ValueError) as e:  # Orthanc restarting, or a partial answer
            last_error = f" (last Orthanc error: {e})"
        if all(found.get(m) for m in RESULT_MODALITIES):
            break
        time.sleep(2)
    else:
        missing = ", ".join(m for m in RESULT_MODALITIES if not found.get(m))
        present = ", ".join(f"{m} x{len(v)}" for m, v in sorted(found.items())) or "nothing"
        print(f"no {missing} in Orthanc's study {study_uid} after {timeout:.0f} s (it holds {present}){last_error}",
              file=sys.stderr)
        return 1
    waited = time.monotonic() - start
    calls = {read_sr_call(pydicom.dcmread(io.BytesIO(orthanc(f"/instances/{sr}/file")))) for sr in found["SR"]}
    if calls != {call}:
        print(f"study {study_uid}: the SR's call is {', '.join(sorted(calls))}, expected {call}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{m} x{len(found[m])}" for m in RESULT_MODALITIES)
    print(f"study {study_uid}: {counts} in Orthanc after {waited:.0f} s, call {call}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["ports"] and len(argv) == 2:
        ports(int(argv[1]))
        return 0
    if argv[:1] == ["slide"] and len(argv) == 2:
        slide(argv[1])
        return 0
    if argv[:1] == ["copy"] and len(argv) == 4:
        copy(*argv[1:])
        return 0
    if argv[:1] == ["results"] and len(argv) == 4:
        return results(argv[1], argv[2], float(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
