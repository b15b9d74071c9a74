"""Benchmarks are collected only by ``python -m bench`` (``make bench``), never by ``make test``."""
