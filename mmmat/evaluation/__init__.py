"""Evaluation: cross-modal retrieval and downstream metrics."""
