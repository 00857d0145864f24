"""Evaluation: benchmarks (problem lists and tool-use environments), answer grading, and pass@k metrics."""
