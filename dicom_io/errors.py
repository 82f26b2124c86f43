"""Errors raised for bad DICOM input: each carries one line a user can act on."""


class SlideError(ValueError):
    """The input is not a scorable DICOM whole-slide image; the message says exactly why."""


class CorruptTileError(SlideError):
    """One tile's compressed data is damaged."""


class AnnotationError(ValueError):
    """The input is not a usable HER2 region annotation (PS3.3 A.87); the message says exactly why."""
