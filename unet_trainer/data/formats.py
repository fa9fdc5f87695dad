"""The old import path of :mod:`unet_trainer.data.layouts`, kept so code written against it works.

Every layout, convention and helper lives in the layouts package; this module only re-exports
its public names.
"""

from .layouts import *  # noqa: F403
from .layouts import __all__  # noqa: F401
