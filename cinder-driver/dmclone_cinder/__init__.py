"""Cinder volume driver for node-local storage on dmclone agents."""

# Before anything of this package imports grpc: under eventlet, grpcio
# must be imported with native threading (see grpc_import).
from dmclone_cinder import grpc_import

grpc_import.import_grpc()
