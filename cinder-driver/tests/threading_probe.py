"""Concurrent agent calls from native threads, without eventlet patching.

Run by test_eventlet_grpc.NativeThreadsTestCase in a fresh interpreter:
    threading_probe.py ENDPOINT CA CERT KEY CALLS
Prints one JSON report on stdout.
"""

from concurrent import futures
import json
import sys
import time

from dmclone_cinder import client
from dmclone_cinder import options


def main():
    endpoint, ca, cert, key, calls = sys.argv[1:]
    calls = int(calls)
    transport = client.make_transport(
        options.read_tls_material(ca, cert, key), 30, calls
    )
    agent = client.AgentClient('hv1', endpoint, transport)
    started = time.monotonic()
    with futures.ThreadPoolExecutor(calls) as pool:
        infos = list(pool.map(lambda _: agent.get_node_info(), range(calls)))
    report = {
        'eventlet_patched': client.eventlet_patched(),
        'transport': type(transport).__name__,
        'answers': sum(info.node_id == 'fake-node' for info in infos),
        'elapsed': time.monotonic() - started,
    }
    sys.stdout.write(json.dumps(report) + '\n')


if __name__ == '__main__':
    main()
