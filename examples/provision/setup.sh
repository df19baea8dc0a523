#!/bin/sh
# Makes the folder the playbook's web server serves; counts its runs.
set -eu
root="$1"
mkdir -p "$root"
echo "setup.sh: $(hostname) serves $root"
echo run >> /var/log/setup-runs
