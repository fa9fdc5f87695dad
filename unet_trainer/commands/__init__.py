"""What the commands do, as plain-argument functions: building and running a training (builders, the
composition root), evaluation and prediction from checkpoints (predict, ensemble) and
cross-validation (cv).

May import from every stage but cli.
"""
