"""Benchmarks: kernel microbenchmarks (pytest-benchmark) and end-to-end policy throughput."""
