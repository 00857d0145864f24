"""The method (SPEC 2-5): token scores, their normalisation and quadrants, the selectors, and selection over every
rank's tokens with the gather injected (global_select). Imports torch only."""
