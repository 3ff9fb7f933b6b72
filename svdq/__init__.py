"""svdq package."""
