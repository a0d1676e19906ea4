"""Pipeline stage: predict."""
