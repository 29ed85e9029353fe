"""Benchmark scripts; importable so that they share helpers (run them as files)."""
