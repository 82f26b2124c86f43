"""Facts that every layer shares, each with its one home here (light to import: no numpy).

* :data:`MAGNIFICATION_MPP` -- objective magnification -> pixel spacing, the usual scanner convention;
* :data:`INTENDED_USE` -- the research-use statement every result, summary and model card carries;
* :data:`WHITE_FRACTION_MAX` -- the white-background share above which a tile is dropped: training and
  inference must drop the same tiles, so the model card records it and the worker checks its setting
  (``white_fraction_max``, default this value) against the card.
"""

from __future__ import annotations

#: Objective magnification -> microns per pixel (the usual scanner convention).
MAGNIFICATION_MPP: dict[int, float] = {40: 0.25, 20: 0.5, 10: 1.0, 5: 2.0}

#: The intended use, in every result object, summary and model card (this software is not validated).
INTENDED_USE = "Research use only - not for clinical use"

#: Tiles with more than this fraction of white background are dropped (training and inference alike).
WHITE_FRACTION_MAX = 0.6
