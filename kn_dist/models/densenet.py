"""densenet family (placeholder until implemented)."""
