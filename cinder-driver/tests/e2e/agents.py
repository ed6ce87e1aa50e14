"""Real dmclone agents as child processes, and dmclonectl to look at them.

Each agent gets its own state directory, pool, device-mapper prefix,
NVMe/TCP export port, host NQN and host id, and a TCP port with mutual
TLS. The pool is a whole block device when $DMCLONE_E2E_POOL_DEVICES
names one per agent (run-e2e gives the guest a virtio disk each: every
move copies a whole volume, which would fill the guest's tmpfs), else the
embedded pool file in the state directory. A small TOML config carries only
[peers] (there is no flag for it): the client identity an agent uses to
tell another agent to release a moved volume's source copy. Everything
else is given as flags, as tests/kernel/agent/*.rs do.
"""

import json
import os
import signal
import subprocess
import sys
import time

import eventlet

BIN_ENV = 'DMCLONE_E2E_BIN'
POOL_DEVICES_ENV = 'DMCLONE_E2E_POOL_DEVICES'
START_TIMEOUT = 120
CTL_TIMEOUT = 60


class CtlError(Exception):
    """dmclonectl exited non-zero (3: no such object, 4: unreachable)."""

    def __init__(self, args, returncode, stderr):
        super().__init__(
            f'dmclonectl {" ".join(args)} exited {returncode}: '
            f'{stderr.strip()}'
        )
        self.returncode = returncode


def binaries():
    """The agent and dmclonectl of this run, from $DMCLONE_E2E_BIN."""
    directory = os.environ.get(BIN_ENV)
    if not directory:
        raise RuntimeError(
            f'{BIN_ENV} is not set: it must name a directory holding '
            'dmclone-agent and dmclonectl (cinder-driver/run-e2e sets it)'
        )
    paths = {
        name: os.path.join(directory, name)
        for name in ('dmclone-agent', 'dmclonectl')
    }
    missing = [p for p in paths.values() if not os.access(p, os.X_OK)]
    if missing:
        raise RuntimeError(f'not executable: {", ".join(missing)}')
    return paths


def pool_devices(count):
    """One pool device per agent from $DMCLONE_E2E_POOL_DEVICES, or
    Nones (pool files)."""
    devices = os.environ.get(POOL_DEVICES_ENV, '').split()
    if not devices:
        return [None] * count
    if len(devices) != count:
        raise RuntimeError(
            f'{POOL_DEVICES_ENV} names {len(devices)} devices, '
            f'{count} agents need one each'
        )
    return devices


def nvme_auth_policy():
    """'required' where this kernel's NVMe target authenticates hosts.

    A host entry has dhchap_key only with CONFIG_NVME_TARGET_AUTH (not in
    Debian 12's 6.1): there the agents export with nvme.auth = none.
    """
    probe = (
        '/sys/kernel/config/nvmet/hosts/'
        f'nqn.2014-08.io.dmclone:e2e-probe-{os.getpid()}'
    )
    try:
        os.mkdir(probe)
    except OSError:
        return 'none'
    try:
        return 'required' if os.path.exists(f'{probe}/dhchap_key') else 'none'
    finally:
        os.rmdir(probe)


def say(message):
    sys.stderr.write(f'[e2e] {message}\n')
    sys.stderr.flush()


class Agent:
    """One agent: nova host `name` (its pool), number 1, 2, ..."""

    def __init__(self, name, number, root, bins, authority, pool):
        self.name = name
        self.pool_device = pool
        self.prefix = f'dme2e{name}'
        self.state_dir = os.path.join(root, name)
        self.socket = os.path.join(self.state_dir, 'agent.sock')
        self.log_path = os.path.join(root, f'{name}.log')
        self.tcp_port = 17440 + number
        self.export_port = 4440 + number
        self.host_id = f'0e2e0000-0000-4000-8000-{number:012d}'
        self.host_nqn = f'nqn.2014-08.org.nvmexpress:uuid:{self.host_id}'
        self._bins = bins
        self._server = authority.issue(f'agent-{name}', server=True)
        # Who this agent is when it asks another to release a copy; the
        # others list it as a peer bound to this host's NQN.
        self.peer_identity = f'peer-{name}'
        peer = authority.issue(self.peer_identity)
        # Who may call this agent over TCP (--tcp-client), besides peers.
        self.clients = ['cinder-volume=driver']
        # Flags a scenario adds for its own run (see Scenarios.restart_with).
        self.extra_flags = []
        self._ca = authority.ca_file
        self._config = os.path.join(root, f'{name}.toml')
        with open(self._config, 'w') as config:
            config.write(
                '# Written by the e2e test: only what has no flag.\n'
                '[peers]\n'
                f'tls_cert = "{peer.cert}"\n'
                f'tls_key = "{peer.key}"\n'
                f'ca = "{authority.ca_file}"\n'
            )
        self._process = None
        self._log = None

    @property
    def endpoint(self):
        return f'127.0.0.1:{self.tcp_port}'

    def public_path(self, volume_id):
        return f'/dev/mapper/{self.prefix}-{volume_id}'

    def command(self):
        port = str(self.export_port)
        return [
            self._bins['dmclone-agent'],
            '--config',
            self._config,
            '--state-dir',
            self.state_dir,
            '--dm-prefix',
            self.prefix,
            '--node-id',
            self.name,
            *(
                ['--pool-device', self.pool_device]
                if self.pool_device
                else ['--pool-file-size', '4G']
            ),
            # Cinder sizes are whole GiB: let several volumes and their
            # snapshots be promised on a small pool.
            '--max-oversubscription-ratio',
            '20',
            '--nvme-auth',
            nvme_auth_policy(),
            '--nvme-export-address',
            '127.0.0.1',
            '--nvme-export-port',
            port,
            '--nvme-export-port-id',
            port,
            '--nvme-host-nqn',
            self.host_nqn,
            '--nvme-host-id',
            self.host_id,
            '--transfer-stall-seconds',
            '10',
            '--listen',
            self.endpoint,
            '--tls-cert',
            self._server.cert,
            '--tls-key',
            self._server.key,
            '--client-ca',
            self._ca,
            *(
                flag
                for client in self.clients
                for flag in ('--tcp-client', client)
            ),
            *self.extra_flags,
        ]

    def start(self):
        self._log = open(self.log_path, 'ab')
        env = dict(os.environ, RUST_LOG='dmclone=debug,info')
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f'agent {self.name} exited with '
                    f'{self._process.returncode} before serving:\n'
                    f'{self.log_tail()}'
                )
            if os.path.exists(self.socket):
                try:
                    return self.node()
                except CtlError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'agent {self.name} did not serve within '
                    f'{START_TIMEOUT} s:\n{self.log_tail()}'
                )
            eventlet.sleep(0.2)

    def stop(self):
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None
        self._log.close()

    def running(self):
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines=60):
        try:
            with open(self.log_path, errors='replace') as log:
                return ''.join(log.readlines()[-lines:])
        except OSError as err:
            return f'(no log: {err})'

    # dmclonectl over the agent's Unix socket: an observer independent of
    # the driver's gRPC client.

    def ctl(self, *args):
        argv = [
            self._bins['dmclonectl'],
            '--socket',
            self.socket,
            '--json',
            *args,
        ]
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=CTL_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise CtlError(args, done.returncode, done.stderr)
        return json.loads(done.stdout)

    def node(self):
        return self.ctl('node')

    def volume(self, volume_id):
        """The agent's volume, or None when it has none of that id."""
        try:
            return self.ctl('volume', 'show', volume_id)['volumes'][0]
        except CtlError as err:
            if err.returncode == 3:
                return None
            raise

    def volumes(self):
        return self.ctl('volume', 'list')['volumes']

    def snapshots(self):
        return self.ctl('snapshot', 'list')['snapshots']

    def transfers_of(self, volume_id):
        return [
            transfer
            for transfer in self.ctl('transfer', 'list')['transfers']
            if transfer['volume_id'] == volume_id
        ]


def nvmet_subsystems_of(volume_id):
    """The kernel NVMe target's subsystems whose NQN names the volume."""
    root = '/sys/kernel/config/nvmet/subsystems'
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if volume_id in name)
