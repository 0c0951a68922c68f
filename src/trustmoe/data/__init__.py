"""Data governance: sources, manifest, dedup, PII, contamination, poisoning, datasheet, build."""
