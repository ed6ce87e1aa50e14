"""Reading and writing block devices with O_DIRECT (no page cache can
answer for the device), and recognisable per-offset patterns."""

import contextlib
import hashlib
import mmap
import os
import stat

MIB = 1 << 20
GIB = 1 << 30


def pattern(seed, offset, length=MIB):
    """length bytes that only (seed, offset) produce."""
    block = hashlib.sha256(f'{seed}/{offset}'.encode()).digest()
    return block * (length // len(block))


@contextlib.contextmanager
def _aligned(length):
    # An anonymous mapping is page aligned, as O_DIRECT wants.
    buffer = mmap.mmap(-1, length)
    try:
        yield buffer
    finally:
        buffer.close()


def is_block_device(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def write(path, offset, data):
    with _aligned(len(data)) as buffer:
        buffer.write(data)
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            written = os.pwritev(fd, [buffer], offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    if written != len(data):
        raise OSError(f'{path}: wrote {written} of {len(data)} bytes')


def read(path, offset, length=MIB):
    with _aligned(length) as buffer:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(fd, [buffer], offset)
        finally:
            os.close(fd)
        return bytes(buffer[:got])


def first_mismatch(path, length, expected, chunk=4 * MIB):
    """The offset of the first MiB of the device's first length bytes that
    differs from expected ({MiB-aligned offset: seed, or None for zeros};
    zeros wherever it is silent), or None when every MiB matches. Compares
    bytes instead of hashing them: on the guest's emulated CPU a SHA-256 of
    1 GiB takes over a minute."""
    zeros = bytes(MIB)
    with _aligned(chunk) as buffer:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for base in range(0, length, chunk):
                got = os.preadv(fd, [buffer], base)
                if got != min(chunk, length - base):
                    raise OSError(f'{path}: short read at {base}: {got}')
                for start in range(0, got, MIB):
                    seed = expected.get(base + start)
                    wanted = (
                        zeros if seed is None else pattern(seed, base + start)
                    )
                    if buffer[start : start + MIB] != wanted:
                        return base + start
        finally:
            os.close(fd)
    return None


def write_pattern(path, seed, offsets):
    for offset in offsets:
        write(path, offset, pattern(seed, offset))


def size_of(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def describe(data, seeds, offset):
    """Which of the seeds' patterns (or zeros) data is, for messages."""
    if data == bytes(len(data)):
        return 'zeros'
    for seed in seeds:
        if data == pattern(seed, offset, len(data)):
            return f'pattern {seed}'
    return f'unknown data {data[:16].hex()}...'
