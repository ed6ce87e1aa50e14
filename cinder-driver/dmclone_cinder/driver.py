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

"""Cinder volume driver for node-local storage served by dmclone agents.

One cinder-volume service runs this driver; every hypervisor runs an
agent. Each agent is one pool, named after the hypervisor's nova host, and
a volume's pool is the host that holds it (its "home"). Attaching on
another hypervisor moves the volume there with dm-clone, and the pool
follows the volume (see _set_home).
"""

import math
import threading
import uuid

from cinder import context as cinder_context
from cinder import coordination
from cinder import exception
from cinder import interface
from cinder import objects
from cinder.common import constants
from cinder.db import api as db
from cinder.i18n import _
from cinder.objects import fields
from cinder.scheduler import sched_utils
from cinder.volume import driver
from cinder.volume import volume_utils
from oslo_log import log as logging
from oslo_utils import excutils
from oslo_utils import units

from dmclone_cinder import client
from dmclone_cinder import options
from dmclone_cinder._proto.dmclone.v1 import snapshot_pb2
from dmclone_cinder._proto.dmclone.v1 import transfer_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2

LOG = logging.getLogger(__name__)

options.register()

# One lock per volume, shared by every method that may move it: Cinder
# itself does not serialize initialize/terminate_connection of one volume
# from two hosts, which is exactly the live-migration window.
VOLUME_LOCK = 'dmclone-{volume.name_id}'
SOURCE_LOCK = 'dmclone-{src_vref.name_id}'
SNAPSHOT_VOLUME_LOCK = 'dmclone-{snapshot.volume.name_id}'

SUPPORTED_API_PREFIX = 'dmclone.v'
# An agent exports each volume as namespace 1 of its own subsystem
# (EXPORT_NSID in src/nvme/target.rs), with the namespace UUID set to the
# agent volume id (namespace_ids in src/nvme/fabrics.rs). A string: os-brick
# compares it with the text of the namespace's sysfs nsid file.
EXPORT_NAMESPACE_ID = '1'
# PoolUsage.health values (node.proto) that matter here.
HEALTHY = 'healthy'
FAILED = 'failed'
UP = 'up'
DOWN = 'down'

# Volume admin metadata of a live migration whose commit waits for its
# source to let go: "<destination> <transfer id>", and the last reason.
COMMIT_PENDING = 'dmclone_commit_pending'
COMMIT_ERROR = 'dmclone_commit_error'
# Admin metadata values are at most 255 characters.
_METADATA_VALUE_MAX = 255

# Attachments in these states may still write through their host; a
# failed detach may have left the instance connected.
_HOLDING_STATES = frozenset(
    {
        fields.VolumeAttachStatus.ATTACHED,
        fields.VolumeAttachStatus.ATTACHING,
        fields.VolumeAttachStatus.ERROR_DETACHING,
    }
)
_GONE_STATES = frozenset(
    {
        fields.VolumeAttachStatus.DETACHED,
        fields.VolumeAttachStatus.DELETED,
    }
)


def _gib_to_bytes(size_gb):
    return int(size_gb) * units.Gi


def _bytes_to_gib_rounded_up(size_bytes):
    return math.ceil(size_bytes / units.Gi)


def _attachment_host(attachment):
    connector = attachment.connector or {}
    return connector.get('host') or attachment.attached_host


def _agent_snapshot_id(snapshot):
    # A managed snapshot keeps the agent's id as its provider id; the
    # snapshots Cinder takes have its own id on the agent too.
    return snapshot.provider_id or snapshot.id


def _why_not_manageable_volume(volume, cinder_id):
    if cinder_id is not None:
        return _('already managed')
    if volume.published:
        return _('published (in use) on its host')
    if volume.state != volume_pb2.VOLUME_STATE_AVAILABLE:
        return _('not available on its agent (%s)') % (
            volume_pb2.VolumeState.Name(volume.state)
        )
    return None


def _is_managed_snapshot(agent_id):
    """Whether some Cinder snapshot already stands for this agent's one."""
    admin = cinder_context.get_admin_context()
    try:
        db.snapshot_get(admin, agent_id)
        return True
    except exception.SnapshotNotFound:
        pass
    return bool(db.snapshot_get_all(admin, filters={'provider_id': agent_id}))


def _local_connection(agent, device_path):
    if not device_path:
        raise exception.VolumeBackendAPIException(
            data=_('agent %s returned no device path') % agent.name
        )
    return {
        'driver_volume_type': 'local',
        'data': {'device_path': device_path},
    }


@interface.volumedriver
class DMCloneDriver(driver.VolumeDriver):
    """Node-local volumes on dmclone agents, moved on attach by dm-clone."""

    VERSION = '0.1.0'
    CI_WIKI_NAME = 'dmclone_CI'
    # Locks are tooz locks of the configured coordination backend; the
    # default file backend is node-local, so no Active-Active claim.
    SUPPORTS_ACTIVE_ACTIVE = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.configuration.append_config_values(options.dmclone_opts)
        self._agents = None
        self._hydration = None
        # {volume id: (destination, transfer id)} of commits to retry.
        self._pending_commits = {}
        self._retrying = threading.Lock()

    @staticmethod
    def get_driver_options():
        return options.dmclone_opts

    # Setup

    def do_setup(self, context):
        conf = self.configuration
        try:
            endpoints = options.parse_agents(conf.dmclone_agents)
            tls = options.read_tls_material(
                conf.dmclone_tls_ca_file
                or conf.safe_get('driver_ssl_cert_path'),
                conf.dmclone_tls_cert_file,
                conf.dmclone_tls_key_file,
            )
            self._hydration = options.hydration_defaults(
                conf.dmclone_region_bytes,
                conf.dmclone_hydration_threshold,
                conf.dmclone_hydration_batch_size,
                conf.dmclone_max_bytes_per_second,
            )
            self._check_over_subscription_ratio(
                conf.max_over_subscription_ratio
            )
            start_timeout = options.check_transfer_start_timeout(
                conf.dmclone_transfer_start_timeout
            )
        except options.ConfigError as err:
            message = _('[%(section)s] %(error)s') % {
                'section': conf.config_group,
                'error': err,
            }
            LOG.error('dmclone driver configuration: %s', message)
            raise exception.InvalidConfigurationValue(message=message) from err
        transport = client.make_transport(
            tls,
            conf.dmclone_call_timeout,
            conf.dmclone_max_concurrent_calls,
            method_timeouts={'StartTransfer': start_timeout},
        )
        retry = client.RetryPolicy(total_seconds=conf.dmclone_retry_timeout)
        self._agents = client.Agents(endpoints, transport, retry)
        self._pending_commits = self._recorded_pending_commits(context)

    @staticmethod
    def _check_over_subscription_ratio(value):
        """'auto' or a number of at least 1, as cinder's helper wants.

        Refused here rather than in every stats poll, where it would
        leave the backend without pools.
        """
        try:
            volume_utils.get_max_over_subscription_ratio(
                value, supports_auto=True
            )
        except (exception.CinderException, ValueError) as err:
            raise options.ConfigError(
                'max_over_subscription_ratio',
                f'{value!r} is neither "auto" nor a number of at least 1 '
                f'({err})',
            ) from None

    def check_for_setup_error(self):
        # An unreachable hypervisor must not take the whole backend down:
        # it is reported as a pool that is down instead.
        answers = self._ask_every_agent(
            lambda agent, deadline: agent.get_node_info(deadline=deadline)
        )
        for host, (info, err) in sorted(answers.items()):
            if err is not None and not isinstance(
                err, client.AgentUnavailable
            ):
                raise err
            if err is not None:
                LOG.warning(
                    'dmclone agent %(host)s unreachable: %(err)s',
                    {'host': host, 'err': err},
                )
                continue
            self._check_api_version(host, info)
            LOG.info(
                'dmclone agent %(host)s: node %(node)s, agent %(version)s, '
                'API %(api)s',
                {
                    'host': host,
                    'node': info.node_id,
                    'version': info.agent_version,
                    'api': info.api_version,
                },
            )

    @staticmethod
    def _check_api_version(host, info):
        api = info.api_version
        if api.startswith(SUPPORTED_API_PREFIX):
            major = api[len(SUPPORTED_API_PREFIX) :]
            if major.isdigit() and int(major) >= 1:
                return
        raise exception.VolumeDriverException(
            message=_(
                'dmclone agent %(host)s serves API %(api)r; this driver '
                'needs dmclone.v1'
            )
            % {'host': host, 'api': api}
        )

    # Stats

    def _ask_every_agent(self, ask):
        """{host: (answer, None) or (None, error)} of ask(agent, deadline).

        Every agent is asked at once, in its own thread (a green thread
        under eventlet, whose calls then run in tpool as every call does),
        and nobody waits past one deadline, dmclone_stats_timeout: an
        agent that has not answered by then gets an AgentUnavailable
        error here, and its thread ends by the deadline too, since its
        calls carry it (a late answer is dropped).
        """
        timeout = self.configuration.dmclone_stats_timeout
        deadline = client.Deadline(timeout)
        answers = {}
        # The request's context is per thread: each asking thread takes the
        # caller's, so the agents log the request id of the Cinder request.
        context = client.oslo_context.get_current()

        def run(host, agent):
            if context is not None:
                context.update_store()
            try:
                answers[host] = (ask(agent, deadline), None)
            except Exception as err:  # reported per agent
                answers[host] = (None, err)

        threads = [
            threading.Thread(
                target=run, args=(host, agent), name=f'dmclone-{host}'
            )
            for host, agent in self._agents.items()
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        for thread in threads:
            thread.join(deadline.remaining())
        late = client.AgentUnavailable(
            data=_('no answer within dmclone_stats_timeout (%s s)') % timeout
        )
        return {
            host: answers.get(host, (None, late))
            for host, _agent in self._agents.items()
        }

    def _update_volume_stats(self):
        polled = self._ask_every_agent(self._poll_pool)
        pools = []
        for host, (pool, err) in polled.items():
            if err is not None:
                # One broken agent must not hide the other pools.
                LOG.warning(
                    'dmclone pool %(host)s is down: %(err)s',
                    {'host': host, 'err': err},
                )
                pool = self._down_pool(host)
            pools.append(pool)
        any_up = any(pool['agent_state'] == UP for pool in pools)
        backend_state = UP if any_up else DOWN
        for pool in pools:
            # cinder's services API reads backend_state from each pool of
            # a backend, the last pool read wins (api/v3/services.py);
            # the scheduler does not read it at all. So every pool carries
            # the backend's state, and agent_state says which agent is
            # down; a down pool has no capacity, so nothing lands there.
            pool['backend_state'] = backend_state
        backend_name = self.configuration.safe_get('volume_backend_name')
        self._stats = {
            'volume_backend_name': backend_name or self.__class__.__name__,
            'vendor_name': 'dmclone',
            'driver_version': self.VERSION,
            # Hypervisors attach locally; everything that crosses hosts
            # (moves, attaches from hosts without an agent) is NVMe/TCP.
            'storage_protocol': constants.NVMEOF_TCP,
            'backend_state': backend_state,
            # The volume manager reads it from the backend's capabilities
            # when it copies a volume (generic migration, retype), not
            # from a pool: a thin volume's holes stay holes.
            'sparse_copy_volume': True,
            'pools': pools,
        }
        self._start_commit_retries()

    def _pool_capabilities(self, host):
        conf = self.configuration
        return {
            'pool_name': host,
            'reserved_percentage': conf.reserved_percentage,
            'thin_provisioning_support': True,
            'thick_provisioning_support': False,
            'multiattach': False,
            # The agents grow published volumes; see the option's help for
            # what the guest sees.
            'online_extend_support': conf.dmclone_online_extend_support,
            # A clone of a volume in another pool is made there and moved
            # (create_cloned_volume): one image-cache volume serves every
            # hypervisor.
            'clone_across_pools': True,
            'sparse_copy_volume': True,
            'QoS_support': False,
            'filter_function': self.get_filter_function(),
            'goodness_function': self.get_goodness_function(),
        }

    def _down_pool(self, host):
        stats = self._pool_capabilities(host)
        stats.update(total_capacity_gb=0, free_capacity_gb=0, agent_state=DOWN)
        stats['max_over_subscription_ratio'] = self._over_subscription(stats)
        return stats

    def _poll_pool(self, agent, deadline):
        host = agent.name
        info = agent.get_node_info(deadline=deadline)
        stats = self._pool_capabilities(host)
        stats.update(self._capacity(host, info.pool))
        stats.update(self._provisioned(host, agent, info.pool, deadline))
        stats['max_over_subscription_ratio'] = self._over_subscription(stats)
        return stats

    def _over_subscription(self, pool_stats):
        """The pool's ratio; 'auto' computed as cinder's scheduler does."""
        ratio = volume_utils.get_max_over_subscription_ratio(
            self.configuration.max_over_subscription_ratio,
            supports_auto=True,
        )
        if ratio != 'auto':
            return ratio
        # 1 + provisioned / (used + 1), or the initial 20 while nothing
        # is provisioned: cinder's own helper, on this pool's numbers.
        return sched_utils.calculate_max_over_subscription_ratio(
            dict(pool_stats, max_over_subscription_ratio='auto'), 'auto'
        )

    @staticmethod
    def _capacity(host, pool):
        total = pool.data_total_bytes / units.Gi
        free = max(pool.data_total_bytes - pool.data_used_bytes, 0) / units.Gi
        health = pool.health or HEALTHY
        if pool.low_space or health != HEALTHY:
            # The agent refuses new allocations past its low-water mark,
            # and a pool in trouble should get no new volumes either.
            LOG.warning(
                'dmclone pool %(host)s takes no new volumes: health '
                '%(health)r, low space %(low)s',
                {'host': host, 'health': health, 'low': pool.low_space},
            )
            free = 0
        return {
            'total_capacity_gb': round(total, 2),
            'free_capacity_gb': round(free, 2),
            'agent_state': DOWN if health == FAILED else UP,
        }

    @staticmethod
    def _provisioned(host, agent, pool, deadline):
        """Provisioned capacity as the agent sees it, when it can say.

        Cinder's own allocated_capacity_gb is counted per pool at create
        and delete time, so it drifts when volumes move between pools;
        the agent's numbers do not. Agents that leave the PoolUsage
        fields at zero are asked for their volume list instead.
        """
        if pool.provisioned_bytes or pool.volume_count:
            provisioned, count = pool.provisioned_bytes, pool.volume_count
        else:
            try:
                volumes = agent.list_volumes(deadline=deadline)
            except exception.CinderException as err:
                LOG.debug(
                    'dmclone pool %(host)s: no volume list (%(err)s)',
                    {'host': host, 'err': err},
                )
                return {}
            provisioned = sum(volume.size_bytes for volume in volumes)
            count = len(volumes)
        return {
            'provisioned_capacity_gb': round(provisioned / units.Gi, 2),
            'total_volumes': count,
        }

    # Where things live

    @staticmethod
    def _home_of_record(volume):
        """The pool volume.host names, read again from the database: a
        call that waited for the volume's lock behind a move must not act
        on the pool from before the move."""
        try:
            current = db.volume_get(
                cinder_context.get_admin_context(), volume.id
            ).host
        except exception.VolumeNotFound:
            current = None
        if current and current != volume.host:
            LOG.debug(
                'Volume %(id)s moved while this call waited: %(old)s -> '
                '%(new)s',
                {'id': volume.id, 'old': volume.host, 'new': current},
            )
            volume.host = current
        return volume_utils.extract_host(volume.host, 'pool')

    def _home(self, volume):
        home = self._home_of_record(volume)
        if home:
            return home
        # The pool part was lost (cinder-manage volume update_host writes
        # host@backend only): ask the agents, and write it back.
        found = self._locate(volume) if volume.host else None
        if found is None:
            raise exception.VolumeBackendAPIException(
                data=_(
                    'volume %(id)s has host %(host)r without a pool, and no '
                    'agent holds it alone; dmclone volumes always live in a '
                    'pool: set host to <host>@<backend>#<agent>'
                )
                % {'id': volume.id, 'host': volume.host}
            )
        self._set_home(volume, found)
        return found

    def get_pool(self, volume):
        """The agent that holds the volume, asked of the agents.

        cinder-volume asks at start for a volume whose host has no pool
        (e.g. after cinder-manage volume update_host) and writes the answer
        back into volume.host.
        """
        return self._locate(volume)

    def _locate(self, volume):
        """The one agent that is the volume's home, or None.

        During a move two agents hold it: the destination is the home once
        it hydrates, the source while the move is deferred.
        """
        holders = []
        for name, agent in sorted(self._agents.items()):
            try:
                found = agent.get_volume(volume.name_id)
            except client.AgentNotFound:
                continue
            except exception.CinderException as err:
                LOG.warning(
                    'Cannot ask %(host)s whether it holds volume %(id)s: '
                    '%(err)s',
                    {'host': name, 'id': volume.id, 'err': err},
                )
                continue
            if found.state == volume_pb2.VOLUME_STATE_WARM:
                # The copy the volume left behind when it moved away.
                continue
            holders.append(name)
        arriving = {
            name: self._unfinished_transfer(self._agents[name], volume)
            for name in holders
        }
        hydrating = [n for n, t in arriving.items() if t and not t.deferred]
        settled = [n for n, t in arriving.items() if t is None]
        for candidates in (hydrating, settled):
            if len(candidates) == 1:
                return candidates[0]
        LOG.warning(
            'Cannot tell where volume %(id)s lives: held by %(holders)s',
            {'id': volume.id, 'holders': holders or 'no agent'},
        )
        return None

    def _home_agent(self, volume):
        return self._agents[self._home(volume)]

    def _snapshot_host(self, snapshot):
        """The agent that holds the snapshot's data, recorded on it.

        A snapshot is taken where its volume lives (create_snapshot records
        that host). When the volume moves, its snapshots follow it: each is
        listed at the new home as arriving until its data is there, and
        the old host drops it once the move is over. So the one agent that
        has it available is asked for, the volume's home first; one that
        could not travel stays where it was.
        """
        recorded = snapshot.provider_location
        try:
            home = self._home(snapshot.volume)
        except exception.CinderException:
            home = None
        recorded = recorded or home
        others = [host for host, _agent in self._agents.items()]
        for host in dict.fromkeys([home, recorded, *others]):
            if host in self._agents and self._holds_snapshot(host, snapshot):
                if host != snapshot.provider_location:
                    self._record_snapshot_host(snapshot, host)
                return host
        if recorded is None:
            raise exception.VolumeBackendAPIException(
                data=_('no agent holds snapshot %s') % snapshot.id
            )
        return recorded

    def _holds_snapshot(self, host, snapshot):
        try:
            found = self._agents[host].get_snapshot(
                _agent_snapshot_id(snapshot)
            )
        except client.AgentNotFound:
            return False
        except exception.CinderException as err:
            LOG.warning(
                'Cannot ask %(host)s whether it holds snapshot %(id)s: '
                '%(err)s',
                {'host': host, 'id': snapshot.id, 'err': err},
            )
            return False
        return found.state == snapshot_pb2.SNAPSHOT_STATE_AVAILABLE

    @staticmethod
    def _record_snapshot_host(snapshot, host):
        LOG.info(
            'Snapshot %(id)s is now on %(host)s (was %(old)s): it moved '
            'with its volume',
            {
                'id': snapshot.id,
                'host': host,
                'old': snapshot.provider_location,
            },
        )
        snapshot.provider_location = host
        snapshot.save()

    @staticmethod
    def _set_home(volume, host):
        """Make the volume's pool the host that now holds its data.

        Nothing in Cinder moves volume.host when a volume changes
        hypervisor on attach, so the driver saves it itself. Only the pool
        part changes: host@backend stays, so RPC routing, service_uuid and
        cluster_name stay valid. See README "How the pool follows the
        volume" for the manager code paths this relies on.
        """
        backend = volume_utils.extract_host(volume.host, 'backend')
        new_host = volume_utils.append_host(backend, host)
        if volume.host == new_host:
            return
        LOG.info(
            'Volume %(id)s now lives on %(host)s: host %(old)s -> %(new)s',
            {
                'id': volume.id,
                'host': host,
                'old': volume.host,
                'new': new_host,
            },
        )
        volume.host = new_host
        volume.save()

    @staticmethod
    def _relocation_update(volume, host):
        """Model update for a new volume the agent created on another host.

        The scheduler places volumes made from a snapshot in the pool of
        the snapshot's volume, which may have moved away from the snapshot
        since; the create flow saves this update.
        """
        backend = volume_utils.extract_host(volume.host, 'backend')
        new_host = volume_utils.append_host(backend, host)
        if volume.host == new_host:
            return None
        LOG.info(
            'Volume %(id)s was created on %(host)s, not in pool of %(old)s',
            {'id': volume.id, 'host': host, 'old': volume.host},
        )
        return {'host': new_host}

    # Volumes

    def create_volume(self, volume):
        self._home_agent(volume).create_volume(
            volume.name_id, _gib_to_bytes(volume.size)
        )

    @coordination.synchronized(VOLUME_LOCK)
    def delete_volume(self, volume):
        if volume.host is None:
            self._delete_everywhere(volume)
            return
        self._home_agent(volume).delete_volume(volume.name_id)

    def _delete_everywhere(self, volume):
        # A failed create is rescheduled with host reset to None before
        # the manager deletes it, so the agent that may hold a partial
        # volume is unknown; ids are UUIDs, so asking all is safe.
        for host, agent in self._agents.items():
            try:
                agent.delete_volume(volume.name_id)
            except client.AgentUnavailable as err:
                LOG.error(
                    'Cannot make sure volume %(id)s is gone from '
                    'unreachable agent %(host)s: %(err)s',
                    {'id': volume.name_id, 'host': host, 'err': err},
                )

    @coordination.synchronized(VOLUME_LOCK)
    def extend_volume(self, volume, new_size):
        home = self._home(volume)
        self._refuse_during_live_migration(volume, home, _('extend'))
        self._agents[home].extend_volume(
            volume.name_id, _gib_to_bytes(new_size)
        )

    def _refuse_during_live_migration(self, volume, home, what):
        """Until a live migration commits, the instance may write on the
        destination while the home (the source) has the older data: what
        reads or changes the volume at home must wait."""
        pending = self._deferred_transfer_elsewhere(volume, home)
        if pending is None:
            return
        target, transfer = pending
        raise exception.InvalidVolume(
            reason=_(
                '%(what)s of volume %(id)s must wait: it is being '
                'live-migrated from %(home)s to %(target)s (transfer '
                '%(tid)s), and until that commits the copy on %(home)s may '
                'miss what the instance wrote on %(target)s. Try again once '
                'the migration is over.'
            )
            % {
                'what': what,
                'id': volume.id,
                'home': home,
                'target': target,
                'tid': transfer.transfer_id,
            }
        )

    def _create_from_source(self, volume, host, **source):
        self._create_at(volume, host, **source)
        return self._relocation_update(volume, host)

    def _create_at(self, volume, host, **source):
        agent = self._agents[host]
        wanted = _gib_to_bytes(volume.size)
        created = agent.create_volume(volume.name_id, wanted, **source)
        if created.size_bytes < wanted:
            # The agent may create a copy at the source's size.
            agent.extend_volume(volume.name_id, wanted)

    @coordination.synchronized(VOLUME_LOCK)
    def create_volume_from_snapshot(self, volume, snapshot):
        return self._create_from_source(
            volume,
            self._snapshot_host(snapshot),
            source_snapshot_id=_agent_snapshot_id(snapshot),
        )

    @coordination.synchronized(VOLUME_LOCK, SOURCE_LOCK)
    def create_cloned_volume(self, volume, src_vref):
        if not self._same_backend(volume, src_vref):
            # With clone_across_pools the image cache offers volumes of any
            # backend; NotImplementedError makes the manager download the
            # image instead.
            raise NotImplementedError(
                _('volume %(src)s is on backend %(host)s, not this one')
                % {'src': src_vref.id, 'host': src_vref.host}
            )
        home = self._home(src_vref)
        self._refuse_during_live_migration(src_vref, home, _('a clone'))
        wanted = self._home_of_record(volume)
        if wanted == home or wanted not in self._agents:
            return self._create_from_source(
                volume, home, source_volume_id=src_vref.name_id
            )
        # Made next to its source (a thin snapshot), usable at once on the
        # hypervisor the scheduler chose, where it hydrates: one cached
        # image volume serves every hypervisor.
        self._create_at(volume, home, source_volume_id=src_vref.name_id)
        try:
            self._move_unattached(volume, home, wanted)
        except Exception:
            with excutils.save_and_reraise_exception():
                self._delete_quietly(self._agents[home], volume)
        return None

    @staticmethod
    def _same_backend(volume, other):
        backend = volume_utils.extract_host(volume.host, 'backend')
        return bool(other.host) and backend == volume_utils.extract_host(
            other.host, 'backend'
        )

    @staticmethod
    def _delete_quietly(agent, volume):
        try:
            agent.delete_volume(volume.name_id)
        except exception.CinderException as err:
            LOG.warning(
                'Could not delete %(id)s on %(host)s: %(err)s',
                {'id': volume.name_id, 'host': agent.name, 'err': err},
            )

    # Snapshots

    @coordination.synchronized(SNAPSHOT_VOLUME_LOCK)
    def create_snapshot(self, snapshot):
        home = self._home(snapshot.volume)
        self._refuse_during_live_migration(
            snapshot.volume, home, _('a snapshot')
        )
        self._agents[home].create_snapshot(
            snapshot.id, snapshot.volume.name_id
        )
        return {'provider_location': home}

    @coordination.synchronized(SNAPSHOT_VOLUME_LOCK)
    def delete_snapshot(self, snapshot):
        self._agents[self._snapshot_host(snapshot)].delete_snapshot(
            _agent_snapshot_id(snapshot)
        )

    @coordination.synchronized(VOLUME_LOCK)
    def revert_to_snapshot(self, context, volume, snapshot):
        home = self._home(volume)
        snapshot_host = self._snapshot_host(snapshot)
        if snapshot_host != home:
            # NotImplementedError makes the manager fall back to its
            # generic revert: a temporary volume from the snapshot (made on
            # the snapshot's host) copied over the volume.
            raise NotImplementedError(
                _(
                    'snapshot %(snap)s is on %(snap_host)s but volume %(vol)s '
                    'moved to %(home)s; the agents revert only in place'
                )
                % {
                    'snap': snapshot.id,
                    'snap_host': snapshot_host,
                    'vol': volume.id,
                    'home': home,
                }
            )
        self._refuse_during_live_migration(volume, home, _('a revert'))
        self._agents[home].revert_volume(
            volume.name_id, _agent_snapshot_id(snapshot)
        )

    # Exports: the agents keep their own durable state; the attach work
    # happens in initialize/terminate_connection, which know the host.

    def create_export(self, context, volume, connector):
        return None

    def ensure_export(self, context, volume):
        try:
            self._home_agent(volume).get_volume(volume.name_id)
        except client.AgentUnavailable as err:
            # Raising here would set the in-use volume to error although
            # it may be perfectly fine on an agent we cannot reach now.
            LOG.warning(
                'Cannot check volume %(id)s: %(err)s',
                {'id': volume.id, 'err': err},
            )

    def remove_export(self, context, volume):
        return None

    # Attach and detach

    def validate_connector(self, connector):
        host = connector.get('host')
        if not host:
            raise exception.InvalidConnectorException(missing='host')
        if host not in self._agents and not connector.get('nqn'):
            raise exception.InvalidConnectorException(
                missing=_(
                    'nqn (host %s has no dmclone agent, so it '
                    'attaches over NVMe/TCP)'
                )
                % host
            )

    @coordination.synchronized(VOLUME_LOCK)
    def initialize_connection(
        self, volume, connector, initiator_data=None, **kwargs
    ):
        target = connector['host']
        home = self._home(volume)
        if target == home:
            agent = self._agents[home]
            return _local_connection(
                agent, agent.publish_volume(volume.name_id)
            )
        if target in self._agents:
            return self._attach_by_moving(volume, home, target)
        return self._attach_over_nvme(volume, home, connector)

    def _attach_by_moving(self, volume, home, target):
        destination = self._agents[target]
        transfer = self._unfinished_transfer(destination, volume)
        if transfer is None:
            deferred = self._held_elsewhere(volume, target)
            transfer = self._start_transfer(volume, home, target, deferred)
        if not transfer.deferred:
            # Hydration runs: the destination holds the newest data now.
            self._set_home(volume, target)
        return _local_connection(destination, transfer.device_path)

    @staticmethod
    def _held_elsewhere(volume, target):
        """Whether another host may still write (live migration)."""
        return any(
            attachment.attach_status in _HOLDING_STATES
            and _attachment_host(attachment) not in (None, target)
            for attachment in volume.volume_attachment
        )

    @staticmethod
    def _unfinished_transfer(agent, volume):
        transfers = agent.active_transfers_of(volume.name_id)
        if len(transfers) > 1:
            LOG.warning(
                'Agent %(host)s has %(n)d transfers of volume '
                '%(id)s; using %(tid)s',
                {
                    'host': agent.name,
                    'n': len(transfers),
                    'id': volume.name_id,
                    'tid': transfers[0].transfer_id,
                },
            )
        return transfers[0] if transfers else None

    def _start_transfer(self, volume, home, target, deferred):
        source = self._agents[home]
        destination = self._agents[target]
        info = destination.get_node_info()
        if not info.host_nqn:
            raise exception.VolumeBackendAPIException(
                data=_('agent %s reports no NVMe host NQN') % target
            )
        self._check_room_for_move(volume, destination, info.pool)
        export = source.export_volume(
            volume.name_id, info.host_nqn, for_transfer=True
        )
        transfer_id = str(uuid.uuid4())
        try:
            return destination.start_transfer(
                transfer_id=transfer_id,
                volume_id=volume.name_id,
                size_bytes=_gib_to_bytes(volume.size),
                source=transfer_pb2.NvmeTcpSource(
                    subsystem_nqn=export.subsystem_nqn,
                    transport_address=export.transport_address,
                    transport_service_id=export.transport_service_id,
                    source_agent_endpoint=source.endpoint,
                    # Only the destination holds it from here: with it,
                    # and only with it, the source lets go of its copy.
                    release_token=export.release_token,
                    # DH-HMAC-CHAP, where the source's kernel authenticates
                    # hosts (empty otherwise).
                    dhchap_host_secret=export.dhchap_host_secret,
                    dhchap_ctrl_secret=export.dhchap_ctrl_secret,
                ),
                deferred=deferred,
                knobs=self._knobs(),
            )
        except Exception:
            with excutils.save_and_reraise_exception():
                self._undo_transfer_start(
                    source, destination, transfer_id, volume, export
                )

    def _check_room_for_move(self, volume, destination, pool):
        """Refuse a move the destination's pool cannot take.

        The scheduler weighs a pool only when a volume is created there; a
        move is the driver's choice, so the driver checks what cinder's
        capacity filter would: the pool takes new data (healthy, below its
        low-water mark), the whole volume fits its free space (hydration
        writes every region, thin or not), and what the pool promised stays
        within the over-subscription ratio. Nothing is exported before
        that. The agent checks again when the transfer starts, together
        with the moves already arriving.
        """
        host = destination.name
        stats = self._capacity(host, pool)
        stats.update(self._provisioned(host, destination, pool, None))
        ratio = self._over_subscription(stats)
        size_gb = volume.size
        free_gb = stats['free_capacity_gb']
        provisioned_gb = stats.get('provisioned_capacity_gb', 0)
        promised_gb = stats['total_capacity_gb'] * ratio
        reason = None
        if size_gb > free_gb:
            reason = _(
                '%(size)s GiB do not fit the %(free)s GiB it can still write'
            ) % {'size': size_gb, 'free': free_gb}
        elif provisioned_gb + size_gb > promised_gb:
            reason = _(
                'it promised %(prov)s GiB of %(max)s GiB (%(total)s GiB '
                'at over-subscription ratio %(ratio)s)'
            ) % {
                'prov': provisioned_gb,
                'max': round(promised_gb, 2),
                'total': stats['total_capacity_gb'],
                'ratio': ratio,
            }
        if reason:
            raise exception.VolumeBackendAPIException(
                data=_(
                    'Volume %(id)s cannot move to %(host)s: its pool has no '
                    'room (%(reason)s). Free space there, or attach the '
                    'volume on a host with room.'
                )
                % {'id': volume.name_id, 'host': host, 'reason': reason}
            )

    def _knobs(self):
        return transfer_pb2.HydrationKnobs(
            region_bytes=self._hydration.region_bytes,
            hydration_threshold=self._hydration.hydration_threshold,
            hydration_batch_size=self._hydration.hydration_batch_size,
            max_bytes_per_second=self._hydration.max_bytes_per_second,
        )

    def _undo_transfer_start(
        self, source, destination, transfer_id, volume, export
    ):
        """Withdraw what a failed StartTransfer may have left behind.

        A call that failed here (a deadline, a cut connection) may still
        have started the transfer on the destination. Left there, the next
        attach would reuse it although its source export is gone, so it
        is aborted first (NOT_FOUND counts as done). If that fails, the
        transfer may be running from the export: the export stays.
        """
        try:
            destination.abort_transfer(transfer_id)
        except exception.CinderException as err:
            LOG.warning(
                'Could not abort transfer %(tid)s of %(id)s on %(host)s '
                '(%(err)s); keeping its source export on %(source)s',
                {
                    'tid': transfer_id,
                    'id': volume.name_id,
                    'host': destination.name,
                    'err': err,
                    'source': source.name,
                },
            )
            return
        self._unexport_quietly(
            source, volume, release_token=export.release_token
        )

    @staticmethod
    def _unexport_quietly(agent, volume, release_token='', force=False):
        try:
            agent.unexport_volume(
                volume.name_id, release_token=release_token, force=force
            )
        except exception.CinderException as err:
            LOG.warning(
                'Could not withdraw export of %(id)s on %(host)s: %(err)s',
                {'id': volume.name_id, 'host': agent.name, 'err': err},
            )

    def _attach_over_nvme(self, volume, home, connector):
        # An image upload or a backup of an in-use volume attaches here
        # (force): during a live migration the home may be behind.
        self._refuse_during_live_migration(
            volume, home, _('an attach on %s') % connector.get('host')
        )
        agent = self._agents[home]
        export = agent.export_volume(volume.name_id, connector['nqn'])
        if export.dhchap_host_secret:
            # os-brick connects without DH-HMAC-CHAP; the kernel would
            # refuse it (ENOKEY) only after os-brick's retries.
            self._unexport_quietly(agent, volume)
            raise exception.VolumeBackendAPIException(
                data=_(
                    'Agent %(agent)s exports only with DH-HMAC-CHAP '
                    '(nvme.auth = "required"), which os-brick cannot '
                    'use to attach volume %(id)s on %(host)s. Attach it on '
                    'a host that runs a dmclone agent, or set nvme.auth = '
                    '"none" on %(agent)s and firewall its NVMe/TCP port to '
                    'the storage hosts.'
                )
                % {
                    'agent': home,
                    'id': volume.name_id,
                    'host': connector.get('host'),
                }
            )
        # os-brick's new (v2) format. vol_uuid lets os-brick pick the
        # namespace by its UUID instead of guessing from devices that
        # appeared while it connected; ns_id is the fallback.
        return {
            'driver_volume_type': 'nvmeof',
            'data': {
                'target_nqn': export.subsystem_nqn,
                'portals': [
                    [
                        export.transport_address,
                        str(export.transport_service_id),
                        'tcp',
                    ]
                ],
                'host_nqn': connector['nqn'],
                'vol_uuid': str(uuid.UUID(volume.name_id)),
                'ns_id': EXPORT_NAMESPACE_ID,
            },
        }

    @coordination.synchronized(VOLUME_LOCK)
    def terminate_connection(self, volume, connector, **kwargs):
        if connector is None:
            self._drop_all_connections(volume)
            return False
        host = connector.get('host')
        if self._shares_host(volume, host):
            return True
        home = self._home(volume)
        if host == home:
            self._detach_at_home(volume, home)
        elif host in self._agents:
            self._detach_destination(volume, home, host)
        else:
            self._agents[home].unexport_volume(volume.name_id)
        return False

    @staticmethod
    def _shares_host(volume, host):
        # The attachment being deleted is still listed during the call.
        on_host = [
            attachment
            for attachment in volume.volume_attachment
            if _attachment_host(attachment) == host
            and attachment.attach_status not in _GONE_STATES
        ]
        return len(on_host) > 1

    def _detach_at_home(self, volume, home):
        pending = self._deferred_transfer_elsewhere(volume, home)
        if pending is None:
            self._agents[home].unpublish_volume(volume.name_id)
            return
        # Live migration succeeded: the instance left this host. The detach
        # succeeds even when the source cannot let go yet (nova would only
        # log the error and leave a stale attachment): the commit waits,
        # recorded and retried, and nothing is written here any more.
        target, transfer = pending
        self._try_commit(volume, home, target, transfer)

    def _try_commit(self, volume, home, target, transfer):
        """Let the source go, then let the destination hydrate.

        Returns None once committed, or the error that stopped it: the
        source agent unreachable, its device still open, the destination
        agent unreachable. Then nothing is lost: the move stays deferred,
        the destination keeps serving the volume and what was written
        there, and the commit is recorded (admin metadata, an error in the
        log) and retried at every stats poll until it goes through.
        """
        try:
            self._agents[home].unpublish_volume(volume.name_id)
            self._agents[target].commit_transfer(transfer.transfer_id)
        except (client.AgentUnavailable, exception.VolumeIsBusy) as err:
            self._commit_stuck(volume, home, target, transfer, err)
            return err
        self._set_home(volume, target)
        self._commit_done(volume)
        return None

    def _commit_stuck(self, volume, home, target, transfer, err):
        self._pending_commits[volume.id] = (target, transfer.transfer_id)
        LOG.error(
            'Live migration of volume %(id)s from %(home)s to %(target)s '
            'cannot commit yet: %(err)s. Nothing is lost: %(target)s keeps '
            'serving the volume and everything written there, and the '
            'commit of transfer %(tid)s is retried at every stats poll. '
            'Until then the volume cannot move again; its admin metadata '
            '%(key)s says so.',
            {
                'id': volume.id,
                'home': home,
                'target': target,
                'err': err,
                'tid': transfer.transfer_id,
                'key': COMMIT_PENDING,
            },
        )
        self._update_admin_metadata(
            volume,
            {
                COMMIT_PENDING: f'{target} {transfer.transfer_id}',
                COMMIT_ERROR: str(err)[:_METADATA_VALUE_MAX],
            },
        )

    def _commit_done(self, volume):
        if self._pending_commits.pop(volume.id, None) is None:
            return
        LOG.info(
            'Live migration of volume %(id)s committed after waiting',
            {'id': volume.id},
        )
        self._update_admin_metadata(
            volume, delete=(COMMIT_PENDING, COMMIT_ERROR)
        )

    @staticmethod
    def _update_admin_metadata(volume, metadata=None, delete=()):
        admin = cinder_context.get_admin_context()
        try:
            if metadata:
                db.volume_admin_metadata_update(
                    admin, volume.id, metadata, False
                )
            for key in delete:
                db.volume_admin_metadata_delete(admin, volume.id, key)
        except exception.VolumeNotFound:
            pass  # deleted meanwhile: nothing to show any more

    def _recorded_pending_commits(self, context):
        """The commits a previous run of this service left waiting."""
        try:
            volumes = objects.VolumeList.get_all_by_host(context, self.host)
            recorded = {
                volume.id: volume.admin_metadata.get(COMMIT_PENDING, '')
                for volume in volumes
            }
        except Exception as err:  # the database is not ours to fail on
            LOG.warning(
                'Cannot read live-migration commits left waiting: %s', err
            )
            return {}
        pending = {}
        for volume_id, value in recorded.items():
            target, _sep, transfer_id = value.partition(' ')
            if target and transfer_id:
                pending[volume_id] = (target, transfer_id)
        if pending:
            LOG.warning(
                '%d live-migration commits wait for their source; retrying '
                'them at every stats poll',
                len(pending),
            )
        return pending

    def retry_pending_commits(self):
        """Retry every waiting commit once; one failure stops no other."""
        admin = cinder_context.get_admin_context()
        for volume_id in list(self._pending_commits):
            try:
                self._retry_commit(objects.Volume.get_by_id(admin, volume_id))
            except exception.VolumeNotFound:
                self._pending_commits.pop(volume_id, None)
            except Exception as err:  # logged; retried at the next poll
                LOG.warning(
                    'Retrying the commit of volume %(id)s failed: %(err)s',
                    {'id': volume_id, 'err': err},
                )

    def _start_commit_retries(self):
        if not self._pending_commits:
            return
        if not self._retrying.acquire(blocking=False):
            return  # the previous poll's retries still run

        def run():
            try:
                self.retry_pending_commits()
            finally:
                self._retrying.release()

        # Not in the poll itself: a retry waits for the volume's lock.
        thread = threading.Thread(target=run, name='dmclone-commits')
        thread.daemon = True
        thread.start()

    @coordination.synchronized(VOLUME_LOCK)
    def _retry_commit(self, volume):
        target, transfer_id = self._pending_commits.get(
            volume.id, (None, None)
        )
        if target is None:
            return
        transfer = None
        if target in self._agents:
            transfer = self._unfinished_transfer(self._agents[target], volume)
        if (
            transfer is None
            or transfer.transfer_id != transfer_id
            or not transfer.deferred
        ):
            # Committed or aborted another way (dmclonectl, a detach).
            LOG.info(
                'Volume %(id)s: transfer %(tid)s to %(target)s no longer '
                'waits for a commit',
                {'id': volume.id, 'tid': transfer_id, 'target': target},
            )
            self._commit_done(volume)
            return
        self._try_commit(volume, self._home(volume), target, transfer)

    def _deferred_transfer_elsewhere(self, volume, home):
        hosts = {
            _attachment_host(attachment)
            for attachment in volume.volume_attachment
        }
        for host in sorted(h for h in hosts if h in self._agents):
            if host == home:
                continue
            transfer = self._unfinished_transfer(self._agents[host], volume)
            if transfer and transfer.deferred:
                return host, transfer
        return None

    def _detach_destination(self, volume, home, host):
        destination = self._agents[host]
        transfer = self._unfinished_transfer(destination, volume)
        if transfer is None:
            LOG.info(
                'Volume %(id)s has no transfer to %(host)s to tear down',
                {'id': volume.id, 'host': host},
            )
            return
        if transfer.deferred:
            if self._abort_unless_written(volume, home, host, transfer):
                # Live migration aborted: the source never stopped serving.
                # The destination agent asks the source to withdraw the
                # export; with the move aborted nothing needs it, so it goes
                # by force here too, in case that agent cannot reach it.
                self._unexport_quietly(self._agents[home], volume, force=True)
            else:
                destination.unpublish_volume(volume.name_id)
            return
        # Hydration already started, so the destination has the newest
        # data: it is the home, whatever the pool said.
        LOG.warning(
            'Volume %(id)s was hydrating on %(host)s while its pool '
            'said %(home)s; moving the pool',
            {'id': volume.id, 'host': host, 'home': home},
        )
        self._set_home(volume, host)
        destination.unpublish_volume(volume.name_id)

    def _abort_unless_written(self, volume, home, host, transfer):
        """Abort the deferred move to host; True when aborted.

        A destination that was written since it was presented (the guest
        ran there) holds writes that exist nowhere else: its agent refuses
        the abort (DESTINATION_WRITTEN), and the move commits instead. The
        source lets go first; if it cannot (unreachable, still open), the
        error goes to the caller, the move stays deferred, losing nothing,
        and the commit is retried (_try_commit).
        """
        try:
            self._agents[host].abort_transfer(transfer.transfer_id)
            return True
        except exception.CinderException as err:
            if getattr(err, 'refusal_reason', None) != 'DESTINATION_WRITTEN':
                raise
        LOG.warning(
            'Volume %(id)s was written on %(host)s during its uncommitted '
            'live migration: committing the move to %(host)s instead of '
            'aborting it, so that nothing written there is lost',
            {'id': volume.id, 'host': host},
        )
        err = self._try_commit(volume, home, host, transfer)
        if err is not None:
            # The destination stays attached, so the writes stay reachable.
            raise err
        return False

    def _drop_all_connections(self, volume):
        # Force detach without a connector: withdraw every path we know.
        home = self._home(volume)
        pending = self._deferred_transfer_elsewhere(volume, home)
        if pending is not None:
            target, transfer = pending
            if not self._abort_unless_written(volume, home, target, transfer):
                # Committed: the target is the home now; its export of the
                # source stays until the move is done.
                self._agents[target].unpublish_volume(volume.name_id)
                return
        source = self._agents[home]
        source.unpublish_volume(volume.name_id)
        # After the abort no move needs the export: it goes by force.
        source.unexport_volume(volume.name_id, force=pending is not None)

    # Migration within this backend: a move without an attachment.

    @coordination.synchronized(VOLUME_LOCK)
    def migrate_volume(self, context, volume, host):
        target = self._pool_in_this_backend(volume, host['host'])
        if target is None or target not in self._agents:
            return False, None
        home = self._home(volume)
        if target != home:
            self._move_unattached(volume, home, target)
        # The manager itself sets volume.host to host['host'].
        return True, None

    def _move_unattached(self, volume, home, target):
        self._start_transfer(volume, home, target, deferred=False)
        # Nothing is attached: the agent removes the device it hydrates
        # through once the volume has arrived, and the source lets go.
        self._agents[target].unpublish_volume(volume.name_id)

    @staticmethod
    def _pool_in_this_backend(volume, destination):
        same_backend = volume_utils.extract_host(
            destination, 'backend'
        ) == volume_utils.extract_host(volume.host, 'backend')
        if not same_backend:
            return None
        return volume_utils.extract_host(destination, 'pool')

    # Manage and unmanage: the agent volume id becomes the name id.

    def manage_existing_get_size(self, volume, existing_ref):
        existing = self._find_manageable(volume, existing_ref)
        return _bytes_to_gib_rounded_up(existing.size_bytes)

    @coordination.synchronized(VOLUME_LOCK)
    def manage_existing(self, volume, existing_ref):
        existing = self._find_manageable(volume, existing_ref)
        size = _gib_to_bytes(_bytes_to_gib_rounded_up(existing.size_bytes))
        if existing.size_bytes < size:
            # Cinder records whole GiB; make the device match.
            self._home_agent(volume).extend_volume(existing.volume_id, size)
        if existing.volume_id == volume.name_id:
            return None
        return {'_name_id': existing.volume_id}

    def _find_manageable(self, volume, existing_ref):
        volume_id = self._referenced_id(existing_ref)
        try:
            existing = self._home_agent(volume).get_volume(volume_id)
        except client.AgentNotFound as err:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=str(err)
            ) from err
        if existing.published:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_('volume %s is published (in use) on its host')
                % volume_id,
            )
        return existing

    @staticmethod
    def _referenced_id(existing_ref):
        reference = existing_ref.get('source-id') or existing_ref.get(
            'source-name'
        )
        try:
            return str(uuid.UUID(reference))
        except (TypeError, ValueError):
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref,
                reason=_(
                    'source-id (or source-name) must be the agent volume UUID'
                ),
            ) from None

    def unmanage(self, volume):
        # The agent keeps the volume; Cinder just forgets it.
        LOG.info(
            'Volume %(id)s (agent volume %(name_id)s) unmanaged',
            {'id': volume.id, 'name_id': volume.name_id},
        )

    def manage_existing_snapshot_get_size(self, snapshot, existing_ref):
        _host, existing = self._find_manageable_snapshot(
            snapshot, existing_ref
        )
        return _bytes_to_gib_rounded_up(existing.size_bytes)

    @coordination.synchronized(SNAPSHOT_VOLUME_LOCK)
    def manage_existing_snapshot(self, snapshot, existing_ref):
        host, existing = self._find_manageable_snapshot(snapshot, existing_ref)
        return {
            'provider_id': existing.snapshot_id,
            'provider_location': host,
        }

    def _find_manageable_snapshot(self, snapshot, existing_ref):
        """(host, agent snapshot) that existing_ref names, of this volume.

        Snapshots stay where they were taken, so every agent is asked,
        the volume's home first.
        """
        snapshot_id = self._referenced_id(existing_ref)
        home = self._home(snapshot.volume)
        hosts = [home] + sorted(
            h for h, _a in self._agents.items() if h != home
        )
        for host in hosts:
            try:
                existing = self._agents[host].get_snapshot(snapshot_id)
            except client.AgentNotFound:
                continue
            self._check_manageable_snapshot(snapshot, existing_ref, existing)
            return host, existing
        raise exception.ManageExistingInvalidReference(
            existing_ref=existing_ref,
            reason=_('no agent has snapshot %s') % snapshot_id,
        )

    @staticmethod
    def _check_manageable_snapshot(snapshot, existing_ref, existing):
        reason = None
        if existing.volume_id != snapshot.volume.name_id:
            reason = _(
                'snapshot %(snap)s is of agent volume %(of)s, not of volume '
                '%(vol)s (agent volume %(name_id)s)'
            ) % {
                'snap': existing.snapshot_id,
                'of': existing.volume_id,
                'vol': snapshot.volume.id,
                'name_id': snapshot.volume.name_id,
            }
        elif existing.state != snapshot_pb2.SNAPSHOT_STATE_AVAILABLE:
            reason = _('snapshot %s is not available on its agent') % (
                existing.snapshot_id
            )
        elif _is_managed_snapshot(existing.snapshot_id):
            reason = _('snapshot %s is already managed') % (
                existing.snapshot_id
            )
        if reason is not None:
            raise exception.ManageExistingInvalidReference(
                existing_ref=existing_ref, reason=reason
            )

    def unmanage_snapshot(self, snapshot):
        # The agent keeps the snapshot; Cinder just forgets it.
        LOG.info(
            'Snapshot %(id)s (agent snapshot %(agent_id)s) unmanaged',
            {'id': snapshot.id, 'agent_id': _agent_snapshot_id(snapshot)},
        )

    # What could be managed: every agent's volumes and snapshots.

    def get_manageable_volumes(
        self, cinder_volumes, marker, limit, offset, sort_keys, sort_dirs
    ):
        managed = {volume.name_id: volume.id for volume in cinder_volumes}
        entries = []
        for host, volume in self._everything_on_agents('list_volumes'):
            entry = {
                'reference': {'source-id': volume.volume_id},
                'size': _bytes_to_gib_rounded_up(volume.size_bytes),
                'cinder_id': managed.get(volume.volume_id),
                'extra_info': _('pool %s') % host,
            }
            entry['reason_not_safe'] = _why_not_manageable_volume(
                volume, entry['cinder_id']
            )
            entry['safe_to_manage'] = entry['reason_not_safe'] is None
            entries.append(entry)
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs
        )

    def get_manageable_snapshots(
        self, cinder_snapshots, marker, limit, offset, sort_keys, sort_dirs
    ):
        managed = {}
        for snapshot in cinder_snapshots:
            managed[_agent_snapshot_id(snapshot)] = snapshot.id
        entries = []
        for host, snapshot in self._everything_on_agents('list_snapshots'):
            cinder_id = managed.get(snapshot.snapshot_id)
            reason = None
            if cinder_id is not None:
                reason = _('already managed')
            elif snapshot.state != snapshot_pb2.SNAPSHOT_STATE_AVAILABLE:
                reason = _('not available on its agent')
            entries.append(
                {
                    'reference': {'source-id': snapshot.snapshot_id},
                    'size': _bytes_to_gib_rounded_up(snapshot.size_bytes),
                    'cinder_id': cinder_id,
                    'extra_info': _('pool %s') % host,
                    'safe_to_manage': reason is None,
                    'reason_not_safe': reason,
                    'source_reference': {'source-id': snapshot.volume_id},
                }
            )
        return volume_utils.paginate_entries_list(
            entries, marker, limit, offset, sort_keys, sort_dirs
        )

    def _everything_on_agents(self, listing):
        """(host, item) of every agent's listing; an agent that cannot
        answer is left out of the list and logged, as a pool that is down."""
        answers = self._ask_every_agent(
            lambda agent, deadline: getattr(agent, listing)(deadline=deadline)
        )
        for host, (items, err) in sorted(answers.items()):
            if err is not None:
                LOG.warning(
                    'Agent %(host)s left out of the manageable list: %(err)s',
                    {'host': host, 'err': err},
                )
                continue
            for item in items:
                yield host, item
