"""sparsek.cli."""
