"""Moved to :mod:`sesame.hub.mgmt`.  This alias is kept for one release and then removed."""

import sys
import warnings

from sesame.hub import mgmt as _moved

warnings.warn("sesame.mgmt moved to sesame.hub.mgmt; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
