"""conformer family (placeholder until implemented)."""
