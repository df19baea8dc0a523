#!/bin/sh
# Run inside the image (chroot) after its packages and files are installed.
# Makes the boot path lean: the default target starts only what SSH needs;
# packaged daemons stay installed but are started by testbed's kits.
set -eu

# An empty machine-id gives each VM its own and keeps systemd from treating
# the boot as a first boot (which would enable every packaged service).
: > /etc/machine-id
rm -f /var/lib/dbus/machine-id

# Host keys are testbed's, per machine, from the seed; none ship in the image.
rm -f /etc/ssh/ssh_host_*

# A small initramfs: only the drivers a VM needs, lz4 (the fastest to
# unpack under software emulation), no resume device to wait for, and no
# udev: the listed modules are loaded by the initramfs itself and devtmpfs
# makes /dev/vda, so there is nothing to trigger or settle. ata_piix and
# sd_mod boot the bootable disk from an IDE controller (VirtualBox's PIIX4:
# the cloud kernel has no AHCI driver); loaded on a direct boot too, where
# they find no disk, they cost nothing measurable (time to identity under
# TCG, three boots each: 8.7 s with them, 8.8 s without).
cat > /etc/initramfs-tools/conf.d/testbed <<'CONF'
MODULES=list
COMPRESS=lz4
RESUME=none
CONF
dpkg-divert --quiet --local --rename --add /usr/share/initramfs-tools/hooks/udev
cat > /etc/initramfs-tools/modules <<'MODS'
virtio_pci
virtio_blk
virtio_net
virtio_rng
ata_piix
sd_mod
MODS
update-initramfs -u -k all >/dev/null

# Generators run at every boot before any unit; keep only the SysV one
# (packaged daemons such as zookeeperd ship init scripts that kits start).
# Without the fstab generator /etc/fstab is not read: the kernel command
# line mounts the root read-write and there is nothing else to mount.
mkdir -p /etc/systemd/system-generators
for generator in /usr/lib/systemd/system-generators/*; do
    case "${generator##*/}" in
        systemd-sysv-generator) ;;
        *) ln -sf /dev/null "/etc/systemd/system-generators/${generator##*/}" ;;
    esac
done

systemctl set-default testbed.target
systemctl mask ssh.service ssh.socket
# Nothing else starts at boot; without udev and networkd there is nothing to
# wait for. These would otherwise be pulled in by other units' dependencies.
systemctl mask e2scrub_reap.service systemd-random-seed.service \
    systemd-networkd.service systemd-networkd-wait-online.service \
    systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
    systemd-remount-fs.service 2>/dev/null || true

# A root with no password, only the key testbed puts in authorized_keys.
usermod -p "*" root
mkdir -p /root/.ssh /etc/testbed
chmod 0700 /root/.ssh

# What the image enables for multi-user.target itself: kits start those.
# What a machine enables later (a provisioner) testbed-enabled starts at boot.
mkdir -p /usr/lib/testbed
ls /etc/systemd/system/multi-user.target.wants 2>/dev/null > /usr/lib/testbed/base-wants || true
