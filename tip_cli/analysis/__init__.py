"""`tip analyze`: finished runs -> figures and tables. runs (reading run dirs and token samples) <- plots (the
figures) <- report (the tables, W&B, the `analyze` command)."""
