"""svdq.solvers."""
