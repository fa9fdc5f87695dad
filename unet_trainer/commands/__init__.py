"""What the commands do, as plain-argument functions. The composition root, the only code reading
the resolved config: builders (each component from its section), resume (where a run starts) and
train (a run in setup steps). Then a checkpoint's model or an ensemble's (loading), evaluation and
prediction from checkpoints (predict) and cross-validation (cv).

May import from every stage but cli.
"""
