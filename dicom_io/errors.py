"""Errors raised for bad DICOM input: each carries one line a user can act on."""


class SlideError(ValueError):
    """The input is not a scorable DICOM whole-slide image; the message says exactly why."""


class CorruptTileError(SlideError):
    """One tile's compressed data is damaged."""


class AnnotationError(ValueError):
    """The input is not a usable HER2 region annotation (PS3.3 A.87); the message says exactly why."""


class SourceError(RuntimeError):
    """The slide's source (a PACS read over DICOMweb) could not be read: a fault worth a retry, not bad input.

    The slide reader lets it through where it turns decoder errors into
    :class:`SlideError` or :class:`CorruptTileError`, so a PACS that goes away
    mid-slide retries the job instead of failing it as a corrupt slide.
    """
