//! SSH over a port forwarded on the host's loopback: how qemu's user-mode
//! network, and libvirt's (which passes qemu's through), let the host reach
//! a guest. Shared by the providers that forward this way.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use super::ProviderError;

/// Where forwarded ports listen: loopback only, never another interface.
pub(super) const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The host end of a machine's SSH forward.
pub(super) fn ssh_address(port: u16) -> SocketAddr {
    SocketAddr::from((HOST, port))
}

/// [`ssh_address`] on this machine.
pub(super) fn ssh_endpoint(port: u16) -> crate::ssh::Endpoint {
    crate::ssh::Endpoint::local(ssh_address(port))
}

/// `previous` while it is still free (the record and `ssh_config` keep
/// it), else a new free port. `retry`: the last start found `previous`
/// taken after all (another process bound it in between).
pub(super) fn ssh_port(previous: u16, retry: bool) -> Result<u16, ProviderError> {
    if !retry && previous != 0 && is_free(previous) {
        return Ok(previous);
    }
    free_port()
}

/// A port the kernel says is free now (it may be taken again before qemu
/// binds it; the caller retries then).
fn free_port() -> Result<u16, ProviderError> {
    TcpListener::bind((HOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| ProviderError::Io {
            what: "cannot find a free port on 127.0.0.1".into(),
            source,
        })
}

fn is_free(port: u16) -> bool {
    TcpListener::bind((HOST, port)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_previous_port_is_kept_and_a_taken_one_replaced() {
        let taken = TcpListener::bind((HOST, 0)).expect("bind");
        let taken_port = taken.local_addr().expect("addr").port();
        let replaced = ssh_port(taken_port, false).expect("port");
        assert_ne!(replaced, taken_port);
        assert_ne!(replaced, 0);
        drop(taken);
        assert_eq!(ssh_port(taken_port, false).expect("port"), taken_port);
        assert_ne!(ssh_port(0, false).expect("port"), 0);
    }

    #[test]
    fn ssh_is_reached_on_loopback() {
        assert_eq!(ssh_address(2222).to_string(), "127.0.0.1:2222");
    }
}
