"""Moved to :mod:`sesame.hub.frontdoor`.  This alias is kept for one release and then removed."""

import sys
import warnings

from sesame.hub import frontdoor as _moved

warnings.warn("sesame.frontdoor moved to sesame.hub.frontdoor; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
