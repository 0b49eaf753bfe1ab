//! Which machine each client address is: file fetches carry no MAC, so
//! the router puts them on a machine's timeline by the address that last
//! leased or claimed that machine. A lease from this server's DHCP beats
//! any claim, so a host cannot speak for a machine whose address it does
//! not hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use tracing::debug;

use super::MAX_SEEN;
use crate::proto::Mac;

/// How the router knows that an address is a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Binding {
    /// This server's DHCP leased the address to the machine.
    Leased,
    /// A request from the address named the machine (its script's URL):
    /// anyone on the boot LAN can say this.
    Claimed,
}

/// Client addresses and the machines they are, bounded to [`MAX_SEEN`];
/// with, for clients this server's DHCP answered, the server address it
/// answered from (which a config served over TFTP, where the request does
/// not say which of the server's addresses it came to, refers to).
#[derive(Default)]
pub(super) struct ClientBindings {
    by_address: Mutex<HashMap<IpAddr, (Mac, Binding)>>,
    servers: Mutex<HashMap<IpAddr, IpAddr>>,
}

impl ClientBindings {
    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, (Mac, Binding)>> {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that this server's DHCP answered `client` from `server`.
    pub(super) fn answered_from(&self, client: IpAddr, server: IpAddr) {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if servers.len() >= MAX_SEEN && !servers.contains_key(&client) {
            servers.clear();
        }
        servers.insert(client, server);
    }

    /// The address this server's DHCP last answered `client` from.
    pub(super) fn server_for(&self, client: IpAddr) -> Option<IpAddr> {
        self.servers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&client)
            .copied()
    }

    /// Binds `client` to `mac`; a claim never replaces another machine's
    /// lease.
    pub(super) fn bind(&self, client: IpAddr, mac: Mac, binding: Binding) {
        let mut clients = self.lock();
        if clients.len() >= MAX_SEEN && !clients.contains_key(&client) {
            clients.clear();
        }
        match clients.get(&client) {
            Some(&(leased, Binding::Leased)) if binding == Binding::Claimed && leased != mac => {
                debug!(%client, claimed = %mac, %leased, "address leased to another machine; claim ignored");
            }
            _ => {
                clients.insert(client, (mac, binding));
            }
        }
    }

    /// Whether this server's DHCP leased `client` to `mac`.
    pub(super) fn is_leased_to(&self, client: IpAddr, mac: Mac) -> bool {
        self.lock().get(&client) == Some(&(mac, Binding::Leased))
    }

    /// Whether `client` may act for `mac`: true unless this server leased
    /// the address to another machine.
    pub(super) fn may_speak_for(&self, client: IpAddr, mac: Mac) -> bool {
        !matches!(self.lock().get(&client), Some(&(leased, Binding::Leased)) if leased != mac)
    }

    /// The machine `client` was last bound to.
    pub(super) fn machine_at(&self, client: IpAddr) -> Option<Mac> {
        self.lock().get(&client).map(|&(mac, _)| mac)
    }
}
