"""Differential privacy: the accountant that states what a run's releases spend."""
