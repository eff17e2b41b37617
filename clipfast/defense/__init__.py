"""clipfast.defense."""
