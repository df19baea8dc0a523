#!/bin/sh
# Stands in for the tutorial's provision-zookeeper.sh: says what it would set up
# and leaves a mark of its run (with its arguments) on the machine.
set -eu
echo "provision-zookeeper.sh on $(hostname): would set up zookeeper $*"
echo "$*" >> /var/log/provision-zookeeper
