"""Deployment: the model registry (versions, aliases with append-only history, promotion
gates, content-addressed blobs) and live monitoring (reference profiles, drift detectors,
SLOs, incidents, automatic rollback).

Imports flow one way: `deploy` may import `config`, `model`, `engine`, `eval`; nothing below
imports `deploy`.
"""
