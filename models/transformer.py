"""transformer: not written yet (issue 4)."""
