"""The six pipeline stages, one module each: plain functions plus one thin Prefect task."""
