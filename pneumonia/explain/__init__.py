"""Explanations: attribution maps, the incremental occlusion engine, the report figures, and
`run.explain`, what explain.py runs over a folder."""
