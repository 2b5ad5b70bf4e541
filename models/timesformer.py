"""timesformer: not written yet (issue 4)."""
