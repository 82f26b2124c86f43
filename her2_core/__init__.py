"""The HER2 domain core: the facts and rules that every other package stands on.

HER2 classes and the ASCO/CAP slide call (:mod:`her2_core.aggregate`), the preprocessing that
inference and training share (:mod:`her2_core.preprocessing`: tissue mask, tile grid, white filter,
stain normalisation) and the model card (:mod:`her2_core.model_card`). It imports nothing of ours
(``dicom_io``, ``worker``, ``model_training``, ``benchmarks``): see docs/architecture.md.
"""
