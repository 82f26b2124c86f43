"""Load: 20 concurrent associations, each sending a different patient's slide, through the real stack.

20 tiny synthetic slides (512 um square, 3 instances each, patients LOAD-00..LOAD-19) are
made once per session. Twenty pynetdicom SCUs associate with ``her2 listen`` at once
(a barrier holds them until all 20 associations are open), then each stores its slide;
two Celery workers score them and send the results to Orthanc. Checks: every series is
scored exactly once, every result sits in its own patient's study and refers to its own
source instances, and the listener's resident memory (VmRSS from /proc) grows by less
than :data:`RSS_GROWTH_BOUND` while it serves them. Loopback only; bounded in count
(20) and in time (every wait has a timeout).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pacs_stack import associate, wait_until
from test_routing import SEG, SR, results_in_study, source_header, synth

pytestmark = pytest.mark.integration

SLIDES = 20
#: Allowed growth of the listener's resident memory while serving the 20 associations. The data
#: received is ~2.5 MB in all and is streamed to disk; what grows is ~60 pynetdicom threads.
RSS_GROWTH_BOUND = 64 * 1024 * 1024
RESULT_TIMEOUT = 400


@pytest.fixture(scope="session")
def load_slides(tmp_path_factory) -> list[list[Path]]:
    """20 small slides of 20 patients (grades cycling 0..3+), made once per test session."""
    root = tmp_path_factory.mktemp("load-slides")
    grades = ["0", "1+", "2+", "3+"]
    return [synth(root, seed=300 + i, patient_id=f"LOAD-{i:02d}", grade=grades[i % 4], size_um=512)[0]
            for i in range(SLIDES)]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE).group(1)) * 1024


class RSSSampler(threading.Thread):
    """Samples a process's RSS every 50 ms until stopped; ``peak`` is the largest value seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, rss_bytes(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_bytes(self.pid))


def send_concurrently(port: int, slides: list[list[Path]]) -> list[list[int]]:
    """One association per slide, all open at the same time, then each stores its slide; returns statuses."""
    statuses: list[list[int]] = [[] for _ in slides]
    all_open = threading.Barrier(len(slides), timeout=60)

    def send(i: int) -> None:
        assoc = associate(port)
        try:
            all_open.wait()  # 20 associations established at once before any data is sent
            statuses[i] = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in slides[i]]
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(slides))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an association hung"
    return statuses


def test_twenty_concurrent_associations_each_scored_once_into_its_own_patient(stack, load_slides):
    listener = stack.start_listener()
    # A 512 um slide holds ~0.1 mm2 of tumour, under the default QC minimum: lower it so the workers
    # really grade tiles (a slide that still has none gets a "not assessable" SR, also a result).
    for index in (1, 2):
        stack.start_worker(index=index, HER2_QC_MIN_TUMOUR_MM2="0.02")
    sources = [source_header(files) for files in load_slides]
    assert len({s.PatientID for s in sources}) == len({s.StudyInstanceUID for s in sources}) == SLIDES

    associate(stack.listener_port).release()  # warm up: imports and first-association allocations
    baseline = rss_bytes(listener.proc.pid)
    sampler = RSSSampler(listener.proc.pid)
    sampler.start()
    statuses = send_concurrently(stack.listener_port, load_slides)
    assert statuses == [[0x0000] * len(files) for files in load_slides]
    wait_until(lambda: all(stack.job_state(s.SeriesInstanceUID) is not None for s in sources), 60,
               "a job for every series")
    sampler.done.set()
    sampler.join()

    def all_done() -> bool:
        states = {stack.job_state(s.SeriesInstanceUID) for s in sources}
        if states & {"failed", "parked"}:
            pytest.fail(f"job states {states}")
        return states == {"done"}

    wait_until(all_done, RESULT_TIMEOUT, "all 20 jobs done", interval=2)

    logs = stack.logs()
    scored = Counter(m for m in re.findall(r"series (\S+) scored \(", logs))
    assert scored == Counter({s.SeriesInstanceUID: 1 for s in sources})  # each exactly once, by one worker
    claims = stack.redis.client(db=2).keys("her2:claim:*")
    assert sorted(k.split(":")[2] for k in claims) == sorted(s.SeriesInstanceUID for s in sources)
    assert stack.redis.client(db=0).llen("celery") == 0

    for files, source in zip(load_slides, sources):
        results = results_in_study(stack.orthanc, source.StudyInstanceUID)
        # One SR, plus at most one SEG heatmap (none when no tile was scored), nothing else.
        assert set(results) <= {SR, SEG} and len(results[SR]) == 1 and len(results.get(SEG, [])) <= 1
        source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
        for orthanc_id in [i for ids in results.values() for i in ids]:
            ds = stack.orthanc.instance(orthanc_id)
            assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        sr = stack.orthanc.instance(results[SR][0])
        referenced = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                      for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
        results_uids = {stack.orthanc.instance(i).SOPInstanceUID for i in results.get(SEG, [])}
        assert results_uids <= referenced  # the SR's evidence lists its heatmap and the source instances
        assert referenced - results_uids and referenced - results_uids <= source_uids
    assert len(stack.orthanc.get("/patients")) == SLIDES

    calls = Counter(m for m in re.findall(r"series \S+ scored \(([^)]*)\)", logs))
    print(f"slide calls: {dict(calls)}")
    growth = sampler.peak - baseline
    print(f"listener RSS: baseline {baseline / 2**20:.1f} MiB, peak {sampler.peak / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.1f} MiB) over {SLIDES} concurrent associations")
    assert growth < RSS_GROWTH_BOUND
    assert not any(f"LOAD-{i:02d}" in logs for i in range(SLIDES))
