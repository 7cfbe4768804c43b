"""The results store: its schema (`schema`), the append-only JSONL files and run ids (`rows`), and the
one record type every writer builds (`record`). The report reads only this package and the core."""
