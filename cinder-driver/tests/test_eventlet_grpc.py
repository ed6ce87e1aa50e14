"""The client against a real gRPC agent, in an eventlet-patched process.

This is cinder-volume's default threading model. The fake agent runs in a
child process (see tests/fake_agent.py for why) and requires mutual TLS.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from unittest import mock
import uuid

from cinder import context
from cinder import exception
from cinder.volume import configuration
from cinder.volume import driver as cinder_driver
import eventlet
from eventlet import patcher

from dmclone_cinder import client
from dmclone_cinder import driver
from dmclone_cinder import grpc_import
from dmclone_cinder import options
from tests import agent_process
from tests import base
from tests import tls

# The fake agent answers every call after this many seconds.
CALL_SECONDS = 1.0
CONCURRENT_CALLS = 8
# Run serially the calls would take CONCURRENT_CALLS * CALL_SECONDS.
PARALLEL_BOUND = 3 * CALL_SECONDS
# A frozen hub stalls the ticker for a whole call.
TICK_SECONDS = 0.02
MAX_HUB_GAP = 0.6 * CALL_SECONDS
# Immediate answers, many at once: long enough to hit grpcio's per-call
# locks from several native threads at the same moment.
CONTENDED_CALLS = 2000
CONTENDED_CALLS_DEADLINE = 120


class _AgentServerTestCase(base.TestCase):
    """One fake agent process for all tests of a class."""

    call_seconds = CALL_SECONDS

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._pki_dir = tempfile.TemporaryDirectory()
        cls.pki = tls.write_test_pki(cls._pki_dir.name)
        cls.agent = agent_process.FakeAgentProcess(
            cls.pki['server'], cls.call_seconds
        ).start()

    @classmethod
    def tearDownClass(cls):
        cls.agent.stop()
        cls._pki_dir.cleanup()
        super().tearDownClass()

    def tls_material(self, identity='client'):
        paths = self.pki[identity]
        return options.read_tls_material(
            self.pki['client'].ca, paths.cert, paths.key
        )

    def agent_client(self, identity='client', timeout=30, endpoint=None):
        transport = client.make_transport(
            self.tls_material(identity), timeout, CONCURRENT_CALLS
        )
        return client.AgentClient(
            'hv1', endpoint or self.agent.endpoint, transport
        )


class _HubTicker:
    """Measures the longest time the eventlet hub could not run us."""

    def __init__(self):
        self.longest_gap = 0.0
        self._running = True
        self._thread = eventlet.spawn(self._tick)

    def _tick(self):
        last = time.monotonic()
        while self._running:
            eventlet.sleep(TICK_SECONDS)
            now = time.monotonic()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    def stop(self):
        self._running = False
        self._thread.wait()


class EventletClientTestCase(_AgentServerTestCase):
    def test_process_is_monkey_patched(self):
        self.assertTrue(patcher.is_monkey_patched('thread'))
        self.assertIsInstance(
            client.make_transport(self.tls_material(), 30, 4),
            client.PerThreadChannelTransport,
        )

    def test_concurrent_calls_run_in_parallel_and_hub_keeps_running(self):
        agent = self.agent_client()
        ticker = _HubTicker()
        pool = eventlet.GreenPool(CONCURRENT_CALLS)
        started = time.monotonic()
        infos = list(
            pool.imap(lambda _: agent.get_node_info(), range(CONCURRENT_CALLS))
        )
        elapsed = time.monotonic() - started
        ticker.stop()

        self.assertEqual(
            ['fake-node'] * CONCURRENT_CALLS, [i.node_id for i in infos]
        )
        self.assertLess(elapsed, PARALLEL_BOUND)
        self.assertLess(ticker.longest_gap, MAX_HUB_GAP)

    def test_concurrency_cap_queues_green_threads_without_freezing(self):
        transport = client.make_transport(self.tls_material(), 30, 2)
        agent = client.AgentClient('hv1', self.agent.endpoint, transport)
        ticker = _HubTicker()
        pool = eventlet.GreenPool(4)
        started = time.monotonic()
        list(pool.imap(lambda _: agent.get_node_info(), range(4)))
        elapsed = time.monotonic() - started
        ticker.stop()

        # Two slots, four calls: two rounds, not one and not four.
        self.assertGreaterEqual(elapsed, 2 * CALL_SECONDS * 0.9)
        self.assertLess(elapsed, 3.5 * CALL_SECONDS)
        self.assertLess(ticker.longest_gap, MAX_HUB_GAP)

    def test_green_grpcio_gets_calls_one_at_a_time(self):
        with mock.patch.object(
            grpc_import, 'uses_native_locks', return_value=False
        ):
            transport = client.make_transport(self.tls_material(), 30, 4)
        agent = client.AgentClient('hv1', self.agent.endpoint, transport)
        pool = eventlet.GreenPool(3)
        started = time.monotonic()
        infos = list(pool.imap(lambda _: agent.get_node_info(), range(3)))
        elapsed = time.monotonic() - started

        self.assertEqual(['fake-node'] * 3, [i.node_id for i in infos])
        # Never two calls at once: three rounds of one call each.
        self.assertGreaterEqual(elapsed, 3 * CALL_SECONDS * 0.9)

    def test_request_id_reaches_the_agent(self):
        request_context = context.RequestContext('user', 'project')
        request_context.update_store()

        info = self.agent_client().get_node_info()

        self.assertEqual(request_context.request_id, info.hostname)

    def test_agent_status_code_becomes_cinder_exception(self):
        agent = self.agent_client()
        error = self.assertRaises(
            client.AgentNotFound, agent.get_volume, 'code-NOT_FOUND'
        )
        self.assertIn('fake agent says NOT_FOUND', str(error))
        self.assertRaises(
            exception.InvalidVolume,
            agent.get_volume,
            'code-FAILED_PRECONDITION',
        )

    def test_refusal_reason_from_the_status_details_decides(self):
        agent = self.agent_client()
        busy = self.assertRaises(
            exception.VolumeIsBusy,
            agent.delete_volume,
            'refused-VOLUME_PUBLISHED',
        )
        self.assertEqual('VOLUME_PUBLISHED', busy.refusal_reason)
        self.assertIn('fake agent refuses: VOLUME_PUBLISHED', str(busy))
        # Not "in use": someone has to act, the delete goes to error.
        quarantined = self.assertRaises(
            exception.InvalidVolume,
            agent.delete_volume,
            'refused-VOLUME_QUARANTINED',
        )
        self.assertEqual('VOLUME_QUARANTINED', quarantined.refusal_reason)
        elsewhere = self.assertRaises(
            exception.InvalidVolume,
            agent.get_volume,
            'refused-VOLUME_ARRIVING',
        )
        self.assertEqual('VOLUME_ARRIVING', elsewhere.refusal_reason)

    def test_refusal_without_details_falls_back_to_the_call(self):
        error = self.assertRaises(
            exception.VolumeIsBusy,
            self.agent_client().delete_volume,
            'code-FAILED_PRECONDITION',
        )
        self.assertIsNone(error.refusal_reason)
        self.assertIn('fake agent says FAILED_PRECONDITION', str(error))

    def test_unimplemented_rpc_is_not_supported_operation(self):
        error = self.assertRaises(
            exception.NotSupportedOperation,
            self.agent_client().create_snapshot,
            'snap',
            'vol',
        )
        self.assertIn('CreateSnapshot', str(error))

    def test_deadline_exceeded_is_agent_unavailable(self):
        agent = self.agent_client(timeout=CALL_SECONDS / 4)
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)

    def test_client_certificate_of_another_ca_is_rejected(self):
        agent = self.agent_client(identity='stranger')
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)

    def test_closed_port_is_agent_unavailable(self):
        agent = self.agent_client(endpoint='127.0.0.1:1', timeout=5)
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)

    def test_unavailable_then_answer_is_retried_over_the_wire(self):
        transport = client.make_transport(self.tls_material(), 30, 2)
        retry = client.RetryPolicy(
            total_seconds=10.0, first_delay=0.05, max_delay=0.1
        )
        agent = client.AgentClient(
            'hv1', self.agent.endpoint, transport, retry
        )
        volume_id = f'flaky-2-{uuid.uuid4()}'

        self.assertEqual(volume_id, agent.get_volume(volume_id).volume_id)

    def test_unavailable_without_retries_fails_over_the_wire(self):
        agent = self.agent_client()
        self.assertRaises(
            client.AgentUnavailable,
            agent.get_volume,
            f'flaky-1-{uuid.uuid4()}',
        )

    def test_retries_of_a_closed_port_wait_green_and_stop_in_time(self):
        transport = client.make_transport(self.tls_material(), 5, 2)
        retry = client.RetryPolicy(
            total_seconds=1.5, first_delay=0.2, max_delay=0.4
        )
        agent = client.AgentClient('hv1', '127.0.0.1:1', transport, retry)
        ticker = _HubTicker()
        started = time.monotonic()
        self.assertRaises(client.AgentUnavailable, agent.get_node_info)
        elapsed = time.monotonic() - started
        ticker.stop()

        # Waits of at least 0.1 + 0.2 + 0.2 + 0.2 happened, and no wait
        # began that would end after 1.5 s.
        self.assertGreaterEqual(elapsed, 0.7)
        self.assertLess(elapsed, 1.5 + 1.0)
        # The waits were green sleeps: the hub kept running.
        self.assertLess(ticker.longest_gap, MAX_HUB_GAP)


class ContendedCallsTestCase(_AgentServerTestCase):
    """Many short calls at once: grpcio's own locks see contention."""

    call_seconds = 0.0

    def test_grpcio_takes_native_locks_under_eventlet(self):
        # A green lock that two native (tpool) threads contend for makes
        # eventlet switch across threads, which it refuses; the waiting
        # call then never returns.
        self.assertTrue(grpc_import.uses_native_locks())

    def test_short_concurrent_calls_all_return(self):
        agent = self.agent_client()
        pool = eventlet.GreenPool(CONCURRENT_CALLS)
        with eventlet.Timeout(CONTENDED_CALLS_DEADLINE):
            infos = list(
                pool.imap(
                    lambda _: agent.get_node_info(), range(CONTENDED_CALLS)
                )
            )

        self.assertEqual(
            CONTENDED_CALLS, sum(i.node_id == 'fake-node' for i in infos)
        )


class GrpcImportOrderTestCase(base.TestCase):
    """In fresh interpreters: who imports grpc first decides its locks."""

    def _probe(self, imports):
        code = (
            'import warnings; warnings.simplefilter("ignore")\n'
            'import eventlet; eventlet.monkey_patch()\n'
            f'{imports}\n'
            'from dmclone_cinder import grpc_import\n'
            'print(grpc_import.uses_native_locks())\n'
        )
        result = subprocess.run(
            [sys.executable, '-c', code],
            capture_output=True,
            check=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(agent_process.DRIVER_ROOT)),
            timeout=120,
        )
        return result.stdout.strip()

    def test_the_driver_package_first_makes_grpcio_native(self):
        self.assertEqual(
            'True', self._probe('import dmclone_cinder; import grpc')
        )

    def test_grpc_imported_green_before_the_driver_is_detected(self):
        self.assertEqual('False', self._probe('import grpc'))


class EventletDriverTestCase(_AgentServerTestCase):
    """The driver end to end against the agent, as cinder-volume runs it."""

    def setUp(self):
        super().setUp()
        conf = configuration.Configuration(
            cinder_driver.volume_opts, config_group='local'
        )
        self.driver = driver.DMCloneDriver(
            configuration=conf, host='ctl@local'
        )
        self.flags(
            group='local',
            dmclone_agents={'hv1': self.agent.endpoint},
            dmclone_tls_ca_file=self.pki['client'].ca,
            dmclone_tls_cert_file=self.pki['client'].cert,
            dmclone_tls_key_file=self.pki['client'].key,
            volume_backend_name='local',
        )
        self.driver.do_setup(context.get_admin_context())

    def test_setup_check_and_stats_from_the_agent(self):
        self.driver.check_for_setup_error()
        stats = self.driver.get_volume_stats(refresh=True)

        self.assertEqual('up', stats['backend_state'])
        (pool,) = stats['pools']
        self.assertEqual('hv1', pool['pool_name'])
        self.assertEqual(100, pool['total_capacity_gb'])
        self.assertEqual(75, pool['free_capacity_gb'])
        self.assertEqual(5, pool['provisioned_capacity_gb'])
        self.assertEqual(2, pool['total_volumes'])

    def test_attach_at_home_returns_the_published_device(self):
        volume = self._volume()
        connection = self.driver.initialize_connection(volume, {'host': 'hv1'})
        self.assertEqual(
            {
                'driver_volume_type': 'local',
                'data': {
                    'device_path': f'/dev/mapper/dmclone-{volume.name_id}'
                },
            },
            connection,
        )

    def test_unimplemented_create_snapshot_is_not_silent(self):
        from cinder.tests.unit import fake_snapshot

        snapshot = fake_snapshot.fake_snapshot_obj(
            context.get_admin_context(), volume=self._volume()
        )
        self.assertRaises(
            exception.NotSupportedOperation,
            self.driver.create_snapshot,
            snapshot,
        )

    @staticmethod
    def _volume():
        from cinder.tests.unit import fake_volume

        return fake_volume.fake_volume_obj(
            context.get_admin_context(), host='ctl@local#hv1'
        )


class NativeThreadsTestCase(_AgentServerTestCase):
    """OS_CINDER_DISABLE_EVENTLET_PATCHING: one shared channel, threads.

    The tests run monkey patched, so this mode runs in a fresh child
    interpreter (tests/threading_probe.py) that never imports eventlet.
    """

    def test_shared_channel_runs_threads_in_parallel(self):
        paths = self.pki['client']
        probe = agent_process.DRIVER_ROOT / 'tests' / 'threading_probe.py'
        result = subprocess.run(
            [
                sys.executable,
                str(probe),
                self.agent.endpoint,
                paths.ca,
                paths.cert,
                paths.key,
                str(CONCURRENT_CALLS),
            ],
            capture_output=True,
            check=True,
            env=dict(os.environ, PYTHONPATH=str(agent_process.DRIVER_ROOT)),
            timeout=120,
        )
        report = json.loads(result.stdout)

        self.assertFalse(report['eventlet_patched'])
        self.assertEqual('SharedChannelTransport', report['transport'])
        self.assertEqual(CONCURRENT_CALLS, report['answers'])
        self.assertLess(report['elapsed'], PARALLEL_BOUND)
