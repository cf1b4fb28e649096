# Tests run on the grpc I/O engine the sesame command runs on (sesame._grpcio): chosen
# here, before any test module or fixture imports grpc.  SESAME_GRPC_IO=event-engine runs
# the suite on grpcio's own default instead.
from sesame._grpcio import choose_grpc_io

choose_grpc_io()
