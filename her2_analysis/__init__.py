"""Image analysis of one opened HER2 IHC slide: plain values in, results out, no files written.

The slide's tiles and fields (:mod:`her2_analysis.tiles`), slide and tile quality control
(:mod:`her2_analysis.quality`), the deep tile grader (:mod:`her2_analysis.cnn`), the membrane cell grader
(:mod:`her2_analysis.membrane`: one field, then the slide), the slide's conclusion
(:mod:`her2_analysis.conclusion`), the DICOM result objects (:mod:`her2_analysis.results`), overlays a
pathologist checks (:mod:`her2_analysis.overlay`), and the job that runs them top-down
(:func:`her2_analysis.pipeline.score_slide`). What it may be told is :mod:`her2_analysis.options`; it knows
no settings file, queue or network (docs/architecture.md).

Research use only: not for clinical use until validated on real slides.
"""
