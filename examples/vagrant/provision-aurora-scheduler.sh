#!/bin/sh
# Stands in for the tutorial's provision-aurora-scheduler.sh: says what it would set up
# and leaves a mark of its run (with its arguments) on the machine.
set -eu
echo "provision-aurora-scheduler.sh on $(hostname): would set up aurora-scheduler $*"
echo "$*" >> /var/log/provision-aurora-scheduler
