"""perceiver: not written yet (issue 4)."""
