"""The one exception type for mistakes a user can fix (a bad file, key or value).

The CLI prints its message as one line on stderr and exits with code 2, without a traceback;
anything else that escapes is a bug in vmr and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the file, key or value at fault."""


def mount_point(path) -> str:
    """The mount point of the file system holding ``path`` (which may not exist yet)."""
    import os

    current = os.path.abspath(path)
    while not os.path.exists(current):
        current = os.path.dirname(current)
    while not os.path.ismount(current):
        current = os.path.dirname(current)
    return current


def out_of_space(error: BaseException, path) -> UserError | None:
    """A UserError naming the disk when ``error`` is a write that failed because the file system
    holding ``path`` is full, else None. Some writers (torch's C++ stream writer, ffmpeg) report
    only "write failed": those count when the disk has almost nothing left."""
    import errno
    import shutil

    where = mount_point(path)
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error).lower()
    if not full and ("no space left" in text or "write failed" in text or "failed writing" in text):
        usage = shutil.disk_usage(where)
        full = "no space left" in text or usage.free < max(16 << 20, usage.total // 100)
    if not full:
        return None
    free_mb = shutil.disk_usage(where).free / 1e6
    return UserError(f"no space left on the disk at {where} ({free_mb:.1f} MB free) while writing {path}")
