"""Pipeline stage: route."""
