"""The results store: its schema (`schema`), the append-only JSONL files (`rows`), the run ids of
every kind of run (`run_ids`), and the one record type every writer builds with its named
constructors (`record`). The report reads only this package, the io readers and the core."""
