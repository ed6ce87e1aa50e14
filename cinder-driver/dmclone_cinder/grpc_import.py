#    Licensed under the Apache License, Version 2.0 (the "License"); you may
#    not use this file except in compliance with the License. You may obtain
#    a copy of the License at
#
#         http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS, WITHOUT
#    WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the
#    License for the specific language governing permissions and limitations
#    under the License.

"""grpcio, imported so that its Python layer takes native locks.

cinder-volume monkey patches the threading modules with eventlet before it
loads a driver, so a grpcio imported afterwards builds its locks and
conditions (per call, per channel, and one that every call takes when it
ends) from green primitives. The client runs every call in eventlet's
native thread pool (tpool), so those green primitives are taken by native
threads; when one of them is contended, eventlet parks the waiter on the
hub of one thread and wakes it from another, which it refuses ("Cannot
switch to a different thread"), and the waiting call never returns.

Imported while the original threading modules stand in sys.modules,
grpcio's Python layer gets native locks, which native threads share as
they should; the green side of the process only ever meets grpcio through
tpool.execute. Modules the rest of the process shares (logging, asyncio,
concurrent.futures) are imported first, green as everyone else expects.
"""

import importlib
import sys

# What eventlet's monkey patching replaces that grpcio's Python layer uses.
_PATCHED = ('_thread', 'threading', 'queue', 'time')
# Imported before the swap so that they stay the process's green ones.
_SHARED = ('logging', 'asyncio', 'concurrent.futures')
# grpcio imports most of its own modules lazily, inside functions: each
# one a call path of the client reaches is imported here, natively.
_GRPC_MODULES = (
    'grpc',
    'grpc._common',
    'grpc._channel',
    'grpc._interceptor',
    'grpc._observability',
    'grpc._plugin_wrapping',
    'grpc._utilities',
    'grpc.experimental',
)


def _threads_are_green():
    if 'eventlet' not in sys.modules:
        return False
    from eventlet import patcher

    return patcher.is_monkey_patched('thread')


def _import_all():
    for name in _GRPC_MODULES:
        importlib.import_module(name)
    return sys.modules['grpc']


def import_grpc():
    """The grpc package; native underneath when this process is green.

    A grpc that something imported earlier is returned as it is:
    uses_native_locks then tells whether it is safe to share across
    native threads.
    """
    if 'grpc' in sys.modules or not _threads_are_green():
        return _import_all()
    from eventlet import patcher

    for name in _SHARED:
        importlib.import_module(name)
    saved = patcher.SysModulesSaver(_PATCHED)
    try:
        for name in _PATCHED:
            sys.modules[name] = patcher.original(name)
        return _import_all()
    finally:
        saved.restore()


def uses_native_locks():
    """True when grpcio's call-end lock is a native lock.

    grpc._observability's lock is taken at the end of every call, by
    whichever thread ran the call: the one lock all threads contend for.
    """
    from grpc import _observability

    if not _threads_are_green():
        return True
    from eventlet import patcher

    return _observability.threading is patcher.original('threading')
