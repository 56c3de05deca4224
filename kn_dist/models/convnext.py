"""convnext family (placeholder until implemented)."""
