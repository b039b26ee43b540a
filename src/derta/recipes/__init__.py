"""Recipes: end-to-end programs built from the library's stages.

demo/     `derta demo`: the paper's ablation on a tiny model (or a real one), from data to report
bench.py  `derta bench`: the speed of derta's training and evaluation paths against older ones
"""
