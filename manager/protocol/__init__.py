"""Wire formats and shared definitions: no I/O, imports nothing else of ours."""
