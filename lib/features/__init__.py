"""Step A: images, backbones, batched extraction and the local-feature store and reader."""
