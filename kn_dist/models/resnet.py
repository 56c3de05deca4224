"""resnet family (placeholder until implemented)."""
