"""Model architectures, use cases and training recipes."""
