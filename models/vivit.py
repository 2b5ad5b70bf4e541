"""vivit: not written yet (issue 4)."""
