"""The ground floor: atomic file I/O, the distributed helpers, training durations, the settings'
annotations (``settings``, a leaf) and the schema derived from them, document reading, the output
guard, run folders with their locks, and checkpoint files.

Imports nothing else of the package.
"""
