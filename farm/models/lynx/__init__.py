"""Lynx (ByteDance) on diffusers' Wan components: our implementation of the official full and lite inference.

Public entry points (see ``api``): ``generate_from_embedding`` and ``generate_from_portrait``; the farm backend is
``farm.models.lynx.backend.LynxBackend``; ``farm.models.lynx.tiny.make_tiny_checkpoint`` writes a test checkpoint.
"""

from farm.models.lynx.quiet import drop_import_notices

drop_import_notices()
