"""Kernels first when a session runs out of memory (mybinder.org's "your kernel will be
restarted").

A session container has one memory limit for everything in it. When a notebook goes over
it, the kernel's OOM killer ends the process with the highest badness score in the
container; that is usually the kernel (it holds the memory), but a kernel whose memory sits
in child processes, or a big Jupyter server beside a moderate kernel, would make it the
server, and the whole session would die. So every kernel raises its own ``oom_score_adj``
(any process may raise its own; lowering needs CAP_SYS_RESOURCE, which sessions never
have) before it runs, while the server stays at 0: the kernel is always the one picked,
and Jupyter's kernel restarter starts it again.

How: a ``jupyter_server_config.py`` put into the container before it starts (no host
mount) and put on ``JUPYTER_CONFIG_PATH``, which wraps jupyter_client's ``launch_kernel``
so each kernel process (and each restart) raises its score between fork and exec. That
covers every kernel language, because it happens in the server, not in the kernel.
"""

from __future__ import annotations

import io
import tarfile

# Inside the container: the directory on JUPYTER_CONFIG_PATH that holds the config.
KERNEL_CONFIG_DIR = "/etc/binderbox/jupyter"

_CONFIG = '''\
"""Written by binderbox: each kernel raises its oom_score_adj to {adj}, so that the
kernel, not this server, is what goes when the session runs out of memory (Jupyter then
restarts the kernel)."""
import os


def _binderbox_kernels_go_first():
    score = b"{adj}"

    def raise_score():
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, score)
            finally:
                os.close(fd)
        except OSError:
            pass

    try:
        from jupyter_client.provisioning import local_provisioner as module
    except ImportError:  # jupyter_client before 7
        from jupyter_client import manager as module
    launch = getattr(module, "launch_kernel", None)
    if launch is None or getattr(launch, "binderbox", False):
        return

    def launch_kernel(cmd, **kwargs):
        before = kwargs.get("preexec_fn")

        def preexec():
            raise_score()
            if before is not None:
                before()

        kwargs["preexec_fn"] = preexec
        return launch(cmd, **kwargs)

    launch_kernel.binderbox = True
    module.launch_kernel = launch_kernel


_binderbox_kernels_go_first()
'''


def server_config(score_adj: int) -> str:
    """The jupyter_server_config.py that gives kernels ``score_adj`` (1-1000)."""
    if not 1 <= score_adj <= 1000:
        raise ValueError("oom_score_adj for kernels must be between 1 and 1000")
    return _CONFIG.replace("{adj}", str(score_adj))


def config_archive(score_adj: int) -> bytes:
    """A tar archive to extract at ``/`` of a session container: KERNEL_CONFIG_DIR with
    the config in it, owned by root and read-only for the session's user."""
    data = server_config(score_adj).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        parts = KERNEL_CONFIG_DIR.strip("/").split("/")
        # /etc exists in every image; the directories below it are binderbox's.
        for depth in range(2, len(parts) + 1):
            folder = tarfile.TarInfo("/".join(parts[:depth]))
            folder.type, folder.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(folder)
        member = tarfile.TarInfo(f"{KERNEL_CONFIG_DIR.strip('/')}/jupyter_server_config.py")
        member.size, member.mode = len(data), 0o644
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def config_path(image_value: str = "") -> str:
    """JUPYTER_CONFIG_PATH for the session: binderbox's directory, then the image's own."""
    return KERNEL_CONFIG_DIR + (f":{image_value}" if image_value else "")
