"""Benchmark readers, download/preparation, and the generated demo set."""
