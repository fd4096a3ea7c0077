"""Data: the sample schema (schema.py), synthetic scenes, shard writing and loaders.

Import the submodules directly; nothing is re-exported so that importing one part does
not pull in the others (e.g. DALI)."""
