"""Benchmarks: speed and quality figures (`python -m bench`)."""
