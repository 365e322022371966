"""``python -m gptlit tune``: a hyperparameter search over ``fit`` runs with Optuna (`gptlit.tune.command`).

Only `gptlit.tune.command` imports Optuna, and only when tune runs; `gptlit.tune.report.TrialReport`, the callback
each trial's ``fit`` carries, does not.
"""
