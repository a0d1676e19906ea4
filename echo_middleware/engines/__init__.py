"""Pipeline stage: engines."""
