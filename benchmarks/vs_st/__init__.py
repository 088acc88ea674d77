"""The pieces of ``benchmarks/vs_sentence_transformers.py``: measuring a command (measure), the
same groups and tokens for both tools (pairs), the sentence-transformers training process
(worker), scoring every model alike (quality) and the table (report)."""
