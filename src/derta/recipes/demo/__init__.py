"""`derta demo`: config.py (settings), pipeline.py (the stages), metrics.py (what is measured), report.py and
plots.py (report.md, the checks, the figures)."""
