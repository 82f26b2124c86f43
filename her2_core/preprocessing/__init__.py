"""The one home of preprocessing, shared by inference (``her2_analysis.pipeline``) and
training (``model_training``): tissue mask, tile grid and white filter, and
Macenko stain normalisation with DAB kept on an absolute scale.
"""

from her2_core.preprocessing.pixels import pixels_at
from her2_core.preprocessing.stain import REFERENCE, StainNormaliser, StainReference, fit_stains, optical_density
from her2_core.preprocessing.tiling import candidate_tiles, grid_for_level, white_fraction
from her2_core.preprocessing.tissue import THUMBNAIL_MPP, glass_colour, tissue_mask

__all__ = [
    "REFERENCE",
    "THUMBNAIL_MPP",
    "StainNormaliser",
    "StainReference",
    "candidate_tiles",
    "fit_stains",
    "glass_colour",
    "grid_for_level",
    "optical_density",
    "pixels_at",
    "tissue_mask",
    "white_fraction",
]
