"""Accuracy evaluation: perplexity, multiple choice, generation tasks, the code sandbox."""
