"""Coded concepts of the HER2 result objects (SR, SEG, ANN) and the local coding scheme ``99HER2``.

No DICOM context group exists for HER2 IHC; see the design notes, "Codes for
the HER2 score in SR". The SR's concepts:

======================================  =========================================
HER2 score (concept name)               (85319-2, LN) HER2 [Presence] in Breast
                                        cancer specimen by Immune stain
HER2 score values (LOINC LL4396-9)      LA6111-4 "0", LA11841-6 "1+",
                                        LA11842-4 "2+", LA11843-2 "3+",
                                        LA11884-6 "Indeterminate" (not assessable)
HER2-ultralow                           (HER2CAT, 99HER2) "HER2 expression category"
                                        = (1381318009, SCT) "HER2-ultralow"; the
                                        score itself stays LA6111-4 "0"
Reflex ISH                              (REFLEXISH, 99HER2) "Reflex in situ
                                        hybridization indicated" = (373066001,
                                        SCT) Yes / (373067005, SCT) No; omitted
                                        when the slide is not assessable
Class percentages (NUM, UCUM "%")       (PCT0 / PCT1 / PCT2 / PCT3, 99HER2)
                                        "Tumor area with HER2 IHC <c> staining"
                                        (tile grader); (CPCT0..3, 99HER2) "Tumor
                                        cells with HER2 IHC <c> staining" (cell
                                        grader)
Cell counts (NUM, UCUM "{cells}")       (CCNT0..3, 99HER2) "Number of tumor cells
                                        with HER2 IHC <c> staining"
Membrane connectivity (NUM, UCUM "1")   (CONNECT, 99HER2) "HER2 membrane
                                        connectivity", 0 (no tumour cell has
                                        membrane staining) .. 1 (every one ringed
                                        completely by intense staining)
Which grader made the slide call        (DECIDES, 99HER2) "Grader made the slide
                                        call" = Yes / No, in each grader's group
Tumour area (NUM, UCUM "mm2")           (TUMORAREA, 99HER2) "Scored tumor area"
Flags (TEXT, in the TID 1501 group)     (FLAG, 99HER2) "Scoring flag"
Intended-use statement (TEXT)           (121106, DCM) "Comment"
Finding type / category                 (108369006, SCT) "Tumor" /
                                        (49755003, SCT) "Morphologically
                                        abnormal structure"
======================================  =========================================

Each class also has its own property type, so a viewer's legend tells the
classes apart by code and not only by label, and one display colour
(:data:`CLASS_COLOURS`):

======================================  =========================================
Heatmap SEG segment (PS3.3 C.8.20.2)    category (49755003, SCT); type one local
                                        code per class (:data:`TILE_CLASS_CODES`),
                                        e.g. (HER2TILE1, 99HER2) "Tumor region
                                        with HER2 IHC 1+ staining"
Cell ANN group (PS3.3 C.37.1.2)         category (91723000, SCT) "Anatomical
                                        Structure"; type (HER2CELL0..3, 99HER2),
                                        a tumour cell by its membrane pattern
                                        (:data:`CELL_CLASS_CODES`; CID 8135 has
                                        only "Cell" and "Nucleus")
Recommended Display CIELab Value        :data:`CLASS_COLOURS` (sRGB), also the
                                        colours of the PNG overlays' legends
======================================  =========================================

``99HER2`` is a local coding scheme (the "99" prefix is reserved for local
schemes, PS3.3 8.2) declared in the Coding Scheme Identification Sequence
(SOP Common Module, PS3.3 C.12.1) of every object that uses it
(:func:`local_scheme_item`).
"""

from __future__ import annotations

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

from her2_core.aggregate import CLASSES, SlideCall

LOCAL_SCHEME = "99HER2"


def local_scheme_item() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification Sequence item (SOP Common Module, PS3.3 C.12.1) declaring ``99HER2``."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="her2-dicom-worker local codes", responsible_organization="her2-dicom-worker",
    )


HER2_SCORE = CodedConcept("85319-2", "LN", "HER2 [Presence] in Breast cancer specimen by Immune stain")
HER2_SCORE_VALUES: dict[SlideCall, CodedConcept] = {
    SlideCall.ZERO: CodedConcept("LA6111-4", "LN", "0"),
    SlideCall.ULTRALOW: CodedConcept("LA6111-4", "LN", "0"),
    SlideCall.ONE: CodedConcept("LA11841-6", "LN", "1+"),
    SlideCall.TWO: CodedConcept("LA11842-4", "LN", "2+"),
    SlideCall.THREE: CodedConcept("LA11843-2", "LN", "3+"),
    SlideCall.NOT_ASSESSABLE: CodedConcept("LA11884-6", "LN", "Indeterminate"),
}
HER2_CATEGORY = CodedConcept("HER2CAT", LOCAL_SCHEME, "HER2 expression category")
HER2_ULTRALOW = CodedConcept("1381318009", "SCT", "HER2-ultralow")
REFLEX_ISH = CodedConcept("REFLEXISH", LOCAL_SCHEME, "Reflex in situ hybridization indicated")
YES = CodedConcept.from_code(codes.SCT.Yes)
NO = CodedConcept.from_code(codes.SCT.No)
CLASS_PERCENTAGE: dict[str, CodedConcept] = {
    c: CodedConcept(f"PCT{i}", LOCAL_SCHEME, f"Tumor area with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
TUMOUR_AREA = CodedConcept("TUMORAREA", LOCAL_SCHEME, "Scored tumor area")
SCORING_FLAG = CodedConcept("FLAG", LOCAL_SCHEME, "Scoring flag")
COMMENT = CodedConcept.from_code(codes.DCM.Comment)
TUMOR = CodedConcept.from_code(codes.SCT.Tumor)
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
WHOLE_SLIDE_IMAGING = CodedConcept.from_code(codes.DCM.WholeSlideImaging)
PERCENT = CodedConcept("%", "UCUM", "percent")
SQUARE_MM = CodedConcept("mm2", "UCUM", "square millimeter")
CELL_PERCENTAGE: dict[str, CodedConcept] = {
    c: CodedConcept(f"CPCT{i}", LOCAL_SCHEME, f"Tumor cells with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
CELL_COUNT: dict[str, CodedConcept] = {
    c: CodedConcept(f"CCNT{i}", LOCAL_SCHEME, f"Number of tumor cells with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
MEMBRANE_CONNECTIVITY = CodedConcept("CONNECT", LOCAL_SCHEME, "HER2 membrane connectivity")
SLIDE_CALL_GRADER = CodedConcept("DECIDES", LOCAL_SCHEME, "Grader made the slide call")
CELLS = CodedConcept("{cells}", "UCUM", "cells")
NO_UNITS = CodedConcept("1", "UCUM", "no units")

#: Display colour (sRGB, 0-255) per HER2 class: 0 blue, 1+ yellow, 2+ orange, 3+ red. The one home of
#: the class colours: PNG overlay legends, heatmap SEG segments, cell ANN groups.
CLASS_COLOURS: dict[str, tuple[int, int, int]] = {
    "0": (60, 110, 220), "1+": (240, 220, 40), "2+": (245, 140, 20), "3+": (215, 30, 30),
}


def display_colour(name: str) -> hd.color.CIELabColor:
    """Recommended Display CIELab Value (PS3.3 C.10.7.1.1) of class ``name``: :data:`CLASS_COLOURS` in CIELab."""
    return hd.color.CIELabColor.from_rgb(*CLASS_COLOURS[name])


#: HER2 class -> its ASCO/CAP membrane staining pattern.
CLASS_PATTERNS: dict[str, str] = {
    "0": "no membrane staining",
    "1+": "faint incomplete membrane staining",
    "2+": "weak to moderate complete membrane staining",
    "3+": "intense complete membrane staining",
}
#: HER2 class -> Annotated Property Type of its cell group (a tumour cell with that pattern).
CELL_CLASS_CODES: dict[str, CodedConcept] = {
    c: CodedConcept(f"HER2CELL{i}", LOCAL_SCHEME,
                    "Tumor cell without HER2 membrane staining" if c == "0"
                    else f"Tumor cell with {CLASS_PATTERNS[c].replace('membrane', 'HER2 membrane')}")
    for i, c in enumerate(CLASSES)
}
#: HER2 class -> Segmented Property Type of its heatmap segment (tumour tiles the tile grader gives that class).
TILE_CLASS_CODES: dict[str, CodedConcept] = {
    c: CodedConcept(f"HER2TILE{i}", LOCAL_SCHEME, f"Tumor region with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
