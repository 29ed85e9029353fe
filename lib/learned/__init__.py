"""Step T and learned descriptors: R-MAC, triplet fine-tuning, training lists."""
