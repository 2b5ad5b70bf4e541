"""vit: not written yet (issue 4)."""
