"""Migration scripts, one revision per file; `down_revision` chains them."""
