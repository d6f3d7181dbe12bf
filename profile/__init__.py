"""Measurement: speed and memory profiles, engines, accuracy evaluation, tables, plots, reports."""
