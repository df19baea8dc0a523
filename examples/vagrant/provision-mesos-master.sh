#!/bin/sh
# Stands in for the tutorial's provision-mesos-master.sh: says what it would set up
# and leaves a mark of its run (with its arguments) on the machine.
set -eu
echo "provision-mesos-master.sh on $(hostname): would set up mesos-master $*"
echo "$*" >> /var/log/provision-mesos-master
