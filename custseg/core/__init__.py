"""Pure functions: validation, generation, training maths, drift statistics, explanation maths."""
