"""sparsek.runtime."""
