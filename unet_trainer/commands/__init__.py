"""What the commands do, as plain-argument functions. The composition root, the only code reading
the resolved config: builders (each component from its section), datasets (the data folders, their
preparation and split), resume (where a run starts) and train (a run in setup steps). Then a checkpoint's model or an ensemble's (loading), scoring a loaded
model (evaluate), prediction (predict), cv folders (folders) and cross-validation (cv).

May import from every stage but cli.
"""
