"""Measuring sensitivity tables: which entries to measure, resumable progress, estimation."""
