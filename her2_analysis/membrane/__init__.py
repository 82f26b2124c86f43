"""The membrane cell grader: ASCO/CAP's per-tumour-cell definition measured on fine fields.

:mod:`her2_analysis.membrane.field` grades the cells of one field; :mod:`her2_analysis.membrane.slide` reads the
slide's fields, calibrates the stains on them and sums their cells to the slide's cell result.
"""
