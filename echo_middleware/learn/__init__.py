"""Pipeline stage: learn."""
