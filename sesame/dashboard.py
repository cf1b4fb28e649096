"""Moved to :mod:`sesame.hub.dashboard`.  This alias is kept for one release and then removed."""

import sys
import warnings

from sesame.hub import dashboard as _moved

warnings.warn("sesame.dashboard moved to sesame.hub.dashboard; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
