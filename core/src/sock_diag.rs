//! What the host kernel knows about sockets, via `NETLINK_SOCK_DIAG`: connections
//! accepted from portwake's listeners (for idle stop, without proxying a byte) and
//! the accept queues of the listeners themselves (for status).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::unix::{self, ShowFlags, UnixRequest};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// One TCP socket in the host's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// Local address and port.
    pub local: SocketAddr,
    /// Kernel TCP state (`TCP_ESTABLISHED` = 1, `TCP_LISTEN` = 10, …).
    pub state: u8,
    /// For a listener: connections waiting in its accept queue.
    pub queued: u32,
    /// Socket inode (0 for connections still in the accept queue).
    pub inode: u32,
}

/// One unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Socket inode.
    pub inode: u32,
    /// Kernel state (`TCP_ESTABLISHED` for connected, `TCP_LISTEN` for listeners).
    pub state: u8,
    /// Bound name: a path, or `@name` for the abstract namespace. Accepted
    /// connections carry their listener's name.
    pub name: Option<String>,
    /// For a listener: connections waiting in its accept queue.
    pub queued: u32,
}

/// Every TCP socket of both families in the states `states` selects.
pub fn tcp_sockets(states: StateFlags) -> io::Result<Vec<TcpSocket>> {
    let mut sockets = Vec::new();
    for (family, socket_id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: states.clone(),
            socket_id,
        });
        for message in dump(request)? {
            if let SockDiagMessage::InetResponse(r) = message {
                let id = &r.header.socket_id;
                sockets.push(TcpSocket {
                    local: SocketAddr::new(unmap(id.source_address), id.source_port),
                    state: r.header.state,
                    queued: if r.header.state == TCP_LISTEN {
                        r.header.recv_queue
                    } else {
                        0
                    },
                    inode: r.header.inode,
                });
            }
        }
    }
    Ok(sockets)
}

/// Every unix socket in the states `states` selects, with names and queue lengths.
pub fn unix_sockets(states: unix::StateFlags) -> io::Result<Vec<UnixSocket>> {
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: states,
        inode: 0,
        show_flags: ShowFlags::NAME | ShowFlags::RQLEN,
        cookie: [0xff; 8],
    });
    let mut sockets = Vec::new();
    for message in dump(request)? {
        if let SockDiagMessage::UnixResponse(r) = message {
            let mut socket = UnixSocket {
                inode: r.header.inode,
                state: r.header.state,
                name: None,
                queued: 0,
            };
            for nla in &r.nlas {
                match nla {
                    unix::nlas::Nla::Name(unix::nlas::UnixDiagName::Pathname(p)) => {
                        socket.name = Some(String::from_utf8_lossy(p.as_bytes()).into_owned());
                    }
                    unix::nlas::Nla::Name(unix::nlas::UnixDiagName::Abstract(a)) => {
                        socket.name = Some(format!("@{}", String::from_utf8_lossy(a)));
                    }
                    unix::nlas::Nla::ReceiveQueueLength(queued, _)
                        if r.header.state == TCP_LISTEN =>
                    {
                        socket.queued = *queued;
                    }
                    _ => {}
                }
            }
            sockets.push(socket);
        }
    }
    Ok(sockets)
}

/// `::ffff:a.b.c.d` (a v4 client on a dual-stack socket) as the v4 address it is.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Sends one dump request and collects every answer until `NLMSG_DONE`.
fn dump(request: SockDiagMessage) -> io::Result<Vec<SockDiagMessage>> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut answers = Vec::new();
    let mut receive = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut receive[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&receive[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = usize::try_from(message.header.length).unwrap_or(0);
            match message.payload {
                NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(e) => {
                    return Err(io::Error::other(format!("sock_diag: {e:?}")))
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn sees_a_listener_its_queue_and_an_established_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).unwrap();
        let all = tcp_sockets(StateFlags::all()).unwrap();
        let listening = all
            .iter()
            .find(|s| s.local == addr && s.state == TCP_LISTEN)
            .expect("the listener");
        assert_eq!(listening.queued, 1, "one connection waits to be accepted");
        assert!(all.iter().any(|s| s.local == addr && s.state == 1));
    }
}
