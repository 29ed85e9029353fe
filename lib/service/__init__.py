"""Searching a finished run with a new photo: the query service shared by
``bow_pipeline/search.py`` and ``bow_pipeline/serve.py`` (docs/search.md)."""
