#!/bin/bash
# ka_port_check.sh PORT: keepalived's vrrp_script for bench/checks.py, the same probe as
# ecluster's [[check]] kind = "tcp": exit 0 when 127.0.0.1:PORT accepts a connection.
exec 3<>"/dev/tcp/127.0.0.1/${1:?usage: ka_port_check.sh PORT}"
