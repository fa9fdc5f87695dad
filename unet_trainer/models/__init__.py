"""The networks, one module per concern:

* ``blocks``: the layers and blocks (norms, the layer factory, conv-norm-act, plain and residual
  blocks, upsampling, the decoder stage); imports nothing from the package;
* ``checks``: the settings' choices, the argument checks (``ModelArgumentError``, ``StageLayout``)
  and the per-axis size tracing; imports nothing from the package;
* ``base``: ``SegmentationModel`` (what the rest of the code asks of a model), ``EncoderDecoderNet``
  (forward pass, deep supervision, the one decoder builder, initialisation, size arithmetic) and
  ``optimize_model``, and the annotated geometry types of the signatures; imports ``blocks``,
  ``checks`` and ``core.schema``, so no chain in the folder is longer than three modules;
* ``unet``: the nnU-Net-style U-Net family; ``resenc``: nnU-Net's residual-encoder U-Net; each
  imports ``base``, ``blocks``, ``checks`` and ``core.schema``.

The folder may import from core and data.
"""
