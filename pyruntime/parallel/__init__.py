"""Parallelism applied to an unmodified model: one folder per axis (pipeline/, ...)."""
