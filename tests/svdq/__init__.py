"""tests.svdq."""
