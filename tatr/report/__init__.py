"""The report layer: tables, figures and the offline HTML page, built from the results store.

It reads the store's schema (`tatr.runs.store`) and nothing of the run layer's machinery.
"""
