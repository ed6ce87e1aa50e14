"""Run the end-to-end tests: python -m tests.e2e [-v] [-k PATTERN].

Needs root, a kernel with device-mapper and NVMe/TCP, and
$DMCLONE_E2E_BIN; cinder-driver/run-e2e provides all three in the guest.
Ends with "N passed, N failed, N skipped" and every skip's reason.
"""

import argparse
import sys
import time
import unittest
import warnings

# Before anything imports cinder (tests/__init__.py does): quiet the noise
# the unit tests quiet too.
warnings.filterwarnings('ignore', message='Unnamed CHECK constraint')


class _TimedResult(unittest.TextTestResult):
    """Prints each test's duration after its outcome."""

    def startTest(self, test):
        self._started = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        super().stopTest(test)
        self.stream.write(
            f'    ({time.monotonic() - self._started:.1f} s: {test.id()})\n'
        )
        self.stream.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-v', '--verbose', action='store_true')
    parser.add_argument('-k', dest='patterns', action='append')
    args = parser.parse_args()

    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = [f'*{p}*' for p in args.patterns]
    suite = loader.loadTestsFromName('tests.e2e.scenarios')
    runner = unittest.TextTestRunner(
        verbosity=2 if args.verbose else 1, resultclass=_TimedResult
    )
    runner.warnings = None
    started = time.monotonic()
    result = runner.run(suite)

    for test, reason in result.skipped:
        sys.stdout.write(f'SKIPPED {test.id()}: {reason}\n')
    for test, trace in result.expectedFailures:
        lines = [line for line in trace.splitlines() if line.strip()]
        sys.stdout.write(f'KNOWN BUG (expected failure) {test.id()}:\n')
        sys.stdout.write(f'    {lines[-1] if lines else "?"}\n')
    for test in result.unexpectedSuccesses:
        sys.stdout.write(
            f'FIXED? {test.id()} passed where a known bug was expected: '
            'remove its expectFailure barrier\n'
        )
    problems = result.failures + result.errors
    failed = len(problems) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    known = len(result.expectedFailures)
    # A failed setUpModule is an error of no test (nothing ran).
    failed_tests = sum(isinstance(t, unittest.TestCase) for t, _ in problems)
    failed_tests += len(result.unexpectedSuccesses)
    passed = result.testsRun - failed_tests - skipped - known
    sys.stdout.write(
        f'dmclone-cinder e2e: {passed} passed, {failed} failed, '
        f'{skipped} skipped, {known} known bugs in '
        f'{time.monotonic() - started:.0f} s\n'
    )
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == '__main__':
    sys.exit(main())
