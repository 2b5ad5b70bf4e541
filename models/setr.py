"""setr: not written yet (issue 4)."""
