"""Pipeline stage: schedule."""
