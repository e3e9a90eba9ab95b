"""kdsweep's benchmark suite: side-by-side ratios against what a researcher would otherwise run.

`python -m benchmarks [--output PATH] [--only NAME ...] [--device cpu|cuda] [--quick]` runs the
entries of `ENTRIES` (see `benchmarks/__main__.py`), prints a table and writes JSON. Every entry
measures kdsweep and its baseline in the same run through kdsweep's real code paths (`train()`,
the sweep workers, `open_storage`), so machine noise affects both sides alike.
"""
