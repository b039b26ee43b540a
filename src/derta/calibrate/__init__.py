"""Calibrate: thresholds on a model's refusal tokens for a target refusal or over-refusal rate (`derta calibrate`).

sweep.py  the pure part: a score table in, per-category thresholds and the curves out
run.py    scoring examples with a model (one teacher-forced pass), calibration.json, the plot and report
"""
