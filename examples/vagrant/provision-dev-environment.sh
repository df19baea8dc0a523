#!/bin/sh
# Stands in for the tutorial's provision-dev-environment.sh: says what it would set up
# and leaves a mark of its run (with its arguments) on the machine.
set -eu
echo "provision-dev-environment.sh on $(hostname): would set up dev-environment $*"
echo "$*" >> /var/log/provision-dev-environment
