"""Raw datasets in, training patches out.

Modules:
    layouts/    every raw dataset layout, one module each, behind one registry (``LAYOUTS``),
                read into and written from one canonical form; a new layout is one new module
                there and one registry entry
    labels      the canonical labels' short names and evaluation regions (a leaf: the metrics,
                losses and pictures read it without the layouts)
    phantom     the synthetic BraTS phantom, the embedded default dataset
    prepare     one-time cropping, normalisation and resampling into memory-mappable arrays, of a raw
                dataset the registry opened (``layouts.open_dataset``, a ``RawDataset``)
    split       cross-validation splits
    loader      patch loading from the prepared cases

May import from core. Below the registry: phantom, prepare and split import only the layout
modules they use (``layouts.canonical``, ``layouts.files``, one layout), never ``layouts`` itself.
"""
