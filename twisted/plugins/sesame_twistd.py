# Keep this module light: every twistd and clientFromString call imports it.
from twisted.application.service import ServiceMaker

sesame = ServiceMaker(
    "sesame",
    "sesame.tap",
    "sesame: reverse tunnels over gRPC (twistd sesame hub | remote | host)",
    "sesame",
)
