"""Shared set-up of the driver unit tests: real config, mocked agents."""

import os
from unittest import mock
import uuid
import warnings

from cinder import context
from cinder import objects
from cinder.tests.unit import fake_snapshot
from cinder.tests.unit import fake_volume
from cinder.tests.unit import test
from cinder.volume import configuration
from cinder.volume import driver as cinder_driver
import fixtures

from dmclone_cinder import client
from dmclone_cinder import driver
from dmclone_cinder._proto.dmclone.v1 import node_pb2
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2

GIB = 1 << 30
BACKEND = 'ctl@local'
HOSTS = ('hv1', 'hv2', 'hv3')
PEM = b'-----BEGIN CERTIFICATE-----\nnot parsed by unit tests\n'


def endpoint_of(host):
    return f'{host}.example.org:7443'


def nqn_of(host):
    return f'nqn.2014-08.org.nvmexpress:uuid:{host}'


def node_info(host, total_gib=100, used_gib=40, low_space=False):
    return node_pb2.NodeInfo(
        node_id=f'node-{host}',
        hostname=host,
        agent_version='0.1.0',
        api_version='dmclone.v1',
        host_nqn=nqn_of(host),
        pool=node_pb2.PoolUsage(
            data_total_bytes=total_gib * GIB,
            data_used_bytes=used_gib * GIB,
            low_space=low_space,
        ),
    )


def transfer(volume_id, state, host='hv2', transfer_id=None, deferred=None):
    """A transfer as an agent reports it; deferred follows the state
    unless given (a deferred one may show CONNECTING or DEGRADED)."""
    if deferred is None:
        deferred = state == transfer_pb2.TRANSFER_STATE_DEFERRED
    return transfer_pb2.Transfer(
        transfer_id=transfer_id or str(uuid.uuid4()),
        volume_id=volume_id,
        state=state,
        device_path=f'/dev/mapper/dmclone-{volume_id}@{host}',
        deferred=deferred,
    )


def release_token_of(volume_id, host='hv1'):
    return f'token-of-{volume_id}@{host}'


def export_of(volume_id, host='hv1', for_transfer=False, secrets=None):
    """An agent's export; secrets (DH-HMAC-CHAP) by default for a move."""
    if secrets is None:
        secrets = for_transfer
    return transfer_pb2.Export(
        volume_id=volume_id,
        subsystem_nqn=f'nqn.2024-01.io.dmclone:{volume_id}',
        transport_address=f'{host}.storage.example.org',
        transport_service_id=4420,
        release_token=release_token_of(volume_id, host)
        if for_transfer
        else '',
        dhchap_host_secret=f'DHHC-1:00:host-of-{host}:' if secrets else '',
        dhchap_ctrl_secret=f'DHHC-1:00:ctrl-of-{host}:' if secrets else '',
    )


def fake_agent(host):
    """An AgentClient whose calls answer like a healthy, idle agent."""
    agent = mock.create_autospec(client.AgentClient, instance=True)
    agent.name = host
    agent.endpoint = endpoint_of(host)
    agent.get_node_info.return_value = node_info(host)
    agent.list_volumes.return_value = []
    agent.active_transfers_of.return_value = []
    agent.get_snapshot.side_effect = client.AgentNotFound(
        agent=host, subject='snapshot', detail='not here'
    )
    agent.create_volume.side_effect = lambda volume_id, size_bytes, **source: (
        volume_pb2.Volume(volume_id=volume_id, size_bytes=size_bytes)
    )
    agent.publish_volume.side_effect = lambda volume_id: (
        f'/dev/mapper/dmclone-{volume_id}@{host}'
    )
    agent.export_volume.side_effect = (
        lambda volume_id, host_nqn, for_transfer=False: export_of(
            volume_id, host, for_transfer
        )
    )
    agent.start_transfer.side_effect = lambda volume_id, deferred, **kwargs: (
        transfer(
            volume_id,
            transfer_pb2.TRANSFER_STATE_DEFERRED
            if deferred
            else transfer_pb2.TRANSFER_STATE_HYDRATING,
            transfer_id=kwargs['transfer_id'],
            host=agent.name,
        )
    )
    return agent


# Noise from cinder itself, not from this driver.
QUIET_WARNINGS = ('Passing item_cls to obj_make_list',)


class TestCase(test.TestCase):
    """cinder's TestCase; its WarningsFixture resets filters per test."""

    def setUp(self):
        super().setUp()
        for message in QUIET_WARNINGS:
            warnings.filterwarnings('ignore', message=message)


class DriverTestCase(TestCase):
    def setUp(self):
        super().setUp()
        self.ctxt = context.get_admin_context()
        self.agents = {host: fake_agent(host) for host in HOSTS}
        self.mock_object(
            client,
            'AgentClient',
            side_effect=lambda name, endpoint, *args: self.agents[name],
        )
        self.pem_paths = self._write_pems()
        self.configuration = configuration.Configuration(
            cinder_driver.volume_opts, config_group='local'
        )
        self.driver = driver.DMCloneDriver(
            configuration=self.configuration, host=BACKEND
        )
        self.flags(group='local', **self.backend_options())
        self.driver.do_setup(self.ctxt)

    def backend_options(self):
        return {
            'volume_backend_name': 'local',
            'dmclone_agents': {h: endpoint_of(h) for h in HOSTS},
            'dmclone_tls_ca_file': self.pem_paths['ca'],
            'dmclone_tls_cert_file': self.pem_paths['cert'],
            'dmclone_tls_key_file': self.pem_paths['key'],
        }

    def _write_pems(self):
        directory = self.useFixture(fixtures.TempDir()).path
        paths = {}
        for name in ('ca', 'cert', 'key'):
            paths[name] = os.path.join(directory, f'{name}.pem')
            with open(paths[name], 'wb') as pem:
                pem.write(PEM)
        return paths

    def volume(self, pool='hv1', size=1, attachments=(), **fields):
        """A volume in `pool` with (host, attach_status) attachments."""
        fields.setdefault('id', str(uuid.uuid4()))
        volume = fake_volume.fake_volume_obj(
            self.ctxt,
            host=f'{BACKEND}#{pool}' if pool else None,
            size=size,
            **fields,
        )
        volume.volume_attachment = objects.VolumeAttachmentList(
            objects=[
                self._attachment(volume, host, status)
                for host, status in attachments
            ]
        )
        self.mock_object(volume, 'save')
        return volume

    def _attachment(self, volume, host, status):
        return objects.VolumeAttachment(
            context=self.ctxt,
            id=str(uuid.uuid4()),
            volume_id=volume.id,
            attached_host=host,
            attach_status=status,
            connector={'host': host},
        )

    def snapshot(self, volume, location=None, **fields):
        snapshot = fake_snapshot.fake_snapshot_obj(
            self.ctxt,
            id=str(uuid.uuid4()),
            volume=volume,
            volume_id=volume.id,
            volume_size=volume.size,
            provider_location=location,
            **fields,
        )
        self.mock_object(snapshot, 'save')
        return snapshot

    def assert_no_agent_changes(self, *hosts):
        """None of the named agents got a mutating call."""
        readers = {
            'get_node_info',
            'list_volumes',
            'get_volume',
            'get_snapshot',
            'list_snapshots',
            'list_transfers',
            'active_transfers_of',
        }
        for host in hosts:
            calls = [
                name
                for name, _args, _kwargs in self.agents[host].mock_calls
                if name.split('.')[0] not in readers
            ]
            self.assertEqual([], calls, f'agent {host} was changed')
