"""The evaluation behind `python -m csearch.evaluate` (csearch/evaluate.py is only its command line).

Classifier (`classifier` subcommand): classifier.py runs RUN_DIRs on a catalogue and writes
Tables 1-2 and Figures 7-8; confusion.py holds the metrics of a confusion matrix; reports.py
the Markdown/CSV tables and the confusion-matrix and training-curve figures.

Retrieval (`retrieval` subcommand): retrieval.py runs the headline (every query through the
online path, timed); ranking.py ranks every query with csearch.search.search_snapshot (the
function Engine.search uses) and scores the rankings with metrics.py; features.py and cache.py
compute and cache per-setting features; ablation.py varies one module at a time (with shape.py's
experimental re-rankers); figures.py draws Figures 9, 4 and 6.
"""
