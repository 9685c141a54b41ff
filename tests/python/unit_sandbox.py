#!/usr/bin/env python3
"""Runs a program under the restrictions of deploy/systemd's units that a process can put on
itself, then execs it (same pid), so that tests/deploy.rs can run the real daemons as
systemd would confine them, on a machine where systemd is not running:

- NoNewPrivileges=yes: prctl(PR_SET_NO_NEW_PRIVS);
- MemoryDenyWriteExecute=yes: prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux 6.3 and
  later), the kernel's own form of the rule systemd enforces with seccomp: no mapping both
  writable and executable, none made executable later;
- SystemCallFilter=@system-service, SystemCallFilter=~@privileged @resources,
  SystemCallErrorNumber=EPERM, SystemCallArchitectures=native: a seccomp filter (libseccomp)
  allowing exactly those calls, the groups expanded as this machine's
  `systemd-analyze syscall-filter` lists them, every other call failing with EPERM;
- RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX: socket() for any other family fails.

Says what it set on stderr ("sandbox: ..."), then execs. Exits 77, saying why, when this
machine cannot do it (no systemd-analyze, no libseccomp, a kernel without PR_SET_MDWE); the
test then skips.

Usage: unit_sandbox.py PROGRAM [ARGS...]
"""

import ctypes
import errno
import os
import shutil
import socket
import subprocess
import sys

PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
ALLOWED = "@system-service"
DENIED = ("@privileged", "@resources")
FAMILIES = (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6)


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def unavailable(reason):
    print(f"sandbox unavailable: {reason}", file=sys.stderr)
    sys.exit(77)


def expand(group, seen=None):
    """The system calls of a systemd group, nested groups included."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", group],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    calls = set()
    # The first line names the group; then comments, nested groups and calls, indented.
    for line in listing.splitlines()[1:]:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.startswith("@"):
            calls |= expand(name, seen)
        else:
            calls.add(name)
    return calls


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    if shutil.which("systemd-analyze") is None:
        unavailable("systemd-analyze is missing (Debian package systemd)")
    allowed = expand(ALLOWED)
    for group in DENIED:
        allowed -= expand(group)

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as error:
        unavailable(f"libseccomp: {error}")
    seccomp.seccomp_init.restype = ctypes.c_void_p
    seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
    seccomp.seccomp_syscall_resolve_name.restype = ctypes.c_int
    seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    seccomp.seccomp_rule_add_array.restype = ctypes.c_int
    seccomp.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    seccomp.seccomp_load.restype = ctypes.c_int
    seccomp.seccomp_load.argtypes = [ctypes.c_void_p]

    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        unavailable(f"PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        unavailable(f"PR_SET_MDWE (Linux 6.3+): {os.strerror(ctypes.get_errno())}")

    ctx = seccomp.seccomp_init(0x00050000 | errno.EPERM)  # SCMP_ACT_ERRNO(EPERM)
    if not ctx:
        unavailable("seccomp_init failed")
    rules = 0
    for name in sorted(allowed):
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        if number < 0 or name == "socket":
            continue  # not a call of this architecture; socket is allowed per family below
        if seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None) == 0:
            rules += 1
    socket_call = seccomp.seccomp_syscall_resolve_name(b"socket")
    for family in FAMILIES:
        compare = ArgCmp(0, SCMP_CMP_EQ, int(family), 0)
        if seccomp.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, socket_call, 1, ctypes.byref(compare)) != 0:
            unavailable("seccomp_rule_add for socket() failed")
    if seccomp.seccomp_load(ctx) != 0:
        unavailable("seccomp_load failed")
    print(
        f"sandbox: no_new_privs, mdwe, {rules} system calls allowed ({ALLOWED} minus "
        f"{' '.join(DENIED)}), socket() for AF_UNIX, AF_INET, AF_INET6 only",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.argv[1], sys.argv[1:])


main()
