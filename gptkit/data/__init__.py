"""Data: sources of documents (a registry of kinds), the token cache, and batches for training."""
