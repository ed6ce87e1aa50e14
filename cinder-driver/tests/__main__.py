"""Run the unit tests: python -m tests [-v] [-k PATTERN].

Plain unittest discovery, plus a closing line "N passed, N failed,
N skipped" that test harnesses recognise.
"""

import argparse
import pathlib
import sys
import unittest
import warnings

DRIVER_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Noise printed once before a test's own filters apply (tests/base.py
# quiets the rest); none of it comes from this driver.
QUIET_WARNINGS = ('Unnamed CHECK constraint',)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-v', '--verbose', action='store_true')
    parser.add_argument('-k', dest='patterns', action='append')
    args = parser.parse_args()
    for message in QUIET_WARNINGS:
        warnings.filterwarnings('ignore', message=message)

    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [f'*{p}*' for p in args.patterns]
    suite = loader.discover(
        str(DRIVER_ROOT / 'tests'), top_level_dir=str(DRIVER_ROOT)
    )
    runner = unittest.TextTestRunner(verbosity=2 if args.verbose else 1)
    # Keep our filters: by default the runner resets them to 'default'.
    runner.warnings = None
    result = runner.run(suite)

    failed = len(result.failures) + len(result.errors)
    failed += len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    sys.stdout.write(
        f'dmclone-cinder: {passed} passed, {failed} failed, '
        f'{skipped} skipped\n'
    )
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == '__main__':
    sys.exit(main())
