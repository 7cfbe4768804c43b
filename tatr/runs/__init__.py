"""The run layer: plan → tune → record, one path for sweeps, ablations, the baselines and `tatr evaluate`.

* `config`: experiment files (pydantic, with `MergeConfig`'s option fields derived from `tatr.core.options`),
  `key=value` overrides, one error format (YAML is read by `tatr.io.safe_yaml`);
* `plan`: the one builder of a merge plan from (suite, merge config, exemplars), cached by content;
* `tune`: the one tuner (a grid, or Optuna's best trial) and the one refusal to tune on test;
* `tracking`: the W&B mirror and the Optuna callback (the store itself, its schema, run ids and the
  one record type are the package `tatr.store`);
* `ablation_spec`, `ablations`, `correlation`: ablation files, their runner, the gradient-correlation kind;
* `sweep/`: search spaces, Optuna storage, study and recovery, the objective, the sweep's run.

It knows configs, suites, the store and the core, never the report or the CLI.
"""
