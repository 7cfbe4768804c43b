"""The report layer: tables, figures and the offline HTML page, built from the results store.

It reads the store's schema (`tatr.store.schema`, `tatr.store.rows`) and nothing of the run layer's
machinery. One concern per module, in the order data flows:

    labels     what rows are called and in which order (from the method and mode registries)
    selection  typing the store, the latest run per configuration and seed, which rows a table uses
    tables     the tables and their statistics (mean ± std over seeds), one per ablation kind
    render     the `Table` object and its Markdown, LaTeX, CSV and HTML renderers
    figures    matplotlib figures, byte-for-byte repeatable
    build      `tatr report`: every table and figure of a benchmark, and `index.html`
    wandb_rows `tatr report --from-wandb`: the store's rows rebuilt from W&B
"""
