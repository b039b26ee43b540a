"""The `derta` command, one module per stage: data.py, train.py, evaluate.py, recipes.py (demo, bench); main.py
assembles them, common.py holds what they share."""
