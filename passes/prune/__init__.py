"""Structured pruning: choose MLP channels by importance and remove them from the graph's weights."""
