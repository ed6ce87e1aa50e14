"""The driver end to end: Cinder, the driver, three real agents, one kernel.

What is real here:
* three dmclone agents "hv1", "hv2" and "hv3" (tests/e2e/agents.py), each
  with its own pool, device-mapper prefix, NVMe/TCP export port and host
  NQN, and a mutual-TLS API; they release moved volumes on each other over
  mTLS with a [peers] identity. Certificates come from a CA made for this run;
* the driver, loaded by cinder's own VolumeManager from a cinder.conf
  backend section, as cinder-volume loads it, and talking gRPC to the
  agents (under eventlet, as cinder-volume does by default);
* Cinder's database (cinder's TestCase: in-memory SQLite with the real
  schema) and objects: volumes, snapshots and attachments are rows, so the
  pool the driver saves into volume.host is read back from the database;
* attach and detach go through cinder's volume API (attachment_create,
  attachment_delete, as nova calls them) and the volume manager
  (attachment_update, attachment_delete). Only the RPC hop between them
  is replaced by a direct call (_DirectVolumeRpc);
* devices: what the driver returns is opened in this kernel, written and
  read back with O_DIRECT; an NVMe/TCP attach is connected by the kernel's
  NVMe host, as os-brick would do with nvme-cli.

Create, delete, extend, snapshot and revert call the driver directly, as
the volume manager's flows do, and apply its model updates.
"""

import collections
import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from unittest import mock
import uuid

from cinder import context
from cinder import exception
from cinder import objects
from cinder.compute import nova
from cinder.db import api as db
from cinder.objects import fields
from cinder.scheduler import host_manager
from cinder.scheduler.filters import capabilities_filter
from cinder.scheduler.filters import capacity_filter
from cinder.tests.unit import fake_constants as fake
from cinder.tests.unit import utils as tests_utils
from cinder.volume import api as volume_api
from cinder.volume import configuration
from cinder.volume import driver as cinder_driver
from cinder.volume import manager as volume_manager
from cinder.volume import volume_types
from cinder.volume import volume_utils
from eventlet import patcher
from eventlet import tpool
import fixtures
import grpc
import grpc.experimental
from oslo_config import cfg

from dmclone_cinder import client
from dmclone_cinder import driver as dmclone_driver
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2_grpc
from tests import base
from tests.e2e import agents
from tests.e2e import blockdev
from tests.e2e import pki
from tests.e2e.agents import say
from tests.e2e.blockdev import GIB
from tests.e2e.blockdev import MIB

CONF = cfg.CONF
SERVICE_HOST = 'cinder-local'
BACKEND = f'{SERVICE_HOST}@local'
HOSTS = ('hv1', 'hv2', 'hv3')
# A host with no agent: the cinder-volume machine itself (image copy,
# backup, generic migration attach over NVMe/TCP).
CONTROLLER = 'cinder-ctl'

# Where patterns go: spread over the 1 GiB volume, first and last MiB
# included; ZERO is never written.
OFFSETS = (0, 255 * MIB, 512 * MIB, 768 * MIB, GIB - MIB)
ZERO = 100 * MIB
# Written on the destination while it hydrates or before commit.
MIDDLE = 700 * MIB
KIB = 1 << 10
# The agents' changed-block granularity (volumes.change_block_size default).
CBT_BLOCK = 64 * KIB

TRANSFER_TIMEOUT = 300
RELEASE_TIMEOUT = 150

_BED = None


class _Bed:
    """The agents and certificates every test of this module shares."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix='dmclone-e2e-', dir='/tmp')
        bins = agents.binaries()
        pki_dir = os.path.join(self.root, 'pki')
        os.mkdir(pki_dir, 0o700)
        self.authority = pki.Authority(pki_dir)
        self.cinder_identity = self.authority.issue('cinder-volume')
        stranger_dir = os.path.join(self.root, 'stranger')
        os.mkdir(stranger_dir, 0o700)
        self.stranger = pki.Authority(stranger_dir, 'some other CA')
        self.stranger_identity = self.stranger.issue('intruder')
        pools = agents.pool_devices(len(HOSTS))
        self.agents = {
            name: agents.Agent(
                name, number, self.root, bins, self.authority, pool
            )
            for number, (name, pool) in enumerate(
                zip(HOSTS, pools, strict=True), 1
            )
        }
        for agent in self.agents.values():
            agent.clients += [
                f'{other.peer_identity}=peer@{other.host_nqn}'
                for other in self.agents.values()
                if other is not agent
            ]

    def start(self):
        for agent in self.agents.values():
            started = time.monotonic()
            node = agent.start()
            say(
                f'agent {agent.name} serves {agent.endpoint} '
                f'(node {node["node_id"]}, pool '
                f'{node["pool"]["data_total_bytes"] / GIB:.2f} GiB on '
                f'{agent.pool_device or "a file"}, '
                f'host NQN {node["host_nqn"]}) after '
                f'{time.monotonic() - started:.1f} s'
            )

    def stop(self):
        for agent in self.agents.values():
            agent.stop()
        results = os.environ.get('DMCLONE_E2E_RESULTS')
        if results and os.path.isdir(results):
            for agent in self.agents.values():
                if os.path.exists(agent.log_path):
                    shutil.copy(agent.log_path, results)
        shutil.rmtree(self.root, ignore_errors=True)


def setUpModule():
    global _BED
    _BED = _Bed()
    try:
        _BED.start()
    except Exception:
        _BED.stop()
        raise


def tearDownModule():
    if _BED is not None:
        _BED.stop()


def connector_for(host, nqn=None):
    """A connector as os-brick's get_connector_properties makes it."""
    connector = {
        'platform': 'x86_64',
        'os_type': 'linux',
        'ip': '127.0.0.1',
        'host': host,
        'multipath': False,
        'enforce_multipath': False,
        'initiator': f'iqn.1993-08.org.debian:01:{host}',
    }
    if nqn:
        connector['nqn'] = nqn
    return connector


class _DirectVolumeRpc:
    """VolumeAPI (the RPC client) as a direct call into the manager.

    Like the RPC layer, it hands the manager a copy of the volume and the
    connector, and it routes by volume.service_topic_queue, which must stay
    this backend whatever pool the volume moved to.
    """

    def __init__(self, testcase, manager):
        self._test = testcase
        self._manager = manager

    def _route(self, vref):
        self._test.assertEqual(
            BACKEND, volume_utils.extract_host(vref.service_topic_queue)
        )
        return vref.obj_clone()

    def attachment_update(self, ctxt, vref, connector, attachment_id):
        return self._manager.attachment_update(
            ctxt, self._route(vref), copy.deepcopy(connector), attachment_id
        )

    def attachment_delete(self, ctxt, attachment_id, vref):
        return self._manager.attachment_delete(
            ctxt, attachment_id, self._route(vref)
        )


class DriverE2ETestCase(base.TestCase):
    # The driver's per-volume locks are real tooz file locks here.
    MOCK_TOOZ = False

    def setUp(self):
        super().setUp()
        self.assertIsNotNone(_BED, 'the agents did not start')
        self.bed = _BED
        self.hv = _BED.agents
        for agent in self.hv.values():
            self.assertTrue(agent.running(), f'agent {agent.name} died')
        self.addOnException(self._show_agent_logs)
        self._load_cinder_conf()
        self.ctxt = context.RequestContext(
            fake.USER_ID,
            fake.PROJECT_ID,
            is_admin=True,
            roles=['admin', 'member', 'reader'],
            # nova calls with a service token (attachment deletion checks)
            service_roles=['service'],
        )
        self.volume_type = volume_types.create(
            self.ctxt, 'local', {'volume_backend_name': 'local'}
        )
        # As cinder-volume does for enabled_backends = local.
        self.manager = volume_manager.VolumeManager(
            service_name='local', host=BACKEND
        )
        self.driver = self.manager.driver
        # What init_host sets up, which the manager's extend reads.
        self.manager.stats.setdefault('pools', {})
        self.assertIsInstance(self.driver, dmclone_driver.DMCloneDriver)
        self.driver.do_setup(self.ctxt)
        self.driver.check_for_setup_error()
        self.driver.set_initialized()
        self.api = volume_api.API()
        self.api.volume_rpcapi = _DirectVolumeRpc(self, self.manager)

    def _load_cinder_conf(self):
        directory = self.useFixture(fixtures.TempDir()).path
        path = os.path.join(directory, 'cinder.conf')
        agents_option = ','.join(
            f'{name}={agent.endpoint}' for name, agent in self.hv.items()
        )
        identity = self.bed.cinder_identity
        stranger = self.bed.stranger_identity
        with open(path, 'w') as conf:
            conf.write(
                f"""\
[DEFAULT]
enabled_backends = local

[local]
volume_driver = dmclone_cinder.driver.DMCloneDriver
volume_backend_name = local
backend_host = {SERVICE_HOST}
dmclone_agents = {agents_option}
dmclone_tls_ca_file = {self.bed.authority.ca_file}
dmclone_tls_cert_file = {identity.cert}
dmclone_tls_key_file = {identity.key}
dmclone_call_timeout = 60

# The same agents, with a client certificate of another CA.
[untrusted]
volume_driver = dmclone_cinder.driver.DMCloneDriver
volume_backend_name = untrusted
dmclone_agents = {agents_option}
dmclone_tls_ca_file = {self.bed.authority.ca_file}
dmclone_tls_cert_file = {stranger.cert}
dmclone_tls_key_file = {stranger.key}
dmclone_call_timeout = 10
"""
            )
        # cinder's TestCase parsed an empty command line; parse ours. The
        # fixtures' overrides (database, lock_path, coordination) stay.
        CONF(['--config-file', path], default_config_files=[])

    def _show_agent_logs(self, exc_info):
        kind = exc_info[0]
        if issubclass(kind, unittest.SkipTest) or kind.__name__ in (
            '_ExpectedFailure',
            '_UnexpectedSuccess',
        ):
            return
        for agent in self.hv.values():
            say(
                f'--- last lines of {agent.log_path} (agent {agent.name}):\n'
                f'{agent.log_tail(40)}'
            )

    # Cinder objects in the database

    def new_volume(self, pool, size=1, **fields_):
        return tests_utils.create_volume(
            self.ctxt,
            host=volume_utils.append_host(BACKEND, pool),
            size=size,
            status='creating',
            volume_type_id=self.volume_type['id'],
            **fields_,
        )

    def available(self, volume, model_update=None):
        volume.update(model_update or {})
        volume.status = 'available'
        volume.save()
        return self.reload(volume)

    def create_volume(self, pool, size=1):
        volume = self.new_volume(pool, size)
        self.driver.create_volume(volume)
        return self.available(volume)

    def reload(self, volume):
        return objects.Volume.get_by_id(self.ctxt, volume.id)

    def pool_of(self, volume):
        return volume_utils.extract_host(self.reload(volume).host, 'pool')

    def delete_volume(self, volume):
        self.driver.delete_volume(self.reload(volume))
        for agent in self.hv.values():
            self.assertIsNone(agent.volume(volume.name_id), agent.name)

    def create_snapshot(self, volume):
        snapshot = tests_utils.create_snapshot(self.ctxt, volume.id)
        update = self.driver.create_snapshot(snapshot)
        snapshot.update(update or {})
        snapshot.status = fields.SnapshotStatus.AVAILABLE
        snapshot.save()
        return objects.Snapshot.get_by_id(self.ctxt, snapshot.id)

    def ensure_service(self):
        """The cinder-volume service row the scheduler and API read."""
        if not hasattr(self, '_service'):
            self._service = tests_utils.create_service(
                self.ctxt,
                {
                    'host': BACKEND,
                    'binary': 'cinder-volume',
                    'topic': 'cinder-volume',
                },
            )

    def migrate(self, volume, pool):
        """cinder migrate to another pool of this backend: the API's state
        change, then the volume manager of the source, which lets the
        driver move a volume without attachments itself."""
        self.ensure_service()
        volume = self.reload(volume)
        volume.update(
            {
                'migration_status': 'starting',
                'previous_status': volume.status,
                'status': 'maintenance',
            }
        )
        volume.save()
        destination = volume_utils.append_host(BACKEND, pool)
        self.manager.migrate_volume(
            self.ctxt, volume, {'host': destination, 'capabilities': {}}
        )
        volume = self.reload(volume)
        self.assertEqual('success', volume.migration_status)
        self.assertEqual('available', volume.status)
        self.assertEqual(destination, volume.host)

    def assert_deletable(self, volume):
        try:
            self.driver.delete_volume(self.reload(volume))
        except exception.VolumeIsBusy as err:
            self.fail(f'delete_volume: {err}')
        for agent in self.hv.values():
            self.assertIsNone(agent.volume(volume.name_id), agent.name)

    def _remove_everywhere(self, volume):
        """Best-effort cleanup with dmclonectl, not with the driver."""
        for agent in self.hv.values():
            try:
                for transfer in agent.transfers_of(volume.name_id):
                    if transfer['state'] not in ('done', 'failed', 'aborted'):
                        agent.ctl(
                            'transfer',
                            'abort',
                            transfer['transfer_id'],
                            '--force',
                        )
            except agents.CtlError as err:
                say(f'cleanup of {volume.name_id} on {agent.name}: {err}')
        for agent in self.hv.values():
            try:
                found = agent.volume(volume.name_id)
                if found is None:
                    continue
                if agents.nvmet_subsystems_of(volume.name_id):
                    agent.ctl('volume', 'unexport', volume.name_id, '--force')
                for snapshot in agent.snapshots():
                    if snapshot['volume_id'] == volume.name_id:
                        agent.ctl(
                            'snapshot', 'delete', snapshot['snapshot_id']
                        )
                if found['published']:
                    agent.ctl('volume', 'unpublish', volume.name_id)
                agent.ctl('volume', 'delete', volume.name_id)
            except agents.CtlError as err:
                say(f'cleanup of {volume.name_id} on {agent.name}: {err}')

    def _drop_reserved_attachments(self, volume):
        """After a failed attachment_create nova deletes the attachment."""
        for attachment in objects.VolumeAttachmentList.get_all_by_volume_id(
            self.ctxt, volume.id
        ):
            self.api.attachment_delete(self.ctxt, attachment)

    # Attach and detach as nova does it: attachment_create with a
    # connector (which runs attachment_update on the volume service), the
    # complete call, and attachment_delete.

    def attach(self, volume, host, instance=None, nqn=None):
        vref = self.reload(volume)
        attachment = self.api.attachment_create(
            self.ctxt,
            vref,
            instance or str(uuid.uuid4()),
            connector=connector_for(host, nqn),
        )
        attachment = objects.VolumeAttachment.get_by_id(
            self.ctxt, attachment.id
        )
        attachment.attach_status = fields.VolumeAttachStatus.ATTACHED
        attachment.save()
        vref = self.reload(volume)
        vref.update({'status': 'in-use', 'attach_status': 'attached'})
        vref.save()
        return attachment, dict(attachment.connection_info)

    def attach_locally(self, volume, host, instance=None):
        attachment, info = self.attach(volume, host, instance)
        self.assertEqual('local', info['driver_volume_type'], info)
        path = info['device_path']
        self.assertEqual(self.hv[host].public_path(volume.name_id), path)
        self.assertTrue(blockdev.is_block_device(path), path)
        return attachment, path

    def detach(self, attachment):
        attachment = objects.VolumeAttachment.get_by_id(
            self.ctxt, attachment.id
        )
        self.api.attachment_delete(self.ctxt, attachment)

    @contextlib.contextmanager
    def attached(self, volume, host):
        attachment, path = self.attach_locally(volume, host)
        try:
            yield path
        finally:
            self.detach(attachment)
        self.assertFalse(os.path.exists(path), f'{path} still there')

    # Data

    def assert_data(self, path, expected, seeds=()):
        """expected: {offset: seed or None (zeros)}."""
        for offset, seed in sorted(expected.items()):
            data = blockdev.read(path, offset)
            if seed is None:
                wanted = bytes(MIB)
            else:
                wanted = blockdev.pattern(seed, offset)
            if data != wanted:
                known = {s for s in (*seeds, *expected.values()) if s}
                self.fail(
                    f'{path} at {offset // MIB} MiB holds '
                    f'{blockdev.describe(data, sorted(known), offset)}, '
                    f'expected {"zeros" if seed is None else seed}'
                )

    def assert_image(self, path, expected, length=GIB):
        """Every MiB of the device's first length bytes as expected says
        ({offset: seed or None}), zeros wherever it is silent."""
        offset = blockdev.first_mismatch(path, length, expected)
        if offset is not None:
            self.assert_data(
                path, {offset: expected.get(offset)}, expected.values()
            )
            self.fail(f'{path} at {offset // MIB} MiB differed, then matched')

    @staticmethod
    def layout(seed, overrides=None):
        """seed's pattern at OFFSETS, zeros at ZERO, then overrides."""
        expected = dict.fromkeys(OFFSETS, seed)
        expected[ZERO] = None
        expected.update(overrides or {})
        return expected

    # Agents

    def wait_transfer(self, agent, volume_id, released=True, ended=()):
        """Wait until the move of volume_id to agent is done (and the
        source released its copy); fail on failed or aborted. Transfers
        in ended (from before) are not that move."""
        before = {transfer['transfer_id'] for transfer in ended}
        started = time.monotonic()
        deadline = started + (RELEASE_TIMEOUT if released else 0)
        deadline += TRANSFER_TIMEOUT
        shown = started
        while True:
            transfers = [
                transfer
                for transfer in agent.transfers_of(volume_id)
                if transfer['transfer_id'] not in before
            ]
            self.assertEqual(1, len(transfers), transfers)
            transfer = transfers[0]
            state = transfer['state']
            self.assertNotIn(state, ('failed', 'aborted'), transfer)
            if state == 'done' and (
                transfer['source_released'] or not released
            ):
                return transfer, time.monotonic() - started
            now = time.monotonic()
            if now > deadline:
                self.fail(
                    f'transfer to {agent.name} not done'
                    f'{" and released" if released else ""} after '
                    f'{now - started:.0f} s: {transfer}'
                )
            if now - shown > 15:
                shown = now
                say(
                    f'  transfer to {agent.name}: {state}, '
                    f'{transfer["bytes_hydrated"] // MIB}/'
                    f'{transfer["bytes_total"] // MIB} MiB, released '
                    f'{transfer["source_released"]}'
                )
            time.sleep(1)

    def assert_no_export(self, volume):
        self.assertEqual([], agents.nvmet_subsystems_of(volume.name_id))


class DMCloneDriverE2E(DriverE2ETestCase):
    def test_1_setup_and_stats_report_one_pool_per_agent(self):
        # cinder-volume's default threading model: eventlet, so every
        # agent call runs in a native tpool thread (client.py).
        self.assertIsInstance(
            self.driver._agents['hv1']._transport,
            client.PerThreadChannelTransport,
        )
        stats = self.driver.get_volume_stats(refresh=True)
        self.assertEqual('local', stats['volume_backend_name'])
        self.assertEqual('up', stats['backend_state'])
        pools = {pool['pool_name']: pool for pool in stats['pools']}
        self.assertEqual(set(HOSTS), set(pools))
        for host, agent in self.hv.items():
            node = agent.node()['pool']
            pool = pools[host]
            total = node['data_total_bytes'] / GIB
            # A 4 GiB pool, minus label and thin-pool metadata.
            self.assertGreater(total, 3.5)
            self.assertLess(total, 4)
            self.assertAlmostEqual(
                round(total, 2), pool['total_capacity_gb'], delta=0.01
            )
            free = (node['data_total_bytes'] - node['data_used_bytes']) / GIB
            self.assertAlmostEqual(free, pool['free_capacity_gb'], delta=0.05)
            self.assertEqual('up', pool['agent_state'])
            self.assertEqual(node['volume_count'], pool['total_volumes'])
            self.assertAlmostEqual(
                node['provisioned_bytes'] / GIB,
                pool['provisioned_capacity_gb'],
                delta=0.01,
            )
            say(
                f'pool {host}: total {pool["total_capacity_gb"]} GiB, '
                f'free {pool["free_capacity_gb"]} GiB'
            )
            # The agents log Cinder's request id with every call.
            self.assertIn(
                f'request_id="{self.ctxt.request_id}"', agent.log_tail(200)
            )

    def test_1_a_volume_beyond_the_pool_is_refused_for_rescheduling(self):
        # 4 GiB of pool, over-subscription 20: 100 GiB cannot be promised.
        volume = self.new_volume('hv1', size=100)
        with self.assertRaises(exception.VolumeBackendAPIException) as err:
            self.driver.create_volume(volume)
        say(f'create 100 GiB: {err.exception}')
        self.assertIn('RESOURCE_EXHAUSTED', str(err.exception))
        self.assertIsNone(self.hv['hv1'].volume(volume.name_id))

    def test_1_an_agent_down_is_a_down_pool_and_a_clear_error(self):
        hv2 = self.hv['hv2']
        volume = self.create_volume('hv1')
        self.addCleanup(self.delete_volume, volume)
        hv2.stop()
        self.addCleanup(lambda: hv2.running() or hv2.start())

        stats = self.driver.get_volume_stats(refresh=True)
        pools = {pool['pool_name']: pool for pool in stats['pools']}
        self.assertEqual('up', stats['backend_state'])
        # What cinder's services API shows for the backend: up.
        self.assertEqual(
            {'up'}, {pool['backend_state'] for pool in stats['pools']}
        )
        self.assertEqual('up', pools['hv1']['agent_state'])
        self._as_the_scheduler_and_service_list_see_it(stats)
        down = pools['hv2']
        self.assertEqual(
            ('down', 0, 0),
            (
                down['agent_state'],
                down['total_capacity_gb'],
                down['free_capacity_gb'],
            ),
        )
        # Calls that need it fail with the reason, well before the
        # configured 60 s deadline: no hang.
        started = time.monotonic()
        with self.assertRaises(exception.VolumeBackendAPIException) as err:
            self.driver.create_volume(self.new_volume('hv2'))
        took = time.monotonic() - started
        say(f'create on hv2 while it is down ({took:.1f} s): {err.exception}')
        self.assertIn('UNAVAILABLE', str(err.exception))
        self.assertLess(took, 60)
        with self.assertRaises(exception.VolumeBackendAPIException):
            self.attach(volume, 'hv2')
        self._drop_reserved_attachments(volume)
        # The volume stays where it was, untouched.
        self.assert_no_export(volume)
        self.assertEqual('hv1', self.pool_of(volume))
        self.assertFalse(self.hv['hv1'].volume(volume.name_id)['published'])

        hv2.start()
        stats = self.driver.get_volume_stats(refresh=True)
        pools = {pool['pool_name']: pool for pool in stats['pools']}
        self.assertEqual('up', pools['hv2']['agent_state'])
        self.assertGreater(pools['hv2']['free_capacity_gb'], 3)

    def _as_the_scheduler_and_service_list_see_it(self, stats):
        """The stats through cinder's HostManager, as the scheduler gets
        them, and the backend state `cinder service-list` (API 3.49)
        computes from its pools (api/v3/services.py)."""
        self.ensure_service()
        manager = host_manager.HostManager()
        manager.update_service_capabilities(
            'volume', BACKEND, stats, None, None
        )
        pools = {
            pool['name']: pool['capabilities']
            for pool in manager.get_pools(self.ctxt)
        }
        self.assertEqual(
            {volume_utils.append_host(BACKEND, host) for host in HOSTS},
            set(pools),
        )
        backend_state = {}
        for name, capabilities in pools.items():
            backend_state[volume_utils.extract_host(name)] = capabilities.get(
                'backend_state', 'up'
            )
        say(f'service list: {BACKEND} backend_state {backend_state}')
        self.assertEqual({BACKEND: 'up'}, backend_state)
        hv2 = pools[volume_utils.append_host(BACKEND, 'hv2')]
        self.assertEqual(
            ('down', 0), (hv2['agent_state'], hv2['free_capacity_gb'])
        )
        # The scheduler's capacity filter keeps new volumes off it.
        backends = {
            backend.backend_id: backend
            for backend in manager.get_all_backend_states(self.ctxt)
        }
        capacity = capacity_filter.CapacityFilter()
        request = {'size': 1, 'request_spec': {'volume_properties': {}}}
        fits = {
            volume_utils.extract_host(backend_id, 'pool'): (
                capacity.backend_passes(backend, dict(request))
            )
            for backend_id, backend in backends.items()
        }
        self.assertEqual({'hv1': True, 'hv2': False, 'hv3': True}, fits)

    def test_1_update_host_without_pool_is_repaired(self):
        # cinder-manage volume update_host --newhost writes host@backend:
        # the pool part, where the volume lives, is gone.
        volume = self.create_volume('hv2')
        self.addCleanup(self.delete_volume, volume)
        vref = self.reload(volume)
        vref.host = volume_utils.extract_host(vref.host, 'backend')
        vref.save()

        # What cinder-volume asks at start for such a volume.
        self.assertEqual('hv2', self.driver.get_pool(self.reload(volume)))
        with self.attached(volume, 'hv2') as path:
            self.assertEqual(GIB, blockdev.size_of(path))
        self.assertEqual('hv2', self.pool_of(volume))
        say('update_host lost the pool; the attach found and restored hv2')

    def test_1_untrusted_client_certificate_gets_down_pools(self):
        untrusted = dmclone_driver.DMCloneDriver(
            configuration=configuration.Configuration(
                cinder_driver.volume_opts, config_group='untrusted'
            ),
            host=f'{SERVICE_HOST}@untrusted',
        )
        untrusted.do_setup(self.ctxt)
        # Unreachable (here: refused) agents do not stop the backend...
        untrusted.check_for_setup_error()
        stats = untrusted.get_volume_stats(refresh=True)
        # ...they are pools that are down.
        self.assertEqual('down', stats['backend_state'])
        self.assertEqual(
            {host: 'down' for host in HOSTS},
            {p['pool_name']: p['agent_state'] for p in stats['pools']},
        )
        agent = untrusted._agents['hv1']
        with self.assertRaises(client.AgentUnavailable) as caught:
            agent.get_node_info()
        say(f'a client of another CA gets: {caught.exception}')

    def test_1_plain_grpcio_on_the_unix_socket_needs_one_option(self):
        """grpcio sends a unix: target's socket path as :authority, which
        the agent's HTTP/2 server (the h2 crate) rejects as malformed
        before any handler runs; default_authority is the one option a
        client needs (README, "Other clients on the socket")."""
        socket = self.bed.agents['hv1'].socket
        plain, with_option = _node_info_over_socket(socket)
        say(f'grpcio {grpc.__version__} on the socket, no option: {plain}')
        self.assertEqual('INTERNAL', plain[0], plain)
        self.assertEqual('hv1', with_option)

    def test_2_local_attach_then_attach_elsewhere_moves_the_volume(self):
        volume = self.create_volume('hv1')
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        on_hv1 = hv1.volume(volume.name_id)
        self.assertEqual(GIB, on_hv1['size_bytes'])
        self.assertFalse(on_hv1['published'])

        attachment, path = self.attach_locally(volume, 'hv1')
        self.assertEqual(GIB, blockdev.size_of(path))
        self.assertTrue(hv1.volume(volume.name_id)['published'])
        blockdev.write_pattern(path, 1, OFFSETS)
        self.assert_data(path, self.layout(1))
        self.detach(attachment)
        self.assertFalse(os.path.exists(path))
        self.assertFalse(hv1.volume(volume.name_id)['published'])
        self.assertEqual('hv1', self.pool_of(volume))

        # Attach on hv2: hv1 exports, hv2 presents the volume at once and
        # hydrates it; the pool follows at once.
        attachment, path = self.attach_locally(volume, 'hv2')
        returned = time.monotonic()
        self.assert_data(path, self.layout(1))
        say(
            f'hv2 read the volume through its arriving copy '
            f'{time.monotonic() - returned:.2f} s after the attach returned'
        )
        self.assertEqual('hv2', self.pool_of(volume))
        (transfer,) = hv2.transfers_of(volume.name_id)
        self.assertIn(
            transfer['state'],
            ('connecting', 'hydrating', 'finalizing', 'done'),
        )
        # Written on hv2 while it hydrates.
        blockdev.write_pattern(path, 2, [MIDDLE])

        transfer, took = self.wait_transfer(hv2, volume.name_id)
        say(
            f'1 GiB moved hv1 -> hv2 and released in {took:.1f} s '
            f'(finalize paused I/O {transfer["finalize_pause_micros"]} us)'
        )
        self.assertIsNone(hv1.volume(volume.name_id), 'hv1 kept its copy')
        self.assert_no_export(volume)
        on_hv2 = hv2.volume(volume.name_id)
        self.assertEqual(GIB, on_hv2['size_bytes'])
        self.assertEqual('available', on_hv2['state'])
        self.assertTrue(on_hv2['published'])
        self.assertEqual(path, on_hv2['device_path'])
        self.assert_data(path, self.layout(1, {MIDDLE: 2}))

        self.detach(attachment)
        self.assertFalse(os.path.exists(path))
        self.assertFalse(hv2.volume(volume.name_id)['published'])
        self.delete_volume(volume)
        # Deleting it again (a retried delete) succeeds.
        self.driver.delete_volume(self.reload(volume))

    def test_2_a_transfer_start_the_driver_gave_up_on_leaves_no_orphan(
        self,
    ):
        """The driver's StartTransfer deadline passes while the agent is
        still starting the move: the driver aborts what it named and
        withdraws the export; nothing of that move may stay on hv2, and
        the next attach works."""
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        hv2 = self.hv['hv2']
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 19, OFFSETS)
        transport = self.driver._agents['hv2']._transport
        timeout_of = transport.timeout_of
        # Shorter than the agent needs to connect the source (0.3 s here).
        self.mock_object(
            transport,
            'timeout_of',
            side_effect=lambda method: (
                0.05 if method == 'StartTransfer' else timeout_of(method)
            ),
        )
        with self.assertRaises(exception.VolumeBackendAPIException) as err:
            self.attach(volume, 'hv2')
        say(f'attach with a StartTransfer given up on: {err.exception}')
        self.assertIn('DEADLINE_EXCEEDED', str(err.exception))
        self._drop_reserved_attachments(volume)
        # The agent may finish what it began after the abort; it must not
        # leave it running (its source export is gone).
        time.sleep(5)
        left = [
            transfer
            for transfer in hv2.transfers_of(volume.name_id)
            if transfer['state'] not in ('aborted', 'failed')
        ]
        self.assertEqual([], left)
        with open(hv2.log_path, errors='replace') as log:
            stopped = 'start stopped' in log.read()
        path_taken = (
            'stopped the start the abort overtook'
            if stopped
            else 'had recorded the start'
        )
        states = [t['state'] for t in hv2.transfers_of(volume.name_id)]
        say(f'hv2 {path_taken}; its transfers of the volume: {states}')
        self.assertIsNone(hv2.volume(volume.name_id))
        self.assert_no_export(volume)
        self.assertEqual('hv1', self.pool_of(volume))

        transport.timeout_of = timeout_of
        ended = hv2.transfers_of(volume.name_id)
        attachment, path = self.attach_locally(volume, 'hv2')
        self.assert_data(path, self.layout(19))
        self.wait_transfer(hv2, volume.name_id, ended=ended)
        self.detach(attachment)
        self.delete_volume(volume)

    def test_3_live_migration_defers_then_commits(self):
        """Live migration hv2 -> hv1 of an attached volume with a
        snapshot: deferred until the source lets go, then committed; the
        snapshot follows once the volume arrived, only where it differs
        from the volume crossing (what either host wrote after it)."""
        volume = self.create_volume('hv2')
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        instance = str(uuid.uuid4())
        source, source_path = self.attach_locally(volume, 'hv2', instance)
        blockdev.write_pattern(source_path, 3, OFFSETS)
        snapshot = self.create_snapshot(volume)

        # pre_live_migration on hv1: the same instance attaches there
        # while its hv2 attachment is still attached.
        target, path = self.attach_locally(volume, 'hv1', instance)
        (transfer,) = hv1.transfers_of(volume.name_id)
        self.assertEqual('deferred', transfer['state'])
        self.assertEqual('hv2', self.pool_of(volume))
        self.assertTrue(hv2.volume(volume.name_id)['published'])
        self.assert_data(path, self.layout(3))
        # The source still writes; the destination reads it through.
        blockdev.write_pattern(source_path, 4, [OFFSETS[1]])
        self.assert_data(path, {OFFSETS[1]: 4})
        # nova may repeat the call: the same transfer and device again.
        again = self.driver.initialize_connection(
            self.reload(volume), connector_for('hv1')
        )
        self.assertEqual(path, again['data']['device_path'])
        self.assertEqual(
            [transfer['transfer_id']],
            [t['transfer_id'] for t in hv1.transfers_of(volume.name_id)],
        )
        # After the switch-over the instance writes on the destination.
        blockdev.write_pattern(path, 5, [MIDDLE])
        self.assert_data(path, {MIDDLE: 5})
        time.sleep(1)
        (transfer,) = hv1.transfers_of(volume.name_id)
        self.assertEqual('deferred', transfer['state'], 'hydration began')

        # post_live_migration: the source's attachment goes -> commit.
        self.detach(source)
        self.assertFalse(os.path.exists(source_path))
        self.assertEqual('hv1', self.pool_of(volume))
        transfer, took = self.wait_transfer(hv1, volume.name_id)
        received = transfer['snapshot_bytes_received']
        say(
            f'live migration hv2 -> hv1 committed, hydrated in {took:.1f} s; '
            f'{received} bytes of the snapshot received'
        )
        self.assert_snapshot_moved(transfer, snapshot, hv2, hv1)
        # The MiB hv2 wrote while exported, and the one hv1 wrote.
        self.assertEqual(2 * MIB, received, transfer)
        self.assertIsNone(hv2.volume(volume.name_id), 'hv2 kept its copy')
        self.assert_no_export(volume)
        expected = self.layout(3, {OFFSETS[1]: 4, MIDDLE: 5})
        self.assert_data(path, expected)
        self.driver.delete_snapshot(self.reload_snapshot(snapshot))
        self.assertNotIn(snapshot.id, self.snapshot_ids(hv1))

        self.detach(target)
        self.assertFalse(os.path.exists(path))
        self.assertEqual('hv1', self.pool_of(volume))
        with self.attached(volume, 'hv1') as path:
            self.assert_data(path, expected)
        self.delete_volume(volume)

    def test_3_source_agent_down_at_the_commit_loses_no_write(self):
        """nova's sequence with the source agent down when nova deletes
        the source attachment (post_live_migration), and still down when
        the instance is deleted on the destination."""
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        instance = str(uuid.uuid4())
        source, source_path = self.attach_locally(volume, 'hv1', instance)
        blockdev.write_pattern(source_path, 14, OFFSETS)
        # pre_live_migration: attachment_create with hv2's connector while
        # hv1's attachment is attached; then attachment_complete.
        target, path = self.attach_locally(volume, 'hv2', instance)
        (transfer,) = hv2.transfers_of(volume.name_id)
        self.assertTrue(transfer['deferred'], transfer)
        # The instance runs on hv2 now and writes there.
        blockdev.write_pattern(path, 15, [MIDDLE, OFFSETS[2]])
        expected = self.layout(14, {MIDDLE: 15, OFFSETS[2]: 15})
        self.assert_image(path, expected)

        hv1.stop()
        self.addCleanup(lambda: hv1.running() or hv1.start())
        # post_live_migration: the source attachment goes. The detach
        # succeeds (nova would only log a failure); the commit waits.
        self.detach(source)
        self.assertEqual([], self._attachments_on(volume, 'hv1'))
        metadata = self._admin_metadata(volume)
        say(f'source agent down at the commit: {metadata}')
        self.assertEqual(
            f'hv2 {transfer["transfer_id"]}',
            metadata.get(dmclone_driver.COMMIT_PENDING),
        )
        self.assertIn('UNAVAILABLE', metadata[dmclone_driver.COMMIT_ERROR])
        self.assertEqual('hv1', self.pool_of(volume))
        # A snapshot now would read hv1's stale copy: refused.
        with self.assertRaises(exception.InvalidVolume) as caught:
            self.driver.create_snapshot(
                tests_utils.create_snapshot(self.ctxt, volume.id)
            )
        say(f'snapshot while the commit waits: {caught.exception}')

        # The instance is deleted on hv2 while hv1 is still down: the
        # detach cannot commit either, so it fails and hv2 keeps serving.
        with self.assertRaises(exception.VolumeBackendAPIException):
            self.detach(target)
        self.assert_image(path, expected)
        (transfer,) = hv2.transfers_of(volume.name_id)
        self.assertTrue(transfer['deferred'], transfer)

        # hv1 back: the next stats poll commits in the background.
        hv1.start()
        self.driver.get_volume_stats(refresh=True)
        started = time.monotonic()
        while dmclone_driver.COMMIT_PENDING in self._admin_metadata(volume):
            self.assertLess(time.monotonic() - started, 60, 'no commit')
            time.sleep(0.5)
        say(
            f'commit went through {time.monotonic() - started:.1f} s after '
            f'the poll that found hv1 back'
        )
        self.assertEqual('hv2', self.pool_of(volume))
        transfer, took = self.wait_transfer(hv2, volume.name_id)
        say(f'hydrated and released in {took:.1f} s')
        self.assertIsNone(hv1.volume(volume.name_id), 'hv1 kept its copy')
        self.assert_no_export(volume)
        # nova's retried detach, then a new attach: every write is there.
        self.detach(target)
        with self.attached(volume, 'hv2') as path:
            self.assert_image(path, expected)
        self.delete_volume(volume)

    def test_3_live_migration_of_a_volume_still_arriving(self):
        """nova live-migrates an instance whose volume is still being
        copied to its host: hv1 -> hv2 by an attach (hydrating, slowed
        down), then hv2 -> hv3 by nova's live migration sequence while
        hv2 copies. hv3 reads what hv2 lacks through hv2 from hv1."""
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        hv1, hv2, hv3 = (self.hv[host] for host in HOSTS)
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 21, OFFSETS)
        instance = str(uuid.uuid4())
        # The instance starts on hv2: the volume moves there.
        source, source_path = self.attach_locally(volume, 'hv2', instance)
        (arriving,) = hv2.transfers_of(volume.name_id)
        hv2.ctl(
            'transfer', 'throttle', arriving['transfer_id'], '--max-rate', '2M'
        )
        self.assertEqual('hv2', self.pool_of(volume))
        blockdev.write_pattern(source_path, 22, [MIDDLE])

        # pre_live_migration on hv3 while hv2 still copies.
        target, path = self.attach_locally(volume, 'hv3', instance)
        (onward,) = hv3.transfers_of(volume.name_id)
        self.assertTrue(onward['deferred'], onward)
        (arriving,) = hv2.transfers_of(volume.name_id)
        self.assertEqual('hydrating', arriving['state'], arriving)
        self.assertLess(arriving['bytes_hydrated'], GIB)
        self.assertEqual('hv2', self.pool_of(volume))
        self.assert_data(path, self.layout(21, {MIDDLE: 22}))
        # The source still writes; the destination reads it through.
        blockdev.write_pattern(source_path, 23, [OFFSETS[1]])
        self.assert_data(path, {OFFSETS[1]: 23})
        # After the switch-over the instance writes on hv3.
        blockdev.write_pattern(path, 24, [OFFSETS[2]])

        # post_live_migration: hv2's attachment goes -> commit on hv3.
        self.detach(source)
        self.assertEqual('hv3', self.pool_of(volume))
        transfer, took = self.wait_transfer(hv3, volume.name_id)
        say(
            f'live migration of an arriving volume hv2 -> hv3 committed, '
            f'hydrated and released in {took:.1f} s; chain '
            f'{transfer["upstream"]}'
        )
        self.assertEqual(
            [hv2.node()['node_id'], hv1.node()['node_id']],
            transfer['upstream'],
        )
        # hv2 passed the volume on without finishing, then released hv1.
        started = time.monotonic()
        while not hv2.transfers_of(volume.name_id)[0]['source_released']:
            self.assertLess(time.monotonic() - started, RELEASE_TIMEOUT)
            time.sleep(1)
        (passed,) = hv2.transfers_of(volume.name_id)
        self.assertEqual('done', passed['state'])
        self.assertEqual(hv3.node()['host_nqn'], passed['passed_on_to'])
        self.assertIsNone(hv2.volume(volume.name_id), 'hv2 kept its copy')
        self.assertIsNone(hv1.volume(volume.name_id), 'hv1 kept its copy')
        self.assert_no_export(volume)
        expected = self.layout(
            21, {MIDDLE: 22, OFFSETS[1]: 23, OFFSETS[2]: 24}
        )
        self.assert_data(path, expected)
        self.detach(target)
        with self.attached(volume, 'hv3') as path:
            self.assert_data(path, expected)
        self.delete_volume(volume)

    def _admin_metadata(self, volume):
        return db.volume_admin_metadata_get(self.ctxt, volume.id)

    def _attachments_on(self, volume, host):
        return [
            attachment
            for attachment in self.reload(volume).volume_attachment
            if attachment.attached_host == host
        ]

    def test_4_aborted_live_migration_leaves_the_source_untouched(self):
        volume = self.create_volume('hv1')
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        instance = str(uuid.uuid4())
        source, source_path = self.attach_locally(volume, 'hv1', instance)
        blockdev.write_pattern(source_path, 6, OFFSETS)

        target, path = self.attach_locally(volume, 'hv2', instance)
        (transfer,) = hv2.transfers_of(volume.name_id)
        self.assertEqual('deferred', transfer['state'])
        self.assertEqual(1, len(agents.nvmet_subsystems_of(volume.name_id)))
        self.assert_data(path, self.layout(6))

        # Rollback: nova deletes the new attachment.
        self.detach(target)
        self.assertFalse(os.path.exists(path))
        self.assertIsNone(hv2.volume(volume.name_id))
        self.assertEqual(
            ['aborted'],
            [t['state'] for t in hv2.transfers_of(volume.name_id)],
        )
        self.assert_no_export(volume)
        self.assertEqual('hv1', self.pool_of(volume))
        on_hv1 = hv1.volume(volume.name_id)
        self.assertTrue(on_hv1['published'])
        self.assertEqual(source_path, on_hv1['device_path'])
        self.assert_data(source_path, self.layout(6))
        blockdev.write_pattern(source_path, 7, [MIDDLE])
        self.assert_data(source_path, {MIDDLE: 7})

        self.detach(source)
        self.delete_volume(volume)

    def test_4_a_destination_written_before_the_commit_keeps_its_writes(
        self,
    ):
        # The instance ran on hv2 after the switch-over, but the source
        # attachment never went (its delete failed, nova went on): the
        # move is still deferred when the volume is detached on hv2.
        volume = self.create_volume('hv1')
        hv2 = self.hv['hv2']
        instance = str(uuid.uuid4())
        source, source_path = self.attach_locally(volume, 'hv1', instance)
        blockdev.write_pattern(source_path, 8, OFFSETS)
        target, path = self.attach_locally(volume, 'hv2', instance)
        blockdev.write_pattern(path, 9, [MIDDLE])
        expected = self.layout(8, {MIDDLE: 9})

        # An abort would drop what hv2 wrote: the driver commits instead.
        self.detach(target)
        self.assertEqual('hv2', self.pool_of(volume))
        transfer, took = self.wait_transfer(hv2, volume.name_id)
        say(
            f'detach of a written destination committed the move, '
            f'hydrated in {took:.1f} s: {transfer["state"]}'
        )
        self.assert_no_export(volume)
        self.assertIsNone(self.hv['hv1'].volume(volume.name_id))

        self.detach(source)  # the stale one: nothing left on hv1
        with self.attached(volume, 'hv2') as path:
            self.assert_data(path, expected)
        self.delete_volume(volume)

    def test_5_snapshots_clones_revert_extend_delete(self):
        hv1 = self.hv['hv1']
        volume = self.create_volume('hv1')
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 10, OFFSETS)
        snapshot = self.create_snapshot(volume)
        self.assertEqual('hv1', snapshot.provider_location)
        self.assertIn(
            (snapshot.id, volume.name_id),
            {(s['snapshot_id'], s['volume_id']) for s in hv1.snapshots()},
        )
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 11, OFFSETS)

        # A larger volume from the snapshot: the snapshot's data, zeros
        # beyond it, writable to its end.
        larger = self.new_volume('hv1', size=2, snapshot_id=snapshot.id)
        update = self.driver.create_volume_from_snapshot(larger, snapshot)
        self.assertIsNone(update)
        larger = self.available(larger, update)
        self.assertEqual(2 * GIB, hv1.volume(larger.name_id)['size_bytes'])
        end = 2 * GIB - MIB
        with self.attached(larger, 'hv1') as path:
            self.assertEqual(2 * GIB, blockdev.size_of(path))
            self.assert_data(
                path, self.layout(10, {GIB + ZERO: None, end: None})
            )
            blockdev.write_pattern(path, 12, [end])
            self.assert_data(path, {end: 12})

        # A clone has the volume's current data and its own life.
        clone = self.new_volume('hv1', source_volid=volume.id)
        update = self.driver.create_cloned_volume(clone, self.reload(volume))
        self.assertIsNone(update)
        clone = self.available(clone, update)
        with self.attached(clone, 'hv1') as path:
            self.assert_data(path, self.layout(11))
            blockdev.write_pattern(path, 13, [0])

        # Revert, detached: the snapshot's data is back.
        self.driver.revert_to_snapshot(
            self.ctxt, self.reload(volume), snapshot
        )
        attachment, path = self.attach_locally(volume, 'hv1')
        self.assert_data(path, self.layout(10))
        # Refused while attached.
        with self.assertRaises(exception.InvalidVolume) as caught:
            self.driver.revert_to_snapshot(
                self.ctxt, self.reload(volume), snapshot
            )
        say(f'revert while attached: {caught.exception}')
        self.assertEqual('VOLUME_PUBLISHED', caught.exception.refusal_reason)
        self.detach(attachment)

        # The agent keeps a volume that has snapshots: busy, not error.
        with self.assertRaises(exception.VolumeIsBusy) as caught:
            self.driver.delete_volume(self.reload(volume))
        self.assertEqual(
            'VOLUME_HAS_SNAPSHOTS', caught.exception.refusal_reason
        )
        self.driver.delete_snapshot(snapshot)
        self.assertNotIn(
            snapshot.id, {s['snapshot_id'] for s in hv1.snapshots()}
        )
        self.driver.delete_snapshot(snapshot)  # already gone: success

        # Extend, detached.
        self.driver.extend_volume(self.reload(clone), 3)
        clone.size = 3
        clone.save()
        self.assertEqual(3 * GIB, hv1.volume(clone.name_id)['size_bytes'])
        with self.attached(clone, 'hv1') as path:
            self.assertEqual(3 * GIB, blockdev.size_of(path))
            self.assert_data(
                path,
                self.layout(11, {0: 13, 2 * GIB: None, 3 * GIB - MIB: None}),
            )

        # cinder-volume's start checks every volume.
        self.driver.ensure_export(self.ctxt, self.reload(clone))
        for each in (volume, larger, clone):
            self.delete_volume(each)
        self.driver.delete_volume(self.reload(volume))  # again: success
        with self.assertRaises(client.AgentNotFound):
            self.driver.ensure_export(self.ctxt, self.reload(clone))

    def test_5_online_extend_while_published(self):
        """cinder extend of an in-use volume: the volume manager's
        extend_volume, as the scheduler hands it over, with nova's
        volume-extended event recorded instead of sent."""
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        stats = self.driver.get_volume_stats(refresh=True)
        (pool,) = [p for p in stats['pools'] if p['pool_name'] == 'hv1']
        # What the scheduler asks of the pool for an attached volume.
        extend_in_use = {
            'request_spec': {
                'operation': 'extend_volume',
                'volume_properties': {'attach_status': 'attached'},
            }
        }
        self.assertTrue(
            capabilities_filter.CapabilitiesFilter()._satisfies_extra_specs(
                pool, extend_in_use
            )
        )
        sent = self.mock_object(nova.API, 'extend_volume')
        instance = str(uuid.uuid4())
        attachment, path = self.attach_locally(volume, 'hv1', instance)
        blockdev.write_pattern(path, 16, OFFSETS)
        with open(path, 'rb') as held:  # as QEMU holds it
            vref = self.reload(volume)
            vref.status = 'extending'
            vref.save()
            self.manager.extend_volume(self.ctxt, self.reload(volume), 2, [])
            self.assertEqual(2 * GIB, blockdev.size_of(path))
            self.assertEqual(held.seek(0, os.SEEK_END), 2 * GIB)
        vref = self.reload(volume)
        self.assertEqual((2, 'in-use'), (vref.size, vref.status))
        sent.assert_called_once_with(mock.ANY, [instance], volume.id)
        self.assertEqual(
            2 * GIB, self.hv['hv1'].volume(volume.name_id)['size_bytes']
        )
        end = 2 * GIB - MIB
        blockdev.write_pattern(path, 17, [end])
        self.assert_data(path, self.layout(16, {GIB + ZERO: None, end: 17}))
        say(f'in-use extend: {path} is 2 GiB, written to its last MiB')
        self.detach(attachment)
        self.delete_volume(volume)

    def test_5_clone_across_pools_and_what_operators_made_by_hand(self):
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        # An image cache volume on hv1; the scheduler put the new volume
        # on hv2 (clone_across_pools).
        cached = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, cached)
        with self.attached(cached, 'hv1') as path:
            blockdev.write_pattern(path, 18, OFFSETS)
        stats = self.driver.get_volume_stats(refresh=True)
        self.assertTrue(
            all(pool['clone_across_pools'] for pool in stats['pools'])
        )
        clone = self.new_volume('hv2', source_volid=cached.id)
        self.addCleanup(self._remove_everywhere, clone)
        update = self.driver.create_cloned_volume(clone, self.reload(cached))
        self.assertIsNone(update)
        clone = self.available(clone, update)
        self.assertEqual('hv2', self.pool_of(clone))
        attachment, path = self.attach_locally(clone, 'hv2')
        self.assert_data(path, self.layout(18))
        transfer, took = self.wait_transfer(hv2, clone.name_id)
        say(f'clone made on hv1, moved to hv2, hydrated in {took:.1f} s')
        self.detach(attachment)
        self.assertIsNone(hv1.volume(clone.name_id), 'hv1 kept the clone')
        self.assertIsNotNone(hv1.volume(cached.name_id))

        # Made with dmclonectl on hv1: a volume and a snapshot of a
        # Cinder volume, listed as manageable, then managed.
        loose = str(uuid.uuid4())
        hv1.ctl('volume', 'create', loose, '1GiB')
        self.addCleanup(hv1.ctl, 'volume', 'delete', loose)
        by_hand = str(uuid.uuid4())
        hv1.ctl('snapshot', 'create', by_hand, '--volume', cached.name_id)
        listed = {
            entry['reference']['source-id']: entry
            for entry in self.driver.get_manageable_volumes(
                [self.reload(cached)], None, 100, 0, ['reference'], ['asc']
            )
        }
        self.assertTrue(listed[loose]['safe_to_manage'], listed[loose])
        self.assertEqual('pool hv1', listed[loose]['extra_info'])
        self.assertEqual(cached.id, listed[cached.name_id]['cinder_id'])
        snapshots = {
            entry['reference']['source-id']: entry
            for entry in self.driver.get_manageable_snapshots(
                [], None, 100, 0, ['reference'], ['asc']
            )
        }
        self.assertEqual(
            {'source-id': cached.name_id},
            snapshots[by_hand]['source_reference'],
        )
        snapshot = tests_utils.create_snapshot(
            self.ctxt, cached.id, status='creating'
        )
        reference = {'source-id': by_hand}
        self.assertEqual(
            1,
            self.driver.manage_existing_snapshot_get_size(snapshot, reference),
        )
        update = self.driver.manage_existing_snapshot(snapshot, reference)
        self.assertEqual(
            {'provider_id': by_hand, 'provider_location': 'hv1'}, update
        )
        snapshot.update(dict(update, status='available'))
        snapshot.save()
        with self.assertRaises(exception.ManageExistingInvalidReference):
            self.driver.manage_existing_snapshot(
                tests_utils.create_snapshot(self.ctxt, cached.id), reference
            )
        # A volume from the managed snapshot has its data.
        restored = self.new_volume('hv1', snapshot_id=snapshot.id)
        self.addCleanup(self._remove_everywhere, restored)
        restored = self.available(
            restored,
            self.driver.create_volume_from_snapshot(
                restored, objects.Snapshot.get_by_id(self.ctxt, snapshot.id)
            ),
        )
        with self.attached(restored, 'hv1') as path:
            self.assert_data(path, self.layout(18))
        self.driver.delete_snapshot(
            objects.Snapshot.get_by_id(self.ctxt, snapshot.id)
        )
        self.assertNotIn(by_hand, {s['snapshot_id'] for s in hv1.snapshots()})
        for each in (restored, clone, cached):
            self.delete_volume(each)

    def test_6_migration_between_pools_takes_the_snapshots_along(self):
        """cinder migrate to another pool (the driver moves the volume
        without attachment): its snapshot follows it, only where it
        differs from the volume crossing, and is usable on the new host
        (a volume from it, a revert in place, delete); the old host keeps
        nothing."""
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 20, OFFSETS)
        snapshot = self.create_snapshot(volume)
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 21, [MIDDLE])

        self.migrate(volume, 'hv2')
        self.assertEqual('hv2', self.pool_of(volume))
        transfer, took = self.wait_transfer(hv2, volume.name_id)
        received = transfer['snapshot_bytes_received']
        say(
            f'migrated hv1 -> hv2 with its snapshot in {took:.1f} s; '
            f'{received} bytes of the snapshot received'
        )
        self.assert_snapshot_moved(transfer, snapshot, hv1, hv2)
        # The snapshot differs from the volume in the MiB written after it.
        self.assertEqual(MIB, received)
        self.assertIsNone(hv1.volume(volume.name_id), 'hv1 kept its copy')
        self.assert_no_export(volume)

        # A volume from the snapshot: made on hv2, where the scheduler put
        # it and where the snapshot is now.
        restored = self.new_volume('hv2', snapshot_id=snapshot.id)
        self.addCleanup(self._remove_everywhere, restored)
        update = self.driver.create_volume_from_snapshot(
            restored, self.reload_snapshot(snapshot)
        )
        self.assertIsNone(update)
        self.assertEqual(
            'hv2', self.reload_snapshot(snapshot).provider_location
        )
        restored = self.available(restored, update)
        self.assertIsNone(hv1.volume(restored.name_id))
        with self.attached(restored, 'hv2') as restored_path:
            self.assert_data(restored_path, self.layout(20, {MIDDLE: None}))
        self.delete_volume(restored)

        # Revert in place, on hv2.
        self.driver.revert_to_snapshot(
            self.ctxt, self.reload(volume), self.reload_snapshot(snapshot)
        )
        with self.attached(volume, 'hv2') as path:
            self.assert_data(path, self.layout(20, {MIDDLE: None}))

        self.driver.delete_snapshot(self.reload_snapshot(snapshot))
        self.assertNotIn(snapshot.id, self.snapshot_ids(hv2))
        # Migrated with nothing attached: no device stays behind on hv2.
        self.assertFalse(hv2.volume(volume.name_id)['published'])
        self.assert_deletable(volume)

    def test_6_snapshots_follow_the_instance_there_and_back(self):
        """The instance moves hv1 -> hv2 (an attach elsewhere) with a
        snapshot taken on hv1: the snapshot follows, and a volume from it
        is made on hv2. The instance moves back: hv1 kept its old copy
        (transfer.keep_source_copy_seconds), so only what changed on hv2
        comes back (a return trip), and the snapshot comes back too."""
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        self.restart_with(hv1, '--transfer-keep-source-copy-seconds', '900')
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 23, OFFSETS)
        snapshot = self.create_snapshot(volume)

        attachment, path = self.attach_locally(volume, 'hv2')
        blockdev.write_pattern(path, 24, [MIDDLE])
        transfer, took = self.wait_transfer(hv2, volume.name_id)
        say(f'hv1 -> hv2 with the snapshot in {took:.1f} s')
        self.assert_snapshot_moved(transfer, snapshot, hv1, hv2)
        # The snapshot differs from the volume where hv2 wrote.
        self.assertEqual(MIB, transfer['snapshot_bytes_received'], transfer)
        self.assertEqual('warm', hv1.volume(volume.name_id)['state'])

        restored = self.new_volume('hv2', snapshot_id=snapshot.id)
        self.addCleanup(self._remove_everywhere, restored)
        update = self.driver.create_volume_from_snapshot(
            restored, self.reload_snapshot(snapshot)
        )
        self.assertIsNone(update)
        restored = self.available(restored, update)
        with self.attached(restored, 'hv2') as restored_path:
            self.assert_data(restored_path, self.layout(23))
        self.delete_volume(restored)
        self.detach(attachment)

        # Back to hv1, onto the copy it kept.
        ended = hv1.transfers_of(volume.name_id)
        attachment, path = self.attach_locally(volume, 'hv1')
        self.assert_data(path, self.layout(23, {MIDDLE: 24}))
        transfer, took = self.wait_transfer(hv1, volume.name_id, ended=ended)
        say(
            f'back hv2 -> hv1 in {took:.1f} s: {transfer["bytes_total"]} '
            f'bytes to copy, {transfer["bytes_skipped"]} skipped; '
            f'{transfer["message"]}'
        )
        self.assertGreaterEqual(
            transfer['bytes_skipped'], GIB - 8 * MIB, transfer
        )
        self.assertLessEqual(transfer['bytes_total'], 8 * MIB, transfer)
        self.assert_snapshot_moved(transfer, snapshot, hv2, hv1)
        # Only where the snapshot differs from the volume (the MiB written
        # on hv2) crosses, however early hv1 was done.
        self.assertEqual(MIB, transfer['snapshot_bytes_received'], transfer)
        self.assert_data(path, self.layout(23, {MIDDLE: 24}))
        self.detach(attachment)

        self.driver.delete_snapshot(self.reload_snapshot(snapshot))
        self.assertEqual(
            'hv1', self.reload_snapshot(snapshot).provider_location
        )
        self.assertNotIn(snapshot.id, self.snapshot_ids(hv1))
        self.assert_deletable(volume)

    def assert_snapshot_moved(self, transfer, snapshot, source, destination):
        """The move's one snapshot arrived on destination, available, and
        the source, released, keeps none."""
        self.assertEqual(
            (1, 1, True),
            (
                transfer['snapshots_total'],
                transfer['snapshots_arrived'],
                transfer['source_released'],
            ),
            transfer,
        )
        self.assertNotIn(snapshot.id, self.snapshot_ids(source))
        arrived = {
            s['snapshot_id']: s['state'] for s in destination.snapshots()
        }
        self.assertEqual('available', arrived.get(snapshot.id), arrived)

    @staticmethod
    def snapshot_ids(agent):
        return {s['snapshot_id'] for s in agent.snapshots()}

    def reload_snapshot(self, snapshot):
        return objects.Snapshot.get_by_id(self.ctxt, snapshot.id)

    def restart_with(self, agent, *flags):
        """Runs agent with flags for this scenario, as before afterwards."""

        def restart(extra):
            agent.stop()
            agent.extra_flags = list(extra)
            agent.start()

        restart(flags)
        self.addCleanup(restart, ())

    def test_7_nvmeof_attach_for_a_host_without_agent(self):
        volume = self.create_volume('hv1')
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 30, OFFSETS)
        with self.assertRaises(exception.InvalidConnectorException):
            self.driver.validate_connector(connector_for(CONTROLLER))

        host_id = str(uuid.uuid4())
        nqn = f'nqn.2014-08.org.nvmexpress:uuid:{host_id}'
        attachment, info = self.attach(volume, CONTROLLER, nqn=nqn)
        self.assertEqual('nvmeof', info['driver_volume_type'], info)
        hv1 = self.hv['hv1']
        self.assertEqual(
            [['127.0.0.1', str(hv1.export_port), 'tcp']], info['portals']
        )
        self.assertEqual(nqn, info['host_nqn'])
        self.assertEqual(
            [info['target_nqn']], agents.nvmet_subsystems_of(volume.name_id)
        )
        with nvme_connected(info, nqn, host_id) as device:
            self.assertEqual(GIB, blockdev.size_of(device))
            self.assert_data(device, self.layout(30))
            say(f'{CONTROLLER} read the volume over NVMe/TCP at {device}')

        self.detach(attachment)
        self.assert_no_export(volume)
        self.assertEqual('hv1', self.pool_of(volume))
        self.delete_volume(volume)

    def test_8_os_brick_nvmeof_attach(self):
        """What nova/cinder would run for an nvmeof connection: os-brick."""
        volume = self.create_volume('hv1')
        with self.attached(volume, 'hv1') as path:
            blockdev.write_pattern(path, 40, OFFSETS)
        host_id = str(uuid.uuid4())
        nqn = f'nqn.2014-08.org.nvmexpress:uuid:{host_id}'
        attachment, info = self.attach(volume, CONTROLLER, nqn=nqn)
        self.addCleanup(self.delete_volume, volume)
        self.addCleanup(self.detach, attachment)

        from os_brick import privileged
        from os_brick.initiator import connector

        # In-process privileges: the test runs as root.
        privileged.default.set_client_mode(False)
        self.addCleanup(privileged.default.set_client_mode, True)
        brick = connector.InitiatorConnector.factory(
            'NVMEOF', None, use_multipath=False, device_scan_attempts=3
        )
        data = {
            key: value
            for key, value in info.items()
            if key not in ('driver_volume_type', 'attachment_id')
        }
        self.assertIsNotNone(
            shutil.which('nvme'),
            'os-brick runs `nvme connect`: install nvme-cli '
            '(tests/install-deps does)',
        )
        device = brick.connect_volume(data)
        try:
            self.assert_data(device['path'], self.layout(40))
        finally:
            _disconnect_with_brick(brick, data, device)
        self.assertEqual([], _controllers_of(data['target_nqn']))

    def test_9_changed_blocks_since_a_checkpoint_and_a_snapshot(self):
        """Changed-block tracking: dm-era in the agents' volume stack.

        Cinder has no changed-block API, so the driver never calls
        MarkCheckpoint or GetChangedBlocks (backups take Cinder's generic
        full copy): this checks what the agents serve a direct caller, the
        driver's client for the unary calls and a plain gRPC stub for the
        streamed one. Volumes are made, attached, snapshotted, cloned and
        moved through the driver; data goes through the attached devices.
        """
        volume = self.create_volume('hv1')
        self.addCleanup(self._remove_everywhere, volume)
        name = volume.name_id
        before = [(0, MIB)]  # blocks 0-15, before any checkpoint
        with self.attached(volume, 'hv1') as path:
            write_extents(path, 60, before)

        # A checkpoint of the detached volume, then three writes: a whole
        # block, a block's worth across a block boundary (two blocks), and
        # 4 KiB inside one block.
        first = self.mark_checkpoint('hv1', volume)
        after_first = [
            (5 * MIB, CBT_BLOCK),
            (300 * MIB + 32 * KIB, CBT_BLOCK),
            (700 * MIB + 8 * KIB, 4 * KIB),
        ]
        with self.attached(volume, 'hv1') as path:
            write_extents(path, 61, after_first)
        since_first = self.changed_since('hv1', name, era=first)
        self.assertEqual(blocks_of(after_first), since_first.blocks)
        # A volume made empty knows its whole history.
        self.assertEqual(
            blocks_of(before + after_first),
            self.changed_since('hv1', name, era=0).blocks,
        )

        # A Cinder snapshot of the detached volume records the era after
        # it, and nothing has been written since.
        snap1 = self.create_snapshot(volume)
        self.addCleanup(self._drop_snapshot, snap1)
        era1 = self.snapshot_era('hv1', snap1)
        self.assertGreater(era1, first)
        nothing = self.changed_since('hv1', name, snapshot_id=snap1.id)
        self.assertEqual((era1, set()), (nothing.since_era, nothing.blocks))

        # While attached (published): a checkpoint and a snapshot, each
        # with writes before and after it.
        again = [(5 * MIB, CBT_BLOCK), (900 * MIB, 2 * CBT_BLOCK)]
        late = [(100 * MIB + 60 * KIB, 8 * KIB)]  # across a boundary
        last = [(GIB - 4 * KIB, 4 * KIB)]  # the volume's last block
        with self.attached(volume, 'hv1') as path:
            write_extents(path, 62, again)
            second = self.mark_checkpoint('hv1', volume)
            self.assertGreater(second, era1)
            write_extents(path, 63, late)
            self.assertEqual(
                blocks_of(late),
                self.changed_since('hv1', name, era=second).blocks,
            )
            snap2 = self.create_snapshot(volume)
            self.addCleanup(self._drop_snapshot, snap2)
            era2 = self.snapshot_era('hv1', snap2)
            self.assertGreater(era2, second)
            write_extents(path, 64, last)
            self.assertEqual(
                blocks_of(last),
                self.changed_since('hv1', name, snapshot_id=snap2.id).blocks,
            )
        since_snap1 = self.changed_since('hv1', name, snapshot_id=snap1.id)
        self.assertEqual(blocks_of(again + late + last), since_snap1.blocks)
        # An answer's next_era is where the next question starts: since
        # the first answer, exactly what was written after it.
        self.assertEqual(
            blocks_of(again + late + last),
            self.changed_since('hv1', name, era=since_first.next_era).blocks,
        )
        self.assertEqual(
            blocks_of(after_first + again + late + last),
            self.changed_since('hv1', name, era=first).blocks,
        )

        # Questions the history cannot answer.
        future = since_snap1.next_era + 1000
        self.assert_changes_refused(
            grpc.StatusCode.INVALID_ARGUMENT, 'hv1', name, era=future
        )
        self.assert_changes_refused(
            grpc.StatusCode.INVALID_ARGUMENT, 'hv1', name
        )
        # A clone's content came from elsewhere: its history starts when
        # dm-era first ran over it.
        clone = self.new_volume('hv1', source_volid=volume.id)
        self.addCleanup(self._remove_everywhere, clone)
        self.driver.create_cloned_volume(clone, self.reload(volume))
        clone = self.available(clone)
        self.assert_changes_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            'hv1',
            clone.name_id,
            reason='ERA_BEFORE_HISTORY',
            era=0,
        )
        clone_era = self.mark_checkpoint('hv1', clone)
        self.assertEqual(
            set(),
            self.changed_since('hv1', clone.name_id, era=clone_era).blocks,
        )
        self.assert_changes_refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            'hv1',
            clone.name_id,
            snapshot_id=snap1.id,
        )
        self.delete_volume(clone)
        self.driver.delete_snapshot(snap1)
        self.driver.delete_snapshot(snap2)

        # Moved to hv2 (attached there): its history on hv2 starts after
        # the move, so era 0 is refused there.
        hv1, hv2 = self.hv['hv1'], self.hv['hv2']
        instance = str(uuid.uuid4())
        attachment, path = self.attach_locally(volume, 'hv2', instance)
        transfer, took = self.wait_transfer(hv2, name)
        say(f'moved hv1 -> hv2 and released in {took:.1f} s')
        self.assert_changes_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            'hv2',
            name,
            reason='ERA_BEFORE_HISTORY',
            era=0,
        )
        moved = self.mark_checkpoint('hv2', volume)
        there = [(MIDDLE + 4 * KIB, 4 * KIB)]
        write_extents(path, 65, there)
        self.assertEqual(
            blocks_of(there), self.changed_since('hv2', name, era=moved).blocks
        )
        # Eras carry their history: one from hv1 (`first`) names nothing
        # in hv2's history and is refused, never answered with hv2's blocks.
        self.assert_changes_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            'hv2',
            name,
            reason='ERA_OTHER_HISTORY',
            era=first,
        )

        # Still arriving: the destination of a live migration back to hv1
        # (a deferred transfer) tracks changes from its presentation on
        # (dm-era above its clone): a checkpoint works there, and a question
        # from before it arrived is refused.
        target, _ = self.attach_locally(volume, 'hv1', instance)
        self.assertEqual(
            ['deferred'], [t['state'] for t in hv1.transfers_of(name)]
        )
        arrived = self.mark_checkpoint('hv1', volume)
        say(f'MarkCheckpoint on the arriving copy: era {arrived}')
        self.assertEqual(
            set(), self.changed_since('hv1', name, era=arrived).blocks
        )
        self.assert_changes_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            'hv1',
            name,
            reason='ERA_BEFORE_HISTORY',
            era=0,
        )
        self.detach(target)  # nova's rollback: the transfer is aborted
        self.assertIsNone(hv1.volume(name))
        # The source exported the volume for the move back, and what comes
        # in over an export bypasses dm-era: its history ended there, so an
        # era from before is refused, never answered without those writes.
        self.assert_changes_refused(
            grpc.StatusCode.FAILED_PRECONDITION,
            'hv2',
            name,
            reason='ERA_OTHER_HISTORY',
            era=moved,
        )
        self.detach(attachment)
        self.delete_volume(volume)

    # Changed-block tracking through the agents' API

    def mark_checkpoint(self, host, volume):
        request = snapshot_pb2.MarkCheckpointRequest(volume_id=volume.name_id)
        reply = self.driver._agents[host]._call(
            'Snapshots', 'MarkCheckpoint', request, volume.name_id
        )
        self.assertEqual(volume.name_id, reply.volume_id)
        say(f'checkpoint of {volume.name_id} on {host}: era {reply.era}')
        return reply.era

    def snapshot_era(self, host, snapshot):
        """The agent's record of a Cinder snapshot: the era after it."""
        request = snapshot_pb2.GetSnapshotRequest(snapshot_id=snapshot.id)
        reply = self.driver._agents[host]._call(
            'Snapshots', 'GetSnapshot', request, snapshot.id
        )
        self.assertTrue(reply.has_era, reply)
        say(f'snapshot {snapshot.id} on {host}: era {reply.era}')
        return reply.era

    def changed_blocks(self, host, volume_id, **since):
        """GetChangedBlocks: (status code, details, messages, refusal)."""
        request = snapshot_pb2.GetChangedBlocksRequest(
            volume_id=volume_id, **since
        )
        return tpool.execute(
            _changed_blocks, self.hv[host].endpoint, self.bed, request
        )

    def changed_since(self, host, volume_id, **since):
        """The blocks GetChangedBlocks reports, checking the stream's form:
        every message names the same eras and the 64 KiB block, extents
        are whole blocks, in offset order, not overlapping."""
        code, details, messages, _ = self.changed_blocks(
            host, volume_id, **since
        )
        self.assertEqual(grpc.StatusCode.OK, code, details)
        self.assertNotEqual([], messages, 'an empty stream')
        head = messages[0]
        blocks = set()
        end = 0
        for message in messages:
            self.assertEqual(
                (head.since_era, head.next_era, CBT_BLOCK),
                (message.since_era, message.next_era, message.block_bytes),
            )
            for extent in message.extents:
                offset, length = extent.offset_bytes, extent.length_bytes
                self.assertGreater(length, 0, extent)
                self.assertEqual(0, offset % CBT_BLOCK, extent)
                # Cinder volumes are whole GiB: no partial last block.
                self.assertEqual(0, length % CBT_BLOCK, extent)
                self.assertGreaterEqual(offset, end, 'out of order')
                end = offset + length
                blocks.update(range(offset // CBT_BLOCK, end // CBT_BLOCK))
        if 'era' in since:
            self.assertEqual(since['era'], head.since_era)
        # Reading begins a new era: the answer covers all before it.
        self.assertGreater(head.next_era, head.since_era)
        say(
            f'changed blocks of {volume_id} on {host} since {since}: '
            f'eras {head.since_era}..{head.next_era}, '
            f'{sum(len(m.extents) for m in messages)} extents, '
            f'blocks {sorted(blocks)}'
        )
        return Changes(head.since_era, head.next_era, blocks)

    def assert_changes_refused(
        self, code, host, volume_id, reason=None, **since
    ):
        """The call fails with code and, when given, the refusal reason
        the agent's ErrorInfo names."""
        got, details, _, refusal = self.changed_blocks(
            host, volume_id, **since
        )
        say(
            f'GetChangedBlocks since {since} on {host}: {got.name}: '
            f'{refusal.reason if refusal else "-"}: {details}'
        )
        self.assertEqual(code, got, details)
        if reason is not None:
            self.assertIsNotNone(refusal, f'no ErrorInfo: {details}')
            self.assertEqual(reason, refusal.reason, details)

    def _drop_snapshot(self, snapshot):
        """Cleanup: delete the snapshot on its agent (gone already: fine)."""
        self.driver.delete_snapshot(snapshot)


Changes = collections.namedtuple('Changes', 'since_era next_era blocks')


def write_extents(path, seed, extents):
    """seed's pattern over each (offset, length) byte range."""
    for offset, length in extents:
        blockdev.write(path, offset, blockdev.pattern(seed, offset, length))


def blocks_of(extents):
    """The change-tracking blocks that (offset, length) ranges touch."""
    return {
        block
        for offset, length in extents
        for block in range(
            offset // CBT_BLOCK, (offset + length - 1) // CBT_BLOCK + 1
        )
    }


def _changed_blocks(endpoint, bed, request):
    """GetChangedBlocks, server streaming: on a channel of its own in a
    native thread (see client.py); (status code, details, messages,
    client.Refusal or None).

    The channel reads the stream in the calling thread
    (SingleThreadedUnaryStream): grpc's default unary-stream iterator
    relies on a helper thread ("channel spin") started through the
    threading module that eventlet patched, and under eventlet the call
    never sees the stream's end: DEADLINE_EXCEEDED although the agent
    answered in 0.5 s (seen here, and with a plain grpc server).
    """

    def read(path):
        with open(path, 'rb') as pem:
            return pem.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(bed.authority.ca_file),
        private_key=read(bed.cinder_identity.key),
        certificate_chain=read(bed.cinder_identity.cert),
    )
    options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    with grpc.secure_channel(endpoint, credentials, options) as channel:
        stub = snapshot_pb2_grpc.SnapshotsStub(channel)
        try:
            messages = list(stub.GetChangedBlocks(request, timeout=60))
        except grpc.RpcError as err:
            return err.code(), err.details(), [], client.refusal_of(err)
    return grpc.StatusCode.OK, '', messages, None


_DISK = re.compile(r'^nvme\d+n\d+$')


@contextlib.contextmanager
def nvme_connected(info, host_nqn, host_id):
    """Connect the kernel's NVMe host to an nvmeof connection (what
    `nvme connect` does) and yield the namespace's block device."""
    address, port, transport = info['portals'][0]
    options = (
        f'transport={transport},traddr={address},trsvcid={port},'
        f'nqn={info["target_nqn"]},hostnqn={host_nqn},hostid={host_id}'
    )
    # eventlet's green os.write would poll this character device first,
    # which epoll refuses (EPERM): use the unpatched functions.
    native_os = patcher.original('os')
    fabrics = native_os.open('/dev/nvme-fabrics', os.O_RDWR)
    try:
        native_os.write(fabrics, options.encode())
        reply = native_os.read(fabrics, 4096).decode()
    finally:
        native_os.close(fabrics)
    controller = 'nvme' + re.search(r'instance=(\d+)', reply).group(1)
    try:
        yield _wait_for_disk(controller)
    finally:
        path = f'/sys/class/nvme/{controller}/delete_controller'
        with open(path, 'w') as delete:
            delete.write('1')


def _controllers_of(subsystem_nqn):
    """The NVMe controllers connected to `subsystem_nqn`."""
    found = []
    for controller in os.listdir('/sys/class/nvme'):
        try:
            with open(f'/sys/class/nvme/{controller}/subsysnqn') as nqn:
                if nqn.read().strip() == subsystem_nqn:
                    found.append(controller)
        except OSError:
            continue  # removed while listed
    return found


def _disconnect_with_brick(brick, data, device):
    """os-brick's disconnect. Debian 12's nvme-cli (libnvme 1.3) may abort
    (SIGABRT) in its disconnect: mostly after it has removed the controller
    (a lookup of the removed controller, linux-nvme/libnvme#951), accepted
    once the controller is really gone; rarely before, when the disconnect
    is tried once more, as a detach nova retries would be."""
    for attempt in (1, 2):
        try:
            brick.disconnect_volume(data, device)
            return
        except Exception as err:  # os-brick chains the command's failure
            left = _controllers_of(data['target_nqn'])
            if not left:
                say(f'nvme-cli failed after disconnecting (gone): {err}')
                return
            if attempt == 2:
                raise
            say(
                f'nvme-cli failed and left {left} connected '
                f'({_states(left)}), trying the disconnect once more: {err}'
            )


def _states(controllers):
    """Each controller's state, for a failure's message."""
    states = []
    for controller in controllers:
        try:
            with open(f'/sys/class/nvme/{controller}/state') as state:
                states.append(f'{controller} {state.read().strip()}')
        except OSError as err:
            states.append(f'{controller} {err.strerror}')
    return ', '.join(states)


def _namespace_parents(controller):
    """Where the controller's disks appear: under the controller, or with
    native multipath under its subsystem."""
    parents = [f'/sys/class/nvme/{controller}']
    subsystems = '/sys/class/nvme-subsystem'
    for subsystem in os.listdir(subsystems):
        if os.path.exists(os.path.join(subsystems, subsystem, controller)):
            parents.append(os.path.join(subsystems, subsystem))
    return parents


def _wait_for_disk(controller):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for parent in _namespace_parents(controller):
            for name in os.listdir(parent):
                device = f'/dev/{name}'
                if _DISK.match(name) and blockdev.is_block_device(device):
                    return device
        time.sleep(0.2)
    raise AssertionError(f'no namespace block device for {controller}')


_PLAIN_GRPCIO = """
import json, sys
import grpc
from dmclone_cinder._proto.dmclone.v1 import node_pb2, node_pb2_grpc

def ask(options):
    with grpc.insecure_channel('unix://' + sys.argv[1], options) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        return stub.GetNodeInfo(node_pb2.GetNodeInfoRequest(), timeout=20)

try:
    ask(())
    plain = ['OK', '']
except grpc.RpcError as err:
    plain = [err.code().name, err.details()]
answer = ask((('grpc.default_authority', 'localhost'),))
print(json.dumps({'plain': plain, 'node_id': answer.node_id}))
"""


def _node_info_over_socket(socket):
    """GetNodeInfo with a plain grpcio channel to the agent's socket, and
    with default_authority set, in a plain interpreter (grpcio's own
    threads and eventlet's patched ones do not mix): ((status code name,
    details) of the first, node id of the second)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, '-c', _PLAIN_GRPCIO, socket],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout)
    return tuple(result['plain']), result['node_id']
