"""Synthetic HER2 IHC slides with known truth: the generator (:mod:`her2_synthetic.render`), its DICOM writer
and ground truth (:mod:`her2_synthetic.dicom`) and the region outlines they share with training on annotated
slides (:mod:`her2_synthetic.regions`).

Used by ``her2 synth`` / ``her2 demo``, the tests, the benchmarks and training; it stands on ``her2_core`` and
``dicom_io`` only (docs/architecture.md), so none of those users needs the training code.
"""
