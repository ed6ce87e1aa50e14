"""The committed gRPC stubs are exactly what the proto files generate."""

import importlib.machinery
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import tempfile

from tests import base

DRIVER_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = DRIVER_ROOT / 'tools' / 'regenerate-stubs'


def load_script():
    loader = importlib.machinery.SourceFileLoader(
        'regenerate_stubs', str(SCRIPT)
    )
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class StubFreshnessTestCase(base.TestCase):
    def test_committed_stubs_match_a_fresh_generation(self):
        result = subprocess.run(
            [sys.executable, str(SCRIPT), '--check'],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(0, result.returncode, result.stderr)

    def test_check_notices_an_edited_stub(self):
        script = load_script()
        with tempfile.TemporaryDirectory() as tmp:
            fresh = pathlib.Path(tmp) / 'fresh'
            script.generate(fresh)
            committed = pathlib.Path(tmp) / 'committed'
            shutil.copytree(script.STUB_ROOT, committed)
            self.assertEqual([], script.differences(fresh, committed))

            edited = committed / 'dmclone' / 'v1' / 'volume_pb2.py'
            edited.write_text(edited.read_text() + '# edited\n')
            (committed / 'dmclone' / 'v1' / 'node_pb2_grpc.py').unlink()
            self.assertEqual(
                [
                    pathlib.Path('dmclone/v1/node_pb2_grpc.py'),
                    pathlib.Path('dmclone/v1/volume_pb2.py'),
                ],
                script.differences(fresh, committed),
            )

    def test_stub_imports_point_into_the_package(self):
        stub = DRIVER_ROOT / 'dmclone_cinder/_proto/dmclone/v1/snapshot_pb2.py'
        text = stub.read_text()
        self.assertIn(
            'from dmclone_cinder._proto.dmclone.v1 import common_pb2', text
        )
        self.assertNotIn('\nfrom dmclone.v1 import', text)
