#!/usr/bin/env python3
"""Runs a socket-activated guest as if it bound its own port: binds and listens on
HOST:PORT with BACKLOG in this process, puts the socket at fd 3 and execs the guest
with LISTEN_FDS=1 and LISTEN_PID set to this same pid (exec keeps it). After the
exec nothing of this script is left: the guest holds a socket it created itself.

  direct.py HOST PORT BACKLOG NAME GUEST [ARGS...]
"""
import os
import socket
import sys


def main():
    host, port, backlog, name = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    fd = s.detach()
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=name)
    os.execv(sys.argv[5], sys.argv[5:])


if __name__ == "__main__":
    main()
