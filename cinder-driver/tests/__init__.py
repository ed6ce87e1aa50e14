"""Tests of the dmclone Cinder driver.

Importing cinder.tests.unit monkey patches this process with eventlet, as
cinder-volume does by default, before any test module imports grpc.
"""

import warnings

# eventlet announces its own deprecation when cinder imports it.
warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')

import cinder.tests.unit  # noqa: E402,F401

# As cinder-volume does: the driver's package is loaded before any test
# module imports grpc, so grpcio is imported with native threading.
import dmclone_cinder  # noqa: E402,F401
