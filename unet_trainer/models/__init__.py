"""The networks: the nnU-Net-style U-Net family (model) and the residual-encoder U-Net (resenc).

May import from core and data.
"""
