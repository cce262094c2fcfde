"""Training: paradigms (how the student sees context), losses, trainer."""
