"""swin: not written yet (issue 4)."""
