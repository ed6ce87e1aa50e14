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

"""Configuration options of the dmclone Cinder driver."""

import copy
import dataclasses
import ipaddress

from oslo_config import cfg
from oslo_config import types

# dm-clone accepts region sizes that are powers of two from 8 sectors
# (4 KiB) to 2^21 sectors (1 GiB); see the kernel's dm-clone documentation.
MIN_REGION_BYTES = 4096
MAX_REGION_BYTES = 1 << 30
UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
# How long a destination agent's StartTransfer waits for the source's NVMe
# namespace to appear (NAMESPACE_TIMEOUT in src/stack/steps.rs).
AGENT_NAMESPACE_WAIT_SECONDS = 30

dmclone_opts = [
    cfg.Opt(
        'dmclone_agents',
        type=types.Dict(value_type=types.String(), key_value_separator='='),
        default={},
        help='The dmclone agents of this backend, as comma separated '
        'NOVA_HOST=ADDRESS:PORT pairs, e.g. '
        '"hv1=hv1.example.org:7443,hv2=[2001:db8::2]:7443". The key '
        'is the hypervisor\'s nova-compute [DEFAULT] host, which is '
        'the "host" of the connectors nova sends; each agent becomes '
        'one pool with that name.',
    ),
    cfg.StrOpt(
        'dmclone_tls_ca_file',
        help='PEM bundle of the CA that signed the agents\' server '
        'certificates. When unset, driver_ssl_cert_path is used.',
    ),
    cfg.StrOpt(
        'dmclone_tls_cert_file',
        help='PEM client certificate presented to the agents (mutual TLS).',
    ),
    cfg.StrOpt(
        'dmclone_tls_key_file',
        help='PEM private key of dmclone_tls_cert_file.',
    ),
    cfg.FloatOpt(
        'dmclone_call_timeout',
        default=30.0,
        min=1.0,
        help='Deadline in seconds of every call to an agent.',
    ),
    cfg.FloatOpt(
        'dmclone_transfer_start_timeout',
        default=90.0,
        min=1.0,
        help='Deadline in seconds of StartTransfer, which replaces '
        'dmclone_call_timeout for it: the destination agent connects to '
        'the source\'s NVMe/TCP export and waits up to '
        f'{AGENT_NAMESPACE_WAIT_SECONDS} s for its namespace before it '
        'answers, so this must be larger than that. After a failed or '
        'timed-out StartTransfer the driver aborts the transfer on the '
        'destination before it withdraws the source\'s export.',
    ),
    cfg.FloatOpt(
        'dmclone_stats_timeout',
        default=20.0,
        min=1.0,
        help='Deadline in seconds of one stats poll (and of the start-up '
        'check): every agent is asked at once, and an agent that has not '
        'answered by then is reported as a pool that is down. Keep it '
        'below half of backend_stats_polling_interval, past which cinder '
        'warns about slow stats.',
    ),
    cfg.BoolOpt(
        'dmclone_online_extend_support',
        default=True,
        help='Report online_extend_support: whether Cinder may extend a '
        'volume that is attached. The agents grow a published volume at '
        'once. A guest attached over NVMe/TCP sees the new size at once '
        "(nova's NVMe volume driver rescans); a guest on a hypervisor "
        "with an agent does not, because nova's local volume driver cannot "
        'resize a disk: it sees the new size after its next hard reboot, '
        'or at once after virsh blockresize. Set False to make Cinder '
        'refuse to extend attached volumes instead.',
    ),
    cfg.FloatOpt(
        'dmclone_retry_timeout',
        default=10.0,
        min=0.0,
        help='How long in seconds a call that found its agent UNAVAILABLE '
        'is repeated, waiting 0.5 s, then twice as long each time (up to '
        '8 s, with random jitter). Only calls that are safe to repeat are: '
        'reads, the volume calls (idempotent on the volume id) and '
        'removals; never CreateSnapshot, RevertVolume, ExportVolume or '
        'the transfer calls that start or commit a move. A call takes at '
        'most this long plus one dmclone_call_timeout. 0 turns retries '
        'off.',
    ),
    cfg.IntOpt(
        'dmclone_max_concurrent_calls',
        default=10,
        min=1,
        help='Agent calls in flight at once from this backend. Under '
        'eventlet each call occupies a thread of eventlet\'s native '
        'thread pool (EVENTLET_THREADPOOL_SIZE, default 20), which the '
        'whole service shares, so keep this below that size.',
    ),
    cfg.IntOpt(
        'dmclone_region_bytes',
        default=0,
        min=0,
        max=MAX_REGION_BYTES,
        help='dm-clone region size in bytes for transfers started by '
        'this backend: a power of two from 4096 to 1073741824. 0 keeps '
        'the agent\'s configured default.',
    ),
    cfg.IntOpt(
        'dmclone_hydration_threshold',
        default=0,
        min=0,
        max=UINT32_MAX,
        help='dm-clone hydration_threshold (regions hydrated in '
        'parallel) for new transfers. 0 keeps the agent\'s default.',
    ),
    cfg.IntOpt(
        'dmclone_hydration_batch_size',
        default=0,
        min=0,
        max=UINT32_MAX,
        help='dm-clone hydration_batch_size (contiguous regions copied '
        'together) for new transfers. 0 keeps the agent\'s default.',
    ),
    cfg.IntOpt(
        'dmclone_max_bytes_per_second',
        default=0,
        min=0,
        max=UINT64_MAX,
        help='Hydration bandwidth limit per transfer in bytes per '
        'second. 0 keeps the agent\'s default.',
    ),
]


class ConfigError(ValueError):
    """A configuration value the driver cannot work with."""

    def __init__(self, option, reason):
        super().__init__(f'{option}: {reason}')
        self.option = option
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes read once at start-up, so a missing file fails early."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclasses.dataclass(frozen=True)
class HydrationDefaults:
    region_bytes: int
    hydration_threshold: int
    hydration_batch_size: int
    max_bytes_per_second: int


def parse_agents(agents):
    """Validate the host -> endpoint map; return it with clean values."""
    if not agents:
        raise ConfigError(
            'dmclone_agents', 'no agents configured; set NOVA_HOST=ADDR:PORT'
        )
    parsed = {}
    for host, endpoint in agents.items():
        host = host.strip()
        if not host:
            raise ConfigError('dmclone_agents', 'an entry has an empty host')
        parsed[host] = parse_endpoint(host, endpoint.strip())
    return parsed


def parse_endpoint(host, endpoint):
    address, sep, port = endpoint.rpartition(':')
    if not sep or not address or not port.isdigit():
        raise ConfigError(
            'dmclone_agents',
            f'agent of {host!r} is {endpoint!r}, expected ADDRESS:PORT',
        )
    if not 0 < int(port) < 65536:
        raise ConfigError(
            'dmclone_agents', f'agent of {host!r} has port {port} out of range'
        )
    if address.startswith('['):
        _check_bracketed_ipv6(host, address)
    elif ':' in address:
        raise ConfigError(
            'dmclone_agents',
            f'agent of {host!r}: write IPv6 addresses as [ADDR]:PORT',
        )
    return endpoint


def _check_bracketed_ipv6(host, address):
    try:
        if not address.endswith(']'):
            raise ValueError(address)
        ipaddress.IPv6Address(address[1:-1])
    except ValueError:
        raise ConfigError(
            'dmclone_agents',
            f'agent of {host!r} has an invalid IPv6 address {address}',
        ) from None


def read_tls_material(ca_file, cert_file, key_file):
    """Read the three PEM files mutual TLS needs, or say which is missing."""
    named = {
        'dmclone_tls_ca_file (or driver_ssl_cert_path)': ca_file,
        'dmclone_tls_cert_file': cert_file,
        'dmclone_tls_key_file': key_file,
    }
    contents = [_read_pem(option, path) for option, path in named.items()]
    return TlsMaterial(*contents)


def _read_pem(option, path):
    if not path:
        raise ConfigError(
            option, 'not set; the agents only accept mutual TLS clients'
        )
    try:
        with open(path, 'rb') as pem:
            content = pem.read()
    except OSError as err:
        raise ConfigError(option, f'cannot read {path}: {err}') from None
    if b'-----BEGIN ' not in content:
        raise ConfigError(option, f'{path} holds no PEM data')
    return content


def hydration_defaults(region_bytes, threshold, batch_size, bytes_per_s):
    if region_bytes and not _is_valid_region_size(region_bytes):
        raise ConfigError(
            'dmclone_region_bytes',
            f'{region_bytes} is not a power of two between '
            f'{MIN_REGION_BYTES} and {MAX_REGION_BYTES}',
        )
    return HydrationDefaults(region_bytes, threshold, batch_size, bytes_per_s)


def check_transfer_start_timeout(seconds):
    """Refuse a deadline that would end while the agent still waits."""
    if seconds <= AGENT_NAMESPACE_WAIT_SECONDS:
        raise ConfigError(
            'dmclone_transfer_start_timeout',
            f'{seconds} s is not longer than the '
            f'{AGENT_NAMESPACE_WAIT_SECONDS} s the agent may wait for the '
            'source\'s NVMe namespace; the transfer would be given up '
            'while it starts',
        )
    return seconds


def _is_valid_region_size(size):
    power_of_two = size & (size - 1) == 0
    return power_of_two and MIN_REGION_BYTES <= size <= MAX_REGION_BYTES


def register():
    # The options live in [backend_defaults] and are grafted into each
    # backend section by cinder's BackendGroupConfiguration.
    from cinder.volume import configuration

    cfg.CONF.register_opts(dmclone_opts, group=configuration.SHARED_CONF_GROUP)


def list_opts():
    """The options for oslo-config-generator (entry point oslo.config.opts)."""
    return [('backend_defaults', copy.deepcopy(dmclone_opts))]
