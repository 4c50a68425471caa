"""Holding the run together: the run, the OUTPUT lock, progress, clean-up, human-correction runs."""
