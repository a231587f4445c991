"""sparsek.convert."""
