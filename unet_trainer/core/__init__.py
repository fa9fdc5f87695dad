"""The ground floor: atomic file I/O, the distributed helpers, training durations, typed settings,
document reading, the output guard, run folders with their locks, and checkpoint files.

Imports nothing else of the package.
"""
