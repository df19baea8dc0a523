#!/bin/sh
# Stands in for the tutorial's provision-mesos-slave.sh: says what it would set up
# and leaves a mark of its run (with its arguments) on the machine.
set -eu
echo "provision-mesos-slave.sh on $(hostname): would set up mesos-slave $*"
echo "$*" >> /var/log/provision-mesos-slave
