"""Pipeline stage: integrations."""
