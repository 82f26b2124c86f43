"""Deterministic DICOM UIDs for the result objects (PS3.5 Chapter 9 and Annex B.2).

A retried job must re-send the *same* SR and SEG instances, not duplicates, so
every UID the worker mints is derived from what identifies the job: the source
Series Instance UID, the set of its SOP Instance UIDs that was scored, and the
model name and version (see "Identity and idempotency" in the design notes).

UIDs are UUID-derived (PS3.5 B.2, ISO/IEC 9834-8): ``2.25.<decimal UUID>``,
where the UUID is a name-based version 5 UUID (RFC 4122 4.3, SHA-1) of the
parts in a project namespace. No organisation root is needed, they are at
most 44 characters long, and the same parts always give the same UID.

Note that :func:`pydicom.uid.generate_uid` ignores ``entropy_srcs`` when
``prefix=None`` (it then returns a random UUID UID), and with a prefix it
joins the sources without a separator (``("ab", "c")`` and ``("a", "bc")``
collide); hence the explicit construction here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

#: Namespace of every UID this project derives; changing it changes every result UID.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:her2-dicom-worker:dicom-uids:v1")
#: PS3.5 9.1: at most 64 characters.
_MAX_UID_LENGTH = 64
#: PS3.5 9.1: dot-separated numeric components, no leading zero unless the component is 0.
_UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


def derived_uid(*parts: str) -> str:
    """Return the UUID-derived UID (``2.25.<n>``) of ``parts``.

    Parameters
    ----------
    *parts: str
        Strings that identify the object (at least one). Each part is
        length-prefixed before hashing, so ``("ab", "c")`` and ``("a", "bc")``
        give different UIDs.

    Returns
    -------
    str
        A valid DICOM UID of at most 44 characters (PS3.5 B.2).

    Raises
    ------
    ValueError
        When no part is given or a part is not a string.

    """
    if not parts:
        raise ValueError("derived_uid() needs at least one part")
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"derived_uid() parts must be str, got {type(part).__name__}: {part!r}")
    name = "".join(f"{len(part)}:{part};" for part in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` is a syntactically valid DICOM UID (PS3.5 9.1).

    Only digits and single dots, no leading zeros in a component, at most 64
    characters; such a string is also safe as one path component (no ``/``,
    no ``..``), which is why the spool validates UIDs with this before
    building paths from them.

    Parameters
    ----------
    uid: str
        Candidate UID (any object is accepted; non-strings are invalid).

    Returns
    -------
    bool
        ``True`` when ``uid`` is valid.

    """
    if not isinstance(uid, str) or not uid or len(uid) > _MAX_UID_LENGTH:
        return False
    return _UID_SYNTAX.fullmatch(uid) is not None


@dataclass(frozen=True)
class ResultUIDs:
    """UIDs of the result objects of one (source series content, model version) job.

    The SR, the SEG and the ANN are in separate series: a series holds one
    modality (PS3.3 C.7.3.1, Modality "SR" vs "SEG" vs "ANN"), and viewers
    expect all instances of a segmentation in a series of their own.

    Attributes
    ----------
    sr_series: str
        Series Instance UID of the Comprehensive 3D SR series.
    sr: str
        SOP Instance UID of the SR (TID 1500 Measurement Report).
    seg_series: str
        Series Instance UID of the heatmap Segmentation series.
    seg: str
        SOP Instance UID of the heatmap Segmentation.
    ann_series: str
        Series Instance UID of the cell-annotation Microscopy Bulk Simple
        Annotations series (PS3.3 A.87); like every UID here it derives from
        the algorithm that makes the object, so the ANN's are those of
        :func:`result_uids` called with the cell grader's name and version.
    ann: str
        SOP Instance UID of the cell annotations.
    device: str
        Device UID (0018,1002) of the model version, for the General
        Equipment of the objects it makes and the SR device observer (IHE
        AI Results); depends on the model name and version only, not on the
        slide.

    """

    sr_series: str
    sr: str
    seg_series: str
    seg: str
    ann_series: str
    ann: str
    device: str


def result_uids(
    source_series_uid: str, source_instance_uids: Iterable[str], model_name: str, model_version: str,
    co_models: Iterable[tuple[str, str]] = (),
) -> ResultUIDs:
    """Derive all result UIDs for one job: one model version on one version of a series' content.

    A retried job (same instances, same model) gets the same UIDs, so the
    PACS receives the same objects again instead of duplicates. A series that
    gained or lost instances after it was scored is different content: its
    results are new objects (new UIDs) rather than different content under
    the UIDs of the earlier results, which a PACS keeping the first copy of an
    instance (Orthanc's default) would silently ignore (PS3.3 C.12.1.1.1: a
    SOP Instance UID identifies one instance).

    Parameters
    ----------
    source_series_uid: str
        Series Instance UID of the scored VL Whole Slide Microscopy series.
    source_instance_uids: Iterable[str]
        SOP Instance UIDs of every instance of that series that was scored
        (order and repeats do not matter).
    model_name: str
        Name of the scoring model.
    model_version: str
        Version of the scoring model.
    co_models: Iterable[tuple[str, str]]
        (name, version) of further algorithms whose results the SR carries
        beside this model's (e.g. the membrane cell grader next to the tile
        CNN). They change the SR's UIDs only: a new version of either grader
        is a new SR, while the SEG, the ANN and the Device UID stay those of
        ``model_name``/``model_version`` (each object is named by the
        algorithm that made it). Order and repeats do not matter, and the
        model itself in this list changes nothing; empty (the default) gives
        the UIDs of a single-model job.

    Returns
    -------
    ResultUIDs
        The same inputs always give the same UIDs; another model version,
        another source series or another set of its instances gives different
        ones (the device UID depends on the model only).

    Raises
    ------
    ValueError
        When ``source_series_uid`` or a source instance UID is not a valid
        UID, no instance is given, or a model name or version is empty.

    """
    if not is_valid_uid(source_series_uid):
        raise ValueError(f"source Series Instance UID {source_series_uid!r} is not a valid DICOM UID")
    if not model_name or not model_version:
        raise ValueError(f"model name and version must be non-empty (got {model_name!r}, {model_version!r})")
    instances = sorted(set(source_instance_uids))
    if not instances:
        raise ValueError("source_instance_uids is empty: results derive from the scored instances")
    bad = [uid for uid in instances if not is_valid_uid(uid)]
    if bad:
        raise ValueError(f"source SOP Instance UID {bad[0]!r} is not a valid DICOM UID")
    others = sorted(set(co_models) - {(model_name, model_version)})
    if any(not name or not version for name, version in others):
        raise ValueError(f"co_models names and versions must be non-empty (got {others})")
    job = (source_series_uid, derived_uid("content", *instances), model_name, model_version)
    # Length-prefixed parts keep ("a", "b") and ("ab", "") apart; no co-model keeps the single-model UIDs.
    sr_job = job + tuple(part for pair in others for part in ("co-model", *pair))
    return ResultUIDs(
        sr_series=derived_uid("sr-series", *sr_job),
        sr=derived_uid("sr-instance", *sr_job),
        seg_series=derived_uid("seg-series", *job),
        seg=derived_uid("seg-instance", *job),
        ann_series=derived_uid("ann-series", *job),
        ann=derived_uid("ann-instance", *job),
        device=derived_uid("device", model_name, model_version),
    )
