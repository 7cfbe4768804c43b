"""Optuna sweeps, by concern: `space` (search spaces), `storage` (URLs, opening, repair),
`trial` (per-trial plans and the objective), `workers` (the worker loop, recovery, signals),
`study` (study creation and `run_sweep`), `dashboard` (optuna-dashboard on the storage)."""
