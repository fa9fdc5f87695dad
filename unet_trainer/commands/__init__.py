"""What the commands do, as plain-argument functions. The composition root, the only code reading
the resolved config: builders (each component from its section), resume (where a run starts) and
train (a run in setup steps). Then evaluation and prediction from checkpoints (predict, ensemble)
and cross-validation (cv).

May import from every stage but cli.
"""
