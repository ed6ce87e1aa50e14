"""Configuration parsing and validation, and the generator entry point."""

import importlib
import os
import pathlib
import tomllib

import fixtures

from dmclone_cinder import options
from tests import base

DRIVER_ROOT = pathlib.Path(__file__).resolve().parent.parent


def agents_option():
    (opt,) = [o for o in options.dmclone_opts if o.name == 'dmclone_agents']
    return opt


class AgentsOptionTestCase(base.TestCase):
    def test_ini_value_parses_into_host_to_endpoint(self):
        parsed = agents_option().type(
            'hv1=hv1.example.org:7443, hv2=[2001:db8::2]:7443'
        )
        self.assertEqual(
            {'hv1': 'hv1.example.org:7443', 'hv2': '[2001:db8::2]:7443'},
            options.parse_agents(parsed),
        )

    def test_invalid_entries_name_the_host(self):
        cases = {
            'no agents': {},
            'empty host': {' ': 'a:1'},
            'expected ADDRESS:PORT': {'hv1': 'hv1.example.org'},
            "'hv2' is ':7443'": {'hv2': ':7443'},
            'port 0 out of range': {'hv3': 'a:0'},
            'port 70000 out of range': {'hv3': 'a:70000'},
            '[ADDR]:PORT': {'hv4': '2001:db8::2:7443'},
            'invalid IPv6': {'hv5': '[2001:zz::2]:7443'},
        }
        for expected, agents in cases.items():
            with self.subTest(expected=expected):
                error = self.assertRaises(
                    options.ConfigError, options.parse_agents, agents
                )
                self.assertEqual('dmclone_agents', error.option)
                self.assertIn(expected, str(error))


class TlsMaterialTestCase(base.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.paths = {}
        for name in ('ca', 'cert', 'key'):
            self.paths[name] = self._write(name, b'-----BEGIN X-----\n')

    def _write(self, name, content):
        path = os.path.join(self.dir, name)
        with open(path, 'wb') as pem:
            pem.write(content)
        return path

    def test_reads_the_three_files(self):
        material = options.read_tls_material(
            self.paths['ca'], self.paths['cert'], self.paths['key']
        )
        self.assertEqual(b'-----BEGIN X-----\n', material.key)

    def test_unset_missing_and_non_pem_files_are_reported(self):
        not_pem = self._write('junk', b'hello')
        cases = [
            ((None, 'cert', 'key'), 'dmclone_tls_ca_file', 'not set'),
            (('ca', '', 'key'), 'dmclone_tls_cert_file', 'not set'),
            (('ca', 'cert', '/nope'), 'dmclone_tls_key_file', 'cannot read'),
            (('ca', not_pem, 'key'), 'dmclone_tls_cert_file', 'no PEM'),
        ]
        for files, option, reason in cases:
            with self.subTest(option=option, reason=reason):
                paths = [self.paths.get(f, f) for f in files]
                error = self.assertRaises(
                    options.ConfigError, options.read_tls_material, *paths
                )
                self.assertIn(option, error.option)
                self.assertIn(reason, error.reason)


class HydrationDefaultsTestCase(base.TestCase):
    def test_zero_keeps_agent_defaults(self):
        knobs = options.hydration_defaults(0, 0, 0, 0)
        self.assertEqual(0, knobs.region_bytes)

    def test_region_size_must_be_a_dm_clone_region_size(self):
        for good in (4096, 65536, 1 << 30):
            options.hydration_defaults(good, 1, 1, 1)
        for bad in (512, 4095, 5000, 3 << 20):
            self.assertRaises(
                options.ConfigError, options.hydration_defaults, bad, 0, 0, 0
            )

    def test_option_bounds_fit_the_proto_fields(self):
        bounds = {
            o.name: o.type.max
            for o in options.dmclone_opts
            if hasattr(o.type, 'max')
        }
        self.assertEqual(
            options.MAX_REGION_BYTES, bounds['dmclone_region_bytes']
        )
        self.assertEqual((1 << 32) - 1, bounds['dmclone_hydration_threshold'])
        self.assertEqual((1 << 64) - 1, bounds['dmclone_max_bytes_per_second'])


class ListOptsTestCase(base.TestCase):
    def test_list_opts_documents_every_option_in_backend_defaults(self):
        ((group, opts),) = options.list_opts()
        self.assertEqual('backend_defaults', group)
        self.assertEqual(
            [o.name for o in options.dmclone_opts], [o.name for o in opts]
        )
        self.assertTrue(all(o.help for o in opts))
        # Copies, so the generator cannot alter the registered options.
        self.assertIsNot(options.dmclone_opts[0], opts[0])

    def test_entry_point_in_pyproject_resolves_to_list_opts(self):
        with open(DRIVER_ROOT / 'pyproject.toml', 'rb') as pyproject:
            project = tomllib.load(pyproject)['project']
        target = project['entry-points']['oslo.config.opts']['dmclone_cinder']
        module, _, attribute = target.partition(':')
        self.assertIs(
            options.list_opts,
            getattr(importlib.import_module(module), attribute),
        )
