"""convmixer family (placeholder until implemented)."""
