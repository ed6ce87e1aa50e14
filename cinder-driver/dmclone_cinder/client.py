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

"""gRPC client of the dmclone agents.

Only blocking unary calls, each with a deadline. How they run depends on
the process's threading model:

* Under eventlet monkey patching, a grpcio call would block the hub for
  the whole call. Every call therefore runs in eventlet's native thread
  pool (tpool.execute) on a channel that is created and used only by that
  native thread; grpcio itself is imported with native threading
  (grpc_import), so the locks it takes there are native ones.
* With native threads (OS_CINDER_DISABLE_EVENTLET_PATCHING) one channel
  per agent is shared by all threads, as grpcio intends.

Every gRPC status is turned into a Cinder exception in translate_error and
nowhere else. A refusal (FAILED_PRECONDITION) names its reason in a
google.rpc.ErrorInfo (see proto/dmclone/v1/common.proto); the driver
decides on that reason, never on the message.
"""

import collections
import dataclasses
import random
import sys
import threading
import time

from cinder import exception
from cinder.i18n import _
from google.protobuf import message as protobuf_message
from google.rpc import error_details_pb2
from google.rpc import status_pb2
import grpc
from oslo_context import context as oslo_context
from oslo_log import log as logging

from dmclone_cinder import grpc_import
from dmclone_cinder._proto.dmclone.v1 import node_pb2
from dmclone_cinder._proto.dmclone.v1 import node_pb2_grpc
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2_grpc
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2_grpc
from dmclone_cinder._proto.dmclone.v1 import volume_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2_grpc

LOG = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = 'x-request-id'
USER_AGENT = 'dmclone-cinder'

STUB_CLASSES = {
    'Node': node_pb2_grpc.NodeStub,
    'Volumes': volume_pb2_grpc.VolumesStub,
    'Snapshots': snapshot_pb2_grpc.SnapshotsStub,
    'Transfers': transfer_pb2_grpc.TransfersStub,
}

ACTIVE_TRANSFER_STATES = frozenset(
    {
        transfer_pb2.TRANSFER_STATE_CONNECTING,
        transfer_pb2.TRANSFER_STATE_DEFERRED,
        transfer_pb2.TRANSFER_STATE_HYDRATING,
        transfer_pb2.TRANSFER_STATE_PAUSED,
        transfer_pb2.TRANSFER_STATE_FINALIZING,
        transfer_pb2.TRANSFER_STATE_DEGRADED,
    }
)


class AgentNotFound(exception.NotFound):
    message = _('Agent %(agent)s has no %(subject)s: %(detail)s')


class AgentUnavailable(exception.VolumeBackendAPIException):
    """The agent could not be reached or did not answer in time."""


# Calls whose "in use" refusal Cinder's managers catch (VolumeIsBusy,
# SnapshotIsBusy) to put the resource back to available instead of error.
_BUSY_VOLUME_RPCS = frozenset({'DeleteVolume', 'UnpublishVolume'})
_BUSY_SNAPSHOT_RPCS = frozenset({'DeleteSnapshot'})

# The ErrorInfo domain and the refusal reasons that mean "in use or on its
# way somewhere: retry once that is over". Every other reason (quarantined,
# half-created, wrong transfer state, ...) needs someone to act: the
# resource goes to error instead.
ERROR_DOMAIN = 'dmclone.v1'
BUSY_REASONS = frozenset(
    {
        'VOLUME_PUBLISHED',
        'VOLUME_HAS_SNAPSHOTS',
        'VOLUME_EXPORTED',
        'VOLUME_ARRIVING',
        'VOLUME_IN_USE',
        'DEVICE_IN_USE',
        'NVME_NAMESPACE_IN_USE',
        'SNAPSHOT_PENDING',
    }
)
STATUS_DETAILS_KEY = 'grpc-status-details-bin'

# Calls repeated when the agent is UNAVAILABLE: a repetition cannot do
# more than the first call did, whether or not that one reached the agent.
# UNAVAILABLE may come after the agent got the request (a connection cut
# mid-call), so nothing else may be repeated.
REPEATABLE_RPCS = frozenset(
    {
        # Reads.
        'GetNodeInfo',
        'GetVolume',
        'ListVolumes',
        'GetSnapshot',
        'ListSnapshots',
        'GetTransfer',
        'ListTransfers',
        # volume.proto: "Every mutating call is idempotent on its id";
        # CreateVolume with the same id and size returns the volume,
        # DeleteVolume of an absent volume succeeds, ExtendVolume takes
        # the absolute size.
        'CreateVolume',
        'DeleteVolume',
        'ExtendVolume',
        'PublishVolume',
        'UnpublishVolume',
        # Removals: a repetition finds the object gone, which this client
        # counts as done (NOT_FOUND is success for them, see _call).
        'DeleteSnapshot',
        'UnexportVolume',
        'AbortTransfer',
    }
)
# Not repeated, because the API does not promise their repetition is
# harmless: CreateSnapshot, RevertVolume, ExportVolume, StartTransfer,
# CommitTransfer, ReleaseVolume, Pause/Resume/ThrottleTransfer,
# MarkCheckpoint.


def _green_sleep(seconds):
    # Looked up at call time: under eventlet time.sleep is the patched,
    # green one, so a waiting call parks its green thread only.
    time.sleep(seconds)


def _monotonic():
    return time.monotonic()


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for REPEATABLE_RPCS on UNAVAILABLE.

    The n-th wait is drawn from the upper half of
    min(first_delay * 2**n, max_delay). No attempt starts once a wait
    would end more than total_seconds after the first attempt began, so
    a call takes at most total_seconds plus one call deadline. 0 turns
    retries off.
    """

    total_seconds: float
    first_delay: float = 0.5
    max_delay: float = 8.0
    sleep: object = _green_sleep
    clock: object = _monotonic
    uniform: object = random.uniform  # noqa: S311 - jitter, not secrets

    def delay(self, attempt):
        step = min(self.first_delay * (2**attempt), self.max_delay)
        return self.uniform(step / 2, step)


NO_RETRY = RetryPolicy(total_seconds=0.0)


class Deadline:
    """One point in time shared by several calls (a stats poll)."""

    def __init__(self, seconds, clock=_monotonic):
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self):
        return max(0.0, self._end - self._clock())


class _DeadlinePassed(grpc.RpcError):
    """A call that could not start before its deadline, as grpc says it."""

    def __init__(self, details):
        super().__init__(details)
        self._details = details

    def code(self):
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self):
        return self._details

    def trailing_metadata(self):
        return ()


Refusal = collections.namedtuple('Refusal', 'reason metadata')


def refusal_of(error):
    """The agent's Refusal(reason, metadata) carried by a failed call.

    It travels as a google.rpc.Status with an ErrorInfo in the
    grpc-status-details-bin trailer. None when the status has none (other
    codes, or an agent older than refusal reasons).
    """
    trailing = getattr(error, 'trailing_metadata', None)
    for key, value in (trailing() if trailing else None) or ():
        if key != STATUS_DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except protobuf_message.DecodeError:
            LOG.warning('undecodable %s trailer ignored', STATUS_DETAILS_KEY)
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return Refusal(info.reason, dict(info.metadata))
    return None


def translate_error(agent, rpc, subject, error):
    """The Cinder exception for a failed agent call.

    The exception's refusal_reason is the agent's reason code for a
    refusal, None otherwise.
    """
    code = error.code()
    refusal = None
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        refusal = refusal_of(error)
    translated = _translate(agent, rpc, subject, error, code, refusal)
    translated.refusal_reason = refusal.reason if refusal else None
    return translated


def _translate(agent, rpc, subject, error, code, refusal):
    detail = error.details() or code.name
    where = f'agent {agent} {rpc}({subject})'
    if code == grpc.StatusCode.NOT_FOUND:
        return AgentNotFound(agent=agent, subject=subject, detail=detail)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        return AgentUnavailable(data=f'{where}: {code.name}: {detail}')
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return exception.NotSupportedOperation(
            operation=f'{rpc}: agent {agent} does not implement it ({detail})'
        )
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return _precondition_error(where, rpc, subject, detail, refusal)
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
    ):
        return exception.InvalidInput(reason=f'{where}: {detail}')
    # RESOURCE_EXHAUSTED lands here on purpose: VolumeBackendAPIException
    # makes the create flow reschedule to another pool.
    return exception.VolumeBackendAPIException(
        data=f'{where}: {code.name}: {detail}'
    )


def _precondition_error(where, rpc, subject, detail, refusal):
    if refusal is None:
        # An agent before refusal reasons: every refusal of these calls
        # counts as "in use", as it did then.
        message = f'{where}: {detail}'
        busy = True
    else:
        message = f'{where}: {refusal.reason}: {detail}'
        busy = refusal.reason in BUSY_REASONS
    if busy and rpc in _BUSY_VOLUME_RPCS:
        return exception.VolumeIsBusy(message=message, volume_name=subject)
    if busy and rpc in _BUSY_SNAPSHOT_RPCS:
        return exception.SnapshotIsBusy(message=message, snapshot_name=subject)
    return exception.InvalidVolume(reason=message)


def current_request_id():
    """The request id of the Cinder request this green/native thread runs.

    cinder's RequestContext stores itself as the thread's current context
    when the RPC layer rebuilds it, so the driver methods that get no
    context argument still find it here.
    """
    context = oslo_context.get_current()
    return getattr(context, 'request_id', None)


def _call_metadata():
    request_id = current_request_id()
    if not request_id:
        return ()
    return ((REQUEST_ID_METADATA_KEY, request_id),)


class _Connection:
    """A channel and its stubs; used by one thread, or shared (threads)."""

    def __init__(self, endpoint, tls):
        credentials = grpc.ssl_channel_credentials(
            root_certificates=tls.ca,
            private_key=tls.key,
            certificate_chain=tls.cert,
        )
        self.channel = grpc.secure_channel(
            endpoint,
            credentials,
            options=[('grpc.primary_user_agent', USER_AGENT)],
        )
        self._stubs = {}

    def stub(self, service):
        if service not in self._stubs:
            self._stubs[service] = STUB_CLASSES[service](self.channel)
        return self._stubs[service]


class Transport:
    """Runs unary calls with a deadline, a concurrency cap and metadata."""

    def __init__(
        self, tls, timeout, max_concurrent_calls, method_timeouts=None
    ):
        self._tls = tls
        self._timeout = timeout
        # Calls that wait inside the agent (StartTransfer waits for the
        # source's NVMe namespace) need a deadline beyond that wait, or we
        # give up while the agent still works on them.
        self._method_timeouts = dict(method_timeouts or {})
        # Created after monkey patching, so under eventlet this is a green
        # semaphore: waiting for a slot parks a green thread, not the hub.
        self._slots = threading.BoundedSemaphore(max_concurrent_calls)

    def timeout_of(self, method):
        """The deadline in seconds of one call of method."""
        return self._method_timeouts.get(method, self._timeout)

    def unary(self, endpoint, service, method, request, deadline=None):
        """The call's answer; with a deadline, it ends by that deadline."""
        call = (endpoint, service, method, request, _call_metadata())
        if deadline is None:
            with self._slots:
                return self._run(self._invoke, *call, self.timeout_of(method))
        if not self._slots.acquire(timeout=deadline.remaining()):
            raise _DeadlinePassed('no free call slot before the deadline')
        try:
            timeout = min(self.timeout_of(method), deadline.remaining())
            if timeout <= 0:
                raise _DeadlinePassed('the deadline passed before the call')
            return self._run(self._invoke, *call, timeout)
        finally:
            self._slots.release()

    def _invoke(self, endpoint, service, method, request, metadata, timeout):
        stub = self._connection(endpoint).stub(service)
        return getattr(stub, method)(
            request, timeout=timeout, metadata=metadata
        )

    def _run(self, function, *args):
        raise NotImplementedError

    def _connection(self, endpoint):
        raise NotImplementedError


class SharedChannelTransport(Transport):
    """Native threads: one channel per agent, shared by every thread."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._connections = {}
        self._lock = threading.Lock()

    def _run(self, function, *args):
        return function(*args)

    def _connection(self, endpoint):
        with self._lock:
            if endpoint not in self._connections:
                self._connections[endpoint] = _Connection(endpoint, self._tls)
            return self._connections[endpoint]


class PerThreadChannelTransport(Transport):
    """Eventlet: each call runs in a tpool thread on that thread's channel.

    The thread-local comes from the original (unpatched) threading module,
    so it is keyed by the native tpool thread, not by a green thread.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from eventlet import patcher
        from eventlet import tpool

        self._execute = tpool.execute
        native_threading = patcher.original('threading')
        self._native_local = native_threading.local()
        self._one_at_a_time = None
        if not grpc_import.uses_native_locks():
            # Something imported grpc before this package: its locks are
            # green, and only calls that never overlap are safe in tpool.
            LOG.warning(
                'grpc was imported after eventlet patching, before the '
                'dmclone driver; agent calls run one at a time. Load '
                'dmclone_cinder before other users of grpc to run them '
                'in parallel.'
            )
            self._one_at_a_time = native_threading.Lock()

    def _run(self, function, *args):
        if self._one_at_a_time is None:
            return self._execute(function, *args)
        return self._execute(self._serialized, function, *args)

    def _serialized(self, function, *args):
        with self._one_at_a_time:
            return function(*args)

    def _connection(self, endpoint):
        connections = self._native_local.__dict__.setdefault('by_endpoint', {})
        if endpoint not in connections:
            connections[endpoint] = _Connection(endpoint, self._tls)
        return connections[endpoint]


def eventlet_patched():
    """True when eventlet has monkey patched threads in this process."""
    if 'eventlet' not in sys.modules:
        return False
    from eventlet import patcher

    return patcher.is_monkey_patched('thread')


def make_transport(tls, timeout, max_concurrent_calls, method_timeouts=None):
    """The transport for this process's threading model.

    timeout is the deadline of every call, method_timeouts overrides it
    per RPC method name.
    """
    if eventlet_patched():
        cls = PerThreadChannelTransport
    else:
        cls = SharedChannelTransport
    LOG.debug('dmclone agent calls use %s', cls.__name__)
    return cls(tls, timeout, max_concurrent_calls, method_timeouts)


class AgentClient:
    """The dmclone.v1 API of one agent, in Cinder terms."""

    def __init__(self, name, endpoint, transport, retry=NO_RETRY):
        self.name = name
        self.endpoint = endpoint
        self._transport = transport
        self._retry = retry

    # Node
    def get_node_info(self, deadline=None):
        return self._call(
            'Node',
            'GetNodeInfo',
            node_pb2.GetNodeInfoRequest(),
            'node info',
            deadline=deadline,
        )

    # Volumes
    def create_volume(
        self, volume_id, size_bytes, source_snapshot_id='', source_volume_id=''
    ):
        request = volume_pb2.CreateVolumeRequest(
            volume_id=volume_id,
            size_bytes=size_bytes,
            source_snapshot_id=source_snapshot_id,
            source_volume_id=source_volume_id,
        )
        return self._call('Volumes', 'CreateVolume', request, volume_id)

    def delete_volume(self, volume_id):
        request = volume_pb2.DeleteVolumeRequest(volume_id=volume_id)
        self._call('Volumes', 'DeleteVolume', request, volume_id, True)

    def extend_volume(self, volume_id, new_size_bytes):
        request = volume_pb2.ExtendVolumeRequest(
            volume_id=volume_id, new_size_bytes=new_size_bytes
        )
        return self._call('Volumes', 'ExtendVolume', request, volume_id)

    def get_volume(self, volume_id):
        request = volume_pb2.GetVolumeRequest(volume_id=volume_id)
        return self._call('Volumes', 'GetVolume', request, volume_id)

    def list_volumes(self, deadline=None):
        request = volume_pb2.ListVolumesRequest()
        reply = self._call(
            'Volumes', 'ListVolumes', request, 'volume list', deadline=deadline
        )
        return list(reply.volumes)

    def publish_volume(self, volume_id):
        request = volume_pb2.PublishVolumeRequest(volume_id=volume_id)
        reply = self._call('Volumes', 'PublishVolume', request, volume_id)
        return reply.device_path

    def unpublish_volume(self, volume_id):
        request = volume_pb2.UnpublishVolumeRequest(volume_id=volume_id)
        self._call('Volumes', 'UnpublishVolume', request, volume_id, True)

    # Snapshots
    def create_snapshot(self, snapshot_id, volume_id):
        request = snapshot_pb2.CreateSnapshotRequest(
            snapshot_id=snapshot_id, volume_id=volume_id
        )
        return self._call('Snapshots', 'CreateSnapshot', request, snapshot_id)

    def delete_snapshot(self, snapshot_id):
        request = snapshot_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id)
        self._call('Snapshots', 'DeleteSnapshot', request, snapshot_id, True)

    def get_snapshot(self, snapshot_id):
        request = snapshot_pb2.GetSnapshotRequest(snapshot_id=snapshot_id)
        return self._call('Snapshots', 'GetSnapshot', request, snapshot_id)

    def list_snapshots(self, deadline=None):
        request = snapshot_pb2.ListSnapshotsRequest()
        reply = self._call(
            'Snapshots',
            'ListSnapshots',
            request,
            'snapshot list',
            deadline=deadline,
        )
        return list(reply.snapshots)

    def revert_volume(self, volume_id, snapshot_id):
        request = snapshot_pb2.RevertVolumeRequest(
            volume_id=volume_id, snapshot_id=snapshot_id
        )
        self._call('Snapshots', 'RevertVolume', request, volume_id)

    # Transfers
    def export_volume(self, volume_id, host_nqn, for_transfer=False):
        """Export to one host; a move's export carries a release token."""
        request = transfer_pb2.ExportVolumeRequest(
            volume_id=volume_id, host_nqn=host_nqn, for_transfer=for_transfer
        )
        return self._call('Transfers', 'ExportVolume', request, volume_id)

    def unexport_volume(self, volume_id, release_token='', force=False):
        """Withdraw an export; a move's needs its token or force."""
        request = transfer_pb2.UnexportVolumeRequest(
            volume_id=volume_id, release_token=release_token, force=force
        )
        self._call('Transfers', 'UnexportVolume', request, volume_id, True)

    def start_transfer(
        self, transfer_id, volume_id, size_bytes, source, deferred, knobs
    ):
        request = transfer_pb2.StartTransferRequest(
            transfer_id=transfer_id,
            volume_id=volume_id,
            size_bytes=size_bytes,
            nvme_tcp=source,
            deferred=deferred,
            knobs=knobs,
            # The volume's snapshots follow it; the driver finds each where
            # it is available (Snapshot.provider_location follows).
            leave_snapshots=False,
        )
        return self._call('Transfers', 'StartTransfer', request, volume_id)

    def commit_transfer(self, transfer_id):
        request = transfer_pb2.TransferRef(transfer_id=transfer_id)
        return self._call('Transfers', 'CommitTransfer', request, transfer_id)

    def abort_transfer(self, transfer_id):
        """Tear the destination down; never drops what it wrote (refused
        with DESTINATION_WRITTEN for a deferred one that was written)."""
        request = transfer_pb2.AbortTransferRequest(transfer_id=transfer_id)
        self._call('Transfers', 'AbortTransfer', request, transfer_id, True)

    def list_transfers(self, volume_id='', states=()):
        """Every transfer the filters admit, following the agent's pages."""
        request = transfer_pb2.ListTransfersRequest(
            volume_id=volume_id, states=sorted(states)
        )
        transfers = []
        while True:
            reply = self._call(
                'Transfers', 'ListTransfers', request, volume_id or 'transfers'
            )
            transfers.extend(reply.transfers)
            if not reply.next_page_token:
                return transfers
            request.page_token = reply.next_page_token

    def active_transfers_of(self, volume_id):
        """This agent's unfinished transfers that bring volume_id here."""
        # The agent filters; checking again keeps an older agent, which
        # ignores the filters, from answering with every transfer.
        return [
            transfer
            for transfer in self.list_transfers(
                volume_id, ACTIVE_TRANSFER_STATES
            )
            if transfer.volume_id == volume_id
            and transfer.state in ACTIVE_TRANSFER_STATES
        ]

    def _call(
        self,
        service,
        method,
        request,
        subject,
        missing_ok=False,
        deadline=None,
    ):
        LOG.debug(
            'dmclone agent %(agent)s: %(method)s(%(subject)s)',
            {'agent': self.name, 'method': method, 'subject': subject},
        )
        started = self._retry.clock()
        attempt = 0
        while True:
            try:
                if deadline is None:
                    return self._transport.unary(
                        self.endpoint, service, method, request
                    )
                return self._transport.unary(
                    self.endpoint, service, method, request, deadline
                )
            except grpc.RpcError as error:
                if missing_ok and error.code() == grpc.StatusCode.NOT_FOUND:
                    LOG.debug(
                        'dmclone agent %(agent)s: %(subject)s already gone',
                        {'agent': self.name, 'subject': subject},
                    )
                    return None
                wait = self._retry_wait(
                    method, error, attempt, started, deadline
                )
                if wait is None:
                    raise translate_error(
                        self.name, method, subject, error
                    ) from None
                detail = error.details()
            attempt += 1
            LOG.warning(
                'dmclone agent %(agent)s unavailable for %(method)s'
                '(%(subject)s): %(detail)s; attempt %(attempt)d in '
                '%(wait).1f s',
                {
                    'agent': self.name,
                    'method': method,
                    'subject': subject,
                    'detail': detail,
                    'attempt': attempt + 1,
                    'wait': wait,
                },
            )
            self._retry.sleep(wait)

    def _retry_wait(self, method, error, attempt, started, deadline):
        """Seconds to wait before repeating the call, None to give up."""
        if method not in REPEATABLE_RPCS:
            return None
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            return None
        wait = self._retry.delay(attempt)
        elapsed = self._retry.clock() - started
        if elapsed + wait > self._retry.total_seconds:
            return None
        if deadline is not None and wait >= deadline.remaining():
            return None
        return wait


class Agents:
    """The agents of one backend, by nova host name (= pool name)."""

    def __init__(self, endpoints, transport, retry=NO_RETRY):
        self._clients = {
            host: AgentClient(host, endpoint, transport, retry)
            for host, endpoint in endpoints.items()
        }

    def __contains__(self, host):
        return host in self._clients

    def __getitem__(self, host):
        try:
            return self._clients[host]
        except KeyError:
            raise exception.VolumeBackendAPIException(
                data=_(
                    'no dmclone agent is configured for host %(host)r '
                    '(dmclone_agents has %(known)s)'
                )
                % {'host': host, 'known': ', '.join(sorted(self._clients))}
            ) from None

    def items(self):
        return sorted(self._clients.items())
