"""Prefect flows and the quant-release command line."""
