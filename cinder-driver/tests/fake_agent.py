"""A fake dmclone agent: a real gRPC server with mutual TLS.

Run as a child process of the tests (`python tests/fake_agent.py ...`),
never imported by them: grpc's server threads cannot live in the tests'
eventlet-patched interpreter (tried: the server never answers, because its
polling thread becomes a green thread blocked in C). It prints
"PORT <n>" once it listens and stops when its stdin closes.

Behaviour, chosen for the tests:
* every handler sleeps --delay seconds, so parallelism is measurable;
* GetNodeInfo echoes the caller's x-request-id in NodeInfo.hostname;
* GetVolume of a volume id "code-<STATUS_CODE>" fails with that code, as
  does DeleteVolume (no status details: an agent before refusal reasons);
* GetVolume of a volume id "flaky-<N>-<anything>" fails with UNAVAILABLE
  the first N times it is asked for that id, then answers (retries);
* GetVolume and DeleteVolume of a volume id "refused-<REASON>" fail with
  FAILED_PRECONDITION and a google.rpc.ErrorInfo of that reason in the
  grpc-status-details-bin trailer, as the real agent refuses;
* Snapshots and Transfers are not implemented (UNIMPLEMENTED).
"""

import argparse
import collections
from concurrent import futures
import sys
import threading
import time

from google.protobuf import any_pb2
from google.rpc import code_pb2
from google.rpc import error_details_pb2
from google.rpc import status_pb2
import grpc

from dmclone_cinder._proto.dmclone.v1 import node_pb2
from dmclone_cinder._proto.dmclone.v1 import node_pb2_grpc
from dmclone_cinder._proto.dmclone.v1 import volume_pb2
from dmclone_cinder._proto.dmclone.v1 import volume_pb2_grpc

GIB = 1 << 30
REQUEST_ID_KEY = 'x-request-id'
ERROR_PREFIX = 'code-'
REFUSAL_PREFIX = 'refused-'
FLAKY_PREFIX = 'flaky-'
STATUS_DETAILS_KEY = 'grpc-status-details-bin'


def _request_id(context):
    return dict(context.invocation_metadata()).get(REQUEST_ID_KEY, '')


class Node(node_pb2_grpc.NodeServicer):
    def __init__(self, delay):
        self._delay = delay

    def GetNodeInfo(self, request, context):
        time.sleep(self._delay)
        return node_pb2.NodeInfo(
            node_id='fake-node',
            hostname=_request_id(context),
            agent_version='fake',
            api_version='dmclone.v1',
            host_nqn='nqn.2014-08.org.nvmexpress:uuid:fake',
            pool=node_pb2.PoolUsage(
                data_total_bytes=100 * GIB, data_used_bytes=25 * GIB
            ),
        )


def _fail_as_asked(volume_id, context):
    """Aborts the call when the volume id asks for a failure."""
    if volume_id.startswith(ERROR_PREFIX):
        code = grpc.StatusCode[volume_id[len(ERROR_PREFIX) :]]
        context.abort(code, f'fake agent says {code.name}')
    if volume_id.startswith(REFUSAL_PREFIX):
        reason = volume_id[len(REFUSAL_PREFIX) :]
        message = f'fake agent refuses: {reason}'
        info = error_details_pb2.ErrorInfo(
            reason=reason,
            domain='dmclone.v1',
            metadata={'volume_id': volume_id},
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        status = status_pb2.Status(
            code=code_pb2.FAILED_PRECONDITION,
            message=message,
            details=[detail],
        )
        context.set_trailing_metadata(
            ((STATUS_DETAILS_KEY, status.SerializeToString()),)
        )
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)


class Volumes(volume_pb2_grpc.VolumesServicer):
    def __init__(self, delay):
        self._delay = delay
        self._asked = collections.Counter()
        self._lock = threading.Lock()

    def _unavailable_while_flaky(self, volume_id, context):
        if not volume_id.startswith(FLAKY_PREFIX):
            return
        failures = int(volume_id[len(FLAKY_PREFIX) :].split('-')[0])
        with self._lock:
            self._asked[volume_id] += 1
            asked = self._asked[volume_id]
        if asked <= failures:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f'fake agent flaky ({asked})'
            )

    def GetVolume(self, request, context):
        time.sleep(self._delay)
        self._unavailable_while_flaky(request.volume_id, context)
        _fail_as_asked(request.volume_id, context)
        return volume_pb2.Volume(
            volume_id=request.volume_id,
            size_bytes=GIB,
            state=volume_pb2.VOLUME_STATE_AVAILABLE,
        )

    def DeleteVolume(self, request, context):
        time.sleep(self._delay)
        _fail_as_asked(request.volume_id, context)
        return volume_pb2.DeleteVolumeResponse()

    def ListVolumes(self, request, context):
        time.sleep(self._delay)
        return volume_pb2.ListVolumesResponse(
            volumes=[
                volume_pb2.Volume(volume_id='a', size_bytes=2 * GIB),
                volume_pb2.Volume(volume_id='b', size_bytes=3 * GIB),
            ]
        )

    def PublishVolume(self, request, context):
        time.sleep(self._delay)
        return volume_pb2.PublishVolumeResponse(
            device_path=f'/dev/mapper/dmclone-{request.volume_id}'
        )


def _read(path):
    with open(path, 'rb') as pem:
        return pem.read()


def serve(args):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    node_pb2_grpc.add_NodeServicer_to_server(Node(args.delay), server)
    volume_pb2_grpc.add_VolumesServicer_to_server(Volumes(args.delay), server)
    credentials = grpc.ssl_server_credentials(
        [(_read(args.key), _read(args.cert))],
        root_certificates=_read(args.ca),
        require_client_auth=True,
    )
    port = server.add_secure_port('127.0.0.1:0', credentials)
    server.start()
    sys.stdout.write(f'PORT {port}\n')
    sys.stdout.flush()
    # The parent closes our stdin when it is done (or dies).
    sys.stdin.read()
    server.stop(grace=None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ca', required=True)
    parser.add_argument('--cert', required=True)
    parser.add_argument('--key', required=True)
    parser.add_argument('--delay', type=float, default=0.0)
    serve(parser.parse_args())


if __name__ == '__main__':
    main()
