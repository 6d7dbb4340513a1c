"""Sluice worker service: executes runs from the queue."""
