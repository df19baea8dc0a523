//! End to end on real VMs (qemu, TCG here): one two-machine testbed shared by
//! every assertion of the lifecycle — up, private network, ssh, halt, resume,
//! converged up, destroy — because each boot costs seconds under emulation.
//! The same scenario runs on libvirt in `lifecycle_libvirt.rs`.

mod common;

use common::{scenarios, Bed};

#[test]
fn two_machines_live_halt_resume_and_leave_nothing_behind() {
    let bed = Bed::new(&scenarios::pair("qemu"));
    scenarios::two_machines_live_halt_resume_and_leave_nothing_behind(&bed);
}
