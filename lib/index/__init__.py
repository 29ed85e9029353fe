"""Step C: assignment maps, BoW encoding, the inverted file and streamed distractors."""
