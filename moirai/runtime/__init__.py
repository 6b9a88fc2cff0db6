"""Running a stage plan on this machine: in one process (to check a plan) or as local servers."""
