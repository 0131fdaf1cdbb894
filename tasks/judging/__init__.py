"""Judging: evaluation on the test split, attention maps and the report."""
