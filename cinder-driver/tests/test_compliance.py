"""The driver against Cinder's interfaces, by name and by signature.

cinder's own compliance check (tox -e compliance) only asserts
issubclass(cls, VolumeDriverCore); on Python 3 the interface registers
no methods, so it passes for any class. And every interface method
exists on cinder's VolumeDriver, so asking whether the driver has it
passes for any subclass too. The checks here ask where each method is
defined: every method of the contract must be the driver's own, except
the ones listed in INHERITED_ON_PURPOSE with the reason cinder's version
is the right one. The signature test binds the arguments each interface
method documents to our implementation.
"""

import inspect

from cinder import interface
from cinder.interface import volume_driver
from cinder.interface import volume_manageable_driver
from cinder.interface import volume_snapshot_revert
from cinder.interface import volume_snapshotmanagement_driver
from cinder.volume import configuration
from cinder.volume import driver as cinder_driver
from oslo_utils import importutils

from dmclone_cinder import driver
from tests import base

INTERFACES = (
    volume_driver.VolumeDriverCore,
    volume_manageable_driver.VolumeManagementDriver,
    volume_manageable_driver.VolumeListManageableDriver,
    volume_snapshotmanagement_driver.VolumeSnapshotManagementDriver,
    volume_snapshot_revert.VolumeSnapshotRevertDriver,
)

# Called by the volume manager and part of the contract (cinder.md,
# "Official minimum features"), though no interface above lists them.
CONTRACT_BEYOND_INTERFACES = (
    'create_cloned_volume',
    'create_export',
    'ensure_export',
    'remove_export',
    'validate_connector',
    # BaseVD.get_volume_stats calls it: the stats themselves.
    '_update_volume_stats',
)

# Interface methods whose cinder implementation is the right one here.
INHERITED_ON_PURPOSE = {
    'get_volume_stats': 'BaseVD caches the stats and refreshes them '
    'through _update_volume_stats, which is ours',
    'clone_image': 'optional fast path; (None, False) makes cinder use '
    'copy_image_to_volume',
    'copy_image_to_volume': 'BaseVD attaches through initialize_connection '
    '(NVMe/TCP for a host without agent) and writes the image',
    'copy_volume_to_image': 'BaseVD attaches through initialize_connection '
    '(NVMe/TCP for a host without agent) and uploads the data',
    'before_volume_copy': 'no-op hook of generic migration',
    'after_volume_copy': 'no-op hook of generic migration',
    'update_migrated_volume': 'NotImplementedError makes the manager keep '
    "the new volume's name id and provider fields",
    'retype': '(False, None) makes cinder migrate the volume',
    'set_initialized': 'manager plumbing',
    'initialized': 'manager plumbing',
    'supported': 'manager plumbing',
    'set_throttle': 'manager plumbing',
    'init_capabilities': 'manager plumbing around get_volume_stats',
    '_init_vendor_properties': 'no vendor-specific extra specs',
    'update_provider_info': 'the agents know volumes by name id, and a '
    "managed snapshot's provider id (the agent's snapshot id) never changes",
}


def interface_methods(interface_class):
    for name, member in vars(interface_class).items():
        if name.startswith('__'):
            continue
        if inspect.isfunction(member) or isinstance(member, property):
            yield name, member


def contract_methods():
    names = set(CONTRACT_BEYOND_INTERFACES)
    for interface_class in INTERFACES:
        names.update(name for name, _ in interface_methods(interface_class))
    return names


def defined_by_cinder(cls, name):
    """Whether cls gets `name` from cinder rather than defining it."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__.split('.')[0] == 'cinder'
    return True


def only_inherited(cls):
    """Contract methods cls leaves to cinder without a reason to."""
    return sorted(
        name
        for name in contract_methods() - set(INHERITED_ON_PURPOSE)
        if defined_by_cinder(cls, name)
    )


class ComplianceTestCase(base.TestCase):
    def test_subclasses_volume_driver_core(self):
        # The same assertion as cinder/tests/compliance; on Python 3 it
        # holds for any class, so it proves nothing by itself.
        self.assertTrue(
            issubclass(driver.DMCloneDriver, volume_driver.VolumeDriverCore)
        )
        # What its __subclasshook__ means to check, with the interface's
        # methods found as functions (cinder looks for bound methods).
        wanted = {
            name
            for name, _ in interface_methods(volume_driver.VolumeDriverCore)
        }
        self.assertEqual(set(), wanted - set(dir(driver.DMCloneDriver)))
        self.assertEqual(wanted, wanted - set(dir(object)))

    def test_registered_by_the_volumedriver_decorator(self):
        self.assertIn(driver.DMCloneDriver, interface._volume_register)

    def test_implements_the_interfaces_it_claims(self):
        # Every interface method exists on cinder's VolumeDriver, so the
        # question is who defines it: the driver, or cinder on purpose.
        self.assertEqual([], only_inherited(driver.DMCloneDriver))

    def test_a_driver_that_only_inherits_fails_the_check(self):
        class OnlyInherits(cinder_driver.VolumeDriver):
            pass

        missing = only_inherited(OnlyInherits)
        self.assertEqual(
            sorted(contract_methods() - set(INHERITED_ON_PURPOSE)), missing
        )
        for name in ('create_volume', 'create_cloned_volume', 'do_setup'):
            self.assertIn(name, missing)

    def test_inherited_on_purpose_names_contract_methods(self):
        self.assertEqual(set(), set(INHERITED_ON_PURPOSE) - contract_methods())

    def test_signatures_accept_the_documented_arguments(self):
        for interface_class in INTERFACES:
            for name, documented in interface_methods(interface_class):
                if isinstance(
                    inspect.getattr_static(driver.DMCloneDriver, name),
                    property,
                ):
                    continue
                parameters = list(inspect.signature(documented).parameters)
                ours = inspect.signature(getattr(driver.DMCloneDriver, name))
                with self.subTest(method=name):
                    ours.bind(*parameters)

    def test_loads_like_the_volume_manager_loads_drivers(self):
        conf = configuration.Configuration(
            cinder_driver.volume_opts, config_group='local'
        )
        loaded = importutils.import_object(
            'dmclone_cinder.driver.DMCloneDriver',
            configuration=conf,
            db=None,
            host='ctl@local',
            cluster_name=None,
            is_vol_db_empty=False,
            active_backend_id=None,
        )
        self.assertIsInstance(loaded, driver.DMCloneDriver)
        self.assertEqual({}, conf.dmclone_agents)

    def test_class_attributes(self):
        self.assertIsInstance(driver.DMCloneDriver.VERSION, str)
        self.assertTrue(driver.DMCloneDriver.SUPPORTED)
        self.assertFalse(driver.DMCloneDriver.SUPPORTS_ACTIVE_ACTIVE)
