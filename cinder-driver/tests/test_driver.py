"""Unit tests of DMCloneDriver with the agents mocked."""

import time
from unittest import mock
import uuid

from cinder import context
from cinder import exception
from cinder import objects
from cinder.common import constants
from cinder.db import api as db
from cinder.objects import fields
from cinder.tests.unit import utils as tests_utils
from cinder.volume import volume_utils
import eventlet
import eventlet.event
import fixtures
from oslo_log import log as logging

from dmclone_cinder import client
from dmclone_cinder import driver
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2
from tests import base

ATTACHED = fields.VolumeAttachStatus.ATTACHED
DEFERRED = transfer_pb2.TRANSFER_STATE_DEFERRED
HYDRATING = transfer_pb2.TRANSFER_STATE_HYDRATING
DEGRADED = transfer_pb2.TRANSFER_STATE_DEGRADED
CONNECTING = transfer_pb2.TRANSFER_STATE_CONNECTING
GIB = base.GIB


SNAPSHOT_AVAILABLE = snapshot_pb2.SNAPSHOT_STATE_AVAILABLE


def unavailable(host='hv2'):
    return client.AgentUnavailable(data=f'agent {host}: UNAVAILABLE')


def unimplemented(rpc):
    return exception.NotSupportedOperation(operation=f'{rpc}: not yet')


def destination_written(agent):
    """The agent refuses to abort: its deferred destination was written."""
    refused = exception.InvalidVolume(reason='DESTINATION_WRITTEN: ...')
    refused.refusal_reason = 'DESTINATION_WRITTEN'
    agent.abort_transfer.side_effect = refused


def _slow_node_info(host):
    """An agent that answers GetNodeInfo after half a second."""

    def answer(**kwargs):
        eventlet.sleep(0.5)
        return base.node_info(host)

    return answer


class SetupTestCase(base.DriverTestCase):
    def _setup_with(self, **overrides):
        self.flags(group='local', **overrides)
        return self.driver.do_setup(self.ctxt)

    def test_one_agent_client_per_configured_host(self):
        for host in base.HOSTS:
            client.AgentClient.assert_any_call(
                host, base.endpoint_of(host), mock.ANY, mock.ANY
            )
        self.assertEqual(3, client.AgentClient.call_count)

    def test_agent_calls_are_retried_for_the_configured_time(self):
        retry = client.AgentClient.call_args.args[3]
        self.assertEqual(10.0, retry.total_seconds)
        client.AgentClient.reset_mock()
        self._setup_with(dmclone_retry_timeout=0)
        for call in client.AgentClient.call_args_list:
            self.assertEqual(0.0, call.args[3].total_seconds)

    def test_transfer_start_outlasts_the_agents_namespace_wait(self):
        transport = client.AgentClient.call_args.args[2]
        self.assertEqual(90.0, transport.timeout_of('StartTransfer'))
        self.assertEqual(30.0, transport.timeout_of('ExportVolume'))
        client.AgentClient.reset_mock()
        self._setup_with(dmclone_transfer_start_timeout=120)
        transport = client.AgentClient.call_args.args[2]
        self.assertEqual(120.0, transport.timeout_of('StartTransfer'))

    def test_transfer_start_deadline_within_the_agents_wait_is_refused(self):
        error = self.assertRaises(
            exception.InvalidConfigurationValue,
            self._setup_with,
            dmclone_transfer_start_timeout=30,
        )
        self.assertIn('dmclone_transfer_start_timeout', str(error))

    def test_bad_configuration_is_rejected_naming_the_option(self):
        cases = {
            'dmclone_agents': {'dmclone_agents': {}},
            'ADDRESS:PORT': {'dmclone_agents': {'hv1': 'no-port'}},
            'dmclone_tls_cert_file': {'dmclone_tls_cert_file': None},
            'cannot read': {'dmclone_tls_key_file': '/nonexistent/key.pem'},
            'dmclone_region_bytes': {'dmclone_region_bytes': 5000},
        }
        for expected, overrides in cases.items():
            with self.subTest(expected=expected):
                error = self.assertRaises(
                    exception.InvalidConfigurationValue,
                    self._setup_with,
                    **overrides,
                )
                self.assertIn(expected, str(error))
                self.assertIn('[local]', str(error))
                self.flags(group='local', **self.backend_options())

    def test_ca_file_falls_back_to_driver_ssl_cert_path(self):
        self._setup_with(
            dmclone_tls_ca_file=None,
            driver_ssl_cert_path=self.pem_paths['ca'],
        )
        self.assertRaises(
            exception.InvalidConfigurationValue,
            self._setup_with,
            driver_ssl_cert_path=None,
        )

    def test_over_subscription_ratio_below_one_is_refused(self):
        error = self.assertRaises(
            exception.InvalidConfigurationValue,
            self._setup_with,
            max_over_subscription_ratio='0.5',
        )
        self.assertIn('max_over_subscription_ratio', str(error))
        self.assertIn('[local]', str(error))

    def test_auto_over_subscription_ratio_is_accepted(self):
        self.assertIsNone(self._setup_with(max_over_subscription_ratio='auto'))

    def test_backend_defaults_apply_to_the_backend_section(self):
        self.flags(group='backend_defaults', dmclone_call_timeout=7.5)
        self.assertEqual(7.5, self.driver.configuration.dmclone_call_timeout)

    def test_driver_options_are_the_dmclone_options(self):
        names = {opt.name for opt in self.driver.get_driver_options()}
        self.assertIn('dmclone_agents', names)
        self.assertTrue(all(name.startswith('dmclone_') for name in names))

    def test_check_for_setup_error_tolerates_an_unreachable_agent(self):
        self.agents['hv2'].get_node_info.side_effect = unavailable()
        self.driver.check_for_setup_error()
        for agent in self.agents.values():
            agent.get_node_info.assert_called_once_with(deadline=mock.ANY)

    def test_check_for_setup_error_asks_every_agent_at_once(self):
        for host, agent in self.agents.items():
            agent.get_node_info.side_effect = _slow_node_info(host)
        started = time.monotonic()
        self.driver.check_for_setup_error()
        self.assertLess(time.monotonic() - started, 1.0)

    def test_check_for_setup_error_rejects_an_unknown_api(self):
        self.agents['hv3'].get_node_info.return_value.api_version = 'x.v1'
        error = self.assertRaises(
            exception.VolumeDriverException,
            self.driver.check_for_setup_error,
        )
        self.assertIn('hv3', str(error))

    def test_check_for_setup_error_accepts_later_api_versions(self):
        self.agents[
            'hv1'
        ].get_node_info.return_value.api_version = 'dmclone.v2'
        self.driver.check_for_setup_error()

    def test_check_for_setup_error_fails_on_agent_without_node_info(self):
        self.agents['hv1'].get_node_info.side_effect = unimplemented(
            'GetNodeInfo'
        )
        self.assertRaises(
            exception.NotSupportedOperation,
            self.driver.check_for_setup_error,
        )


class StatsTestCase(base.DriverTestCase):
    def _pools(self):
        stats = self.driver.get_volume_stats(refresh=True)
        return stats, {pool['pool_name']: pool for pool in stats['pools']}

    def test_backend_level_keys(self):
        stats, _pools = self._pools()
        self.assertEqual('local', stats['volume_backend_name'])
        self.assertEqual('dmclone', stats['vendor_name'])
        self.assertEqual(self.driver.VERSION, stats['driver_version'])
        self.assertEqual(constants.NVMEOF_TCP, stats['storage_protocol'])
        self.assertEqual('up', stats['backend_state'])

    def test_one_pool_per_agent_with_its_capacity(self):
        self.agents['hv2'].get_node_info.return_value = base.node_info(
            'hv2', total_gib=200, used_gib=50
        )
        _stats, pools = self._pools()
        self.assertEqual(set(base.HOSTS), set(pools))
        self.assertEqual(100, pools['hv1']['total_capacity_gb'])
        self.assertEqual(60, pools['hv1']['free_capacity_gb'])
        self.assertEqual(200, pools['hv2']['total_capacity_gb'])
        self.assertEqual(150, pools['hv2']['free_capacity_gb'])

    def test_pool_capabilities(self):
        self.flags(group='local', reserved_percentage=5)
        _stats, pools = self._pools()
        pool = pools['hv1']
        self.assertTrue(pool['thin_provisioning_support'])
        self.assertFalse(pool['thick_provisioning_support'])
        self.assertFalse(pool['multiattach'])
        self.assertTrue(pool['online_extend_support'])
        self.assertTrue(pool['clone_across_pools'])
        self.assertEqual('up', pool['agent_state'])
        self.assertEqual(5, pool['reserved_percentage'])
        self.assertEqual(20.0, pool['max_over_subscription_ratio'])

    def test_provisioned_capacity_comes_from_the_agent(self):
        self.agents['hv1'].list_volumes.return_value = [
            volume_pb2.Volume(volume_id='a', size_bytes=3 * GIB),
            volume_pb2.Volume(volume_id='b', size_bytes=GIB // 2),
        ]
        _stats, pools = self._pools()
        self.assertEqual(3.5, pools['hv1']['provisioned_capacity_gb'])
        self.assertEqual(2, pools['hv1']['total_volumes'])

    def test_provisioned_capacity_from_pool_usage_needs_no_list(self):
        info = self.agents['hv1'].get_node_info.return_value
        info.pool.provisioned_bytes = 250 * GIB
        info.pool.volume_count = 7
        _stats, pools = self._pools()
        self.assertEqual(250, pools['hv1']['provisioned_capacity_gb'])
        self.assertEqual(7, pools['hv1']['total_volumes'])
        self.agents['hv1'].list_volumes.assert_not_called()

    def test_unhealthy_pool_takes_no_new_volumes(self):
        for health, state in (
            ('read-only', 'up'),
            ('needs check', 'up'),
            ('failed', 'down'),
        ):
            with self.subTest(health=health):
                info = self.agents['hv1'].get_node_info.return_value
                info.pool.health = health
                _stats, pools = self._pools()
                self.assertEqual(0, pools['hv1']['free_capacity_gb'])
                self.assertEqual(state, pools['hv1']['agent_state'])

    def test_healthy_pool_keeps_its_free_capacity(self):
        self.agents['hv1'].get_node_info.return_value.pool.health = 'healthy'
        _stats, pools = self._pools()
        self.assertEqual(60, pools['hv1']['free_capacity_gb'])

    def test_provisioned_capacity_absent_when_agent_cannot_list(self):
        self.agents['hv1'].list_volumes.side_effect = unimplemented(
            'ListVolumes'
        )
        _stats, pools = self._pools()
        self.assertNotIn('provisioned_capacity_gb', pools['hv1'])
        self.assertEqual(100, pools['hv1']['total_capacity_gb'])

    def test_low_space_pool_reports_no_free_capacity(self):
        self.agents['hv1'].get_node_info.return_value = base.node_info(
            'hv1', low_space=True
        )
        _stats, pools = self._pools()
        self.assertEqual(0, pools['hv1']['free_capacity_gb'])
        self.assertEqual(100, pools['hv1']['total_capacity_gb'])

    def test_unreachable_agent_is_a_down_pool_not_an_error(self):
        self.agents['hv2'].get_node_info.side_effect = unavailable()
        self.agents['hv3'].get_node_info.side_effect = unimplemented(
            'GetNodeInfo'
        )
        stats, pools = self._pools()
        self.assertEqual('up', stats['backend_state'])
        self.assertEqual('up', pools['hv1']['agent_state'])
        for host in ('hv2', 'hv3'):
            self.assertEqual('down', pools[host]['agent_state'])
            self.assertEqual(0, pools[host]['free_capacity_gb'])
            self.assertEqual(0, pools[host]['total_capacity_gb'])

    def test_backend_is_down_when_every_agent_is(self):
        for agent in self.agents.values():
            agent.get_node_info.side_effect = unavailable()
        stats, pools = self._pools()
        self.assertEqual('down', stats['backend_state'])
        self.assertEqual(
            {'down'}, {pool['backend_state'] for pool in pools.values()}
        )

    def test_every_pool_reports_the_backend_state(self):
        # cinder's services API (api/v3/services.py) takes backend_state
        # from each pool of a backend, the last one read wins: a pool
        # must not say "down" while the backend serves.
        self.agents['hv3'].get_node_info.side_effect = unavailable('hv3')
        stats, pools = self._pools()
        self.assertEqual('up', stats['backend_state'])
        self.assertEqual(
            {'up'}, {pool['backend_state'] for pool in pools.values()}
        )
        self.assertEqual('down', pools['hv3']['agent_state'])

    def test_service_list_shows_the_backend_up_with_one_agent_down(self):
        from cinder.scheduler import host_manager

        self.agents['hv3'].get_node_info.side_effect = unavailable('hv3')
        stats = self.driver.get_volume_stats(refresh=True)
        state = host_manager.BackendState(base.BACKEND, None)
        state.update_from_volume_capability(
            dict(stats, timestamp=None), service=None
        )
        # What api/v3/services.py reads for the backend of each pool.
        states = {
            pool.pool_name: pool.capabilities.get('backend_state', 'up')
            for pool in state.pools.values()
        }
        self.assertEqual({'up'}, set(states.values()))
        self.assertEqual(set(base.HOSTS), set(states))

    def test_sparse_copy_volume_at_the_top_level(self):
        # The volume manager reads it from the backend's capabilities
        # (manager.py, _copy_volume_data), not from a pool.
        stats, _pools = self._pools()
        self.assertIs(True, stats['sparse_copy_volume'])

    def test_auto_over_subscription_is_computed_per_pool(self):
        from cinder.scheduler import sched_utils

        self.flags(group='local', max_over_subscription_ratio='auto')
        self.agents['hv1'].list_volumes.return_value = [
            volume_pb2.Volume(volume_id='a', size_bytes=82 * GIB),
        ]
        self.agents['hv2'].get_node_info.side_effect = unavailable()
        _stats, pools = self._pools()
        # hv1: 40 GiB used, 82 GiB provisioned: 1 + 82 / (40 + 1).
        self.assertEqual(3.0, pools['hv1']['max_over_subscription_ratio'])
        # Nothing provisioned yet: cinder's initial ratio.
        self.assertEqual(
            sched_utils.INITIAL_AUTO_MOSR,
            pools['hv3']['max_over_subscription_ratio'],
        )
        self.assertEqual(
            sched_utils.INITIAL_AUTO_MOSR,
            pools['hv2']['max_over_subscription_ratio'],
        )
        self.assertEqual('up', pools['hv1']['agent_state'])

    def test_fixed_over_subscription_ratio_is_reported_as_a_number(self):
        self.flags(group='local', max_over_subscription_ratio='1.5')
        _stats, pools = self._pools()
        self.assertEqual(1.5, pools['hv2']['max_over_subscription_ratio'])

    def test_agents_are_polled_at_once(self):
        for host, agent in self.agents.items():
            agent.get_node_info.side_effect = _slow_node_info(host)
        started = time.monotonic()
        stats, pools = self._pools()
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 1.0)
        self.assertEqual(
            {'up'}, {pool['agent_state'] for pool in pools.values()}
        )

    def test_every_polling_thread_carries_the_callers_request_id(self):
        seen = {}

        def record(host):
            def answer(**kwargs):
                seen[host] = client.current_request_id()
                return base.node_info(host)

            return answer

        for host, agent in self.agents.items():
            agent.get_node_info.side_effect = record(host)
        caller = context.RequestContext(
            'user', 'project', request_id='req-poll-1'
        )
        caller.update_store()
        self._pools()
        self.assertEqual({host: 'req-poll-1' for host in self.agents}, seen)

    def test_one_deadline_for_the_whole_poll(self):
        self.flags(group='local', dmclone_stats_timeout=1.0)

        def hang(**kwargs):
            eventlet.sleep(5)
            return base.node_info('hv2')

        self.agents['hv2'].get_node_info.side_effect = hang
        started = time.monotonic()
        stats, pools = self._pools()
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 2.5)
        self.assertEqual('down', pools['hv2']['agent_state'])
        self.assertEqual(0, pools['hv2']['total_capacity_gb'])
        self.assertEqual('up', pools['hv1']['agent_state'])
        self.assertEqual('up', stats['backend_state'])

    def test_agent_calls_of_a_poll_get_its_deadline(self):
        self._pools()
        _args, kwargs = self.agents['hv1'].get_node_info.call_args
        self.assertIsInstance(kwargs['deadline'], client.Deadline)
        self.assertLessEqual(kwargs['deadline'].remaining(), 20.0)
        _args, kwargs = self.agents['hv1'].list_volumes.call_args
        self.assertIsInstance(kwargs['deadline'], client.Deadline)

    def test_a_pool_that_fails_unexpectedly_is_down_not_the_poll(self):
        self.agents['hv2'].get_node_info.side_effect = RuntimeError('bug')
        stats, pools = self._pools()
        self.assertEqual('down', pools['hv2']['agent_state'])
        self.assertEqual('up', pools['hv1']['agent_state'])


class VolumeTestCase(base.DriverTestCase):
    def test_create_volume_on_its_pool_by_name_id(self):
        volume = self.volume(pool='hv2', size=3, _name_id=str(uuid.uuid4()))
        self.assertIsNone(self.driver.create_volume(volume))
        self.agents['hv2'].create_volume.assert_called_once_with(
            volume.name_id, 3 * GIB
        )
        self.assertNotEqual(volume.id, volume.name_id)
        self.assert_no_agent_changes('hv1', 'hv3')

    def test_create_volume_full_pool_raises_for_reschedule(self):
        self.agents[
            'hv1'
        ].create_volume.side_effect = exception.VolumeBackendAPIException(
            data='RESOURCE_EXHAUSTED'
        )
        self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.create_volume,
            self.volume(),
        )

    def test_delete_volume_on_its_pool(self):
        volume = self.volume(pool='hv3')
        self.driver.delete_volume(volume)
        self.agents['hv3'].delete_volume.assert_called_once_with(
            volume.name_id
        )
        self.assert_no_agent_changes('hv1', 'hv2')

    def test_delete_volume_without_host_asks_every_agent(self):
        self.agents['hv2'].delete_volume.side_effect = unavailable()
        volume = self.volume(pool=None)
        self.driver.delete_volume(volume)
        for agent in self.agents.values():
            agent.delete_volume.assert_called_once_with(volume.name_id)

    def test_delete_busy_volume_raises_volume_is_busy(self):
        self.agents['hv1'].delete_volume.side_effect = exception.VolumeIsBusy(
            volume_name='v'
        )
        self.assertRaises(
            exception.VolumeIsBusy, self.driver.delete_volume, self.volume()
        )

    def test_extend_volume_in_bytes_on_its_pool(self):
        volume = self.volume(pool='hv2')
        self.driver.extend_volume(volume, 5)
        self.agents['hv2'].extend_volume.assert_called_once_with(
            volume.name_id, 5 * GIB
        )

    def test_volume_without_pool_held_by_no_agent_alone_is_an_error(self):
        volume = self.volume()
        volume.host = base.BACKEND
        error = self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.extend_volume,
            volume,
            2,
        )
        self.assertIn('without a pool', str(error))
        volume.save.assert_not_called()

    def _held_only_by(self, *hosts):
        for host in base.HOSTS:
            if host not in hosts:
                self.agents[
                    host
                ].get_volume.side_effect = client.AgentNotFound(
                    agent=host, subject='volume', detail='none here'
                )

    def test_get_pool_asks_the_agents(self):
        volume = self.volume(pool=None)
        self._held_only_by('hv2')
        self.assertEqual('hv2', self.driver.get_pool(volume))
        self._held_only_by()
        self.assertIsNone(self.driver.get_pool(volume))

    def test_get_pool_passes_over_a_warm_copy_left_behind(self):
        volume = self.volume(pool=None)
        self._held_only_by('hv1', 'hv2')
        self.agents['hv1'].get_volume.return_value = volume_pb2.Volume(
            state=volume_pb2.VOLUME_STATE_WARM
        )
        self.assertEqual('hv2', self.driver.get_pool(volume))

    def test_get_pool_during_a_move_follows_the_hydration(self):
        volume = self.volume(pool=None)
        self._held_only_by('hv1', 'hv2')
        arriving = self.agents['hv2'].active_transfers_of
        arriving.return_value = [base.transfer(volume.name_id, DEFERRED)]
        self.assertEqual('hv1', self.driver.get_pool(volume))
        arriving.return_value = [base.transfer(volume.name_id, HYDRATING)]
        self.assertEqual('hv2', self.driver.get_pool(volume))

    def test_a_host_that_lost_its_pool_is_repaired(self):
        # cinder-manage volume update_host writes host@backend only.
        volume = self.volume(pool=None)
        volume.host = base.BACKEND
        self._held_only_by('hv2')
        self.driver.extend_volume(volume, 2)
        self.agents['hv2'].extend_volume.assert_called_once_with(
            volume.name_id, 2 * GIB
        )
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)
        volume.save.assert_called_once_with()

    def test_a_call_queued_behind_a_move_uses_the_pool_of_now(self):
        # The volume object was loaded before a move took the lock and
        # moved the pool to hv2 in the database.
        stored = tests_utils.create_volume(
            self.ctxt, host=f'{base.BACKEND}#hv2', size=1
        )
        stale = self.volume(pool='hv1', id=stored.id)
        self.driver.extend_volume(stale, 2)
        self.agents['hv2'].extend_volume.assert_called_once_with(
            stale.name_id, 2 * GIB
        )
        self.agents['hv1'].extend_volume.assert_not_called()

    def test_volume_in_unknown_pool_names_the_known_hosts(self):
        error = self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.create_volume,
            self.volume(pool='hv9'),
        )
        self.assertIn("'hv9'", str(error))
        self.assertIn('hv1, hv2, hv3', str(error))


class SnapshotTestCase(base.DriverTestCase):
    def test_create_snapshot_records_its_host(self):
        volume = self.volume(pool='hv2')
        snapshot = self.snapshot(volume)
        update = self.driver.create_snapshot(snapshot)
        self.assertEqual({'provider_location': 'hv2'}, update)
        self.agents['hv2'].create_snapshot.assert_called_once_with(
            snapshot.id, volume.name_id
        )

    def test_delete_snapshot_where_it_was_taken(self):
        # The volume moved on to hv2; its snapshot stayed on hv1.
        snapshot = self.snapshot(self.volume(pool='hv2'), location='hv1')
        self.driver.delete_snapshot(snapshot)
        self.agents['hv1'].delete_snapshot.assert_called_once_with(snapshot.id)
        self.assert_no_agent_changes('hv2', 'hv3')

    def test_delete_snapshot_without_location_uses_volume_pool(self):
        snapshot = self.snapshot(self.volume(pool='hv3'))
        self.driver.delete_snapshot(snapshot)
        self.agents['hv3'].delete_snapshot.assert_called_once_with(snapshot.id)

    def test_volume_from_snapshot_on_the_snapshot_host(self):
        snapshot = self.snapshot(self.volume(pool='hv1'), location='hv1')
        volume = self.volume(pool='hv1', size=1)
        self.assertIsNone(
            self.driver.create_volume_from_snapshot(volume, snapshot)
        )
        self.agents['hv1'].create_volume.assert_called_once_with(
            volume.name_id, GIB, source_snapshot_id=snapshot.id
        )
        self.agents['hv1'].extend_volume.assert_not_called()

    def test_volume_from_snapshot_grows_when_agent_kept_source_size(self):
        snapshot = self.snapshot(self.volume(pool='hv1'), location='hv1')
        volume = self.volume(pool='hv1', size=4)
        self.agents['hv1'].create_volume.side_effect = None
        self.agents['hv1'].create_volume.return_value = volume_pb2.Volume(
            volume_id=volume.name_id, size_bytes=GIB
        )
        self.driver.create_volume_from_snapshot(volume, snapshot)
        self.agents['hv1'].extend_volume.assert_called_once_with(
            volume.name_id, 4 * GIB
        )

    def test_volume_from_snapshot_follows_a_snapshot_left_behind(self):
        # The scheduler placed the new volume with the snapshot's volume
        # (now on hv2), but the snapshot data is on hv1.
        snapshot = self.snapshot(self.volume(pool='hv2'), location='hv1')
        volume = self.volume(pool='hv2')
        update = self.driver.create_volume_from_snapshot(volume, snapshot)
        self.assertEqual({'host': f'{base.BACKEND}#hv1'}, update)
        self.agents['hv1'].create_volume.assert_called_once()
        self.assert_no_agent_changes('hv2', 'hv3')

    def holding(self, host, snapshot, state=SNAPSHOT_AVAILABLE):
        agent = self.agents[host]
        agent.get_snapshot.side_effect = None
        agent.get_snapshot.return_value = snapshot_pb2.Snapshot(
            snapshot_id=snapshot.id,
            volume_id=snapshot.volume.name_id,
            state=state,
        )

    def test_a_snapshot_that_moved_with_its_volume_is_used_where_it_is(self):
        # Taken on hv1; the volume moved to hv2 and the snapshot after it.
        snapshot = self.snapshot(self.volume(pool='hv2'), location='hv1')
        self.holding('hv2', snapshot)
        self.driver.delete_snapshot(snapshot)
        self.agents['hv2'].delete_snapshot.assert_called_once_with(snapshot.id)
        self.assertEqual('hv2', snapshot.provider_location)
        snapshot.save.assert_called_once_with()
        self.assert_no_agent_changes('hv1', 'hv3')

    def test_a_snapshot_still_arriving_is_used_where_it_was(self):
        snapshot = self.snapshot(self.volume(pool='hv2'), location='hv1')
        self.holding('hv2', snapshot, snapshot_pb2.SNAPSHOT_STATE_ARRIVING)
        self.holding('hv1', snapshot)
        volume = self.volume(pool='hv2')
        update = self.driver.create_volume_from_snapshot(volume, snapshot)
        self.assertEqual({'host': f'{base.BACKEND}#hv1'}, update)
        self.agents['hv1'].create_volume.assert_called_once()
        self.assertEqual('hv1', snapshot.provider_location)
        snapshot.save.assert_not_called()
        self.assert_no_agent_changes('hv2', 'hv3')

    def test_a_snapshot_is_found_on_a_host_between_two_moves(self):
        # hv1 -> hv2 (the snapshot arrived), then hv2 -> hv3 (arriving).
        snapshot = self.snapshot(self.volume(pool='hv3'), location='hv1')
        self.holding('hv3', snapshot, snapshot_pb2.SNAPSHOT_STATE_ARRIVING)
        self.holding('hv2', snapshot)
        self.driver.delete_snapshot(snapshot)
        self.agents['hv2'].delete_snapshot.assert_called_once_with(snapshot.id)
        self.assertEqual('hv2', snapshot.provider_location)
        self.assert_no_agent_changes('hv1', 'hv3')

    def test_revert_in_place_once_the_snapshot_followed_the_volume(self):
        volume = self.volume(pool='hv2')
        snapshot = self.snapshot(volume, location='hv1')
        self.holding('hv2', snapshot)
        self.driver.revert_to_snapshot(self.ctxt, volume, snapshot)
        self.agents['hv2'].revert_volume.assert_called_once_with(
            volume.name_id, snapshot.id
        )

    def test_clone_on_the_source_host(self):
        source = self.volume(pool='hv3', size=2)
        volume = self.volume(pool='hv3', size=2)
        self.assertIsNone(self.driver.create_cloned_volume(volume, source))
        self.agents['hv3'].create_volume.assert_called_once_with(
            volume.name_id, 2 * GIB, source_volume_id=source.name_id
        )

    def test_clone_in_another_pool_is_made_at_its_source_and_moved(self):
        # clone_across_pools: the image cache's volume is on hv3, the
        # scheduler placed the new volume on hv1.
        source = self.volume(pool='hv3', size=1)
        volume = self.volume(pool='hv1', size=2)
        self.agents['hv3'].create_volume.side_effect = None
        self.agents['hv3'].create_volume.return_value = volume_pb2.Volume(
            size_bytes=GIB
        )
        self.assertIsNone(self.driver.create_cloned_volume(volume, source))
        self.agents['hv3'].create_volume.assert_called_once_with(
            volume.name_id, 2 * GIB, source_volume_id=source.name_id
        )
        self.agents['hv3'].extend_volume.assert_called_once_with(
            volume.name_id, 2 * GIB
        )
        start = self.agents['hv1'].start_transfer.call_args.kwargs
        self.assertEqual(
            (volume.name_id, 2 * GIB, False),
            (start['volume_id'], start['size_bytes'], start['deferred']),
        )
        self.agents['hv1'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        self.agents['hv3'].delete_volume.assert_not_called()

    def test_a_clone_that_cannot_move_is_not_left_behind(self):
        source = self.volume(pool='hv3')
        volume = self.volume(pool='hv1')
        self.agents['hv1'].start_transfer.side_effect = unavailable('hv1')
        self.assertRaises(
            client.AgentUnavailable,
            self.driver.create_cloned_volume,
            volume,
            source,
        )
        self.agents['hv3'].delete_volume.assert_called_once_with(
            volume.name_id
        )

    def test_clone_for_an_unknown_pool_stays_with_its_source(self):
        source = self.volume(pool='hv3')
        volume = self.volume(pool='hv9')
        update = self.driver.create_cloned_volume(volume, source)
        self.assertEqual({'host': f'{base.BACKEND}#hv3'}, update)
        self.agents['hv3'].create_volume.assert_called_once()

    def test_clone_of_another_backends_volume_is_left_to_cinder(self):
        source = self.volume(pool='hv3')
        source.host = 'ctl@other#hv3'
        self.assertRaises(
            NotImplementedError,
            self.driver.create_cloned_volume,
            self.volume(pool='hv1'),
            source,
        )
        self.assert_no_agent_changes(*base.HOSTS)

    def test_revert_in_place(self):
        volume = self.volume(pool='hv1')
        snapshot = self.snapshot(volume, location='hv1')
        self.driver.revert_to_snapshot(self.ctxt, volume, snapshot)
        self.agents['hv1'].revert_volume.assert_called_once_with(
            volume.name_id, snapshot.id
        )

    def test_revert_across_hosts_leaves_it_to_the_generic_path(self):
        volume = self.volume(pool='hv2')
        snapshot = self.snapshot(volume, location='hv1')
        self.assertRaises(
            NotImplementedError,
            self.driver.revert_to_snapshot,
            self.ctxt,
            volume,
            snapshot,
        )
        self.assert_no_agent_changes(*base.HOSTS)

    def test_unimplemented_revert_is_not_supported_not_generic(self):
        # NotSupportedOperation is no NotImplementedError: the manager
        # reports the failure instead of silently copying.
        self.agents['hv1'].revert_volume.side_effect = unimplemented(
            'RevertVolume'
        )
        volume = self.volume(pool='hv1')
        error = self.assertRaises(
            exception.NotSupportedOperation,
            self.driver.revert_to_snapshot,
            self.ctxt,
            volume,
            self.snapshot(volume, location='hv1'),
        )
        self.assertNotIsInstance(error, NotImplementedError)


class ExportTestCase(base.DriverTestCase):
    def test_create_and_remove_export_change_nothing(self):
        volume = self.volume()
        self.assertIsNone(
            self.driver.create_export(self.ctxt, volume, {'host': 'hv2'})
        )
        self.assertIsNone(self.driver.remove_export(self.ctxt, volume))
        self.assert_no_agent_changes(*base.HOSTS)

    def test_ensure_export_checks_the_volume_on_its_host(self):
        volume = self.volume(pool='hv2')
        self.assertIsNone(self.driver.ensure_export(self.ctxt, volume))
        self.agents['hv2'].get_volume.assert_called_once_with(volume.name_id)

    def test_ensure_export_with_unreachable_agent_logs_and_returns(self):
        self.agents['hv2'].get_volume.side_effect = unavailable()
        self.assertIsNone(
            self.driver.ensure_export(self.ctxt, self.volume(pool='hv2'))
        )

    def test_ensure_export_of_a_vanished_volume_raises(self):
        self.agents['hv1'].get_volume.side_effect = client.AgentNotFound(
            agent='hv1', subject='v', detail='no such volume'
        )
        self.assertRaises(
            client.AgentNotFound,
            self.driver.ensure_export,
            self.ctxt,
            self.volume(),
        )


class ValidateConnectorTestCase(base.DriverTestCase):
    def test_host_is_required(self):
        self.assertRaises(
            exception.InvalidConnectorException,
            self.driver.validate_connector,
            {'nqn': 'nqn.x'},
        )

    def test_hypervisor_needs_no_nqn(self):
        self.driver.validate_connector({'host': 'hv1'})

    def test_other_host_needs_an_nqn(self):
        error = self.assertRaises(
            exception.InvalidConnectorException,
            self.driver.validate_connector,
            {'host': 'controller'},
        )
        self.assertIn('nqn', str(error))
        self.driver.validate_connector({'host': 'controller', 'nqn': 'n'})


class AttachTestCase(base.DriverTestCase):
    def test_attach_at_home_publishes_the_local_device(self):
        volume = self.volume(pool='hv1')
        connection = self.driver.initialize_connection(volume, {'host': 'hv1'})
        self.assertEqual(
            {
                'driver_volume_type': 'local',
                'data': {
                    'device_path': f'/dev/mapper/dmclone-{volume.name_id}@hv1'
                },
            },
            connection,
        )
        self.assert_no_agent_changes('hv2', 'hv3')
        volume.save.assert_not_called()

    def test_attach_without_device_path_fails(self):
        self.agents['hv1'].publish_volume.side_effect = None
        self.agents['hv1'].publish_volume.return_value = ''
        self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            self.volume(),
            {'host': 'hv1'},
        )

    def test_attach_elsewhere_moves_the_volume_and_its_pool(self):
        volume = self.volume(pool='hv1', size=2)
        connection = self.driver.initialize_connection(volume, {'host': 'hv2'})

        source, destination = self.agents['hv1'], self.agents['hv2']
        source.export_volume.assert_called_once_with(
            volume.name_id, base.nqn_of('hv2'), for_transfer=True
        )
        request = destination.start_transfer.call_args.kwargs
        export = base.export_of(volume.name_id, 'hv1', for_transfer=True)
        self.assertEqual(volume.name_id, request['volume_id'])
        self.assertEqual(2 * GIB, request['size_bytes'])
        self.assertFalse(request['deferred'])
        self.assertEqual(
            transfer_pb2.NvmeTcpSource(
                subsystem_nqn=export.subsystem_nqn,
                transport_address=export.transport_address,
                transport_service_id=export.transport_service_id,
                source_agent_endpoint=base.endpoint_of('hv1'),
                release_token=base.release_token_of(volume.name_id, 'hv1'),
                dhchap_host_secret='DHHC-1:00:host-of-hv1:',
                dhchap_ctrl_secret='DHHC-1:00:ctrl-of-hv1:',
            ),
            request['source'],
        )
        self.assertEqual(
            f'/dev/mapper/dmclone-{volume.name_id}@hv2',
            connection['data']['device_path'],
        )
        self.assertEqual('local', connection['driver_volume_type'])
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)
        volume.save.assert_called_once_with()

    def test_move_passes_the_configured_hydration_knobs(self):
        self.flags(
            group='local',
            dmclone_region_bytes=64 * 1024,
            dmclone_hydration_threshold=8,
            dmclone_hydration_batch_size=16,
            dmclone_max_bytes_per_second=100 * 1024 * 1024,
        )
        self.driver.do_setup(self.ctxt)
        self.driver.initialize_connection(self.volume(), {'host': 'hv2'})
        knobs = self.agents['hv2'].start_transfer.call_args.kwargs['knobs']
        self.assertEqual(
            transfer_pb2.HydrationKnobs(
                region_bytes=64 * 1024,
                hydration_threshold=8,
                hydration_batch_size=16,
                max_bytes_per_second=100 * 1024 * 1024,
            ),
            knobs,
        )

    def test_live_migration_attach_defers_hydration_and_keeps_pool(self):
        volume = self.volume(pool='hv1', attachments=[('hv1', ATTACHED)])
        connection = self.driver.initialize_connection(volume, {'host': 'hv2'})
        request = self.agents['hv2'].start_transfer.call_args.kwargs
        self.assertTrue(request['deferred'])
        self.assertEqual(
            f'/dev/mapper/dmclone-{volume.name_id}@hv2',
            connection['data']['device_path'],
        )
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        volume.save.assert_not_called()

    def test_repeated_attach_reuses_the_unfinished_transfer(self):
        volume = self.volume(pool='hv1', attachments=[('hv1', ATTACHED)])
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        connection = self.driver.initialize_connection(volume, {'host': 'hv2'})
        self.assertEqual(
            pending.device_path, connection['data']['device_path']
        )
        self.agents['hv1'].export_volume.assert_not_called()
        self.agents['hv2'].start_transfer.assert_not_called()
        volume.save.assert_not_called()

    def test_repeated_attach_keeps_the_pool_of_a_degraded_deferred_move(self):
        # A deferred transfer whose source is unreachable shows DEGRADED:
        # still a live migration in progress, the source still the home.
        volume = self.volume(pool='hv1', attachments=[('hv1', ATTACHED)])
        pending = base.transfer(volume.name_id, DEGRADED, deferred=True)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        self.driver.initialize_connection(volume, {'host': 'hv2'})
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        volume.save.assert_not_called()

    def test_repeated_attach_during_hydration_settles_the_pool(self):
        volume = self.volume(pool='hv1')
        self.agents['hv2'].active_transfers_of.return_value = [
            base.transfer(volume.name_id, HYDRATING)
        ]
        self.driver.initialize_connection(volume, {'host': 'hv2'})
        self.agents['hv2'].start_transfer.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)

    def test_a_move_into_a_pool_without_room_exports_nothing(self):
        # hv2's pool: 100 GiB, 40 used: a 61 GiB volume cannot arrive.
        volume = self.volume(pool='hv1', size=61)
        error = self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            volume,
            {'host': 'hv2'},
        )
        self.assertIn('cannot move to hv2', str(error))
        self.assertIn('61 GiB do not fit the 60.0 GiB', str(error))
        self.agents['hv1'].export_volume.assert_not_called()
        self.agents['hv2'].start_transfer.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)

    def test_a_move_into_a_pool_past_its_low_water_mark_is_refused(self):
        self.agents['hv2'].get_node_info.return_value = base.node_info(
            'hv2', low_space=True
        )
        self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            self.volume(pool='hv1'),
            {'host': 'hv2'},
        )
        self.agents['hv1'].export_volume.assert_not_called()

    def test_a_move_past_the_over_subscription_ratio_is_refused(self):
        self.flags(group='local', max_over_subscription_ratio=1.0)
        self.agents['hv2'].list_volumes.return_value = [
            volume_pb2.Volume(volume_id='a', size_bytes=95 * GIB),
        ]
        error = self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            self.volume(pool='hv1', size=10),
            {'host': 'hv2'},
        )
        self.assertIn('promised 95.0 GiB of 100.0 GiB', str(error))
        self.agents['hv1'].export_volume.assert_not_called()

    def test_a_move_that_fits_starts(self):
        self.flags(group='local', max_over_subscription_ratio=1.0)
        self.agents['hv2'].list_volumes.return_value = [
            volume_pb2.Volume(volume_id='a', size_bytes=50 * GIB),
        ]
        volume = self.volume(pool='hv1', size=50)
        self.driver.initialize_connection(volume, {'host': 'hv2'})
        self.agents['hv2'].start_transfer.assert_called_once()

    def test_failed_transfer_start_withdraws_the_export(self):
        self.agents[
            'hv2'
        ].start_transfer.side_effect = exception.VolumeBackendAPIException(
            data='no space'
        )
        volume = self.volume(pool='hv1')
        self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            volume,
            {'host': 'hv2'},
        )
        # The token of the move's export withdraws it.
        self.agents['hv1'].unexport_volume.assert_called_once_with(
            volume.name_id,
            release_token=base.release_token_of(volume.name_id, 'hv1'),
            force=False,
        )
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)

    def test_failed_transfer_start_aborts_it_before_withdrawing_export(self):
        # A timed-out StartTransfer may have started on the destination:
        # an orphan left there would be reused by the next attach although
        # its source export is gone.
        steps = []
        self.agents[
            'hv2'
        ].start_transfer.side_effect = client.AgentUnavailable(
            data='DEADLINE_EXCEEDED'
        )
        self.agents['hv2'].abort_transfer.side_effect = lambda transfer_id: (
            steps.append(('abort', transfer_id))
        )
        self.agents['hv1'].unexport_volume.side_effect = (
            lambda volume_id, **kwargs: steps.append(('unexport', volume_id))
        )
        volume = self.volume(pool='hv1')
        self.assertRaises(
            client.AgentUnavailable,
            self.driver.initialize_connection,
            volume,
            {'host': 'hv2'},
        )
        named = self.agents['hv2'].start_transfer.call_args.kwargs[
            'transfer_id'
        ]
        self.assertEqual(
            [('abort', named), ('unexport', volume.name_id)], steps
        )

    def test_export_stays_when_the_failed_transfer_cannot_be_aborted(self):
        # The transfer may be running from that export: keep its source.
        self.agents[
            'hv2'
        ].start_transfer.side_effect = client.AgentUnavailable(
            data='DEADLINE_EXCEEDED'
        )
        self.agents[
            'hv2'
        ].abort_transfer.side_effect = exception.InvalidVolume(
            reason='TRANSFER_WRONG_STATE'
        )
        self.assertRaises(
            client.AgentUnavailable,
            self.driver.initialize_connection,
            self.volume(pool='hv1'),
            {'host': 'hv2'},
        )
        self.agents['hv2'].abort_transfer.assert_called_once()
        self.agents['hv1'].unexport_volume.assert_not_called()

    def test_destination_without_host_nqn_cannot_receive(self):
        self.agents['hv2'].get_node_info.return_value.host_nqn = ''
        self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            self.volume(),
            {'host': 'hv2'},
        )
        self.agents['hv1'].export_volume.assert_not_called()

    def test_chained_move_refused_by_the_agent_is_reported(self):
        self.agents['hv1'].export_volume.side_effect = exception.InvalidVolume(
            reason='volume is still hydrating'
        )
        self.assertRaises(
            exception.InvalidVolume,
            self.driver.initialize_connection,
            self.volume(),
            {'host': 'hv2'},
        )
        self.agents['hv2'].start_transfer.assert_not_called()

    def test_agent_without_transfers_makes_attach_fail_loudly(self):
        self.agents['hv2'].active_transfers_of.side_effect = unimplemented(
            'ListTransfers'
        )
        self.assertRaises(
            exception.NotSupportedOperation,
            self.driver.initialize_connection,
            self.volume(),
            {'host': 'hv2'},
        )

    def test_host_without_agent_gets_an_nvme_tcp_export(self):
        volume = self.volume(pool='hv3')
        connector = {'host': 'controller', 'nqn': 'nqn.controller'}
        connection = self.driver.initialize_connection(volume, connector)

        self.agents['hv3'].export_volume.assert_called_once_with(
            volume.name_id, 'nqn.controller'
        )
        export = base.export_of(volume.name_id, 'hv3')
        self.assertEqual(
            {
                'driver_volume_type': 'nvmeof',
                'data': {
                    'target_nqn': export.subsystem_nqn,
                    'portals': [[export.transport_address, '4420', 'tcp']],
                    'host_nqn': 'nqn.controller',
                    'vol_uuid': volume.name_id,
                    'ns_id': '1',
                },
            },
            connection,
        )
        self.assertEqual(f'{base.BACKEND}#hv3', volume.host)

    def test_authenticated_export_is_refused_for_os_brick_and_withdrawn(self):
        volume = self.volume(pool='hv3')
        self.agents['hv3'].export_volume.side_effect = None
        self.agents['hv3'].export_volume.return_value = base.export_of(
            volume.name_id, 'hv3', secrets=True
        )
        error = self.assertRaises(
            exception.VolumeBackendAPIException,
            self.driver.initialize_connection,
            volume,
            {'host': 'controller', 'nqn': 'nqn.controller'},
        )
        self.assertIn('nvme.auth', str(error))
        self.assertIn('os-brick', str(error))
        self.agents['hv3'].unexport_volume.assert_called_once_with(
            volume.name_id, release_token='', force=False
        )

    def test_nvme_connection_is_understood_by_os_brick(self):
        from os_brick.initiator.connectors import nvmeof

        connection = self.driver.initialize_connection(
            self.volume(), {'host': 'controller', 'nqn': 'nqn.controller'}
        )
        properties = nvmeof.NVMeOFConnProps(connection['data'])
        (target,) = properties.targets
        self.assertEqual(connection['data']['target_nqn'], target.nqn)
        (portal,) = target.portals
        self.assertEqual('tcp', portal.transport)
        self.assertEqual('4420', portal.port)

    def test_os_brick_finds_the_namespace_by_the_agent_volume_uuid(self):
        from os_brick.initiator.connectors import nvmeof

        # A migrated or managed volume: the agent knows it by name_id, and
        # the agent sets the namespace UUID to that id (fabrics.rs
        # namespace_ids), exported as namespace 1 (target.rs EXPORT_NSID).
        agent_volume_id = str(uuid.uuid4())
        volume = self.volume(_name_id=agent_volume_id)
        connection = self.driver.initialize_connection(
            volume, {'host': 'controller', 'nqn': 'nqn.controller'}
        )
        (target,) = nvmeof.NVMeOFConnProps(connection['data']).targets
        self.assertEqual(agent_volume_id, target.uuid)
        # os-brick compares ns_id with the text of sysfs' nsid file.
        self.assertEqual('1', target.ns_id)
        portal = target.portals[0]
        self.mock_object(portal, 'get_device_by_property')
        portal.get_device()
        portal.get_device_by_property.assert_called_once_with(
            'uuid', agent_volume_id
        )


class DetachTestCase(base.DriverTestCase):
    def test_detach_at_home_unpublishes(self):
        volume = self.volume(pool='hv1', attachments=[('hv1', ATTACHED)])
        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv1'})
        )
        self.agents['hv1'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        volume.save.assert_not_called()

    def test_second_attachment_on_the_host_keeps_the_device(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv1', ATTACHED)]
        )
        self.assertTrue(
            self.driver.terminate_connection(volume, {'host': 'hv1'})
        )
        self.assert_no_agent_changes(*base.HOSTS)

    def test_live_migration_commit_when_the_source_detaches(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        order = mock.Mock()
        order.attach_mock(self.agents['hv1'].unpublish_volume, 'unpublish')
        order.attach_mock(self.agents['hv2'].commit_transfer, 'commit')

        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv1'})
        )

        self.assertEqual(
            [
                mock.call.unpublish(volume.name_id),
                mock.call.commit(pending.transfer_id),
            ],
            order.mock_calls,
        )
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)
        volume.save.assert_called_once_with()

    def test_source_detach_commits_a_deferred_move_still_connecting(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, CONNECTING, deferred=True)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        self.driver.terminate_connection(volume, {'host': 'hv1'})
        self.agents['hv2'].commit_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)

    def test_a_busy_source_detaches_and_the_commit_waits(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        self.agents[
            'hv1'
        ].unpublish_volume.side_effect = exception.VolumeIsBusy(
            volume_name=volume.name_id
        )
        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv1'})
        )
        self.agents['hv2'].commit_transfer.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        self.assertEqual(
            {volume.id: ('hv2', pending.transfer_id)},
            self.driver._pending_commits,
        )

    def test_destination_detach_aborts_a_degraded_deferred_move(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEGRADED, deferred=True)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        self.driver.terminate_connection(volume, {'host': 'hv2'})
        self.agents['hv2'].abort_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        volume.save.assert_not_called()

    def test_a_written_destination_commits_instead_of_aborting(self):
        # The guest ran on hv2 before the migration was rolled back or
        # the source attachment went: what it wrote exists only on hv2.
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        destination_written(self.agents['hv2'])

        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv2'})
        )

        self.agents['hv1'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        self.agents['hv2'].commit_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.agents['hv2'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        self.agents['hv1'].unexport_volume.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)

    def test_a_written_destination_stays_deferred_while_the_source_is_open(
        self,
    ):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        destination_written(self.agents['hv2'])
        self.agents[
            'hv1'
        ].unpublish_volume.side_effect = exception.VolumeIsBusy(
            volume_name=volume.name_id
        )
        self.assertRaises(
            exception.VolumeIsBusy,
            self.driver.terminate_connection,
            volume,
            {'host': 'hv2'},
        )
        self.agents['hv2'].commit_transfer.assert_not_called()
        self.agents['hv1'].unexport_volume.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)

    def test_force_detach_commits_a_written_destination(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        destination_written(self.agents['hv2'])

        self.driver.terminate_connection(volume, None, force=True)

        self.agents['hv2'].commit_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.agents['hv1'].unexport_volume.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)

    def test_live_migration_abort_when_the_destination_detaches(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]

        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv2'})
        )

        self.agents['hv2'].abort_transfer.assert_called_once_with(
            pending.transfer_id
        )
        # The move is aborted: nothing needs its export any more.
        self.agents['hv1'].unexport_volume.assert_called_once_with(
            volume.name_id, release_token='', force=True
        )
        self.agents['hv1'].unpublish_volume.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)
        volume.save.assert_not_called()

    def test_destination_detach_without_transfer_changes_nothing(self):
        volume = self.volume(pool='hv1', attachments=[('hv2', ATTACHED)])
        self.driver.terminate_connection(volume, {'host': 'hv2'})
        self.assert_no_agent_changes(*base.HOSTS)

    def test_destination_already_hydrating_becomes_the_home(self):
        volume = self.volume(pool='hv1', attachments=[('hv2', ATTACHED)])
        self.agents['hv2'].active_transfers_of.return_value = [
            base.transfer(volume.name_id, HYDRATING)
        ]
        self.driver.terminate_connection(volume, {'host': 'hv2'})
        self.agents['hv2'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        self.agents['hv2'].abort_transfer.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)

    def test_detach_of_host_without_agent_withdraws_the_export(self):
        volume = self.volume(pool='hv3')
        connector = {'host': 'controller', 'nqn': 'nqn.controller'}
        self.assertFalse(self.driver.terminate_connection(volume, connector))
        self.agents['hv3'].unexport_volume.assert_called_once_with(
            volume.name_id
        )
        self.agents['hv3'].unpublish_volume.assert_not_called()

    def test_force_detach_without_connector_drops_every_path(self):
        volume = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, DEFERRED)
        self.agents['hv2'].active_transfers_of.return_value = [pending]

        self.assertFalse(
            self.driver.terminate_connection(volume, None, force=True)
        )

        self.agents['hv2'].abort_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.agents['hv1'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        self.agents['hv1'].unexport_volume.assert_called_once_with(
            volume.name_id, force=True
        )
        self.assertEqual(f'{base.BACKEND}#hv1', volume.host)

    def test_force_detach_keeps_the_export_of_a_move_in_progress(self):
        # No deferred move was aborted: an export for a move that is
        # still copying is not forced away (the agent refuses without the
        # token), only an attachment's export goes.
        volume = self.volume(pool='hv1', attachments=[('hv1', ATTACHED)])
        self.driver.terminate_connection(volume, None, force=True)
        self.agents['hv1'].unexport_volume.assert_called_once_with(
            volume.name_id, force=False
        )


class WaitingCommitTestCase(base.DriverTestCase):
    """A live migration whose source cannot let go commits later."""

    def db_volume(self, pool='hv1', attachments=(), **fields_):
        volume = tests_utils.create_volume(
            self.ctxt, host=f'{base.BACKEND}#{pool}', **fields_
        )
        volume.volume_attachment = objects.VolumeAttachmentList(
            objects=[
                self._attachment(volume, host, status)
                for host, status in attachments
            ]
        )
        return volume

    def admin_metadata(self, volume):
        return db.volume_admin_metadata_get(self.ctxt, volume.id)

    def migrating(self, state=DEFERRED):
        volume = self.db_volume(
            attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        pending = base.transfer(volume.name_id, state, deferred=True)
        self.agents['hv2'].active_transfers_of.return_value = [pending]
        return volume, pending

    def test_source_agent_down_the_detach_succeeds_and_the_commit_waits(
        self,
    ):
        volume, pending = self.migrating()
        self.agents['hv1'].unpublish_volume.side_effect = unavailable('hv1')
        log = self.useFixture(fixtures.FakeLogger(level=logging.INFO))

        self.assertFalse(
            self.driver.terminate_connection(volume, {'host': 'hv1'})
        )

        self.agents['hv2'].commit_transfer.assert_not_called()
        self.assertEqual('hv1', self.pool_of(volume))
        metadata = self.admin_metadata(volume)
        self.assertEqual(
            f'hv2 {pending.transfer_id}', metadata[driver.COMMIT_PENDING]
        )
        self.assertIn('UNAVAILABLE', metadata[driver.COMMIT_ERROR])
        self.assertIn('cannot commit yet', log.output)
        self.assertIn('Nothing is lost', log.output)

        # Still down at the next poll: still waiting, nothing changed.
        self.driver.retry_pending_commits()
        self.agents['hv2'].commit_transfer.assert_not_called()
        self.assertIn(driver.COMMIT_PENDING, self.admin_metadata(volume))

        # Back: the next poll commits, moves the pool, clears the record.
        self.assert_committed_once_hv1_is_back(volume, pending)
        self.assertEqual({}, self.admin_metadata(volume))
        self.assertEqual({}, self.driver._pending_commits)

    def assert_committed_once_hv1_is_back(self, volume, pending):
        self.agents['hv1'].unpublish_volume.side_effect = None
        self.driver.retry_pending_commits()
        self.agents['hv2'].commit_transfer.assert_called_once_with(
            pending.transfer_id
        )
        self.assertEqual('hv2', self.pool_of(volume))

    def pool_of(self, volume):
        return volume_utils.extract_host(
            db.volume_get(self.ctxt, volume.id).host, 'pool'
        )

    def test_a_written_destination_detach_fails_and_the_commit_waits(self):
        volume, pending = self.migrating()
        destination_written(self.agents['hv2'])
        self.agents['hv1'].unpublish_volume.side_effect = unavailable('hv1')

        # The destination stays attached: its writes stay reachable.
        self.assertRaises(
            client.AgentUnavailable,
            self.driver.terminate_connection,
            volume,
            {'host': 'hv2'},
        )
        self.agents['hv2'].unpublish_volume.assert_not_called()
        self.assertIn(driver.COMMIT_PENDING, self.admin_metadata(volume))
        self.assert_committed_once_hv1_is_back(volume, pending)

    def test_a_commit_done_another_way_is_forgotten(self):
        volume, pending = self.migrating()
        self.agents['hv1'].unpublish_volume.side_effect = unavailable('hv1')
        self.driver.terminate_connection(volume, {'host': 'hv1'})
        # An operator committed (or aborted) it with dmclonectl.
        self.agents['hv2'].active_transfers_of.return_value = [
            base.transfer(volume.name_id, HYDRATING, deferred=False)
        ]
        self.driver.retry_pending_commits()
        self.agents['hv2'].commit_transfer.assert_not_called()
        self.assertEqual({}, self.admin_metadata(volume))
        self.assertEqual({}, self.driver._pending_commits)

    def test_a_deleted_volume_is_forgotten(self):
        volume, _pending = self.migrating()
        self.agents['hv1'].unpublish_volume.side_effect = unavailable('hv1')
        self.driver.terminate_connection(volume, {'host': 'hv1'})
        db.volume_destroy(self.ctxt, volume.id)
        self.driver.retry_pending_commits()
        self.assertEqual({}, self.driver._pending_commits)

    def test_waiting_commits_survive_a_restart_of_the_service(self):
        waiting = tests_utils.create_volume(
            self.ctxt,
            host=f'{base.BACKEND}#hv1',
            admin_metadata={driver.COMMIT_PENDING: 'hv2 transfer-1'},
        )
        tests_utils.create_volume(
            self.ctxt, host=f'{base.BACKEND}#hv2', admin_metadata={'x': 'y'}
        )
        tests_utils.create_volume(
            self.ctxt,
            host='other@backend#hv1',
            admin_metadata={driver.COMMIT_PENDING: 'hv2 transfer-2'},
        )
        self.driver.do_setup(self.ctxt)
        self.assertEqual(
            {waiting.id: ('hv2', 'transfer-1')}, self.driver._pending_commits
        )

    def test_the_stats_poll_retries_in_the_background(self):
        volume, pending = self.migrating()
        self.agents['hv1'].unpublish_volume.side_effect = unavailable('hv1')
        self.driver.terminate_connection(volume, {'host': 'hv1'})
        self.agents['hv1'].unpublish_volume.side_effect = None
        retried = eventlet.event.Event()
        real_retry = self.driver.retry_pending_commits

        def retry():
            real_retry()
            retried.send()

        self.mock_object(self.driver, 'retry_pending_commits', retry)
        self.driver.get_volume_stats(refresh=True)
        with eventlet.Timeout(10):
            retried.wait()
        self.agents['hv2'].commit_transfer.assert_called_once_with(
            pending.transfer_id
        )

    def test_no_retry_thread_while_nothing_waits(self):
        self.mock_object(self.driver, 'retry_pending_commits')
        self.driver.get_volume_stats(refresh=True)
        self.driver.retry_pending_commits.assert_not_called()


class LiveMigrationWindowTestCase(base.DriverTestCase):
    """Until a live migration commits, the source may be behind."""

    def setUp(self):
        super().setUp()
        self.volume_ = self.volume(
            pool='hv1', attachments=[('hv1', ATTACHED), ('hv2', ATTACHED)]
        )
        self.agents['hv2'].active_transfers_of.return_value = [
            base.transfer(self.volume_.name_id, DEFERRED)
        ]

    def assert_refused(self, call, *args):
        error = self.assertRaises(exception.InvalidVolume, call, *args)
        self.assertIn('live-migrated from hv1 to hv2', str(error))
        self.assert_no_agent_changes(*base.HOSTS)

    def test_snapshot_is_refused(self):
        snapshot = self.snapshot(self.volume_)
        snapshot.volume = self.volume_  # with its attachments
        self.assert_refused(self.driver.create_snapshot, snapshot)

    def test_clone_is_refused(self):
        self.assert_refused(
            self.driver.create_cloned_volume, self.volume(), self.volume_
        )

    def test_revert_is_refused(self):
        snapshot = self.snapshot(self.volume_, location='hv1')
        self.assert_refused(
            self.driver.revert_to_snapshot, self.ctxt, self.volume_, snapshot
        )

    def test_extend_is_refused(self):
        self.assert_refused(self.driver.extend_volume, self.volume_, 2)

    def test_an_attach_over_nvme_is_refused(self):
        # copy_volume_to_image or a backup of the in-use volume (force).
        connector = {'host': 'controller', 'nqn': 'nqn.controller'}
        self.assert_refused(
            self.driver.initialize_connection, self.volume_, connector
        )

    def test_after_the_commit_they_run_on_the_new_home(self):
        self.agents['hv2'].active_transfers_of.return_value = [
            base.transfer(self.volume_.name_id, HYDRATING)
        ]
        self.volume_.host = f'{base.BACKEND}#hv2'
        self.driver.create_snapshot(self.snapshot(self.volume_))
        self.agents['hv2'].create_snapshot.assert_called_once()


class MigrateTestCase(base.DriverTestCase):
    def test_other_backend_uses_generic_migration(self):
        moved = self.driver.migrate_volume(
            self.ctxt, self.volume(), {'host': 'ctl@other#hv2'}
        )
        self.assertEqual((False, None), moved)
        self.assert_no_agent_changes(*base.HOSTS)

    def test_unknown_pool_uses_generic_migration(self):
        moved = self.driver.migrate_volume(
            self.ctxt, self.volume(), {'host': f'{base.BACKEND}#hv9'}
        )
        self.assertEqual((False, None), moved)

    def test_pool_to_pool_is_an_agent_transfer(self):
        volume = self.volume(pool='hv1')
        moved = self.driver.migrate_volume(
            self.ctxt, volume, {'host': f'{base.BACKEND}#hv3'}
        )
        self.assertEqual((True, None), moved)
        request = self.agents['hv3'].start_transfer.call_args.kwargs
        self.assertFalse(request['deferred'])
        self.agents['hv1'].export_volume.assert_called_once()
        # Nothing is attached there: the device goes once it has arrived.
        self.agents['hv3'].unpublish_volume.assert_called_once_with(
            volume.name_id
        )
        # The manager writes the new host itself.
        volume.save.assert_not_called()

    def test_same_pool_needs_no_transfer(self):
        moved = self.driver.migrate_volume(
            self.ctxt, self.volume(), {'host': f'{base.BACKEND}#hv1'}
        )
        self.assertEqual((True, None), moved)
        self.assert_no_agent_changes(*base.HOSTS)


class ManageTestCase(base.DriverTestCase):
    def setUp(self):
        super().setUp()
        self.existing_id = str(uuid.uuid4())
        self.agents['hv2'].get_volume.return_value = volume_pb2.Volume(
            volume_id=self.existing_id, size_bytes=GIB + GIB // 2
        )

    def test_size_is_rounded_up_to_whole_gib(self):
        size = self.driver.manage_existing_get_size(
            self.volume(pool='hv2'), {'source-name': self.existing_id}
        )
        self.assertEqual(2, size)
        self.agents['hv2'].get_volume.assert_called_once_with(self.existing_id)

    def test_manage_adopts_the_agent_id_and_fills_the_last_gib(self):
        update = self.driver.manage_existing(
            self.volume(pool='hv2'), {'source-id': self.existing_id}
        )
        self.assertEqual({'_name_id': self.existing_id}, update)
        self.agents['hv2'].extend_volume.assert_called_once_with(
            self.existing_id, 2 * GIB
        )

    def test_manage_volume_with_the_same_id_needs_no_update(self):
        volume = self.volume(pool='hv2', id=self.existing_id)
        self.agents['hv2'].get_volume.return_value.size_bytes = GIB
        self.assertIsNone(
            self.driver.manage_existing(
                volume, {'source-name': self.existing_id}
            )
        )
        self.agents['hv2'].extend_volume.assert_not_called()

    def test_bad_references_are_invalid(self):
        self.agents['hv2'].get_volume.side_effect = client.AgentNotFound(
            agent='hv2', subject='x', detail='no such volume'
        )
        for reference in (
            {},
            {'source-name': 'not-a-uuid'},
            {'source-id': str(uuid.uuid4())},
        ):
            with self.subTest(reference=reference):
                self.assertRaises(
                    exception.ManageExistingInvalidReference,
                    self.driver.manage_existing,
                    self.volume(pool='hv2'),
                    reference,
                )

    def test_published_volume_is_not_managed(self):
        self.agents['hv2'].get_volume.return_value.published = True
        self.assertRaises(
            exception.ManageExistingInvalidReference,
            self.driver.manage_existing_get_size,
            self.volume(pool='hv2'),
            {'source-id': self.existing_id},
        )

    def test_unmanage_leaves_the_agent_volume(self):
        self.driver.unmanage(self.volume())
        self.assert_no_agent_changes(*base.HOSTS)


def _not_found(host='hv1'):
    return client.AgentNotFound(agent=host, subject='x', detail='not here')


class ManageSnapshotTestCase(base.DriverTestCase):
    def setUp(self):
        super().setUp()
        self.volume_ = self.volume(pool='hv2')
        self.existing_id = str(uuid.uuid4())
        for agent in self.agents.values():
            agent.get_snapshot.side_effect = _not_found(agent.name)
        self.on_agent = snapshot_pb2.Snapshot(
            snapshot_id=self.existing_id,
            volume_id=self.volume_.name_id,
            size_bytes=GIB + 1,
            state=snapshot_pb2.SNAPSHOT_STATE_AVAILABLE,
        )

    def kept_on(self, host):
        self.agents[host].get_snapshot.side_effect = None
        self.agents[host].get_snapshot.return_value = self.on_agent

    def new_snapshot(self):
        snapshot = self.snapshot(self.volume_)
        snapshot.volume = self.volume_
        return snapshot

    def test_a_snapshot_left_on_another_host_is_found_there(self):
        self.kept_on('hv3')
        reference = {'source-id': self.existing_id}
        snapshot = self.new_snapshot()
        self.assertEqual(
            2,
            self.driver.manage_existing_snapshot_get_size(snapshot, reference),
        )
        update = self.driver.manage_existing_snapshot(snapshot, reference)
        self.assertEqual(
            {'provider_id': self.existing_id, 'provider_location': 'hv3'},
            update,
        )
        # The volume's home is asked first.
        self.agents['hv2'].get_snapshot.assert_called_with(self.existing_id)
        self.assert_no_agent_changes(*base.HOSTS)

    def test_a_managed_snapshot_is_used_by_its_agent_id(self):
        snapshot = self.snapshot(
            self.volume_, location='hv3', provider_id=self.existing_id
        )
        self.driver.delete_snapshot(snapshot)
        self.agents['hv3'].delete_snapshot.assert_called_once_with(
            self.existing_id
        )
        self.driver.create_volume_from_snapshot(
            self.volume(pool='hv3'), snapshot
        )
        self.assertEqual(
            self.existing_id,
            self.agents['hv3'].create_volume.call_args.kwargs[
                'source_snapshot_id'
            ],
        )

    def test_snapshots_that_cannot_be_managed(self):
        self.kept_on('hv2')
        other = snapshot_pb2.Snapshot()
        other.CopyFrom(self.on_agent)
        other.volume_id = str(uuid.uuid4())
        creating = snapshot_pb2.Snapshot()
        creating.CopyFrom(self.on_agent)
        creating.state = snapshot_pb2.SNAPSHOT_STATE_CREATING
        for reason, answer in (
            ('not of volume', other),
            ('not available', creating),
        ):
            with self.subTest(reason=reason):
                self.agents['hv2'].get_snapshot.return_value = answer
                error = self.assertRaises(
                    exception.ManageExistingInvalidReference,
                    self.driver.manage_existing_snapshot,
                    self.new_snapshot(),
                    {'source-id': self.existing_id},
                )
                self.assertIn(reason, str(error))
        self.agents['hv2'].get_snapshot.side_effect = _not_found('hv2')
        nowhere = str(uuid.uuid4())
        error = self.assertRaises(
            exception.ManageExistingInvalidReference,
            self.driver.manage_existing_snapshot,
            self.new_snapshot(),
            {'source-id': nowhere},
        )
        self.assertIn('no agent has', str(error))

    def test_a_snapshot_cinder_already_knows_is_refused(self):
        self.kept_on('hv2')
        volume = tests_utils.create_volume(self.ctxt)
        for fields_ in ({'id': self.existing_id}, {}):
            with self.subTest(by='id' if fields_ else 'provider id'):
                known = tests_utils.create_snapshot(
                    self.ctxt,
                    volume.id,
                    provider_id=None if fields_ else self.existing_id,
                    **fields_,
                )
                error = self.assertRaises(
                    exception.ManageExistingInvalidReference,
                    self.driver.manage_existing_snapshot,
                    self.new_snapshot(),
                    {'source-name': self.existing_id},
                )
                self.assertIn('already managed', str(error))
                known.destroy()
        # Other snapshots in the database are not this one.
        tests_utils.create_snapshot(self.ctxt, volume.id, provider_id='x')
        self.driver.manage_existing_snapshot(
            self.new_snapshot(), {'source-name': self.existing_id}
        )

    def test_unmanage_snapshot_leaves_it_on_the_agent(self):
        self.driver.unmanage_snapshot(self.snapshot(self.volume_))
        self.assert_no_agent_changes(*base.HOSTS)


class ManageableListTestCase(base.DriverTestCase):
    def test_every_agents_volumes_with_what_makes_them_unsafe(self):
        ids = sorted(str(uuid.uuid4()) for _ in range(4))
        managed = self.volume(pool='hv1', id=ids[0])
        self.agents['hv1'].list_volumes.return_value = [
            volume_pb2.Volume(
                volume_id=ids[0],
                size_bytes=GIB,
                state=volume_pb2.VOLUME_STATE_AVAILABLE,
            ),
            volume_pb2.Volume(
                volume_id=ids[1],
                size_bytes=GIB // 2,
                state=volume_pb2.VOLUME_STATE_AVAILABLE,
            ),
        ]
        self.agents['hv2'].list_volumes.return_value = [
            volume_pb2.Volume(
                volume_id=ids[2],
                size_bytes=3 * GIB,
                published=True,
                state=volume_pb2.VOLUME_STATE_AVAILABLE,
            ),
            volume_pb2.Volume(
                volume_id=ids[3],
                size_bytes=GIB,
                state=volume_pb2.VOLUME_STATE_HYDRATING,
            ),
        ]
        self.agents['hv3'].list_volumes.side_effect = unavailable('hv3')

        listed = self.driver.get_manageable_volumes(
            [managed], None, 10, 0, ['reference'], ['asc']
        )

        got = {
            entry['reference']['source-id']: (
                entry['size'],
                entry['safe_to_manage'],
                entry['reason_not_safe'],
                entry['cinder_id'],
                entry['extra_info'],
            )
            for entry in listed
        }
        self.assertEqual(
            {
                ids[0]: (1, False, 'already managed', managed.id, 'pool hv1'),
                ids[1]: (1, True, None, None, 'pool hv1'),
                ids[2]: (
                    3,
                    False,
                    'published (in use) on its host',
                    None,
                    'pool hv2',
                ),
                ids[3]: (
                    1,
                    False,
                    'not available on its agent (VOLUME_STATE_HYDRATING)',
                    None,
                    'pool hv2',
                ),
            },
            got,
        )
        # Cinder's pagination: two by size, largest first.
        page = self.driver.get_manageable_volumes(
            [managed], None, 2, 0, ['size'], ['desc']
        )
        self.assertEqual([3, 1], [entry['size'] for entry in page])

    def test_every_agents_snapshots_with_their_volume(self):
        volume_id = str(uuid.uuid4())
        kept, managed = str(uuid.uuid4()), str(uuid.uuid4())
        self.agents['hv3'].list_snapshots.return_value = [
            snapshot_pb2.Snapshot(
                snapshot_id=snapshot_id,
                volume_id=volume_id,
                size_bytes=GIB,
                state=snapshot_pb2.SNAPSHOT_STATE_AVAILABLE,
            )
            for snapshot_id in (kept, managed)
        ]
        cinder_snapshot = self.snapshot(
            self.volume(pool='hv3'), provider_id=managed
        )
        listed = self.driver.get_manageable_snapshots(
            [cinder_snapshot], None, 10, 0, ['reference'], ['asc']
        )
        got = {
            entry['reference']['source-id']: (
                entry['safe_to_manage'],
                entry['cinder_id'],
                entry['source_reference'],
            )
            for entry in listed
        }
        self.assertEqual(
            {
                kept: (True, None, {'source-id': volume_id}),
                managed: (
                    False,
                    cinder_snapshot.id,
                    {'source-id': volume_id},
                ),
            },
            got,
        )


class VolumeLockTestCase(base.DriverTestCase):
    """Attach and detach of one volume never interleave."""

    MOCK_TOOZ = False

    def _record_slow_calls(self, agent_method, log, name):
        def slow(*args, **kwargs):
            log.append(('enter', name))
            eventlet.sleep(0.1)
            log.append(('exit', name))
            return '/dev/fake'

        agent_method.side_effect = slow

    def _run_together(self, *calls):
        threads = [eventlet.spawn(call) for call in calls]
        for thread in threads:
            thread.wait()

    def test_same_volume_is_serialized(self):
        log = []
        agent = self.agents['hv1']
        self._record_slow_calls(agent.publish_volume, log, 'attach')
        self._record_slow_calls(agent.unpublish_volume, log, 'detach')
        volume = self.volume(pool='hv1')
        self._run_together(
            lambda: self.driver.initialize_connection(volume, {'host': 'hv1'}),
            lambda: self.driver.terminate_connection(volume, {'host': 'hv1'}),
        )
        self.assertEqual(log[0][0], 'enter')
        self.assertEqual(log[1], ('exit', log[0][1]))

    def test_different_volumes_run_concurrently(self):
        log = []
        agent = self.agents['hv1']
        self._record_slow_calls(agent.publish_volume, log, 'attach')
        self._record_slow_calls(agent.unpublish_volume, log, 'detach')
        first, second = self.volume(pool='hv1'), self.volume(pool='hv1')
        self._run_together(
            lambda: self.driver.initialize_connection(first, {'host': 'hv1'}),
            lambda: self.driver.terminate_connection(second, {'host': 'hv1'}),
        )
        self.assertEqual(['enter', 'enter'], [event for event, _ in log[:2]])


class ImageCopyTestCase(base.DriverTestCase):
    """cinder's default image copy attaches on the cinder-volume host."""

    CONNECTOR = {'host': 'controller', 'nqn': 'nqn.controller'}

    def setUp(self):
        super().setUp()
        self.mock_object(
            volume_utils,
            'brick_get_connector_properties',
            return_value=dict(self.CONNECTOR),
        )
        self.brick = mock.Mock()
        self.brick.connect_volume.return_value = {'path': '/dev/nvme1n1'}
        self.brick.check_valid_device.return_value = True
        self.get_connector = self.mock_object(
            volume_utils, 'brick_get_connector', return_value=self.brick
        )
        self.upload = self.mock_object(volume_utils, 'upload_volume')

    def test_volume_to_image_reads_an_nvme_tcp_export(self):
        volume = self.volume(pool='hv2')
        self.driver.copy_volume_to_image(
            self.ctxt, volume, mock.sentinel.images, {'id': 'image'}
        )

        agent = self.agents['hv2']
        agent.export_volume.assert_called_once_with(
            volume.name_id, 'nqn.controller'
        )
        self.assertEqual('nvmeof', self.get_connector.call_args.args[0])
        connected = self.brick.connect_volume.call_args.args[0]
        self.assertEqual(
            base.export_of(volume.name_id, 'hv2').subsystem_nqn,
            connected['target_nqn'],
        )
        self.assertEqual('/dev/nvme1n1', self.upload.call_args.args[3])
        agent.unexport_volume.assert_called_once_with(volume.name_id)
        agent.publish_volume.assert_not_called()
        self.assertEqual(f'{base.BACKEND}#hv2', volume.host)
