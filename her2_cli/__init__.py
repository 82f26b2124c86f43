"""``her2``: the command line (one module per command group); the only package that writes result files.

Research use only: not for clinical use until validated on real slides.
"""
