"""Safe readers of the text files users write or hand over, for every layer above the core: YAML
without aliases and with YAML 1.2 booleans (`safe_yaml`), and CSV, JSON and JSON Lines with one-line
errors and size limits (`text_files`). Nothing here knows a model, a suite or a run."""
