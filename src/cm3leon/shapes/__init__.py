"""The built-in Shapes world: procedural scenes with exact ground truth, and everything specific to it."""
