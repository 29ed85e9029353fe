"""Step B: PCA-whitening and the visual vocabulary (k-means codebook)."""
