"""Unit tests of the gRPC client: error map, requests, transports."""

import threading
from unittest import mock

from cinder import context
from cinder import exception
from eventlet import tpool
from google.protobuf import any_pb2
from google.rpc import code_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2
import grpc

from dmclone_cinder import client
from dmclone_cinder import options
from dmclone_cinder._proto.dmclone.v1 import node_pb2
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2
from tests import base

TLS = options.TlsMaterial(ca=b'ca', cert=b'cert', key=b'key')
Code = grpc.StatusCode


class FakeRpcError(grpc.RpcError):
    """What a failed blocking call raises: an RpcError that is a Call."""

    def __init__(self, code, details='agent detail', trailing=()):
        super().__init__(details)
        self._code = code
        self._details = details
        self._trailing = trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def status_trailer(reason, domain='dmclone.v1', **metadata):
    """The grpc-status-details-bin trailer of a refusal, as the agent
    (tonic-types) encodes it: a google.rpc.Status with one ErrorInfo."""
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.ErrorInfo(
            reason=reason, domain=domain, metadata=metadata
        )
    )
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message='refused',
        details=[detail],
    )
    return (
        ('content-type', 'application/grpc'),
        ('grpc-status-details-bin', status.SerializeToString()),
    )


def refused(reason, rpc, **metadata):
    error = FakeRpcError(
        Code.FAILED_PRECONDITION,
        f'the {reason} message',
        status_trailer(reason, **metadata),
    )
    return client.translate_error('hv1', rpc, 'vol-1', error)


def translated(code, rpc='CreateVolume', details='agent detail'):
    return client.translate_error(
        'hv1', rpc, 'vol-1', FakeRpcError(code, details)
    )


class TranslateErrorTestCase(base.TestCase):
    def test_not_found_is_agent_not_found(self):
        error = translated(Code.NOT_FOUND)
        self.assertIsInstance(error, client.AgentNotFound)
        self.assertIsInstance(error, exception.NotFound)

    def test_unreachable_and_timeouts_are_agent_unavailable(self):
        for code in (Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED):
            with self.subTest(code=code):
                error = translated(code)
                self.assertIsInstance(error, client.AgentUnavailable)
                self.assertIsInstance(
                    error, exception.VolumeBackendAPIException
                )

    def test_unimplemented_is_not_supported_with_the_agent_message(self):
        error = translated(
            Code.UNIMPLEMENTED, 'StartTransfer', 'transfers come later'
        )
        self.assertIsInstance(error, exception.NotSupportedOperation)
        self.assertIn('StartTransfer', str(error))
        self.assertIn('transfers come later', str(error))
        self.assertIn('hv1', str(error))

    def test_resource_exhausted_is_a_backend_error_to_reschedule(self):
        error = translated(Code.RESOURCE_EXHAUSTED)
        self.assertIs(type(error), exception.VolumeBackendAPIException)

    def test_failed_precondition_of_deletes_is_busy(self):
        for rpc in ('DeleteVolume', 'UnpublishVolume'):
            with self.subTest(rpc=rpc):
                error = translated(Code.FAILED_PRECONDITION, rpc, 'in use')
                self.assertIsInstance(error, exception.VolumeIsBusy)
                self.assertIn('in use', str(error))
        error = translated(Code.FAILED_PRECONDITION, 'DeleteSnapshot')
        self.assertIsInstance(error, exception.SnapshotIsBusy)

    def test_failed_precondition_elsewhere_is_invalid_volume(self):
        for rpc in ('ExtendVolume', 'ExportVolume', 'CreateSnapshot'):
            with self.subTest(rpc=rpc):
                error = translated(Code.FAILED_PRECONDITION, rpc, 'hydrating')
                self.assertIsInstance(error, exception.InvalidVolume)
                self.assertIn('hydrating', str(error))

    def test_without_a_reason_failed_precondition_has_none(self):
        error = translated(Code.FAILED_PRECONDITION, 'DeleteVolume')
        self.assertIsNone(error.refusal_reason)
        self.assertIsNone(translated(Code.INTERNAL).refusal_reason)

    def test_refusal_of_reads_the_error_info(self):
        error = FakeRpcError(
            Code.FAILED_PRECONDITION,
            trailing=status_trailer(
                'VOLUME_ARRIVING', volume_id='v', transfer_id='t'
            ),
        )
        self.assertEqual(
            client.Refusal(
                'VOLUME_ARRIVING', {'volume_id': 'v', 'transfer_id': 't'}
            ),
            client.refusal_of(error),
        )

    def test_refusal_of_ignores_other_domains_and_garbage(self):
        cases = {
            'another domain': status_trailer('X', domain='example.com'),
            'undecodable': (('grpc-status-details-bin', b'\xff\xff'),),
            'no trailer': (),
            'no trailers at all': None,
        }
        for name, trailing in cases.items():
            with self.subTest(name):
                error = FakeRpcError(Code.FAILED_PRECONDITION, 'x', trailing)
                self.assertIsNone(client.refusal_of(error))
        self.assertIsNone(client.refusal_of(grpc.RpcError()))

    def test_in_use_reasons_make_deletes_busy(self):
        for reason in sorted(client.BUSY_REASONS):
            for rpc in ('DeleteVolume', 'UnpublishVolume'):
                with self.subTest(reason=reason, rpc=rpc):
                    error = refused(reason, rpc, volume_id='vol-1')
                    self.assertIsInstance(error, exception.VolumeIsBusy)
                    self.assertEqual(reason, error.refusal_reason)
                    self.assertIn(reason, str(error))
                    self.assertIn(f'the {reason} message', str(error))
            with self.subTest(reason=reason, rpc='DeleteSnapshot'):
                error = refused(reason, 'DeleteSnapshot')
                self.assertIsInstance(error, exception.SnapshotIsBusy)

    def test_other_reasons_make_deletes_fail(self):
        for reason in (
            'VOLUME_QUARANTINED',
            'VOLUME_BEING_CREATED',
            'TRANSFER_WRONG_STATE',
            'A_REASON_OF_A_NEWER_AGENT',
        ):
            for rpc in ('DeleteVolume', 'UnpublishVolume', 'DeleteSnapshot'):
                with self.subTest(reason=reason, rpc=rpc):
                    error = refused(reason, rpc)
                    self.assertIs(type(error), exception.InvalidVolume)
                    self.assertEqual(reason, error.refusal_reason)
                    self.assertIn(reason, str(error))

    def test_refusals_of_other_calls_stay_invalid_volume(self):
        for reason in (
            'VOLUME_ARRIVING',
            'VOLUME_PUBLISHED',
            'ERA_BEFORE_HISTORY',
        ):
            for rpc in ('ExportVolume', 'CreateSnapshot', 'MarkCheckpoint'):
                with self.subTest(reason=reason, rpc=rpc):
                    error = refused(reason, rpc)
                    self.assertIs(type(error), exception.InvalidVolume)
                    self.assertEqual(reason, error.refusal_reason)

    def test_bad_arguments_are_invalid_input(self):
        for code in (Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE):
            with self.subTest(code=code):
                self.assertIsInstance(translated(code), exception.InvalidInput)

    def test_everything_else_is_a_backend_error(self):
        for code in (
            Code.ALREADY_EXISTS,
            Code.INTERNAL,
            Code.UNKNOWN,
            Code.ABORTED,
            Code.CANCELLED,
            Code.DATA_LOSS,
            Code.PERMISSION_DENIED,
            Code.UNAUTHENTICATED,
        ):
            with self.subTest(code=code):
                error = translated(code)
                self.assertIs(type(error), exception.VolumeBackendAPIException)
                self.assertIn(code.name, str(error))

    def test_every_status_code_maps_to_a_cinder_exception_with_detail(self):
        for code in Code:
            if code == Code.OK:
                continue
            with self.subTest(code=code):
                error = translated(code, details=f'detail of {code.name}')
                self.assertIsInstance(error, exception.CinderException)
                self.assertIn(f'detail of {code.name}', str(error))

    def test_empty_details_fall_back_to_the_code_name(self):
        error = translated(Code.INTERNAL, details='')
        self.assertIn('INTERNAL', str(error))


class AgentClientTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.transport = mock.Mock(spec=client.Transport)
        self.agent = client.AgentClient('hv1', 'hv1:7443', self.transport)

    def _sent(self):
        (endpoint, service, method, request), _ = (
            self.transport.unary.call_args
        )
        self.assertEqual('hv1:7443', endpoint)
        return service, method, request

    def test_requests_go_to_the_right_service_and_method(self):
        cases = [
            (
                lambda a: a.get_node_info(),
                ('Node', 'GetNodeInfo', node_pb2.GetNodeInfoRequest()),
            ),
            (
                lambda a: a.create_volume('v', 5, source_snapshot_id='s'),
                (
                    'Volumes',
                    'CreateVolume',
                    volume_pb2.CreateVolumeRequest(
                        volume_id='v', size_bytes=5, source_snapshot_id='s'
                    ),
                ),
            ),
            (
                lambda a: a.extend_volume('v', 9),
                (
                    'Volumes',
                    'ExtendVolume',
                    volume_pb2.ExtendVolumeRequest(
                        volume_id='v', new_size_bytes=9
                    ),
                ),
            ),
            (
                lambda a: a.revert_volume('v', 's'),
                (
                    'Snapshots',
                    'RevertVolume',
                    snapshot_pb2.RevertVolumeRequest(
                        volume_id='v', snapshot_id='s'
                    ),
                ),
            ),
            (
                lambda a: a.export_volume('v', 'nqn'),
                (
                    'Transfers',
                    'ExportVolume',
                    transfer_pb2.ExportVolumeRequest(
                        volume_id='v', host_nqn='nqn'
                    ),
                ),
            ),
            (
                lambda a: a.commit_transfer('t'),
                (
                    'Transfers',
                    'CommitTransfer',
                    transfer_pb2.TransferRef(transfer_id='t'),
                ),
            ),
        ]
        for call, expected in cases:
            with self.subTest(expected=expected[1]):
                call(self.agent)
                self.assertEqual(expected, self._sent())

    def test_start_transfer_request(self):
        source = transfer_pb2.NvmeTcpSource(subsystem_nqn='nqn.src')
        knobs = transfer_pb2.HydrationKnobs(region_bytes=4096)
        self.agent.start_transfer(
            transfer_id='t',
            volume_id='v',
            size_bytes=7,
            source=source,
            deferred=True,
            knobs=knobs,
        )
        self.assertEqual(
            (
                'Transfers',
                'StartTransfer',
                transfer_pb2.StartTransferRequest(
                    transfer_id='t',
                    volume_id='v',
                    size_bytes=7,
                    nvme_tcp=source,
                    deferred=True,
                    knobs=knobs,
                    leave_snapshots=False,
                ),
            ),
            self._sent(),
        )

    def test_publish_returns_the_device_path(self):
        self.transport.unary.return_value = volume_pb2.PublishVolumeResponse(
            device_path='/dev/mapper/dmclone-v'
        )
        self.assertEqual(
            '/dev/mapper/dmclone-v', self.agent.publish_volume('v')
        )

    def test_removals_of_missing_things_succeed(self):
        self.transport.unary.side_effect = FakeRpcError(Code.NOT_FOUND)
        removals = {
            'DeleteVolume': lambda: self.agent.delete_volume('v'),
            'UnpublishVolume': lambda: self.agent.unpublish_volume('v'),
            'DeleteSnapshot': lambda: self.agent.delete_snapshot('s'),
            'UnexportVolume': lambda: self.agent.unexport_volume('v'),
            'AbortTransfer': lambda: self.agent.abort_transfer('t'),
        }
        for method, remove in removals.items():
            with self.subTest(method=method):
                self.assertIsNone(remove())
                self.assertEqual(method, self._sent()[1])

    def test_missing_things_elsewhere_are_errors(self):
        self.transport.unary.side_effect = FakeRpcError(Code.NOT_FOUND)
        for call in (
            lambda: self.agent.get_volume('v'),
            lambda: self.agent.extend_volume('v', 1),
            lambda: self.agent.commit_transfer('t'),
        ):
            self.assertRaises(client.AgentNotFound, call)

    def test_removal_failing_otherwise_still_raises(self):
        self.transport.unary.side_effect = FakeRpcError(Code.UNAVAILABLE)
        self.assertRaises(
            client.AgentUnavailable, self.agent.delete_volume, 'v'
        )

    def test_active_transfers_of_a_volume(self):
        def t(tid, volume_id, state):
            return transfer_pb2.Transfer(
                transfer_id=tid, volume_id=volume_id, state=state
            )

        self.transport.unary.return_value = transfer_pb2.ListTransfersResponse(
            transfers=[
                t('1', 'v', transfer_pb2.TRANSFER_STATE_DEFERRED),
                t('2', 'v', transfer_pb2.TRANSFER_STATE_DONE),
                t('3', 'w', transfer_pb2.TRANSFER_STATE_HYDRATING),
                t('4', 'v', transfer_pb2.TRANSFER_STATE_ABORTED),
                t('5', 'v', transfer_pb2.TRANSFER_STATE_DEGRADED),
                t('6', 'v', transfer_pb2.TRANSFER_STATE_FAILED),
            ]
        )
        self.assertEqual(
            ['1', '5'],
            [x.transfer_id for x in self.agent.active_transfers_of('v')],
        )
        request = self.transport.unary.call_args[0][3]
        self.assertEqual('v', request.volume_id)
        self.assertEqual(
            sorted(client.ACTIVE_TRANSFER_STATES), list(request.states)
        )

    def test_listing_follows_every_page(self):
        pages = [
            transfer_pb2.ListTransfersResponse(
                transfers=[transfer_pb2.Transfer(transfer_id='1')],
                next_page_token='1',
            ),
            transfer_pb2.ListTransfersResponse(
                transfers=[transfer_pb2.Transfer(transfer_id='2')]
            ),
        ]
        tokens = []

        def answer(endpoint, service, method, request, *args):
            tokens.append(request.page_token)
            return pages[len(tokens) - 1]

        self.transport.unary.side_effect = answer
        listed = self.agent.list_transfers()
        self.assertEqual(['1', '2'], [t.transfer_id for t in listed])
        self.assertEqual(['', '1'], tokens)


class AgentsTestCase(base.TestCase):
    def test_unknown_host_names_the_known_ones(self):
        agents = client.Agents({'hv2': 'b:1', 'hv1': 'a:1'}, mock.Mock())
        self.assertIn('hv1', agents)
        self.assertNotIn('hv3', agents)
        self.assertEqual(['hv1', 'hv2'], [host for host, _ in agents.items()])
        error = self.assertRaises(
            exception.VolumeBackendAPIException, agents.__getitem__, 'hv3'
        )
        self.assertIn("'hv3'", str(error))
        self.assertIn('hv1, hv2', str(error))


class RequestIdTestCase(base.TestCase):
    def test_current_request_id_is_sent(self):
        request_context = context.RequestContext('user', 'project')
        request_context.update_store()
        self.assertEqual(
            ((client.REQUEST_ID_METADATA_KEY, request_context.request_id),),
            client._call_metadata(),
        )
        self.assertEqual('x-request-id', client.REQUEST_ID_METADATA_KEY)

    def test_no_context_no_metadata(self):
        self.mock_object(client.oslo_context, 'get_current', return_value=None)
        self.assertEqual((), client._call_metadata())


class TransportTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.secure_channel = self.mock_object(client.grpc, 'secure_channel')
        self.credentials = self.mock_object(
            client.grpc, 'ssl_channel_credentials'
        )

    def test_eventlet_process_gets_per_thread_channels(self):
        self.assertTrue(client.eventlet_patched())
        self.assertIsInstance(
            client.make_transport(TLS, 30, 4),
            client.PerThreadChannelTransport,
        )

    def test_native_threads_get_a_shared_channel(self):
        self.mock_object(client, 'eventlet_patched', return_value=False)
        self.assertIsInstance(
            client.make_transport(TLS, 30, 4), client.SharedChannelTransport
        )

    def test_mutual_tls_credentials_from_the_pem_files(self):
        transport = client.SharedChannelTransport(TLS, 30, 4)
        transport.unary('hv1:7443', 'Node', 'GetNodeInfo', 'request')
        self.credentials.assert_called_once_with(
            root_certificates=b'ca',
            private_key=b'key',
            certificate_chain=b'cert',
        )
        self.secure_channel.assert_called_once_with(
            'hv1:7443', self.credentials.return_value, options=mock.ANY
        )

    def test_call_has_deadline_and_request_id(self):
        request_context = context.RequestContext('user', 'project')
        request_context.update_store()
        transport = client.SharedChannelTransport(TLS, 12.5, 4)
        stub_class = mock.Mock()
        self.mock_object(client, 'STUB_CLASSES', {'Node': stub_class})

        transport.unary('hv1:7443', 'Node', 'GetNodeInfo', 'request')

        stub_class.return_value.GetNodeInfo.assert_called_once_with(
            'request',
            timeout=12.5,
            metadata=(('x-request-id', request_context.request_id),),
        )

    def test_calls_that_wait_in_the_agent_get_their_own_deadline(self):
        transport = client.SharedChannelTransport(
            TLS, 12.5, 4, method_timeouts={'StartTransfer': 90.0}
        )
        stub_class = mock.Mock()
        self.mock_object(client, 'STUB_CLASSES', {'Transfers': stub_class})

        transport.unary('hv1:7443', 'Transfers', 'StartTransfer', 'r')
        transport.unary('hv1:7443', 'Transfers', 'ExportVolume', 'r')

        _args, kwargs = stub_class.return_value.StartTransfer.call_args
        self.assertEqual(90.0, kwargs['timeout'])
        _args, kwargs = stub_class.return_value.ExportVolume.call_args
        self.assertEqual(12.5, kwargs['timeout'])

    def test_make_transport_passes_the_per_call_deadlines(self):
        transport = client.make_transport(
            TLS, 30, 4, method_timeouts={'StartTransfer': 90.0}
        )
        self.assertEqual(90.0, transport.timeout_of('StartTransfer'))
        self.assertEqual(30, transport.timeout_of('GetNodeInfo'))

    def test_a_deadline_shortens_the_call(self):
        transport = client.SharedChannelTransport(TLS, 12.5, 4)
        stub_class = mock.Mock()
        self.mock_object(client, 'STUB_CLASSES', {'Node': stub_class})
        now = [0.0]
        deadline = client.Deadline(3.0, clock=lambda: now[0])
        now[0] = 1.0

        transport.unary('hv1:7443', 'Node', 'GetNodeInfo', 'r', deadline)

        _args, kwargs = stub_class.return_value.GetNodeInfo.call_args
        self.assertEqual(2.0, kwargs['timeout'])

    def test_a_passed_deadline_fails_without_a_call(self):
        transport = client.SharedChannelTransport(TLS, 12.5, 4)
        stub_class = mock.Mock()
        self.mock_object(client, 'STUB_CLASSES', {'Node': stub_class})
        agent = client.AgentClient('hv1', 'hv1:7443', transport)
        deadline = client.Deadline(0.0)

        self.assertRaises(
            client.AgentUnavailable, agent.get_node_info, deadline=deadline
        )
        stub_class.return_value.GetNodeInfo.assert_not_called()

    def test_no_call_slot_before_the_deadline_fails(self):
        transport = client.SharedChannelTransport(TLS, 12.5, 1)
        self.mock_object(client, 'STUB_CLASSES', {'Node': mock.Mock()})
        agent = client.AgentClient('hv1', 'hv1:7443', transport)
        transport._slots.acquire()
        self.addCleanup(transport._slots.release)

        error = self.assertRaises(
            client.AgentUnavailable,
            agent.get_node_info,
            deadline=client.Deadline(0.2),
        )
        self.assertIn('slot', str(error))

    def test_retries_stop_at_the_deadline(self):
        transport = mock.Mock(spec=client.Transport)
        transport.unary.side_effect = FakeRpcError(Code.UNAVAILABLE)
        clock = FakeTime()
        retry = client.RetryPolicy(
            total_seconds=60.0,
            sleep=clock.sleep,
            clock=clock.monotonic,
            uniform=lambda low, high: high,
        )
        agent = client.AgentClient('hv1', 'hv1:7443', transport, retry)
        deadline = client.Deadline(2.0, clock=clock.monotonic)
        self.assertRaises(
            client.AgentUnavailable, agent.get_node_info, deadline=deadline
        )
        # 0.5 + 1.0; the next 2 s wait would end past the deadline.
        self.assertEqual([0.5, 1.0], clock.sleeps)

    def test_shared_transport_reuses_one_channel_per_endpoint(self):
        transport = client.SharedChannelTransport(TLS, 30, 4)
        for endpoint in ('hv1:1', 'hv1:1', 'hv2:1', 'hv1:1'):
            transport.unary(endpoint, 'Node', 'GetNodeInfo', 'request')
        self.assertEqual(
            ['hv1:1', 'hv2:1'],
            [c.args[0] for c in self.secure_channel.call_args_list],
        )

    def test_per_thread_transport_runs_calls_in_tpool(self):
        execute = self.mock_object(
            tpool, 'execute', side_effect=lambda f, *a: f(*a)
        )
        transport = client.PerThreadChannelTransport(TLS, 30, 4)
        transport.unary('hv1:1', 'Node', 'GetNodeInfo', 'request')
        execute.assert_called_once()

    def test_per_thread_transport_never_shares_a_channel_across_threads(self):
        transport = client.PerThreadChannelTransport(TLS, 30, 4)
        self.secure_channel.side_effect = lambda *a, **k: mock.Mock()

        def channel_here():
            connection = transport._connection('hv1:1')
            again = transport._connection('hv1:1')
            return connection.channel, again.channel

        first = tpool.execute(channel_here)
        # A second native thread: tpool may reuse the first, so use one of
        # our own, created through the unpatched threading module.
        from eventlet import patcher

        native = patcher.original('threading')
        seen = {}
        worker = native.Thread(target=lambda: seen.update(c=channel_here()))
        worker.start()
        while worker.is_alive():
            tpool.execute(worker.join, 0.05)
        self.assertIs(first[0], first[1])
        self.assertIsNot(first[0], seen['c'][0])

    def test_concurrency_cap(self):
        transport = client.SharedChannelTransport(TLS, 30, 2)
        in_flight = []
        peak = []
        release = threading.Event()

        def slow(*args, **kwargs):
            in_flight.append(1)
            peak.append(len(in_flight))
            release.wait()
            in_flight.pop()

        stub_class = mock.Mock()
        stub_class.return_value.GetNodeInfo.side_effect = slow
        self.mock_object(client, 'STUB_CLASSES', {'Node': stub_class})
        threads = [
            threading.Thread(
                target=transport.unary,
                args=('hv1:1', 'Node', 'GetNodeInfo', 'r'),
            )
            for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        for _ in range(20):
            threading.Event().wait(0.01)
        self.assertEqual(2, len(in_flight))
        release.set()
        for thread in threads:
            thread.join()
        self.assertEqual(2, max(peak))
        self.assertEqual(5, stub_class.return_value.GetNodeInfo.call_count)


class FakeTime:
    """A clock that advances only when the client sleeps."""

    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def unavailable():
    return FakeRpcError(Code.UNAVAILABLE, 'connection refused')


class RetryTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.time = FakeTime()
        self.transport = mock.Mock(spec=client.Transport)
        self.agent = self.agent_with(total_seconds=10.0)

    def agent_with(self, total_seconds, uniform=None):
        retry = client.RetryPolicy(
            total_seconds=total_seconds,
            first_delay=0.5,
            max_delay=4.0,
            sleep=self.time.sleep,
            clock=self.time.monotonic,
            uniform=uniform or (lambda low, high: high),
        )
        return client.AgentClient('hv1', 'hv1:7443', self.transport, retry)

    # Every call the agent documents as safe to repeat, with what it takes.
    REPEATABLE = {
        'GetNodeInfo': lambda a: a.get_node_info(),
        'GetVolume': lambda a: a.get_volume('v'),
        'ListVolumes': lambda a: a.list_volumes(),
        'ListTransfers': lambda a: a.list_transfers(),
        'CreateVolume': lambda a: a.create_volume('v', 5),
        'DeleteVolume': lambda a: a.delete_volume('v'),
        'ExtendVolume': lambda a: a.extend_volume('v', 9),
        'PublishVolume': lambda a: a.publish_volume('v'),
        'UnpublishVolume': lambda a: a.unpublish_volume('v'),
        'DeleteSnapshot': lambda a: a.delete_snapshot('s'),
        'UnexportVolume': lambda a: a.unexport_volume('v'),
        'AbortTransfer': lambda a: a.abort_transfer('t'),
    }
    # Mutating calls whose repetition the agent API does not promise.
    NOT_REPEATABLE = {
        'CreateSnapshot': lambda a: a.create_snapshot('s', 'v'),
        'RevertVolume': lambda a: a.revert_volume('v', 's'),
        'ExportVolume': lambda a: a.export_volume('v', 'nqn'),
        'StartTransfer': lambda a: a.start_transfer(
            't', 'v', 1, transfer_pb2.NvmeTcpSource(), False, None
        ),
        'CommitTransfer': lambda a: a.commit_transfer('t'),
    }

    def test_idempotent_calls_are_repeated_on_unavailable(self):
        for method, call in self.REPEATABLE.items():
            with self.subTest(method=method):
                self.transport.reset_mock()
                self.transport.unary.side_effect = [
                    unavailable(),
                    unavailable(),
                    # One page: a listing would follow a token.
                    mock.MagicMock(next_page_token=''),
                ]
                call(self.agent)
                self.assertEqual(3, self.transport.unary.call_count)
                self.assertEqual(
                    {method},
                    {c.args[2] for c in self.transport.unary.call_args_list},
                )

    def test_other_mutating_calls_are_never_repeated(self):
        for method, call in self.NOT_REPEATABLE.items():
            with self.subTest(method=method):
                self.transport.reset_mock()
                self.transport.unary.side_effect = [
                    unavailable(),
                    mock.MagicMock(),
                ]
                self.assertRaises(client.AgentUnavailable, call, self.agent)
                self.assertEqual(1, self.transport.unary.call_count)
        self.assertEqual([], self.time.sleeps)

    def test_only_unavailable_is_repeated(self):
        for code in (
            Code.DEADLINE_EXCEEDED,
            Code.INTERNAL,
            Code.RESOURCE_EXHAUSTED,
            Code.FAILED_PRECONDITION,
        ):
            with self.subTest(code=code):
                self.transport.reset_mock()
                self.transport.unary.side_effect = FakeRpcError(code)
                self.assertRaises(
                    exception.CinderException, self.agent.get_volume, 'v'
                )
                self.assertEqual(1, self.transport.unary.call_count)
        self.assertEqual([], self.time.sleeps)

    def test_backoff_doubles_up_to_the_cap(self):
        agent = self.agent_with(total_seconds=30.0)
        self.transport.unary.side_effect = [unavailable()] * 6 + ['info']
        self.assertEqual('info', agent.get_node_info())
        self.assertEqual([0.5, 1.0, 2.0, 4.0, 4.0, 4.0], self.time.sleeps)

    def test_jitter_draws_from_the_upper_half_of_each_step(self):
        drawn = []

        def uniform(low, high):
            drawn.append((low, high))
            return low

        agent = self.agent_with(10.0, uniform)
        self.transport.unary.side_effect = [unavailable()] * 3 + ['info']
        agent.get_node_info()
        self.assertEqual([(0.25, 0.5), (0.5, 1.0), (1.0, 2.0)], drawn)
        self.assertEqual([0.25, 0.5, 1.0], self.time.sleeps)

    def test_total_time_is_bounded(self):
        self.transport.unary.side_effect = unavailable()
        started = self.time.now
        error = self.assertRaises(
            client.AgentUnavailable, self.agent.get_node_info
        )
        self.assertLessEqual(self.time.now - started, 10.0)
        # 0.5 + 1 + 2 + 4 = 7.5; another 4 s would pass the 10 s bound.
        self.assertEqual([0.5, 1.0, 2.0, 4.0], self.time.sleeps)
        self.assertEqual(5, self.transport.unary.call_count)
        self.assertIn('UNAVAILABLE', str(error))

    def test_zero_total_time_turns_retries_off(self):
        agent = self.agent_with(0.0)
        self.transport.unary.side_effect = [unavailable(), 'info']
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)
        self.assertEqual(1, self.transport.unary.call_count)

    def test_a_repeated_removal_that_finds_it_gone_succeeds(self):
        self.transport.unary.side_effect = [
            unavailable(),
            FakeRpcError(Code.NOT_FOUND),
        ]
        self.assertIsNone(self.agent.delete_volume('v'))
        self.assertEqual(2, self.transport.unary.call_count)

    def test_without_a_policy_nothing_is_repeated(self):
        agent = client.AgentClient('hv1', 'hv1:7443', self.transport)
        self.transport.unary.side_effect = [unavailable(), 'info']
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)
        self.assertEqual(1, self.transport.unary.call_count)

    def test_repeated_calls_name_real_rpcs(self):
        from dmclone_cinder._proto.dmclone.v1 import node_pb2 as n
        from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2 as s
        from dmclone_cinder._proto.dmclone.v1 import transfer_pb2 as t
        from dmclone_cinder._proto.dmclone.v1 import volume_pb2 as v

        rpcs = {
            method.name
            for module in (n, s, t, v)
            for service in module.DESCRIPTOR.services_by_name.values()
            for method in service.methods
        }
        self.assertEqual(set(), client.REPEATABLE_RPCS - rpcs)
        self.assertEqual(
            set(), set(self.NOT_REPEATABLE) & client.REPEATABLE_RPCS
        )
