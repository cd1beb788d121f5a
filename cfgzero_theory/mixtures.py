"""Ready-made mixtures (placeholder until the catalog lands)."""
