"""Injected into a test server process (PYTHONPATH): a disk that is full while a flag file exists.

While the file named by FLORA_TEST_DISK_FULL exists, every fsync of a file the server writes
and every allocation of an upload's space (posix_fallocate) fails with ENOSPC, and every database
write (a transaction, a quick insert or the WAL's checkpoint at close) with SQLite's "database or disk is full", as
they do on a full disk; removing the file is freeing space. While the file named by
FLORA_TEST_ARTIFACTS_FULL exists, safetensors' ``save_file`` (the server's artifact writes) fails
as it does on a full disk: a ``SafetensorError`` whose text names the OS error, not an OSError.
While the file named by FLORA_TEST_NO_FILES exists, torch's ``UntypedStorage.from_file`` (which
safetensors' ``safe_open`` maps files through) fails as it does when the process is out of file
descriptors: a ``RuntimeError`` whose text ends "Too many open files (24)", and so does the
database's WAL fsync (``Store.sync``, with EMFILE) after its write.
While the file named by FLORA_TEST_AGGREGATION_FAULT exists, writing a round's artifacts fails
with an error of the server's own (no update's fault, no resource's).
Used by tests/test_disk_full.py only.
"""

import errno
import os
import sqlite3

_FLAG = os.environ.get("FLORA_TEST_DISK_FULL")
_ARTIFACTS_FLAG = os.environ.get("FLORA_TEST_ARTIFACTS_FULL")
_NO_FILES_FLAG = os.environ.get("FLORA_TEST_NO_FILES")

_FAULT_FLAG = os.environ.get("FLORA_TEST_AGGREGATION_FAULT")

if _FAULT_FLAG:
    import flora.server.aggregator as _aggregator

    _apply = _aggregator.Aggregator._apply

    def _faulty_apply(self, *args, **kwargs):
        if os.path.exists(_FAULT_FLAG):
            raise RuntimeError("injected: a fault of the server's own")
        return _apply(self, *args, **kwargs)

    _aggregator.Aggregator._apply = _faulty_apply

if _NO_FILES_FLAG:
    import torch

    _from_file = torch.UntypedStorage.from_file

    def _no_files_from_file(filename, *args, **kwargs):
        if os.path.exists(_NO_FILES_FLAG):
            raise RuntimeError(f"unable to open file <{filename}> in read-only mode: Too many open files (24)")
        return _from_file(filename, *args, **kwargs)

    torch.UntypedStorage.from_file = staticmethod(_no_files_from_file)

    import flora.server.store as _store_module

    _sync = _store_module.Store.sync

    def _no_files_sync(self):
        if os.path.exists(_NO_FILES_FLAG):
            raise OSError(errno.EMFILE, "Too many open files")
        _sync(self)

    _store_module.Store.sync = _no_files_sync

if _ARTIFACTS_FLAG:
    import safetensors.torch as _safetensors_torch
    from safetensors import SafetensorError

    _save_file = _safetensors_torch.save_file

    def _full_save_file(tensors, filename, metadata=None):
        if os.path.exists(_ARTIFACTS_FLAG):
            raise SafetensorError(
                f"Error while serializing: I/O error: No space left on device (os error 28) at path {str(filename)!r}")
        return _save_file(tensors, filename, metadata=metadata)

    _safetensors_torch.save_file = _full_save_file

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
    _store.Store._write_quick = _full_database(_store.Store._write_quick)
    _store.Store._checkpoint = _full_database(_store.Store._checkpoint)
    os.posix_fallocate = _full_fallocate
