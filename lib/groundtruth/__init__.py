"""Ground truth: the common query/database object and one reader per benchmark format."""
