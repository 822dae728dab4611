"""Accuracy and speed evaluation of compressed models against their baseline."""
