"""Explanations: attribution maps (`attribution`), the incremental occlusion engine
(`occlusion`), the per-X-ray figures and the index page (`figures`), and `run.explain`, what
explain.py runs over a folder."""
