"""Scoring predictions: the RSNA metrics and their intervals, recalibration, plots, the validation report, evaluate."""
