"""The six pipeline stages, one module each: plain functions plus one thin stage task (`stage_task`)."""
