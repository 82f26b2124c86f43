"""Errors raised for bad DICOM input: each carries one line a user can act on."""


class SlideError(ValueError):
    """The input is not a scorable DICOM whole-slide image; the message says exactly why."""


class CorruptTileError(SlideError):
    """One tile's compressed data is damaged."""
