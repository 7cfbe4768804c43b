"""The run layer: plan → tune → record, one path for sweeps, ablations, the baselines and `tatr evaluate`.

* `config`: experiment files (pydantic), the one YAML reader, `key=value` overrides, one error format;
* `plan`: the one builder of a merge plan from (suite, merge config, exemplars), cached by content;
* `tune`: the one tuner (a grid, or Optuna's best trial) and the one refusal to tune on test;
* `record`: the one record type, the only writer of store rows (and of their W&B mirror's config);
* `schema`: the store's columns and types, the job types and the ablation kinds (the report reads it);
* `store`: the append-only, atomic JSONL files; `tracking`: the W&B mirror and the Optuna callback;
* `ablation_spec`, `ablations`, `correlation`: ablation files, their runner, the gradient-correlation kind;
* `sweep/`: search spaces, Optuna storage, study and recovery, the objective, the sweep's run.

It knows configs, suites and the core, never the report or the CLI.
"""
