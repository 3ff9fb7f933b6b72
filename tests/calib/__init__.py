"""tests.calib."""
