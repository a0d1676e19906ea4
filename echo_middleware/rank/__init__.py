"""Pipeline stage: rank."""
