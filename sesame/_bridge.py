"""Moved to :mod:`sesame.bridge` (``get_bridge`` is also in :mod:`sesame.tunnel`).  This
alias is kept for one release and then removed."""

import sys
import warnings

from sesame import bridge as _moved

warnings.warn("sesame._bridge moved to sesame.bridge; the old name goes away in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
