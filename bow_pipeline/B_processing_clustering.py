"""Step B: fit the PCA-whitening and the visual vocabulary (k-means) on local features.

Reads a sample of step A's feature store (or ``train_store``); writes pca.npz + pca.json
and codebook.npy + codebook.json into ``path_models`` (default <path_output>/models).
TRAIN_PCA / TRAIN_CENTROIDS false reuse the existing file after checking it against the
settings. Details: lib/vocabulary/step.py.
"""

from __future__ import annotations

from lib.cli import make_parser, run_step


def main() -> None:
    args = make_parser("B_processing_clustering.py", __doc__ or "").parse_args()

    def call(settings):
        from lib.vocabulary.step import train_models

        return train_models(settings)

    run_step(args, "B", call)


if __name__ == "__main__":
    main()
