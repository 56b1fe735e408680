"""The public face: :func:`moert.api.patch.patch` and :func:`moert.api.load.load` wire an offloader and
a policy into a model and return a :class:`~moert.api.handle.PatchHandle`; :class:`OffloadConfig` says how.

Importing this package imports nothing heavy; ``moert.patch`` / ``moert.load`` resolve here lazily.
"""
