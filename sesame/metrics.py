"""Moved to :mod:`sesame.hub.metrics`.  This alias is kept for one release and then removed."""

import sys
import warnings

from sesame.hub import metrics as _moved

warnings.warn("sesame.metrics moved to sesame.hub.metrics; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
