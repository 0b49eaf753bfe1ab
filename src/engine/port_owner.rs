//! Who holds a port: when bootfleet cannot bind its TFTP, HTTP or panel
//! address because it is in use, the error names the process that has it
//! (`dnsmasq`, `in.tftpd`, `nginx`...), read from `/proc/net` and each
//! process's descriptors. Best effort: another user's processes are not
//! visible without root, and then only the port is named.

use std::net::SocketAddr;

/// A socket's protocol table in `/proc/net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// `pid N (name)` of a process with a socket bound to `address`'s port,
/// if one can be seen.
pub fn port_owner(address: SocketAddr, protocol: Protocol) -> Option<String> {
    let inodes = socket_inodes(address.port(), protocol);
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            return Some(format!("pid {pid} ({})", name.trim()));
        }
    }
    None
}

/// Inodes of the sockets bound to local `port` (listening, for TCP).
fn socket_inodes(port: u16, protocol: Protocol) -> Vec<u64> {
    let tables: &[&str] = match protocol {
        Protocol::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        Protocol::Udp => &["/proc/net/udp", "/proc/net/udp6"],
    };
    let mut inodes = Vec::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(
            text.lines()
                .skip(1)
                .filter_map(|line| inode_on(line, port, protocol)),
        );
    }
    inodes
}

/// The inode of one `/proc/net/{tcp,udp}` line if its local port is `port`
/// (and, for TCP, it listens: state 0A).
fn inode_on(line: &str, port: u16, protocol: Protocol) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
    let listening = protocol == Protocol::Udp || *fields.get(3)? == "0A";
    (local_port == port && listening).then(|| fields.get(9)?.parse().ok())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_bound_port_is_this_process() {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let me = format!("pid {} (", std::process::id());
        let owner = port_owner(tcp.local_addr().unwrap(), Protocol::Tcp).unwrap();
        assert!(owner.starts_with(&me), "{owner}");
        let owner = port_owner(udp.local_addr().unwrap(), Protocol::Udp).unwrap();
        assert!(owner.starts_with(&me), "{owner}");
        let free = udp.local_addr().unwrap();
        drop(udp);
        assert_eq!(port_owner(free, Protocol::Udp), None);
    }
}
