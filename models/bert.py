"""bert: not written yet (issue 4)."""
