"""Start tests/fake_agent.py as a child process and find its port."""

import os
import pathlib
import subprocess
import sys

DRIVER_ROOT = pathlib.Path(__file__).resolve().parent.parent
FAKE_AGENT = DRIVER_ROOT / 'tests' / 'fake_agent.py'
START_TIMEOUT = 30


class FakeAgentProcess:
    def __init__(self, server_pem_paths, delay):
        self._paths = server_pem_paths
        self._delay = delay
        self._process = None
        self.port = None

    @property
    def endpoint(self):
        return f'127.0.0.1:{self.port}'

    def start(self):
        # The handshake failures the TLS tests provoke are expected: no logs.
        env = dict(
            os.environ, PYTHONPATH=str(DRIVER_ROOT), GRPC_VERBOSITY='NONE'
        )
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(FAKE_AGENT),
                '--ca',
                self._paths.ca,
                '--cert',
                self._paths.cert,
                '--key',
                self._paths.key,
                '--delay',
                str(self._delay),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        line = self._process.stdout.readline().decode()
        if not line.startswith('PORT '):
            self.stop()
            raise RuntimeError(f'fake agent did not start: {line!r}')
        self.port = int(line.split()[1])
        return self

    def stop(self):
        if self._process is None:
            return
        self._process.stdin.close()
        try:
            self._process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process.stdout.close()
        self._process = None
