"""The bottom layer: what every other layer stands on and that names no stage.

Errors, run folders (metadata, fingerprints, resume), data readers, the one hook manager, chat and
thinking templates, the architecture adapter registry, model loading, and the typed configs shared by
several stages (model, generation, backend, executor). Imports nothing else of refusal_cliff.
"""
