"""The method (SPEC 2-5): token scores, their normalisation and quadrants, and the selectors. Imports torch only."""
