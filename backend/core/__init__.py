"""Requests and scheduling: engine arguments, sampling parameters, sequences, the block manager, the
scheduler and the step contract between scheduler and executor. Pure Python (no torch): it decides what
runs, never how."""
