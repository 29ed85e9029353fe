"""Step D: query encoding, ranking, spatial re-ranking with localisation, query expansion."""
