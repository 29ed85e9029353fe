"""Steps A and C on a Dask cluster (the ``cluster`` setting): docs/cluster.md."""
