"""Conditional crystal generation: the flow-matching generator and its sampling API."""
