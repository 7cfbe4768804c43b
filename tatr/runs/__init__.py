"""The run layer: plan → tune → record, sweeps (`runs.sweep`), ablations, configs and the store.

It knows configs, suites and the core, never the report or the CLI.
"""
