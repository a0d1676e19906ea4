"""Pipeline stage: embed."""
