"""kandinsky_trt.benchmarks: measured claims (JSON + Markdown + PNG under ``benchmarks/results``).

``harness`` times stages and pipelines for several backends side by side, ``report`` writes and
compares results, ``commands`` the ``bench`` CLI command; the other modules are the scripts behind
the committed full-size, serving and GPU figures. May import every other package.
"""
