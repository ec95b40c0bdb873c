"""`cfdpo benchmark`: every recipe for several seeds, pair-quality ablations, a multi-behaviour
adapter, and `docs/RESULTS.md` with mean ± std over seeds on the held-out prompts.

plan.py     what to run: the recipes, seeds, sizes and picks, and each run's derived recipe
runner.py   running it, with results.json as a `ResultsStore`
aggregate.py  the results across seeds: one recipe's runs, one metric's values, mean and std
targets.py  target rules (a YAML file such as bench/targets.yaml) and how one rule is judged
tables.py   RESULTS.md: the markdown tables, the targets table, the hand-written tail kept
plots.py    the two benchmark plots
"""
