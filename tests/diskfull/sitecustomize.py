"""Injected into a test server process (PYTHONPATH): a disk that is full while a flag file exists.

While the file named by FLORA_TEST_DISK_FULL exists, every fsync of a file the server writes
and every allocation of an upload's space (posix_fallocate) fails with ENOSPC, and every database
write (a transaction or a quick insert) with SQLite's "database or disk is full", as
they do on a full disk; removing the file is freeing space. Used by tests/test_disk_full.py only.
"""

import errno
import os
import sqlite3

_FLAG = os.environ.get("FLORA_TEST_DISK_FULL")

if _FLAG:
    import flora.common.chunks as _chunks
    import flora.server.store as _store

    _fsync, _fallocate = _chunks.fsync_file, os.posix_fallocate

    def _full_fsync(file):
        if os.path.exists(_FLAG):
            raise OSError(errno.ENOSPC, "No space left on device")
        _fsync(file)

    def _full_fallocate(fd, offset, length):
        if os.path.exists(_FLAG):
            raise OSError(errno.ENOSPC, "No space left on device")
        _fallocate(fd, offset, length)

    def _full_database(write):
        def full_or_write(self, *args, **kwargs):
            if os.path.exists(_FLAG):
                raise sqlite3.OperationalError("database or disk is full")
            return write(self, *args, **kwargs)

        return full_or_write

    _chunks.fsync_file = _full_fsync
    _store.Store._transaction = _full_database(_store.Store._transaction)
    _store.Store._insert_quick = _full_database(_store.Store._insert_quick)
    os.posix_fallocate = _full_fallocate
