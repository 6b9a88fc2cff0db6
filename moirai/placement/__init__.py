"""Placement: solvers, the simulator that checks them, and the placement result format."""
