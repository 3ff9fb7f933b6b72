"""tests.calib.cli."""
