"""Transfer syntaxes of whole-slide images that both the listener and the reader accept.

One list, so that the listener never spools an instance the reader then
refuses: uncompressed (PS3.5 A.1, A.2), JPEG baseline, extended and
lossless (A.4.1), JPEG-LS (A.4.3), JPEG 2000 (A.4.4) and High-Throughput
JPEG 2000 - what wsidicom decodes. RLE (A.4.2), Deflate (A.5), big endian and
video syntaxes are refused.
"""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
]


def describe(uid: str) -> str:
    """``"<name> (<uid>)"`` for a registered transfer syntax, the bare UID otherwise."""
    name = UID(uid).name if uid else ""
    return f"{name} ({uid})" if name and name != uid else repr(uid)
