"""`tip analyze`: finished runs -> figures and tables. runs (reading run dirs and token samples) <- signal (the
counterfactual gradient share, replaying selectors on saved tokens) <- plots (the figures) <- report (the tables,
W&B, the `analyze` command)."""
