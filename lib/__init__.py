"""BLCF library: the logic behind the numbered scripts in ``bow_pipeline/``."""
