"""The systemd unit: :func:`unit` renders it for the system manager or for a user's own.

``systemd/locopilot.service`` in the repository is ``unit(DEFAULT_EXECUTABLE)``.
The text is plain systemd syntax with comments saying why each line is there;
``systemd-analyze verify`` checks it in the tests.
"""

from __future__ import annotations

DEFAULT_EXECUTABLE = "/usr/local/bin/locopilot"
UNIT_NAME = "locopilot.service"
SYSTEM_ENV_FILE = "/etc/locopilot/locopilot.env"

#: Seconds systemd waits after SIGTERM before it SIGKILLs what is left: above the
#: server's own limit (LOCOPILOT_SHUTDOWN_GRACE, 30 s by default, plus
#: server.STOP_SECONDS for the runners and the database), so the server ends itself.
STOP_TIMEOUT = 60

_SYSTEM_HEADER = f"""\
# locopilot as a system service. `locopilot service install` writes this file
# as /etc/systemd/system/{UNIT_NAME} and enables it; by hand:
#
#   install -m 0755 locopilot {DEFAULT_EXECUTABLE}
#   install -m 0644 systemd/{UNIT_NAME} /etc/systemd/system/
#   install -d -m 0700 /etc/locopilot
#   install -m 0600 systemd/locopilot.env.example {SYSTEM_ENV_FILE}
#   systemctl daemon-reload && systemctl enable --now locopilot
#   journalctl -u locopilot -f
#
# State (the database, and models unless LOCOPILOT_MODELS_DIR says otherwise) is
# in /var/lib/locopilot, which the program finds through $STATE_DIRECTORY; with
# DynamicUser= that is a symlink to /var/lib/private/locopilot, made at the
# first start. Put GGUF files in /var/lib/locopilot/models.
# Generated from locopilot/service/systemd.py (`just docs`).
"""

_USER_HEADER = f"""\
# locopilot as a service of your own systemd (`systemctl --user`).
# `locopilot service install --user` writes this file as
# ~/.config/systemd/user/{UNIT_NAME} and enables it. It stops when you log
# out unless lingering is on (`loginctl enable-linger`). Settings are in
# ~/.config/locopilot/locopilot.env; state in ~/.local/share/locopilot, the
# same folder the locopilot command line uses.
# Generated from locopilot/service/systemd.py.
"""

_UNPACK = """\
# The executable is a PyInstaller one-file bundle: its first start unpacks
# about 110 MB into $TMPDIR and keeps it there (locopilot-<uid>-<key>) for
# later starts, and runs code from there, so $TMPDIR must allow exec.
# Not /tmp (often noexec, and PrivateTmp= keeps its mount options) and not
# RuntimeDirectory= (/run is mounted noexec on Debian and Ubuntu, and is RAM).
# The cache directory (/var/cache/locopilot, ~/.cache/locopilot for a user
# service) is on disk and stays writable under ProtectSystem=strict.
# A start SIGKILLed while unpacking leaves its temporary _MEI folder, so those
# are removed before each start (one instance per unit: none in use).
CacheDirectory=locopilot
CacheDirectoryMode=0700
Environment=TMPDIR=%C/locopilot
ExecStartPre=/bin/sh -c 'rm -rf -- "%C/locopilot/"_MEI*'
"""

_STOP = f"""\
# Stop: SIGTERM to the main process only (the bundle's bootloader passes it on
# to the program); the server stops accepting, drains requests for up to
# LOCOPILOT_SHUTDOWN_GRACE seconds (30 by default) and ends its model runners
# itself. KillMode=mixed keeps systemd from signalling the runners directly,
# and SIGKILLs whatever is left after TimeoutStopSec, which must stay above
# the grace plus 15 s (the server's own limit): raise both together.
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT}
Restart=on-failure
RestartSec=2s

# Loading a model maps its file and keeps one runner process per loaded model.
LimitNOFILE=65536
"""

_SECCOMP = """\
# W^X: no memory both writable and executable. Checked while the server
# loaded a model in a runner and answered a chat, under the kernel's own form
# (prctl PR_SET_MDWE, inherited by the runners) and with strace: no mprotect
# adds exec (the seccomp form refuses any), and each process makes one RWX
# mmap, libffi's, for Python's ctypes callbacks (llama.cpp's log callback).
# Refused that, libffi maps a memfd twice (a write view and an exec view),
# which both forms allow. ggml's CPU code is compiled ahead of time (no JIT).
# A GPU driver that JIT-compiles on the CPU side (CUDA's PTX JIT, Mesa's
# llvmpipe) may need RWX memory: delete this line if the engine fails to
# start on a GPU host.
MemoryDenyWriteExecute=yes
# The system calls of an ordinary service (systemd's own list); a call outside
# it fails with EPERM rather than killing the process.
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
NoNewPrivileges=yes
UMask=0077
"""

_SYSTEM_SANDBOX = """\
# Sandbox. DynamicUser= already implies ProtectSystem=strict,
# ProtectHome=read-only, PrivateTmp=yes, RemoveIPC=yes and
# NoNewPrivileges=yes; they are spelled out (ProtectHome is stricter).
# ProtectSystem=strict makes the whole file system read-only but for the
# state and cache directories: a models folder elsewhere is read-only, which
# is enough to serve it; for one the server must write to (LOCOPILOT_MODELS_DIR
# outside /var/lib/locopilot), add it here:
#ReadWritePaths=/srv/models
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ProtectProc=invisible
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
# No capabilities; listening on a port below 1024 needs
# AmbientCapabilities=CAP_NET_BIND_SERVICE and the same in CapabilityBoundingSet=.
CapabilityBoundingSet=
# Not set, on purpose:
#  PrivateDevices=yes would hide GPUs (/dev/nvidia*, /dev/dri, /dev/kfd).
#  A GPU under /dev/dri or /dev/kfd (Vulkan, ROCm) is usually group-owned:
#  add SupplementaryGroups=render video for it; /dev/nvidia* is world-usable.
"""

_USER_SANDBOX = """\
# The file-system sandbox of the system unit (ProtectSystem=, ProtectHome=,
# PrivateTmp=) needs mount namespaces, which a user's systemd can only set up
# with unprivileged user namespaces; where those are off the service would
# not start at all, so a user service goes without. The filters above need no
# privilege (NoNewPrivileges= is what lets them in).
"""


def unit(executable: str = DEFAULT_EXECUTABLE, *, user: bool = False) -> str:
    """The unit file's text, running ``executable serve``.

    ``user`` renders it for ``systemctl --user``: no dynamic user or state
    directory (the program's default data folder), the env file under
    ``$XDG_CONFIG_HOME`` (``%E``) and no mount sandbox. Raises ValueError for an
    executable path systemd would split or expand (white space, ``%``, ``$``).
    """
    if not executable.startswith("/") or any(c.isspace() or c in "%$\\\"'" for c in executable):
        raise ValueError(f"{executable!r}: the executable needs an absolute path without spaces, quotes, % or $")
    if user:
        unit_section = "[Unit]\nDescription=locopilot: OpenAI-compatible endpoint for local models\n"
        identity = "EnvironmentFile=-%E/locopilot/locopilot.env\n"
        sandbox = _USER_SANDBOX
        install = "[Install]\nWantedBy=default.target\n"
        header = _USER_HEADER
    else:
        unit_section = (
            "[Unit]\nDescription=locopilot: OpenAI-compatible endpoint for local models\n"
            "Wants=network-online.target\nAfter=network-online.target\n"
        )
        identity = (
            f"EnvironmentFile=-{SYSTEM_ENV_FILE}\nDynamicUser=yes\nStateDirectory=locopilot\nStateDirectoryMode=0700\n"
        )
        sandbox = _SYSTEM_SANDBOX
        install = "[Install]\nWantedBy=multi-user.target\n"
        header = _SYSTEM_HEADER
    # SIGHUP re-reads LOCOPILOT_UPSTREAMS_FILE (`systemctl reload`); nothing restarts.
    service = f"[Service]\nType=exec\nExecStart={executable} serve\nExecReload=/bin/kill -HUP $MAINPID\n{identity}"
    return "\n".join([header, unit_section, service, _UNPACK, _STOP, _SECCOMP, sandbox, install]).rstrip("\n") + "\n"
