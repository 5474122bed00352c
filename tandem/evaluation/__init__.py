"""Prequential (test-then-train) evaluation of device-cloud strategies: metrics, CIs, loop, report data."""
