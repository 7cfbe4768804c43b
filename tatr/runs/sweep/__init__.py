"""Optuna sweeps, by concern (each module imports only those above it in this list):

* `space`: search spaces (`sweeps/*.yaml`), pydantic models read like experiments;
* `owners`, `journal`, `storage`: who runs where (same-host PID checks), the journal file's lock and
  repair, storage URLs and opening (RDB heartbeats with Optuna's retry callback). `dashboard`
  (optuna-dashboard) needs these only;
* `trial`: the objective, its intermediate values (running means) and what a trial was;
* `study`: creation (identity, metric name, paper default) and recovery of dead workers' trials;
* `workers`: the worker loop, worker processes and signals;
* `run`: `run_sweep`, its summary and the final test of the best trial (`tatr.runs.tune`).
"""
