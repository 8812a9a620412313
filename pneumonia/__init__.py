"""Pneumonia detection and bacterial/viral subtyping in pediatric chest X-rays."""

__version__ = "0.1.0"
